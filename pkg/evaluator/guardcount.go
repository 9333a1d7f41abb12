package evaluator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// The blast-radius guard's base, "how many partnerships have mail now", is
// kept by a materialized view of the two buckets that decide it, instead
// of being recounted from every key at each guard decision (O(devices) KV
// round trips per sync pass and per MDM window). BenchmarkGuardCount
// measures both at 100,000 partnerships: 15–40 s for the recount against
// 11–30 ms for the view on a busy two-core machine.
//
// Why a view. A delta counter written beside the record it describes
// drifts when a worker dies between the two writes, and half of the count
// follows a bucket another worker writes (the matcher's partnership index:
// an undecided partnership has mail if Exchange showed it Allowed).
// Keeping the bit in the records and counting JetStream's per-subject
// state instead fails on the same half, and JetStream counts subjects
// under a filter only by listing them or by a consumer's pending count,
// which counts deleted keys' markers too. The view holds no state of its
// own that could disagree with the records: it is a function of the two
// buckets' current values, replayed from JetStream (a KV watcher, last
// value per key, filtered to the organisation's keys) the first time a
// replica counts, then updated by every change in the order the stream
// stored them. Applying a change sets the key's state from its new value,
// so a change seen twice does no harm. Crashes, redeliveries, concurrent
// handlers and several replicas only ever write records; whatever they
// leave is what the view shows. A restart or a lease takeover replays it
// in the replica that judges next.
//
// Why exact. Before it counts, the guard asks the bucket's stream leader
// for the sequence of the last message under the organisation's keys
// (bucket without direct gets, so no lagging follower answers) and waits
// until the view has applied it. Every write acknowledged before the count
// began is then in it, as in a full recount that read each key then;
// writes made meanwhile may or may not be, as they may or may not have
// been in the recount. The leader finds that sequence by matching the
// organisation's subjects in memory: a few milliseconds at 100,000, no
// round trip per key.
//
// Memory. Per partnership that is decided or shown Allowed, its key and
// four bytes of state; per partnership index entry, the keys of its
// Allowed partnerships: about 200 bytes per partnership, ~20 MB at
// 100,000 (BenchmarkGuardCount reports it). No record is kept decoded.
//
// Lifetime. The replica that takes the evaluator lease (whose loop judges
// the MDM windows) replays its view then; any other replica starts one at
// its first guard decision (a sync pass is judged where its
// sync.completed arrives, under the guard lease). Each keeps its view up
// to date from then on, so that its next guard decision waits only for
// the changes since. The view stops with the evaluator's Run, and is
// replaced when it stops or stalls.

// viewStall is how long a count waits for a view that makes no progress
// before it gives the view up: the guard decision fails (and is retried)
// and the next one replays a new view.
const viewStall = 30 * time.Second

// allowedView is the materialized view of one organisation's decisions
// and partnership index that allowedCount reads.
type allowedView struct {
	org  string
	stop context.CancelFunc
	// done is closed when the view's goroutine has returned.
	done chan struct{}
	// streams are the buckets' streams (decisions, partnerships), whose
	// leaders say how far a count must wait (upTo).
	streams [2]jetstream.Stream
	// orgKeys are the filters of the organisation's keys in each.
	orgKeys [2]string

	mu sync.Mutex
	// keys: per decision key, what decides whether it has mail.
	keys map[string]viewKey
	// parts: per partnership index key, the decision keys of the
	// partnerships it shows Allowed (to take them back when it changes).
	parts map[string][]string
	// bad: keys whose value could not be decoded; a count fails while
	// there is one, as the recount did.
	bad map[string]error
	// n is the count: Σ contribution over keys.
	n int
	// seen: the stream sequence of the last change applied, per bucket
	// (decisions, partnerships).
	seen [2]uint64
	// err: the view stopped (its context ended, a watcher closed).
	err error
	// lastApplied is when the view last applied a change; behindSince
	// when a count first found it behind (zero once a count found it
	// caught up): together they tell a stalled view (stalled).
	lastApplied, behindSince time.Time
	// wake is closed at the next change applied, when someone waits.
	wake chan struct{}
}

