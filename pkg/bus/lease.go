package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrLeaseTTL is returned when the lease bucket has no TTL, so a lease
// could never expire and a crashed holder would keep its duty forever.
var ErrLeaseTTL = errors.New("lease bucket has no TTL")

// Lease elects one holder per duty and org among replicas: the active
// collector, the org-settings enforcer. It follows the renewable-lease
// pattern: Create the key in a bucket whose TTL is the lease TTL, Update it
// with the last revision every TTL/3 (an unanswered update again every
// TTL/8, each with its own short deadline), and count the lease as lost
// when an update is refused by another holder's write or when no update
// has succeeded for most of a TTL. The
// holder gives up before the key can expire on the server, so two holders
// never overlap; a standby watches the key and takes over as soon as it
// expires.
type Lease struct {
	kv     jetstream.KeyValue
	key    string
	holder string
	ttl    time.Duration
	log    *slog.Logger

	held atomic.Bool
	// tenures counts the acquisitions so far (Tenure).
	tenures atomic.Uint64
	mu      sync.Mutex
	hold    Hold
}

// leaseRecord is the value of a lease key: who holds it, for operators.
type leaseRecord struct {
	Holder     string    `json:"holder"`
	AcquiredAt time.Time `json:"acquired_at"`
	RenewedAt  time.Time `json:"renewed_at"`
}

// NewLease prepares a lease on duty for org, held under the name holder
// (unique per replica, e.g. hostname and pid). The key TTL is the bucket's
// (see Topology.LeaseKeyTTL).
func NewLease(ctx context.Context, kv jetstream.KeyValue, duty string, org Org, holder string, log *slog.Logger) (*Lease, error) {
	if _, err := ParseOrg(string(org)); err != nil {
		return nil, fmt.Errorf("new lease %s: %w", duty, err)
	}
	if duty == "" || holder == "" {
		return nil, errors.New("new lease: duty and holder must not be empty")
	}
	st, err := kv.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("new lease %s/%s: bucket status: %w", duty, org, err)
	}
	if st.TTL() <= 0 {
		return nil, fmt.Errorf("new lease %s/%s: %w", duty, org, ErrLeaseTTL)
	}
	if log == nil {
		log = slog.Default()
	}
	key := duty + "." + string(org)
	return &Lease{kv: kv, key: key, holder: holder, ttl: st.TTL(), log: log.With("lease", key, "holder", holder)}, nil
}

// Held reports whether this replica holds the lease now.
func (l *Lease) Held() bool { return l.held.Load() }

// Tenure reports whether this replica holds the lease now and which of
// its tenures this is (1 for the first acquisition, 2 after it was lost
// and taken again, and so on). A holder that acts later on something it
// claimed under the lease checks first that the tenure is still the one it
// claimed under: while the lease was lost, another replica may have taken
// its claims over, even if the lease is held again now.
func (l *Lease) Tenure() (n uint64, held bool) {
	// held first: a tenure is counted before it is marked held, so a loss
	// and a new acquisition between the two loads read as the new tenure,
	// never as the old one held.
	held = l.held.Load()
	return l.tenures.Load(), held
}

// KeyTTL returns how long the lease key lives after its last renewal.
func (l *Lease) KeyTTL() time.Duration { return l.ttl }

// Holder returns the name of the current holder as recorded in the bucket,
// or "" when nobody holds the lease.
func (l *Lease) Holder(ctx context.Context) (string, error) {
	e, err := l.kv.Get(ctx, l.key)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("lease %s holder: %w", l.key, err)
	}
	var rec leaseRecord
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		return "", fmt.Errorf("lease %s holder: %w", l.key, err)
	}
	return rec.Holder, nil
}

// leaseWatchTimeout bounds Run's attempts to set up its watch, as
// EASGUARD_BIND_TIMEOUT's default bounds binding consumers.
var leaseWatchTimeout = time.Minute

