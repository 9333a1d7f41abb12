// Package natstest starts a real JetStream server for a test. It never
// skips: a test that cannot start its server fails, because a silently
// skipped integration test is a test that cannot fail.
package natstest

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/natsembed"
)

// Server starts an in-process JetStream server with its store in a
// temporary directory; it is shut down when the test ends.
func Server(tb testing.TB) *natsembed.Server {
	tb.Helper()
	s, err := natsembed.Start(natsembed.Options{StoreDir: tb.TempDir()})
	if err != nil {
		tb.Fatalf("start embedded NATS: %v", err)
	}
	tb.Cleanup(s.Shutdown)
	return s
}

// Connect opens an in-process connection that is closed when the test
// ends; opts are added to it, as a worker's own connection options are
// (bus.SyncQueueLen, say), for a test or benchmark that must see what a
// worker's connection does.
func Connect(tb testing.TB, s *natsembed.Server, opts ...nats.Option) (*nats.Conn, jetstream.JetStream) {
	tb.Helper()
	nc, err := s.Connect(tb.Name(), opts...)
	if err != nil {
		tb.Fatalf("connect: %v", err)
	}
	tb.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		tb.Fatalf("jetstream: %v", err)
	}
	return nc, js
}

// Start starts a server and connects to it.
func Start(tb testing.TB) (*natsembed.Server, *nats.Conn, jetstream.JetStream) {
	tb.Helper()
	s := Server(tb)
	nc, js := Connect(tb, s)
	return s, nc, js
}

// Eventually polls cond until it returns true or the deadline passes. Tests
// wait for a state this way, never with a sleep.
func Eventually(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		<-tick.C
	}
}

// Context returns a context cancelled when the test ends.
func Context(tb testing.TB) context.Context {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(cancel)
	return ctx
}
