// Package executor applies access decisions on Exchange. Decisions that
// arrive together are coalesced into one batch (one Set-CASMailbox per
// mailbox, many mailboxes per round trip); a decision older than one
// already applied to the same partnership is superseded, not applied; and
// applying a decision again after a redelivery changes nothing, because
// easguard's writes only add and remove list entries.
package executor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Config configures the executor.
type Config struct {
	Window   time.Duration `split_words:"true" default:"50ms" desc:"Decisions arriving within this window are applied together in one batch."`
	MaxBatch int           `split_words:"true" default:"500" desc:"A batch is sent at once when it holds this many decisions."`
	Parallel int           `split_words:"true" default:"64" desc:"Decisions handled at once by this process (they wait together for their batch)."`
}

// Validate checks the settings.
func (c *Config) Validate() error {
	if c.Window <= 0 || c.Window > 10*time.Second {
		return config.Invalid(&c.Window, "must be above 0 and at most 10s, got %s", c.Window)
	}
	if c.MaxBatch < 1 {
		return config.Invalid(&c.MaxBatch, "must be positive")
	}
	if c.Parallel < 1 {
		return config.Invalid(&c.Parallel, "must be positive")
	}
	return nil
}

// Applier is what the executor needs of Exchange for device decisions.
type Applier interface {
	ApplyAccess(ctx context.Context, changes []exchange.Change) ([]exchange.ChangeResult, error)
}

// DefaultSetter is what the executor needs of Exchange for the
// organisation's default (exchange.Client.SetDefaultAccessLevel).
type DefaultSetter interface {
	SetDefaultAccessLevel(ctx context.Context, from, to string) (string, error)
}

// Exchange is all the executor needs of Exchange (exchange.Client does it).
type Exchange interface {
	Applier
	DefaultSetter
}

// Executor is the executor worker of one organisation.
type Executor struct {
	org     bus.Org
	cfg     Config
	applied jetstream.KeyValue
	status  jetstream.KeyValue
	setter  DefaultSetter
	log     *slog.Logger
	now     func() time.Time
	server  func() string
	actor   string
	batch   *batcher
}

// New opens the executor's state. server reports the CAS in use, for the
// audit record; actor is the service account, for SIEM attribution.
func New(ctx context.Context, js jetstream.JetStream, org bus.Org, cfg Config, ex Exchange, server func() string, actor string, log *slog.Logger) (*Executor, error) {
	kv, err := js.KeyValue(ctx, bus.BucketApplied)
	if err != nil {
		return nil, fmt.Errorf("executor: open %s: %w", bus.BucketApplied, err)
	}
	status, err := js.KeyValue(ctx, bus.BucketStatus)
	if err != nil {
		return nil, fmt.Errorf("executor: open %s: %w", bus.BucketStatus, err)
	}
	if log == nil {
		log = slog.Default()
	}
	if server == nil {
		server = func() string { return "" }
	}
	x := &Executor{org: org, cfg: cfg, applied: kv, status: status, setter: ex, log: log.With("worker", "executor"), now: time.Now, server: server, actor: actor}
	x.batch = &batcher{apply: ex.ApplyAccess, window: cfg.Window, max: cfg.MaxBatch}
	return x, nil
}

// Routes returns the executor's handlers.
func (x *Executor) Routes() []bus.Route {
	return []bus.Route{bus.Handle("access-decided", bus.AccessDecided, x.Apply), bus.Handle("settings-decided", bus.SettingsDecided, x.ApplyDefault)}
}

func accessOf(d ev.DesiredAccess) (exchange.Access, error) {
	switch d {
	case ev.DesiredAccess_DESIRED_ACCESS_ALLOW:
		return exchange.AccessAllow, nil
	case ev.DesiredAccess_DESIRED_ACCESS_BLOCK:
		return exchange.AccessBlock, nil
	case ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE:
		// Quarantine is Exchange's default level, which easguard enforces:
		// taking the id off both lists is what quarantines it.
		return exchange.AccessUnlist, nil
	}
	return 0, fmt.Errorf("no access for %s", d)
}

// mailboxIdentity is what Set-CASMailbox gets: the GUID when known (never
// ambiguous), else the identity Exchange reported.
func mailboxIdentity(mb *ev.Mailbox) string {
	if mb.GetGuid() != "" {
		return mb.GetGuid()
	}
	if mb.GetIdentity() != "" {
		return mb.GetIdentity()
	}
	return mb.GetPrimarySmtpAddress()
}

// attempts is how many deliveries the decision took to reach this outcome.
func attempts(ctx context.Context) int32 {
	return int32(max(1, min(bus.Delivery(ctx), math.MaxInt32)))
}

// newestPruneAt is the size of the batcher's memory of newest decisions
// above which entries older than an hour are dropped.
const newestPruneAt = 50000

