// Package executor applies access decisions on Exchange. Decisions that
// arrive together are coalesced into one batch (one Set-CASMailbox per
// mailbox, many mailboxes per round trip); a decision older than one
// already applied (or claimed) for the same partnership is superseded, not
// applied; and applying a decision again after a redelivery changes
// nothing. The ordering holds across any number of replicas: before a
// change is sent, its decision is claimed with a compare-and-set on the
// partnership's record in the applied bucket, which refuses a decision
// older than the newest claimed or applied one and lets only one instance
// at a time send a change for the partnership.
package executor

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Config configures the executor.
type Config struct {
	Window   time.Duration `split_words:"true" default:"10ms" desc:"Decisions arriving within this window are applied together in one batch. Two batches are on Exchange at most; what arrives meanwhile goes together in the next, sent as soon as one is done. The window is latency added to every decision that finds the executor idle."`
	MaxBatch int           `split_words:"true" default:"500" desc:"A batch is sent at once when it holds this many decisions."`
	Parallel int           `split_words:"true" default:"64" desc:"Decisions handled at once by this process (they wait together for their batch)."`
	ClaimTTL time.Duration `split_words:"true" default:"2m" desc:"How long a replica's claim to send a decision to Exchange lasts. While it lasts, no other replica sends a change for the same device; a batch still unanswered after four fifths of it is given up (and retried), so a replica that died holds a device back at most this long."`
	// AllowRemove and AllowWipe are off unless an organisation chose them:
	// a removal or a wipe cannot be undone by easguard, and an operator's
	// console must not be able to do either where nobody agreed to it.
	AllowRemove bool `split_words:"true" default:"false" desc:"Carry out an operator's command to remove a device's ActiveSync partnership on Exchange (Remove-ActiveSyncDevice). Off: the command is refused and the refusal recorded in the audit trail."`
	AllowWipe   bool `split_words:"true" default:"false" desc:"Carry out an operator's command to remote-wipe a device through Exchange (Clear-ActiveSyncDevice; the phone erases itself at its next sync). Off: the command is refused and the refusal recorded in the audit trail."`
}

// defaultClaimTTL is ClaimTTL's default, for a Config built in code.
const defaultClaimTTL = 2 * time.Minute

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
	// Zero (a Config built in code) takes the default, as New does.
	if c.ClaimTTL != 0 && (c.ClaimTTL < 5*time.Second || c.ClaimTTL > time.Hour) {
		return config.Invalid(&c.ClaimTTL, "must be between 5s and 1h, got %s", c.ClaimTTL)
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

// DeviceCommander is what the executor needs of Exchange for operators'
// device commands (exchange.Client.RemovePartnership and WipePartnership).
type DeviceCommander interface {
	RemovePartnership(ctx context.Context, identity string) error
	WipePartnership(ctx context.Context, identity string, notify []string) error
}

// Exchange is all the executor needs of Exchange (exchange.Client does it).
type Exchange interface {
	Applier
	DefaultSetter
	DeviceCommander
}

// Executor is the executor worker of one organisation.
type Executor struct {
	org     bus.Org
	cfg     Config
	applied jetstream.KeyValue
	status  jetstream.KeyValue
	setter  DefaultSetter
	devices DeviceCommander
	log     *slog.Logger
	now     func() time.Time
	server  func() string
	actor   string
	// holder names this instance in its claims; unique per Executor, so
	// that two replicas (or two executors in one process) never take each
	// other's claims for their own.
	holder string
	// nonce is the random part of holder, which names its liveness lease.
	nonce  string
	leases jetstream.KeyValue
	// pub raises alerts (SetPublisher).
	pub   atomic.Pointer[bus.Publisher]
	batch *batcher
	// liveness is the lease Run keeps; nil until Run starts.
	liveness atomic.Pointer[bus.Lease]
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
	var nonce [8]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return nil, fmt.Errorf("executor: instance name: %w", err)
	}
	host, _ := os.Hostname()
	holder := fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(nonce[:]))
	leases, err := js.KeyValue(ctx, bus.BucketLeases)
	if err != nil {
		return nil, fmt.Errorf("executor: open %s: %w", bus.BucketLeases, err)
	}
	if cfg.ClaimTTL == 0 {
		cfg.ClaimTTL = defaultClaimTTL
	}
	x := &Executor{org: org, cfg: cfg, applied: kv, status: status, setter: ex, devices: ex, log: log.With("worker", "executor"), now: time.Now, server: server, actor: actor, holder: holder, nonce: hex.EncodeToString(nonce[:]), leases: leases}
	x.batch = &batcher{apply: ex.ApplyAccess, claim: x.claim, tenure: x.tenure, window: cfg.Window, max: cfg.MaxBatch, claimTTL: cfg.ClaimTTL}
	return x, nil
}

