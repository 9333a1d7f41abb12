package evaluator

import (
	"context"
	"time"

	"github.com/easguard/easguard/pkg/bus"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// GuardCounts returns the guard's count of partnerships with mail as the
// guard reads it (its view) and as a full recount of both buckets finds
// it, for tests that hold the first to the second.
func (e *Evaluator) GuardCounts(ctx context.Context) (view, recount int, err error) {
	if view, err = e.allowedCount(ctx); err != nil {
		return 0, 0, err
	}
	recount, err = e.recountAllowed(ctx)
	return view, recount, err
}

// recountAllowed is the guard's count as it was computed before it had a
// view: every key of the decisions and partnership buckets read at each
// guard decision. Tests and the benchmark hold the view to it.
func (e *Evaluator) recountAllowed(ctx context.Context) (int, error) {
	keys, err := bus.ListKeys(ctx, e.decisions, string(e.org)+".>")
	if err != nil {
		return 0, err
	}
	decided := make(map[string]bool, len(keys))
	n := 0
	for _, k := range keys {
		rec, ok, err := bus.Load[ev.DecisionRecord](ctx, e.decisions, k)
		if err != nil {
			return 0, err
		}
		if !ok {
			continue
		}
		decided[k] = true
		if rec.GetHeld() || rec.GetDesired() == ev.DesiredAccess_DESIRED_ACCESS_ALLOW && !rec.GetDryRun() && !rec.GetStaged() {
			n++
		}
	}
	if keys, err = bus.ListKeys(ctx, e.parts, string(e.org)+".>"); err != nil {
		return 0, err
	}
	for _, k := range keys {
		idx, ok, err := bus.Load[ev.PartnershipIndex](ctx, e.parts, k)
		if err != nil {
			return 0, err
		}
		if !ok {
			continue
		}
		for id, o := range idx.GetById() {
			p := o.GetPartnership()
			dk, err := bus.StateKey(e.org, p.GetDeviceId(), id)
			if err != nil || decided[dk] {
				continue
			}
			if p.GetDeviceAccessState() == ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED {
				n++
			}
		}
	}
	return n, nil
}

// dropView stops a view and forgets it, if it is still the current one.
func (e *Evaluator) dropView(v *allowedView) {
	e.viewMu.Lock()
	defer e.viewMu.Unlock()
	v.stop()
	if e.view == v {
		e.view = nil
	}
}

// SetClock replaces the evaluator's clock, for tests of what it does with
// a clock reading that is behind another replica's.
func (e *Evaluator) SetClock(now func() time.Time) { e.now = now }

// WholeLastDecision is a decision record's last decision as it was made,
// for tests that read records the evaluator stored (compacted).
func WholeLastDecision(rec *ev.DecisionRecord) *ev.AccessDecided { return wholeLastDecision(rec) }