// Run campaigns for the lease until ctx is cancelled. Each time it is
// acquired, lead runs with a context that is cancelled the moment the lease
// is lost; Run waits for lead to return before campaigning again. On exit
// Run releases the lease so a standby takes over at once. If lead returns
// on its own, Run releases the lease and returns.
//
// Setting up the watch is retried for up to leaseWatchTimeout: a cluster
// that has just formed (every container started at once) may not answer
// for its bucket yet, and that must not stop the process; one that
// still does not answer then does, with the reason.
func (l *Lease) Run(ctx context.Context, lead func(ctx context.Context)) error {
	var w jetstream.KeyWatcher
	bo := backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(leaseWatchTimeout))
	err := backoff.RetryNotify(func() error {
		var err error
		w, err = l.kv.Watch(ctx, l.key, jetstream.UpdatesOnly())
		return err
	}, backoff.WithContext(bo, ctx), func(err error, d time.Duration) {
		l.log.Warn("lease watch not set up; retrying", "error", err, "retry_in", d)
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("lease %s: watch: %w", l.key, err)
	}
	defer func() { _ = w.Stop() }()
	for {
		acquired, err := l.acquire(ctx)
		if err != nil {
			l.log.Warn("acquire", "error", err)
		}
		if acquired {
			if l.lead(ctx, lead) {
				l.release()
				return nil
			}
			continue
		}
		// Wait for the key to go (expiry marker or release), or poll: a
		// watch can miss an event across a reconnect.
		t := time.NewTimer(l.ttl / 4)
	wait:
		for {
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
				break wait
			case e := <-w.Updates():
				if e != nil && (e.Operation() == jetstream.KeyValueDelete || e.Operation() == jetstream.KeyValuePurge) {
					t.Stop()
					break wait
				}
			}
		}
	}
}

// acquire tries to create the key.
func (l *Lease) acquire(ctx context.Context) (bool, error) {
	now := time.Now()
	val, _ := json.Marshal(leaseRecord{Holder: l.holder, AcquiredAt: now, RenewedAt: now})
	actx, cancel := context.WithTimeout(ctx, l.ttl/3)
	defer cancel()
	rev, err := l.kv.Create(actx, l.key, val)
	if errors.Is(err, jetstream.ErrKeyExists) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("lease %s: create: %w", l.key, err)
	}
	l.mu.Lock()
	l.hold = Hold{Rev: rev, Sent: now}
	l.mu.Unlock()
	l.tenures.Add(1)
	l.held.Store(true)
	l.log.Info("lease acquired", "ttl", l.ttl)
	return true, nil
}

// lead runs the duty while renewing; it returns true when Run should stop
// (ctx cancelled or lead returned on its own) and false when the lease was
// lost.
//
// A renewal that goes unanswered (the bucket's leader died and another is
// being elected) is made again about every TTL/8 until the deadline, each
// attempt with its own short deadline (RenewHold).
func (l *Lease) lead(ctx context.Context, lead func(ctx context.Context)) (stop bool) {
	lctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		lead(lctx)
	}()
	l.mu.Lock()
	hold := l.hold
	l.mu.Unlock()
	acquiredAt := hold.Sent
	// Give up a little before the server could expire the key: the key
	// lives TTL after the server stored our last update, which is after we
	// sent it, so a standby can only get it after we stopped leading.
	deadline := func() time.Time { return hold.Sent.Add(l.ttl - l.ttl/5) }
	// Renew a third of the TTL after the last stored write, and every
	// TTL/8 while that is overdue (a renewal unanswered, or one adopted).
	next := func() time.Duration { return max(l.ttl/8, time.Until(hold.Sent.Add(l.ttl/3))) }
	renew := time.NewTimer(next())
	defer renew.Stop()
	expire := time.NewTimer(time.Until(deadline()))
	defer expire.Stop()
	for {
		select {
		case <-ctx.Done():
			cancel()
			<-done
			return true
		case <-done:
			cancel()
			return true
		case <-expire.C:
			l.lost(cancel, done, "no renewal succeeded within the TTL")
			return false
		case <-renew.C:
		}
		val, _ := json.Marshal(leaseRecord{Holder: l.holder, AcquiredAt: acquiredAt, RenewedAt: time.Now()})
		var err error
		hold, err = RenewHold(ctx, l.kv, l.key, val, hold, min(l.ttl/12, time.Until(deadline())), l.ours)
		l.mu.Lock()
		l.hold = hold
		l.mu.Unlock()
		switch {
		case err == nil:
			expire.Reset(time.Until(deadline()))
		case errors.Is(err, ErrHoldLost):
			l.lost(cancel, done, "the key changed under us: "+err.Error())
			return false
		case ctx.Err() != nil:
			// Shutting down; the next turn of the loop returns.
		case !time.Now().Before(deadline()):
			l.lost(cancel, done, "renewal failed until the deadline: "+err.Error())
			return false
		default:
			l.log.Warn("lease renewal failed; retrying", "error", err)
		}
		renew.Reset(next())
	}
}