// Run keeps this instance's liveness lease (key executor-<nonce>.<org> in
// the lease bucket) until ctx ends: while it lives, other replicas wait for
// this instance's claims; once it is gone (released at shutdown, or run
// out within the lease TTL after a crash), they take them over at once
// instead of waiting for ClaimTTL.
func (x *Executor) Run(ctx context.Context) error {
	lease, err := bus.NewLease(ctx, x.leases, livenessDuty(x.nonce), x.org, x.holder, x.log)
	if err != nil {
		return fmt.Errorf("executor: %w", err)
	}
	x.liveness.Store(lease)
	return lease.Run(ctx, func(lctx context.Context) { <-lctx.Done() })
}

// tenure is the liveness lease's tenure (bus.Lease.Tenure), by which a
// batch is fenced: its changes are sent only under the tenure its claims
// were made in. Before Run starts there is no lease to fence by (an
// executor used without Run, as some tests do), and every batch may go.
func (x *Executor) tenure() (uint64, bool) {
	l := x.liveness.Load()
	if l == nil {
		return 0, true
	}
	return l.Tenure()
}

// livenessDuty names the liveness lease of the instance with this nonce.
func livenessDuty(nonce string) string { return "executor-" + nonce }

// alive reports whether the instance holder still keeps its liveness
// lease. When that cannot be read, it is taken as alive: waiting for a
// claim is safe, taking over a live one is not.
func (x *Executor) alive(ctx context.Context, holder string) bool {
	i := strings.LastIndexByte(holder, '-')
	if i < 0 || i == len(holder)-1 {
		return true
	}
	_, err := x.leases.Get(ctx, livenessDuty(holder[i+1:])+"."+string(x.org))
	return !errors.Is(err, jetstream.ErrKeyNotFound) && !errors.Is(err, jetstream.ErrKeyDeleted)
}

