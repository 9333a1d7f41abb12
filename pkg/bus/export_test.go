package bus

import (
	"testing"
	"time"
)

// SetProvisionAttempt shortens one provisioning attempt for a test.
func SetProvisionAttempt(tb testing.TB, d time.Duration) {
	tb.Helper()
	old := provisionAttempt
	provisionAttempt = d
	tb.Cleanup(func() { provisionAttempt = old })
}

// ProvisionRetryable exposes provisionRetryable to the table test.
var ProvisionRetryable = provisionRetryable

// WaitVisible exposes waitVisible to its test.
var WaitVisible = waitVisible
