package exchangesim

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
)

// StartTest starts a simulator for one test or benchmark and closes it
// when it ends. The zero Profile means TestProfile (no latency, Exchange's
// limits), and Receive long-polls are capped at 2 s so idle polls stay short.
func StartTest(tb testing.TB, cfg Config) *Sim {
	tb.Helper()
	if cfg.Profile == (Profile{}) {
		cfg.Profile = TestProfile()
	}
	if cfg.MaxOperationTimeout == 0 {
		cfg.MaxOperationTimeout = 2 * time.Second
	}
	s, err := Start(cfg)
	if err != nil {
		tb.Fatalf("start Exchange simulator: %v", err)
	}
	tb.Cleanup(s.Close)
	return s
}

// ExchangeConfig returns easguard's Exchange settings for this simulator:
// the primary CAS, name-resolution overrides to the loopback endpoints (the
// FQDNs do not resolve), the service account, the CA bundle over HTTPS,
// NTLM (sealed over HTTP, so it works against a simulator with default
// settings, which refuses unencrypted bodies), and short timeouts suited to
// tests.
func (s *Sim) ExchangeConfig(tb testing.TB) exchange.Config {
	tb.Helper()
	resolve := map[string]string{}
	for _, ep := range s.Endpoints() {
		resolve[ep.FQDN] = ep.Addr()
	}
	https := strings.HasPrefix(s.Endpoints()[0].URL(), "https")
	cfg := exchange.Config{
		Server: s.Endpoints()[0].FQDN, Port: 5985, HTTPS: https, Auth: "ntlm", User: DefaultUser,
		Password: config.Secret(DefaultPassword), Proxy: "none", Resolve: exchange.ResolveString(resolve),
		Mode: "remote", PowershellURL: "http://{server}/PowerShell/", PowershellAuth: "Kerberos",
		Workers: 4, RequestTimeout: 2 * time.Minute, OperationTimeout: 2 * time.Second, StartTimeout: 30 * time.Second,
		Heartbeat: time.Minute, RecycleRequests: 10000, RecycleAfter: time.Hour, CASFailover: true, BatchSize: 100,
	}
	if https {
		cfg.Port = 5986
		ca := filepath.Join(tb.TempDir(), "exchange-ca.pem")
		if err := os.WriteFile(ca, s.CertPEM, 0o600); err != nil {
			tb.Fatal(err)
		}
		cfg.CABundle = ca
	}
	return cfg
}

// Env returns the EASGUARD_EXCHANGE_* settings that reach this simulator,
// as NAME=value lines, for a separate easguard process: the primary CAS,
// name-resolution overrides for every CAS (the FQDNs do not resolve; the
// endpoints listen on loopback ports), and the account. caFile is the PEM
// file of CertPEM, needed over HTTPS.
func (s *Sim) Env(user, password, caFile string) []string {
	var resolve []string
	for _, e := range s.Endpoints() {
		addr := e.Addr()
		if s.cfg.PublicHost != "" {
			_, port, _ := net.SplitHostPort(addr)
			addr = net.JoinHostPort(s.cfg.PublicHost, port)
		}
		resolve = append(resolve, e.FQDN+"="+addr)
	}
	https := strings.HasPrefix(s.Endpoints()[0].URL(), "https")
	port := "5985"
	if https {
		port = "5986"
	}
	lines := []string{
		"EASGUARD_EXCHANGE_SERVER=" + s.Endpoints()[0].FQDN,
		"EASGUARD_EXCHANGE_PORT=" + port,
		fmt.Sprintf("EASGUARD_EXCHANGE_HTTPS=%v", https),
		"EASGUARD_EXCHANGE_RESOLVE=" + strings.Join(resolve, ","),
		"EASGUARD_EXCHANGE_USER=" + user,
		"EASGUARD_EXCHANGE_PASSWORD=" + password,
		"EASGUARD_EXCHANGE_PROXY=none",
	}
	if caFile != "" {
		lines = append(lines, "EASGUARD_EXCHANGE_CA_BUNDLE="+caFile)
	}
	return lines
}
