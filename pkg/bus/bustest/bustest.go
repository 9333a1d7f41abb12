// Package bustest runs a worker's bus.Runner for the length of a test, the
// way the worker binaries run it, so that every worker's tests start,
// await and stop their runner alike.
package bustest

import (
	"context"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
)

// readyTimeout bounds the wait for a runner's consumers: provisioning and
// binding take well under a second, even with -race on two cores.
const readyTimeout = 10 * time.Second

// Run runs r until the test ends and returns once it is ready. A runner
// that stops before the test ends, or that reports an error when it is
// stopped (drained) at the end, fails the test: a worker must not die
// quietly under a test that then only sees nothing happen.
func Run(tb testing.TB, r *bus.Runner) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("runner stopped with: %v", err)
		}
	})
	natstest.Eventually(tb, readyTimeout, "runner ready", func() bool {
		select {
		case err := <-done:
			done <- err // for the cleanup
			tb.Fatalf("runner stopped before the test ended: %v", err)
		default:
		}
		return r.Ready() == nil
	})
}
