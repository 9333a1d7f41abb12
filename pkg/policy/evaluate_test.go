package policy

import (
	"strings"
	"sync"
	"testing"
	"time"

	ev "github.com/easguard/easguard/proto/easguard/v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// fixture is the policy most evaluation tests run against. It is parsed,
// not built, so that the tests exercise what administrators write.
const fixture = `
version: 1
org: contoso
scope:
  include: {domains: [contoso.com], groups: [partners]}
  exclude: {mailboxes: [CEO@contoso.com], groups: [service-accounts]}
groups:
  partners: ["*@Fabrikam.COM"]
  service-accounts: [svc-*@contoso.com]
default_access_level: quarantine
unknown_device: quarantine
noncompliant: block
allowed_platforms: [ios, ipados, android]
platform_not_allowed: block
grace_period: 2d
exemptions:
  - {device_id: "ApplF17LTTCGFFG8", reason: "CEO iPhone, INC-4711", until: "2026-12-31T00:00:00Z", trust_client_reported: true}
  - {device_type: "EASProbeDeviceType", reason: "Exchange health probes", trust_client_reported: true}
  - {mailbox: "Helpdesk@contoso.com", reason: "shared helpdesk phone"}
  - {mailbox: "anna@contoso.com", device_id: "WINPHONE0001", reason: "legacy Windows phone of the lab"}
  - {mailbox: "lab@contoso.com", reason: "lab account, short", until: "2026-06-10T00:00:00Z"}
  - {mailbox: "lab@contoso.com", reason: "lab account, long", until: "2026-09-01T00:00:00Z"}
notify: true
`

var now = time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)

func mustParse(t testing.TB, yaml string) *Policy {
	t.Helper()
	p, err := Parse([]byte(yaml))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return p
}

// input is an in-scope iPhone of alice without an MDM record that first
// synced 30 days ago; options change it.
func input(opts ...func(*Input)) Input {
	in := Input{
		Org:     "contoso",
		Mailbox: &ev.Mailbox{Identity: "alice", PrimarySmtpAddress: "alice@contoso.com", UserPrincipalName: "alice@contoso.com"},
		Partnership: &ev.EASPartnership{
			DeviceId:      "DEV0000000000001",
			DeviceType:    "iPhone",
			DeviceOs:      "iOS 17.4 21E219",
			FirstSyncTime: timestamppb.New(now.Add(-30 * 24 * time.Hour)),
		},
		NoMatch: ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD,
		Now:     now,
	}
	for _, o := range opts {
		o(&in)
	}
	return in
}

func mdm(cs ev.ComplianceState, es ev.EnrollmentState, pl ev.Platform) func(*Input) {
	return func(in *Input) {
		in.MDM = &ev.MDMDevice{Source: "intune", MdmDeviceId: "m1", EasDeviceId: in.Partnership.DeviceId,
			ComplianceState: cs, EnrollmentState: es, Platform: pl}
		in.NoMatch = ev.NoMatchReason_NO_MATCH_REASON_UNSPECIFIED
	}
}

func compliantMDM(in *Input) {
	mdm(ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_IOS)(in)
}

func noMatch(r ev.NoMatchReason) func(*Input) {
	return func(in *Input) { in.NoMatch = r }
}

func device(id, typ, os string) func(*Input) {
	return func(in *Input) {
		in.Partnership.DeviceId, in.Partnership.DeviceType, in.Partnership.DeviceOs = id, typ, os
	}
}

func mailbox(smtp, upn string) func(*Input) {
	return func(in *Input) {
		in.Mailbox = &ev.Mailbox{Identity: "x", PrimarySmtpAddress: smtp, UserPrincipalName: upn}
	}
}

func firstSync(ago time.Duration) func(*Input) {
	return func(in *Input) { in.Partnership.FirstSyncTime = timestamppb.New(now.Add(-ago)) }
}

func at(t time.Time) func(*Input) {
	return func(in *Input) { in.Now = t }
}

const (
	allow      = ev.DesiredAccess_DESIRED_ACCESS_ALLOW
	block      = ev.DesiredAccess_DESIRED_ACCESS_BLOCK
	quarantine = ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE
	none       = ev.DesiredAccess_DESIRED_ACCESS_UNSPECIFIED
)

