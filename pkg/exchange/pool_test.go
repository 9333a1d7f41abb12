package exchange_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
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