func (l *Lease) lost(cancel context.CancelFunc, done <-chan struct{}, why string) {
	l.held.Store(false)
	cancel()
	<-done
	l.log.Warn("lease lost", "reason", why)
}

// release deletes the key if it is still ours, so a standby need not wait
// for the TTL.
func (l *Lease) release() {
	if !l.held.Swap(false) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.ttl/3)
	defer cancel()
	l.mu.Lock()
	rev := l.hold.Rev
	l.mu.Unlock()
	err := l.kv.Delete(ctx, l.key, jetstream.LastRevision(rev))
	if err != nil {
		// A renewal this shutdown cancelled may have been stored all the
		// same, under a revision this holder never learnt: if the key is
		// still ours, it is released at the revision it has.
		if e, gerr := l.kv.Get(ctx, l.key); gerr == nil && e.Revision() != rev && l.ours(e.Value()) {
			err = l.kv.Delete(ctx, l.key, jetstream.LastRevision(e.Revision()))
		}
	}
	if err != nil {
		l.log.Warn("lease release failed; it expires on its own", "error", err)
		return
	}
	l.log.Info("lease released")
}

// ours reports whether a lease record names this holder.
func (l *Lease) ours(v []byte) bool {
	var rec leaseRecord
	return json.Unmarshal(v, &rec) == nil && rec.Holder == l.holder
}

// LeaseHolder is who holds one duty of an organisation, for operators: the
// console shows which replica is the active collector, MDM poller or
// guard, and since when.
type LeaseHolder struct {
	Duty       string    `json:"duty"`
	Holder     string    `json:"holder"`
	AcquiredAt time.Time `json:"acquired_at"`
	RenewedAt  time.Time `json:"renewed_at"`
}

// Holders lists the live leases of org, by duty.
func Holders(ctx context.Context, kv jetstream.KeyValue, org Org) ([]LeaseHolder, error) {
	l, err := kv.ListKeys(ctx)
	if err != nil {
		if errors.Is(err, jetstream.ErrNoKeysFound) {
			return nil, nil
		}
		return nil, fmt.Errorf("list leases: %w", err)
	}
	var out []LeaseHolder
	for k := range l.Keys() {
		duty, ok := strings.CutSuffix(k, "."+string(org))
		if !ok {
			continue
		}
		e, err := kv.Get(ctx, k)
		if err != nil {
			continue // expired meanwhile
		}
		var rec leaseRecord
		if json.Unmarshal(e.Value(), &rec) != nil {
			continue
		}
		out = append(out, LeaseHolder{Duty: duty, Holder: rec.Holder, AcquiredAt: rec.AcquiredAt, RenewedAt: rec.RenewedAt})
	}
	slices.SortFunc(out, func(a, b LeaseHolder) int { return strings.Compare(a.Duty, b.Duty) })
	return out, nil
}
