package easguardv1

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// ErrInvalid is wrapped by every validation error, so a consumer can tell a
// message that will never be processable from a transient failure.
var ErrInvalid = errors.New("invalid event")

// MaxDeviceIDLen is Exchange's limit on a DeviceId (msExchDeviceID).
const MaxDeviceIDLen = 32

// problems collects what is wrong with one message.
type problems []string

// need records problem unless ok.
func (p *problems) need(ok bool, problem string) {
	if !ok {
		*p = append(*p, problem)
	}
}

// add records a problem made of a format and its arguments. Callers test
// first and call add only for a problem: a check that passes then formats
// nothing and allocates nothing, where need with arguments boxed them for
// a message never made, on every event of every hop.
func (p *problems) add(format string, args ...any) {
	*p = append(*p, fmt.Sprintf(format, args...))
}

func (p problems) err() error {
	if len(p) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrInvalid, strings.Join(p, "; "))
}

func (p *problems) deviceID(field, id string) {
	if id == "" {
		p.add("%s is empty", field)
	}
	if utf8.RuneCountInString(id) > MaxDeviceIDLen {
		p.add("%s is longer than %d characters", field, MaxDeviceIDLen)
	}
	if !utf8.ValidString(id) {
		p.add("%s is not valid UTF-8", field)
	}
}

func (p *problems) partnership(field string, e *EASPartnership) {
	p.partnershipAt(field, -1, e)
}

// partnershipAt checks a partnership that is element at of the repeated
// field (at < 0: the field itself). The field's name is made only for a
// problem: a page's partnerships are checked on every hop.
func (p *problems) partnershipAt(field string, at int, e *EASPartnership) {
	name := func(sub string) string {
		if at >= 0 {
			return fmt.Sprintf("%s[%d]%s", field, at, sub)
		}
		return field + sub
	}
	if e == nil {
		p.add("%s is missing", name(""))
		return
	}
	if id := e.GetDeviceId(); !validDeviceID(id) {
		p.deviceID(name(".device_id"), id)
	}
	if e.GetMailbox().GetIdentity() == "" {
		p.add("%s.mailbox.identity is empty", name(""))
	}
}

// validDeviceID reports whether deviceID finds nothing wrong with id,
// without naming the field (which a page's partnerships make for a
// problem only).
func validDeviceID(id string) bool {
	var p problems
	p.deviceID("", id)
	return len(p) == 0
}

// Validate checks a partnership as every consumer of an observation of it
// relies on.
func (e *EASPartnership) Validate() error {
	var p problems
	p.partnership("partnership", e)
	return p.err()
}

// Validate checks what every consumer of an observation relies on.
func (e *EASPartnershipObserved) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.partnership("partnership", e.GetPartnership())
	p.need(e.GetSync().GetSyncId() != "", "sync.sync_id is empty")
	p.need(e.GetSync().GetKind() != SyncKind_SYNC_KIND_UNSPECIFIED, "sync.kind is unspecified")
	p.need(e.GetObservedAt().IsValid(), "observed_at is missing")
	p.need(e.GetChange() != ObservationChange_OBSERVATION_CHANGE_UNSPECIFIED, "change is unspecified")
	return p.err()
}

// Validate checks a page of confirmed partnerships as the matcher relies
// on it. The collector sends a partnership that would fail this alone, as
// an EASPartnershipObserved, so that one bad partnership is dead-lettered
// by itself and never takes a page of good ones with it.
func (e *EASPartnershipsConfirmed) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.need(e.GetSync().GetSyncId() != "", "sync.sync_id is empty")
	p.need(e.GetSync().GetKind() != SyncKind_SYNC_KIND_UNSPECIFIED, "sync.kind is unspecified")
	p.need(e.GetObservedAt().IsValid(), "observed_at is missing")
	p.need(e.GetPage() > 0, "page is 0")
	p.need(len(e.GetPartnerships()) > 0, "partnerships is empty")
	for i, ep := range e.GetPartnerships() {
		p.partnershipAt("partnerships", i, ep)
	}
	return p.err()
}

// Observations returns the page as the observations it stands for, one
// UNCHANGED EASPartnershipObserved per partnership, so that what handles
// one handles the other alike.
func (e *EASPartnershipsConfirmed) Observations() []*EASPartnershipObserved {
	out := make([]*EASPartnershipObserved, len(e.GetPartnerships()))
	for i, ep := range e.GetPartnerships() {
		out[i] = &EASPartnershipObserved{Org: e.GetOrg(), Partnership: ep, Sync: e.GetSync(), ObservedAt: e.GetObservedAt(),
			Change: ObservationChange_OBSERVATION_CHANGE_UNCHANGED}
	}
	return out
}

// Validate checks what the matcher relies on.
func (e *MDMDeviceChanged) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	d := e.GetDevice()
	p.need(d != nil, "device is missing")
	p.need(d.GetSource() != "", "device.source is empty")
	p.need(d.GetMdmDeviceId() != "", "device.mdm_device_id is empty")
	if id := d.GetEasDeviceId(); id != "" {
		p.deviceID("device.eas_device_id", id)
	}
	p.need(e.GetObservedAt().IsValid(), "observed_at is missing")
	return p.err()
}

