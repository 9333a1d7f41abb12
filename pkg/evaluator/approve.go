package evaluator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
)

// GuardApproval is an administrator's approval of the set of revocations
// the blast-radius guard holds, kept in the status bucket under
// <org>.guard.approval: the next judgement of exactly that set releases
// it instead of holding it again. A set that changed since (one device
// more or fewer) has another key and is held again.
type GuardApproval struct {
	Key    string    `json:"key"`
	By     string    `json:"by"`
	Reason string    `json:"reason,omitempty"`
	At     time.Time `json:"at"`
}

// approvalValid is how long an approval waits for its set to be judged
// again (the next full sync at the latest, which runs daily).
const approvalValid = 25 * time.Hour

// ErrNothingHeld is returned by ApproveGuard when the guard does not hold
// the set of revocations named.
var ErrNothingHeld = errors.New("the blast-radius guard holds no such set of revocations")

// ApproveGuard approves, on behalf of by (from source: a client address),
// the set of revocations the guard holds under key (GuardStatus.Key, as
// /status shows it). The revocations go through when their devices are
// next judged: with the next pass, or at once after a sync the caller asks
// for. The approval, or its refusal, is audited (guard-approve) with pub.
func ApproveGuard(ctx context.Context, status jetstream.KeyValue, pub *bus.Publisher, org bus.Org, key, by, source, reason string, now time.Time) (err error) {
	defer func() {
		outcome := "approved"
		if err != nil {
			outcome = "refused: " + err.Error()
		}
		a, aerr := bus.AuditOutbound(org, "guard-approve", by, source, key, outcome, map[string]string{"reason": reason}, now)
		if aerr == nil {
			_, aerr = pub.Publish(ctx, a)
		}
		if aerr != nil && err == nil {
			err = fmt.Errorf("approve guard: audit: %w", aerr)
		}
	}()
	e, gerr := status.Get(ctx, string(org)+".guard")
	if gerr != nil && !errors.Is(gerr, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("approve guard: %w", gerr)
	}
	var st GuardStatus
	if gerr != nil || json.Unmarshal(e.Value(), &st) != nil || st.State != "tripped" || st.Key != key {
		return fmt.Errorf("approve guard %s: %w (it holds %q, state %q)", key, ErrNothingHeld, st.Key, st.State)
	}
	b, err := json.Marshal(GuardApproval{Key: key, By: by, Reason: reason, At: now.UTC()})
	if err != nil {
		return err
	}
	if _, err := status.Put(ctx, string(org)+".guard.approval", b); err != nil {
		return fmt.Errorf("approve guard: %w", err)
	}
	return nil
}

// approval returns the approval of the set key, if one was given within
// approvalValid.
func (e *Evaluator) approval(ctx context.Context, key string) (GuardApproval, bool) {
	entry, err := e.status.Get(ctx, string(e.org)+".guard.approval")
	if err != nil {
		return GuardApproval{}, false
	}
	var a GuardApproval
	if json.Unmarshal(entry.Value(), &a) != nil || a.Key != key || e.now().Sub(a.At) > approvalValid {
		return GuardApproval{}, false
	}
	return a, true
}
