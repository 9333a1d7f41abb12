package executor_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/bus/bustest"
	"github.com/easguard/easguard/pkg/executor"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
)

// commandHarness is an executor with its audit trail and dead letters of
// commands in view.
type commandHarness struct {
	*harness
	audit *natstest.Received[*ev.AuditEvent]
	dead  *natstest.Received[bustest.DeadLetter[*ev.DeviceCommand]]
}

func startCommands(tb testing.TB, allow bool) *commandHarness {
	tb.Helper()
	h := start(tb, options{allowRemove: allow, allowWipe: allow})
	return &commandHarness{
		harness: h,
		audit:   natstest.Receive[ev.AuditEvent](tb, h.js, bus.StreamAudit, bus.AuditRecorded.Filter(org)),
		dead:    bustest.DeadLetters[ev.DeviceCommand](tb, h.js, org, "executor"),
	}
}

// command publishes an operator's command as the console does.
func (h *commandHarness) command(tb testing.TB, action, deviceID, partnershipID, mailbox string, notify []string) string {
	tb.Helper()
	out, err := bus.CommandOutbound(org, action, deviceID, partnershipID, mailbox, "alice@contoso.com", "192.0.2.7", "lost phone", notify, time.Now())
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := h.pub.Publish(context.Background(), out); err != nil {
		tb.Fatal(err)
	}
	return out.Message.(*ev.DeviceCommand).GetCommandId()
}

// awaitAudit waits for the audit record of a command.
func (h *commandHarness) awaitAudit(tb testing.TB, commandID string) *ev.AuditEvent {
	tb.Helper()
	return h.audit.Await(tb, 20*time.Second, "audit of command "+commandID, func(a *ev.AuditEvent) bool {
		return a.GetDetail()["command_id"] == commandID
	})
}

// calls returns the parameters of every call of cmdlet Exchange received.
func (h *commandHarness) calls(tb testing.TB, cmdlet string) []map[string]any {
	tb.Helper()
	var out []map[string]any
	for _, r := range h.sim.Recorder.Records("cmdlet") {
		if r.Cmdlet != cmdlet {
			continue
		}
		var p map[string]any
		if err := json.Unmarshal(r.Params, &p); err != nil {
			tb.Fatalf("%s parameters %s: %v", cmdlet, r.Params, err)
		}
		out = append(out, p)
	}
	return out
}

// partnerships returns the device ids of a mailbox's partnerships on Exchange.
func (h *commandHarness) partnerships(tb testing.TB, m *exchangesim.Mailbox) []string {
	tb.Helper()
	list, err := h.sim.Org.Partnerships(m.PrimarySMTP)
	if err != nil {
		tb.Fatal(err)
	}
	var ids []string
	for _, p := range list {
		ids = append(ids, p.DeviceID)
	}
	return ids
}

// An operator's remove or wipe reaches Exchange through the real client
// where the organisation enabled it, and is refused without a call to
// Exchange where it did not; either way the audit trail says who asked,
// for what, and how it ended.
func TestDeviceCommands(t *testing.T) {
	hs := map[bool]*commandHarness{true: startCommands(t, true), false: startCommands(t, false)}
	tests := []struct {
		name    string
		allow   bool
		action  string
		box     int
		device  string
		notify  []string
		cmdlet  string
		audit   string
		outcome string
	}{
		{"remove", true, ev.CommandRemove, 0, "RemoveDEV1", nil, "Remove-ActiveSyncDevice", bus.AuditDeviceRemove, executor.CommandDone},
		{"wipe", true, ev.CommandWipe, 1, "WipeDEV1", []string{"helpdesk@contoso.com"}, "Clear-ActiveSyncDevice", bus.AuditDeviceWipe, executor.CommandDone},
		{"remove not enabled", false, ev.CommandRemove, 0, "RemoveDEV2", nil, "Remove-ActiveSyncDevice", bus.AuditDeviceRemove, executor.CommandRefused},
		{"wipe not enabled", false, ev.CommandWipe, 1, "WipeDEV2", nil, "Clear-ActiveSyncDevice", bus.AuditDeviceWipe, executor.CommandRefused},
		// The device id is the phone's choice: it stays data in the
		// subject (a base32 key), the audit and the log, and Exchange is
		// given only the partnership's GUID.
		{"hostile device id", true, ev.CommandRemove, 2, `x.*> ';$(rm -rf)" -Identity *`, nil, "Remove-ActiveSyncDevice", bus.AuditDeviceRemove, executor.CommandDone},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := hs[tt.allow]
			m := h.boxes[tt.box]
			p := h.phone(t, m, tt.device)
			other := h.phone(t, m, tt.device[:3]+"Other")
			before := len(h.calls(t, tt.cmdlet))
			id := h.command(t, tt.action, tt.device, ev.PartnershipID(p), m.Canonical(), tt.notify)
			a := h.awaitAudit(t, id)

			if a.GetAction() != tt.audit || a.GetOutcome() != tt.outcome || a.GetTarget() != tt.device ||
				a.GetActor() != "alice@contoso.com" || a.GetSource() != "192.0.2.7" || a.GetOrg() != string(org) || !a.GetAt().IsValid() {
				t.Errorf("audit %v", a)
			}
			if d := a.GetDetail(); d["partnership"] != ev.PartnershipID(p) || d["mailbox"] != m.Canonical() || d["reason"] != "lost phone" || d["cas_server"] != h.cas {
				t.Errorf("audit detail %v", d)
			}
			calls := h.calls(t, tt.cmdlet)[before:]
			if !tt.allow {
				if len(calls) != 0 {
					t.Fatalf("refused, but Exchange received %v", calls)
				}
				if ids := h.partnerships(t, m); !slices.Contains(ids, tt.device) {
					t.Errorf("refused, but the partnership is gone: %q", ids)
				}
				if res := h.sync(t, m, tt.device); res.Wiped {
					t.Error("refused, but the phone was wiped")
				}
				return
			}
			if len(calls) != 1 || calls[0]["Identity"] != ev.PartnershipID(p) {
				t.Fatalf("Exchange received %s %v, want one with Identity %s", tt.cmdlet, calls, ev.PartnershipID(p))
			}
			switch tt.action {
			case ev.CommandRemove:
				ids := h.partnerships(t, m)
				if slices.Contains(ids, tt.device) {
					t.Errorf("partnership %q still on Exchange: %q", tt.device, ids)
				}
				if !slices.Contains(ids, other.GetDeviceId()) {
					t.Errorf("another partnership of the mailbox went too: %q", ids)
				}
			case ev.CommandWipe:
				if got := fmt.Sprint(calls[0]["NotificationEmailAddresses"]); !strings.Contains(got, tt.notify[0]) {
					t.Errorf("NotificationEmailAddresses as received: %s", got)
				}
				if res := h.sync(t, m, tt.device); !res.Wiped {
					t.Errorf("the phone's next sync got %+v, not the wipe", res)
				}
				if res := h.sync(t, m, other.GetDeviceId()); res.Wiped {
					t.Error("another phone of the mailbox was wiped")
				}
			}
		})
	}
	for allow, h := range hs {
		natstest.WaitDrained(t, h.js, 20*time.Second, bus.StreamCommands)
		if n := h.dead.Len(); n != 0 {
			t.Errorf("allow=%v: %d commands dead-lettered: %v", allow, n, h.dead.All())
		}
	}
}

