package intunesim

import (
	"os"
	"path/filepath"
	"testing"
)

// StartTest starts a simulator for one test or benchmark and closes it
// when it ends.
func StartTest(tb testing.TB, cfg Config) *Sim {
	tb.Helper()
	s, err := Start(cfg)
	if err != nil {
		tb.Fatalf("start Intune simulator: %v", err)
	}
	tb.Cleanup(s.Close)
	return s
}

// CAFile writes CertPEM to a file in the test's temporary directory and
// returns its path (for EASGUARD_MDM_GRAPH_CA_BUNDLE).
func (s *Sim) CAFile(tb testing.TB) string {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "intunesim-ca.pem")
	if err := os.WriteFile(path, s.CertPEM, 0o600); err != nil {
		tb.Fatal(err)
	}
	return path
}