func TestEvaluate(t *testing.T) {
	base := mustParse(t, fixture)
	until := time.Date(2026, 12, 31, 0, 0, 0, 0, time.UTC)
	graceEnd := func(ago time.Duration) time.Time { return now.Add(-ago).Add(48 * time.Hour) }

	tests := []struct {
		name      string
		policy    *Policy // nil: base
		nilPolicy bool    // evaluate with a nil *Policy
		in        Input
		want      Verdict
		reason    string // a part of the reason
	}{
		// 4. MDM record present.
		{name: "compliant and enrolled is allowed",
			in:     input(compliantMDM),
			want:   Verdict{InScope: true, Desired: allow, Rule: RuleCompliant},
			reason: "the MDM (intune) reports it enrolled and compliant"},
		{name: "in grace period at the MDM counts as compliant",
			in:     input(mdm(ev.ComplianceState_COMPLIANCE_STATE_IN_GRACE_PERIOD, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_IOS)),
			want:   Verdict{InScope: true, Desired: allow, Rule: RuleCompliant},
			reason: "in grace period"},
		{name: "unhealthy enrollment leaves it to compliance",
			in:   input(mdm(ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_UNHEALTHY, ev.Platform_PLATFORM_IOS)),
			want: Verdict{InScope: true, Desired: allow, Rule: RuleCompliant}},
		{name: "unreported enrollment leaves it to compliance",
			in:   input(mdm(ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_UNSPECIFIED, ev.Platform_PLATFORM_IOS)),
			want: Verdict{InScope: true, Desired: allow, Rule: RuleCompliant}},
		{name: "noncompliant is blocked with notification",
			in:     input(mdm(ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_IOS)),
			want:   Verdict{InScope: true, Desired: block, Rule: RuleNoncompliant, Notify: true, NotifyReason: NotifyNoncompliant},
			reason: "compliance state noncompliant"},
		{name: "conflict is not compliant",
			in:     input(mdm(ev.ComplianceState_COMPLIANCE_STATE_CONFLICT, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_IOS)),
			want:   Verdict{InScope: true, Desired: block, Rule: RuleNoncompliant, Notify: true, NotifyReason: NotifyNoncompliant},
			reason: "conflict"},
		{name: "unreported compliance is not compliant",
			in:   input(mdm(ev.ComplianceState_COMPLIANCE_STATE_UNSPECIFIED, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_IOS)),
			want: Verdict{InScope: true, Desired: block, Rule: RuleNoncompliant, Notify: true, NotifyReason: NotifyNoncompliant}},
		{name: "noncompliant gets no grace period",
			in:   input(firstSync(time.Hour), mdm(ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_IOS)),
			want: Verdict{InScope: true, Desired: block, Rule: RuleNoncompliant, Notify: true, NotifyReason: NotifyNoncompliant}},
		{name: "noncompliant quarantine when the policy says so",
			policy: withPolicy(base, func(p *Policy) { p.Noncompliant = ActionQuarantine }),
			in:     input(mdm(ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_IOS)),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleNoncompliant, Notify: true, NotifyReason: NotifyNoncompliant},
			reason: "is quarantined"},

		// 5. No usable record.
		{name: "no MDM record is an unknown device",
			in:     input(),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled},
			reason: "no MDM record has its EAS device id; its 2d grace period ended at 2026-05-04T12:00:00Z"},
		{name: "record pending enrollment is not enrolled",
			in:     input(mdm(ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_PENDING, ev.Platform_PLATFORM_IOS)),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled},
			reason: "not enrolled (enrollment state pending)"},
		{name: "record flagged retired",
			in:     input(compliantMDM, func(in *Input) { in.MDM.Retired = true }),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyRetired},
			reason: "retired or wiped"},
		{name: "record wiped",
			in:   input(mdm(ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_WIPED, ev.Platform_PLATFORM_IOS)),
			want: Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyRetired}},
		{name: "matcher says retired",
			in:     input(noMatch(ev.NoMatchReason_NO_MATCH_REASON_RETIRED)),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyRetired},
			reason: "its MDM record is retired"},
		{name: "record of another user is unusable even if compliant",
			in:     input(compliantMDM, noMatch(ev.NoMatchReason_NO_MATCH_REASON_RECORD_FOR_ANOTHER_USER)),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled},
			reason: "belongs to another user"},
		{name: "record without EAS id",
			in:     input(noMatch(ev.NoMatchReason_NO_MATCH_REASON_MDM_RECORD_WITHOUT_EAS_ID)),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled},
			reason: "does not report the device's EAS id"},
		{name: "ambiguous match",
			in:     input(noMatch(ev.NoMatchReason_NO_MATCH_REASON_AMBIGUOUS)),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled},
			reason: "several MDM records"},
		{name: "no record and no reason",
			in:     input(noMatch(ev.NoMatchReason_NO_MATCH_REASON_UNSPECIFIED)),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled},
			reason: "no MDM record was matched"},
		{name: "unknown device blocked when the policy says so",
			policy: withPolicy(base, func(p *Policy) { p.UnknownDevice = ActionBlock }),
			in:     input(),
			want:   Verdict{InScope: true, Desired: block, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled},
			reason: "is blocked"},

		// 5. Grace period.
		{name: "inside the grace period is allowed until it ends",
			in:     input(firstSync(time.Hour)),
			want:   Verdict{InScope: true, Desired: allow, Rule: RuleGracePeriod, RecheckAt: graceEnd(time.Hour)},
			reason: "allowed until 2026-06-03T11:00:00Z, the end of its 2d grace period"},
		{name: "grace period for a retired record that synced recently",
			in:   input(firstSync(time.Hour), noMatch(ev.NoMatchReason_NO_MATCH_REASON_RETIRED)),
			want: Verdict{InScope: true, Desired: allow, Rule: RuleGracePeriod, RecheckAt: graceEnd(time.Hour)}},
		{name: "first sync in the future (clock skew) is inside",
			in:   input(firstSync(-time.Hour)),
			want: Verdict{InScope: true, Desired: allow, Rule: RuleGracePeriod, RecheckAt: graceEnd(-time.Hour)}},
		{name: "grace period ends exactly now",
			in:   input(firstSync(48 * time.Hour)),
			want: Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled}},
		{name: "outside the grace period",
			in:     input(firstSync(72 * time.Hour)),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled},
			reason: "grace period ended at 2026-05-31T12:00:00Z"},
		{name: "no first sync time, no grace",
			in:     input(func(in *Input) { in.Partnership.FirstSyncTime = nil }),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled},
			reason: "no first sync time"},
		{name: "no grace period configured",
			policy: withPolicy(base, func(p *Policy) { p.GracePeriod = 0 }),
			in:     input(firstSync(time.Minute)),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled}},

		// 3. Platform.
		{name: "platform from EAS data not allowed",
			in:     input(device("WIN0000000000001", "WindowsMail", "Windows 10.0.19045")),
			want:   Verdict{InScope: true, Desired: block, Rule: RulePlatformNotAllowed, Notify: true, NotifyReason: NotifyPlatformNotAllowed},
			reason: "platform windows (from Exchange's device type and OS) is not in allowed_platforms (ios, ipados, android)"},
		{name: "platform checked before grace",
			in:   input(firstSync(time.Hour), device("WIN0000000000001", "WindowsMail", "Windows 10")),
			want: Verdict{InScope: true, Desired: block, Rule: RulePlatformNotAllowed, Notify: true, NotifyReason: NotifyPlatformNotAllowed}},
		{name: "platform checked before compliance",
			in:   input(device("WIN0000000000001", "WindowsMail", "Windows 10"), mdm(ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_WINDOWS)),
			want: Verdict{InScope: true, Desired: block, Rule: RulePlatformNotAllowed, Notify: true, NotifyReason: NotifyPlatformNotAllowed}},
		{name: "platform from the MDM record wins over EAS data (allowed)",
			in:     input(device("OUT0000000000001", "WindowsMail", "Windows 10"), mdm(ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_ANDROID)),
			want:   Verdict{InScope: true, Desired: allow, Rule: RuleCompliant},
			reason: "compliant"},
		{name: "platform from the MDM record wins over EAS data (not allowed)",
			in:     input(mdm(ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_MACOS)),
			want:   Verdict{InScope: true, Desired: block, Rule: RulePlatformNotAllowed, Notify: true, NotifyReason: NotifyPlatformNotAllowed},
			reason: "platform macos (from the MDM record)"},
		{name: "MDM record without platform falls back to EAS data",
			in:   input(device("OUT0000000000001", "Outlook", "Android 14"), mdm(ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_UNSPECIFIED)),
			want: Verdict{InScope: true, Desired: allow, Rule: RuleCompliant}},
		{name: "unrecognised platform is other and not allowed",
			in:     input(device("BB00000000000001", "BlackBerry", "BlackBerry 10")),
			want:   Verdict{InScope: true, Desired: block, Rule: RulePlatformNotAllowed, Notify: true, NotifyReason: NotifyPlatformNotAllowed},
			reason: "platform other"},
		{name: "platform quarantine when the policy says so",
			policy: withPolicy(base, func(p *Policy) { p.PlatformNotAllowed = ActionQuarantine }),
			in:     input(device("WIN0000000000001", "WindowsMail", "Windows 10")),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RulePlatformNotAllowed, Notify: true, NotifyReason: NotifyPlatformNotAllowed}},
		{name: "empty allowed_platforms allows every platform",
			policy: withPolicy(base, func(p *Policy) { p.AllowedPlatforms = nil }),
			in:     input(device("WIN0000000000001", "WindowsMail", "Windows 10")),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled}},

		// 2. Exemptions.
		{name: "device id exemption, case-insensitive, before until",
			in:     input(device("applf17lttcgffg8", "iPhone", "iOS 17"), mdm(ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_IOS)),
			want:   Verdict{InScope: true, Desired: allow, Rule: RuleExemptionDeviceID, RecheckAt: until},
			reason: "is exempt by its device id on any mailbox (trust_client_reported) until 2026-12-31T00:00:00Z: CEO iPhone, INC-4711."},
		{name: "device id exemption one second before until",
			in:   input(device("ApplF17LTTCGFFG8", "iPhone", "iOS 17"), at(until.Add(-time.Second))),
			want: Verdict{InScope: true, Desired: allow, Rule: RuleExemptionDeviceID, RecheckAt: until}},
		{name: "device id exemption expired exactly at until",
			in:   input(device("ApplF17LTTCGFFG8", "iPhone", "iOS 17"), at(until)),
			want: Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled}},
		{name: "device id exemption expired after until",
			in:   input(device("ApplF17LTTCGFFG8", "iPhone", "iOS 17"), at(until.Add(24*time.Hour))),
			want: Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled}},
		{name: "device type exemption, case-insensitive, never expires",
			in:     input(device("PROBE00000000001", "easprobedevicetype", "")),
			want:   Verdict{InScope: true, Desired: allow, Rule: RuleExemptionDeviceType},
			reason: "exempt by its device type \"easprobedevicetype\" on any mailbox (trust_client_reported): Exchange health probes."},
		{name: "mailbox exemption by UPN, case-insensitive",
			in:     input(mailbox("it-support@contoso.com", "HELPDESK@Contoso.com")),
			want:   Verdict{InScope: true, Desired: allow, Rule: RuleExemptionMailbox},
			reason: "shared helpdesk phone"},
		{name: "exemption comes before platform",
			in:     input(mailbox("Anna@contoso.com", ""), device("winphone0001", "WindowsPhone", "Windows Phone 8.1")),
			want:   Verdict{InScope: true, Desired: allow, Rule: RuleExemptionDeviceID},
			reason: "is exempt by its device id on this mailbox: legacy Windows phone of the lab."},
		{name: "device id exemption bound to a mailbox does not admit the id on another",
			in:   input(device("WINPHONE0001", "WindowsPhone", "Windows Phone 8.1")),
			want: Verdict{InScope: true, Desired: block, Rule: RulePlatformNotAllowed, Notify: true, NotifyReason: NotifyPlatformNotAllowed}},
		{name: "device id exemption before device type",
			in:   input(device("ApplF17LTTCGFFG8", "EASProbeDeviceType", "")),
			want: Verdict{InScope: true, Desired: allow, Rule: RuleExemptionDeviceID, RecheckAt: until}},
		{name: "device type exemption before mailbox",
			in:   input(mailbox("helpdesk@contoso.com", ""), device("PROBE00000000001", "EASProbeDeviceType", "")),
			want: Verdict{InScope: true, Desired: allow, Rule: RuleExemptionDeviceType}},
		{name: "of two matching exemptions the longer-lasting decides",
			in:     input(mailbox("lab@contoso.com", "")),
			want:   Verdict{InScope: true, Desired: allow, Rule: RuleExemptionMailbox, RecheckAt: time.Date(2026, 9, 1, 0, 0, 0, 0, time.UTC)},
			reason: "lab account, long"},
		{name: "after the longer exemption ends no exemption is left",
			in:   input(mailbox("lab@contoso.com", ""), at(time.Date(2026, 9, 1, 0, 0, 0, 0, time.UTC))),
			want: Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled}},

		// 1. Scope.
		{name: "excluded mailbox, case-insensitive, wins over an exemption",
			in:     input(mailbox("ceo@CONTOSO.com", ""), device("ApplF17LTTCGFFG8", "iPhone", "iOS 17")),
			want:   Verdict{Rule: RuleOutOfScope},
			reason: "scope.exclude mailboxes entry \"ceo@contoso.com\" matches it"},
		{name: "excluded by a group wildcard although the domain is included",
			in:     input(mailbox("svc-backup@contoso.com", "")),
			want:   Verdict{Rule: RuleOutOfScope},
			reason: "group \"service-accounts\""},
		{name: "excluded by UPN when the SMTP address is included",
			in:   input(mailbox("alice@contoso.com", "SVC-alice@contoso.com")),
			want: Verdict{Rule: RuleOutOfScope}},
		{name: "included by a group wildcard, case-insensitive",
			in:   input(mailbox("Bob@fabrikam.com", "")),
			want: Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled}},
		{name: "included by UPN when the SMTP address is not",
			in:   input(mailbox("eve@example.org", "eve@Contoso.com")),
			want: Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled}},
		{name: "not included",
			in:     input(mailbox("eve@example.org", "eve@example.org")),
			want:   Verdict{Rule: RuleOutOfScope},
			reason: "nothing in scope.include matches it"},
		{name: "a domain does not include its sub-domains",
			in:   input(mailbox("x@eu.contoso.com", "")),
			want: Verdict{Rule: RuleOutOfScope}},
		{name: "a mailbox with no address is not included",
			in:   input(mailbox("", "")),
			want: Verdict{Rule: RuleOutOfScope}},
		{name: "empty include is everyone",
			policy: Default("contoso"),
			in:     input(mailbox("anyone@example.org", "")),
			want:   Verdict{InScope: true, Desired: block, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled}},
		{name: "empty include, mailbox with no address",
			policy: Default("contoso"),
			in:     input(mailbox("", "")),
			want:   Verdict{InScope: true, Desired: block, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled}},

		// Flags carried through.
		{name: "dry run is carried on a block",
			policy: withPolicy(base, func(p *Policy) { p.DryRun = true }),
			in:     input(),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice, Notify: true, NotifyReason: NotifyNotEnrolled, DryRun: true}},
		{name: "dry run is carried on an allow",
			policy: withPolicy(base, func(p *Policy) { p.DryRun = true }),
			in:     input(compliantMDM),
			want:   Verdict{InScope: true, Desired: allow, Rule: RuleCompliant, DryRun: true}},
		{name: "dry run is carried out of scope",
			policy: withPolicy(base, func(p *Policy) { p.DryRun = true }),
			in:     input(mailbox("eve@example.org", "")),
			want:   Verdict{Rule: RuleOutOfScope, DryRun: true}},
		{name: "notify off: no notification for a noncompliant device",
			policy: withPolicy(base, func(p *Policy) { p.Notify = false }),
			in:     input(mdm(ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_IOS)),
			want:   Verdict{InScope: true, Desired: block, Rule: RuleNoncompliant}},
		{name: "notify off: no notification for an unknown device",
			policy: withPolicy(base, func(p *Policy) { p.Notify = false }),
			in:     input(),
			want:   Verdict{InScope: true, Desired: quarantine, Rule: RuleUnknownDevice}},

		// Invalid input.
		{name: "nil mailbox",
			in:     input(func(in *Input) { in.Mailbox = nil }),
			want:   Verdict{Rule: RuleInvalidInput},
			reason: "no mailbox"},
		{name: "nil partnership",
			in:     input(func(in *Input) { in.Partnership = nil }),
			want:   Verdict{Rule: RuleInvalidInput},
			reason: "no partnership"},
		{name: "zero now",
			in:     input(at(time.Time{})),
			want:   Verdict{Rule: RuleInvalidInput},
			reason: "no evaluation time"},
		{name: "another organisation",
			in:     input(func(in *Input) { in.Org = "fabrikam" }),
			want:   Verdict{Rule: RuleInvalidInput},
			reason: `"fabrikam" but the policy is for "contoso"`},
		{name: "no organisation",
			in:   input(func(in *Input) { in.Org = "" }),
			want: Verdict{Rule: RuleInvalidInput}},
		{name: "nil policy",
			nilPolicy: true,
			in:        input(),
			want:      Verdict{Rule: RuleInvalidInput},
			reason:    "No policy"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := base
			switch {
			case tc.nilPolicy:
				p = nil
			case tc.policy != nil:
				p = tc.policy
			}
			got := p.Evaluate(tc.in)
			reason := got.Reason
			got.Reason = ""
			if !got.RecheckAt.Equal(tc.want.RecheckAt) {
				t.Errorf("RecheckAt = %v, want %v", got.RecheckAt, tc.want.RecheckAt)
			}
			got.RecheckAt, tc.want.RecheckAt = time.Time{}, time.Time{}
			if got.Desired == none && got.InScope {
				t.Errorf("in scope without a desired access")
			}
			if got != tc.want {
				t.Errorf("verdict\n got %+v\nwant %+v\nreason: %s", got, tc.want, reason)
			}
			if reason == "" || !strings.HasSuffix(reason, ".") {
				t.Errorf("reason %q is not a sentence", reason)
			}
			if !strings.Contains(reason, tc.reason) {
				t.Errorf("reason %q does not contain %q", reason, tc.reason)
			}
		})
	}
}