// Apply applies one decision and reports the outcome.
func (x *Executor) Apply(ctx context.Context, d *ev.AccessDecided) ([]bus.Outbound, error) {
	p := d.GetPartnership()
	key, err := bus.StateKey(x.org, p.GetDeviceId(), ev.PartnershipID(p))
	if err != nil {
		return nil, bus.Poison(err)
	}
	start := x.now()
	item := &ev.AppliedItem{Mailbox: p.GetMailbox(), DeviceId: p.GetDeviceId(), Desired: d.GetDesired(), DecisionId: d.GetDecisionId()}
	result := func(outcome ev.ApplyOutcome, msg string, cmdlets []*ev.CmdletInvocation) ([]bus.Outbound, error) {
		item.Outcome, item.Error = outcome, msg
		subject, err := bus.AccessApplied.Subject(x.org, p.GetDeviceId())
		if err != nil {
			return nil, bus.Poison(err)
		}
		return []bus.Outbound{{Subject: subject, MsgID: "applied:" + d.GetDecisionId(), Message: &ev.AccessApplied{
			Org: string(x.org), DecisionIds: []string{d.GetDecisionId()}, Cmdlets: cmdlets, Items: []*ev.AppliedItem{item},
			CasServer: x.server(), Attempts: attempts(ctx), Duration: durationpb.New(x.now().Sub(start)), AppliedAt: timestamppb.New(x.now()),
			Actor: x.actor, PolicyVersion: d.GetPolicyVersion(), Decision: d,
		}}}, nil
	}
	prev, seen, err := bus.Load[ev.AppliedRecord](ctx, x.applied, key)
	if err != nil {
		return nil, err
	}
	switch {
	case seen && prev.GetDecisionId() == d.GetDecisionId():
		// Redelivered after it was applied: report it again, do not re-apply.
		return result(prev.GetOutcome(), "", nil)
	case seen && prev.GetDecidedAt().AsTime().After(d.GetDecidedAt().AsTime()):
		return result(ev.ApplyOutcome_APPLY_OUTCOME_SUPERSEDED, "a newer decision ("+prev.GetDecisionId()+") was already applied", nil)
	case d.GetDryRun():
		return result(ev.ApplyOutcome_APPLY_OUTCOME_SKIPPED_DRY_RUN, "dry run: nothing changed on Exchange", []*ev.CmdletInvocation{invocation(d)})
	}
	acc, err := accessOf(d.GetDesired())
	if err != nil {
		return nil, bus.Poison(err)
	}
	res, err := x.batch.submit(ctx, exchange.Change{Mailbox: mailboxIdentity(p.GetMailbox()), DeviceID: p.GetDeviceId(), Access: acc}, d.GetDecidedAt().AsTime())
	if err != nil {
		return nil, err
	}
	inv := invocation(d)
	switch {
	case res.Err == nil:
	case errors.Is(res.Err, exchange.ErrSuperseded):
		return result(ev.ApplyOutcome_APPLY_OUTCOME_SUPERSEDED, "superseded by a newer decision for the same device", nil)
	case errors.Is(res.Err, exchange.ErrNotFound):
		// The mailbox is gone: nothing to apply, and nothing to retry.
		inv.Error = res.Err.Error()
		return result(ev.ApplyOutcome_APPLY_OUTCOME_NOT_FOUND, res.Err.Error(), []*ev.CmdletInvocation{inv})
	case errors.Is(res.Err, exchange.ErrInvalid):
		return nil, bus.Poison(fmt.Errorf("Exchange refused the change: %w", res.Err))
	default:
		// Transient, throttled (the error carries Exchange's back-off) or
		// fatal (credentials, permissions): retried by the runner, and
		// dead-lettered with the reason when retries run out.
		return nil, fmt.Errorf("apply %s for %s: %w", d.GetDesired(), p.GetDeviceId(), res.Err)
	}
	// Exchange already held the change (a redelivery after the worker that
	// applied it died, or a list edited by hand): nothing was sent, and
	// Exchange is as decided all the same.
	outcome, cmdlets := ev.ApplyOutcome_APPLY_OUTCOME_APPLIED, []*ev.CmdletInvocation{inv}
	if res.Unchanged {
		outcome, cmdlets = ev.ApplyOutcome_APPLY_OUTCOME_ALREADY_IN_STATE, nil
	}
	if _, err := bus.Modify(ctx, x.applied, key, func(rec *ev.AppliedRecord, exists bool) (bus.Change, error) {
		if exists && rec.GetDecidedAt().AsTime().After(d.GetDecidedAt().AsTime()) {
			return bus.Keep, nil
		}
		rec.DecisionId, rec.DecidedAt, rec.Desired = d.GetDecisionId(), d.GetDecidedAt(), d.GetDesired()
		rec.AppliedAt, rec.Outcome = timestamppb.New(x.now()), outcome
		return bus.Write, nil
	}); err != nil {
		return nil, err
	}
	inv.Duration = durationpb.New(x.now().Sub(start))
	return result(outcome, "", cmdlets)
}

