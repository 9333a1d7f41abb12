package mdm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/intunesim"
)

const testOrg = bus.Org("contoso")

// testLeaseTTL is short so takeovers take seconds.
const testLeaseTTL = 2 * time.Second

// natsServer is a JetStream server whose store survives Restart, as a
// NATS server's file store survives a reboot.
type natsServer struct {
	tb  testing.TB
	dir string
	s   *natsembed.Server
}

func startNATS(tb testing.TB) *natsServer {
	tb.Helper()
	n := &natsServer{tb: tb, dir: tb.TempDir()}
	n.start()
	tb.Cleanup(func() { n.s.Shutdown() })
	topo := bus.DefaultTopology()
	topo.LeaseTTL = testLeaseTTL
	_, js := n.connect("provision")
	if err := bus.Provision(natstest.Context(tb), js, topo); err != nil {
		tb.Fatal(err)
	}
	return n
}

func (n *natsServer) start() {
	n.tb.Helper()
	s, err := natsembed.Start(natsembed.Options{StoreDir: n.dir})
	if err != nil {
		n.tb.Fatalf("start embedded NATS: %v", err)
	}
	n.s = s
}

// restart shuts the server down and starts it again from its store.
func (n *natsServer) restart() {
	n.tb.Helper()
	n.s.Shutdown()
	n.start()
}

// connect opens a connection of its own, as each replica has; it is
// closed when the test ends.
func (n *natsServer) connect(name string) (*nats.Conn, jetstream.JetStream) {
	n.tb.Helper()
	nc, err := n.s.Connect(name)
	if err != nil {
		n.tb.Fatal(err)
	}
	n.tb.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		n.tb.Fatal(err)
	}
	return nc, js
}