// withPolicy returns a changed copy of p.
func withPolicy(p *Policy, change func(*Policy)) *Policy {
	c := p.clone()
	change(c)
	return c
}

// TestEvaluateNeverNotifiesAllows checks the Notify invariant over every
// rule: never for allows, always with a reason for denials.
func TestEvaluateNeverNotifiesAllows(t *testing.T) {
	p := mustParse(t, fixture)
	inputs := map[string]Input{
		"compliant":   input(compliantMDM),
		"grace":       input(firstSync(time.Hour)),
		"device id":   input(device("ApplF17LTTCGFFG8", "iPhone", "iOS 17")),
		"device type": input(device("P1", "EASProbeDeviceType", "")),
		"mailbox":     input(mailbox("helpdesk@contoso.com", "")),
		"unknown":     input(),
		"platform":    input(device("W1", "WindowsMail", "")),
		"noncompliant": input(mdm(ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT,
			ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ev.Platform_PLATFORM_IOS)),
	}
	for name, in := range inputs {
		t.Run(name, func(t *testing.T) {
			v := p.Evaluate(in)
			switch v.Desired {
			case allow:
				if v.Notify || v.NotifyReason != "" {
					t.Errorf("allow with notification: %+v", v)
				}
			case block, quarantine:
				if !v.Notify || v.NotifyReason == "" {
					t.Errorf("denial without notification: %+v", v)
				}
			default:
				t.Errorf("no decision: %+v", v)
			}
		})
	}
}

