package natstest

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Receive keeps messages in stream order, skips what does not decode, and
// Await and AwaitLen see what arrives after they were called.
func TestReceive(t *testing.T) {
	_, _, js := Start(t)
	ctx := Context(t)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}}); err != nil {
		t.Fatal(err)
	}
	got := ReceiveFunc(t, js, "S", "s.a.>", func(m jetstream.Msg) (string, bool) {
		return string(m.Data()), string(m.Data()) != "skip"
	})
	for _, p := range []struct{ subj, data string }{{"s.a.1", "one"}, {"s.b", "other"}, {"s.a.2", "skip"}, {"s.a.3", "two"}} {
		if _, err := js.Publish(ctx, p.subj, []byte(p.data)); err != nil {
			t.Fatal(err)
		}
	}
	if all := got.AwaitLen(t, 5*time.Second, 2); len(all) != 2 || all[0] != "one" || all[1] != "two" {
		t.Fatalf("received %q, want [one two]", all)
	}
	if _, err := js.Publish(ctx, "s.a.4", []byte("three")); err != nil {
		t.Fatal(err)
	}
	if v := got.Await(t, 5*time.Second, "three", func(s string) bool { return s == "three" }); v != "three" || got.Len() != 3 {
		t.Fatalf("await: %q, %d received", v, got.Len())
	}
}
