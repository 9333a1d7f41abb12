package evaluator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/status"
)

// approvalValid is how long an approval waits for its set to be judged
// again (the next full sync at the latest, which runs daily).
const approvalValid = 25 * time.Hour

// ErrNothingHeld is returned by ApproveGuard when the guard does not hold
// the set of revocations named.
var ErrNothingHeld = errors.New("the blast-radius guard holds no such set of revocations")

// ApproveGuard approves, on behalf of by (from source: a client address),
// the set of revocations the guard holds under key (status.Guard.Key, as
// the console shows it), recording a status.GuardApproval in kv, the status
// bucket. The revocations go through when their devices are
// next judged: with the next pass, or at once after a sync the caller asks
// for. The approval, or its refusal, is audited (guard-approve) with pub.
func ApproveGuard(ctx context.Context, kv jetstream.KeyValue, pub *bus.Publisher, org bus.Org, key, by, source, reason string, now time.Time) (err error) {
	defer func() {
		err = auditGuard(ctx, pub, org, "guard-approve", "approved", by, source, key, reason, now, err)
	}()
	st, _, err := status.Get[status.Guard](ctx, kv, org, status.GuardKey)
	if err != nil {
		return fmt.Errorf("approve guard: %w", err)
	}
	if st.State != status.GuardTripped || st.Key != key {
		return fmt.Errorf("approve guard %s: %w (it holds %q, state %q)", key, ErrNothingHeld, st.Key, st.State)
	}
	if err := status.Put(ctx, kv, org, status.GuardApprovalKey, status.GuardApproval{Key: key, By: by, Reason: reason, At: now.UTC()}); err != nil {
		return fmt.Errorf("approve guard: %w", err)
	}
	return nil
}

// approval returns the approval of the set key, if one was given within
// approvalValid.
// An approval that cannot be read counts as none: the set stays held,
// which is the guard's safe side, and the administrator approves again.
func (e *Evaluator) approval(ctx context.Context, key string) (status.GuardApproval, bool) {
	a, ok, err := status.Get[status.GuardApproval](ctx, e.status, e.org, status.GuardApprovalKey)
	if err != nil {
		e.log.Warn("guard approval not read; the set stays held", "error", err)
		return status.GuardApproval{}, false
	}
	if !ok || a.Key != key || e.now().Sub(a.At) > approvalValid {
		return status.GuardApproval{}, false
	}
	return a, true
}

// DiscardGuard is an administrator's "no" to the set of revocations the
// guard holds under key: the devices keep their mail, and the guard keeps
// holding exactly this set without alerting again (a set that changes, one
// device more or fewer, is a new set and alerts). An approval of the set
// is withdrawn. The discard, or its refusal, is audited (guard-discard).
func DiscardGuard(ctx context.Context, kv jetstream.KeyValue, pub *bus.Publisher, org bus.Org, key, by, source, reason string, now time.Time) (err error) {
	defer func() {
		err = auditGuard(ctx, pub, org, "guard-discard", "discarded", by, source, key, reason, now, err)
	}()
	e, err := kv.Get(ctx, string(org)+"."+status.GuardKey)
	if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("discard guard: %w", err)
	}
	var st status.Guard
	if e != nil {
		if err := json.Unmarshal(e.Value(), &st); err != nil {
			return fmt.Errorf("discard guard: %w: %v", status.ErrCorrupt, err)
		}
	}
	if e == nil || st.State != status.GuardTripped || st.Key != key {
		return fmt.Errorf("discard guard %s: %w (it holds %q, state %q)", key, ErrNothingHeld, st.Key, st.State)
	}
	st.State = status.GuardDiscarded
	st.Detail = fmt.Sprintf("Discarded by %s at %s (%s): these devices keep their mail, and the guard holds this set without a new alert. It held: %s",
		by, now.UTC().Format(time.RFC3339), reason, st.Detail)
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	// Only over the record read: a guard that tripped on another set
	// meanwhile is not discarded by an answer about this one.
	if _, err := kv.Update(ctx, string(org)+"."+status.GuardKey, b, e.Revision()); err != nil {
		return fmt.Errorf("discard guard: the guard changed meanwhile, look again: %w", err)
	}
	if err := status.Delete(ctx, kv, org, status.GuardApprovalKey); err != nil {
		return fmt.Errorf("discard guard: %w", err)
	}
	return nil
}

// auditGuard records an administrator's answer to the guard (action) and
// how it ended: done, or refused with err. It returns err, or the audit's
// failure when the answer itself went through.
func auditGuard(ctx context.Context, pub *bus.Publisher, org bus.Org, action, done, by, source, key, reason string, now time.Time, err error) error {
	outcome := done
	if err != nil {
		outcome = "refused: " + err.Error()
	}
	a, aerr := bus.AuditOutbound(org, action, by, source, key, outcome, map[string]string{"reason": reason}, now)
	if aerr == nil {
		_, aerr = pub.Publish(ctx, a)
	}
	if aerr != nil && err == nil {
		return fmt.Errorf("%s: audit: %w", action, aerr)
	}
	return err
}