// viewKey is what the view knows of one decision key.
type viewKey struct {
	// decided: the evaluator has a record of the partnership; counts: that
	// record gives it mail (held, or an Allow that is applied for real and
	// not waiting for the guard).
	decided, counts bool
	// allowedSeen: how many index entries show the partnership Allowed by
	// Exchange when last observed (one at most, in practice).
	allowedSeen uint16
}

// contribution is what a key adds to the count: an undecided partnership
// (out of scope, say) has mail if Exchange showed it Allowed; a decided
// one if its record says so.
func (k viewKey) contribution() int {
	if k.decided {
		if k.counts {
			return 1
		}
		return 0
	}
	return int(k.allowedSeen)
}

// hasMail is the decision record's part of "has mail now": what
// allowedCount counted for a decided partnership before it had a view.
func hasMail(rec *ev.DecisionRecord) bool {
	return rec.GetHeld() || rec.GetDesired() == ev.DesiredAccess_DESIRED_ACCESS_ALLOW && !rec.GetDryRun() && !rec.GetStaged()
}

const (
	bucketDecisions = iota
	bucketParts
)

// startAllowedView replays the organisation's keys of both buckets into a
// new view and keeps it updated until ctx ends.
func startAllowedView(ctx context.Context, js jetstream.JetStream, org bus.Org, decisions, parts jetstream.KeyValue) (*allowedView, error) {
	v := &allowedView{org: string(org), done: make(chan struct{}), keys: map[string]viewKey{}, parts: map[string][]string{}, bad: map[string]error{}}
	for i, kv := range []jetstream.KeyValue{decisions, parts} {
		name := bus.BucketStream(kv.Bucket())
		s, err := js.Stream(ctx, name)
		if err != nil {
			return nil, fmt.Errorf("guard view: %s: %w", name, err)
		}
		if cfg := s.CachedInfo().Config; cfg.AllowDirect && cfg.Replicas > 1 {
			// GetLastMsgForSubject would take the direct get, which a
			// lagging replica may answer.
			return nil, fmt.Errorf("guard view: %s allows direct gets on %d replicas; provision the buckets (bus.Provision)", name, cfg.Replicas)
		}
		v.streams[i], v.orgKeys[i] = s, bus.KeySubject(kv.Bucket(), string(org)+".>")
	}
	ctx, cancel := context.WithCancel(ctx)
	v.stop = cancel
	// A slice each: WatchFiltered rewrites the one it is given in place.
	filter := string(org) + ".>"
	wd, err := decisions.WatchFiltered(ctx, []string{filter})
	if err != nil {
		cancel()
		return nil, fmt.Errorf("guard view: watch %s: %w", decisions.Bucket(), err)
	}
	wp, err := parts.WatchFiltered(ctx, []string{filter})
	if err != nil {
		cancel()
		return nil, fmt.Errorf("guard view: watch %s: %w", parts.Bucket(), err)
	}
	go v.run(ctx, wd, wp)
	return v, nil
}

// run applies the watchers' changes until ctx ends or one stops.
func (v *allowedView) run(ctx context.Context, wd, wp jetstream.KeyWatcher) {
	defer close(v.done)
	dc, pc := wd.Updates(), wp.Updates()
	defer func() {
		// The client's watcher blocks its subscription on a full updates
		// channel, and closes the channel only once that delivery is
		// done: drain both until they close, or the subscription never
		// ends.
		_, _ = wd.Stop(), wp.Stop()
		for _, c := range []<-chan jetstream.KeyValueEntry{dc, pc} {
			go func() {
				for range c {
				}
			}()
		}
	}()
	for {
		var e jetstream.KeyValueEntry
		var ok bool
		bucket := bucketDecisions
		select {
		case <-ctx.Done():
			v.fail(fmt.Errorf("guard view stopped: %w", ctx.Err()))
			return
		case e, ok = <-dc:
		case e, ok = <-pc:
			bucket = bucketParts
		}
		if !ok {
			v.fail(errors.New("guard view: a watcher stopped"))
			return
		}
		if e == nil {
			continue // the end of the replay; the sequences say more
		}
		v.apply(bucket, e)
	}
}