// Validate checks that a verdict is either a match or a reasoned no-match.
func (e *DeviceMatched) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.need(e.GetObserved() != nil, "observed is missing")
	p.partnership("observed.partnership", e.GetObserved().GetPartnership())
	// A record without a user travels with its no-match reason, so that the
	// policy can choose to trust it; every other record is a match.
	userless := e.GetNoMatchReason() == NoMatchReason_NO_MATCH_REASON_RECORD_WITHOUT_USER
	matched := e.GetMdm() != nil && !userless
	p.need(e.GetMdm() == nil || e.GetMethod() != MatchMethod_MATCH_METHOD_UNSPECIFIED, "mdm is set but method is unspecified")
	p.need(matched || e.GetNoMatchReason() != NoMatchReason_NO_MATCH_REASON_UNSPECIFIED, "no mdm record and no no_match_reason")
	p.need(!userless || e.GetMdm() != nil, "no_match_reason is record_without_user but mdm is missing")
	p.need(!matched || e.GetNoMatchReason() == NoMatchReason_NO_MATCH_REASON_UNSPECIFIED, "mdm is set together with no_match_reason")
	p.need(e.GetMatchedAt().IsValid(), "matched_at is missing")
	return p.err()
}

// Validate checks every verdict of a page as DeviceMatched.Validate does,
// and that journeys, if any, go one to one with them.
func (e *DevicesMatched) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.need(e.GetSync().GetSyncId() != "", "sync.sync_id is empty")
	p.need(e.GetPage() > 0, "page is 0")
	p.need(len(e.GetMatches()) > 0, "matches is empty")
	if !(len(e.GetJourneys()) == 0 || len(e.GetJourneys()) == len(e.GetMatches())) {
		p.add("%d journeys for %d matches", len(e.GetJourneys()), len(e.GetMatches()))
	}
	for i, m := range e.GetMatches() {
		if err := m.Validate(); err != nil {
			p.add("matches[%d]: %s", i, strings.TrimPrefix(err.Error(), ErrInvalid.Error()+": "))
			continue
		}
		if m.GetOrg() != e.GetOrg() {
			p.add("matches[%d].org is %q, not %q", i, m.GetOrg(), e.GetOrg())
		}
	}
	return p.err()
}

// PageKey is the key of a page's subjects: its sync id and number.
func PageKey(sync *SyncRef, page uint32) string {
	return fmt.Sprintf("%s-%d", sync.GetSyncId(), page)
}

// Journey returns the journey of the i-th match, "" if it has none.
func (e *DevicesMatched) Journey(i int) string {
	if i < len(e.GetJourneys()) {
		return e.GetJourneys()[i]
	}
	return ""
}

// Validate checks what the executor and the mailer rely on.
func (e *AccessDecided) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.need(e.GetDecisionId() != "", "decision_id is empty")
	p.partnership("partnership", e.GetPartnership())
	p.need(e.GetDesired() != DesiredAccess_DESIRED_ACCESS_UNSPECIFIED, "desired is unspecified")
	p.need(e.GetRule() != "", "rule is empty")
	p.need(e.GetDecidedAt().IsValid(), "decided_at is missing")
	return p.err()
}

// Validate checks that every item of an applied batch says what happened.
func (e *AccessApplied) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.need(len(e.GetItems()) > 0, "items is empty")
	for i, it := range e.GetItems() {
		if it.GetDeviceId() == "" {
			p.add("items[%d].device_id is empty", i)
		}
		if it.GetOutcome() == ApplyOutcome_APPLY_OUTCOME_UNSPECIFIED {
			p.add("items[%d].outcome is unspecified", i)
		}
	}
	p.need(e.GetAppliedAt().IsValid(), "applied_at is missing")
	return p.err()
}

// Validate checks the record of a sent mail.
func (e *NotificationSent) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.need(e.GetRecipient() != "", "recipient is empty")
	p.need(e.GetTemplate() != "", "template is empty")
	p.need(e.GetMessageId() != "", "message_id is empty")
	p.need(e.GetSentAt().IsValid(), "sent_at is missing")
	return p.err()
}

// Validate checks a sync command.
func (e *SyncRequested) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.need(e.GetSyncId() != "", "sync_id is empty")
	p.need(e.GetKind() != SyncKind_SYNC_KIND_UNSPECIFIED, "kind is unspecified")
	p.need(e.GetRequestedBy() != "", "requested_by is empty")
	return p.err()
}

// The actions of a DeviceCommand.
const (
	// CommandRemove deletes the partnership on Exchange.
	CommandRemove = "remove"
	// CommandWipe asks Exchange to wipe the device at its next sync.
	CommandWipe = "wipe"
	// CommandRejudge has the device's partnerships matched and judged again.
	CommandRejudge = "rejudge"
)

