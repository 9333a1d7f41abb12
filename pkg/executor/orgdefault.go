package executor

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/easguard/easguard/pkg/bus"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// The outcomes of a change of the organisation's default.
const (
	// DefaultChanged: Exchange had the level the plan was made against,
	// and now has the planned one.
	DefaultChanged = "changed"
	// DefaultAlready: Exchange already had the planned level.
	DefaultAlready = "already_in_state"
	// DefaultStale: Exchange had neither level; someone changed the
	// default since the full sync the plan rests on, and the next full
	// sync plans again from what they set.
	DefaultStale = "stale"
)

// DefaultApplied is what /status shows about the executor's last change
// of the organisation's DefaultAccessLevel (key <org>.default.applied).
type DefaultApplied struct {
	DecisionID string    `json:"decision_id"`
	From       string    `json:"from"`
	To         string    `json:"to"`
	Found      string    `json:"found"`
	Outcome    string    `json:"outcome"`
	Server     string    `json:"cas_server,omitempty"`
	Actor      string    `json:"actor,omitempty"`
	At         time.Time `json:"at"`
	Detail     string    `json:"detail"`
}

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
	st := DefaultApplied{DecisionID: d.GetDecisionId(), From: d.GetFromLevel(), To: d.GetToLevel(), Found: found, Server: x.server(), Actor: x.actor, At: x.now()}
	switch {
	case strings.EqualFold(found, d.GetFromLevel()):
		st.Outcome = DefaultChanged
		st.Detail = fmt.Sprintf("Set-ActiveSyncOrganizationSettings -DefaultAccessLevel %s: %s", d.GetToLevel(), d.GetReason())
		x.log.Info("organisation default changed", "from", d.GetFromLevel(), "to", d.GetToLevel(), "decision_id", d.GetDecisionId(), "revoked", d.GetRevoked())
	case strings.EqualFold(found, d.GetToLevel()):
		st.Outcome = DefaultAlready
		st.Detail = "DefaultAccessLevel was already " + found
	default:
		st.Outcome = DefaultStale
		st.Detail = fmt.Sprintf("not changed: the plan was made against %s, and Exchange has %s now (changed outside easguard since); the next full sync plans again", d.GetFromLevel(), found)
		x.log.Warn("organisation default not changed: plan is stale", "from", d.GetFromLevel(), "to", d.GetToLevel(), "found", found, "decision_id", d.GetDecisionId())
	}
	b, err := json.Marshal(st)
	if err != nil {
		return nil, bus.Poison(err)
	}
	if _, err := x.status.Put(ctx, string(x.org)+".default.applied", b); err != nil {
		return nil, fmt.Errorf("status default.applied: %w", err)
	}
	return nil, nil
}