func bucket(tb testing.TB, js jetstream.JetStream, name string) jetstream.KeyValue {
	tb.Helper()
	kv, err := js.KeyValue(natstest.Context(tb), name)
	if err != nil {
		tb.Fatal(err)
	}
	return kv
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// readSink is a recordingSink that also counts complete reads.
type readSink struct {
	*recordingSink
	reads atomic.Int64
}

func (s *readSink) ReadOK(context.Context, int) { s.reads.Add(1) }

// graphReplica is one replica of the mdm worker running the Graph source
// under the org's lease, on its own NATS connection.
type graphReplica struct {
	tb     testing.TB
	name   string
	nc     *nats.Conn
	lease  *bus.Lease
	sink   *readSink
	cancel context.CancelFunc
	done   chan error
}

func startGraphReplica(tb testing.TB, n *natsServer, sim *intunesim.Sim, name string) *graphReplica {
	tb.Helper()
	nc, js := n.connect(name)
	ctx, cancel := context.WithCancel(context.Background())
	lease, err := bus.NewLease(ctx, bucket(tb, js, bus.BucketLeases), "mdm-graph", testOrg, name, quietLog())
	if err != nil {
		tb.Fatal(err)
	}
	store, err := NewKVInventoryStore(bucket(tb, js, bus.BucketMDMSources), testOrg)
	if err != nil {
		tb.Fatal(err)
	}
	g := graphSource(tb, sim, func(o *GraphOptions) { o.Store, o.Logger = store, quietLog() })
	r := &graphReplica{tb: tb, name: name, nc: nc, lease: lease, sink: &readSink{recordingSink: &recordingSink{}}, cancel: cancel, done: make(chan error, 1)}
	src := Singleton(g, lease)
	go func() { r.done <- src.Run(ctx, r.sink) }()
	tb.Cleanup(r.stop)
	return r
}

// stop ends the replica's Run, which releases the lease if it can.
func (r *graphReplica) stop() {
	r.cancel()
	if err := <-r.done; err != nil {
		r.tb.Errorf("%s: Run returned %v", r.name, err)
	}
	r.done <- nil // later stops return at once
}

// servedAtLeast waits until the simulator has recorded at least reads
// listings and returns how many it recorded. The simulator records a
// request once its handler returns, which can be after the client has the
// whole response, so a read can be counted before the listing that served it.
func servedAtLeast(tb testing.TB, sim *intunesim.Sim, reads int) int {
	tb.Helper()
	waitFor(tb, fmt.Sprintf("the simulator to record %d listings", reads), func() bool { return listings(sim) >= reads })
	return listings(sim)
}

// listings counts complete listings of the managed devices the simulator
// answered (every listing here is one page).
func listings(sim *intunesim.Sim) int {
	n := 0
	for _, r := range sim.Recorder.Records("graph") {
		if r.Page == 1 && r.Status == http.StatusOK {
			n++
		}
	}
	return n
}

// Two replicas of the Graph source: only the lease holder polls Graph
// (every listing the simulator served is one the holder read), the
// standby takes over within the lease TTL when the holder stops or dies,
// and continues from what the holder delivered instead of publishing
// every record again.
func TestGraphSingletonOnePollerAndTakeover(t *testing.T) {
	for _, tt := range []struct {
		name string
		// end stops the holder; graceful says it can release the lease.
		end      func(r *graphReplica)
		graceful bool
	}{
		{"holder stops", func(r *graphReplica) { r.stop() }, true},
		// A crash: the connection is gone, so the lease key stays until
		// its TTL ends, and the process polls no more.
		{"holder dies", func(r *graphReplica) { r.nc.Close(); r.stop() }, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n := startNATS(t)
			sim := intunesim.StartTest(t, intunesim.Config{Extra: 30})
			a := startGraphReplica(t, n, sim, "replica-a")
			waitFor(t, "a's first read", func() bool { return a.sink.reads.Load() >= 1 })
			b := startGraphReplica(t, n, sim, "replica-b")
			waitFor(t, "ten reads by a", func() bool { return a.sink.reads.Load() >= 10 })
			if !a.lease.Held() || b.lease.Held() {
				t.Fatalf("a holds %v, b holds %v", a.lease.Held(), b.lease.Held())
			}
			// Each listing the simulator served is one a read: a read
			// may be in flight, so the count may be one ahead.
			reads := int(a.sink.reads.Load())
			served := servedAtLeast(t, sim, reads)
			if b.sink.reads.Load() != 0 || b.sink.attemptCount() != 0 || served > reads+1 {
				t.Fatalf("simulator served %d listings; a read %d, b read %d and delivered %d times", served, reads, b.sink.reads.Load(), b.sink.attemptCount())
			}
			if first := a.sink.calls()[0]; len(first) != sim.DeviceCount() {
				t.Fatalf("a's first read delivered %d records, the tenant has %d", len(first), sim.DeviceCount())
			}

			stopped := time.Now()
			tt.end(a)
			waitFor(t, "b to hold the lease", b.lease.Held)
			takeover := time.Since(stopped)
			waitFor(t, "b's first read", func() bool { return b.sink.reads.Load() >= 1 })
			firstRead := time.Since(stopped)
			t.Logf("%s: b held the lease %s after a ended (lease TTL %s), read Graph %s after", tt.name, takeover.Round(time.Millisecond), testLeaseTTL, firstRead.Round(time.Millisecond))
			// The lease promises a standby within the TTL of the last
			// renewal, which was before a ended; the allowance is for the
			// scheduling of a loaded two-core machine under -race.
			if takeover > testLeaseTTL+250*time.Millisecond {
				t.Fatalf("takeover took %s, more than the lease TTL %s", takeover, testLeaseTTL)
			}
			if tt.graceful && takeover > testLeaseTTL/2 {
				t.Fatalf("takeover after a released the lease took %s", takeover)
			}
			aReads := a.sink.reads.Load()
			waitFor(t, "five reads by b", func() bool { return b.sink.reads.Load() >= 5 })
			if got := a.sink.reads.Load(); got != aReads {
				t.Fatalf("a read %d more times after b took over", got-aReads)
			}
			// b compared with what a delivered: nothing changed in Graph,
			// so nothing was delivered again.
			if n := b.sink.attemptCount(); n != 0 {
				t.Fatalf("b delivered %d times after taking over, want none: %v", n, b.sink.calls())
			}
			reads = int(a.sink.reads.Load() + b.sink.reads.Load())
			served = servedAtLeast(t, sim, reads)
			// a's last listing may have been served and not read, and
			// b's latest may be in flight.
			if served > reads+2 {
				t.Fatalf("simulator served %d listings; a and b read %d", served, reads)
			}
		})
	}
}

