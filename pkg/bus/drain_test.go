package bus_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
)

// Drained must not take a consumer that has not yet been given the newest
// message for it as drained, whatever its lazily counted NumPending says,
// and must not wait for messages its filter does not match.
func TestDrained(t *testing.T) {
	_, _, js := natstest.Start(t)
	ctx := natstest.Context(t)
	s, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		cfg  jetstream.ConsumerConfig
		mine []string // of s.a.1, s.b, s.c: the subjects the consumer is given
	}{
		{"one filter", jetstream.ConsumerConfig{Durable: "one", FilterSubject: "s.a.>"}, []string{"s.a.1"}},
		{"two filters", jetstream.ConsumerConfig{Durable: "two", FilterSubjects: []string{"s.a.>", "s.c"}}, []string{"s.a.1", "s.c"}},
		{"no filter", jetstream.ConsumerConfig{Durable: "all"}, []string{"s.a.1", "s.b", "s.c"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.AckPolicy = jetstream.AckExplicitPolicy
			c, err := s.CreateOrUpdateConsumer(ctx, tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			drained := func(want bool, when string) {
				t.Helper()
				ci, err := c.Info(ctx)
				if err != nil {
					t.Fatal(err)
				}
				got, err := bus.Drained(ctx, s, ci)
				if err != nil {
					t.Fatal(err)
				}
				if got != want {
					t.Fatalf("%s: drained %v, want %v (%+v)", when, got, want, ci)
				}
			}
			publish := func(subj string) {
				t.Helper()
				if _, err := js.Publish(ctx, subj, []byte(subj)); err != nil {
					t.Fatal(err)
				}
			}
			t.Cleanup(func() {
				_ = s.DeleteConsumer(context.Background(), tc.cfg.Durable)
				_ = s.Purge(context.Background())
			})
			drained(true, "a new consumer of an empty stream")
			for _, subj := range []string{"s.a.1", "s.b", "s.c"} {
				publish(subj)
				drained(!slices.Contains(tc.mine, subj), "just after "+subj+" was stored")
				want := 0
				if slices.Contains(tc.mine, subj) {
					want = 1
				}
				consumeAll(t, c, want)
				drained(true, "after "+subj+" was handled")
			}
		})
	}
}

// consumeAll fetches and acknowledges the want messages just published
// for c. A message is counted into the consumer's pending set from a queue
// of the server's own, after the publish was acknowledged, so a fetch right
// after the publish may find nothing yet: it fetches until all arrived.
func consumeAll(tb testing.TB, c jetstream.Consumer, want int) {
	tb.Helper()
	ctx := natstest.Context(tb)
	deadline := time.Now().Add(10 * time.Second)
	got := 0
	for {
		b, err := c.FetchNoWait(100)
		if err != nil {
			tb.Fatal(err)
		}
		for m := range b.Messages() {
			if err := m.DoubleAck(ctx); err != nil {
				tb.Fatal(err)
			}
			got++
		}
		if err := b.Error(); err != nil {
			tb.Fatal(err)
		}
		switch {
		case got > want:
			tb.Fatalf("fetched %d messages, want %d", got, want)
		case got == want:
			return
		case time.Now().After(deadline):
			tb.Fatalf("fetched %d of %d messages within 10s", got, want)
		}
	}
}