// TestEvaluateConcurrent lets the race detector check that Evaluate and
// Version only read the policy.
func TestEvaluateConcurrent(t *testing.T) {
	p := mustParse(t, fixture)
	want := p.Version()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 200 {
				if v := p.Evaluate(input(firstSync(time.Duration(i) * time.Hour))); v.Rule == "" {
					t.Error("no rule")
				}
				if got := p.Version(); got != want {
					t.Errorf("Version = %s, want %s", got, want)
				}
			}
		}()
	}
	wg.Wait()
}

func TestGlobMatch(t *testing.T) {
	tests := []struct {
		pattern, s string
		want       bool
	}{
		{"*@contoso.com", "A@Contoso.COM", true},
		{"svc-*@contoso.com", "svc-backup@contoso.com", true},
		{"svc-*@contoso.com", "svc-@contoso.com", true},
		{"svc-*@contoso.com", "svc@contoso.com", false},
		{"svc-*@contoso.com", "svc-x@contoso.com.evil", false},
		{"*", "", true},
		{"*", "anything", true},
		{"", "", true},
		{"", "a", false},
		{"a*b*c", "abbbc", true},
		{"a*b*c", "acb", false},
		{"*.contoso.com", "eu.contoso.com", true},
		{"*.contoso.com", "contoso.com", false},
		{"ÄLICE@x.com", "älice@X.com", true},
		{"*a*a*a*a*a*a*b", strings.Repeat("a", 2000), false},
	}
	for _, tc := range tests {
		t.Run(tc.pattern+"~"+tc.s, func(t *testing.T) {
			if got := globMatch(tc.pattern, tc.s); got != tc.want {
				t.Errorf("globMatch(%q, %q) = %v, want %v", tc.pattern, tc.s, got, tc.want)
			}
		})
	}
}