// What an inventory source delivered survives a restart of the source and
// of NATS: a device dropped from the inventory, or deleted in Intune,
// while no source ran is reported removed after the restart; the safety
// rules hold across it (an empty export or one that drops most devices
// removes nothing and alerts); and Graph's MissingAfter counts from the
// first read that missed the device, not from the restart.
func TestInventorySurvivesRestart(t *testing.T) {
	all := devices(20)
	without := func(drop ...int) []ManagedDevice {
		return slices.DeleteFunc(slices.Clone(all), func(d ManagedDevice) bool {
			return slices.ContainsFunc(drop, func(i int) bool { return all[i].ID == d.ID })
		})
	}
	ids := func(ds []ManagedDevice) []string {
		var out []string
		for _, d := range ds {
			out = append(out, d.ID)
		}
		return out
	}
	type step struct {
		name    string
		restart bool          // stop the source and NATS, start both again
		advance time.Duration // move the clock first
		read    []ManagedDevice
		changed []string
		removed []string
		alert   ev.AlertKind // raised by this read, if any
	}
	for _, tt := range []struct {
		name         string
		missingAfter time.Duration
		steps        []step
	}{
		{"file: dropped while down", 0, []step{
			{name: "first read", read: all, changed: ids(all)},
			{name: "device 4 dropped while down", restart: true, read: without(3), removed: []string{all[3].ID}},
			{name: "removed once", restart: true, read: without(3)},
		}},
		{"file: empty export while down", 0, []step{
			{name: "first read", read: all, changed: ids(all)},
			{name: "empty export after the restart", restart: true, read: nil, alert: ev.AlertKind_ALERT_KIND_MDM_INVENTORY_EMPTY},
			{name: "the export is back: nothing new", restart: true, read: all},
		}},
		{"file: most devices dropped while down", 0, []step{
			{name: "first read", read: all, changed: ids(all)},
			{name: "15 of 20 gone after the restart", restart: true, read: all[15:], alert: ev.AlertKind_ALERT_KIND_MDM_UNREACHABLE},
		}},
		{"graph: deleted while down", time.Hour, []step{
			{name: "first read", read: all, changed: ids(all)},
			{name: "first read after the restart misses device 4", restart: true, read: without(3)},
			{name: "59 minutes later", advance: 59 * time.Minute, read: without(3)},
			{name: "an hour after the first miss", advance: time.Minute, read: without(3), removed: []string{all[3].ID}},
		}},
		{"graph: missing clock survives a restart", time.Hour, []step{
			{name: "first read", read: all, changed: ids(all)},
			{name: "device 4 missing", read: without(3)},
			{name: "restart 40 minutes later", restart: true, advance: 40 * time.Minute, read: without(3)},
			{name: "restart again, an hour after the first miss", restart: true, advance: 20 * time.Minute, read: without(3), removed: []string{all[3].ID}},
		}},
		{"graph: back before MissingAfter", time.Hour, []step{
			{name: "first read", read: all, changed: ids(all)},
			{name: "device 4 missing", read: without(3)},
			{name: "back after a restart", restart: true, advance: 30 * time.Minute, read: all},
			{name: "missing again: the clock starts over", restart: true, advance: 45 * time.Minute, read: without(3)},
			{name: "59 minutes later", restart: true, advance: 59 * time.Minute, read: without(3)},
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n := startNATS(t)
			now := time.Date(2026, 12, 6, 1, 0, 0, 0, time.UTC)
			sink := &recordingSink{}
			var r *reconciler
			boot := func() {
				_, js := n.connect("mdm")
				store, err := NewKVInventoryStore(bucket(t, js, bus.BucketMDMSources), testOrg)
				if err != nil {
					t.Fatal(err)
				}
				r = newReconciler("test", "graph:test", 0.5, sink, quietLog())
				r.missingAfter, r.now, r.store = tt.missingAfter, func() time.Time { return now }, store
			}
			boot()
			for _, st := range tt.steps {
				if st.restart {
					n.restart()
					boot()
				}
				now = now.Add(st.advance)
				calls, alerts := len(sink.calls()), len(sink.alertList())
				if err := r.apply(natstest.Context(t), readOf(t, st.read), false); err != nil {
					t.Fatalf("%s: %v", st.name, err)
				}
				changed, removed := changedIDs(sink.calls()[calls:])
				slices.Sort(changed)
				want := slices.Sorted(slices.Values(st.changed))
				if !slices.Equal(changed, want) || !slices.Equal(removed, st.removed) {
					t.Fatalf("%s: changed %v removed %v, want %v and %v", st.name, changed, removed, want, st.removed)
				}
				var kinds []ev.AlertKind
				for _, a := range sink.alertList()[alerts:] {
					kinds = append(kinds, a.kind)
				}
				if wantAlerts := []ev.AlertKind{st.alert}; (st.alert == 0 && len(kinds) != 0) || (st.alert != 0 && !slices.Equal(kinds, wantAlerts)) {
					t.Fatalf("%s: alerts %v, want %v", st.name, kinds, st.alert)
				}
			}
		})
	}
}

