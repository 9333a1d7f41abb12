package budget_test

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/budget"
	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/natsembed"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/tests/exchangesim"
)

const (
	org      = bus.Org("contoso")
	duty     = "exchange-session"
	leaseTTL = 2 * time.Second
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// server starts JetStream with easguard's buckets (a lease TTL of 2s).
func server(tb testing.TB) *natsembed.Server { return serverWithTTL(tb, leaseTTL) }

// serverWithTTL starts JetStream with easguard's buckets and the given
// lease TTL.
func serverWithTTL(tb testing.TB, ttl time.Duration) *natsembed.Server {
	tb.Helper()
	s, _, js := natstest.Start(tb)
	topo := bus.DefaultTopology()
	topo.LeaseTTL = ttl
	if err := bus.Provision(natstest.Context(tb), js, topo); err != nil {
		tb.Fatal(err)
	}
	return s
}

// process is one easguard process's view of the budget: its own NATS
// connection, so closing it is what a crash does to the bus.
type process struct {
	js    jetstream.JetStream
	close func()
	slots *budget.Slots
}

func newProcess(tb testing.TB, s *natsembed.Server, name string, total int) *process {
	tb.Helper()
	nc, js := natstest.Connect(tb, s)
	kv, err := js.KeyValue(natstest.Context(tb), bus.BucketLeases)
	if err != nil {
		tb.Fatal(err)
	}
	slots, err := budget.New(natstest.Context(tb), kv, duty, org, total, name, quiet())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(slots.Close)
	return &process{js: js, close: nc.Close, slots: slots}
}

func acquire(tb testing.TB, s *budget.Slots, n int) int {
	tb.Helper()
	got := 0
	for range n {
		ok, err := s.Acquire(context.Background())
		if err != nil {
			tb.Fatal(err)
		}
		if ok {
			got++
		}
	}
	return got
}

// Processes together never hold more slots than the budget; a released
// slot is free at once, and the slots of a process that dies without
// releasing them (its connection gone, no renewals) return within the
// lease TTL.
func TestSlotsAreSharedAndReturn(t *testing.T) {
	s := server(t)
	a := newProcess(t, s, "a", 4)
	b := newProcess(t, s, "b", 4)
	if got := acquire(t, a.slots, 3); got != 3 {
		t.Fatalf("a got %d of 3 slots", got)
	}
	if got := acquire(t, b.slots, 3); got != 1 {
		t.Fatalf("b got %d slots with 3 of 4 held by a, want 1", got)
	}
	if got := acquire(t, a.slots, 1); got != 0 {
		t.Fatalf("a got a fifth slot of a budget of 4")
	}
	a.slots.Release()
	if got := acquire(t, b.slots, 1); got != 1 {
		t.Fatalf("a released slot was not free at once")
	}

	// b crashes holding 2 slots: a gets them back once their keys expire.
	b.close()
	crashed := time.Now()
	natstest.Eventually(t, 4*leaseTTL, "the crashed process's slots free again", func() bool {
		acquire(t, a.slots, 1)
		return a.slots.Held() == 4
	})
	took := time.Since(crashed)
	t.Logf("slots of a crashed process returned after %s (lease TTL %s)", took.Round(10*time.Millisecond), leaseTTL)
	if took > leaseTTL+time.Second {
		t.Errorf("the slots returned after %s, more than the lease TTL %s", took, leaseTTL)
	}
	// And a keeps them: its renewals hold them past two TTLs.
	select {
	case <-a.slots.Lost():
		t.Fatal("a lost a slot it was renewing")
	case <-time.After(2 * leaseTTL):
	}
	if a.slots.Held() != 4 {
		t.Errorf("a holds %d slots after renewals, want 4", a.slots.Held())
	}
}

// load keeps n requests at once running on each pool until stop closes.
func load(t *testing.T, pools []*exchange.Pool, n int, stop <-chan struct{}) *sync.WaitGroup {
	t.Helper()
	var wg sync.WaitGroup
	req := exchange.Request{Op: "invoke", Call: &exchange.Call{Cmdlet: "Get-ClientAccessService", Select: []string{"Fqdn"}}}
	for _, p := range pools {
		for range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					_, err := p.Do(ctx, req, nil)
					cancel()
					if err != nil {
						select {
						case <-stop:
						default:
							t.Errorf("request: %v", err)
						}
						return
					}
				}
			}()
		}
	}
	return &wg
}