// fail marks the view stopped and wakes whoever waits on it.
func (v *allowedView) fail(err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.err == nil {
		v.err = err
	}
	v.signal()
}

func (v *allowedView) signal() {
	if v.wake != nil {
		close(v.wake)
		v.wake = nil
	}
}

// apply applies one change of a bucket.
func (v *allowedView) apply(bucket int, e jetstream.KeyValueEntry) {
	key := e.Key()
	put := e.Operation() == jetstream.KeyValuePut
	var decErr error
	var counts bool
	var allowed []string
	if put {
		switch bucket {
		case bucketDecisions:
			rec := &ev.DecisionRecord{}
			if decErr = bus.DecodeRecord(e.Value(), rec); decErr == nil {
				counts = hasMail(rec)
			}
		case bucketParts:
			idx := &ev.PartnershipIndex{}
			if decErr = bus.DecodeRecord(e.Value(), idx); decErr == nil {
				allowed = v.allowedOf(idx)
			}
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	bk := [...]string{"decisions|", "partnerships|"}[bucket] + key
	delete(v.bad, bk)
	if decErr != nil {
		v.bad[bk] = fmt.Errorf("guard view: decode %s: %w", key, decErr)
		put = false // counted as gone until a readable value replaces it
	}
	switch bucket {
	case bucketDecisions:
		v.update(key, func(k *viewKey) { k.decided, k.counts = put, put && counts })
	case bucketParts:
		for _, dk := range v.parts[key] {
			v.update(dk, func(k *viewKey) { k.allowedSeen-- })
		}
		delete(v.parts, key)
		if len(allowed) > 0 {
			// A copy: the entry's key is a slice of its whole subject.
			v.parts[strings.Clone(key)] = allowed
		}
		for _, dk := range allowed {
			v.update(dk, func(k *viewKey) { k.allowedSeen++ })
		}
	}
	v.seen[bucket] = max(v.seen[bucket], e.Revision())
	v.lastApplied = time.Now()
	v.signal()
}

// update changes one key's state and the count with it; callers hold mu.
func (v *allowedView) update(dk string, fn func(*viewKey)) {
	k, known := v.keys[dk]
	v.n -= k.contribution()
	fn(&k)
	v.n += k.contribution()
	switch {
	case k == (viewKey{}):
		delete(v.keys, dk)
	case known:
		v.keys[dk] = k
	default:
		// A copy: a watched entry's key is a slice of its whole subject.
		v.keys[strings.Clone(dk)] = k
	}
}

// allowedOf lists the decision keys of the partnerships an index entry
// shows Allowed by Exchange.
func (v *allowedView) allowedOf(idx *ev.PartnershipIndex) []string {
	var out []string
	for id, o := range idx.GetById() {
		p := o.GetPartnership()
		if p.GetDeviceAccessState() != ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED {
			continue
		}
		dk, err := bus.StateKey(bus.Org(v.org), p.GetDeviceId(), id)
		if err != nil {
			continue // not a key the evaluator could have decided on
		}
		out = append(out, dk)
	}
	return out
}

// errViewStalled says a view made no progress towards a count for
// viewStall; it is replaced.
var errViewStalled = errors.New("guard view: no progress")

// count waits until the view has applied the changes up to the given
// stream sequences (of decisions and partnerships), then returns the count.
// It gives up when ctx ends or the view has stalled (see stalled).
func (v *allowedView) count(ctx context.Context, upTo [2]uint64) (int, error) {
	check := time.NewTicker(time.Second)
	defer check.Stop()
	for {
		v.mu.Lock()
		if v.err != nil {
			err := v.err
			v.mu.Unlock()
			return 0, err
		}
		if v.seen[0] >= upTo[0] && v.seen[1] >= upTo[1] {
			v.behindSince = time.Time{}
			n := v.n
			var bad error
			for _, err := range v.bad {
				bad = err
				break
			}
			v.mu.Unlock()
			return n, bad
		}
		now := time.Now()
		if v.behindSince.IsZero() {
			v.behindSince = now
		}
		if v.stalledLocked(now) {
			err := fmt.Errorf("%w for %s (at %v, waiting for %v)", errViewStalled, viewStall, v.seen, upTo)
			v.mu.Unlock()
			return 0, err
		}
		if v.wake == nil {
			v.wake = make(chan struct{})
		}
		wake := v.wake
		v.mu.Unlock()
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-check.C:
		case <-wake:
		}
	}
}

// stalled reports whether a count has been waiting on the view for longer
// than viewStall while the view applied nothing: its watcher is stuck
// (the consumer behind it lost, say). Counts with short deadlines may
// each give up before that; the view remembers, so that the next count
// replaces it.
func (v *allowedView) stalled(now time.Time) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.err != nil || v.stalledLocked(now)
}