// Routes returns the executor's handlers.
func (x *Executor) Routes() []bus.Route {
	return []bus.Route{
		bus.Handle("access-decided", bus.AccessDecided, x.Apply),
		bus.Handle("settings-decided", bus.SettingsDecided, x.ApplyDefault),
		bus.Handle("device-command", bus.DeviceCommanded, x.Command),
	}
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

// Apply applies one decision and reports the outcome. The decision is
// claimed in the applied bucket before its change is sent (see claim), so
// that across every replica of the executor each decision is applied at
// most once and in order per partnership.
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
	if d.GetDryRun() {
		// A dry run claims nothing: it only reports, and a newer decision
		// (or the same one, applied) is reported as it always was.
		prev, _, err := bus.Load[ev.AppliedRecord](ctx, x.applied, key)
		if err != nil {
			return nil, err
		}
		switch v := verdictOf(prev, d, "", x.now()); v.kind {
		case claimDone:
			return result(v.outcome, "", nil)
		case claimSuperseded:
			return result(ev.ApplyOutcome_APPLY_OUTCOME_SUPERSEDED, v.reason, nil)
		}
		return result(ev.ApplyOutcome_APPLY_OUTCOME_SKIPPED_DRY_RUN, "dry run: nothing changed on Exchange", []*ev.CmdletInvocation{invocation(d)})
	}
	acc, err := accessOf(d.GetDesired())
	if err != nil {
		return nil, bus.Poison(err)
	}
	var res exchange.ChangeResult
	var verdict claimVerdict
	for {
		var v claimVerdict
		res, v, err = x.batch.submit(ctx, &submission{key: key, decision: d, change: exchange.Change{Mailbox: mailboxIdentity(p.GetMailbox()), DeviceID: p.GetDeviceId(), Access: acc,
			// The batch runs in no handler's context: its requests to
			// Exchange are traced in the device's journey through this.
			Cause: trace.SpanContextFromContext(ctx)}})
		if err != nil {
			return nil, err
		}
		switch v.kind {
		case claimDone:
			// Redelivered after it was applied: report it again, do not re-apply.
			return result(v.outcome, "", nil)
		case claimSuperseded:
			return result(ev.ApplyOutcome_APPLY_OUTCOME_SUPERSEDED, v.reason, nil)
		case claimBusy:
			// Another replica is sending a change for this partnership:
			// wait until it is done (or its claim runs out), then claim.
			if err := x.awaitClaim(ctx, key, v.until); err != nil {
				return nil, err
			}
			continue
		}
		verdict = v
		break
	}
	inv := invocation(d)
	var outcome ev.ApplyOutcome
	cmdlets := []*ev.CmdletInvocation{inv}
	switch {
	case res.Err == nil && res.Unchanged:
		// Exchange already held the change (a redelivery after the worker
		// that applied it died, or a list edited by hand): nothing was
		// sent, and Exchange is as decided all the same.
		outcome, cmdlets = ev.ApplyOutcome_APPLY_OUTCOME_ALREADY_IN_STATE, nil
	case res.Err == nil:
		outcome = ev.ApplyOutcome_APPLY_OUTCOME_APPLIED
	case errors.Is(res.Err, exchange.ErrSuperseded):
		x.release(ctx, key, d)
		return result(ev.ApplyOutcome_APPLY_OUTCOME_SUPERSEDED, "superseded by a newer decision for the same device", nil)
	case errors.Is(res.Err, exchange.ErrNotFound):
		// The mailbox is gone: nothing to apply, and nothing to retry.
		x.release(ctx, key, d)
		inv.Error = res.Err.Error()
		return result(ev.ApplyOutcome_APPLY_OUTCOME_NOT_FOUND, res.Err.Error(), []*ev.CmdletInvocation{inv})
	case errors.Is(res.Err, exchange.ErrInvalid):
		x.release(ctx, key, d)
		return nil, bus.Poison(fmt.Errorf("Exchange refused the change: %w", res.Err))
	default:
		// Transient, throttled (the error carries Exchange's back-off) or
		// fatal (credentials, permissions): retried by the runner, and
		// dead-lettered with the reason when retries run out. The claim is
		// released so that a newer decision need not wait for it; its
		// watermark stays, so an older one still cannot overtake it.
		x.release(ctx, key, d)
		if exchange.IsFatal(res.Err) {
			x.alertFatal(ctx, res.Err)
		}
		return nil, fmt.Errorf("apply %s for %s: %w", d.GetDesired(), p.GetDeviceId(), res.Err)
	}
	// Exchange has the change: recording it waits out a leader election
	// of the applied bucket's stream rather than failing the delivery,
	// which would send the change again after the runner's backoff.
	if err := bus.AskAgain(ctx, func() error { return x.complete(ctx, key, d, outcome, verdict) }); err != nil {
		return nil, err
	}
	inv.Duration = durationpb.New(x.now().Sub(start))
	return result(outcome, "", cmdlets)
}

// fatalAlertEvery is how often changes that Exchange goes on refusing for
// want of credentials or permission are alerted again.
const fatalAlertEvery = time.Hour

// SetPublisher gives the executor the publisher it raises alerts with: a
// change that fails for good is retried (the administrator may fix the
// account meanwhile), so no handler output carries the alert.
func (x *Executor) SetPublisher(p *bus.Publisher) { x.pub.Store(p) }

