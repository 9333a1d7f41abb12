package evaluator

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/policy"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// facts is everything judge weighs besides the decision record: the
// matcher's verdict, the policy's verdict on it, what the executor last
// applied, and the worker's settings. Gathering them is the evaluator's
// (reads of the bus, the clock); weighing them is judge's alone, so that
// every rule of when to decide, offer again, stage or keep quiet can be
// tested without a bus.
type facts struct {
	// key is the decision record's key, which names the decisions made.
	key string
	org bus.Org
	in  *ev.DeviceMatched
	// verdict is the policy's on in.
	verdict policy.Verdict
	// applied is what the executor last applied for the partnership; an
	// empty record when there is none or it was not read (the verdict is
	// out of scope, or Exchange already agrees with it).
	applied *ev.AppliedRecord
	// dryRun is the policy's dry run or the worker's; notify is whether
	// the policy mails users at all; policyVersion names the policy.
	dryRun, notify bool
	policyVersion  string
	// replicationGrace is Config.ReplicationGrace (see replicationStale).
	replicationGrace time.Duration
	now              time.Time
	// traceparent is the journey the record is judged in, if traced.
	traceparent string
	// queued asks whether the record's decision still waits for the
	// executor (Evaluator.queued reads the bus); judge asks only when a
	// decision never applied is old enough to be taken for lost.
	queued func(deviceID, decisionID string) bool
}

// judgement is what judge makes of a verdict: how the decision record
// changes (judge has edited it in place when the change is Write) and
// what goes on the bus.
type judgement struct {
	change bus.Change
	// made is the decision judge made now, if it made one; it is also in
	// publish or stage.
	made *ev.AccessDecided
	// publish is a decision for the executor: made now, or one the record
	// holds that is offered again (its message id makes the stream drop a
	// copy that did go out).
	publish *ev.AccessDecided
	// stage is a decision that takes mail away and waits for the
	// blast-radius guard.
	stage *ev.AccessDecided
	// drift says made corrects a change made on Exchange by hand.
	drift bool
	// stale says Exchange disagrees only because it was read before its
	// domain controller saw easguard's own change (replicationStale).
	stale bool
}

// judge weighs one verdict of the matcher against the partnership's
// decision record (rec as read, exists false when there is none). It
// decides only where Exchange disagrees with the policy, never twice for
// the same verdict, and never over a newer verdict already judged. It
// reads nothing but f.queued, and writes nothing but rec, which it leaves
// as it is to be stored (its last decision compacted: see
// compactLastDecision); the decisions it returns are whole.
func judge(f facts, rec *ev.DecisionRecord, exists bool) judgement {
	expandLastDecision(rec)
	j := weigh(f, rec, exists)
	if j.change == bus.Write {
		compactLastDecision(rec)
	}
	return j
}

// expandLastDecision gives rec's last decision back the partnership and
// MDM record compactLastDecision left out of it: its verdict's.
func expandLastDecision(rec *ev.DecisionRecord) {
	if rec.GetLastDecisionSharesMatched() {
		rec.LastDecision, rec.LastDecisionSharesMatched = wholeLastDecision(rec), false
	}
}

// wholeLastDecision is rec's last decision as it was made, whether or not
// it is stored compacted; rec is not changed.
func wholeLastDecision(rec *ev.DecisionRecord) *ev.AccessDecided {
	if !rec.GetLastDecisionSharesMatched() || rec.GetLastDecision() == nil {
		return rec.GetLastDecision()
	}
	d := shallowCopy(rec.GetLastDecision())
	d.Partnership, d.Mdm = rec.GetLastMatched().GetObserved().GetPartnership(), rec.GetLastMatched().GetMdm()
	return d
}

// compactLastDecision leaves the partnership and MDM record out of rec's
// last decision when they are those of the verdict rec keeps, as they are
// for a decision made from it and stay while the partnership and its MDM
// record do not change: stored once, not twice, they halve what a full
// sync reads per partnership. The decision itself is not changed: a copy
// takes its place in rec.
func compactLastDecision(rec *ev.DecisionRecord) {
	d, m := rec.GetLastDecision(), rec.GetLastMatched()
	if d == nil || m == nil || rec.GetLastDecisionSharesMatched() {
		return
	}
	p := m.GetObserved().GetPartnership()
	if !d.GetPartnership().EqualVT(p) || !d.GetMdm().EqualVT(m.GetMdm()) {
		return
	}
	c := shallowCopy(d)
	c.Partnership, c.Mdm = nil, nil
	rec.LastDecision, rec.LastDecisionSharesMatched = c, true
}

