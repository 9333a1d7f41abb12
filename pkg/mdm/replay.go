package mdm

import (
	"context"
	"sync"
	"time"
)

// ReplayStore remembers webhook event ids for a while, so that a captured
// request cannot be sent again to re-assert an old device state. A store
// shared by several easguard replicas and kept beyond a restart
// (KVReplayStore) makes the protection hold across them; each method must
// be atomic.
type ReplayStore interface {
	// Seen records id for ttl and reports whether it was already recorded.
	Seen(ctx context.Context, id string, ttl time.Duration) (bool, error)
	// Forget removes id, so that a delivery whose processing failed after
	// Seen recorded it is accepted when the sender retries.
	Forget(ctx context.Context, id string) error
}

// MemoryReplayStore is the default ReplayStore: event ids in memory, each
// expiring after its ttl. It protects one process only, and only until it
// restarts.
type MemoryReplayStore struct {
	now func() time.Time

	mu      sync.Mutex
	expires map[string]time.Time
	// sweepAt is when expired entries are next dropped; sweeping at most
	// once per shortest ttl keeps Seen O(1) amortised.
	sweepAt time.Time
}

// NewMemoryReplayStore returns an empty store; now may be nil for the wall
// clock (tests pass their own).
func NewMemoryReplayStore(now func() time.Time) *MemoryReplayStore {
	if now == nil {
		now = time.Now
	}
	return &MemoryReplayStore{now: now, expires: map[string]time.Time{}}
}

// Seen records id until now+ttl and reports whether an unexpired record of
// it existed.
func (s *MemoryReplayStore) Seen(_ context.Context, id string, ttl time.Duration) (bool, error) {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if !now.Before(s.sweepAt) {
		for k, exp := range s.expires {
			if !now.Before(exp) {
				delete(s.expires, k)
			}
		}
		s.sweepAt = now.Add(ttl)
	}
	if exp, ok := s.expires[id]; ok && now.Before(exp) {
		return true, nil
	}
	s.expires[id] = now.Add(ttl)
	return false, nil
}

// Forget removes id.
func (s *MemoryReplayStore) Forget(_ context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.expires, id)
	return nil
}
