// Package policy is an Exchange organisation's conditional-access policy:
// the YAML file an administrator writes, and the pure function that turns
// one ActiveSync partnership and its MDM record into allow, block or
// quarantine. It does no I/O except Load, keeps no state and reads no clock
// (the caller passes Now), so the evaluator can replay any decision from the
// recorded input and Policy.Version.
//
// # The file
//
// One file per organisation:
//
//	version: 1
//	org: contoso                 # must equal the org the evaluator serves
//	dry_run: false               # decide and record, never apply
//	scope:                       # who easguard manages; everyone else is never touched
//	  include: {mailboxes: [], domains: [contoso.com], groups: [all-staff]}
//	  exclude: {mailboxes: [ceo@contoso.com, "healthmailbox*@contoso.com"], domains: [], groups: [service-accounts]}
//	groups:                      # easguard does not read Exchange group membership
//	  all-staff: ["*@contoso.com"]
//	  service-accounts: [svc-*@contoso.com]
//	unknown_device: block        # block | quarantine
//	noncompliant: block          # block | quarantine
//	allowed_platforms: [ios, ipados, android]
//	platform_not_allowed: block
//	grace_period: 0s
//	exemptions:
//	  - {mailbox: "cfo@contoso.com", device_id: "ApplF17LTTCGFFG8", reason: "CFO iPhone, INC-4711", until: "2026-12-31T00:00:00Z"}
//	  - {mailbox: "helpdesk@contoso.com", reason: "shared helpdesk phone"}
//	notify: true
//	trust_mdm_records_without_user: false
//	default_access_level: quarantine  # quarantine | block | allow | unchanged; see below
//
// # The organisation's default
//
// Exchange gives every partnership that no individual list entry and no
// device access rule covers the organisation's DefaultAccessLevel, and a
// changed default reaches each such phone at its next sync. easguard
// quarantines a device by leaving it off both lists, so quarantine needs the
// default to be Quarantine; and tightening the default takes mail from every
// phone easguard has not allow-listed, out-of-scope mailboxes included.
// OrgDefault says what easguard makes it: default_access_level when the
// file sets it, else Quarantine when the scope is everyone (no include, no
// exclude) and the organisation's own default, untouched, for a pilot. The
// evaluator plans a tightening as a mass revocation (allow-list first, count
// the rest in the blast-radius guard, show it in a dry run). A quarantine
// action where the default would not be Quarantine is an error.
//
// # What the phone reports
//
// The device id, device type, model, OS and user agent of a partnership are
// what the phone says about itself: any phone can claim the device type
// EASProbeDeviceType or copy another phone's device id. The mailbox is not:
// Exchange authenticated its user. So an exemption is a mailbox (every
// device of it) or a device of a mailbox (mailbox with device_id or
// device_type); a device_id or device_type exemption without a mailbox
// admits every phone on every mailbox that claims the value, and is refused
// unless it says trust_client_reported: true. Health-probe mailboxes are
// better left out of scope (scope.exclude "healthmailbox*@contoso.com").
// Warnings lists every rule that trusts a client-reported value (acknowledged
// exemptions, a device type bound to a mailbox, allowed_platforms where a
// claimed platform escapes a harsher platform_not_allowed, and
// trust_mdm_records_without_user); the evaluator logs them and shows them
// in its policy status at every load.
//
// An MDM record that names no user is joined to a partnership only by the
// EAS device id, which the phone chooses; the matcher reports that as
// NO_MATCH_REASON_RECORD_WITHOUT_USER and Evaluate treats the device as
// unknown unless trust_mdm_records_without_user is true.
//
// Parse is strict because a policy decides who loses mail: an unknown key, a
// wrong type, a group that is used but not defined or a second YAML document
// is an error, never ignored, and every error names the path of the value
// (scope.include.domains[1]) and its line. A key that is absent, or present
// with an empty value, takes the value Default gives it. Addresses and domains
// are compared case-insensitively and stored in lower case; lists that are
// sets (scope lists, group members, allowed_platforms) are sorted and
// deduplicated, so that Version does not change when only their order does.
// grace_period takes Go durations ("36h", "90m") and whole days ("7d",
// "2d12h"), at most 365 days. Anchors and aliases may be used; merge keys
// ("<<") may not.
//
// # Evaluation order
//
// Evaluate applies the first rule that decides, in this order:
//
//  1. Scope. The mailbox's primary SMTP address and UPN are matched,
//     case-insensitively and with "*" matching any run of characters, against
//     scope.exclude and scope.include (mailbox patterns, domains, and the
//     member patterns of named groups). A mailbox that any exclude entry
//     matches is out of scope even if include names it (exclude wins); an
//     empty include means every mailbox. Out of scope means InScope false:
//     easguard leaves the partnership alone and decides nothing.
//  2. Exemptions that are still valid at Now (no until, or Now before until)
//     allow the device: by device_id (compared case-insensitively, as
//     Exchange compares device ids), then by device_type, then by mailbox;
//     a device_id or device_type exemption with a mailbox applies on that
//     mailbox (its SMTP address or UPN) only.
//     They come before every other rule because they are the break-glass
//     that must work when the MDM or its records are wrong.
//  3. Platform. The platform is the MDM record's when there is one and it
//     names a platform, else PlatformOf the partnership's DeviceType and
//     DeviceOS. A platform not in a non-empty allowed_platforms is decided
//     by platform_not_allowed, because enrolling cannot fix it.
//  4. A usable MDM record (MDM set and NoMatch unspecified) that is enrolled
//     and compliant (COMPLIANT or IN_GRACE_PERIOD) is allowed ("compliant");
//     enrolled but in any other compliance state is decided by noncompliant.
//     A record that names no user (NoMatch RECORD_WITHOUT_USER) is usable
//     only with trust_mdm_records_without_user.
//     ENROLLED, UNHEALTHY and an unreported (UNSPECIFIED) enrollment state
//     count as enrolled and leave the verdict to the compliance state.
//  5. Everything else is an unknown device: no MDM record, a record for
//     another user, a record without the EAS id, an ambiguous match, a record
//     that is not (yet) enrolled, or one that is retired or wiped. If
//     grace_period is set and the partnership's first sync is less than
//     grace_period before Now, the device is allowed ("grace_period") until
//     first sync + grace_period, which is returned as RecheckAt; otherwise
//     unknown_device decides.
//
// Quarantine maps to DESIRED_ACCESS_QUARANTINE and block to
// DESIRED_ACCESS_BLOCK. A nil Mailbox or Partnership, a zero Now or an Org
// that is not the policy's is a programming error: Evaluate does not panic
// but returns InScope false with Rule "invalid_input", so that nothing is
// changed on Exchange on the strength of a broken input.
package policy
