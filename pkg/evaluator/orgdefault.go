package evaluator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// sampleSize bounds status.DefaultPlan.Sample.
const sampleSize = 20

// tightens reports whether changing the default from one level to another
// takes mail from the partnerships it covers: only leaving Allow does.
func tightens(from, to string) bool {
	return strings.EqualFold(from, "Allow") && !strings.EqualFold(to, "Allow")
}

// exposure is one pass over every partnership of the organisation,
// against the decisions taken on them.
type exposure struct {
	partnerships, allowed int
	revoked               []string            // mailbox/device id, sorted
	pending               map[string]string   // decision key → the Allow decision id awaited
	revokedKeys           []string            // decision keys of revoked, for the guard key
	byKey                 map[string]struct{} // seen partnerships
}

// expose walks the partnership index: a partnership the default reaches
// has mail now by the organisation's default (Allowed, reason Global). It
// keeps it if easguard allow-listed it (applied, or about to be: pending),
// and loses it otherwise — out of scope, undecided, or decided against.
// In a dry run an Allow decision counts as allow-listed, since a live run
// would list it first.
func (e *Evaluator) expose(ctx context.Context, dry bool) (*exposure, error) {
	x := &exposure{pending: map[string]string{}, byKey: map[string]struct{}{}}
	keys, err := bus.ListKeys(ctx, e.parts, string(e.org)+".>")
	if err != nil {
		return nil, err
	}
	for _, k := range keys {
		idx, ok, err := bus.Load[ev.PartnershipIndex](ctx, e.parts, k)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		for id, o := range idx.GetById() {
			p := o.GetPartnership()
			dk, err := bus.StateKey(e.org, p.GetDeviceId(), id)
			if err != nil {
				continue
			}
			x.partnerships++
			x.byKey[dk] = struct{}{}
			rec, decided, err := bus.Load[ev.DecisionRecord](ctx, e.decisions, dk)
			if err != nil {
				return nil, err
			}
			allowDecided := decided && rec.GetDesired() == ev.DesiredAccess_DESIRED_ACCESS_ALLOW && (dry || !rec.GetDryRun())
			hasMail := p.GetDeviceAccessState() == ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED
			if hasMail || allowDecided || decided && rec.GetHeld() {
				x.allowed++
			}
			if !hasMail || p.GetDeviceAccessStateReason() != ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_GLOBAL {
				continue // on a list, admitted by a rule, or without mail already
			}
			if allowDecided {
				if dry {
					continue
				}
				applied, _, err := bus.Load[ev.AppliedRecord](ctx, e.applied, dk)
				if err != nil {
					return nil, err
				}
				if allowListed(applied, rec.GetDecisionId()) {
					continue // allow-listed; the observation predates it
				}
				x.pending[dk] = rec.GetDecisionId()
				continue
			}
			x.revoked = append(x.revoked, mailboxName(p.GetMailbox())+"/"+p.GetDeviceId())
			x.revokedKeys = append(x.revokedKeys, dk)
		}
	}
	sort.Strings(x.revoked)
	sort.Strings(x.revokedKeys)
	return x, nil
}

// planDefault plans the organisation's DefaultAccessLevel from the level
// the full sync syncID read (from), once every observation of that sync
// has been judged. It starts afresh: an earlier plan's wait is dropped.
func (e *Evaluator) planDefault(ctx context.Context, syncID, from string, pub *bus.Publisher) error {
	if err := e.dropPending(ctx); err != nil {
		return err
	}
	return e.judgeDefault(ctx, syncID, from, pub)
}

