package budget_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/budget"
	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
)

// oneSlot starts a process holding the one slot of a budget of one,
// through a natstest.FaultyKV, and returns it with the bucket's key TTL.
func oneSlot(t *testing.T, lease time.Duration) (*budget.Slots, *natstest.FaultyKV, jetstream.KeyValue, time.Duration) {
	t.Helper()
	s := serverWithTTL(t, lease)
	_, js := natstest.Connect(t, s)
	kv, err := js.KeyValue(natstest.Context(t), bus.BucketLeases)
	if err != nil {
		t.Fatal(err)
	}
	st, err := kv.Status(natstest.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	f := natstest.NewFaultyKV(kv)
	slots, err := budget.New(natstest.Context(t), f, duty, org, 1, "a", quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(slots.Close)
	if got := acquire(t, slots, 1); got != 1 {
		t.Fatal("the slot of an empty budget was not taken")
	}
	return slots, f, kv, st.TTL()
}

func noneLost(t *testing.T, s *budget.Slots) {
	t.Helper()
	select {
	case <-s.Lost():
		t.Fatal("the slot was counted lost")
	default:
	}
	if s.Held() != 1 {
		t.Fatalf("holds %d slots, want 1", s.Held())
	}
}

// A slot outlives renewals that go unanswered while the bucket elects a
// leader, as long as its key cannot have expired; it is lost, before the
// key could expire, when none is answered in time, and at once when the
// bucket refuses one. Before, the first unanswered renewal lost the slot,
// the pool closed its session, and the key (still this process's) kept the
// pool from taking a slot again until it expired: executor batches
// stalled for up to their deadline after a NATS node was killed.
func TestRenewal(t *testing.T) {
	t.Run("unanswered renewals within the slot's life keep it", func(t *testing.T) {
		// A longer lease (a key TTL of 4.8s: renewed 1.6s after a write,
		// unanswered attempts of 0.4s every 0.6s, the end at 4s) leaves
		// room for an answer after two unanswered attempts on a busy
		// machine.
		slots, f, _, _ := oneSlot(t, 6*time.Second)
		f.Set(natstest.Unanswered)
		natstest.Eventually(t, 10*time.Second, "two unanswered renewals", func() bool { return f.Count(natstest.Unanswered, false) >= 2 })
		noneLost(t, slots)
		f.Set(natstest.Answered)
		natstest.Eventually(t, 10*time.Second, "a renewal answered again", func() bool { return f.Count(natstest.Answered, false) >= 1 })
		noneLost(t, slots)
	})
	t.Run("a slot none of whose renewals is answered is lost before its key can expire", func(t *testing.T) {
		slots, f, _, ttl := oneSlot(t, leaseTTL)
		f.Set(natstest.Unanswered)
		select {
		case <-slots.Lost():
		case <-time.After(10 * ttl):
			t.Fatalf("the slot was not lost within %s of unanswered renewals", 10*ttl)
		}
		since := f.SinceStored()
		t.Logf("lost %s after the last acknowledged write was sent (key TTL %s)", since.Round(time.Millisecond), ttl)
		if since >= ttl {
			t.Errorf("lost %s after the last acknowledged write, when its key (TTL %s) may have expired and been taken", since, ttl)
		}
		if slots.Held() != 0 {
			t.Errorf("holds %d slots after losing its only one", slots.Held())
		}
	})
	t.Run("a renewal whose reply was lost keeps the slot at the revision it wrote", func(t *testing.T) {
		slots, f, _, _ := oneSlot(t, leaseTTL)
		f.Set(natstest.ReplyLost)
		natstest.Eventually(t, 10*time.Second, "a renewal stored without its reply", func() bool { return f.Count(natstest.ReplyLost, false) >= 1 })
		f.Set(natstest.Answered)
		natstest.Eventually(t, 10*time.Second, "a renewal answered after the refused one", func() bool {
			return f.Count(natstest.Answered, true) >= 1 && f.Count(natstest.Answered, false) >= 1
		})
		noneLost(t, slots)
	})
	t.Run("a key written by someone else loses the slot at once", func(t *testing.T) {
		slots, _, kv, ttl := oneSlot(t, leaseTTL)
		if _, err := kv.Put(natstest.Context(t), duty+"."+string(org)+".0", []byte("b")); err != nil {
			t.Fatal(err)
		}
		took := time.Now()
		select {
		case <-slots.Lost():
		case <-time.After(10 * ttl):
			t.Fatal("a slot whose key another process wrote was not lost")
		}
		if d := time.Since(took); d > ttl {
			t.Errorf("lost %s after the key was taken, more than its TTL %s", d, ttl)
		}
	})
	t.Run("an unanswered acquire returns well before the caller's deadline", func(t *testing.T) {
		slots, f, _, ttl := oneSlot(t, leaseTTL)
		slots.Release()
		f.Set(natstest.Unanswered)
		ctx, cancel := context.WithTimeout(natstest.Context(t), time.Minute)
		defer cancel()
		start := time.Now()
		ok, err := slots.Acquire(ctx)
		took := time.Since(start)
		if ok || !bus.Unanswered(err) {
			t.Fatalf("Acquire with no answer = %v, %v, want an unanswered error", ok, err)
		}
		if took > ttl {
			t.Errorf("Acquire waited %s for an answer, more than the key TTL %s", took, ttl)
		}
	})
}