// maxNotifyAddresses bounds a wipe's notification addresses: Exchange mails
// each one, and a command is typed by a person.
const maxNotifyAddresses = 10

// Validate checks an operator's command as the executor and the matcher
// rely on it: a known action, a device id Exchange could have reported, a
// partnership to hand to Exchange for a remove or a wipe, and who asked
// and when, for the audit. A command that fails this can never be carried
// out, and is dead-lettered with the reason.
func (e *DeviceCommand) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.need(e.GetCommandId() != "", "command_id is empty")
	action := e.GetAction()
	if !(action == CommandRemove || action == CommandWipe || action == CommandRejudge) {
		p.add("action %q is not remove, wipe or rejudge", action)
	}
	p.deviceID("device_id", e.GetDeviceId())
	if id := e.GetPartnershipId(); id != "" || action != CommandRejudge {
		p.need(strings.TrimSpace(id) != "", "partnership_id is empty")
		p.need(utf8.ValidString(id), "partnership_id is not valid UTF-8")
		p.need(!strings.ContainsFunc(id, unicode.IsControl), "partnership_id contains a control character")
		if len(id) > 1024 {
			p.add("partnership_id is %d bytes long", len(id))
		}
	}
	p.need(e.GetRequestedBy() != "", "requested_by is empty")
	p.need(e.GetRequestedAt().IsValid(), "requested_at is missing")
	p.need(action == CommandWipe || len(e.GetNotifyAddresses()) == 0, "notify_addresses are only for a wipe")
	if len(e.GetNotifyAddresses()) > maxNotifyAddresses {
		p.add("%d notify_addresses, at most %d", len(e.GetNotifyAddresses()), maxNotifyAddresses)
	}
	for i, a := range e.GetNotifyAddresses() {
		at := strings.LastIndexByte(a, '@')
		if !(at > 0 && at < len(a)-1 && len(a) <= 320 && utf8.ValidString(a) && !strings.ContainsFunc(a, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) })) {
			p.add("notify_addresses[%d] %q is not a mail address", i, a)
		}
	}
	return p.err()
}

// Validate checks a sync report.
func (e *SyncCompleted) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.need(e.GetSyncId() != "", "sync_id is empty")
	p.need(e.GetKind() != SyncKind_SYNC_KIND_UNSPECIFIED, "kind is unspecified")
	p.need(e.GetStartedAt().IsValid(), "started_at is missing")
	p.need(e.GetFinishedAt().IsValid(), "finished_at is missing")
	return p.err()
}

// Validate checks an alert.
func (e *Alert) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.need(e.GetAlertId() != "", "alert_id is empty")
	p.need(e.GetKind() != AlertKind_ALERT_KIND_UNSPECIFIED, "kind is unspecified")
	p.need(e.GetSummary() != "", "summary is empty")
	return p.err()
}

// MailboxName names a mailbox for people (decision reasons, the console)
// by the first form it has: its SMTP address, UPN, identity or display
// name.
func MailboxName(m *Mailbox) string {
	for _, s := range []string{m.GetPrimarySmtpAddress(), m.GetUserPrincipalName(), m.GetIdentity(), m.GetDisplayName()} {
		if s != "" {
			return s
		}
	}
	return "(unnamed mailbox)"
}

// PartnershipID names a partnership in easguard's state: its AD object
// GUID, lower-cased, or the identity Exchange reported when there is no
// GUID. One phone used with two mailboxes has one device id and two
// partnership ids; every worker keys its state by the same one.
func PartnershipID(p *EASPartnership) string {
	if p.GetGuid() != "" {
		return strings.ToLower(p.GetGuid())
	}
	return p.GetIdentity()
}

// accessLevels are the values of Exchange's DeviceAccessLevel a plan may name.
var accessLevels = map[string]bool{"Allow": true, "Block": true, "Quarantine": true}

// Validate checks what the executor relies on before it changes the
// organisation's default: two known levels that differ, and a decision id
// to record the outcome under.
func (e *OrgSettingsDecided) Validate() error {
	var p problems
	p.need(e.GetOrg() != "", "org is empty")
	p.need(e.GetDecisionId() != "", "decision_id is empty")
	if !accessLevels[e.GetFromLevel()] {
		p.add("from_level %q is not Allow, Block or Quarantine", e.GetFromLevel())
	}
	if !accessLevels[e.GetToLevel()] {
		p.add("to_level %q is not Allow, Block or Quarantine", e.GetToLevel())
	}
	if e.GetFromLevel() == e.GetToLevel() {
		p.add("from_level and to_level are both %q", e.GetToLevel())
	}
	p.need(e.GetDecidedAt().IsValid(), "decided_at is missing")
	return p.err()
}

// Short is the kind's name in status keys and logs ("quick", "full"): the
// collector's status of a pass and the evaluator's status of its judging
// are found under the same name. A kind left unset is a quick sync, as the
// collector runs it.
func (k SyncKind) Short() string {
	if k == SyncKind_SYNC_KIND_FULL {
		return "full"
	}
	return "quick"
}
