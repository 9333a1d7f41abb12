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
// within the TTL.
//
// A renewal that goes unanswered (the bucket's leader died and another is
// being elected) is made again until the slot's own life ends: the key
// lives at least a TTL from when the last acknowledged write was sent, so
// the process keeps using the slot until a margin before that and counts
// it lost then, before anyone else can take it. Losing a slot at the first
// unanswered renewal would close Exchange sessions at every NATS leader
// change, and the pool could not take them back until the keys expired.
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
	held map[int]bus.Hold
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
		log: log.With("budget", duty, "total", total), held: map[int]bus.Hold{}, lost: make(chan struct{}, total), stop: make(chan struct{}),
	}
	s.wg.Add(1)
	go s.renew()
	return s, nil
}

// end is when a slot is counted lost if no renewal has been acknowledged
// since sent: a margin of a sixth of the TTL before the key could expire,
// for the time the pool takes to close the slot's session and for clocks
// of the bucket's replicas that run ahead of its leader's.
func (s *Slots) end(h bus.Hold) time.Time { return h.Sent.Add(s.ttl - s.ttl/6) }

// renewAfter is how long after its last acknowledged write a slot is
// renewed: a third of the TTL, which leaves half of it (until end) for
// renewals that go unanswered while the bucket elects a leader.
func (s *Slots) renewAfter() time.Duration { return s.ttl / 3 }

// attempt bounds one request to the bucket: a twelfth of the TTL (1s for
// the default 12s), far beyond a healthy bucket's milliseconds. Without it
// a request sent to a leader that died waits for the caller's deadline (an
// executor batch's is minutes away), as the reply never comes; with it an
// unanswered renewal is made again about every 1.5s (attempt and tick),
// four times before the slot's end, so an election of up to ~9s (NATS's
// longest election timeout) costs no slot.
func (s *Slots) attempt() time.Duration { return s.ttl / 12 }

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
	for j := range free {
		i := free[(off+j)%len(free)]
		sent := time.Now()
		actx, cancel := context.WithTimeout(ctx, s.attempt())
		rev, err := s.kv.Create(actx, s.key(i), []byte(s.holder))
		cancel()
		switch {
		case err == nil:
			s.mu.Lock()
			s.held[i] = bus.Hold{Rev: rev, Sent: sent}
			s.mu.Unlock()
			return true, nil
		case errors.Is(err, jetstream.ErrKeyExists):
			s.log.Debug("slot held elsewhere", "slot", i, "error", err)
		default:
			// The bucket did not answer or refused: the other slots would
			// fare no better, and the caller asks again later. A create
			// that landed unanswered holds its slot until the key expires.
			return false, fmt.Errorf("budget: acquire slot %d: %w", i, err)
		}
	}
	return false, nil
}

// Release gives one held slot back at once.
func (s *Slots) Release() {
	s.mu.Lock()
	i, rev, ok := -1, uint64(0), false
	for k, h := range s.held {
		if k > i {
			i, rev, ok = k, h.Rev, true
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

// renew updates each held key a third of the TTL after its last
// acknowledged write. A renewal that fails without a refusal (no answer, a
// lost connection) is made again at the next tick until the slot's end; a
// refusal (the key changed or vanished) loses the slot at once, unless the
// key holds what one of this process's unanswered writes put there.
func (s *Slots) renew() {
	defer s.wg.Done()
	t := time.NewTicker(max(s.ttl/24, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		s.mu.Lock()
		due := map[int]bus.Hold{}
		for i, h := range s.held {
			if time.Since(h.Sent) >= s.renewAfter() {
				due[i] = h
			}
		}
		s.mu.Unlock()
		for i, h := range due {
			s.renewSlot(i, h)
		}
	}
}

// renewSlot makes one renewal of slot i, last acknowledged as h.
func (s *Slots) renewSlot(i int, h bus.Hold) {
	next, keep, err := h, true, error(nil)
	if left := time.Until(s.end(h)); left <= 0 {
		keep, err = false, fmt.Errorf("no renewal acknowledged for %s", time.Since(h.Sent).Round(time.Millisecond))
	} else {
		next, err = bus.RenewHold(context.Background(), s.kv, s.key(i), []byte(s.holder), h, min(s.attempt(), left),
			func(v []byte) bool { return string(v) == s.holder })
		keep = !errors.Is(err, bus.ErrHoldLost)
	}
	s.mu.Lock()
	cur, still := s.held[i]
	if !still || cur != h {
		s.mu.Unlock()
		return // released meanwhile
	}
	if keep {
		s.held[i] = next
	} else {
		delete(s.held, i)
	}
	s.mu.Unlock()
	switch {
	case !keep:
		s.log.Warn("session slot lost: could not renew it", "slot", i, "error", err)
		select {
		case s.lost <- struct{}{}:
		default:
		}
	case err != nil:
		s.log.Info("session slot renewal unanswered; trying again", "slot", i, "until", s.end(h).Format(time.RFC3339Nano), "error", err)
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