// alertFatal raises EXCHANGE_AUTH or EXCHANGE_PERMISSION when Exchange
// refuses a change for easguard's credentials or the account's role (the
// collector's reads may still work: a role that lost Set-CASMailbox only
// shows here), once, and again each hour it goes on.
func (x *Executor) alertFatal(ctx context.Context, cause error) {
	pub := x.pub.Load()
	if pub == nil {
		return
	}
	kind, what := ev.AlertKind_ALERT_KIND_EXCHANGE_PERMISSION, "permission"
	if !errors.Is(cause, exchange.ErrPermission) {
		kind, what = ev.AlertKind_ALERT_KIND_EXCHANGE_AUTH, "auth"
	}
	now := x.now()
	err := bus.RaiseDue(ctx, pub, x.status, x.org, "executor."+what, fatalAlertEvery, now, bus.Alert{Kind: kind, Severity: ev.AlertSeverity_ALERT_SEVERITY_CRITICAL,
		ID:      fmt.Sprintf("executor-%s:%d", what, now.Unix()),
		Summary: "Exchange refuses easguard's changes (" + what + "): decisions wait until the service account is fixed",
		Detail:  map[string]string{"error": cause.Error(), "cas_server": x.server(), "account": x.actor}})
	if err != nil {
		x.log.WarnContext(ctx, "refused change not alerted", "error", err)
	}
}

// The kinds of claim verdicts.
const (
	claimClaimed    = iota // this instance may send the change
	claimDone              // the same decision was applied already
	claimSuperseded        // a newer decision was claimed or applied
	claimBusy              // another instance is sending a change for the partnership
)

// claimVerdict is what claiming a decision found.
type claimVerdict struct {
	kind    int
	outcome ev.ApplyOutcome // claimDone: the outcome recorded
	reason  string          // claimSuperseded: which decision is newer
	until   time.Time       // claimBusy: when the other claim runs out
	// record and revision are what the claim wrote (claimClaimed).
	record   *ev.AppliedRecord
	revision uint64
}

// older reports whether decision (at, id) comes before (bt, bid): by
// decision time, and by id between two decisions of the same instant, so
// that every replica orders any two decisions the same way.
func older(at *timestamppb.Timestamp, id string, bt *timestamppb.Timestamp, bid string) bool {
	a, b := at.AsTime(), bt.AsTime()
	if !a.Equal(b) {
		return a.Before(b)
	}
	return id < bid
}

// verdictOf judges decision d against the partnership's record, as the
// instance holder would claim it at now.
func verdictOf(rec *ev.AppliedRecord, d *ev.AccessDecided, holder string, now time.Time) claimVerdict {
	switch {
	case rec.GetDecisionId() != "" && rec.GetDecisionId() == d.GetDecisionId():
		return claimVerdict{kind: claimDone, outcome: rec.GetOutcome()}
	case rec.GetDecisionId() != "" && older(d.GetDecidedAt(), d.GetDecisionId(), rec.GetDecidedAt(), rec.GetDecisionId()):
		return claimVerdict{kind: claimSuperseded, reason: "superseded: a newer decision (" + rec.GetDecisionId() + ") was already applied"}
	case rec.GetClaimDecisionId() != "" && rec.GetClaimDecisionId() != d.GetDecisionId() &&
		older(d.GetDecidedAt(), d.GetDecisionId(), rec.GetClaimDecidedAt(), rec.GetClaimDecisionId()):
		return claimVerdict{kind: claimSuperseded, reason: "superseded: a newer decision (" + rec.GetClaimDecisionId() + ") was claimed to be applied"}
	case rec.GetClaimHolder() != "" && rec.GetClaimHolder() != holder && now.Before(rec.GetClaimUntil().AsTime()):
		// Even for the same decision: two instances sending it at once
		// could each find Exchange without it and both change the lists.
		return claimVerdict{kind: claimBusy, until: rec.GetClaimUntil().AsTime()}
	}
	return claimVerdict{kind: claimClaimed}
}

