// Package evaluator judges matched partnerships against the org's policy
// and decides what Exchange should do with them. It publishes a decision
// only when the desired state differs from what Exchange has (or the user
// must be told how to enrol), notices drift, and guards against mass
// blocking: decisions that would take mail away from devices that have it
// are held until their sync pass (or MDM window) is complete, and released
// only if they stay under the blast-radius share.
package evaluator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/policy"
	"github.com/easguard/easguard/pkg/status"
	"github.com/easguard/easguard/pkg/telemetry"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Config configures the evaluator.
type Config struct {
	PolicyFile   string        `split_words:"true" desc:"The org's policy file (YAML, see pkg/policy). Empty: the default policy (everyone in scope, unknown and non-compliant devices blocked, users notified)."`
	DryRun       bool          `split_words:"true" desc:"Decide and record, never apply (in addition to dry_run in the policy file)."`
	BlastRadius  float64       `split_words:"true" default:"0.1" desc:"Blast-radius guard: when one sync pass (or MDM window) would take mail away from more than this share of the currently allowed devices, none of it is applied and an alert is raised."`
	BlastMinimum int           `split_words:"true" default:"3" desc:"Fewer revocations than this never trip the blast-radius guard (a small organisation must still be able to block one device)."`
	MDMWindow    time.Duration `split_words:"true" default:"3s" desc:"Revocations caused by MDM changes are gathered this long before the blast-radius guard judges them together."`
	// ReplicationGrace: see replicationStale.
	ReplicationGrace time.Duration `split_words:"true" default:"15m" desc:"For this long after easguard applied a decision, an observation that still shows the partnership as it was before the change (its WhenChanged is not after the apply) is taken as read from a domain controller that Active Directory has not replicated the change to yet: no drift alert and no second apply; a later observation decides. Within a site AD replicates in seconds; raise it to the inter-site replication interval if the CAS servers easguard uses are in different AD sites. 0 turns it off."`
}

// Validate checks the settings.
func (c *Config) Validate() error {
	if c.BlastRadius <= 0 || c.BlastRadius > 1 {
		return config.Invalid(&c.BlastRadius, "must be above 0 and at most 1, got %v", c.BlastRadius)
	}
	if c.BlastMinimum < 1 {
		return config.Invalid(&c.BlastMinimum, "must be at least 1")
	}
	if c.MDMWindow < 100*time.Millisecond {
		return config.Invalid(&c.MDMWindow, "must be at least 100ms")
	}
	if c.ReplicationGrace < 0 {
		return config.Invalid(&c.ReplicationGrace, "must not be negative, got %s", c.ReplicationGrace)
	}
	if c.PolicyFile != "" {
		if _, err := policy.Load(c.PolicyFile); err != nil {
			return config.Invalid(&c.PolicyFile, "%v", err)
		}
	}
	return nil
}

// Evaluator is the evaluator worker of one organisation.
type Evaluator struct {
	// overdueChecked is when the leaseholder's loop last looked for
	// overdue syncs (checkOverdue); the loop's own.
	overdueChecked time.Time
	org            bus.Org
	cfg            Config
	js             jetstream.JetStream
	pub            atomic.Pointer[bus.Publisher]
	log            *slog.Logger
	now            func() time.Time

	decisions, staged, parts, status, applied, leases jetstream.KeyValue
	// decisionsBulk reads a page's decision records at once.
	decisionsBulk *bus.BulkReader
	// decisionsStream is the decisions stream, for the queued check.
	decisionsStream jetstream.Stream

	// instance names this replica in the leases it holds.
	instance string
	// guardMu serializes this process's guard decisions before they take
	// the organisation-wide guard lock (see guarded).
	guardMu sync.Mutex
	// view is the guard's count of partnerships with mail (guardcount.go),
	// started by the first guard decision of this replica; life is Run's
	// context, which bounds it.
	viewMu sync.Mutex
	view   *allowedView
	life   context.Context

	// metrics are the domain metrics (Instrument), nowhere by default.
	metrics *instruments

	pol        atomic.Pointer[inForce]
	polMu      sync.Mutex
	polModTime time.Time
	polChecked time.Time
}

// New loads the policy and opens the evaluator's state.
func New(ctx context.Context, js jetstream.JetStream, org bus.Org, cfg Config, log *slog.Logger) (*Evaluator, error) {
	if log == nil {
		log = slog.Default()
	}
	host, _ := os.Hostname()
	e := &Evaluator{org: org, cfg: cfg, js: js, log: log.With("worker", "evaluator"), now: time.Now, instance: fmt.Sprintf("%s-%d", host, os.Getpid())}
	for _, b := range []struct {
		name string
		kv   *jetstream.KeyValue
	}{{bus.BucketDecisions, &e.decisions}, {bus.BucketStaged, &e.staged}, {bus.BucketPartnerships, &e.parts}, {bus.BucketStatus, &e.status}, {bus.BucketApplied, &e.applied}, {bus.BucketLeases, &e.leases}} {
		kv, err := js.KeyValue(ctx, b.name)
		if err != nil {
			return nil, fmt.Errorf("evaluator: open %s: %w", b.name, err)
		}
		*b.kv = kv
	}
	var err error
	if e.metrics, err = newInstruments(noop.NewMeterProvider(), string(org)); err != nil {
		return nil, err
	}
	if e.decisionsBulk, err = bus.NewBulkReader(ctx, js, e.decisions); err != nil {
		return nil, fmt.Errorf("evaluator: %w", err)
	}
	if e.decisionsStream, err = js.Stream(ctx, bus.StreamDecisions); err != nil {
		return nil, fmt.Errorf("evaluator: open %s: %w", bus.StreamDecisions, err)
	}
	if err := e.loadPolicy(true); err != nil {
		return nil, err
	}
	// The console shows the guard from the start, not only once it acted.
	initial := status.Guard{State: status.GuardOK, At: e.now(), Threshold: cfg.BlastRadius, Detail: "no revocation judged yet"}
	if err := status.Create(ctx, e.status, org, status.GuardKey, initial); err != nil && !errors.Is(err, status.ErrExists) {
		return nil, fmt.Errorf("evaluator: %w", err)
	}
	return e, nil
}

