package natstest

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	"github.com/easguard/easguard/pkg/bus"
)

// Message is a protobuf message type T behind its pointer PT, the way
// the generated code defines them.
type Message[T any] interface {
	*T
	proto.Message
}

// Observe feeds every message of stream that matches filter, from the
// first, to fn, through an ordered consumer that stops when the test ends.
// Tests use it to see what really reached a stream.
func Observe(tb testing.TB, js jetstream.JetStream, stream, filter string, fn func(jetstream.Msg)) {
	tb.Helper()
	c, err := js.OrderedConsumer(Context(tb), stream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{filter}})
	if err != nil {
		tb.Fatalf("observe %s %s: %v", stream, filter, err)
	}
	cc, err := c.Consume(fn)
	if err != nil {
		tb.Fatalf("observe %s %s: %v", stream, filter, err)
	}
	tb.Cleanup(cc.Stop)
}

// Watch is Observe with every message decoded as T; messages that do not
// decode are skipped.
func Watch[T any, PT Message[T]](tb testing.TB, js jetstream.JetStream, stream, filter string, fn func(PT)) {
	tb.Helper()
	Observe(tb, js, stream, filter, func(msg jetstream.Msg) {
		m := PT(new(T))
		if proto.Unmarshal(msg.Data(), m) == nil {
			fn(m)
		}
	})
}

// Received is what a Receive has been given so far, in stream order. It
// is safe for concurrent use: the consumer adds while the test reads.
type Received[T any] struct {
	mu    sync.Mutex
	items []T
}

// All returns a copy of everything received so far.
func (r *Received[T]) All() []T {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.items)
}

// Len returns how many items were received so far.
func (r *Received[T]) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.items)
}

// Await waits until an item that match accepts has been received and
// returns the first such.
func (r *Received[T]) Await(tb testing.TB, timeout time.Duration, what string, match func(T) bool) T {
	tb.Helper()
	var got T
	Eventually(tb, timeout, what, func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		i := slices.IndexFunc(r.items, match)
		if i >= 0 {
			got = r.items[i]
		}
		return i >= 0
	})
	return got
}

// AwaitLen waits until at least n items have been received and returns
// all received by then.
func (r *Received[T]) AwaitLen(tb testing.TB, timeout time.Duration, n int) []T {
	tb.Helper()
	Eventually(tb, timeout, fmt.Sprintf("%d messages received", n), func() bool { return r.Len() >= n })
	return r.All()
}

// ReceiveFunc keeps every message of stream that matches filter as decode
// turns it into a T; a message decode refuses is skipped.
func ReceiveFunc[T any](tb testing.TB, js jetstream.JetStream, stream, filter string, decode func(jetstream.Msg) (T, bool)) *Received[T] {
	tb.Helper()
	r := &Received[T]{}
	Observe(tb, js, stream, filter, func(msg jetstream.Msg) {
		if v, ok := decode(msg); ok {
			r.mu.Lock()
			r.items = append(r.items, v)
			r.mu.Unlock()
		}
	})
	return r
}

// Receive keeps every message of stream that matches filter, decoded as T.
func Receive[T any, PT Message[T]](tb testing.TB, js jetstream.JetStream, stream, filter string) *Received[PT] {
	tb.Helper()
	return ReceiveFunc(tb, js, stream, filter, func(msg jetstream.Msg) (PT, bool) {
		m := PT(new(T))
		return m, proto.Unmarshal(msg.Data(), m) == nil
	})
}

// WaitDrained waits until every durable consumer of each stream has been
// given, and has acknowledged, every message the stream holds for it (see
// bus.Drained). Runners publish a handler's outputs before they
// acknowledge its input, so after it everything the workers will publish
// about those messages is out: a test asserts that something did not
// happen only after it.
func WaitDrained(tb testing.TB, js jetstream.JetStream, timeout time.Duration, streams ...string) {
	tb.Helper()
	ctx := Context(tb)
	for _, stream := range streams {
		Eventually(tb, timeout, "consumers of "+stream+" drained", func() bool {
			ok, err := drained(ctx, js, stream)
			return err == nil && ok
		})
	}
}

// drained reports whether every durable consumer of stream is drained.
func drained(ctx context.Context, js jetstream.JetStream, stream string) (bool, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return false, fmt.Errorf("stream %s: %w", stream, err)
	}
	lister := s.ListConsumers(ctx)
	for ci := range lister.Info() {
		if ci.Config.Durable == "" {
			continue
		}
		if ok, err := bus.Drained(ctx, s, ci); err != nil || !ok {
			return false, err
		}
	}
	if err := lister.Err(); err != nil {
		return false, fmt.Errorf("consumers of %s: %w", stream, err)
	}
	return true, nil
}

// Redeliveries counts how often the durable consumer of stream delivered
// a message again: every delivery takes a consumer sequence number, every
// first delivery also a stream one. NumRedelivered would count only the
// redelivered messages still unacknowledged. It suits a consumer that is
// given every message of the stream.
func Redeliveries(tb testing.TB, js jetstream.JetStream, stream, durable string) int {
	tb.Helper()
	ctx := Context(tb)
	c, err := js.Consumer(ctx, stream, durable)
	if err != nil {
		tb.Fatalf("consumer %s of %s: %v", durable, stream, err)
	}
	ci, err := c.Info(ctx)
	if err != nil {
		tb.Fatalf("consumer %s of %s: %v", durable, stream, err)
	}
	return int(ci.Delivered.Consumer) - int(ci.Delivered.Stream)
}
