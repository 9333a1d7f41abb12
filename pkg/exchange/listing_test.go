package exchange_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// listingSim is an organisation whose Get-MobileDevice listing of about
// 5,000 partnerships streams a 100-object page every 0.2 s (2 ms an
// object), with a request deadline of 4 s: the listing takes well over the
// deadline in total, each page well within it (with room for a loaded
// machine).
func listingSim(t *testing.T) (*exchangesim.Sim, exchange.Config, *exchange.Client) {
	t.Helper()
	profile := exchangesim.TestProfile()
	profile.PerObject = 2 * time.Millisecond
	s := startSim(t, exchangesim.Config{Profile: profile,
		Seed: &exchangesim.SeedSpec{Mailboxes: 2500, Partnerships: 5000, Seed: 9, NoHostile: true}})
	cfg := simConfig(t, s)
	cfg.RequestTimeout = 4 * time.Second
	cfg.Workers = 2
	c := exchange.NewClient(newPool(t, cfg), cfg)
	c.PageSize = 100
	// One listing, not parts over both sessions: these tests are about
	// one long listing and its deadline (partition_test.go has the parts).
	c.ListPartitions = 1
	return s, cfg, c
}

// listed returns how many objects the simulator's last Get-MobileDevice
// produced: what a complete listing hands its caller.
func listed(t *testing.T, s *exchangesim.Sim) int {
	t.Helper()
	n := -1
	for _, r := range s.Recorder.Records("cmdlet") {
		if r.Cmdlet == "Get-MobileDevice" {
			n = r.Objects
		}
	}
	if n <= 0 {
		t.Fatalf("the simulator recorded no Get-MobileDevice listing (%d objects)", n)
	}
	return n
}

func TestListingDeadlineIsPerPage(t *testing.T) {
	t.Run("a listing longer than the deadline completes while its pages flow", func(t *testing.T) {
		s, cfg, c := listingSim(t)
		began := time.Now()
		n := 0
		if err := c.ListPartnerships(context.Background(), exchange.ListOptions{}, func(ps []exchange.Partnership) error {
			n += len(ps)
			return nil
		}); err != nil {
			t.Fatalf("listing failed after %s: %v", time.Since(began), err)
		}
		if want := listed(t, s); n != want {
			t.Fatalf("listed %d partnerships, the simulator produced %d", n, want)
		}
		if took := time.Since(began); took < 2*cfg.RequestTimeout {
			t.Fatalf("the listing took %s, not clearly longer than the %s deadline: the test shows nothing", took, cfg.RequestTimeout)
		}
	})

	t.Run("a worker silent between pages for longer than the deadline fails the listing", func(t *testing.T) {
		s, cfg, c := listingSim(t)
		ep := s.Endpoints()[0]
		pages := 0
		var stalledAt time.Time
		err := c.ListPartnerships(context.Background(), exchange.ListOptions{}, func(ps []exchange.Partnership) error {
			pages++
			if pages == 1 {
				stalledAt = time.Now()
				ep.SetStallReceive(true)
			}
			return nil
		})
		ep.SetStallReceive(false)
		if err == nil {
			t.Fatal("the listing completed through a stall longer than the request deadline")
		}
		if !errors.Is(err, exchange.ErrTransient) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v, want a transient error wrapping context.DeadlineExceeded", err)
		}
		if pages == 0 || pages >= 40 {
			t.Fatalf("%d pages reached the caller", pages)
		}
		if took := time.Since(stalledAt); took < cfg.RequestTimeout || took > cfg.RequestTimeout+10*time.Second {
			t.Fatalf("failed %s after the stall began, with a %s deadline", took, cfg.RequestTimeout)
		}
		// The stalled worker was replaced: the next listing works.
		n := 0
		if err := c.ListPartnerships(context.Background(), exchange.ListOptions{}, func(ps []exchange.Partnership) error {
			n += len(ps)
			return nil
		}); err != nil || n != listed(t, s) {
			t.Fatalf("after the stall: %d partnerships, %v", n, err)
		}
	})

	// A retry would hand the caller the first pages again; a listing that
	// breaks once pages have reached the caller fails instead, and the
	// caller (the collector's next pass) starts over.
	t.Run("a listing broken after its first pages is not repeated", func(t *testing.T) {
		s, _, c := listingSim(t)
		seen := map[string]int{}
		pages := 0
		err := c.ListPartnerships(context.Background(), exchange.ListOptions{}, func(ps []exchange.Partnership) error {
			pages++
			for _, p := range ps {
				seen[p.Identity]++
			}
			if pages == 2 {
				s.Endpoints()[0].DropShells()
			}
			return nil
		})
		for id, n := range seen {
			if n > 1 {
				t.Fatalf("%s reached the caller %d times", id, n)
			}
		}
		if !errors.Is(err, exchange.ErrTransient) {
			t.Fatalf("got %v, want a transient failure", err)
		}
	})

	t.Run("the caller's own deadline still ends the listing", func(t *testing.T) {
		_, _, c := listingSim(t)
		ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
		defer cancel()
		err := c.ListPartnerships(ctx, exchange.ListOptions{}, func([]exchange.Partnership) error { return nil })
		if !errors.Is(err, exchange.ErrTransient) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v, want a transient error wrapping the caller's context.DeadlineExceeded", err)
		}
	})
}
