package console

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/easguard/easguard/pkg/bus"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Step is one event of a device's journey, as its history shows it.
type Step struct {
	At      time.Time `json:"at"`
	Kind    string    `json:"kind"`
	Summary string    `json:"summary"`
	Details []string  `json:"details,omitempty"`
	TraceID string    `json:"trace_id,omitempty"`
	Subject string    `json:"subject"`
}

// historyLimit bounds the events read per kind: a phone that flapped for
// a year shows its latest, not a page nobody can read.
const historyLimit = 500

// deviceFamilies are the per-device events, in journey order.
var deviceFamilies = []bus.Event{bus.EASObserved, bus.MDMChanged, bus.DeviceMatched, bus.AccessDecided, bus.AccessApplied, bus.NotifySent}

// history reads every event about one EAS device id from the streams, and
// the operator actions whose target is that device, oldest first.
func history(ctx context.Context, js jetstream.JetStream, org bus.Org, deviceID string) ([]Step, error) {
	var steps []Step
	for _, fam := range deviceFamilies {
		subject, err := fam.Subject(org, deviceID)
		if err != nil {
			return nil, err
		}
		msgs, err := readStream(ctx, js, fam.Stream(), []string{subject}, historyLimit)
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			steps = append(steps, describe(m))
		}
	}
	audits, err := readStream(ctx, js, bus.StreamAudit, []string{bus.AuditRecorded.Filter(org)}, 10*historyLimit)
	if err != nil {
		return nil, err
	}
	for _, m := range audits {
		var a ev.AuditEvent
		if proto.Unmarshal(m.data, &a) == nil && strings.EqualFold(a.GetTarget(), deviceID) {
			steps = append(steps, describe(m))
		}
	}
	slices.SortStableFunc(steps, func(a, b Step) int { return a.At.Compare(b.At) })
	return steps, nil
}

// storedMsg is a message read back from a stream.
type storedMsg struct {
	subject string
	header  nats.Header
	data    []byte
	typ     string
	trace   string
	at      time.Time
	seq     uint64
}

// readStream reads the messages of stream on filters with an ordered
// consumer, keeping the last limit of them.
func readStream(ctx context.Context, js jetstream.JetStream, stream string, filters []string, limit int) ([]storedMsg, error) {
	c, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{FilterSubjects: filters, DeliverPolicy: jetstream.DeliverAllPolicy})
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", stream, err)
	}
	pending := c.CachedInfo().NumPending
	var out []storedMsg
	for got := uint64(0); got < pending; {
		batch, err := c.Fetch(int(min(pending-got, 256)), jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", stream, err)
		}
		n := 0
		for m := range batch.Messages() {
			n++
			md, err := m.Metadata()
			if err != nil {
				continue
			}
			out = append(out, storedMsg{subject: m.Subject(), header: m.Headers(), data: m.Data(), typ: m.Headers().Get(bus.HeaderType),
				trace: m.Headers().Get("traceparent"), at: md.Timestamp, seq: md.Sequence.Stream})
			if len(out) > limit {
				out = out[1:]
			}
		}
		if err := batch.Error(); err != nil && !errors.Is(err, jetstream.ErrNoMessages) {
			return nil, fmt.Errorf("read %s: %w", stream, err)
		}
		if n == 0 {
			break
		}
		got += uint64(n)
	}
	return out, nil
}

// decode returns the protobuf message a stored event carries.
func decode(m storedMsg) (proto.Message, error) {
	mt, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(m.typ))
	if err != nil {
		return nil, fmt.Errorf("event of unknown type %q", m.typ)
	}
	msg := mt.New().Interface()
	if err := proto.Unmarshal(m.data, msg); err != nil {
		return nil, fmt.Errorf("decode %s: %w", m.typ, err)
	}
	return msg, nil
}