// Two processes, each allowed 4 workers, share a budget of 4 sessions: on
// the Exchange simulator, which counts the remote sessions of the service
// account, they never hold more than 4 together, however hard they are
// pushed; without the budget the same load opens 8. A process that loses
// its slots (renewal refused: another process holds them now) closes its
// sessions.
func TestPoolsStayWithinTheSharedBudget(t *testing.T) {
	for _, tt := range []struct {
		name   string
		budget int // 0: no shared budget
		want   int // the peak of remote sessions
	}{
		{"without a budget", 0, 8},
		{"budget of 4", 4, 4},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sim := exchangesim.StartTest(t, exchangesim.Config{Profile: exchangesim.Profile{MaxShellsPerUser: 18, CmdletRead: 100 * time.Millisecond}})
			cfg := sim.ExchangeConfig(t)
			cfg.Workers, cfg.CASFailover = 4, false
			s := server(t)
			var pools []*exchange.Pool
			var procs []*process
			for _, name := range []string{"a", "b"} {
				var opts []exchange.PoolOption
				if tt.budget > 0 {
					pr := newProcess(t, s, name, tt.budget)
					procs = append(procs, pr)
					opts = append(opts, exchange.WithSessionSlots(pr.slots))
				}
				p, err := exchange.NewPool(context.Background(), cfg, quiet(), opts...)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { p.Close(context.Background()) })
				pools = append(pools, p)
			}
			stop := make(chan struct{})
			wg := load(t, pools, 8, stop)
			natstest.Eventually(t, 30*time.Second, "the load to reach its peak", func() bool {
				return sim.PeakRemoteSessions(cfg.User) >= tt.want
			})
			// Keep pushing for a while longer: the peak must not grow.
			settle := time.Now().Add(2 * time.Second)
			natstest.Eventually(t, 10*time.Second, "two more seconds of load", func() bool { return time.Now().After(settle) })
			close(stop)
			wg.Wait()
			peak := sim.PeakRemoteSessions(cfg.User)
			t.Logf("peak remote sessions of %s: %d (budget %d, two processes of 4 workers)", cfg.User, peak, tt.budget)
			if peak != tt.want {
				t.Errorf("peak of %d remote sessions, want %d", peak, tt.want)
			}
			if n := sim.RefusedRemoteSessions(cfg.User); n != 0 {
				t.Errorf("%d sessions refused", n)
			}
			if tt.budget == 0 {
				return
			}
			// Process a's slots are taken from under it (as when its keys
			// expired during a partition and b took them): a's renewals
			// are refused and it closes its sessions.
			kv, err := procs[1].js.KeyValue(context.Background(), bus.BucketLeases)
			if err != nil {
				t.Fatal(err)
			}
			procs[1].slots.Close()
			pools[1].Close(context.Background())
			held := procs[0].slots.Held()
			if held == 0 {
				t.Fatal("a holds no slot after the load")
			}
			lister, err := kv.ListKeysFiltered(context.Background(), duty+"."+string(org)+".>")
			if err != nil {
				t.Fatal(err)
			}
			for k := range lister.Keys() {
				if err := kv.Purge(context.Background(), k); err != nil {
					t.Fatal(err)
				}
			}
			rival := newProcess(t, s, "rival", tt.budget)
			natstest.Eventually(t, 10*time.Second, "the rival to take every slot", func() bool {
				acquire(t, rival.slots, 1)
				return rival.slots.Held() == tt.budget
			})
			natstest.Eventually(t, 4*leaseTTL, "a to close the sessions it lost the slots of", func() bool {
				return sim.RemoteSessions(cfg.User) == 0 && procs[0].slots.Held() == 0
			})
			t.Logf("a held %d slots; after losing them it holds %d remote sessions", held, sim.RemoteSessions(cfg.User))
		})
	}
}