// SetInstance names this replica in the leases it holds (the service's
// instance id), so that an operator reading the lease bucket sees which
// replica runs the guard loop. Call it before Run.
func (e *Evaluator) SetInstance(name string) {
	if name != "" {
		e.instance = name
	}
}

// SetPublisher gives the evaluator the publisher it releases held
// decisions and raises alerts with (the runner's).
func (e *Evaluator) SetPublisher(p *bus.Publisher) { e.pub.Store(p) }

// Routes returns the evaluator's handlers.
func (e *Evaluator) Routes() []bus.Route {
	return []bus.Route{
		bus.Handle("device-matched", bus.DeviceMatched, e.Decide),
		// Pages are a hundred verdicts each: a few buffered suffice.
		bus.Handle("device-confirmed", bus.DevicesConfirmed, e.DecideConfirmed).Prefetch(2),
		// Its barrier polls until the pipeline has drained, and its
		// judgement takes the guard lease: one at a time.
		bus.Handle("sync-completed", bus.SyncCompleted, e.SyncCompleted).Serial(),
	}
}

// loadPolicy (re)reads the policy file when it changed.
func (e *Evaluator) loadPolicy(force bool) error {
	e.polMu.Lock()
	defer e.polMu.Unlock()
	if e.cfg.PolicyFile == "" {
		if e.pol.Load() == nil {
			p := policy.Default(string(e.org))
			e.pol.Store(&inForce{Policy: p, version: p.Version()})
			e.publishPolicy(p)
		}
		return nil
	}
	if !force && time.Since(e.polChecked) < 2*time.Second {
		return nil
	}
	e.polChecked = time.Now()
	st, err := os.Stat(e.cfg.PolicyFile)
	if err != nil {
		if force {
			return fmt.Errorf("evaluator: policy: %w", err)
		}
		e.log.Warn("policy file unreadable; keeping the last good policy", "error", err)
		return nil
	}
	if !force && st.ModTime().Equal(e.polModTime) {
		return nil
	}
	p, err := policy.Load(e.cfg.PolicyFile)
	if err == nil && p.Org != "" && p.Org != string(e.org) {
		err = fmt.Errorf("policy %s is for org %q, this evaluator serves %q", e.cfg.PolicyFile, p.Org, e.org)
	}
	if err != nil {
		if force {
			return fmt.Errorf("evaluator: %w", err)
		}
		e.log.Error("policy file invalid; keeping the last good policy", "error", err)
		return nil
	}
	e.polModTime = st.ModTime()
	loaded := &inForce{Policy: p, version: p.Version()}
	if old := e.pol.Swap(loaded); old == nil || old.version != loaded.version {
		e.log.Info("policy loaded", "file", e.cfg.PolicyFile, "version", loaded.version)
		e.publishPolicy(p)
	}
	return nil
}

// publishPolicy records the policy in force in the status bucket.
func (e *Evaluator) publishPolicy(p *policy.Policy) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st := status.Policy{Version: p.Version(), File: e.cfg.PolicyFile, DryRun: p.DryRun || e.cfg.DryRun, LoadedAt: e.now()}
	for _, w := range p.Warnings() {
		st.Warnings = append(st.Warnings, w.String())
		e.log.Warn("policy rule trusts a value the phone reports", "file", e.cfg.PolicyFile, "version", st.Version, "rule", w.Path, "warning", w.Message)
	}
	if err := putStatus(ctx, e, status.PolicyKey, st); err != nil {
		e.log.Warn("policy status not recorded", "error", err)
	}
}

// inForce is the policy the evaluator judges by, with its version worked
// out once when it is loaded: Version canonicalises and hashes the whole
// policy, and a full sync asks for it with every partnership (1.6% of the
// bytes a steady pass's hops allocated, in a profile of
// BenchmarkReconcile100k/hops_only).
type inForce struct {
	*policy.Policy
	version string
}

func (e *Evaluator) policy() *inForce {
	_ = e.loadPolicy(false)
	return e.pol.Load()
}

// satisfied reports whether Exchange already gives the partnership what
// easguard wants: Allow and Block are per-device list entries (reason
// Individual). Exchange has no per-device quarantine: easguard quarantines
// a device by keeping it off both lists, so that the organisation's
// default reaches it, and the default plan (orgdefault.go) makes that
// Quarantine — counting in the blast-radius guard every partnership it
// takes mail from, this one included while Exchange still allows it by the
// default. A device rule that admits the device is beyond the lists.
func satisfied(want ev.DesiredAccess, state ev.DeviceAccessState, reason ev.DeviceAccessStateReason) bool {
	switch want {
	case ev.DesiredAccess_DESIRED_ACCESS_ALLOW:
		return state == ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED && reason == ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_INDIVIDUAL
	case ev.DesiredAccess_DESIRED_ACCESS_BLOCK:
		return state == ev.DeviceAccessState_DEVICE_ACCESS_STATE_BLOCKED && reason == ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_INDIVIDUAL
	case ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE:
		// Taking an id off the lists re-stamps the device Unknown/Unknown
		// until its next request, when the org default quarantines it.
		return reason != ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_INDIVIDUAL &&
			!(state == ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED && reason == ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_DEVICE_RULE)
	}
	return false
}