// A removal that names a partnership Exchange does not have fails, and
// says so in the audit trail; nothing else of the mailbox is touched.
func TestRemoveUnknownPartnershipFails(t *testing.T) {
	h := startCommands(t, true)
	m := h.boxes[0]
	p := h.phone(t, m, "KeepDEV")
	for _, id := range []string{"*", "00000000-0000-0000-0000-000000000000", m.Canonical() + `\ExchangeActiveSyncDevices\*`} {
		t.Run(id, func(t *testing.T) {
			cid := h.command(t, ev.CommandRemove, "KeepDEV", id, m.Canonical(), nil)
			a := h.awaitAudit(t, cid)
			if !strings.HasPrefix(a.GetOutcome(), "failed: ") {
				t.Errorf("outcome %q, want failed", a.GetOutcome())
			}
			if ids := h.partnerships(t, m); !slices.Contains(ids, p.GetDeviceId()) {
				t.Errorf("partnership removed by %q: %q", id, ids)
			}
		})
	}
}

// A command that can never be carried out is dead-lettered with the
// reason, and Exchange never hears of it.
func TestMalformedCommandDeadLetters(t *testing.T) {
	h := startCommands(t, true)
	valid := func() *ev.DeviceCommand {
		return &ev.DeviceCommand{Org: string(org), CommandId: "cmd-1", Action: ev.CommandRemove, DeviceId: "BadDEV",
			PartnershipId: "0c0ffee0-0000-0000-0000-000000000001", RequestedBy: "alice", RequestedAt: timestamppb.Now()}
	}
	tests := []struct {
		name   string
		mutate func(c *ev.DeviceCommand)
		reason string
	}{
		{"no partnership", func(c *ev.DeviceCommand) { c.PartnershipId = "" }, "partnership_id is empty"},
		{"unknown action", func(c *ev.DeviceCommand) { c.Action = "format-c" }, `action "format-c"`},
		{"rejudge on the executor's subject", func(c *ev.DeviceCommand) { c.Action = ev.CommandRejudge }, "not an executor command"},
		{"device id too long", func(c *ev.DeviceCommand) { c.DeviceId = strings.Repeat("D", 33) }, "device_id is longer than 32"},
		{"nobody asked", func(c *ev.DeviceCommand) { c.RequestedBy = "" }, "requested_by is empty"},
		{"notify on a removal", func(c *ev.DeviceCommand) { c.NotifyAddresses = []string{"a@b.c"} }, "notify_addresses are only for a wipe"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := valid()
			c.CommandId = fmt.Sprintf("bad-%d", i)
			tt.mutate(c)
			subject, err := bus.DeviceCommanded.Subject(org, "BadDEV")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subject, MsgID: c.CommandId, Message: c}); err != nil {
				t.Fatal(err)
			}
			dl := h.dead.Await(t, 20*time.Second, "dead letter of "+c.CommandId, func(d bustest.DeadLetter[*ev.DeviceCommand]) bool {
				return d.Message.GetCommandId() == c.CommandId
			})
			if !strings.Contains(dl.Reason, tt.reason) {
				t.Errorf("reason %q, want it to say %q", dl.Reason, tt.reason)
			}
		})
	}
	natstest.WaitDrained(t, h.js, 20*time.Second, bus.StreamCommands)
	for _, cmdlet := range []string{"Remove-ActiveSyncDevice", "Clear-ActiveSyncDevice"} {
		if n := h.sim.Recorder.Count("cmdlet:" + cmdlet); n != 0 {
			t.Errorf("%d %s calls reached Exchange", n, cmdlet)
		}
	}
	if n := h.audit.Len(); n != 0 {
		t.Errorf("%d audit records of commands never carried out: %v", n, h.audit.All())
	}
}
