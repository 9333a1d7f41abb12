package exchange_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// A worker start that outlives StartTimeout is given up at its deadline,
// and whatever the start made on the CAS is deleted, so slow starts can
// never use up the user's shells (MaxShellsPerUser) and lock easguard out.
// Run it with -race: the start and its teardown must not share state
// unguarded. Once the CAS is quick again, the pool starts and works.
func TestAbandonedStartsLeaveNoShell(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stall func(*exchangesim.Endpoint, bool)
	}{
		// The Create is answered only after the start's deadline; the shell
		// exists on the CAS whether or not the client still waits.
		{"create answers late", func(e *exchangesim.Endpoint, on bool) {
			d := time.Duration(0)
			if on {
				d = 3 * time.Second
			}
			e.SetSlowCreate(d)
		}},
		// powershell.exe runs but its ready frame never reaches the client.
		{"ready frame held", (*exchangesim.Endpoint).SetStallReceive},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startSim(t, exchangesim.Config{})
			ep := s.Endpoints()[0]
			cfg := simConfig(t, s)
			cfg.StartTimeout = 500 * time.Millisecond
			tc.stall(ep, true)
			for i := range 4 {
				began := time.Now()
				p, err := exchange.NewPool(context.Background(), cfg, quiet())
				if err == nil {
					p.Close(context.Background())
					t.Fatalf("start %d: a pool started through the stall", i)
				}
				if !errors.Is(err, exchange.ErrUnreachable) {
					t.Fatalf("start %d: %v, want ErrUnreachable", i, err)
				}
				if took := time.Since(began); took > cfg.StartTimeout+2*time.Second {
					t.Fatalf("start %d: gave up after %s with a start timeout of %s", i, took, cfg.StartTimeout)
				}
			}
			// Once the CAS has finished every request of the abandoned
			// starts (the late Creates included), none of their shells is left.
			eventually(t, 30*time.Second, "the CAS idle with no shell of the abandoned starts", func() bool {
				return ep.InFlight() == 0 && ep.Shells(exchangesim.DefaultUser) == 0
			})
			tc.stall(ep, false)
			cfg.StartTimeout = 30 * time.Second
			p := newPool(t, cfg)
			if _, err := exchange.NewClient(p, cfg).Servers(context.Background()); err != nil {
				t.Fatalf("after the stall: %v", err)
			}
			p.Close(context.Background())
			eventually(t, 30*time.Second, "the pool's shells deleted on close", func() bool {
				return ep.Shells(exchangesim.DefaultUser) == 0
			})
		})
	}
}