// lostMargin is how long after a decision that Exchange never applied an
// observation must be taken before the decision counts as lost (its
// message dead-lettered, say) and is made again.
// Until then a decision not yet applied is offered again with every
// verdict under its own message id; the margin is well inside the
// streams' duplicate window (bus.Topology.DuplicateWindow, 10 minutes),
// so the stream drops those copies and the executor sees it once.
const lostMargin = 2 * time.Minute

// Decide evaluates one verdict of the matcher.
func (e *Evaluator) Decide(ctx context.Context, in *ev.DeviceMatched) ([]bus.Outbound, error) {
	key, err := e.recordKey(in)
	if err != nil {
		return nil, err
	}
	return e.decide(ctx, key, in, nil, telemetry.Traceparent(ctx))
}

// recordKey is the key of the decision record a verdict is judged against:
// org, device id, partnership.
func (e *Evaluator) recordKey(in *ev.DeviceMatched) (string, error) {
	p := in.GetObserved().GetPartnership()
	key, err := bus.StateKey(e.org, p.GetDeviceId(), ev.PartnershipID(p))
	if err != nil {
		return "", bus.Poison(err)
	}
	return key, nil
}

// DecideConfirmed evaluates the matcher's verdicts on a page of
// partnerships a sync found as they were, each as Decide would, with the
// page's decision records read in one batched request. In an organisation
// that is as the policy says, that read is all a page costs: nothing is
// written and nothing published. A decision made from a verdict continues
// its partnership's journey.
func (e *Evaluator) DecideConfirmed(ctx context.Context, in *ev.DevicesMatched) ([]bus.Outbound, error) {
	keys := make([]string, len(in.GetMatches()))
	for i, m := range in.GetMatches() {
		k, err := e.recordKey(m)
		if err != nil {
			return nil, fmt.Errorf("matches[%d]: %w", i, err)
		}
		keys[i] = k
	}
	records, err := e.decisionsBulk.Read(ctx, keys)
	if err != nil {
		return nil, err
	}
	var outs []bus.Outbound
	// Worked out once a page, and each partnership's journey only for
	// what it decided: a steady pass decides nothing, and the two took 1.6%
	// of what its hops allocated.
	tp := telemetry.Traceparent(ctx)
	for i, m := range in.GetMatches() {
		o, err := e.decide(ctx, keys[i], m, records.Take(keys[i]), tp)
		if err != nil {
			return nil, err
		}
		if len(o) == 0 {
			continue
		}
		if j := telemetry.ParseTraceparent(in.Journey(i)); j.IsValid() {
			for k := range o {
				if !o[k].Parent.IsValid() {
					o[k].Parent = j
				}
			}
		}
		outs = append(outs, o...)
	}
	return outs, nil
}

// decide judges one verdict against the decision record under key; read
// is the record as read with its page, nil to read it here; traceparent
// is ctx's, which a record it writes keeps.
func (e *Evaluator) decide(ctx context.Context, key string, in *ev.DeviceMatched, read *bus.Read, traceparent string) ([]bus.Outbound, error) {
	obs := in.GetObserved()
	p := obs.GetPartnership()
	var err error
	if obs.GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_GONE {
		if _, err := bus.Modify(ctx, e.decisions, key, func(*ev.DecisionRecord, bool) (bus.Change, error) { return bus.Remove, nil }); err != nil {
			return nil, err
		}
		return nil, nil
	}
	pol := e.policy()
	now := e.now()
	v := pol.Evaluate(policy.Input{Org: string(e.org), Mailbox: p.GetMailbox(), Partnership: p, MDM: in.GetMdm(), NoMatch: in.GetNoMatchReason(), Now: now})
	ok := satisfied(v.Desired, p.GetDeviceAccessState(), p.GetDeviceAccessStateReason())
	// What the executor applied matters only where Exchange disagrees with
	// the verdict (drift, replication, a decision in flight); a full sync
	// of an organisation that is as the policy says skips the read.
	applied := &ev.AppliedRecord{}
	if v.InScope && !ok {
		if applied, _, err = bus.Load[ev.AppliedRecord](ctx, e.applied, key); err != nil {
			return nil, err
		}
	}
	f := facts{
		key: key, org: e.org, in: in, verdict: v, applied: applied,
		dryRun: pol.DryRun || e.cfg.DryRun, notify: pol.Notify, policyVersion: pol.version,
		replicationGrace: e.cfg.ReplicationGrace, now: now, traceparent: traceparent,
		queued: func(deviceID, decisionID string) bool { return e.queued(ctx, deviceID, decisionID) },
	}
	var outs []bus.Outbound
	var stage, made *ev.AccessDecided
	_, err = bus.ModifyRead(ctx, e.decisions, key, read, func(rec *ev.DecisionRecord, exists bool) (bus.Change, error) {
		j := judge(f, rec, exists)
		outs, stage, made = nil, j.stage, j.made
		if j.stale {
			e.log.Debug("observation predates replication of the applied change", "device_id", p.GetDeviceId(), "decision_id", rec.GetDecisionId(),
				"observed_at", obs.GetObservedAt().AsTime(), "applied_at", applied.GetAppliedAt().AsTime())
		}
		if j.drift {
			a, err := e.driftAlert(j.made)
			if err != nil {
				return bus.Keep, err
			}
			outs = append(outs, a)
		}
		if j.publish != nil {
			out, err := DecisionOutbound(e.org, j.publish)
			if err != nil {
				return bus.Keep, bus.Poison(err)
			}
			outs = append(outs, out)
		}
		return j.change, nil
	})
	if err != nil {
		return nil, err
	}
	if made != nil {
		e.decided(ctx, made)
	}
	if stage != nil {
		if err := e.stage(ctx, in, stage); err != nil {
			return nil, err
		}
	}
	if v.InScope && !v.RecheckAt.IsZero() {
		if err := e.scheduleRecheck(ctx, key, p, v.RecheckAt); err != nil {
			return nil, err
		}
	}
	return outs, nil
}

