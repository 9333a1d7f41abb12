package natstest

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Fault is what happens to a write sent through a FaultyKV.
type Fault int

const (
	// Answered: the write goes to the bucket as it is.
	Answered Fault = iota
	// Unanswered: the write never reaches a leader (it died, another is
	// being elected) and waits for its deadline, as nats.go does.
	Unanswered
	// ReplyLost: the write is stored but its reply is lost; the request
	// then ends as an unanswered one does.
	ReplyLost
)

// FaultyKV is a real bucket whose writes (Create and Update) go
// unanswered, or lose their replies, on demand, whose next reads (Get)
// may go unanswered, and whose next watches may find no responders: what
// a client of a replicated bucket sees while its leader is replaced, or
// while its cluster is still forming. It stands in for the loss of a
// reply, never for the bucket.
type FaultyKV struct {
	jetstream.KeyValue

	mu        sync.Mutex
	fault     Fault
	writes    []Write
	lastSent  time.Time
	lostReads int
	refused   int
}

// Write is one write made through a FaultyKV: the fault it met and what
// the caller got.
type Write struct {
	Fault Fault
	Err   error
}

// NewFaultyKV wraps kv, answering every write until Set says otherwise.
func NewFaultyKV(kv jetstream.KeyValue) *FaultyKV { return &FaultyKV{KeyValue: kv} }

// Set makes the following writes meet x.
func (f *FaultyKV) Set(x Fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fault = x
}

func (f *FaultyKV) current() Fault {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fault
}

// UnanswerReads makes the next n reads (Get) go unanswered; later ones
// are the bucket's.
func (f *FaultyKV) UnanswerReads(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lostReads = n
}

// Get reads key, unless the read is one UnanswerReads said to lose.
func (f *FaultyKV) Get(ctx context.Context, key string) (jetstream.KeyValueEntry, error) {
	if f.take(&f.lostReads) {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return f.KeyValue.Get(ctx, key)
}

// RefuseWatches makes the next n watches fail with no responders, as a
// bucket of a cluster still forming answers; later ones are the bucket's.
func (f *FaultyKV) RefuseWatches(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refused = n
}

// WatchesRefused returns how many of the watches RefuseWatches asked for
// are still to be refused.
func (f *FaultyKV) WatchesRefused() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.refused
}

// Watch watches key, unless the watch is one RefuseWatches said to refuse.
func (f *FaultyKV) Watch(ctx context.Context, key string, opts ...jetstream.WatchOpt) (jetstream.KeyWatcher, error) {
	if f.take(&f.refused) {
		return nil, nats.ErrNoResponders
	}
	return f.KeyValue.Watch(ctx, key, opts...)
}

// take uses up one of the faults a counter (lostReads, refused) has left,
// and reports whether there was one.
func (f *FaultyKV) take(left *int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if *left == 0 {
		return false
	}
	*left--
	return true
}

// Count returns how many writes met x and were (refused true) or were not
// (refused false) refused by the bucket with an API error.
func (f *FaultyKV) Count(x Fault, refused bool) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, w := range f.writes {
		var api *jetstream.APIError
		if w.Fault == x && refused == errors.As(w.Err, &api) {
			n++
		}
	}
	return n
}

// SinceStored returns how long ago the last write the bucket stored was
// sent: its key lives at least the bucket's TTL from then.
func (f *FaultyKV) SinceStored() time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return time.Since(f.lastSent)
}

// write runs one write under the current fault.
func (f *FaultyKV) write(ctx context.Context, do func(ctx context.Context) (uint64, error)) (uint64, error) {
	x := f.current()
	sent := time.Now()
	var (
		rev uint64
		err error
	)
	switch x {
	case Unanswered:
		<-ctx.Done()
		err = ctx.Err()
	default:
		rev, err = do(ctx)
		if err == nil {
			f.mu.Lock()
			f.lastSent = sent
			f.mu.Unlock()
			if x == ReplyLost {
				rev, err = 0, context.DeadlineExceeded
			}
		}
	}
	f.mu.Lock()
	f.writes = append(f.writes, Write{Fault: x, Err: err})
	f.mu.Unlock()
	return rev, err
}

// Create creates key under the current fault.
func (f *FaultyKV) Create(ctx context.Context, key string, value []byte, opts ...jetstream.KVCreateOpt) (uint64, error) {
	return f.write(ctx, func(ctx context.Context) (uint64, error) { return f.KeyValue.Create(ctx, key, value, opts...) })
}

// Update updates key under the current fault.
func (f *FaultyKV) Update(ctx context.Context, key string, value []byte, last uint64) (uint64, error) {
	return f.write(ctx, func(ctx context.Context) (uint64, error) { return f.KeyValue.Update(ctx, key, value, last) })
}
