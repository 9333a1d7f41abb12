package natstest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	"github.com/easguard/easguard/pkg/bus"
)

// Watch feeds every message of stream that matches filter, from the first,
// decoded as T, to fn, through an ordered consumer that stops when the
// test ends. Tests use it to see what a worker published; messages that do
// not decode as T are skipped.
func Watch[T any, PT interface {
	*T
	proto.Message
}](tb testing.TB, js jetstream.JetStream, stream, filter string, fn func(PT)) {
	tb.Helper()
	c, err := js.OrderedConsumer(Context(tb), stream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{filter}})
	if err != nil {
		tb.Fatalf("watch %s %s: %v", stream, filter, err)
	}
	cc, err := c.Consume(func(msg jetstream.Msg) {
		m := PT(new(T))
		if proto.Unmarshal(msg.Data(), m) == nil {
			fn(m)
		}
	})
	if err != nil {
		tb.Fatalf("watch %s %s: %v", stream, filter, err)
	}
	tb.Cleanup(cc.Stop)
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