// decidedAfter is the time of a new decision about a partnership: now,
// but never at or before the decision the record holds. The executor
// applies the newest decision by this time; two replicas that judge one
// partnership at once read their clocks before their compare-and-set,
// so the one that writes second may hold the earlier reading, and its
// decision, the newer one, would be taken for the older and superseded.
func decidedAfter(rec *ev.DecisionRecord, exists bool, now time.Time) time.Time {
	if exists && rec.GetDecidedAt().IsValid() && !now.After(rec.GetDecidedAt().AsTime()) {
		return rec.GetDecidedAt().AsTime().Add(time.Microsecond)
	}
	return now
}

// confirmResolution is how old a decision's confirmation may get while
// Exchange keeps agreeing with it and nothing else about it changes: a full
// sync of an organisation that is as the policy says then costs the
// decisions one read per partnership, not a read and a write. Only the
// fact that Exchange agreed after the decision counts (drift is a later
// observation that disagrees), not how recently it was seen to.
const confirmResolution = 12 * time.Hour

// unchangedRecord reports whether judging in changed nothing about a
// decision but when it was last confirmed and matched: the same verdict
// for the same partnership and MDM record, the same decision and flags,
// and a confirmation newer than confirmResolution. Such a record is not
// written again. before is the record as read, nil if there was none.
func unchangedRecord(before, after *ev.DecisionRecord, in *ev.DeviceMatched) bool {
	if before == nil || !before.GetConfirmedAt().IsValid() || !after.GetConfirmedAt().IsValid() ||
		after.GetConfirmedAt().AsTime().Sub(before.GetConfirmedAt().AsTime()) >= confirmResolution ||
		!sameVerdictInput(before.GetLastMatched(), in) {
		return false
	}
	return equalExcept(before, after, "last_matched", "confirmed_at", "traceparent")
}

// sameVerdictInput reports whether two verdicts of the matcher say the same
// about the same partnership: equal but for when and why they were made
// (matched, observed, the sync, the trigger, the kind of observation).
//
// A full sync asks this of every partnership, so it compares the scalars
// itself and the partnership and MDM record by their encodings
// (sameEncoding), not through protoreflect, whose walk took about 5% of the
// matcher's and evaluator's CPU in a steady pass (a profile of
// BenchmarkReconcile100k/hops_only). TestSameVerdictInputMatchesReflection
// holds it to the reflective comparison field by field, so a field added
// to either message is compared without a change here, or fails that test.
func sameVerdictInput(a, b *ev.DeviceMatched) bool {
	if a == nil || b == nil {
		return false
	}
	oa, ob := a.GetObserved(), b.GetObserved()
	if a.GetOrg() != b.GetOrg() || a.GetMethod() != b.GetMethod() || a.GetNoMatchReason() != b.GetNoMatchReason() ||
		a.GetDetail() != b.GetDetail() || !sameUnknown(a, b) || (oa == nil) != (ob == nil) {
		return false
	}
	if oa != nil && (oa.GetOrg() != ob.GetOrg() || !sameUnknown(oa, ob) || !sameEncoding(oa.GetPartnership(), ob.GetPartnership())) {
		return false
	}
	return sameEncoding(a.GetMdm(), b.GetMdm())
}

// queued reports whether a decision is on the bus and the executor has
// not settled it yet: behind a backlog (an onboarding of thousands of
// mailboxes paced by Exchange) a decision waits longer than lostMargin,
// and deciding it again would only queue a second apply behind the first.
// A decision that was never published, or that the executor settled
// without applying (it dead-lettered it), is not queued. Where it cannot
// tell, it says not queued, which decides again as before.
func (e *Evaluator) queued(ctx context.Context, deviceID, decisionID string) bool {
	subject, err := bus.AccessDecided.Subject(e.org, deviceID)
	if err != nil || decisionID == "" {
		return false
	}
	m, err := e.decisionsStream.GetLastMsgForSubject(ctx, subject)
	if err != nil || m.Header.Get(jetstream.MsgIDHeader) != "decided:"+decisionID {
		return false // never published, or a newer message (another partnership of the id) since
	}
	c, err := e.decisionsStream.Consumer(ctx, bus.DurableName("executor", "access-decided", e.org))
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		return true // no executor has bound yet: it will find the decision waiting
	}
	if err != nil {
		return false
	}
	info, err := c.Info(ctx)
	if err != nil {
		return false
	}
	return info.AckFloor.Stream < m.Sequence
}

// decisionID is stable for the same partnership, verdict time and outcome,
// so a redelivered verdict produces the same decision (and the same
// message id, which the stream drops as a duplicate).
func decisionID(key string, d *ev.AccessDecided) string {
	sum := sha256.Sum256([]byte(key + "|" + d.GetDesired().String() + "|" + d.GetRule() + "|" + strconv.FormatInt(d.GetDecidedAt().AsTime().UnixNano(), 10)))
	return hex.EncodeToString(sum[:12])
}

func shortState(s ev.DeviceAccessState) string {
	return strings.TrimPrefix(s.String(), "DEVICE_ACCESS_STATE_")
}

func shortReason(r ev.DeviceAccessStateReason) string {
	return strings.TrimPrefix(r.String(), "DEVICE_ACCESS_STATE_REASON_")
}

func shortDesired(d ev.DesiredAccess) string {
	return strings.TrimPrefix(d.String(), "DESIRED_ACCESS_")
}

func mailboxName(mb *ev.Mailbox) string {
	if mb.GetPrimarySmtpAddress() != "" {
		return mb.GetPrimarySmtpAddress()
	}
	return mb.GetIdentity()
}

