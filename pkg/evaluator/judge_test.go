package evaluator

import (
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/policy"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// judge's rules, one verdict at a time, without a bus: when a decision is
// made, offered again, staged for the guard or not made at all, and what
// the record keeps.
func TestJudge(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	const (
		allowed     = ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED
		blocked     = ev.DeviceAccessState_DEVICE_ACCESS_STATE_BLOCKED
		quarantined = ev.DeviceAccessState_DEVICE_ACCESS_STATE_QUARANTINED
		individual  = ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_INDIVIDUAL
		global      = ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_GLOBAL
		allow       = ev.DesiredAccess_DESIRED_ACCESS_ALLOW
		block       = ev.DesiredAccess_DESIRED_ACCESS_BLOCK
	)
	// verdict is the matcher's verdict on a partnership in Exchange state
	// s/r, read at observed and matched at matched.
	verdict := func(s ev.DeviceAccessState, r ev.DeviceAccessStateReason, observed, matched time.Time) *ev.DeviceMatched {
		return &ev.DeviceMatched{Org: "contoso", MatchedAt: timestamppb.New(matched), Trigger: "eas", Observed: &ev.EASPartnershipObserved{
			Org: "contoso", ObservedAt: timestamppb.New(observed), Sync: &ev.SyncRef{SyncId: "s2"},
			Partnership: &ev.EASPartnership{DeviceId: "dev1", Guid: "g1", Mailbox: &ev.Mailbox{PrimarySmtpAddress: "ann@contoso.com"},
				DeviceAccessState: s, DeviceAccessStateReason: r, WhenChanged: timestamppb.New(observed.Add(-time.Hour))}}}
	}
	allowIt := policy.Verdict{InScope: true, Desired: allow, Rule: "compliant", Reason: "enrolled and compliant"}
	blockIt := policy.Verdict{InScope: true, Desired: block, Rule: "unknown_device", Reason: "not enrolled", Notify: true, NotifyReason: "unknown"}
	outOfScope := policy.Verdict{Rule: "out_of_scope"}
	// record is a decision record: d0 decided at decided, for desired.
	record := func(desired ev.DesiredAccess, decided time.Time, edit func(*ev.DecisionRecord)) *ev.DecisionRecord {
		r := &ev.DecisionRecord{DecisionId: "d0", Desired: desired, Rule: "r", DecidedAt: timestamppb.New(decided),
			LastDecision: &ev.AccessDecided{DecisionId: "d0", Desired: desired},
			LastMatched:  verdict(quarantined, global, decided.Add(-time.Minute), decided.Add(-time.Minute))}
		if edit != nil {
			edit(r)
		}
		return r
	}
	appliedAt := func(at time.Time, outcome ev.ApplyOutcome) *ev.AppliedRecord {
		return &ev.AppliedRecord{DecisionId: "d0", AppliedAt: timestamppb.New(at), Outcome: outcome}
	}
	// Which decision went where: "new" (made now), "old" (the record's),
	// or "" (none).
	tests := []struct {
		name    string
		rec     *ev.DecisionRecord // nil: none yet
		in      *ev.DeviceMatched
		v       policy.Verdict
		applied *ev.AppliedRecord
		dryRun  bool
		queued  bool
		// what judge must say
		change         bus.Change
		publish, stage string
		drift, stale   bool
		asksQueued     bool
		check          func(t *testing.T, rec *ev.DecisionRecord)
	}{
		{name: "a compliant phone Exchange already allows: recorded as confirmed, nothing decided",
			in: verdict(allowed, individual, t0, t0), v: allowIt, change: bus.Write,
			check: func(t *testing.T, rec *ev.DecisionRecord) {
				if rec.GetDesired() != allow || !rec.GetConfirmedAt().AsTime().Equal(t0) {
					t.Errorf("record %v: want allow, confirmed at %s", rec, t0)
				}
			}},
		{name: "a compliant phone the default quarantines: allowed",
			in: verdict(quarantined, global, t0, t0), v: allowIt, change: bus.Write, publish: "new"},
		{name: "an unknown phone the default quarantines: blocked at once, its user told (it has no mail to lose)",
			in: verdict(quarantined, global, t0, t0), v: blockIt, change: bus.Write, publish: "new",
			check: func(t *testing.T, rec *ev.DecisionRecord) {
				if !rec.GetLastDecision().GetNotifyUser() || rec.GetStaged() {
					t.Errorf("decision %v: want its user notified, not staged", rec.GetLastDecision())
				}
			}},
		{name: "an unknown phone that has mail: the block waits for the guard",
			in: verdict(allowed, global, t0, t0), v: blockIt, change: bus.Write, stage: "new",
			check: func(t *testing.T, rec *ev.DecisionRecord) {
				if !rec.GetStaged() {
					t.Error("record not marked staged")
				}
			}},
		{name: "dry run: the block that would take mail is recorded and reported, never staged",
			in: verdict(allowed, global, t0, t0), v: blockIt, dryRun: true, change: bus.Write, publish: "new",
			check: func(t *testing.T, rec *ev.DecisionRecord) {
				if !rec.GetLastDecision().GetDryRun() || !rec.GetDryRun() {
					t.Error("decision not marked dry run")
				}
			}},
		{name: "the same dry-run verdict again: nothing new",
			rec: record(block, t0, func(r *ev.DecisionRecord) { r.DryRun = true }),
			in:  verdict(allowed, global, t0.Add(time.Hour), t0.Add(time.Hour)), v: blockIt, dryRun: true, change: bus.Write},
		{name: "a redelivered verdict: the decision it made is offered again",
			rec: record(allow, t0, nil), v: allowIt, change: bus.Keep, publish: "old"},
		{name: "a redelivered verdict whose decision the guard holds: staged again",
			rec: record(block, t0, func(r *ev.DecisionRecord) { r.Staged = true }), v: blockIt, change: bus.Keep, stage: "old"},
		{name: "a verdict older than the one judged: ignored",
			rec: record(allow, t0, nil), in: verdict(quarantined, global, t0.Add(-time.Hour), t0.Add(-time.Hour)), v: allowIt, change: bus.Keep},
		{name: "out of scope: what was decided is forgotten",
			rec: record(allow, t0, nil), in: verdict(quarantined, global, t0, t0), v: outOfScope, change: bus.Remove},
		{name: "out of scope, never judged: nothing to forget",
			in: verdict(quarantined, global, t0, t0), v: outOfScope, change: bus.Keep},
		{name: "the decision is in flight: offered again, not made again",
			rec: record(allow, t0, nil), in: verdict(quarantined, global, t0.Add(time.Minute), t0.Add(time.Minute)), v: allowIt,
			change: bus.Write, publish: "old"},
		{name: "decided long ago, never applied, not queued: decided again",
			rec: record(allow, t0, nil), in: verdict(quarantined, global, t0.Add(time.Hour), t0.Add(time.Hour)), v: allowIt,
			change: bus.Write, publish: "new", asksQueued: true},
		{name: "decided long ago and still behind the executor's backlog: offered again",
			rec: record(allow, t0, nil), in: verdict(quarantined, global, t0.Add(time.Hour), t0.Add(time.Hour)), v: allowIt, queued: true,
			change: bus.Write, publish: "old", asksQueued: true},
		{name: "applied, then changed back by hand: drift, decided again",
			rec: record(allow, t0, nil), in: verdict(blocked, individual, t0.Add(time.Hour), t0.Add(time.Hour)), v: allowIt,
			applied: appliedAt(t0.Add(time.Second), ev.ApplyOutcome_APPLY_OUTCOME_APPLIED), change: bus.Write, publish: "new", drift: true,
			check: func(t *testing.T, rec *ev.DecisionRecord) {
				if r := rec.GetLastDecision().GetReason(); len(r) < 6 || r[:6] != "drift:" {
					t.Errorf("reason %q does not say drift", r)
				}
			}},
		{name: "read before replication brought easguard's own change: neither drift nor a new decision",
			rec: record(allow, t0, nil), in: verdict(quarantined, global, t0.Add(5*time.Second), t0.Add(5*time.Second)), v: allowIt,
			applied: appliedAt(t0.Add(time.Second), ev.ApplyOutcome_APPLY_OUTCOME_APPLIED), change: bus.Write, stale: true},
		{name: "refused by the guard before: judged again",
			rec: record(block, t0, func(r *ev.DecisionRecord) { r.Held = true }), in: verdict(allowed, global, t0.Add(time.Hour), t0.Add(time.Hour)),
			v: blockIt, change: bus.Write, stage: "new"},
		{name: "waiting for the guard: nothing new",
			rec: record(block, t0, func(r *ev.DecisionRecord) { r.Staged = true }), in: verdict(allowed, global, t0.Add(time.Hour), t0.Add(time.Hour)),
			v: blockIt, change: bus.Write},
		{name: "blocked, then compliant again, seen as before the block: allowed again, not taken for already allowed",
			rec: record(block, t0, nil), in: verdict(allowed, individual, t0.Add(-30*time.Second), t0.Add(time.Hour)), v: allowIt,
			change: bus.Write, publish: "new",
			check: func(t *testing.T, rec *ev.DecisionRecord) {
				if rec.GetDesired() != allow || rec.GetDecisionId() == "d0" || rec.GetConfirmedAt().IsValid() {
					t.Errorf("record %v: want a new allow, not confirmed", rec)
				}
			}},
		{name: "a revocation waiting for the guard, and the device compliant again: allowed, so the guard has nothing to release",
			rec: record(block, t0, func(r *ev.DecisionRecord) { r.Staged = true }), in: verdict(allowed, individual, t0.Add(time.Hour), t0.Add(time.Hour)),
			v: allowIt, change: bus.Write, publish: "new",
			check: func(t *testing.T, rec *ev.DecisionRecord) {
				if rec.GetStaged() || rec.GetDecisionId() == "d0" {
					t.Errorf("record %v still stages the revocation", rec)
				}
			}},
		{name: "a revocation the guard refused, and the device compliant again: nothing to undo",
			rec: record(block, t0, func(r *ev.DecisionRecord) { r.Held = true }), in: verdict(allowed, individual, t0.Add(time.Hour), t0.Add(time.Hour)),
			v: allowIt, change: bus.Write,
			check: func(t *testing.T, rec *ev.DecisionRecord) {
				if rec.GetHeld() || rec.GetDesired() != allow {
					t.Errorf("record %v", rec)
				}
			}},
		{name: "a dry-run block, and the device compliant again: nothing was sent, nothing to undo",
			rec: record(block, t0, func(r *ev.DecisionRecord) { r.DryRun = true }), in: verdict(allowed, individual, t0.Add(-30*time.Second), t0.Add(time.Hour)),
			v: allowIt, dryRun: true, change: bus.Write},
		{name: "blocked as decided, its user never told: told now",
			rec: record(block, t0, func(r *ev.DecisionRecord) { r.ConfirmedAt = timestamppb.New(t0) }),
			in:  verdict(blocked, individual, t0.Add(time.Hour), t0.Add(time.Hour)), v: blockIt, change: bus.Write, publish: "new",
			check: func(t *testing.T, rec *ev.DecisionRecord) {
				if !rec.GetNotified() {
					t.Error("record does not say its user was notified")
				}
			}},
		{name: "the same verdict on a partnership as decided, confirmed lately: not written again",
			rec: record(allow, t0, func(r *ev.DecisionRecord) {
				r.ConfirmedAt = timestamppb.New(t0.Add(time.Minute))
				r.LastMatched = verdict(allowed, individual, t0.Add(time.Minute), t0.Add(time.Minute))
				r.LastMatched.Observed.Partnership.WhenChanged = timestamppb.New(t0.Add(-time.Hour))
			}),
			in: func() *ev.DeviceMatched {
				m := verdict(allowed, individual, t0.Add(time.Hour), t0.Add(time.Hour))
				m.Observed.Partnership.WhenChanged = timestamppb.New(t0.Add(-time.Hour))
				return m
			}(), v: allowIt, change: bus.Keep},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec, exists := &ev.DecisionRecord{}, tt.rec != nil
			var old *ev.AccessDecided
			if exists {
				rec = proto.Clone(tt.rec).(*ev.DecisionRecord)
				old = rec.GetLastDecision()
			}
			in := tt.in
			if in == nil {
				in = rec.GetLastMatched() // a redelivery
			}
			applied := tt.applied
			if applied == nil {
				applied = &ev.AppliedRecord{}
			}
			asked := false
			j := judge(facts{key: "contoso.dev1.g1", org: "contoso", in: in, verdict: tt.v, applied: applied, dryRun: tt.dryRun, notify: true,
				policyVersion: "v1", replicationGrace: 15 * time.Minute, now: in.GetMatchedAt().AsTime().Add(time.Second),
				queued: func(string, string) bool { asked = true; return tt.queued }}, rec, exists)

			if j.change != tt.change {
				t.Errorf("change %v, want %v", j.change, tt.change)
			}
			which := func(d *ev.AccessDecided) string {
				switch {
				case d == nil:
					return ""
				case d == j.made:
					return "new"
				case old != nil && proto.Equal(d, old):
					return "old"
				}
				return "another"
			}
			if got := which(j.publish); got != tt.publish {
				t.Errorf("published %q decision, want %q", got, tt.publish)
			}
			if got := which(j.stage); got != tt.stage {
				t.Errorf("staged %q decision, want %q", got, tt.stage)
			}
			if made := tt.publish == "new" || tt.stage == "new"; (j.made != nil) != made {
				t.Errorf("made %v, want a new decision: %v", j.made, made)
			}
			if j.made != nil && (rec.GetDecisionId() != j.made.GetDecisionId() || !proto.Equal(wholeLastDecision(rec), j.made) || j.made.GetDecisionId() == "d0") {
				t.Errorf("record %v does not hold the new decision %v", rec, j.made)
			}
			if j.made != nil && !j.made.GetDecidedAt().AsTime().After(old.GetDecidedAt().AsTime()) && old.GetDecidedAt() != nil {
				t.Errorf("new decision at %s, not after the old one", j.made.GetDecidedAt().AsTime())
			}
			if j.drift != tt.drift || j.stale != tt.stale {
				t.Errorf("drift %v stale %v, want %v %v", j.drift, j.stale, tt.drift, tt.stale)
			}
			if asked != tt.asksQueued {
				t.Errorf("asked whether the decision is queued: %v, want %v", asked, tt.asksQueued)
			}
			if tt.check != nil {
				tt.check(t, rec)
			}
		})
	}
}

