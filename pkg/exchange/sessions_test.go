package exchange_test

import (
	"context"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// After an app-pool recycle every worker's Exchange session is broken. The
// script reports it (instead of letting an implicit-remoting proxy prompt
// for credentials), the pool retires the worker with bye and runs the
// request on a new one: the next decision is applied within seconds and
// nothing is lost; the heartbeat retires the idle ones too.
func TestRecycledSessionsAreReplaced(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	for _, a := range []string{"alice", "bob"} {
		if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: a}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: a, DeviceID: "Phone" + a, DeviceType: "iPhone"}); err != nil {
			t.Fatal(err)
		}
	}
	cfg := simConfig(t, s)
	cfg.Heartbeat = 300 * time.Millisecond
	p := newPool(t, cfg)
	c := exchange.NewClient(p, cfg)
	ctx := context.Background()
	apply := func(mailbox string, access exchange.Access) {
		t.Helper()
		start := time.Now()
		res, err := c.ApplyAccess(ctx, []exchange.Change{{Mailbox: mailbox, DeviceID: "Phone" + mailbox, Access: access}})
		if err != nil || res[0].Err != nil {
			t.Fatalf("apply %s to %s: %v %+v", access, mailbox, err, res)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Fatalf("apply took %s", d)
		}
	}
	apply("alice", exchange.AccessAllow)
	if n := s.Endpoints()[0].Recycle(); n == 0 {
		t.Fatal("no session to break")
	}
	apply("bob", exchange.AccessBlock) // the next decision
	for mb, want := range map[string]string{"alice": "allowed", "bob": "blocked"} {
		allowed, blocked, err := s.Org.Lists(mb)
		if err != nil {
			t.Fatal(err)
		}
		if got := map[bool]string{true: "allowed", false: "blocked"}[len(allowed) == 1]; (len(allowed)+len(blocked) != 1) || got != want {
			t.Fatalf("%s: allowed %v blocked %v, want %s", mb, allowed, blocked, want)
		}
	}
	// The broken sessions are gone (the server dropped them), and the idle
	// workers that held them are found by the heartbeat and replaced: no
	// request fails on them any more.
	eventually(t, 10*time.Second, "the heartbeat to retire the broken idle workers", func() bool {
		_, _, err := c.Invoke(ctx, exchange.Call{Cmdlet: "Get-ActiveSyncOrganizationSettings"})
		return err == nil && s.RemoteSessions(exchangesim.DefaultUser) <= cfg.Workers
	})
}

// Workers killed again and again never exhaust Exchange's 18 sessions per
// user. A worker killed at a request's deadline has its input closed, so
// its script leaves its loop and removes its session before the shell is
// deleted; no session is left behind (the idle timeout is real time here,
// so none could expire during the test).
func TestKilledWorkersNeverExhaustSessions(t *testing.T) {
	// Reading the org settings takes 2 s here, past the request deadline:
	// every such request kills a worker in the middle of a cmdlet.
	// Get-Command costs nothing and shows the pool still works.
	s := startSim(t, exchangesim.Config{Profile: exchangesim.Profile{MaxShellsPerUser: 30, CmdletRead: 2 * time.Second}})
	cfg := simConfig(t, s)
	cfg.RequestTimeout = 700 * time.Millisecond
	p := newPool(t, cfg)
	c := exchange.NewClient(p, cfg)
	user := exchangesim.DefaultUser
	for round := range 24 {
		ctx, cancel := context.WithTimeout(context.Background(), 3*cfg.RequestTimeout)
		if _, _, err := c.Invoke(ctx, exchange.Call{Cmdlet: "Get-ActiveSyncOrganizationSettings"}); err == nil {
			t.Fatalf("round %d: a request past its deadline succeeded", round)
		}
		cancel()
		ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
		if _, _, err := c.Invoke(ctx, exchange.Call{Cmdlet: "Get-Command"}); err != nil {
			t.Fatalf("round %d: %v (sessions %d, refused %d)", round, err, s.RemoteSessions(user), s.RefusedRemoteSessions(user))
		}
		cancel()
		if n := s.RefusedRemoteSessions(user); n > 0 {
			t.Fatalf("round %d: %d sessions refused: the account hit Exchange's limit (%d held)", round, n, s.RemoteSessions(user))
		}
	}
	eventually(t, 30*time.Second, "the killed workers' sessions to be removed", func() bool { return s.RemoteSessions(user) <= cfg.Workers })
	if peak := s.PeakRemoteSessions(user); peak > cfg.Workers+3 {
		t.Fatalf("peak %d sessions for %d workers", peak, cfg.Workers)
	}
	t.Logf("24 workers killed mid-cmdlet; peak %d remote sessions for %d workers", s.PeakRemoteSessions(user), cfg.Workers)
}

// Sessions of workers the server kills (their shells dropped, so no script
// code runs any more) stay behind, and expire after the two-minute idle
// timeout the script asks for (scaled here so that it passes in 2.4 s)
// instead of the two-hour default.
func TestLeakedSessionsExpire(t *testing.T) {
	s := startSim(t, exchangesim.Config{SessionTimeScale: 0.02})
	cfg := simConfig(t, s)
	p := newPool(t, cfg)
	c := exchange.NewClient(p, cfg)
	ep := s.Endpoints()[0]
	user := exchangesim.DefaultUser
	for round := range 3 {
		ep.DropShells()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		// Four at once, so the pool runs (and the server kills) all its workers.
		errs := make(chan error, cfg.Workers)
		for range cfg.Workers {
			go func() {
				_, _, err := c.Invoke(ctx, exchange.Call{Cmdlet: "Get-ActiveSyncOrganizationSettings"})
				errs <- err
			}()
		}
		for range cfg.Workers {
			if err := <-errs; err != nil {
				t.Fatalf("round %d: %v (sessions %d)", round, err, s.RemoteSessions(user))
			}
		}
		cancel()
	}
	if n := s.RefusedRemoteSessions(user); n > 0 {
		t.Fatalf("%d sessions refused (peak %d)", n, s.PeakRemoteSessions(user))
	}
	if n := s.RemoteSessions(user); n <= cfg.Workers {
		t.Fatalf("only %d sessions held after the server killed three rounds of workers: none left behind?", n)
	}
	eventually(t, 15*time.Second, "leaked sessions to expire", func() bool { return s.RemoteSessions(user) <= cfg.Workers })
	t.Logf("three drops of every worker; peak %d remote sessions", s.PeakRemoteSessions(user))
}