// alert builds an alert output.
func (e *Evaluator) alert(kind ev.AlertKind, sev ev.AlertSeverity, id, summary string, detail map[string]string) (bus.Outbound, error) {
	return bus.AlertOutbound(e.org, kind, sev, id, summary, detail, e.now())
}

// driftAlert builds the alert of decision d, made because Exchange was
// changed back by hand after it agreed.
func (e *Evaluator) driftAlert(d *ev.AccessDecided) (bus.Outbound, error) {
	p := d.GetPartnership()
	return e.alert(ev.AlertKind_ALERT_KIND_DRIFT, ev.AlertSeverity_ALERT_SEVERITY_WARNING, "drift:"+d.GetDecisionId(),
		fmt.Sprintf("%s of %s was changed on Exchange outside easguard; correcting it", p.GetDeviceId(), mailboxName(p.GetMailbox())),
		map[string]string{"device_id": p.GetDeviceId(), "mailbox": mailboxName(p.GetMailbox()), "exchange_state": shortState(p.GetDeviceAccessState()),
			"exchange_reason": shortReason(p.GetDeviceAccessStateReason()), "desired": shortDesired(d.GetDesired()), "decision_id": d.GetDecisionId()})
}

// batchOf names the guard batch of a verdict: its sync pass, or the MDM
// window it fell into.
func (e *Evaluator) batchOf(in *ev.DeviceMatched) (kind, id string) {
	if in.GetTrigger() == "eas" && in.GetObserved().GetSync().GetSyncId() != "" {
		return "sync", in.GetObserved().GetSync().GetSyncId()
	}
	w := in.GetMatchedAt().AsTime().UnixNano() / int64(e.cfg.MDMWindow)
	return "mdm", strconv.FormatInt(w, 10)
}

func (e *Evaluator) stage(ctx context.Context, in *ev.DeviceMatched, d *ev.AccessDecided) error {
	kind, id := e.batchOf(in)
	p := d.GetPartnership()
	key, err := bus.StateKey(e.org, kind, id, p.GetDeviceId(), ev.PartnershipID(p))
	if err != nil {
		return bus.Poison(err)
	}
	return bus.Put(ctx, e.staged, key, &ev.StagedDecision{Decision: d, Batch: kind + "/" + id, Traceparent: telemetry.Traceparent(ctx)})
}