// A decision record keeps its last decision without the partnership and
// MDM record its verdict already holds, and judge reads it back whole:
// through a real marshal and unmarshal, a redelivered verdict offers the
// decision exactly as it was made, and a later verdict that saw the
// partnership changed keeps the decision as made, with its own copy.
func TestDecisionRecordStoresItsDecisionOnce(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	verdict := func(deviceOS string, at time.Time) *ev.DeviceMatched {
		return &ev.DeviceMatched{Org: "contoso", MatchedAt: timestamppb.New(at), Trigger: "eas",
			Mdm: &ev.MDMDevice{MdmDeviceId: "m1", EasDeviceId: "dev1", ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT},
			Observed: &ev.EASPartnershipObserved{Org: "contoso", ObservedAt: timestamppb.New(at), Sync: &ev.SyncRef{SyncId: "s1"},
				Partnership: &ev.EASPartnership{DeviceId: "dev1", Guid: "g1", DeviceOs: deviceOS, Mailbox: &ev.Mailbox{PrimarySmtpAddress: "ann@contoso.com"},
					DeviceAccessState: ev.DeviceAccessState_DEVICE_ACCESS_STATE_QUARANTINED, DeviceAccessStateReason: ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_GLOBAL}}}
	}
	allowIt := policy.Verdict{InScope: true, Desired: ev.DesiredAccess_DESIRED_ACCESS_ALLOW, Rule: "compliant", Reason: "enrolled and compliant"}
	judgeAt := func(in *ev.DeviceMatched, rec *ev.DecisionRecord, exists bool) judgement {
		return judge(facts{key: "contoso.dev1.g1", org: "contoso", in: in, verdict: allowIt, applied: &ev.AppliedRecord{}, notify: true,
			policyVersion: "v1", now: in.GetMatchedAt().AsTime().Add(time.Second), queued: func(string, string) bool { return true }}, rec, exists)
	}
	// stored is rec as the bucket gives it back.
	stored := func(t *testing.T, rec *ev.DecisionRecord) (*ev.DecisionRecord, int) {
		t.Helper()
		b, err := proto.Marshal(rec)
		if err != nil {
			t.Fatal(err)
		}
		back := &ev.DecisionRecord{}
		if err := proto.Unmarshal(b, back); err != nil {
			t.Fatal(err)
		}
		return back, len(b)
	}

	first := verdict("iOS 17.4", t0)
	rec := &ev.DecisionRecord{}
	made := judgeAt(first, rec, false).made
	if made == nil || made.GetPartnership().GetDeviceOs() != "iOS 17.4" || made.GetMdm().GetMdmDeviceId() != "m1" {
		t.Fatalf("made %v, want an allow with its partnership and MDM record", made)
	}
	kept, size := stored(t, rec)
	if !kept.GetLastDecisionSharesMatched() || kept.GetLastDecision().GetPartnership() != nil || kept.GetLastDecision().GetMdm() != nil {
		t.Fatalf("stored %v: want the decision without the verdict's partnership and MDM record", kept.GetLastDecision())
	}
	whole := proto.Clone(rec).(*ev.DecisionRecord)
	whole.LastDecision, whole.LastDecisionSharesMatched = made, false
	if _, wholeSize := stored(t, whole); wholeSize-size < proto.Size(made.GetPartnership())+proto.Size(made.GetMdm()) {
		t.Errorf("stored %d bytes, %d with the decision whole: want the partnership and MDM record saved", size, wholeSize)
	}

	t.Run("redelivered verdict offers the decision as made", func(t *testing.T) {
		rec, _ := stored(t, kept)
		j := judgeAt(proto.Clone(first).(*ev.DeviceMatched), rec, true)
		if !proto.Equal(j.publish, made) {
			t.Fatalf("offered %v, want %v", j.publish, made)
		}
	})
	t.Run("a changed partnership keeps the decision as made", func(t *testing.T) {
		rec, _ := stored(t, kept)
		later := verdict("iOS 18.1", t0.Add(time.Minute))
		// Exchange still quarantines it: the allow is in flight (queued),
		// so no new decision; the record takes the newer verdict.
		j := judgeAt(later, rec, true)
		if j.made != nil || j.change != bus.Write {
			t.Fatalf("judgement %+v, want the record written without a new decision", j)
		}
		back, _ := stored(t, rec)
		if back.GetLastDecisionSharesMatched() || !proto.Equal(wholeLastDecision(back), made) {
			t.Fatalf("stored decision %v (shares %v), want %v whole", back.GetLastDecision(), back.GetLastDecisionSharesMatched(), made)
		}
		j = judgeAt(proto.Clone(later).(*ev.DeviceMatched), back, true)
		if !proto.Equal(j.publish, made) {
			t.Fatalf("redelivery offered %v, want %v", j.publish, made)
		}
	})
}