// claim records, with a compare-and-set on the partnership's applied
// record, that this instance is about to send decision d, unless the
// record says it must not (verdictOf). Claims are made by the batcher,
// batch after batch, and batches are sent in that same order, so a claim
// this instance still holds belongs to a batch sent before the one that
// claims now: a newer decision may take it over without waiting. A claim
// held by another instance may not, until it is released, runs out (the
// batch gives up on Exchange before then: until), or its holder's
// liveness lease is gone.
func (x *Executor) claim(ctx context.Context, key string, d *ev.AccessDecided, until time.Time) (claimVerdict, error) {
	for attempt := 0; ; attempt++ {
		v, err := x.claimOnce(ctx, key, d, until)
		if err == nil || attempt >= 50 || ctx.Err() != nil {
			return v, err
		}
		if !errors.Is(err, errClaimRace) && !bus.Unanswered(err) {
			return v, err
		}
		if !errors.Is(err, errClaimRace) {
			// Unanswered: the bucket's stream is electing a leader, or
			// has none yet. Ask again shortly.
			t := time.NewTimer(min(time.Duration(attempt+1)*100*time.Millisecond, time.Second))
			select {
			case <-ctx.Done():
				t.Stop()
				return v, err
			case <-t.C:
			}
		}
	}
}

// errClaimRace is a compare-and-set of a claim that another write beat:
// the claim is judged again from the record as it is now.
var errClaimRace = errors.New("claim raced another write")

// claimAttempt bounds each read and write of one claim attempt. A request
// lost while the applied bucket's stream elects a leader (a NATS node
// died) is never answered; without its own deadline it would hold the
// whole batch until the batch gives up, four fifths of ClaimTTL (96 s by
// default), while the new leader answers within seconds.
const claimAttempt = 5 * time.Second

// claimOnce is one attempt of claim, each request with claimAttempt's
// deadline.
func (x *Executor) claimOnce(ctx context.Context, key string, d *ev.AccessDecided, until time.Time) (claimVerdict, error) {
	ctx, cancel := context.WithTimeout(ctx, claimAttempt)
	defer cancel()
	rec := &ev.AppliedRecord{}
	var rev uint64
	e, err := x.applied.Get(ctx, key)
	switch {
	case err == nil:
		if err := bus.DecodeRecord(e.Value(), rec); err != nil {
			return claimVerdict{}, fmt.Errorf("claim %s: %w", key, err)
		}
		rev = e.Revision()
	case errors.Is(err, jetstream.ErrKeyNotFound):
	case errors.Is(err, jetstream.ErrKeyDeleted):
		rev = e.Revision() // Update needs the delete marker's revision
	default:
		return claimVerdict{}, fmt.Errorf("claim %s: %w", key, err)
	}
	v := verdictOf(rec, d, x.holder, x.now())
	if v.kind == claimBusy && !x.alive(ctx, rec.GetClaimHolder()) {
		// Its holder died (or lost NATS for a lease TTL) while sending:
		// the claim is taken over at once rather than after ClaimTTL.
		// A holder that lost its lease sends nothing it claimed before
		// (batcher.run checks its tenure just before sending), but one
		// cut off from NATS with its Set-CASMailbox already on the way
		// may still have it in flight; that is the window this trades
		// for a quick recovery from a crash.
		v = claimVerdict{kind: claimClaimed}
	}
	if v.kind != claimClaimed {
		return v, nil
	}
	rec.ClaimDecisionId, rec.ClaimDecidedAt = d.GetDecisionId(), d.GetDecidedAt()
	rec.ClaimHolder, rec.ClaimUntil = x.holder, timestamppb.New(until)
	b, err := proto.Marshal(rec)
	if err != nil {
		return claimVerdict{}, fmt.Errorf("claim %s: %w", key, err)
	}
	if rev == 0 {
		rev, err = x.applied.Create(ctx, key, b)
	} else {
		rev, err = x.applied.Update(ctx, key, b, rev)
	}
	if err == nil {
		v.record, v.revision = rec, rev
		return v, nil
	}
	if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		err = fmt.Errorf("%w: %w", errClaimRace, err)
	}
	return claimVerdict{}, fmt.Errorf("claim %s for %s: %w", key, d.GetDecisionId(), err)
}