// judgeDefault decides what to do about the default now.
func (e *Evaluator) judgeDefault(ctx context.Context, syncID, from string, pub *bus.Publisher) error {
	pol := e.policy()
	to, explicit := pol.OrgDefault()
	dry := pol.DryRun || e.cfg.DryRun
	plan := status.DefaultPlan{SyncID: syncID, From: from, To: to, Explicit: explicit, Threshold: e.cfg.BlastRadius,
		PolicyVersion: pol.version, DryRun: dry, At: e.now()}
	switch {
	case to == "":
		plan.State = status.PlanLeftAlone
		plan.Detail = fmt.Sprintf("DefaultAccessLevel left at %s: ", from)
		if explicit {
			plan.Detail += "the policy says default_access_level: unchanged"
		} else {
			plan.Detail += "the policy's scope is a pilot, and a tighter default would take mail from every phone of the mailboxes it leaves out; set default_access_level to change it"
		}
		return putStatus(ctx, e, status.DefaultPlanKey, plan)
	case strings.EqualFold(to, from):
		plan.State = status.PlanInPlace
		plan.Detail = "DefaultAccessLevel is " + from + ", as the policy wants"
		return putStatus(ctx, e, status.DefaultPlanKey, plan)
	}
	x := &exposure{}
	if tightens(from, to) {
		var err error
		if x, err = e.expose(ctx, dry); err != nil {
			return err
		}
	}
	plan.Partnerships, plan.Allowed, plan.Revoked, plan.Pending = x.partnerships, x.allowed, len(x.revoked), len(x.pending)
	plan.Sample = x.revoked[:min(len(x.revoked), sampleSize)]
	if plan.Allowed > 0 {
		plan.Share = float64(plan.Revoked) / float64(plan.Allowed)
	}
	trips := plan.Revoked >= e.cfg.BlastMinimum && plan.Share > e.cfg.BlastRadius
	change := fmt.Sprintf("changing DefaultAccessLevel from %s to %s", from, to)
	takes := fmt.Sprintf("takes mail from %d of the %d partnerships that have it (%.0f%%, limit %.0f%%)", plan.Revoked, plan.Allowed, 100*plan.Share, 100*e.cfg.BlastRadius)
	switch {
	case dry:
		plan.State = status.PlanDryRun
		plan.Detail = "dry run: would change DefaultAccessLevel from " + from + " to " + to
		if tightens(from, to) {
			plan.Detail += fmt.Sprintf(" after allow-listing what the policy allows; it would take mail from %d of the %d partnerships that have it (%.0f%%, limit %.0f%%)",
				plan.Revoked, plan.Allowed, 100*plan.Share, 100*e.cfg.BlastRadius)
			if trips {
				plan.Detail += ", so the blast-radius guard would hold it"
			}
		}
		return putStatus(ctx, e, status.DefaultPlanKey, plan)
	case len(x.pending) > 0:
		plan.State = status.PlanWaiting
		plan.Detail = fmt.Sprintf("%s waits until %d device(s) the policy allows are on their allow lists; it then %s", change, len(x.pending), takes)
		for dk, id := range x.pending {
			pk, err := pendingKey(e.org, dk)
			if err != nil {
				return err
			}
			if _, err := e.staged.Put(ctx, pk, []byte(id)); err != nil {
				return fmt.Errorf("default plan: remember %s: %w", dk, err)
			}
		}
		return putStatus(ctx, e, status.DefaultPlanKey, plan)
	case trips:
		plan.State = status.PlanHeld
		sum := sha256.Sum256([]byte(from + "|" + to + "|" + strings.Join(x.revokedKeys, "\n")))
		plan.Key, plan.Since = hex.EncodeToString(sum[:12]), plan.At
		plan.Detail = fmt.Sprintf("%s %s; it was not changed. If this is intended, raise EASGUARD_EVALUATOR_BLAST_RADIUS until a full sync has changed it, "+
			"or allow-list the devices first.", change, takes)
		// A plan record that cannot be read counts as another
		// tightening: the alert is raised again rather than never.
		if prev, ok, _ := status.Get[status.DefaultPlan](ctx, e.status, e.org, status.DefaultPlanKey); ok && prev.State == status.PlanHeld && prev.Key == plan.Key {
			plan.Since = prev.Since // the same tightening again: still holding, already alerted
		} else {
			e.log.Error("blast-radius guard held the organisation's default", "from", from, "to", to, "revoked", plan.Revoked, "allowed", plan.Allowed)
			a, err := e.alert(ev.AlertKind_ALERT_KIND_BLAST_RADIUS, ev.AlertSeverity_ALERT_SEVERITY_CRITICAL, "blast:default:"+plan.Key, plan.Detail,
				map[string]string{"batch": "default", "setting": "DefaultAccessLevel", "from": from, "to": to, "revocations": strconv.Itoa(plan.Revoked),
					"allowed": strconv.Itoa(plan.Allowed), "threshold": fmt.Sprint(e.cfg.BlastRadius), "sample": strings.Join(plan.Sample, ", ")})
			if err != nil {
				return err
			}
			if _, err := pub.Publish(ctx, a); err != nil {
				return err
			}
		}
		return putStatus(ctx, e, status.DefaultPlanKey, plan)
	}
	d := &ev.OrgSettingsDecided{Org: string(e.org), FromLevel: from, ToLevel: to, SyncId: syncID, PolicyVersion: plan.PolicyVersion,
		Partnerships: int64(plan.Partnerships), Revoked: int64(plan.Revoked), DecidedAt: timestamppb.New(e.now())}
	sum := sha256.Sum256([]byte(string(e.org) + "|" + syncID + "|" + from + "|" + to))
	d.DecisionId = hex.EncodeToString(sum[:12])
	d.Reason = change
	if tightens(from, to) {
		d.Reason += "; every device the policy allows is allow-listed, and it " + takes
	}
	subject, err := bus.SettingsDecided.Subject(e.org, "")
	if err != nil {
		return bus.Poison(err)
	}
	if _, err := pub.Publish(ctx, bus.Outbound{Subject: subject, Message: d, MsgID: "settings:" + d.GetDecisionId()}); err != nil {
		return err
	}
	plan.State, plan.DecisionID, plan.Detail = status.PlanReleased, d.GetDecisionId(), d.GetReason()
	e.log.Info("organisation default released", "from", from, "to", to, "revoked", plan.Revoked, "allowed", plan.Allowed, "decision_id", d.GetDecisionId())
	return putStatus(ctx, e, status.DefaultPlanKey, plan)
}

