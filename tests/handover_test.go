package tests

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/collector"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/pipeline"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// A collector that loses its lease and takes it back reads again what its
// bucket holds: while it was not the holder, another replica may have
// written there. The collector remembers what it wrote so that a full sync
// of an unchanged organisation reads nothing back, and that memory is only
// sound while it is the bucket's one writer (collector.Forget, called by
// the pipeline at the start of each lease term).
//
// Here the other replica is a collector the test drives under the lease it
// took from the stack's: it records a phone blocked, and the block is
// lifted, which leaves the phone as the stack's collector remembers it and
// its record saying blocked. When the lease comes back, the first passes
// of the stack's new term must report the phone changed, back to the
// organisation's default; a collector that kept its memory across the
// handover finds it unchanged, and the record in the bucket stays wrong.
func TestCollectorTakingItsLeaseBackReadsWhatAnotherReplicaWrote(t *testing.T) {
	s := startStack(t, stackOptions{workers: []string{pipeline.Collector}, collect: func(c *collector.Config) {
		c.MDMWait = time.Millisecond // no MDM source runs here
		c.EnforceSettings = false
	}})
	ctx := t.Context()
	phone := iPhone("alice@contoso.com", "ApplHANDOVER0001")
	was := s.phoneSync(phone)
	waitEvent(t, s.events, "eas.observed", func(m *ev.EASPartnershipObserved) bool {
		return strings.EqualFold(m.GetPartnership().GetDeviceId(), phone.DeviceID) && m.GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_NEW
	})
	// The next full sync finds the phone as the collector wrote it.
	s.waitSyncs("full", 1)
	s.requestSync("full")
	s.waitSyncs("full", 2)
	if seen, c := changesIn(s, lastFullSync(s), phone.DeviceID), lastFullSync(s).GetCounts(); len(seen) != 0 || c.GetUnchanged() != 1 {
		t.Fatalf("the full sync after the phone was recorded: observed it as %v, counts %v; want it unchanged", seen, c)
	}

	leases, err := s.svc.JS.KeyValue(ctx, bus.BucketLeases)
	if err != nil {
		t.Fatal(err)
	}
	lease, release := takeLease(t, leases, pipeline.Collector, bus.Org(s.org), "handover-test-replica")

	// The other replica, under the lease: the phone blocked, recorded,
	// then unlisted, as an administrator might undo a mistake.
	client, closeClient := bareClient(t, *s.sections.Exchange)
	t.Cleanup(closeClient)
	other, err := collector.New(ctx, s.svc.JS, bus.Org(s.org), *s.sections.Collector, client, s.svc.Publisher(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	apply := func(a exchange.Access) {
		t.Helper()
		res, err := client.ApplyAccess(ctx, []exchange.Change{{Mailbox: "alice@contoso.com", DeviceID: phone.DeviceID, Access: a}})
		if err != nil || len(res) != 1 || res[0].Err != nil {
			t.Fatalf("%s %s: %v %v", a, phone.DeviceID, res, err)
		}
	}
	apply(exchange.AccessBlock)
	if r := s.phoneSync(phone); r.State != "Blocked" {
		t.Fatalf("the phone after the block: %+v", r)
	}
	done, err := other.Sync(ctx, ev.SyncKind_SYNC_KIND_FULL, "", "test")
	if err != nil || done.GetCounts().GetChanged() != 1 {
		t.Fatalf("the other replica's full sync after the block: %v, %v; want 1 changed", done.GetCounts(), err)
	}
	apply(exchange.AccessUnlist)
	if r := s.phoneSync(phone); r.State != was.State || r.Reason != was.Reason {
		t.Fatalf("the phone after the block was lifted: %+v; want %s/%s as before", r, was.State, was.Reason)
	}

	release()
	natstest.Eventually(t, 30*time.Second, "the stack's collector holding its lease again", func() bool {
		h, err := lease.Holder(ctx)
		return err == nil && h == s.svc.InstanceID()
	})
	// The first passes of the new term: the schedule's quick sync, which
	// reports partnerships changed lately, and a full sync asked for.
	s.requestSync("full")
	s.waitSyncs("full", 4) // the stack's two, the other replica's, this one
	back := find(s.events, func(m *ev.EASPartnershipObserved) bool {
		return strings.EqualFold(m.GetPartnership().GetDeviceId(), phone.DeviceID) && m.GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_CHANGED &&
			m.GetSync().GetSyncId() != done.GetSyncId()
	})
	if len(back) != 1 || back[0].GetPartnership().GetDeviceAccessStateReason() != ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_GLOBAL {
		t.Fatalf("the stack's collector, its lease back, reported the phone changed %d times (%v); want once, back to the organisation's default (its record says blocked)", len(back), back)
	}
}

// lastFullSync is the newest successful full sync the stack saw.
func lastFullSync(s *stack) *ev.SyncCompleted {
	s.t.Helper()
	all := find(s.events, func(m *ev.SyncCompleted) bool { return m.GetKind() == ev.SyncKind_SYNC_KIND_FULL && m.GetSuccess() })
	if len(all) == 0 {
		s.t.Fatal("no full sync")
	}
	return all[len(all)-1]
}

// changesIn returns what a sync reported about a device other than
// finding it unchanged: new, changed or gone.
func changesIn(s *stack, sync *ev.SyncCompleted, deviceID string) []*ev.EASPartnershipObserved {
	return find(s.events, func(m *ev.EASPartnershipObserved) bool {
		return m.GetSync().GetSyncId() == sync.GetSyncId() && strings.EqualFold(m.GetPartnership().GetDeviceId(), deviceID) &&
			m.GetChange() != ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED
	})
}

// takeLease takes a duty's lease from the replica that holds it, as a
// standby does when the holder's renewals go unanswered: its key is
// deleted until a real bus.Lease under holder creates it (the holder, which
// learns of the loss at its next renewal, may take it back first), and
// that lease is then held, and renewed, until release. The holder gets the
// key back only after the release.
func takeLease(t *testing.T, kv jetstream.KeyValue, duty string, org bus.Org, holder string) (lease *bus.Lease, release func()) {
	t.Helper()
	lease, err := bus.NewLease(t.Context(), kv, duty, org, holder, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- lease.Run(ctx, func(lctx context.Context) { <-lctx.Done() }) }()
	key := duty + "." + string(org)
	natstest.Eventually(t, 30*time.Second, "the test holding lease "+key, func() bool {
		if lease.Held() {
			return true
		}
		if h, err := lease.Holder(t.Context()); err == nil && h != "" && h != holder {
			if err := kv.Delete(t.Context(), key); err != nil {
				t.Fatal(err)
			}
		}
		return false
	})
	var once sync.Once
	release = func() {
		once.Do(func() {
			cancel()
			if err := <-ran; err != nil {
				t.Errorf("lease %s held by the test: %v", key, err)
			}
		})
	}
	t.Cleanup(release)
	return lease, release
}