// complete records decision d applied with outcome and releases its
// claim. It writes over the record its claim wrote (one round trip); when
// the record changed since (a newer decision claimed it), it reads it
// again.
func (x *Executor) complete(ctx context.Context, key string, d *ev.AccessDecided, outcome ev.ApplyOutcome, v claimVerdict) error {
	change := func(rec *ev.AppliedRecord, exists bool) (bus.Change, error) {
		if rec.GetClaimDecisionId() == d.GetDecisionId() && rec.GetClaimHolder() == x.holder {
			rec.ClaimHolder, rec.ClaimUntil = "", nil
		}
		if !exists || rec.GetDecisionId() == "" || !older(d.GetDecidedAt(), d.GetDecisionId(), rec.GetDecidedAt(), rec.GetDecisionId()) {
			rec.DecisionId, rec.DecidedAt, rec.Desired = d.GetDecisionId(), d.GetDecidedAt(), d.GetDesired()
			rec.AppliedAt, rec.Outcome = timestamppb.New(x.now()), outcome
		}
		return bus.Write, nil
	}
	if v.record != nil {
		rec := proto.Clone(v.record).(*ev.AppliedRecord)
		_, _ = change(rec, true)
		b, err := proto.Marshal(rec)
		if err != nil {
			return fmt.Errorf("complete %s: %w", key, err)
		}
		_, err = x.applied.Update(ctx, key, b, v.revision)
		if err == nil {
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) && !errors.Is(err, jetstream.ErrKeyExists) {
			return fmt.Errorf("complete %s: %w", key, err)
		}
	}
	_, err := bus.Modify(ctx, x.applied, key, change)
	return err
}

// release gives up this instance's claim of d without recording it
// applied, so that the next decision for the partnership need not wait for
// the claim to run out. The watermark stays. A failed release is only
// logged: the claim runs out on its own.
func (x *Executor) release(ctx context.Context, key string, d *ev.AccessDecided) {
	if _, err := bus.Modify(ctx, x.applied, key, func(rec *ev.AppliedRecord, exists bool) (bus.Change, error) {
		if !exists || rec.GetClaimDecisionId() != d.GetDecisionId() || rec.GetClaimHolder() != x.holder {
			return bus.Keep, nil
		}
		rec.ClaimHolder, rec.ClaimUntil = "", nil
		return bus.Write, nil
	}); err != nil {
		x.log.Warn("claim not released; it runs out on its own", "key", key, "decision_id", d.GetDecisionId(), "error", err)
	}
}

