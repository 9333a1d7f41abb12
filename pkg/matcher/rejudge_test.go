package matcher_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/bus/bustest"
	"github.com/easguard/easguard/pkg/matcher"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// rejudge publishes an operator's rejudge as the console does and returns
// its command id.
func rejudge(tb testing.TB, pub *bus.Publisher, deviceID, partnershipID string) string {
	tb.Helper()
	out, err := bus.CommandOutbound(org, ev.CommandRejudge, deviceID, partnershipID, "", "alice@contoso.com", "192.0.2.7", "MDM record fixed", nil, time.Now())
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := pub.Publish(context.Background(), out); err != nil {
		tb.Fatal(err)
	}
	return out.Message.(*ev.DeviceCommand).GetCommandId()
}

// verdicts counts the verdicts stored in the match stream.
func verdicts(tb testing.TB, h *harness) int {
	tb.Helper()
	s, err := h.js.Stream(natstest.Context(tb), bus.StreamMatch)
	if err != nil {
		tb.Fatal(err)
	}
	info, err := s.Info(natstest.Context(tb), jetstream.WithSubjectFilter(bus.DeviceMatched.Filter(org)))
	if err != nil {
		tb.Fatal(err)
	}
	n := 0
	for _, c := range info.State.Subjects {
		n += int(c)
	}
	return n
}

// A rejudge sends every indexed partnership of the device (or the one it
// names) to the evaluator again, matched with today's MDM records, and a
// device the matcher never saw is refused; the audit trail says which.
func TestRejudge(t *testing.T) {
	h := start(t)
	audit := natstest.Receive[ev.AuditEvent](t, h.js, bus.StreamAudit, bus.AuditRecorded.Filter(org))
	dead := bustest.DeadLetters[ev.DeviceCommand](t, h.js, org, "matcher")
	// One phone used with two mailboxes, and another phone.
	h.observe("alice@contoso.com", "alice@contoso.com", "SharedDEV", "G1")
	h.observe("bob@contoso.com", "bob@contoso.com", "SharedDEV", "G2")
	h.observe("carol@contoso.com", "carol@contoso.com", "OtherDEV", "G3")
	h.next(3)
	// alice enrols the phone since: the MDM change re-matches both.
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m-alice", UserPrincipalName: "alice@contoso.com", EasDeviceId: "SharedDEV", EnrollmentState: ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED}, false, "")
	h.next(2)

	tests := []struct {
		name        string
		device      string
		partnership string
		want        map[string]ev.NoMatchReason // partnership guid → verdict
		outcome     string
	}{
		{"every partnership of the device", "shareddev", "", map[string]ev.NoMatchReason{
			"G1": ev.NoMatchReason_NO_MATCH_REASON_UNSPECIFIED, "G2": ev.NoMatchReason_NO_MATCH_REASON_RECORD_FOR_ANOTHER_USER}, "done: 2 partnerships"},
		{"one partnership, named as Exchange writes it", "SharedDEV", "G2", map[string]ev.NoMatchReason{
			"G2": ev.NoMatchReason_NO_MATCH_REASON_RECORD_FOR_ANOTHER_USER}, "done: 1 partnerships"},
		{"another device", "OtherDEV", "", map[string]ev.NoMatchReason{"G3": ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD}, "done: 1 partnerships"},
		{"unknown device", "NoSuchDEV", "", nil, matcher.RejudgeUnknown},
		{"unknown partnership of a known device", "SharedDEV", "G9", nil, matcher.RejudgeUnknown},
		{"hostile device id", `x.*> ';$(rm)" *`, "", nil, matcher.RejudgeUnknown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := rejudge(t, h.pub, tt.device, tt.partnership)
			a := audit.Await(t, 10*time.Second, "audit of "+id, func(a *ev.AuditEvent) bool { return a.GetDetail()["command_id"] == id })
			if a.GetAction() != bus.AuditDeviceRejudge || a.GetOutcome() != tt.outcome || a.GetTarget() != tt.device || a.GetActor() != "alice@contoso.com" || a.GetSource() != "192.0.2.7" {
				t.Errorf("audit %v", a)
			}
			got := h.next(len(tt.want))
			// The verdicts are stored before the command is acknowledged:
			// once it is, the stream holds every one there will be.
			natstest.WaitDrained(t, h.js, 10*time.Second, bus.StreamCommands)
			if n := verdicts(t, h); n != h.taken {
				t.Fatalf("%d verdicts in the stream, want %d", n, h.taken)
			}
			for _, v := range got {
				p := v.GetObserved().GetPartnership()
				want, ok := tt.want[p.GetGuid()]
				if !ok || v.GetTrigger() != "operator" || v.GetNoMatchReason() != want || !strings.EqualFold(p.GetDeviceId(), tt.device) {
					t.Errorf("verdict for %s: trigger %q reason %s, want operator %s: %v", p.GetGuid(), v.GetTrigger(), v.GetNoMatchReason(), want, v)
				}
				if want == ev.NoMatchReason_NO_MATCH_REASON_UNSPECIFIED && v.GetMdm().GetMdmDeviceId() != "m-alice" {
					t.Errorf("alice's partnership not matched with today's record: %v", v)
				}
			}
		})
	}
	if n := dead.Len(); n != 0 {
		t.Errorf("%d rejudges dead-lettered: %v", n, dead.All())
	}
}

// A command other than a rejudge on the matcher's subject, or a rejudge
// that cannot be valid, is dead-lettered with the reason and judges
// nothing.
func TestMalformedRejudgeDeadLetters(t *testing.T) {
	h := start(t)
	dead := bustest.DeadLetters[ev.DeviceCommand](t, h.js, org, "matcher")
	h.observe("alice@contoso.com", "alice@contoso.com", "DevA", "g1")
	h.next(1)
	tests := []struct {
		name   string
		cmd    *ev.DeviceCommand
		reason string
	}{
		{"a wipe on the matcher's subject", &ev.DeviceCommand{Org: string(org), CommandId: "c1", Action: ev.CommandWipe, DeviceId: "DevA", PartnershipId: "g1",
			RequestedBy: "alice", RequestedAt: timestamppb.Now()}, "not a rejudge command"},
		{"no requested_at", &ev.DeviceCommand{Org: string(org), CommandId: "c2", Action: ev.CommandRejudge, DeviceId: "DevA", RequestedBy: "alice"}, "requested_at is missing"},
		{"no device", &ev.DeviceCommand{Org: string(org), CommandId: "c3", Action: ev.CommandRejudge, RequestedBy: "alice", RequestedAt: timestamppb.Now()}, "device_id is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			subject, err := bus.RejudgeRequested.Subject(org, "DevA")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subject, MsgID: tt.cmd.GetCommandId(), Message: tt.cmd}); err != nil {
				t.Fatal(err)
			}
			dl := dead.Await(t, 10*time.Second, "dead letter of "+tt.cmd.GetCommandId(), func(d bustest.DeadLetter[*ev.DeviceCommand]) bool {
				return d.Message.GetCommandId() == tt.cmd.GetCommandId()
			})
			if !strings.Contains(dl.Reason, tt.reason) {
				t.Errorf("reason %q, want it to say %q", dl.Reason, tt.reason)
			}
		})
	}
	natstest.WaitDrained(t, h.js, 10*time.Second, bus.StreamCommands)
	if n := verdicts(t, h); n != 1 {
		t.Errorf("%d verdicts, want only the observation's", n)
	}
	if slices.ContainsFunc(dead.All(), func(d bustest.DeadLetter[*ev.DeviceCommand]) bool { return d.Message.GetAction() == "" }) {
		t.Error("a dead letter lost its body")
	}
}
