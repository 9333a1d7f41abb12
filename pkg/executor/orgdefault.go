package executor

import (
	"context"
	"fmt"
	"strings"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// ApplyDefault applies the evaluator's released plan for the
// organisation's DefaultAccessLevel, only while Exchange still has the
// level the plan was judged against: a plan is a count of whom the change
// takes mail from, and that count is only true from that level. A
// redelivery finds the planned level in place and changes nothing.
func (x *Executor) ApplyDefault(ctx context.Context, d *ev.OrgSettingsDecided) ([]bus.Outbound, error) {
	found, err := x.setter.SetDefaultAccessLevel(ctx, d.GetFromLevel(), d.GetToLevel())
	if err != nil {
		// Transient or fatal, as for device decisions: retried by the
		// runner, dead-lettered with the reason when retries run out.
		return nil, fmt.Errorf("change DefaultAccessLevel from %s to %s: %w", d.GetFromLevel(), d.GetToLevel(), err)
	}
	st := status.DefaultApplied{DecisionID: d.GetDecisionId(), From: d.GetFromLevel(), To: d.GetToLevel(), Found: found, Server: x.server(), Actor: x.actor, At: x.now()}
	switch {
	case strings.EqualFold(found, d.GetFromLevel()):
		st.Outcome = status.DefaultChanged
		st.Detail = fmt.Sprintf("Set-ActiveSyncOrganizationSettings -DefaultAccessLevel %s: %s", d.GetToLevel(), d.GetReason())
		x.log.Info("organisation default changed", "from", d.GetFromLevel(), "to", d.GetToLevel(), "decision_id", d.GetDecisionId(), "revoked", d.GetRevoked())
	case strings.EqualFold(found, d.GetToLevel()):
		st.Outcome = status.DefaultAlready
		st.Detail = "DefaultAccessLevel was already " + found
	default:
		st.Outcome = status.DefaultStale
		st.Detail = fmt.Sprintf("not changed: the plan was made against %s, and Exchange has %s now (changed outside easguard since); the next full sync plans again", d.GetFromLevel(), found)
		x.log.Warn("organisation default not changed: plan is stale", "from", d.GetFromLevel(), "to", d.GetToLevel(), "found", found, "decision_id", d.GetDecisionId())
	}
	if err := status.Put(ctx, x.status, x.org, status.DefaultAppliedKey, st); err != nil {
		return nil, err
	}
	return nil, nil
}