// awaitClaim waits until another instance's claim on key is released or
// runs out (until), polling the record: the wait is short when the other
// instance is alive, and bounded by the claim when it died.
func (x *Executor) awaitClaim(ctx context.Context, key string, until time.Time) error {
	delay := x.cfg.Window
	for {
		rec, _, err := bus.Load[ev.AppliedRecord](ctx, x.applied, key)
		if err != nil {
			return err
		}
		if rec.GetClaimHolder() == "" || rec.GetClaimHolder() == x.holder || !x.now().Before(rec.GetClaimUntil().AsTime()) || !x.alive(ctx, rec.GetClaimHolder()) {
			return nil
		}
		wait := min(delay, max(time.Until(rec.GetClaimUntil().AsTime()), time.Millisecond))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		delay = min(2*delay, time.Second)
	}
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

// batcher gathers changes submitted within a window, claims them (see
// Executor.claim) and applies those it may send in one ApplyAccess call.
// Up to batchesInFlight batches are claimed and sent at once; what
// arrives while they are forms the next batch as soon as one is done
// (group commit), so that under a burst batches grow with the backlog
// instead of queueing one window's worth each behind the other, and the
// Exchange client can spread them over every session the pool may open.
// A submission for a partnership or a mailbox that a batch in flight
// holds waits for that batch: one mailbox is never changed by two
// Set-CASMailbox calls of this instance at once, and a claim this
// instance holds belongs to a batch that was sent before any batch that
// takes the claim over. Of several decisions for one partnership in a
// batch only the newest is claimed and sent.
type batcher struct {
	apply func(ctx context.Context, changes []exchange.Change) ([]exchange.ChangeResult, error)
	claim func(ctx context.Context, key string, d *ev.AccessDecided, until time.Time) (claimVerdict, error)
	// tenure reports the instance's liveness lease (Executor.tenure).
	tenure func() (uint64, bool)
	window time.Duration
	max    int
	// claimTTL is how long a claim lasts; the batch gives up on Exchange
	// a fifth of it before, so that no change is sent on a claim that ran out.
	claimTTL time.Duration

	mu      sync.Mutex
	pending []*submission
	timer   *time.Timer
	// inflight is how many batches are being claimed and sent, and held
	// the partnerships and mailboxes they carry (with how many of them
	// carry each); due, that the window of the oldest pending submission
	// has passed, so it goes as soon as it may. Guarded by mu.
	inflight int
	held     map[string]int
	due      bool
}

// errFenced is the result of a change not sent because the executor lost
// its liveness lease after claiming it (batcher.run).
var errFenced = errors.New("executor: liveness lease lost after the claim; not sent, to be claimed again")

// tenurePoll is how often a batch looks again for the liveness lease it
// waits for.
const tenurePoll = 20 * time.Millisecond

// awaitTenure waits until the instance holds its liveness lease, and
// returns the tenure.
func (b *batcher) awaitTenure(ctx context.Context) (uint64, error) {
	for {
		n, held := b.tenure()
		if held {
			return n, nil
		}
		t := time.NewTimer(tenurePoll)
		select {
		case <-ctx.Done():
			t.Stop()
			return 0, fmt.Errorf("executor: waiting for the liveness lease: %w", ctx.Err())
		case <-t.C:
		}
	}
}

// batchesInFlight is how many batches one executor sends at once: a
// second one keeps the sessions busy while the first one's last answers
// come in, and a decision that arrives during a batch need not wait for
// all of it.
const batchesInFlight = 2

// submission is one decision waiting for its batch.
type submission struct {
	key      string
	decision *ev.AccessDecided
	change   exchange.Change
	done     chan struct{}
	result   exchange.ChangeResult
	verdict  claimVerdict
	err      error
}

// holds returns what a submission holds while its batch is in flight.
func (s *submission) holds() [2]string {
	return [2]string{"p:" + s.key, "m:" + strings.ToLower(s.change.Mailbox)}
}

// claimParallel bounds the claims of one batch made at once.
const claimParallel = 32

func (b *batcher) submit(ctx context.Context, s *submission) (exchange.ChangeResult, claimVerdict, error) {
	s.done = make(chan struct{})
	b.mu.Lock()
	b.pending = append(b.pending, s)
	batches := b.ready()
	if len(b.pending) > 0 && b.timer == nil && !b.due {
		b.timer = time.AfterFunc(b.window, b.expire)
	}
	b.mu.Unlock()
	for _, batch := range batches {
		go b.run(batch)
	}
	select {
	case <-s.done:
		return s.result, s.verdict, s.err
	case <-ctx.Done():
		return exchange.ChangeResult{}, claimVerdict{}, ctx.Err()
	}
}

// expire ends the window of the oldest pending submission: the batch is
// sent now, or as soon as a batch in flight is done.
func (b *batcher) expire() {
	b.mu.Lock()
	b.timer = nil
	b.due = len(b.pending) > 0
	batches := b.ready()
	b.mu.Unlock()
	for _, batch := range batches {
		go b.run(batch)
	}
}

// ready takes the batches that may start now: due or full ones, while
// fewer than batchesInFlight are in flight. Callers hold b.mu.
func (b *batcher) ready() [][]*submission {
	var out [][]*submission
	for b.inflight < batchesInFlight && len(b.pending) > 0 && (b.due || len(b.pending) >= b.max) {
		batch := b.take()
		if len(batch) == 0 {
			break // every pending one waits for a batch in flight
		}
		out = append(out, batch)
	}
	return out
}

// take removes up to max pending submissions that hold nothing a batch
// in flight holds, and counts them in flight. Callers hold b.mu.
func (b *batcher) take() []*submission {
	if b.timer != nil {
		b.timer.Stop()
		b.timer = nil
	}
	if b.held == nil {
		b.held = map[string]int{}
	}
	// What the batches in flight hold; this batch may hold it too.
	busy := make(map[string]bool, len(b.held))
	for k := range b.held {
		busy[k] = true
	}
	var batch, rest []*submission
	for _, s := range b.pending {
		h := s.holds()
		if len(batch) == b.max || busy[h[0]] || busy[h[1]] {
			rest = append(rest, s)
			continue
		}
		batch = append(batch, s)
		for _, k := range h {
			b.held[k]++
		}
	}
	b.pending = rest
	b.due = len(rest) > 0
	if len(batch) > 0 {
		b.inflight++
	}
	return batch
}

// finished lets go of what a batch held and starts the next one: at once
// when its window has passed (or it is full), else when its window ends.
func (b *batcher) finished(batch []*submission) {
	b.mu.Lock()
	b.inflight--
	for _, s := range batch {
		for _, k := range s.holds() {
			if b.held[k]--; b.held[k] <= 0 {
				delete(b.held, k)
			}
		}
	}
	batches := b.ready()
	switch {
	case len(b.pending) == 0:
		b.due = false
	case !b.due && b.timer == nil:
		b.timer = time.AfterFunc(b.window, b.expire)
	}
	b.mu.Unlock()
	for _, batch := range batches {
		go b.run(batch)
	}
}

func (b *batcher) run(batch []*submission) {
	defer b.finished(batch)
	// The batch outlives any one handler's context: it carries others. It
	// gives up before its claims run out.
	until := time.Now().Add(b.claimTTL)
	ctx, cancel := context.WithDeadline(context.Background(), until.Add(-b.claimTTL/5))
	defer cancel()
	// Claims are made only while this instance holds its liveness lease:
	// without it, the other replicas take them for a dead instance's.
	tenure, err := b.awaitTenure(ctx)
	if err != nil {
		for _, s := range batch {
			s.err = err
			close(s.done)
		}
		return
	}

	// The newest decision per partnership; the others are superseded.
	newest := map[string]*submission{}
	for _, s := range batch {
		d := s.decision
		if n, ok := newest[s.key]; !ok || older(n.decision.GetDecidedAt(), n.decision.GetDecisionId(), d.GetDecidedAt(), d.GetDecisionId()) {
			newest[s.key] = s
		}
	}
	// Copies of the kept decision (a redelivery beside the delivery) share
	// its fate.
	copies := map[*submission][]*submission{}
	finish := func(s *submission) {
		for _, c := range copies[s] {
			c.result, c.verdict, c.err = s.result, s.verdict, s.err
			close(c.done)
		}
		close(s.done)
	}
	claims := make([]*submission, 0, len(newest))
	for _, s := range batch {
		n := newest[s.key]
		switch {
		case n == s:
			claims = append(claims, s)
		case n.decision.GetDecisionId() == s.decision.GetDecisionId():
			copies[n] = append(copies[n], s)
		default:
			s.verdict = claimVerdict{kind: claimSuperseded, reason: "superseded by a newer decision (" + n.decision.GetDecisionId() + ") for the same device"}
			close(s.done)
		}
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, claimParallel)
	for _, s := range claims {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			s.verdict, s.err = b.claim(ctx, s.key, s.decision, until)
		}()
	}
	wg.Wait()
	send := claims[:0]
	for _, s := range claims {
		if s.err != nil || s.verdict.kind != claimClaimed {
			finish(s)
			continue
		}
		send = append(send, s)
	}
	if len(send) == 0 {
		return
	}
	// Oldest first: the exchange client keeps the last change per device.
	sort.SliceStable(send, func(i, j int) bool {
		return older(send[i].decision.GetDecidedAt(), send[i].decision.GetDecisionId(), send[j].decision.GetDecidedAt(), send[j].decision.GetDecisionId())
	})
	if n, held := b.tenure(); !held || n != tenure {
		// The lease was lost after the claims were made (NATS out of
		// reach for most of its TTL, say), so another replica may have
		// taken them over and be sending the same changes: send nothing.
		// Each handler releases its claim and is delivered again, to
		// claim afresh under the tenure of then.
		for _, s := range send {
			s.result = exchange.ChangeResult{Change: s.change, Err: errFenced}
			finish(s)
		}
		return
	}
	changes := make([]exchange.Change, len(send))
	for i, s := range send {
		changes[i] = s.change
	}
	results, err := b.apply(ctx, changes)
	for i, s := range send {
		if err != nil && (results == nil || results[i].Err == nil) {
			// The handler releases its claim and retries.
			s.result = exchange.ChangeResult{Change: s.change, Err: err}
		} else {
			s.result = results[i]
		}
		finish(s)
	}
}