func describe(m storedMsg) Step {
	s := Step{At: m.at, Subject: m.subject, TraceID: traceID(m.trace)}
	msg, err := decode(m)
	if err != nil {
		s.Kind, s.Summary = "unreadable", err.Error()
		return s
	}
	switch e := msg.(type) {
	case *ev.EASPartnershipObserved:
		p := e.GetPartnership()
		s.Kind = "observed"
		s.Summary = fmt.Sprintf("Exchange: %s partnership of %s, %s (%s)", strings.ToLower(word(e.GetChange().String(), "OBSERVATION_CHANGE_")),
			ev.MailboxName(p.GetMailbox()), stateOrUnknown(word(p.GetDeviceAccessState().String(), "DEVICE_ACCESS_STATE_")),
			word(p.GetDeviceAccessStateReason().String(), "DEVICE_ACCESS_STATE_REASON_"))
		s.Details = append(s.Details, fmt.Sprintf("%s %s, %s", p.GetDeviceType(), p.GetDeviceModel(), p.GetDeviceOs()),
			fmt.Sprintf("sync %s (%s)", e.GetSync().GetSyncId(), e.GetSync().GetKind().Short()))
	case *ev.MDMDeviceChanged:
		d := e.GetDevice()
		s.Kind = "mdm"
		if e.GetRemoved() {
			s.Summary = fmt.Sprintf("MDM %s: record %s removed", d.GetSource(), d.GetMdmDeviceId())
		} else {
			s.Summary = fmt.Sprintf("MDM %s: %s, %s, record %s of %s", d.GetSource(), word(d.GetEnrollmentState().String(), "ENROLLMENT_STATE_"),
				word(d.GetComplianceState().String(), "COMPLIANCE_STATE_"), d.GetMdmDeviceId(), d.GetUserPrincipalName())
		}
	case *ev.DeviceMatched:
		s.Kind = "matched"
		if e.GetMethod() != ev.MatchMethod_MATCH_METHOD_UNSPECIFIED && e.GetMdm() != nil {
			s.Summary = fmt.Sprintf("Matched (%s) to MDM record %s: %s", word(e.GetMethod().String(), "MATCH_METHOD_"), e.GetMdm().GetMdmDeviceId(),
				word(e.GetMdm().GetComplianceState().String(), "COMPLIANCE_STATE_"))
		} else {
			s.Summary = "No match: " + word(e.GetNoMatchReason().String(), "NO_MATCH_REASON_")
		}
		if e.GetDetail() != "" {
			s.Details = append(s.Details, e.GetDetail())
		}
		s.Details = append(s.Details, "because of a change in "+e.GetTrigger())
	case *ev.AccessDecided:
		s.Kind = "decided"
		s.Summary = fmt.Sprintf("Decided %s by rule %s", word(e.GetDesired().String(), "DESIRED_ACCESS_"), e.GetRule())
		if e.GetDryRun() {
			s.Summary += " (dry run: not applied)"
		}
		s.Details = append(s.Details, e.GetReason(), "policy "+e.GetPolicyVersion())
	case *ev.AccessApplied:
		s.Kind = "applied"
		var outcomes []string
		for _, it := range e.GetItems() {
			o := word(it.GetOutcome().String(), "APPLY_OUTCOME_")
			if it.GetError() != "" {
				o += ": " + it.GetError()
			}
			outcomes = append(outcomes, fmt.Sprintf("%s %s", word(it.GetDesired().String(), "DESIRED_ACCESS_"), o))
		}
		s.Summary = fmt.Sprintf("Applied on %s as %s: %s", e.GetCasServer(), e.GetActor(), strings.Join(outcomes, "; "))
		for _, c := range e.GetCmdlets() {
			s.Details = append(s.Details, cmdletLine(c))
		}
	case *ev.NotificationSent:
		s.Kind = "mail"
		s.Summary = fmt.Sprintf("Mail %q (%s) sent to %s", e.GetTemplate(), e.GetLocale(), e.GetRecipient())
		s.Details = append(s.Details, "Message-ID "+e.GetMessageId())
	case *ev.AuditEvent:
		s.Kind = "operator"
		s.Summary = fmt.Sprintf("%s by %s from %s: %s", e.GetAction(), e.GetActor(), e.GetSource(), e.GetOutcome())
		for k, v := range e.GetDetail() {
			s.Details = append(s.Details, k+": "+v)
		}
		slices.Sort(s.Details)
	default:
		s.Kind, s.Summary = "event", m.typ
	}
	return s
}

// cmdletLine writes a cmdlet as it was sent, in PowerShell's own words.
func cmdletLine(c *ev.CmdletInvocation) string {
	var b strings.Builder
	b.WriteString(c.GetName())
	for _, p := range c.GetParameters() {
		b.WriteString(" -" + p.GetName() + " ")
		vals := make([]string, len(p.GetValues()))
		for i, v := range p.GetValues() {
			vals[i] = "'" + strings.ReplaceAll(v, "'", "''") + "'"
		}
		if p.GetOperation() != "" {
			b.WriteString("@{" + p.GetOperation() + "=" + strings.Join(vals, ",") + "}")
		} else {
			b.WriteString(strings.Join(vals, ","))
		}
	}
	if c.GetError() != "" {
		b.WriteString("  → error: " + c.GetError())
	}
	return b.String()
}
