package telemetrytest

import (
	"syscall"
	"testing"
	"time"
)

// ProcessCPU is the CPU time, user and system, this process has used so
// far. Benchmarks take it before and after what they time, because the
// elapsed time of a loop leaves out the goroutines it sets to work (an
// embedded NATS server's, a simulator's, a decoder's) and counts the time
// the machine gave to something else.
func ProcessCPU(tb testing.TB) time.Duration {
	tb.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatalf("CPU time of this process: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
