package tests

import (
	"slices"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/collector"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/pipeline"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
)

// Two CAS whose domain controllers replicate with a delay: the executor
// allows a phone through EX01, and a full sync right after reads through
// EX02, whose domain controller still shows the partnership quarantined.
// That reading predates the change, so easguard raises no drift alert and
// does not apply the decision a second time; once replication has brought
// the change to EX02, a full sync confirms it.
//
// It runs with WhenChanged as the reading domain controller stamps it and,
// UNCONFIRMED which one Exchange shows, as the originating one stamped it.
func TestFullSyncThroughAnotherCASAfterAnApply(t *testing.T) {
	for _, origin := range []bool{false, true} {
		t.Run(map[bool]string{false: "local WhenChanged", true: "originating WhenChanged"}[origin], func(t *testing.T) {
			fullSyncThroughAnotherCAS(t, origin)
		})
	}
}

func fullSyncThroughAnotherCAS(t *testing.T, originWhenChanged bool) {
	const delay = 10 * time.Second
	pin := func(cas string) func(*exchange.Config) {
		return func(c *exchange.Config) { c.Server, c.CASFailover = cas+".contoso.com", false }
	}
	var others []string
	for _, w := range pipeline.All {
		if w != pipeline.Collector {
			others = append(others, w)
		}
	}
	// Everything but the collector works through EX01; the collector, in
	// a stack of its own, reads through EX02.
	a := startStack(t, stackOptions{workers: others, exchange: pin("ex01"),
		sim: func(c *exchangesim.Config) {
			c.CAS, c.ReplicationDelay, c.OriginWhenChanged = []string{"EX01", "EX02"}, delay, originWhenChanged
		}})
	b := startStack(t, stackOptions{join: a, workers: []string{pipeline.Collector}, exchange: pin("ex02"),
		collect: func(c *collector.Config) { c.QuickInterval = time.Hour }})
	b.waitFullSync()

	phone := iPhone("alice@contoso.com", "ApplREPL000001")
	a.writeInventory(compliant("mdm-repl-1", "alice@contoso.com", phone.DeviceID))
	waitEvent(t, a.events, "mdm.changed", func(m *ev.MDMDeviceChanged) bool { return m.GetDevice().GetEasDeviceId() == phone.DeviceID })
	if r := a.phoneSync(phone); r.State != "Quarantined" {
		t.Fatalf("new phone: %+v", r)
	}
	b.requestSync("quick")
	applied := waitEvent(t, a.events, "allow applied", appliedFor(phone.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_ALLOW))
	if applied.GetCasServer() != "ex01.contoso.com" {
		t.Fatalf("applied through %q, want ex01.contoso.com", applied.GetCasServer())
	}
	b.requestSync("full")
	full := waitEvent(t, a.events, "the full sync after the apply", func(m *ev.SyncCompleted) bool {
		return m.GetKind() == ev.SyncKind_SYNC_KIND_FULL && m.GetSuccess() && m.GetStartedAt().AsTime().After(applied.GetAppliedAt().AsTime())
	})
	if full.GetCasServer() != "ex02.contoso.com" {
		t.Fatalf("the full sync read through %q, want ex02.contoso.com", full.GetCasServer())
	}
	obs := find(a.events, func(m *ev.EASPartnershipObserved) bool {
		return m.GetSync().GetSyncId() == full.GetSyncId() && m.GetPartnership().GetDeviceId() == phone.DeviceID
	})
	if len(obs) != 1 {
		t.Fatalf("%d observations of the phone in the full sync", len(obs))
	}
	if st := obs[0].GetPartnership().GetDeviceAccessState(); st == ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED {
		t.Fatalf("the full sync read after replication (%s); the machine was too slow for a %s delay, so this run shows nothing", st, delay)
	}
	a.settle()
	if n := len(find(a.events, func(m *ev.Alert) bool { return m.GetKind() == ev.AlertKind_ALERT_KIND_DRIFT })); n != 0 {
		t.Fatalf("%d drift alerts for a change easguard made itself", n)
	}
	if n := a.setCASMailboxCalls(phone.DeviceID); n != 1 {
		t.Fatalf("%d Set-CASMailbox calls for one decision", n)
	}
	if d := find(a.events, decidedFor(phone.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_ALLOW)); len(d) != 1 {
		t.Fatalf("%d allow decisions", len(d))
	}
	a.waitPhone(phone, "Allowed", 30*time.Second)

	// Once replicated, EX02 shows the change and a full sync confirms it.
	natstest.Eventually(t, 60*time.Second, "a full sync through EX02 that sees the allow", func() bool {
		before := len(find(a.events, func(m *ev.SyncCompleted) bool { return m.GetKind() == ev.SyncKind_SYNC_KIND_FULL }))
		b.requestSync("full")
		natstest.Eventually(t, 30*time.Second, "the requested full sync", func() bool {
			return len(find(a.events, func(m *ev.SyncCompleted) bool { return m.GetKind() == ev.SyncKind_SYNC_KIND_FULL })) > before
		})
		return slices.ContainsFunc(find(a.events, deviceOf[*ev.EASPartnershipObserved](phone.DeviceID)), func(m *ev.EASPartnershipObserved) bool {
			return m.GetPartnership().GetDeviceAccessState() == ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED
		})
	})
	a.settle()
	if n := len(find(a.events, func(m *ev.Alert) bool { return m.GetKind() == ev.AlertKind_ALERT_KIND_DRIFT })); n != 0 {
		t.Fatalf("%d drift alerts after replication", n)
	}
	if n := a.setCASMailboxCalls(phone.DeviceID); n != 1 {
		t.Fatalf("%d Set-CASMailbox calls after replication", n)
	}
}