// weigh is judge on a record whose last decision is whole.
func weigh(f facts, rec *ev.DecisionRecord, exists bool) judgement {
	in, v := f.in, f.verdict
	obs := in.GetObserved()
	p := obs.GetPartnership()
	// A redelivery carries the very verdict judged: its matched_at first,
	// which tells apart in one comparison what comparing the verdicts would only
	// find different after comparing the partnership and MDM record.
	if exists && rec.GetLastMatched().GetMatchedAt().AsTime().Equal(in.GetMatchedAt().AsTime()) && rec.GetLastMatched().EqualVT(in) {
		// Redelivered after it was judged (the worker died before
		// acknowledging): offer the same decision again. Its message id
		// makes a copy that did go out a duplicate the stream drops.
		var j judgement
		if d := rec.GetLastDecision(); d != nil && d.GetDecisionId() == rec.GetDecisionId() && !rec.GetHeld() {
			if rec.GetStaged() {
				j.stage = d
			} else {
				j.publish = d
			}
		}
		return j
	}
	if exists && rec.GetLastMatched().GetMatchedAt().AsTime().After(in.GetMatchedAt().AsTime()) {
		return judgement{} // a newer verdict was already judged
	}
	if !v.InScope {
		// Out of scope: never touched. Forget what was decided before.
		if exists {
			return judgement{change: bus.Remove}
		}
		return judgement{}
	}
	var before *ev.DecisionRecord
	if exists {
		// Below, fields are assigned, never a nested message edited in
		// place: a shallow copy keeps the record as read.
		before = shallowCopy(rec)
	}
	ok := satisfied(v.Desired, p.GetDeviceAccessState(), p.GetDeviceAccessStateReason())
	if exists && rec.GetDecisionId() != "" && rec.GetDesired() != v.Desired && !rec.GetDryRun() && !rec.GetHeld() {
		// The verdict turned against a decision that may still reach
		// Exchange: waiting for the guard, in flight, or applied after
		// this observation was read (an MDM change re-matches the
		// partnership as last indexed, from before the block it now
		// reverses). Exchange seen as the verdict wants proves nothing:
		// the older decision would be released by the guard, or applied
		// over it, or already was, and the observation that shows it
		// could be taken for replication lag for ReplicationGrace.
		// Deciding again supersedes it; if Exchange did agree, the
		// executor finds it so and sends nothing.
		ok = false
	}
	applied := f.applied
	same := exists && rec.GetDesired() == v.Desired && rec.GetDryRun() == f.dryRun
	emit, drift, reoffer, waitReplication := false, false, false, false
	observed := obs.GetObservedAt().AsTime()
	// Exchange did what was decided once: it applied the decision
	// (Set-CASMailbox re-stamps the devices at once), found its lists
	// already as decided, or an earlier observation showed it agreeing.
	appliedOK := applied.GetOutcome() == ev.ApplyOutcome_APPLY_OUTCOME_APPLIED || applied.GetOutcome() == ev.ApplyOutcome_APPLY_OUTCOME_ALREADY_IN_STATE
	agreed := exists && (rec.GetConfirmedAt().IsValid() && observed.After(rec.GetConfirmedAt().AsTime()) ||
		applied.GetDecisionId() != "" && applied.GetDecisionId() == rec.GetDecisionId() &&
			appliedOK && observed.After(applied.GetAppliedAt().AsTime()))
	stale := exists && replicationStale(f.replicationGrace, rec, applied, observed, p)
	switch {
	case !ok && same && rec.GetStaged():
		// Waiting for the guard; nothing new to say.
	case !ok && same && rec.GetHeld():
		// Refused by the guard before: judged again with this pass.
		emit = true
	case !ok && same && !rec.GetDryRun() && stale:
		// Read from a domain controller that has not seen easguard's own
		// change yet: neither drift nor a reason to apply again.
		waitReplication = true
	case !ok && same && !rec.GetDryRun() && agreed:
		// Exchange agreed, and was changed back since: a manual edit.
		emit, drift = true, true
	case !ok && same && !rec.GetDryRun() && observed.After(rec.GetDecidedAt().AsTime().Add(lostMargin)) &&
		!f.queued(p.GetDeviceId(), rec.GetDecisionId()):
		// Decided long ago and never applied, and not waiting for the
		// executor either: decide again.
		emit = true
	case !ok && same && !rec.GetDryRun():
		// The decision is in flight, or it was recorded by a worker that
		// died before publishing it, and this newer verdict overtook the
		// redelivery that would have offered it again. Offer it again: its
		// message id makes the stream drop the copy of one that did go out.
		reoffer = true
	case !ok && same:
		// A dry run already recorded it.
	case !ok:
		emit = true
	case v.Notify && f.notify && !rec.GetNotified() && p.GetDeviceAccessState() != ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED:
		// Exchange holds the device back as decided, but its user has not
		// been told how to enrol yet: a new partnership the default
		// quarantined, or one the default reached since it was judged.
		emit = true
	}
	switch {
	case ok && (!rec.GetConfirmedAt().IsValid() || observed.After(rec.GetConfirmedAt().AsTime())):
		rec.ConfirmedAt = obs.GetObservedAt()
	case emit:
		rec.ConfirmedAt = nil // a new decision, not applied yet
	}
	rec.LastMatched = in
	if f.traceparent != "" {
		rec.Traceparent = f.traceparent
	}
	rec.RecheckAt = nil
	if !v.RecheckAt.IsZero() {
		rec.RecheckAt = timestamppb.New(v.RecheckAt)
	}
	if !emit {
		j := judgement{stale: waitReplication}
		if d := rec.GetLastDecision(); reoffer && d != nil && d.GetDecisionId() == rec.GetDecisionId() {
			j.publish = d
		}
		if ok || !same {
			rec.Held = false
		}
		if !same {
			rec.Desired, rec.Rule, rec.PolicyVersion, rec.DryRun = v.Desired, v.Rule, f.policyVersion, f.dryRun
			if !exists {
				rec.DecidedAt = timestamppb.New(f.now)
			}
		}
		j.change = bus.Write
		if unchangedRecord(before, rec, in) {
			j.change = bus.Keep
		}
		return j
	}
	d := &ev.AccessDecided{
		Org: string(f.org), Partnership: p, Desired: v.Desired, Rule: v.Rule, Reason: v.Reason,
		ExchangeState: p.GetDeviceAccessState(), ExchangeReason: p.GetDeviceAccessStateReason(), DryRun: f.dryRun,
		NotifyUser:    v.Notify && f.notify && v.Desired != ev.DesiredAccess_DESIRED_ACCESS_ALLOW,
		PolicyVersion: f.policyVersion, Mdm: in.GetMdm(), NoMatchReason: in.GetNoMatchReason(),
		DecidedAt: timestamppb.New(decidedAfter(rec, exists, f.now)), SyncId: obs.GetSync().GetSyncId(),
	}
	if d.NotifyUser {
		d.NotifyReason = v.NotifyReason
	}
	if drift {
		d.Reason = fmt.Sprintf("drift: Exchange has %s/%s although easguard decided %s; %s", shortState(p.GetDeviceAccessState()), shortReason(p.GetDeviceAccessStateReason()), shortDesired(v.Desired), v.Reason)
	}
	d.DecisionId = decisionID(f.key, d)
	// The device has mail now if Exchange said so when last seen, or if
	// easguard allowed it since (the observation may predate that).
	hadMail := p.GetDeviceAccessState() == ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED || exists && rec.GetHeld() ||
		exists && rec.GetDesired() == ev.DesiredAccess_DESIRED_ACCESS_ALLOW && !rec.GetDryRun() && !rec.GetStaged()
	rec.Held = false
	rec.Desired, rec.DecisionId, rec.DecidedAt, rec.Rule, rec.PolicyVersion, rec.DryRun = d.Desired, d.DecisionId, d.DecidedAt, d.Rule, d.PolicyVersion, f.dryRun
	rec.Notified = rec.GetNotified() || d.NotifyUser
	rec.LastDecision = d
	j := judgement{change: bus.Write, made: d, drift: drift}
	revocation := (v.Desired == ev.DesiredAccess_DESIRED_ACCESS_BLOCK || v.Desired == ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE) && hadMail
	if revocation && !f.dryRun {
		// Taking mail away waits for the blast-radius guard.
		rec.Staged = true
		j.stage = d
		return j
	}
	rec.Staged = false
	j.publish = d
	return j
}

