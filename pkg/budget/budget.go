// Package budget shares a fixed number of slots among every process of an
// organisation through JetStream KV: the Exchange session budget. Exchange
// allows a user 18 concurrent remote PowerShell sessions, and every
// collector and executor replica opens sessions as the same service
// account, so a per-process limit cannot keep their sum under it; a budget
// held in the bus can.
//
// Each slot is one key, <duty>.<org>.<n> for n below the total, in the
// lease bucket, whose TTL makes a key vanish when its holder stops
// renewing it. A process takes a slot by creating its key, keeps it by
// updating the key with the last revision well within the TTL, and gives
// it back by deleting it. A crashed process's slots therefore return
// within the TTL, and a process that cannot renew a slot (a partition, a
// slow bus) counts it lost at once, before anyone else can take it.
package budget

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
)

// ErrNoTTL is returned when the bucket has no TTL: a slot of a crashed
// process would never come back.
var ErrNoTTL = errors.New("budget bucket has no TTL")

// Slots is this process's share of one organisation's budget.
type Slots struct {
	kv     jetstream.KeyValue
	prefix string
	total  int
	holder string
	ttl    time.Duration
	log    *slog.Logger

	mu   sync.Mutex
	held map[int]uint64 // slot → revision of our last write
	lost chan struct{}

	stop chan struct{}
	wg   sync.WaitGroup
	once sync.Once
}

// New prepares a budget of total slots for duty and org in kv (the lease
// bucket: its TTL is the time a crashed holder's slots take to return).
// holder names this process in the keys, for operators.
func New(ctx context.Context, kv jetstream.KeyValue, duty string, org bus.Org, total int, holder string, log *slog.Logger) (*Slots, error) {
	if _, err := bus.ParseOrg(string(org)); err != nil {
		return nil, fmt.Errorf("budget %s: %w", duty, err)
	}
	if total < 1 || duty == "" || holder == "" {
		return nil, fmt.Errorf("budget %s: total must be positive and duty and holder set", duty)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("budget %s/%s: bucket status: %w", duty, org, err)
	}
	if st.TTL() <= 0 {
		return nil, fmt.Errorf("budget %s/%s: %w", duty, org, ErrNoTTL)
	}
	if log == nil {
		log = slog.Default()
	}
	s := &Slots{
		kv: kv, prefix: duty + "." + string(org) + ".", total: total, holder: holder, ttl: st.TTL(),
		log: log.With("budget", duty, "total", total), held: map[int]uint64{}, lost: make(chan struct{}, total), stop: make(chan struct{}),
	}
	s.wg.Add(1)
	go s.renew()
	return s, nil
}

// Total returns the size of the whole budget.
func (s *Slots) Total() int { return s.total }

// Held returns how many slots this process holds.
func (s *Slots) Held() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.held)
}

// Lost receives one value for every slot this process could not renew
// and no longer holds; the user of the slots must give up one session for
// each.
func (s *Slots) Lost() <-chan struct{} { return s.lost }

func (s *Slots) key(i int) string { return s.prefix + strconv.Itoa(i) }

// Acquire takes one more slot. It returns false, and no error, when every
// slot is held (by this process or others).
func (s *Slots) Acquire(ctx context.Context) (bool, error) {
	s.mu.Lock()
	var free []int
	for i := range s.total {
		if _, mine := s.held[i]; !mine {
			free = append(free, i)
		}
	}
	s.mu.Unlock()
	// Start at a random slot, so processes do not all fight over slot 0.
	off := 0
	if len(free) > 0 {
		off = rand.IntN(len(free))
	}
	var errs []error
	for j := range free {
		i := free[(off+j)%len(free)]
		rev, err := s.kv.Create(ctx, s.key(i), []byte(s.holder))
		switch {
		case err == nil:
			s.mu.Lock()
			s.held[i] = rev
			s.mu.Unlock()
			return true, nil
		case errors.Is(err, jetstream.ErrKeyExists):
			s.log.Debug("slot held elsewhere", "slot", i, "error", err)
		default:
			errs = append(errs, err)
		}
		if ctx.Err() != nil {
			break
		}
	}
	if err := errors.Join(errs...); err != nil {
		return false, fmt.Errorf("budget: acquire a slot: %w", err)
	}
	return false, nil
}

// Release gives one held slot back at once.
func (s *Slots) Release() {
	s.mu.Lock()
	i, rev, ok := -1, uint64(0), false
	for k, r := range s.held {
		if k > i {
			i, rev, ok = k, r, true
		}
	}
	if ok {
		delete(s.held, i)
	}
	s.mu.Unlock()
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.kv.Delete(ctx, s.key(i), jetstream.LastRevision(rev)); err != nil {
		s.log.Debug("slot not deleted; it expires", "slot", i, "error", err)
	}
}

// renew updates every held key every third of the TTL. A refused or failed
// update loses the slot at once: by the time it could be retried the key
// may have expired and been taken by another process.
func (s *Slots) renew() {
	defer s.wg.Done()
	t := time.NewTicker(s.ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		s.mu.Lock()
		held := make(map[int]uint64, len(s.held))
		for i, r := range s.held {
			held[i] = r
		}
		s.mu.Unlock()
		for i, rev := range held {
			ctx, cancel := context.WithTimeout(context.Background(), s.ttl/3)
			nrev, err := s.kv.Update(ctx, s.key(i), []byte(s.holder), rev)
			cancel()
			s.mu.Lock()
			if cur, still := s.held[i]; still && cur == rev {
				if err == nil {
					s.held[i] = nrev
				} else {
					delete(s.held, i)
				}
			} else {
				err = nil // released meanwhile
			}
			s.mu.Unlock()
			if err != nil {
				s.log.Warn("session slot lost: could not renew it", "slot", i, "error", err)
				select {
				case s.lost <- struct{}{}:
				default:
				}
			}
		}
	}
}

// Close stops renewing and gives every held slot back.
func (s *Slots) Close() {
	s.once.Do(func() {
		close(s.stop)
		s.wg.Wait()
		for s.Held() > 0 {
			s.Release()
		}
	})
}
