package exchange_test

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// simConfig returns pool settings that reach a simulator's CAS endpoints
// through name-resolution overrides, as a lab with split DNS would.
func simConfig(t testing.TB, s *exchangesim.Sim) exchange.Config {
	t.Helper()
	resolve := map[string]string{}
	https := false
	for _, ep := range s.Endpoints() {
		resolve[ep.FQDN] = ep.Addr()
		https = strings.HasPrefix(ep.URL(), "https")
	}
	cfg := exchange.Config{
		Server: s.Endpoints()[0].FQDN, Port: 5985, HTTPS: https, Auth: "ntlm", User: exchangesim.DefaultUser,
		Password: config.Secret(exchangesim.DefaultPassword), Proxy: "none", Resolve: exchange.ResolveString(resolve),
		Mode: "remote", PowershellURL: "http://{server}/PowerShell/", PowershellAuth: "Kerberos",
		Workers: 4, RequestTimeout: 2 * time.Minute, OperationTimeout: 2 * time.Second, StartTimeout: 30 * time.Second,
		Heartbeat: time.Minute, RecycleRequests: 10000, RecycleAfter: time.Hour, CASFailover: true, BatchSize: 100,
	}
	if https {
		cfg.Port = 5986
		ca := filepath.Join(t.TempDir(), "ca.pem")
		if err := os.WriteFile(ca, s.CertPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg.CABundle = ca
	}
	return cfg
}

func startSim(t testing.TB, cfg exchangesim.Config) *exchangesim.Sim {
	t.Helper()
	if cfg.Profile == (exchangesim.Profile{}) {
		cfg.Profile = exchangesim.TestProfile()
	}
	if cfg.MaxOperationTimeout == 0 {
		cfg.MaxOperationTimeout = 2 * time.Second
	}
	s, err := exchangesim.Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
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