// allowListed reports whether the executor applied the decision id (or
// found Exchange already as it says).
func allowListed(applied *ev.AppliedRecord, decisionID string) bool {
	o := applied.GetOutcome()
	return decisionID != "" && applied.GetDecisionId() == decisionID &&
		(o == ev.ApplyOutcome_APPLY_OUTCOME_APPLIED || o == ev.ApplyOutcome_APPLY_OUTCOME_ALREADY_IN_STATE)
}

// pendingKey is where the plan remembers an allow-list entry it waits for.
func pendingKey(org bus.Org, decisionKey string) (string, error) {
	rest := strings.TrimPrefix(decisionKey, string(org)+".")
	if rest == decisionKey {
		return "", bus.Poison(fmt.Errorf("decision key %q is not of %s", decisionKey, org))
	}
	return string(org) + ".default." + rest, nil
}

// dropPending forgets the allow-list entries an earlier plan waited for.
func (e *Evaluator) dropPending(ctx context.Context) error {
	keys, err := bus.ListKeys(ctx, e.staged, string(e.org)+".default.>")
	if err != nil {
		return err
	}
	return e.dropStaged(ctx, keys)
}

// waitingDefault looks at the allow-list entries a waiting plan waits for,
// forgets those that are done (applied, or no longer an Allow decision),
// and judges the default again once none is left. Each look reads only
// the entries still awaited, not every partnership.
func (e *Evaluator) waitingDefault(ctx context.Context, pub *bus.Publisher) error {
	keys, err := bus.ListKeys(ctx, e.staged, string(e.org)+".default.>")
	if err != nil || len(keys) == 0 {
		return err
	}
	left := 0
	for _, k := range keys {
		entry, err := e.staged.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("default plan: %w", err)
		}
		dk := string(e.org) + "." + strings.TrimPrefix(k, string(e.org)+".default.")
		rec, ok, err := bus.Load[ev.DecisionRecord](ctx, e.decisions, dk)
		if err != nil {
			return err
		}
		applied, _, err := bus.Load[ev.AppliedRecord](ctx, e.applied, dk)
		if err != nil {
			return err
		}
		done := !ok || rec.GetDesired() != ev.DesiredAccess_DESIRED_ACCESS_ALLOW ||
			allowListed(applied, string(entry.Value())) || allowListed(applied, rec.GetDecisionId())
		if !done {
			left++
			continue
		}
		if err := e.staged.Delete(ctx, k, jetstream.LastRevision(entry.Revision())); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) && !bus.IsConflict(err) {
			return fmt.Errorf("default plan: %w", err)
		}
	}
	if left > 0 {
		return nil
	}
	// Under the guard lock, so that a full sync's new plan (SyncCompleted,
	// on any replica) and this one never judge at once; the plan is read
	// again inside it, since a new one may have been made meanwhile.
	return e.guarded(ctx, func(ctx context.Context) error {
		if keys, err := bus.ListKeys(ctx, e.staged, string(e.org)+".default.>"); err != nil || len(keys) > 0 {
			return err // a newer plan waits for its own entries
		}
		plan, ok, err := status.Get[status.DefaultPlan](ctx, e.status, e.org, status.DefaultPlanKey)
		if err != nil {
			return fmt.Errorf("default plan: %w", err)
		}
		if !ok || plan.State != status.PlanWaiting {
			return nil // a newer plan took over
		}
		return e.judgeDefault(ctx, plan.SyncID, plan.From, pub)
	})
}
