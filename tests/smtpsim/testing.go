package smtpsim

import "testing"

// StartTest starts a relay for one test or benchmark and closes it when
// the test ends, so a test cannot leak a listener into the next one.
func StartTest(tb testing.TB, cfg Config) *Server {
	tb.Helper()
	s, err := Start(cfg)
	if err != nil {
		tb.Fatalf("start SMTP simulator: %v", err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("close SMTP simulator: %v", err)
		}
	})
	return s
}
