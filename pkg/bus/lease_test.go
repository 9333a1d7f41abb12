package bus_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
)

type contender struct {
	name   string
	lease  *bus.Lease
	leads  atomic.Int32
	cancel context.CancelFunc
	done   chan struct{}
}

func startContender(t *testing.T, kv jetstream.KeyValue, name string) *contender {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	l, err := bus.NewLease(ctx, kv, "collector", org, name, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	c := &contender{name: name, lease: l, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		_ = l.Run(ctx, func(ctx context.Context) {
			c.leads.Add(1)
			<-ctx.Done()
		})
	}()
	t.Cleanup(func() { cancel(); <-c.done })
	return c
}

// leaseBucket is the lease bucket of a server of its own, provisioned
// with topo.
func leaseBucket(t testing.TB, topo bus.Topology) jetstream.KeyValue {
	t.Helper()
	_, _, js := natstest.Start(t)
	if err := bus.Provision(natstest.Context(t), js, topo); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(natstest.Context(t), bus.BucketLeases)
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

func TestLeaseOneHolderAndTakeoverWithinTTL(t *testing.T) {
	s := natstest.Server(t)
	_, js := natstest.Connect(t, s)
	topo := fastTopology()
	if err := bus.Provision(natstest.Context(t), js, topo); err != nil {
		t.Fatal(err)
	}
	// Each contender has its own connection, as replicas on different hosts do.
	kvFor := func(name string) (jetstream.KeyValue, func()) {
		nc, err := s.Connect(name)
		if err != nil {
			t.Fatal(err)
		}
		js, _ := jetstream.New(nc)
		kv, err := js.KeyValue(natstest.Context(t), bus.BucketLeases)
		if err != nil {
			t.Fatal(err)
		}
		return kv, nc.Close
	}
	kvA, crashA := kvFor("a")
	kvB, _ := kvFor("b")
	a := startContender(t, kvA, "replica-a")
	natstest.Eventually(t, 5*time.Second, "a holds", func() bool { return a.lease.Held() })
	b := startContender(t, kvB, "replica-b")

	// For several TTLs, exactly one holds it at every sample: a renews, b waits.
	ttl := topo.LeaseTTL
	end := time.Now().Add(3 * ttl)
	natstest.Eventually(t, 10*ttl, "three TTLs of single holding", func() bool {
		ha, hb := a.lease.Held(), b.lease.Held()
		if ha == hb {
			t.Fatalf("a holds %v, b holds %v", ha, hb)
		}
		return time.Now().After(end)
	})
	if a.leads.Load() != 1 || b.leads.Load() != 0 {
		t.Fatalf("leads: a %d, b %d", a.leads.Load(), b.leads.Load())
	}
	if h, err := b.lease.Holder(natstest.Context(t)); err != nil || h != "replica-a" {
		t.Fatalf("recorded holder %q, %v", h, err)
	}

	// a's process dies: its connection goes, it stops renewing without
	// releasing. b must take over within the TTL, and never overlap with a.
	crashA()
	crashed := time.Now()
	natstest.Eventually(t, 3*ttl, "b takes over", func() bool {
		ha, hb := a.lease.Held(), b.lease.Held()
		if ha && hb {
			t.Fatal("a and b hold the lease at once")
		}
		return hb
	})
	took := time.Since(crashed)
	t.Logf("takeover %s after the holder died (lease TTL %s, key TTL %s)", took, ttl, a.lease.KeyTTL())
	// The holder's last renewal was before the crash, so the standby must
	// hold the lease within the TTL of the crash.
	if took > ttl {
		t.Errorf("takeover took %s, more than the lease TTL %s", took, ttl)
	}
	if a.lease.Held() {
		t.Fatal("a still believes it holds the lease")
	}
	if b.leads.Load() != 1 {
		t.Fatalf("b led %d times", b.leads.Load())
	}
}

func TestLeaseReleasedOnStop(t *testing.T) {
	kv := leaseBucket(t, fastTopology())
	a := startContender(t, kv, "replica-a")
	natstest.Eventually(t, 5*time.Second, "a holds", func() bool { return a.lease.Held() })
	b := startContender(t, kv, "replica-b")
	stopAndTakeOver(t, a, b)
}

// stopAndTakeOver stops a and checks that b takes the lease over at once:
// a released lease is taken at once, not after the TTL.
func stopAndTakeOver(t *testing.T, a, b *contender) {
	t.Helper()
	start := time.Now()
	a.cancel()
	<-a.done
	natstest.Eventually(t, 5*time.Second, "b takes over", func() bool { return b.lease.Held() })
	if took := time.Since(start); took > a.lease.KeyTTL()/2 {
		t.Errorf("takeover after release took %s: the lease expired instead of being released", took)
	}
}

// A bucket that does not answer at first delays the campaign; it does not
// end it (which would stop the process).
func TestLeaseRunOutlastsABucketNotAnsweringYet(t *testing.T) {
	slow := natstest.NewFaultyKV(leaseBucket(t, fastTopology()))
	slow.RefuseWatches(3)
	c := startContender(t, slow, "replica-a")
	natstest.Eventually(t, 10*time.Second, "the lease held once the bucket answers", func() bool { return c.lease.Held() })
	select {
	case <-c.done:
		t.Fatal("Run returned")
	default:
	}
	if n := slow.WatchesRefused(); n != 0 {
		t.Fatalf("%d failing watches left, want all three tried", n)
	}
}

// A renewal that the holder's shutdown cancelled may have been stored all
// the same, under a revision the holder never learnt: the lease is still
// released at once, not left to expire.
func TestLeaseReleasedAfterARenewalItNeverHeardOf(t *testing.T) {
	ctx := natstest.Context(t)
	kv := leaseBucket(t, fastTopology())
	a := startContender(t, kv, "replica-a")
	natstest.Eventually(t, 5*time.Second, "a holds", func() bool { return a.lease.Held() })
	b := startContender(t, kv, "replica-b")
	keys, err := kv.Keys(ctx)
	if err != nil || len(keys) != 1 {
		t.Fatalf("lease keys %v (%v), want a's one", keys, err)
	}
	e, err := kv.Get(ctx, keys[0])
	if err != nil {
		t.Fatal(err)
	}
	// a's renewal, stored; its reply never reached a.
	if _, err := kv.Update(ctx, keys[0], e.Value(), e.Revision()); err != nil {
		t.Fatal(err)
	}
	stopAndTakeOver(t, a, b)
}

func TestLeaseNeedsBucketTTL(t *testing.T) {
	_, _, js := natstest.Start(t)
	ctx := natstest.Context(t)
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "no_ttl"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bus.NewLease(ctx, kv, "collector", org, "x", nil); !errors.Is(err, bus.ErrLeaseTTL) {
		t.Fatalf("err = %v, want ErrLeaseTTL", err)
	}
	if _, err := bus.NewLease(ctx, kv, "collector", "Bad Org", "x", nil); !errors.Is(err, bus.ErrBadOrg) {
		t.Fatalf("err = %v, want ErrBadOrg", err)
	}
}

// A holder keeps its lease through renewals that go unanswered while the
// bucket elects a leader, and through one that landed without its reply;
// it gives the lease up before its key could expire when none is
// answered. Before, a renewal waited for the lease's deadline itself, so
// an election that ended seconds later still lost the lease (seen after a
// NATS node was killed under the compose set), and a lost reply made the
// next renewal's wrong revision look like another holder's key.
func TestLeaseRenewal(t *testing.T) {
	// holding starts one contender through a FaultyKV on a lease TTL of
	// lease, and waits until it holds.
	holding := func(t *testing.T, lease time.Duration) (*contender, *natstest.FaultyKV) {
		t.Helper()
		topo := fastTopology()
		topo.LeaseTTL = lease
		f := natstest.NewFaultyKV(leaseBucket(t, topo))
		c := startContender(t, f, "replica-a")
		natstest.Eventually(t, 5*time.Second, "a holds", func() bool { return c.lease.Held() })
		return c, f
	}
	stillLeading := func(t *testing.T, c *contender) {
		t.Helper()
		if !c.lease.Held() || c.leads.Load() != 1 {
			t.Fatalf("held %v after leading %d times, want held and led once", c.lease.Held(), c.leads.Load())
		}
	}
	t.Run("unanswered renewals within the lease's life keep it", func(t *testing.T) {
		// A key TTL of 4.8s: renewed 1.6s after a write, unanswered
		// attempts of 0.4s every 0.6s, given up at 3.84s.
		c, f := holding(t, 6*time.Second)
		f.Set(natstest.Unanswered)
		natstest.Eventually(t, 10*time.Second, "two unanswered renewals", func() bool { return f.Count(natstest.Unanswered, false) >= 2 })
		stillLeading(t, c)
		f.Set(natstest.Answered)
		natstest.Eventually(t, 10*time.Second, "a renewal answered again", func() bool { return f.Count(natstest.Answered, false) >= 1 })
		stillLeading(t, c)
	})
	t.Run("a renewal whose reply was lost keeps the lease", func(t *testing.T) {
		c, f := holding(t, 6*time.Second)
		f.Set(natstest.ReplyLost)
		natstest.Eventually(t, 10*time.Second, "a renewal stored without its reply", func() bool { return f.Count(natstest.ReplyLost, false) >= 1 })
		f.Set(natstest.Answered)
		natstest.Eventually(t, 10*time.Second, "renewals answered after the refused one", func() bool {
			return f.Count(natstest.Answered, true) >= 1 && f.Count(natstest.Answered, false) >= 1
		})
		stillLeading(t, c)
	})
	t.Run("a holder none of whose renewals is answered gives the lease up before its key can expire", func(t *testing.T) {
		c, f := holding(t, 2*time.Second)
		if n, held := c.lease.Tenure(); n != 1 || !held {
			t.Fatalf("tenure %d held %v, want the first, held", n, held)
		}
		f.Set(natstest.Unanswered)
		natstest.Eventually(t, 10*time.Second, "the lease given up", func() bool { return !c.lease.Held() })
		since := f.SinceStored()
		t.Logf("given up %s after the last stored write was sent (key TTL %s)", since.Round(time.Millisecond), c.lease.KeyTTL())
		if since >= c.lease.KeyTTL() {
			t.Errorf("given up %s after the last stored write, when its key (TTL %s) may have expired and been taken", since, c.lease.KeyTTL())
		}
		if n, held := c.lease.Tenure(); n != 1 || held {
			t.Errorf("tenure %d held %v after the loss, want the first, not held", n, held)
		}
		// Taken again once the bucket answers: a new tenure, which tells
		// whoever claimed something under the first that it was lost.
		f.Set(natstest.Answered)
		natstest.Eventually(t, 10*time.Second, "the lease taken again", func() bool { return c.lease.Held() })
		if n, _ := c.lease.Tenure(); n != 2 {
			t.Errorf("tenure %d after taking the lease again, want 2", n)
		}
	})
}