// invocation records, for audit, the part of the batch's Set-CASMailbox
// that carried this decision.
func invocation(d *ev.AccessDecided) *ev.CmdletInvocation {
	id := d.GetPartnership().GetDeviceId()
	inv := &ev.CmdletInvocation{Name: "Set-CASMailbox", Parameters: []*ev.CmdletParameter{{Name: "Identity", Values: []string{mailboxIdentity(d.GetPartnership().GetMailbox())}}}}
	add := func(param, op string) {
		inv.Parameters = append(inv.Parameters, &ev.CmdletParameter{Name: param, Operation: op, Values: []string{id}})
	}
	switch d.GetDesired() {
	case ev.DesiredAccess_DESIRED_ACCESS_ALLOW:
		add("ActiveSyncAllowedDeviceIDs", "Add")
		add("ActiveSyncBlockedDeviceIDs", "Remove")
	case ev.DesiredAccess_DESIRED_ACCESS_BLOCK:
		add("ActiveSyncBlockedDeviceIDs", "Add")
		add("ActiveSyncAllowedDeviceIDs", "Remove")
	default:
		add("ActiveSyncAllowedDeviceIDs", "Remove")
		add("ActiveSyncBlockedDeviceIDs", "Remove")
	}
	return inv
}

// batcher gathers changes submitted within a window and applies them in
// one ApplyAccess call. Batches run one after the other, so one mailbox is
// never changed by two Set-CASMailbox calls at once; inside a batch,
// changes are ordered by decision time, so the newest decision for a
// device wins.
type batcher struct {
	apply  func(ctx context.Context, changes []exchange.Change) ([]exchange.ChangeResult, error)
	window time.Duration
	max    int

	mu      sync.Mutex
	pending []*submission
	timer   *time.Timer
	running sync.Mutex
	// newest is the decision time of the newest change sent per mailbox
	// and device, so that an older decision that arrives while a newer one
	// is being applied (its record not written yet) cannot undo it;
	// guarded by running. Within this process only: replicas of the
	// executor each keep their own.
	newest map[string]time.Time
}

type submission struct {
	change  exchange.Change
	decided time.Time
	done    chan exchange.ChangeResult
	err     error
}

func (b *batcher) submit(ctx context.Context, ch exchange.Change, decided time.Time) (exchange.ChangeResult, error) {
	s := &submission{change: ch, decided: decided, done: make(chan exchange.ChangeResult, 1)}
	b.mu.Lock()
	b.pending = append(b.pending, s)
	switch {
	case len(b.pending) >= b.max:
		batch := b.take()
		b.mu.Unlock()
		go b.run(batch)
	case len(b.pending) == 1:
		b.timer = time.AfterFunc(b.window, func() {
			b.mu.Lock()
			batch := b.take()
			b.mu.Unlock()
			if len(batch) > 0 {
				b.run(batch)
			}
		})
		b.mu.Unlock()
	default:
		b.mu.Unlock()
	}
	select {
	case r := <-s.done:
		return r, s.err
	case <-ctx.Done():
		return exchange.ChangeResult{}, ctx.Err()
	}
}

// take removes the pending submissions; callers hold b.mu.
func (b *batcher) take() []*submission {
	if b.timer != nil {
		b.timer.Stop()
		b.timer = nil
	}
	batch := b.pending
	b.pending = nil
	return batch
}

func (b *batcher) run(batch []*submission) {
	b.running.Lock()
	defer b.running.Unlock()
	sort.SliceStable(batch, func(i, j int) bool { return batch[i].decided.Before(batch[j].decided) })
	if b.newest == nil {
		b.newest = map[string]time.Time{}
	}
	keyOf := func(c exchange.Change) string {
		return strings.ToLower(c.Mailbox) + "\x00" + strings.ToLower(c.DeviceID)
	}
	kept := batch[:0]
	for _, s := range batch {
		if t, ok := b.newest[keyOf(s.change)]; ok && s.decided.Before(t) {
			s.done <- exchange.ChangeResult{Change: s.change, Err: exchange.ErrSuperseded}
			continue
		}
		kept = append(kept, s)
	}
	batch = kept
	if len(batch) == 0 {
		return
	}
	defer func() {
		for _, s := range batch {
			if t, ok := b.newest[keyOf(s.change)]; !ok || s.decided.After(t) {
				b.newest[keyOf(s.change)] = s.decided
			}
		}
		// A late older decision comes within seconds (a retry, a
		// redelivery); remember the last hour, and only prune when the
		// memory has grown.
		if len(b.newest) > newestPruneAt {
			cut := time.Now().Add(-time.Hour)
			for k, t := range b.newest {
				if t.Before(cut) {
					delete(b.newest, k)
				}
			}
		}
	}()
	changes := make([]exchange.Change, len(batch))
	for i, s := range batch {
		changes[i] = s.change
	}
	// The batch outlives any one handler's context: it carries others.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	results, err := b.apply(ctx, changes)
	for i, s := range batch {
		if err != nil && (results == nil || results[i].Err == nil) {
			s.err = err
			s.done <- exchange.ChangeResult{Change: s.change, Err: err}
			continue
		}
		s.done <- results[i]
	}
}
