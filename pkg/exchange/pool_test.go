package exchange_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/telemetry/telemetrytest"
	"github.com/easguard/easguard/tests/exchangesim"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func simConfig(t testing.TB, s *exchangesim.Sim) exchange.Config {
	t.Helper()
	return s.ExchangeConfig(t)
}

func startSim(t testing.TB, cfg exchangesim.Config) *exchangesim.Sim {
	t.Helper()
	return exchangesim.StartTest(t, cfg)
}

func newPool(t testing.TB, cfg exchange.Config) *exchange.Pool {
	t.Helper()
	p, err := exchange.NewPool(context.Background(), cfg, quiet())
	if err != nil {
		t.Fatalf("new pool: %v", err)
	}
	t.Cleanup(func() { p.Close(context.Background()) })
	return p
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		<-tick.C
	}
}

// read is a batch of one read, urgent or not.
func read(urgent bool) exchange.Request {
	return exchange.Request{Op: "batch", Calls: []exchange.Call{{Cmdlet: "Get-ActiveSyncOrganizationSettings"}}, Urgent: urgent}
}

// racePool is a pool of n sessions, all open, on a simulator whose reads
// take readTime: the start of a race between requests.
func racePool(t testing.TB, readTime time.Duration, n int) *exchange.Pool {
	t.Helper()
	s := startSim(t, exchangesim.Config{Profile: exchangesim.Profile{CmdletRead: readTime, MaxShellsPerUser: 18}})
	cfg := simConfig(t, s)
	cfg.Workers = n
	p := newPool(t, cfg)
	openSessions(t, p, n)
	return p
}

// openSessions opens n sessions before a test's race starts: n urgent
// requests at once, none of which waits for another's session.
func openSessions(t testing.TB, p *exchange.Pool, n int) {
	t.Helper()
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := p.Do(context.Background(), read(true), nil); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if p.Sessions() != n {
		t.Fatalf("%d sessions open, want %d", p.Sessions(), n)
	}
}

// completions runs requests in the background and records the order in
// which they end.
type completions struct {
	mu    sync.Mutex
	order []string
	wg    sync.WaitGroup
}

func (c *completions) run(t testing.TB, p *exchange.Pool, name string, req exchange.Request) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		if _, err := p.Do(context.Background(), req, nil); err != nil {
			t.Errorf("%s: %v", name, err)
		}
		c.mu.Lock()
		c.order = append(c.order, name)
		c.mu.Unlock()
	}()
}

// wait returns the order once every request has ended.
func (c *completions) wait() []string {
	c.wg.Wait()
	return c.order
}

// A change a phone waits for does not queue behind a sync's reads: with
// both sessions busy and four reads waiting, an urgent request takes the
// next session that comes free. Without priority it would run last.
func TestUrgentRequestGoesBeforeQueuedReads(t *testing.T) {
	p := racePool(t, 60*time.Millisecond, 2)
	var c completions
	for i := range 6 {
		c.run(t, p, fmt.Sprintf("read%d", i), read(false))
		// Each queues before the next, so that they queue in order.
		eventually(t, 10*time.Second, "the read to start or queue", func() bool { return p.Waiting() >= max(0, i-1) })
	}
	eventually(t, 10*time.Second, "four reads to queue", func() bool { return p.Waiting() == 4 })
	c.run(t, p, "change", read(true))
	order := c.wait()
	at := slices.Index(order, "change")
	// Two reads hold the sessions; the change takes the first that frees,
	// beside the read that takes the second.
	if at < 0 || at > 3 {
		t.Fatalf("completion order %v: the change came %d of %d, want among the first four", order, at+1, len(order))
	}
}