func (v *allowedView) stalledLocked(now time.Time) bool {
	return !v.behindSince.IsZero() && now.Sub(v.behindSince) > viewStall && now.Sub(v.lastApplied) > viewStall
}

// reason says why a view is being replaced.
func (v *allowedView) reason() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.err != nil {
		return v.err.Error()
	}
	return fmt.Sprintf("no change applied for %s while a count waited (at %v)", viewStall, v.seen)
}

// size reports how many keys the view holds, for tests and benchmarks.
func (v *allowedView) size() (keys, indexes int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return len(v.keys), len(v.parts)
}

// allowedCount counts the partnerships that have mail now, not counting
// the staged revocations (the caller adds those): the ones easguard
// allowed (or the guard held), and the ones Exchange allowed when last
// seen that easguard has not decided on (out of scope, say). It reads the
// replica's view (see allowedView), started on first use.
func (e *Evaluator) allowedCount(ctx context.Context) (int, error) {
	v, err := e.allowedView(ctx)
	if err != nil {
		return 0, err
	}
	var upTo [2]uint64
	for i, s := range v.streams {
		if upTo[i], err = lastSeq(ctx, s, v.orgKeys[i]); err != nil {
			return 0, err
		}
	}
	return v.count(ctx, upTo)
}

// allowedView returns the replica's view, starting one if there is none
// (or the last one stopped). It lives as long as the evaluator's Run;
// without Run (a test calling a handler alone), as long as ctx.
func (e *Evaluator) allowedView(ctx context.Context) (*allowedView, error) {
	e.viewMu.Lock()
	defer e.viewMu.Unlock()
	if v := e.view; v != nil {
		if !v.stalled(time.Now()) {
			return v, nil
		}
		v.stop()
		e.log.Warn("guard view replaced", "reason", v.reason())
	}
	life := e.life
	if life == nil || life.Err() != nil {
		life = ctx
	}
	v, err := startAllowedView(life, e.js, e.org, e.decisions, e.parts)
	if err != nil {
		return nil, err
	}
	e.view = v
	return v, nil
}

// lastSeq returns the stream sequence of the last message a KV bucket's
// stream holds under a filter of its keys' subjects (bus.KeySubject; 0 if
// none), as the stream's leader knows it. bus.Provision turns direct gets
// off on every replicated bucket (a follower may answer a direct get with
// what it has not caught up on; startAllowedView checks), so the client's
// GetLastMsgForSubject is a STREAM.MSG.GET that the leader answers, or, on
// a bucket of one replica, a direct get that the only server holding it
// answers; both take a wildcard filter.
func lastSeq(ctx context.Context, s jetstream.Stream, filter string) (uint64, error) {
	name := s.CachedInfo().Config.Name
	m, err := s.GetLastMsgForSubject(ctx, filter)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("guard view: last sequence of %s: %w", name, err)
	}
	return m.Sequence, nil
}