// SyncCompleted judges the revocations a sync pass staged, once every
// observation of the pass has gone through the matcher and the evaluator.
func (e *Evaluator) SyncCompleted(ctx context.Context, in *ev.SyncCompleted) ([]bus.Outbound, error) {
	for _, c := range []struct{ service, route, stream string }{
		{"matcher", "eas-observed", bus.StreamEAS}, {"matcher", "eas-confirmed", bus.StreamEAS},
		{"evaluator", "device-matched", bus.StreamMatch}, {"evaluator", "device-confirmed", bus.StreamMatch},
	} {
		if err := e.waitDrained(ctx, c.service, c.route, c.stream); err != nil {
			return nil, err
		}
	}
	judged := e.now()
	pub := e.pub.Load()
	if pub == nil {
		return nil, errors.New("evaluator: no publisher yet")
	}
	prefix, err := bus.StateKey(e.org, "sync", in.GetSyncId())
	if err != nil {
		return nil, bus.Poison(err)
	}
	err = e.guarded(ctx, func(ctx context.Context) error {
		if err := e.finalize(ctx, "sync/"+in.GetSyncId(), prefix, pub); err != nil {
			return err
		}
		// A full sync that read every partnership and the organisation's
		// default: plan the default from there. An incomplete one could
		// not count whom a tighter default takes mail from.
		if in.GetKind() == ev.SyncKind_SYNC_KIND_FULL && in.GetSuccess() && in.GetDefaultAccessLevel() != "" {
			if err := e.planDefault(ctx, in.GetSyncId(), in.GetDefaultAccessLevel(), pub); err != nil {
				return fmt.Errorf("plan the organisation's default: %w", err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	st := status.PassJudged{SyncID: in.GetSyncId(), Kind: in.GetKind().Short(),
		Observed: in.GetCounts().GetObserved(), FinishedAt: in.GetFinishedAt().AsTime(), JudgedAt: judged}
	return nil, putStatus(ctx, e, status.PassJudgedKey(st.Kind), st)
}

// DecisionOutbound is how a decision goes on the bus: under its device's
// subject, with a message id made from the decision id, so that a decision
// offered again after a crash is dropped by the stream as a duplicate
// while a new decision about the same device never is.
func DecisionOutbound(org bus.Org, d *ev.AccessDecided) (bus.Outbound, error) {
	subject, err := bus.AccessDecided.Subject(org, d.GetPartnership().GetDeviceId())
	if err != nil {
		return bus.Outbound{}, fmt.Errorf("decision %s: %w", d.GetDecisionId(), err)
	}
	return bus.Outbound{Subject: subject, Message: d, MsgID: "decided:" + d.GetDecisionId()}, nil
}

// waitDrained waits until a worker's consumer of this org has nothing
// pending or unacknowledged: a barrier that says every message published
// before now has been handled.
func (e *Evaluator) waitDrained(ctx context.Context, service, route, stream string) error {
	name := bus.DurableName(service, route, e.org)
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	deadline := time.Now().Add(15 * time.Minute)
	for {
		// The barrier runs inside the evaluator's own handler for its
		// device-matched consumer only from the background loop, so a
		// drained consumer means every message before now is handled.
		drained, info, err := bus.ConsumerDrained(ctx, e.js, stream, name)
		switch {
		case errors.Is(err, jetstream.ErrConsumerNotFound):
			return nil // that worker never ran for this org
		case err != nil:
			// The bus is electing a leader or restarting: wait it out
			// here. Failing would spend one of the message's deliveries
			// each time, and an outage of the whole cluster used them
			// all up in seconds (a sync's report dead-lettered).
		case drained:
			return nil
		}
		if time.Now().After(deadline) {
			if err != nil {
				return bus.RetryAfter(10*time.Second, fmt.Errorf("barrier on %s: %w", name, err))
			}
			return bus.RetryAfter(10*time.Second, fmt.Errorf("%s still has %d pending and %d unacknowledged messages", name, info.NumPending, info.NumAckPending))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// guardKey names a set of staged revocations, whatever pass brought them.
func guardKey(staged []*ev.StagedDecision) string {
	ids := make([]string, 0, len(staged))
	for _, s := range staged {
		d := s.GetDecision()
		ids = append(ids, d.GetPartnership().GetDeviceId()+"|"+ev.PartnershipID(d.GetPartnership())+"|"+d.GetDesired().String())
	}
	sort.Strings(ids)
	sum := sha256.Sum256([]byte(strings.Join(ids, "\n")))
	return hex.EncodeToString(sum[:12])
}

// finalize releases or refuses the decisions staged under prefix, judged
// together as one batch; callers hold the guard lock (guarded). It
// publishes what it releases (and the alert, when it refuses) before it
// marks the records and drops the staged entries, so a crash in between
// re-offers the batch; the decisions' message ids make a second release a
// duplicate.
func (e *Evaluator) finalize(ctx context.Context, batch, prefix string, pub *bus.Publisher) error {
	keys, err := bus.ListKeys(ctx, e.staged, prefix+".>")
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		return nil
	}
	// Only entries whose decision is still the device's current one, and
	// still waiting for the guard (staged) or refused by it (held: a
	// guard decision on this batch that stopped half-way, before it
	// dropped the entries). Held ones count again, so the batch is judged
	// again whole, never as the part a first judgement left: a part may be
	// under the share where the whole was not. Entries of a decision
	// since replaced, or already released, are only dropped.
	var staged []*ev.StagedDecision
	var current []*ev.DecisionRecord
	heldAgain := 0
	for _, k := range keys {
		s, ok, err := bus.Load[ev.StagedDecision](ctx, e.staged, k)
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		p := s.GetDecision().GetPartnership()
		dk, err := bus.StateKey(e.org, p.GetDeviceId(), ev.PartnershipID(p))
		if err != nil {
			return bus.Poison(err)
		}
		rec, ok, err := bus.Load[ev.DecisionRecord](ctx, e.decisions, dk)
		if err != nil {
			return err
		}
		if !ok || rec.GetDecisionId() != s.GetDecision().GetDecisionId() || !rec.GetStaged() && !rec.GetHeld() {
			continue
		}
		if rec.GetHeld() {
			heldAgain++
		}
		staged = append(staged, s)
		current = append(current, rec)
	}
	if len(staged) == 0 {
		return e.dropStaged(ctx, keys)
	}
	allowed, err := e.allowedCount(ctx)
	if err != nil {
		return err
	}
	// Every staged decision takes mail from a device that has it; the
	// held ones among them allowedCount counted already.
	allowed += len(staged) - heldAgain
	share := 0.0
	if allowed > 0 {
		share = float64(len(staged)) / float64(allowed)
	}
	var outs []bus.Outbound
	over := len(staged) >= e.cfg.BlastMinimum && share > e.cfg.BlastRadius
	approved := status.GuardApproval{}
	if over {
		if a, ok := e.approval(ctx, guardKey(staged)); ok {
			// An administrator approved exactly this set: it goes through.
			approved, over = a, false
			e.log.Warn("blast-radius guard: releasing an approved mass revocation", "batch", batch, "revocations", len(staged), "allowed", allowed,
				"approved_by", a.By, "reason", a.Reason)
		}
	}
	if over {
		st := status.Guard{State: status.GuardTripped, Batch: batch, Revocations: len(staged), Allowed: allowed, Share: share, Threshold: e.cfg.BlastRadius, At: e.now(),
			Detail: fmt.Sprintf("%s would have taken mail away from %d of %d allowed devices (%.0f%%, limit %.0f%%); none of these revocations was applied. "+
				"If this is intended, approve it in the console (or easguard approve %s); if not, discard it.",
				batch, len(staged), allowed, 100*share, 100*e.cfg.BlastRadius, guardKey(staged)),
			Key: guardKey(staged), Since: e.now()}
		// A guard record that cannot be read counts as another set: the
		// alert is raised again rather than never.
		prev, ok, _ := status.Get[status.Guard](ctx, e.status, e.org, status.GuardKey)
		switch {
		case ok && prev.State == status.GuardTripped && prev.Key == st.Key:
			st.Since = prev.Since // the same revocations again: still holding, already alerted
		case ok && prev.State == status.GuardDiscarded && prev.Key == st.Key:
			// An administrator discarded exactly this set: held, quietly.
			st.State, st.Since, st.Detail = status.GuardDiscarded, prev.Since, prev.Detail
		default:
			e.log.Error("blast-radius guard tripped", "batch", batch, "revocations", len(staged), "allowed", allowed)
			a, err := e.alert(ev.AlertKind_ALERT_KIND_BLAST_RADIUS, ev.AlertSeverity_ALERT_SEVERITY_CRITICAL, "blast:"+batch, st.Detail,
				map[string]string{"batch": batch, "revocations": strconv.Itoa(len(staged)), "allowed": strconv.Itoa(allowed), "threshold": fmt.Sprint(e.cfg.BlastRadius)})
			if err != nil {
				return err
			}
			outs = append(outs, a)
		}
		// The alert first: once the status says tripped for this set, a
		// second judgement of it takes the alert for raised.
		for _, o := range outs {
			if _, err := pub.Publish(ctx, o); err != nil {
				return err
			}
		}
		if err := putStatus(ctx, e, status.GuardKey, st); err != nil {
			return err
		}
		// Mark the refused decisions held: the devices keep their mail, and
		// the next evaluation of each judges it again with its own pass,
		// so the guard holds for as long as the mass revocation would.
		for _, s := range staged {
			p := s.GetDecision().GetPartnership()
			dk, err := bus.StateKey(e.org, p.GetDeviceId(), ev.PartnershipID(p))
			if err != nil {
				return bus.Poison(err)
			}
			held := false
			if _, err := bus.Modify(ctx, e.decisions, dk, func(rec *ev.DecisionRecord, exists bool) (bus.Change, error) {
				held = false
				if exists && rec.GetDecisionId() == s.GetDecision().GetDecisionId() && rec.GetStaged() {
					rec.Staged, rec.Held, held = false, true, true
					return bus.Write, nil
				}
				return bus.Keep, nil
			}); err != nil {
				return err
			}
			if held {
				e.guardHeld(ctx, 1)
			}
		}
		return e.dropStaged(ctx, keys)
	}
	if heldAgain > 0 {
		// Judged whole, the batch no longer trips the guard (devices were
		// allowed since): the held decisions are judged again with their
		// devices' next pass, as any held decision is, not released here.
		e.log.Warn("guard batch judged again is under the share now; held decisions wait for their next pass", "batch", batch, "held", heldAgain)
	}
	var release []*ev.StagedDecision
	for i, s := range staged {
		if current[i].GetHeld() {
			continue
		}
		d := s.GetDecision()
		out, err := DecisionOutbound(e.org, d)
		if err != nil {
			return bus.Poison(err)
		}
		out.Parent = telemetry.ParseTraceparent(s.GetTraceparent())
		outs = append(outs, out)
		release = append(release, s)
	}
	// Published before the records say released: a guard decision that
	// stops in between finds them still staged and publishes them again,
	// under the same message ids.
	for _, o := range outs {
		if _, err := pub.Publish(ctx, o); err != nil {
			return err
		}
	}
	for _, s := range release {
		d := s.GetDecision()
		p := d.GetPartnership()
		dk, err := bus.StateKey(e.org, p.GetDeviceId(), ev.PartnershipID(p))
		if err != nil {
			return bus.Poison(err)
		}
		if _, err := bus.Modify(ctx, e.decisions, dk, func(rec *ev.DecisionRecord, exists bool) (bus.Change, error) {
			if exists && rec.GetDecisionId() == d.GetDecisionId() && rec.GetStaged() {
				rec.Staged = false
				return bus.Write, nil
			}
			return bus.Keep, nil
		}); err != nil {
			return err
		}
	}
	st := status.Guard{State: status.GuardOK, Batch: batch, Revocations: len(staged), Allowed: allowed, Share: share,
		Threshold: e.cfg.BlastRadius, At: e.now(), Detail: fmt.Sprintf("%s: %d revocation(s) released", batch, len(release))}
	if approved.Key != "" {
		st.State, st.Key = status.GuardApproved, approved.Key
		st.Detail = fmt.Sprintf("%s: %d revocation(s) of %d allowed devices released, approved by %s", batch, len(release), allowed, approved.By)
	}
	if err := putStatus(ctx, e, status.GuardKey, st); err != nil {
		return err
	}
	if approved.Key != "" {
		// Used: the same set held again later needs a new approval.
		if err := status.Delete(ctx, e.status, e.org, status.GuardApprovalKey); err != nil {
			e.log.Warn("used guard approval not deleted; it expires on its own", "error", err)
		}
	}
	return e.dropStaged(ctx, keys)
}

// dropStaged deletes staged entries once their outcome is published.
func (e *Evaluator) dropStaged(ctx context.Context, keys []string) error {
	for _, k := range keys {
		if err := e.staged.Delete(ctx, k); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			return fmt.Errorf("drop staged %s: %w", k, err)
		}
	}
	return nil
}

// putStatus records v under key in the organisation's status.
func putStatus[T any](ctx context.Context, e *Evaluator, key string, v T) error {
	return status.Put(ctx, e.status, e.org, key, v)
}

// Run finalizes MDM windows once they are closed and the pipeline behind
// them is drained, and re-evaluates decisions whose time has come (grace
// periods, exemptions that end). Of all replicas of the organisation's
// evaluator only the one holding the "evaluator" lease runs this loop, so
// that one guard judges each MDM window; the others stand by and one of
// them takes over within the lease TTL when the holder stops. It returns
// when ctx ends.
func (e *Evaluator) Run(ctx context.Context) error {
	e.viewMu.Lock()
	e.life = ctx
	e.viewMu.Unlock()
	lease, err := bus.NewLease(ctx, e.leases, "evaluator", e.org, e.instance, e.log)
	if err != nil {
		return fmt.Errorf("evaluator: %w", err)
	}
	return lease.Run(ctx, e.loop)
}

// loop is the leaseholder's background work, until ctx ends.
func (e *Evaluator) loop(ctx context.Context) {
	// The guard's view, replayed now rather than by the first judgement
	// of an MDM window (seconds at 100,000 partnerships).
	if _, err := e.allowedView(ctx); err != nil {
		e.log.Warn("guard view not started; the first guard decision starts it", "error", err)
	}
	t := time.NewTicker(e.cfg.MDMWindow / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := e.tick(ctx); err != nil && ctx.Err() == nil {
			e.log.Warn("evaluator background work", "error", err)
		}
	}
}

// guarded runs fn, a guard decision (finalize, the default's plan), while
// holding the organisation's "guard" lease, which no two replicas hold at
// once: a sync pass's finalize (run by whichever replica its
// sync.completed reached) and the leaseholder's loop never judge at the
// same time, and two deliveries of one sync.completed never judge one
// batch from two views of it. The lease is renewed while fn runs; if it
// is lost, fn's context is cancelled and the error says so.
func (e *Evaluator) guarded(ctx context.Context, fn func(ctx context.Context) error) error {
	e.guardMu.Lock()
	defer e.guardMu.Unlock()
	lease, err := bus.NewLease(ctx, e.leases, "guard", e.org, e.instance, e.log)
	if err != nil {
		return fmt.Errorf("guard lock: %w", err)
	}
	ran, lost := false, false
	var ferr error
	if err := lease.Run(ctx, func(lctx context.Context) {
		ran = true
		ferr = fn(lctx)
		lost = lctx.Err() != nil && ctx.Err() == nil
	}); err != nil {
		return fmt.Errorf("guard lock: %w", err)
	}
	switch {
	case !ran && ctx.Err() != nil:
		return ctx.Err()
	case !ran:
		return ErrGuardLockLost
	case lost && ferr != nil:
		return fmt.Errorf("%w: %w", ErrGuardLockLost, ferr)
	}
	return ferr
}

// ErrGuardLockLost is returned when a guard decision lost the guard lock
// before it was done; it is retried, and judges again from what it left.
var ErrGuardLockLost = errors.New("evaluator: guard lock lost")

func (e *Evaluator) tick(ctx context.Context) error {
	pub := e.pub.Load()
	if pub == nil {
		return nil
	}
	if err := e.checkOverdue(ctx, pub); err != nil {
		e.log.Warn("overdue syncs not checked", "error", err)
	}
	prefix, _ := bus.StateKey(e.org, "mdm")
	keys, err := bus.ListKeys(ctx, e.staged, prefix+".>")
	if err != nil {
		return err
	}
	// The oldest window that has closed. Its revocations are judged with
	// every MDM revocation staged by then, of whichever window: a burst
	// of changes that straddles a window boundary is one mass revocation,
	// not two small ones that each pass the guard.
	current := e.now().UnixNano() / int64(e.cfg.MDMWindow)
	oldest := int64(-1)
	for _, k := range keys {
		parts := strings.Split(k, ".")
		if len(parts) < 3 {
			continue
		}
		w, err := strconv.ParseInt(parts[2], 10, 64)
		if err != nil || w >= current {
			continue // the window is still open
		}
		if oldest < 0 || w < oldest {
			oldest = w
		}
	}
	if oldest >= 0 {
		// Every MDM change published by now has been matched and judged,
		// so each revocation it causes is staged.
		if err := e.waitDrained(ctx, "matcher", "mdm-changed", bus.StreamMDM); err != nil {
			return err
		}
		if err := e.waitDrained(ctx, "evaluator", "device-matched", bus.StreamMatch); err != nil {
			return err
		}
		if err := e.guarded(ctx, func(ctx context.Context) error {
			return e.finalize(ctx, "mdm/"+strconv.FormatInt(oldest, 10), prefix, pub)
		}); err != nil {
			return err
		}
	}
	if err := e.waitingDefault(ctx, pub); err != nil {
		return err
	}
	return e.rechecks(ctx, pub)
}

// rechecks re-evaluates decisions whose recheck time has passed, with the
// verdict they were based on and the current time.
func (e *Evaluator) rechecks(ctx context.Context, pub *bus.Publisher) error {
	prefix, _ := bus.StateKey(e.org, "recheck")
	keys, err := bus.ListKeys(ctx, e.staged, prefix+".>")
	if err != nil {
		return err
	}
	now := e.now().Unix()
	for _, k := range keys {
		parts := strings.Split(k, ".")
		if len(parts) < 3 {
			continue
		}
		due, err := strconv.ParseInt(parts[2], 10, 64)
		if err != nil || due > now {
			continue
		}
		entry, err := e.staged.Get(ctx, k)
		if err != nil {
			continue
		}
		rec, ok, err := bus.Load[ev.DecisionRecord](ctx, e.decisions, string(entry.Value()))
		if err != nil {
			return err
		}
		if ok && rec.GetLastMatched() != nil {
			rctx := trace.ContextWithRemoteSpanContext(ctx, telemetry.ParseTraceparent(rec.GetTraceparent()))
			// The same verdict, judged now: a new verdict in Decide's eyes
			// (not a redelivery), and a revocation it leads to is held with
			// the current MDM window, which the loop judges, not with a
			// sync pass judged long ago.
			again := proto.Clone(rec.GetLastMatched()).(*ev.DeviceMatched)
			again.Trigger, again.MatchedAt = "recheck", timestamppb.New(e.now())
			outs, err := e.Decide(rctx, again)
			if err != nil {
				return err
			}
			for _, o := range outs {
				if _, err := pub.Publish(ctx, o); err != nil {
					return err
				}
			}
		}
		// Only the entry read above: if the re-evaluation scheduled the
		// same recheck again, that one stays.
		if err := e.staged.Delete(ctx, k, jetstream.LastRevision(entry.Revision())); err != nil &&
			!errors.Is(err, jetstream.ErrKeyNotFound) && !bus.IsConflict(err) {
			return fmt.Errorf("drop recheck %s: %w", k, err)
		}
	}
	return nil
}

// scheduleRecheck remembers to re-evaluate a decision at a time.
func (e *Evaluator) scheduleRecheck(ctx context.Context, decisionKey string, p *ev.EASPartnership, at time.Time) error {
	// Rounded up to the second, so the recheck never runs before at.
	due := at.Add(time.Second - time.Nanosecond).Unix()
	key, err := bus.StateKey(e.org, "recheck", strconv.FormatInt(due, 10), p.GetDeviceId(), ev.PartnershipID(p))
	if err != nil {
		return bus.Poison(err)
	}
	if _, err := e.staged.Put(ctx, key, []byte(decisionKey)); err != nil {
		return fmt.Errorf("schedule recheck: %w", err)
	}
	return nil
}