// Reads leave a session free for a change someone waits for: with three
// sessions open and three reads issued, two run and one waits, and a
// change issued after them runs at once, ending before the read that
// waits. Without the reserve all three reads would run and the change
// would end after every one of them.
func TestReadsLeaveASessionForChanges(t *testing.T) {
	p := racePool(t, 200*time.Millisecond, 3)
	var c completions
	for i := range 3 {
		c.run(t, p, fmt.Sprintf("read%d", i), read(false))
	}
	eventually(t, 10*time.Second, "one read to wait", func() bool { return p.Waiting() == 1 })
	c.run(t, p, "change", read(true))
	order := c.wait()
	if p.Sessions() != 3 {
		t.Fatalf("%d sessions open, want 3 (no session opened for the change)", p.Sessions())
	}
	if at := slices.Index(order, "change"); at < 0 || at == len(order)-1 {
		t.Fatalf("completion order %v: the change waited for a read", order)
	}
}

// A listing keeps nothing back: three listings on three sessions all run
// at once (each has delivered a page before any has ended), as a full
// sync's parts do, one per session.
func TestListingsTakeEverySession(t *testing.T) {
	s := startSim(t, exchangesim.Config{Profile: exchangesim.Profile{PerObject: 40 * time.Millisecond, MaxShellsPerUser: 18},
		Seed: &exchangesim.SeedSpec{Mailboxes: 4, Partnerships: 8, Seed: 3, NoHostile: true}})
	cfg := simConfig(t, s)
	cfg.Workers = 3
	p := newPool(t, cfg)
	openSessions(t, p, 3)
	ctx := context.Background()
	var (
		mu              sync.Mutex
		paged, finished int
		pagedFirst      = -1
		wg              sync.WaitGroup
	)
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			first := true
			_, err := p.Do(ctx, exchange.Request{Op: "invoke", Call: &exchange.Call{Cmdlet: "Get-MobileDevice", Params: exchange.Params{"ResultSize": "Unlimited"}}, Page: 1},
				func([]exchange.Object) error {
					mu.Lock()
					defer mu.Unlock()
					if first {
						first = false
						paged++
						if paged == 3 && pagedFirst < 0 {
							pagedFirst = finished
						}
					}
					return nil
				})
			if err != nil {
				t.Error(err)
			}
			mu.Lock()
			finished++
			mu.Unlock()
		}()
	}
	wg.Wait()
	if pagedFirst != 0 {
		t.Fatalf("all three listings had a page only after %d of them ended (-1: never); want all three at once", pagedFirst)
	}
}

// The pool's metrics say how long Exchange took per cmdlet and which
// cmdlets failed by class: an unknown mailbox is not_found, counted once.
func TestPoolMetrics(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: "alice", DeviceID: "PhoneAlice", DeviceType: "iPhone"}); err != nil {
		t.Fatal(err)
	}
	metrics := telemetrytest.NewMetrics(t)
	cfg := simConfig(t, s)
	p, err := exchange.NewPool(context.Background(), cfg, quiet(), exchange.WithMetrics(metrics.Provider, "contoso"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close(context.Background()) })
	c := exchange.NewClient(p, cfg)
	ctx := context.Background()
	res, err := c.ApplyAccess(ctx, []exchange.Change{{Mailbox: "alice", DeviceID: "PhoneAlice", Access: exchange.AccessAllow}})
	if err != nil || res[0].Err != nil {
		t.Fatalf("apply: %v %+v", err, res)
	}
	if _, err := c.CASMailbox(ctx, "nobody"); !errors.Is(err, exchange.ErrNotFound) {
		t.Fatalf("CASMailbox(nobody) = %v, want not found", err)
	}
	org := "contoso"
	for _, c := range []struct {
		name string
		want map[string]string
		n    float64
	}{
		{"easguard.exchange.request.duration", map[string]string{"easguard.org": org, "easguard.exchange.cmdlet": "Set-CASMailbox"}, 1},
		// The apply's read and the lookup.
		{"easguard.exchange.request.duration", map[string]string{"easguard.org": org, "easguard.exchange.cmdlet": "Get-CASMailbox"}, 2},
		{"easguard.exchange.errors", map[string]string{"easguard.org": org, "easguard.exchange.cmdlet": "Get-CASMailbox", "error.type": "not_found"}, 1},
		{"easguard.exchange.errors", map[string]string{"easguard.org": org}, 1},
	} {
		if got := metrics.Value(t, c.name, c.want); got != c.n {
			t.Errorf("%s%v = %v, want %v", c.name, c.want, got, c.n)
		}
	}
}
