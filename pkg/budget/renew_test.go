package budget_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/budget"
	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
)

// fault is what happens to a request to the bucket.
type fault int

const (
	answered fault = iota
	// unanswered: the request never reaches a leader (it died, another is
	// being elected) and waits for its deadline, as nats.go does.
	unanswered
	// replyLost: the write is stored but its reply is lost, then the
	// request ends as unanswered ones do.
	replyLost
)

// faultyKV is the real lease bucket with replies lost on demand: what a
// client sees while the bucket's leader is replaced.
type faultyKV struct {
	jetstream.KeyValue

	mu       sync.Mutex
	fault    fault
	creates  int
	updates  []update
	lastSent time.Time // when the last acknowledged write was sent
}

type update struct {
	fault fault
	err   error
}

func (f *faultyKV) set(x fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fault = x
}

func (f *faultyKV) current() fault {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fault
}

// count returns how many updates met fault x (and, with refused, were
// refused by the bucket).
func (f *faultyKV) count(x fault, refused bool) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, u := range f.updates {
		var api *jetstream.APIError
		if u.fault == x && refused == errors.As(u.err, &api) {
			n++
		}
	}
	return n
}

func (f *faultyKV) since() time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return time.Since(f.lastSent)
}

func (f *faultyKV) Create(ctx context.Context, key string, value []byte, opts ...jetstream.KVCreateOpt) (uint64, error) {
	f.mu.Lock()
	f.creates++
	f.mu.Unlock()
	if f.current() == unanswered {
		<-ctx.Done()
		return 0, ctx.Err()
	}
	sent := time.Now()
	rev, err := f.KeyValue.Create(ctx, key, value, opts...)
	if err == nil {
		f.mu.Lock()
		f.lastSent = sent
		f.mu.Unlock()
	}
	return rev, err
}

func (f *faultyKV) Update(ctx context.Context, key string, value []byte, last uint64) (uint64, error) {
	x := f.current()
	var (
		rev uint64
		err error
	)
	sent := time.Now()
	switch x {
	case unanswered:
		<-ctx.Done()
		err = ctx.Err()
	case replyLost:
		if _, err = f.KeyValue.Update(ctx, key, value, last); err == nil {
			f.mu.Lock()
			f.lastSent = sent
			f.mu.Unlock()
			err = context.DeadlineExceeded
		}
	default:
		if rev, err = f.KeyValue.Update(ctx, key, value, last); err == nil {
			f.mu.Lock()
			f.lastSent = sent
			f.mu.Unlock()
		}
	}
	f.mu.Lock()
	f.updates = append(f.updates, update{fault: x, err: err})
	f.mu.Unlock()
	return rev, err
}

// oneSlot starts a process holding the one slot of a budget of one,
// through a faultyKV, and returns it with the bucket's key TTL.
func oneSlot(t *testing.T, lease time.Duration) (*budget.Slots, *faultyKV, jetstream.KeyValue, time.Duration) {
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
	f := &faultyKV{KeyValue: kv}
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
		f.set(unanswered)
		natstest.Eventually(t, 10*time.Second, "two unanswered renewals", func() bool { return f.count(unanswered, false) >= 2 })
		noneLost(t, slots)
		f.set(answered)
		natstest.Eventually(t, 10*time.Second, "a renewal answered again", func() bool { return f.count(answered, false) >= 1 })
		noneLost(t, slots)
	})
	t.Run("a slot none of whose renewals is answered is lost before its key can expire", func(t *testing.T) {
		slots, f, _, ttl := oneSlot(t, leaseTTL)
		f.set(unanswered)
		select {
		case <-slots.Lost():
		case <-time.After(10 * ttl):
			t.Fatalf("the slot was not lost within %s of unanswered renewals", 10*ttl)
		}
		since := f.since()
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
		f.set(replyLost)
		natstest.Eventually(t, 10*time.Second, "a renewal stored without its reply", func() bool { return f.count(replyLost, false) >= 1 })
		f.set(answered)
		natstest.Eventually(t, 10*time.Second, "a renewal answered after the refused one", func() bool {
			return f.count(answered, true) >= 1 && f.count(answered, false) >= 1
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
		f.set(unanswered)
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