// The webhook's replay store in KV: an accepted request sent again is
// refused after NATS and the webhook restart, and by another replica;
// other requests still pass.
func TestWebhookReplaySurvivesRestart(t *testing.T) {
	n := startNATS(t)
	replica := func(name string) *webhookFixture {
		_, js := n.connect(name)
		store, err := NewKVReplayStore(natstest.Context(t), bucket(t, js, bus.BucketMDMReplay), testOrg, "webhook")
		if err != nil {
			t.Fatal(err)
		}
		return startWebhook(t, WebhookOptions{Replay: store})
	}
	a := replica("a")
	captured := a.newRequest(payload(t, devices(1)))
	if status, answer := a.send(t, captured); status != http.StatusAccepted {
		t.Fatalf("first delivery: %d %v", status, answer)
	}
	b := replica("b")
	if status, answer := b.send(t, captured); status != http.StatusConflict {
		t.Fatalf("the same request to another replica: %d %v, want 409", status, answer)
	}

	n.restart()
	c := replica("c")
	if status, answer := c.send(t, captured); status != http.StatusConflict {
		t.Fatalf("the same request after a restart: %d %v, want 409", status, answer)
	}
	fresh := c.newRequest(payload(t, devices(1)))
	fresh.id = captured.id + "-2"
	if status, answer := c.send(t, fresh); status != http.StatusAccepted {
		t.Fatalf("a new event after the restart: %d %v", status, answer)
	}
	if got := len(a.sink.calls()) + len(b.sink.calls()) + len(c.sink.calls()); got != 2 {
		t.Fatalf("%d deliveries, want the first request and the new one", got)
	}
}

// Event ids expire after their TTL on the server, Forget frees one at
// once, and a bucket without per-key TTLs is refused.
func TestKVReplayStore(t *testing.T) {
	n := startNATS(t)
	_, js := n.connect("replay")
	ctx := natstest.Context(t)
	store, err := NewKVReplayStore(ctx, bucket(t, js, bus.BucketMDMReplay), testOrg, "webhook")
	if err != nil {
		t.Fatal(err)
	}
	seen := func(id string, ttl time.Duration) bool {
		t.Helper()
		s, err := store.Seen(ctx, id, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	if seen("Evt.1/x", time.Second) || !seen("Evt.1/x", time.Second) {
		t.Fatal("an event id is new once, then seen")
	}
	if seen("evt.1/X", time.Second) {
		t.Fatal("ids differing in case are different events")
	}
	recorded := time.Now()
	waitFor(t, "the id to expire", func() bool { return !seen("Evt.1/x", time.Second) })
	if d := time.Since(recorded); d < 900*time.Millisecond {
		t.Fatalf("expired after %s, before its TTL", d)
	}
	if seen("evt-2", time.Hour) {
		t.Fatal("evt-2 is new")
	}
	if err := store.Forget(ctx, "evt-2"); err != nil {
		t.Fatal(err)
	}
	if seen("evt-2", time.Hour) || !seen("evt-2", time.Hour) {
		t.Fatal("a forgotten id is new again, once")
	}
	if _, err := NewKVReplayStore(ctx, bucket(t, js, bus.BucketStatus), testOrg, "webhook"); !errors.Is(err, ErrReplayTTL) {
		t.Fatalf("bucket without per-key TTLs: %v, want ErrReplayTTL", err)
	}
}

// The first read of a large tenant stores every record and a restart
// loads them all: both must stay a small part of a 100,000-device read.
func BenchmarkKVInventoryStore100k(b *testing.B) {
	const n = 100_000
	nats := startNATS(b)
	_, js := nats.connect("bench")
	store, err := NewKVInventoryStore(bucket(b, js, bus.BucketMDMSources), testOrg)
	if err != nil {
		b.Fatal(err)
	}
	put := make([]KnownDevice, n)
	for i := range put {
		d, err := Normalize("graph:bench", device(i))
		if err != nil {
			b.Fatal(err)
		}
		put[i] = KnownDevice{Device: d}
	}
	ctx := natstest.Context(b)
	var save, load time.Duration
	for b.Loop() {
		start := time.Now()
		if err := store.Save(ctx, "graph:bench", put, nil); err != nil {
			b.Fatal(err)
		}
		save += time.Since(start)
		start = time.Now()
		got, err := store.Load(ctx, "graph:bench")
		if err != nil || len(got) != n {
			b.Fatalf("loaded %d of %d: %v", len(got), n, err)
		}
		load += time.Since(start)
	}
	b.ReportMetric(save.Seconds()/float64(b.N), "save_s")
	b.ReportMetric(load.Seconds()/float64(b.N), "load_s")
}
