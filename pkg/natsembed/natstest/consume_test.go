package natstest

import (
	"context"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
)

// drained must not take a consumer that has not yet been given the newest
// message for a drained one, whatever its lazily counted NumPending says,
// and must ignore messages its filter does not match.
func TestDrained(t *testing.T) {
	_, _, js := Start(t)
	ctx := Context(t)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		cfg  jetstream.ConsumerConfig
	}{
		{"one filter", jetstream.ConsumerConfig{Durable: "one", FilterSubject: "s.a.>", AckPolicy: jetstream.AckExplicitPolicy}},
		{"two filters", jetstream.ConsumerConfig{Durable: "two", FilterSubjects: []string{"s.a.>", "s.c"}, AckPolicy: jetstream.AckExplicitPolicy}},
		{"no filter", jetstream.ConsumerConfig{Durable: "all", AckPolicy: jetstream.AckExplicitPolicy}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := js.CreateOrUpdateConsumer(ctx, "S", tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = js.DeleteConsumer(context.Background(), "S", tc.cfg.Durable) })
			consumeAll(t, c) // whatever earlier cases left
			mustDrained(t, js, true)

			for _, subj := range []string{"s.a.1", "s.b", "s.c"} {
				if _, err := js.Publish(ctx, subj, []byte(subj)); err != nil {
					t.Fatal(err)
				}
			}
			last, err := lastStored(ctx, mustStream(t, js), tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]uint64{"one": 1, "two": 3, "all": 3}[tc.cfg.Durable]
			if base := mustStream(t, js).CachedInfo().State.LastSeq - 3; last != base+want {
				t.Fatalf("last stored for %v: %d, want %d", tc.cfg, last, base+want)
			}
			mustDrained(t, js, false)
			consumeAll(t, c)
			mustDrained(t, js, true)
		})
	}
}

func mustStream(tb testing.TB, js jetstream.JetStream) jetstream.Stream {
	tb.Helper()
	s, err := js.Stream(Context(tb), "S")
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

func mustDrained(tb testing.TB, js jetstream.JetStream, want bool) {
	tb.Helper()
	got, err := drained(Context(tb), js, "S")
	if err != nil {
		tb.Fatal(err)
	}
	if got != want {
		tb.Fatalf("drained: %v, want %v", got, want)
	}
}

// consumeAll fetches and acknowledges everything c has for it.
func consumeAll(tb testing.TB, c jetstream.Consumer) {
	tb.Helper()
	for {
		b, err := c.FetchNoWait(100)
		if err != nil {
			tb.Fatal(err)
		}
		n := 0
		for m := range b.Messages() {
			if err := m.DoubleAck(Context(tb)); err != nil {
				tb.Fatal(err)
			}
			n++
		}
		if err := b.Error(); err != nil {
			tb.Fatal(err)
		}
		if n == 0 {
			return
		}
	}
}