// Under a backlog a pool opens sessions beyond its Workers, as many as the
// shared budget has free and never more (another process's sessions
// count), and closes them again once they have idled for BurstIdle, so
// its slots go back to the budget; a load of no more requests than it has
// workers opens none. Shells dropped while the pool is grown are replaced
// within the budget, and every request still succeeds.
func TestPoolGrowsForABacklogWithinTheBudget(t *testing.T) {
	const total = 6
	for _, tt := range []struct {
		name     string
		requests int  // kept running at once on the pool
		other    int  // sessions of another process's pool, kept busy
		drop     bool // drop every shell once the pool has grown
		want     int  // the pool's sessions at their peak
	}{
		{"steady load", 2, 0, false, 2},
		{"backlog", 16, 0, false, total},
		{"backlog beside another process", 16, 2, false, total - 2},
		{"backlog, shells dropped while grown", 16, 0, true, total},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sim := exchangesim.StartTest(t, exchangesim.Config{Profile: exchangesim.Profile{MaxShellsPerUser: 18, CmdletRead: 200 * time.Millisecond}})
			cfg := sim.ExchangeConfig(t)
			cfg.Workers, cfg.CASFailover, cfg.BurstIdle = 2, false, time.Second
			s := server(t)
			newPool := func(name string) (*exchange.Pool, *process) {
				pr := newProcess(t, s, name, total)
				p, err := exchange.NewPool(context.Background(), cfg, quiet(), exchange.WithSessionSlots(pr.slots))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { p.Close(context.Background()) })
				return p, pr
			}
			pool, proc := newPool("a")
			stop := make(chan struct{})
			var others *sync.WaitGroup
			otherHeld := func() int { return 0 }
			if tt.other > 0 {
				other, op := newPool("b")
				otherHeld = op.slots.Held
				others = load(t, []*exchange.Pool{other}, tt.other, stop)
				natstest.Eventually(t, 30*time.Second, "the other process to open its sessions", func() bool {
					return other.Sessions() == tt.other && sim.RemoteSessions(cfg.User) == 1+tt.other
				})
			}
			wg := load(t, []*exchange.Pool{pool}, tt.requests, stop)
			peak := 0
			watch := func(what string, d time.Duration, cond func() bool) {
				t.Helper()
				natstest.Eventually(t, d, what, func() bool {
					peak = max(peak, pool.Sessions())
					if n := proc.slots.Held() + otherHeld(); n > total {
						t.Fatalf("%d slots held, budget %d", n, total)
					}
					return cond()
				})
			}
			watch("the pool to reach its peak", 30*time.Second, func() bool { return pool.Sessions() >= tt.want })
			if tt.drop {
				if _, err := sim.Inject(exchangesim.Fault{Endpoint: sim.Endpoints()[0].Name, Kind: "drop_shells"}); err != nil {
					t.Fatal(err)
				}
				// The pool replaces them under the same backlog. (The
				// dropped shells' Exchange sessions leak until their idle
				// timeout, as on Exchange: the simulator counts them.)
				watch("the pool to open its sessions again", 30*time.Second, func() bool {
					return pool.Sessions() == tt.want && proc.slots.Held() == tt.want
				})
			}
			// Keep pushing for a while longer: the pool must not grow past it.
			settle := time.Now().Add(2 * time.Second)
			watch("two more seconds of load", 10*time.Second, func() bool { return time.Now().After(settle) })
			close(stop)
			wg.Wait()
			if others != nil {
				others.Wait()
			}
			t.Logf("pool of %d workers under %d requests at once: peak %d sessions, %d held slots (budget %d, %d held by another process); remote sessions peak %d",
				cfg.Workers, tt.requests, peak, proc.slots.Held(), total, tt.other, sim.PeakRemoteSessions(cfg.User))
			if peak != tt.want {
				t.Errorf("peak of %d sessions, want %d", peak, tt.want)
			}
			if got := sim.PeakRemoteSessions(cfg.User); got > total && !tt.drop {
				t.Errorf("peak of %d remote sessions, over the budget of %d", got, total)
			}
			if n := sim.RefusedRemoteSessions(cfg.User); n != 0 {
				t.Errorf("%d sessions refused", n)
			}
			// Idle: the extra sessions close and their slots go back.
			idle := time.Now()
			natstest.Eventually(t, 10*cfg.BurstIdle, "the extra sessions to close", func() bool {
				return pool.Sessions() == cfg.Workers && proc.slots.Held() == cfg.Workers && (tt.drop || sim.RemoteSessions(cfg.User) == cfg.Workers+tt.other)
			})
			t.Logf("back to %d sessions %s after the load ended (BurstIdle %s)", cfg.Workers, time.Since(idle).Round(10*time.Millisecond), cfg.BurstIdle)
		})
	}
}
