package natstest

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
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
// given, and has acknowledged, every message the stream holds. Runners
// publish a handler's outputs before they acknowledge its input, so after
// it everything the workers will publish about those messages is out: a
// test asserts that something did not happen only after it.
func WaitDrained(tb testing.TB, js jetstream.JetStream, timeout time.Duration, streams ...string) {
	tb.Helper()
	ctx := Context(tb)
	for _, stream := range streams {
		Eventually(tb, timeout, "consumers of "+stream+" drained", func() bool {
			s, err := js.Stream(ctx, stream)
			if err != nil {
				return false
			}
			lister := s.ListConsumers(ctx)
			for ci := range lister.Info() {
				// NumPending is computed from the stream as it is now,
				// so a message just stored counts.
				if ci.Config.Durable != "" && (ci.NumPending > 0 || ci.NumAckPending > 0) {
					return false
				}
			}
			return lister.Err() == nil
		})
	}
}