// replicationStale reports whether an observation may predate Active
// Directory's replication of easguard's own applied change: Exchange
// applied the decision (Set-CASMailbox re-stamps the partnership on the
// domain controller of the CAS that ran it), the observation was read
// less than grace after that, and the partnership it shows was last
// changed no later than the apply. Another CAS reads through its own
// domain controller, which shows the object as it was until replication
// brings the change (seconds within a site, up to the site link's
// schedule between sites), so such a reading says nothing about whether
// the change held. A partnership changed after the apply (an
// administrator's edit, a re-evaluation on the device's next request) is
// never stale: that is drift, whatever the grace.
//
// WhenChanged comes from the domain controller's clock and has a
// resolution of one second, the applied time from easguard's: a change
// within the same second as the apply, or a clock skew larger than the
// time between an earlier change and the apply, is taken as stale, and
// the next observation after the grace shows it. A missing WhenChanged
// cannot tell, and is taken as stale within the grace.
func replicationStale(grace time.Duration, rec *ev.DecisionRecord, applied *ev.AppliedRecord, observed time.Time, p *ev.EASPartnership) bool {
	if grace <= 0 || applied.GetDecisionId() == "" || applied.GetDecisionId() != rec.GetDecisionId() ||
		applied.GetOutcome() != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
		return false
	}
	at := applied.GetAppliedAt().AsTime()
	if !observed.After(at) || !observed.Before(at.Add(grace)) {
		return false
	}
	return !p.GetWhenChanged().IsValid() || !p.GetWhenChanged().AsTime().After(at)
}
