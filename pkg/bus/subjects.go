// Package bus is easguard's only way onto NATS JetStream: the subject
// grammar, the streams, consumers and KV buckets every worker relies on,
// publishing with deterministic message ids, the shared consume-and-settle
// runner, dead-lettering and per-org leases.
//
// Workers never talk to JetStream directly. Keeping every stream and
// consumer definition here means a change to retention, redelivery or
// subjects is one reviewed diff, not a drift between containers.
package bus

import (
	"encoding/base32"
	"errors"
	"fmt"
	"regexp"
	"strings"
)

// SubjectRoot is the first token of every easguard subject.
const SubjectRoot = "easguard"

// ErrBadOrg is returned for organisation names that cannot be a subject token.
var ErrBadOrg = errors.New("invalid organisation name")

// ErrBadKey is returned for an empty subject key.
var ErrBadKey = errors.New("invalid subject key")

// ErrBadSubject is returned when a subject does not follow easguard's grammar.
var ErrBadSubject = errors.New("not an easguard subject")

var orgPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)

// Org is a validated organisation name: the token that scopes every subject,
// consumer and lease to one Exchange organisation. Obtain one from ParseOrg.
type Org string

// ParseOrg validates an organisation name. It never rewrites the name: an
// administrator who typed "Contoso Ltd" must learn that it cannot be a NATS
// subject token rather than find events under a name they did not choose.
func ParseOrg(name string) (Org, error) {
	if !orgPattern.MatchString(name) {
		return "", fmt.Errorf("%w %q: use 1 to 63 lower-case letters, digits, '-' or '_', starting with a letter or digit", ErrBadOrg, name)
	}
	return Org(name), nil
}

// SystemOrg is the org token of dead letters whose organisation cannot be
// known (a malformed message on a system subject). ParseOrg never accepts
// it, so no administrator's org can collide with it.
const SystemOrg Org = "_system"

// String returns the organisation name.
func (o Org) String() string { return string(o) }

// base32 without padding, lower case: a token alphabet of a-z and 2-7.
var keyEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// KeyToken turns a key chosen by the outside world (an EAS device id, which
// the phone picks) into one subject token. Keys are case-insensitive, as
// Exchange compares device ids. A key made only of lower-case letters,
// digits and '-' after lower-casing is used as is, which keeps ordinary
// device ids readable in subjects; anything else is base32-encoded behind a
// leading '_', which a readable token never has, so two different keys never
// share a token and no key can inject '.', '*', '>' or whitespace.
func KeyToken(key string) (string, error) {
	if key == "" {
		return "", fmt.Errorf("%w: empty key", ErrBadKey)
	}
	lower := strings.ToLower(key)
	if isPlainToken(lower) {
		return lower, nil
	}
	return "_" + strings.ToLower(keyEncoding.EncodeToString([]byte(lower))), nil
}

