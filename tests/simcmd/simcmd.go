// Package simcmd is what the simulators' commands (smtpsim, intunesim)
// share: the process around a run function, and the test side that drives
// that function in-process — start it, read its JSON start line, stop it,
// and check that bad flags are refused.
package simcmd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RunFunc is a command's main without the process: it serves until ctx
// ends and returns the exit code (2 for bad usage), so a test can run it
// in-process. It prints one JSON line on stdout once it serves.
type RunFunc func(ctx context.Context, args []string, stdout, stderr io.Writer) int

// Main runs run as the process: until SIGINT or SIGTERM, as the demo
// script stops it, then exits with its code.
func Main(run RunFunc) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// Running is a run function serving in a test.
type Running struct {
	cancel context.CancelFunc
	exit   chan int
	stderr *LockedBuffer
}

// Start runs run with args until Stop or the end of the test, and decodes
// its start line into start.
func Start(tb testing.TB, run RunFunc, start any, args ...string) *Running {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(cancel)
	outR, outW := io.Pipe()
	r := &Running{cancel: cancel, exit: make(chan int, 1), stderr: &LockedBuffer{}}
	go func() {
		code := run(ctx, args, outW, r.stderr)
		outW.Close()
		r.exit <- code
	}()
	line, err := bufio.NewReader(outR).ReadString('\n')
	if err != nil {
		tb.Fatalf("no start line: %v (stderr: %s)", err, r.stderr.String())
	}
	go io.Copy(io.Discard, outR) //nolint:errcheck // drain until run returns
	if err := json.Unmarshal([]byte(line), start); err != nil {
		tb.Fatalf("start line %q: %v", line, err)
	}
	return r
}

// Stop cancels the run and fails the test unless it returns 0 promptly.
func (r *Running) Stop(tb testing.TB) {
	tb.Helper()
	r.cancel()
	select {
	case code := <-r.exit:
		if code != 0 {
			tb.Fatalf("exit %d, stderr: %s", code, r.stderr.String())
		}
	case <-time.After(10 * time.Second):
		tb.Fatal("run did not return after cancel")
	}
}

// BadFlags is a command line the command must refuse, and what its
// message must say.
type BadFlags struct {
	Name string
	Args []string
	Want string
}

// CheckBadFlags runs each command line: exit 2, the message on stderr,
// nothing on stdout (no start line: the command never served).
func CheckBadFlags(t *testing.T, run RunFunc, cases []BadFlags) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.Name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(context.Background(), tc.Args, &stdout, &stderr); code != 2 {
				t.Errorf("exit %d, want 2", code)
			}
			if !strings.Contains(stderr.String(), tc.Want) || stdout.Len() != 0 {
				t.Errorf("stderr %q lacks %q (stdout %q)", stderr.String(), tc.Want, stdout.String())
			}
		})
	}
}

// LockedBuffer is a buffer one goroutine writes while another reads it:
// a command's stderr while the test may print it.
type LockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p.
func (l *LockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String returns everything written so far.
func (l *LockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
