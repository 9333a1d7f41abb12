package policy

import (
	"fmt"
	"slices"
	"strings"
	"time"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Rule names say which rule decided a verdict. They are stable machine
// names: decisions, metrics and the console group by them, so they are
// never renamed.
const (
	// RuleInvalidInput: the input was unusable (nil mailbox or partnership,
	// zero Now, another organisation); nothing is decided.
	RuleInvalidInput = "invalid_input"
	// RuleOutOfScope: the mailbox is not managed by easguard.
	RuleOutOfScope = "out_of_scope"
	// RuleExemptionDeviceID: an exemption names the device id.
	RuleExemptionDeviceID = "exemption.device_id"
	// RuleExemptionDeviceType: an exemption names the device type.
	RuleExemptionDeviceType = "exemption.device_type"
	// RuleExemptionMailbox: an exemption names the mailbox.
	RuleExemptionMailbox = "exemption.mailbox"
	// RulePlatformNotAllowed: the platform is not in allowed_platforms.
	RulePlatformNotAllowed = "platform_not_allowed"
	// RuleCompliant: the MDM reports the device enrolled and compliant.
	RuleCompliant = "compliant"
	// RuleNoncompliant: the device is enrolled but not compliant.
	RuleNoncompliant = "noncompliant"
	// RuleGracePeriod: an unknown device is still within its grace period.
	RuleGracePeriod = "grace_period"
	// RuleUnknownDevice: the device has no usable, enrolled MDM record.
	RuleUnknownDevice = "unknown_device"
)

// Notify reasons tell the mailer which enrolment mail fits, because "enrol
// your phone", "make it compliant", "enrol it again" and "use another
// phone" are different instructions.
const (
	// NotifyNotEnrolled: the device is not enrolled (or not matched).
	NotifyNotEnrolled = "not_enrolled"
	// NotifyNoncompliant: the device is enrolled but not compliant.
	NotifyNoncompliant = "noncompliant"
	// NotifyRetired: the device was retired or wiped in the MDM.
	NotifyRetired = "retired"
	// NotifyPlatformNotAllowed: the device's platform may not sync mail.
	NotifyPlatformNotAllowed = "platform_not_allowed"
)

// Input is everything Evaluate looks at for one partnership. The caller
// fills it from a DeviceMatched event and its own clock, which keeps
// Evaluate pure and every decision reproducible.
type Input struct {
	// Org is the organisation the evaluator serves; it must equal the
	// policy's Org.
	Org string
	// Mailbox is the partnership's owner: primary SMTP, UPN, identity,
	// display name. Scope and mailbox exemptions match its SMTP address and
	// UPN.
	Mailbox *ev.Mailbox
	// Partnership is the partnership as Exchange reports it: device id,
	// type, model, OS, first sync time, Exchange's state.
	Partnership *ev.EASPartnership
	// MDM is the matched MDM record, nil when the matcher found no usable
	// record.
	MDM *ev.MDMDevice
	// NoMatch is why there is no usable record; a value other than
	// UNSPECIFIED makes the record unusable even if MDM is set.
	NoMatch ev.NoMatchReason
	// Now is the time of the evaluation; exemptions and grace periods are
	// judged against it.
	Now time.Time
}

// Verdict is the policy's decision for one partnership.
type Verdict struct {
	// InScope false means leave the partnership alone and decide nothing:
	// the mailbox is out of scope, or the input was invalid.
	InScope bool
	// Desired is what Exchange should give the device; UNSPECIFIED when
	// InScope is false.
	Desired ev.DesiredAccess
	// Rule is the stable machine name of the rule that decided (Rule*).
	Rule string
	// Reason is one sentence for administrators and the audit log.
	Reason string
	// Notify says the user should be told how to enrol: set, when the
	// policy's notify is on, for blocked and quarantined devices, never for
	// exemptions, grace or compliant devices. It is set in dry run too, so
	// the record shows what would happen; the mailer must not send in dry
	// run.
	Notify bool
	// NotifyReason picks the mail (Notify*); empty when Notify is false.
	NotifyReason string
	// RecheckAt is when the verdict may change by time alone (the end of a
	// grace period or of the deciding exemption); zero if never. The
	// evaluator schedules a re-evaluation then, because no event will
	// arrive to trigger one.
	RecheckAt time.Time
	// DryRun carries the policy's dry_run, so that the decision records
	// that it must not be applied.
	DryRun bool
}

// Evaluate decides one partnership in the order the package documentation
// gives. It never panics: unusable input gives InScope false with Rule
// "invalid_input".
func (p *Policy) Evaluate(in Input) Verdict {
	if why := p.checkInput(in); why != "" {
		return Verdict{Rule: RuleInvalidInput, Reason: why}
	}
	addrs := addresses(in.Mailbox)
	who := mailboxName(in.Mailbox)
	dev := deviceName(in.Partnership)

	// 1. Scope: exclude wins; an empty include is everyone.
	if what, ok := p.Scope.Exclude.match(addrs, p.Groups); ok {
		return Verdict{Rule: RuleOutOfScope, DryRun: p.DryRun,
			Reason: fmt.Sprintf("Mailbox %s is out of scope because scope.exclude %s matches it.", who, what)}
	}
	if !p.Scope.Include.empty() {
		if _, ok := p.Scope.Include.match(addrs, p.Groups); !ok {
			return Verdict{Rule: RuleOutOfScope, DryRun: p.DryRun,
				Reason: fmt.Sprintf("Mailbox %s is out of scope because nothing in scope.include matches it.", who)}
		}
	}

	// 2. Exemptions valid at Now.
	if e, rule, ok := p.exemptionFor(in, addrs); ok {
		v := Verdict{InScope: true, Desired: ev.DesiredAccess_DESIRED_ACCESS_ALLOW, Rule: rule, RecheckAt: e.Until, DryRun: p.DryRun}
		by := map[string]string{
			RuleExemptionDeviceID:   "its device id",
			RuleExemptionDeviceType: fmt.Sprintf("its device type %q", in.Partnership.GetDeviceType()),
			RuleExemptionMailbox:    "its mailbox",
		}[rule]
		if rule != RuleExemptionMailbox {
			if e.Mailbox != "" {
				by += " on this mailbox"
			} else {
				by += " on any mailbox (trust_client_reported)"
			}
		}
		until := ""
		if !e.Until.IsZero() {
			until = " until " + stamp(e.Until)
		}
		v.Reason = fmt.Sprintf("%s of %s is exempt by %s%s: %s.", capital(dev), who, by, until, strings.TrimSuffix(e.Reason, "."))
		return v
	}

	// 3. Platform.
	platform, source := platformFor(in)
	if len(p.AllowedPlatforms) > 0 && !slices.Contains(p.AllowedPlatforms, platform) {
		return p.deny(p.PlatformNotAllowed, RulePlatformNotAllowed, NotifyPlatformNotAllowed,
			fmt.Sprintf("%s of %s is %s because its platform %s (%s) is not in allowed_platforms (%s).",
				capital(dev), who, verb(p.PlatformNotAllowed), platformWord(platform), source, p.allowedList()))
	}

	// 4. A usable MDM record that is enrolled.
	usable := in.MDM != nil && (in.NoMatch == ev.NoMatchReason_NO_MATCH_REASON_UNSPECIFIED ||
		in.NoMatch == ev.NoMatchReason_NO_MATCH_REASON_RECORD_WITHOUT_USER && p.TrustMDMRecordsWithoutUser)
	if usable && standingOf(in.MDM) == enrolled {
		src := sourceName(in.MDM)
		switch cs := in.MDM.GetComplianceState(); cs {
		case ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT, ev.ComplianceState_COMPLIANCE_STATE_IN_GRACE_PERIOD:
			return Verdict{InScope: true, Desired: ev.DesiredAccess_DESIRED_ACCESS_ALLOW, Rule: RuleCompliant, DryRun: p.DryRun,
				Reason: fmt.Sprintf("%s of %s is allowed because %s reports it enrolled and %s.", capital(dev), who, src, complianceWord(cs))}
		default:
			return p.deny(p.Noncompliant, RuleNoncompliant, NotifyNoncompliant,
				fmt.Sprintf("%s of %s is %s because %s reports it enrolled but not compliant (compliance state %s).",
					capital(dev), who, verb(p.Noncompliant), src, complianceWord(cs)))
		}
	}

	// 5. Unknown device: grace period, else unknown_device.
	why, notify := unknownWhy(in)
	first := in.Partnership.GetFirstSyncTime()
	graceNote := ""
	switch {
	case p.GracePeriod <= 0:
	case !first.IsValid():
		graceNote = "; no grace period applies because Exchange reports no first sync time"
	default:
		end := first.AsTime().Add(p.GracePeriod)
		if in.Now.Before(end) {
			return Verdict{InScope: true, Desired: ev.DesiredAccess_DESIRED_ACCESS_ALLOW, Rule: RuleGracePeriod, RecheckAt: end, DryRun: p.DryRun,
				Reason: fmt.Sprintf("%s of %s is allowed until %s, the end of its %s grace period since its first sync, although %s.",
					capital(dev), who, stamp(end), durationWord(p.GracePeriod), why)}
		}
		graceNote = fmt.Sprintf("; its %s grace period ended at %s", durationWord(p.GracePeriod), stamp(end))
	}
	return p.deny(p.UnknownDevice, RuleUnknownDevice, notify,
		fmt.Sprintf("%s of %s is %s because %s%s.", capital(dev), who, verb(p.UnknownDevice), why, graceNote))
}

// checkInput returns why the input cannot be evaluated, or "".
func (p *Policy) checkInput(in Input) string {
	switch {
	case p == nil:
		return "No policy was given to evaluate with."
	case in.Mailbox == nil:
		return "The input has no mailbox, so the partnership cannot be evaluated."
	case in.Partnership == nil:
		return "The input has no partnership, so nothing can be evaluated."
	case in.Now.IsZero():
		return "The input has no evaluation time, so exemptions and grace periods cannot be judged."
	case in.Org != p.Org:
		return fmt.Sprintf("The input is for organisation %q but the policy is for %q.", in.Org, p.Org)
	}
	return ""
}

// deny builds a block or quarantine verdict.
func (p *Policy) deny(a Action, rule, notifyReason, reason string) Verdict {
	v := Verdict{InScope: true, Desired: a.desired(), Rule: rule, Reason: reason, DryRun: p.DryRun}
	if p.Notify {
		v.Notify, v.NotifyReason = true, notifyReason
	}
	return v
}

// exemptionFor finds the exemption that allows the partnership at Now:
// device id before device type before mailbox, and within a kind the one
// that lasts longest, so that RecheckAt is no earlier than it needs to be.
// A device exemption with a mailbox admits the device only on that
// mailbox.
func (p *Policy) exemptionFor(in Input, addrs []string) (Exemption, string, bool) {
	if len(p.Exemptions) == 0 {
		return Exemption{}, "", false // most policies: nothing to build the matchers for
	}
	mailboxOK := func(e Exemption) bool {
		return e.Mailbox == "" || slices.ContainsFunc(addrs, func(a string) bool { return strings.EqualFold(e.Mailbox, a) })
	}
	kinds := []struct {
		rule  string
		match func(Exemption) bool
	}{
		{RuleExemptionDeviceID, func(e Exemption) bool {
			return e.DeviceID != "" && strings.EqualFold(e.DeviceID, in.Partnership.GetDeviceId()) && mailboxOK(e)
		}},
		{RuleExemptionDeviceType, func(e Exemption) bool {
			return e.DeviceType != "" && strings.EqualFold(e.DeviceType, in.Partnership.GetDeviceType()) && mailboxOK(e)
		}},
		{RuleExemptionMailbox, func(e Exemption) bool {
			return e.Mailbox != "" && e.DeviceID == "" && e.DeviceType == "" && mailboxOK(e)
		}},
	}
	for _, k := range kinds {
		var best Exemption
		found := false
		for _, e := range p.Exemptions {
			if !e.active(in.Now) || !k.match(e) {
				continue
			}
			if !found || outlasts(e, best) {
				best, found = e, true
			}
		}
		if found {
			return best, k.rule, true
		}
	}
	return Exemption{}, "", false
}

// outlasts reports whether a ends later than b; no end is the latest.
func outlasts(a, b Exemption) bool {
	switch {
	case b.Until.IsZero():
		return false
	case a.Until.IsZero():
		return true
	}
	return a.Until.After(b.Until)
}

// platformFor returns the device's platform and where it came from. The
// MDM's word is preferred because it asked the device itself.
func platformFor(in Input) (ev.Platform, string) {
	if pl := in.MDM.GetPlatform(); pl != ev.Platform_PLATFORM_UNSPECIFIED {
		return pl, "from the MDM record"
	}
	return PlatformOf(in.Partnership.GetDeviceType(), in.Partnership.GetDeviceOs()),
		"from Exchange's device type and OS"
}

// standing is what an MDM record's enrollment state means for the policy.
type standing int

const (
	enrolled standing = iota
	notEnrolled
	retired
)

// standingOf classifies an MDM record. An unreported enrollment state and
// UNHEALTHY count as enrolled and leave the verdict to the compliance
// state, which fails closed on its own; treating them as unknown devices
// would block every device of an MDM source that does not report
// enrollment, which is the mass blocking administrators fear most.
func standingOf(d *ev.MDMDevice) standing {
	if d.GetRetired() {
		return retired
	}
	switch d.GetEnrollmentState() {
	case ev.EnrollmentState_ENROLLMENT_STATE_RETIRE_PENDING, ev.EnrollmentState_ENROLLMENT_STATE_RETIRED,
		ev.EnrollmentState_ENROLLMENT_STATE_WIPE_PENDING, ev.EnrollmentState_ENROLLMENT_STATE_WIPED:
		return retired
	case ev.EnrollmentState_ENROLLMENT_STATE_NOT_ENROLLED, ev.EnrollmentState_ENROLLMENT_STATE_PENDING:
		return notEnrolled
	}
	return enrolled
}

// unknownWhy says in words why a device counts as unknown, and which mail
// fits.
func unknownWhy(in Input) (string, string) {
	switch in.NoMatch {
	case ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD:
		return "no MDM record has its EAS device id", NotifyNotEnrolled
	case ev.NoMatchReason_NO_MATCH_REASON_RECORD_FOR_ANOTHER_USER:
		return "the MDM record with its EAS device id belongs to another user", NotifyNotEnrolled
	case ev.NoMatchReason_NO_MATCH_REASON_MDM_RECORD_WITHOUT_EAS_ID:
		return "the user's MDM record does not report the device's EAS id", NotifyNotEnrolled
	case ev.NoMatchReason_NO_MATCH_REASON_RETIRED:
		return "its MDM record is retired", NotifyRetired
	case ev.NoMatchReason_NO_MATCH_REASON_AMBIGUOUS:
		return "several MDM records match it and none can be trusted", NotifyNotEnrolled
	case ev.NoMatchReason_NO_MATCH_REASON_RECORD_WITHOUT_USER:
		return "the only MDM record with its EAS device id names no user, and the policy does not trust a join by the phone-reported EAS id alone (trust_mdm_records_without_user)", NotifyNotEnrolled
	case ev.NoMatchReason_NO_MATCH_REASON_UNSPECIFIED:
	default:
		return fmt.Sprintf("the matcher found no usable MDM record (%s)", enumWord(in.NoMatch.String(), "NO_MATCH_REASON_")), NotifyNotEnrolled
	}
	if in.MDM == nil {
		return "no MDM record was matched", NotifyNotEnrolled
	}
	src := sourceName(in.MDM)
	if standingOf(in.MDM) == retired {
		return fmt.Sprintf("%s reports it retired or wiped", src), NotifyRetired
	}
	return fmt.Sprintf("%s reports it not enrolled (enrollment state %s)", src,
		enumWord(in.MDM.GetEnrollmentState().String(), "ENROLLMENT_STATE_")), NotifyNotEnrolled
}

// addresses returns the mailbox's primary SMTP address and UPN, lower case,
// without blanks or duplicates.
func addresses(m *ev.Mailbox) []string {
	var out []string
	for _, a := range []string{m.GetPrimarySmtpAddress(), m.GetUserPrincipalName()} {
		a = strings.ToLower(strings.TrimSpace(a))
		if a != "" && !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out
}

// mailboxName names a mailbox in reasons by the first form it has.
func mailboxName(m *ev.Mailbox) string { return ev.MailboxName(m) }

// deviceName names a partnership's device in reasons.
func deviceName(e *ev.EASPartnership) string {
	if e.GetDeviceType() != "" {
		return fmt.Sprintf("device %s (%s)", e.GetDeviceId(), e.GetDeviceType())
	}
	return "device " + e.GetDeviceId()
}

func sourceName(d *ev.MDMDevice) string {
	if d.GetSource() != "" {
		return fmt.Sprintf("the MDM (%s)", d.GetSource())
	}
	return "the MDM"
}

// allowedList lists allowed_platforms in the file's words.
func (p *Policy) allowedList() string {
	names := make([]string, 0, len(p.AllowedPlatforms))
	for _, pl := range p.AllowedPlatforms {
		names = append(names, platformWord(pl))
	}
	return strings.Join(names, ", ")
}

func platformWord(pl ev.Platform) string {
	if n := PlatformName(pl); n != "" {
		return n
	}
	return enumWord(pl.String(), "PLATFORM_")
}

func complianceWord(cs ev.ComplianceState) string {
	return enumWord(cs.String(), "COMPLIANCE_STATE_")
}

// enumWord turns COMPLIANCE_STATE_IN_GRACE_PERIOD into "in grace period".
func enumWord(name, prefix string) string {
	return strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(name, prefix)), "_", " ")
}

func verb(a Action) string {
	if a.desired() == ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE {
		return "quarantined"
	}
	return "blocked"
}

func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// durationWord prints whole days as days, because grace periods are written
// in days.
func durationWord(d time.Duration) string {
	const day = 24 * time.Hour
	if d%day == 0 {
		return fmt.Sprintf("%dd", d/day)
	}
	return d.String()
}

func capital(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