func isPlainToken(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// Event names one subject family of the pipeline and the stream that stores it.
type Event struct {
	// name is the family's tokens after the org, e.g. "eas.observed".
	name string
	// keyed events carry one more token: the device (or alert kind, or stage).
	keyed  bool
	stream string
	// msgType is the full protobuf name of the message the family carries;
	// empty for dead letters, which carry whatever failed.
	msgType string
}

// The pipeline's subject families. Subjects are
// easguard.<org>.<family>[.<key>], so a worker set serving one organisation
// filters on easguard.<org>.<family>.> and all orgs share the streams.
var (
	// EASObserved carries EASPartnershipObserved, keyed by device id.
	EASObserved = Event{name: "eas.observed", keyed: true, stream: StreamEAS, msgType: "easguard.v1.EASPartnershipObserved"}
	// EASConfirmed carries EASPartnershipsConfirmed: a page of
	// partnerships a sync found as they were, keyed by the page.
	EASConfirmed = Event{name: "eas.confirmed", keyed: true, stream: StreamEAS, msgType: "easguard.v1.EASPartnershipsConfirmed"}
	// MDMChanged carries MDMDeviceChanged, keyed by EAS device id (or MDM id when the MDM has none).
	MDMChanged = Event{name: "mdm.changed", keyed: true, stream: StreamMDM, msgType: "easguard.v1.MDMDeviceChanged"}
	// DeviceMatched carries DeviceMatched, keyed by device id.
	DeviceMatched = Event{name: "device.matched", keyed: true, stream: StreamMatch, msgType: "easguard.v1.DeviceMatched"}
	// DevicesConfirmed carries DevicesMatched: the verdicts on one
	// EASConfirmed page, keyed by the page.
	DevicesConfirmed = Event{name: "device.confirmed", keyed: true, stream: StreamMatch, msgType: "easguard.v1.DevicesMatched"}
	// AccessDecided carries AccessDecided, keyed by device id.
	AccessDecided = Event{name: "access.decided", keyed: true, stream: StreamDecisions, msgType: "easguard.v1.AccessDecided"}
	// AccessApplied carries AccessApplied, keyed by device id.
	AccessApplied = Event{name: "access.applied", keyed: true, stream: StreamApplied, msgType: "easguard.v1.AccessApplied"}
	// NotifySent carries NotificationSent, keyed by device id.
	NotifySent = Event{name: "notify.sent", keyed: true, stream: StreamNotify, msgType: "easguard.v1.NotificationSent"}
	// SyncRequested carries SyncRequested, a command consumed once.
	SyncRequested = Event{name: "sync.requested", stream: StreamSyncRequests, msgType: "easguard.v1.SyncRequested"}
	// SyncCompleted carries SyncCompleted.
	SyncCompleted = Event{name: "sync.completed", stream: StreamSync, msgType: "easguard.v1.SyncCompleted"}
	// SettingsDecided carries OrgSettingsDecided: the evaluator's released
	// plan to change the organisation's DefaultAccessLevel, for the executor.
	SettingsDecided = Event{name: "settings.decided", stream: StreamSettings, msgType: "easguard.v1.OrgSettingsDecided"}
	// DeviceCommanded carries DeviceCommand for a remove or a wipe, keyed
	// by device id: an operator's command, consumed once by the executor.
	DeviceCommanded = Event{name: "device.command", keyed: true, stream: StreamCommands, msgType: "easguard.v1.DeviceCommand"}
	// RejudgeRequested carries DeviceCommand for a rejudge, keyed by
	// device id: an operator's request, consumed once by the matcher, to
	// match the device's partnerships again. A family of its own, because
	// a work queue hands each message to one consumer only: the executor's
	// and the matcher's filters must not overlap.
	RejudgeRequested = Event{name: "device.rejudge", keyed: true, stream: StreamCommands, msgType: "easguard.v1.DeviceCommand"}
	// AlertRaised carries Alert, keyed by alert kind.
	AlertRaised = Event{name: "alert", keyed: true, stream: StreamAlerts, msgType: "easguard.v1.Alert"}
	// DeadLetter carries messages a worker could not process, keyed by the
	// consumer (stage) that gave up on them. The body is the original
	// message, byte for byte; the reason travels in headers.
	DeadLetter = Event{name: "dlq", keyed: true, stream: StreamDLQ}
	// AuditRecorded carries AuditEvent, keyed by action.
	AuditRecorded = Event{name: "audit", keyed: true, stream: StreamAudit, msgType: "easguard.v1.AuditEvent"}
)

// Events lists every subject family, for provisioning and documentation.
var Events = []Event{EASObserved, EASConfirmed, MDMChanged, DeviceMatched, DevicesConfirmed, AccessDecided, AccessApplied, NotifySent, SyncRequested, SyncCompleted, SettingsDecided, DeviceCommanded, RejudgeRequested, AlertRaised, DeadLetter, AuditRecorded}

// Name returns the family name, e.g. "eas.observed".
func (e Event) Name() string { return e.name }

// Stream returns the name of the stream that stores this family.
func (e Event) Stream() string { return e.stream }

// MessageType returns the full protobuf name of the message the family
// carries, or "" for dead letters, which carry any message.
func (e Event) MessageType() string { return e.msgType }

// Keyed reports whether subjects of this family end in a key token.
func (e Event) Keyed() bool { return e.keyed }

// Subject builds the subject for one event. Keyed families need a key;
// unkeyed families refuse one, so a caller cannot silently drop it.
func (e Event) Subject(org Org, key string) (string, error) {
	if _, err := ParseOrg(string(org)); err != nil && org != SystemOrg {
		return "", fmt.Errorf("subject for %s: %w", e.name, err)
	}
	base := SubjectRoot + "." + string(org) + "." + e.name
	if !e.keyed {
		if key != "" {
			return "", fmt.Errorf("subject for %s: %w: family takes no key", e.name, ErrBadKey)
		}
		return base, nil
	}
	tok, err := KeyToken(key)
	if err != nil {
		return "", fmt.Errorf("subject for %s: %w", e.name, err)
	}
	return base + "." + tok, nil
}

// Filter returns the subject filter matching this family for one org.
func (e Event) Filter(org Org) string {
	if e.keyed {
		return SubjectRoot + "." + string(org) + "." + e.name + ".>"
	}
	return SubjectRoot + "." + string(org) + "." + e.name
}

// streamSubject is the family's filter across all orgs, used by its stream.
func (e Event) streamSubject() string {
	if e.keyed {
		return SubjectRoot + ".*." + e.name + ".>"
	}
	return SubjectRoot + ".*." + e.name
}

// Template is the low-cardinality form of the family's subjects, used as
// span names and metric labels: easguard.{org}.eas.observed.{key}.
func (e Event) Template() string {
	t := SubjectRoot + ".{org}." + e.name
	if e.keyed {
		t += ".{key}"
	}
	return t
}

// ParseSubject finds the org and family of an easguard subject.
func ParseSubject(subject string) (Org, Event, error) {
	toks := strings.Split(subject, ".")
	if len(toks) < 3 || toks[0] != SubjectRoot {
		return "", Event{}, fmt.Errorf("%w: %q", ErrBadSubject, subject)
	}
	org, err := ParseOrg(toks[1])
	if err != nil {
		return "", Event{}, fmt.Errorf("%w: %q: %w", ErrBadSubject, subject, err)
	}
	rest := toks[2:]
	for _, e := range Events {
		n := strings.Count(e.name, ".") + 1
		want := n
		if e.keyed {
			want++
		}
		if len(rest) == want && strings.Join(rest[:n], ".") == e.name {
			return org, e, nil
		}
	}
	return "", Event{}, fmt.Errorf("%w: %q: unknown family", ErrBadSubject, subject)
}

// TemplateOf returns the low-cardinality template of any subject: the
// family's template for easguard subjects, the subject itself otherwise
// (system subjects such as advisories are already low-cardinality).
func TemplateOf(subject string) string {
	if _, e, err := ParseSubject(subject); err == nil {
		return e.Template()
	}
	return subject
}
