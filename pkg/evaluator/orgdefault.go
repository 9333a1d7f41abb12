package evaluator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// The states of the plan for the organisation's DefaultAccessLevel.
const (
	// PlanInPlace: Exchange already has the level the policy wants.
	PlanInPlace = "in_place"
	// PlanLeftAlone: the policy leaves the default as it is (a pilot
	// scope that does not set default_access_level, or "unchanged").
	PlanLeftAlone = "left_alone"
	// PlanWaiting: the tightening waits until the devices the policy
	// allows are on their allow lists.
	PlanWaiting = "waiting"
	// PlanHeld: the blast-radius guard refused the tightening.
	PlanHeld = "held"
	// PlanReleased: the change went to the executor.
	PlanReleased = "released"
	// PlanDryRun: a dry run; the plan says what the change would do.
	PlanDryRun = "dry_run"
)

// DefaultPlan is what /status shows about the organisation's
// DefaultAccessLevel (key <org>.default). Exchange gives the default to
// every partnership that no list entry or device rule covers, at its next
// sync, so tightening it is a mass revocation, planned from the level a
// successful full sync read: the devices the policy allows are
// allow-listed first, the partnerships it would still take mail from are
// counted, and the blast-radius guard judges that count as it judges any
// batch of revocations.
type DefaultPlan struct {
	State  string `json:"state"`
	SyncID string `json:"sync_id"`
	// From is what Exchange had at that sync; To what the policy wants
	// ("" when it leaves the default alone).
	From     string `json:"from"`
	To       string `json:"to,omitempty"`
	Explicit bool   `json:"explicit"`
	// Partnerships the plan looked at; Revoked how many of them the change
	// takes mail from; Pending the allow-list entries it waits for.
	Partnerships int `json:"partnerships"`
	Revoked      int `json:"revoked"`
	Pending      int `json:"pending"`
	// Allowed counts the partnerships with mail now: the guard's base.
	Allowed   int     `json:"allowed"`
	Share     float64 `json:"share"`
	Threshold float64 `json:"threshold"`
	// Sample names up to sampleSize of the revoked partnerships
	// (mailbox/device id), so an administrator sees whose mail it is.
	Sample        []string  `json:"sample,omitempty"`
	DecisionID    string    `json:"decision_id,omitempty"`
	PolicyVersion string    `json:"policy_version"`
	DryRun        bool      `json:"dry_run"`
	At            time.Time `json:"at"`
	// Since and Key: when the guard first refused this same tightening,
	// and what names it; the alert is raised once per Key.
	Since  time.Time `json:"since,omitzero"`
	Key    string    `json:"key,omitempty"`
	Detail string    `json:"detail"`
}

// sampleSize bounds DefaultPlan.Sample.
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
	keys, err := listKeys(ctx, e.parts, string(e.org)+".>")
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
	plan := DefaultPlan{SyncID: syncID, From: from, To: to, Explicit: explicit, Threshold: e.cfg.BlastRadius,
		PolicyVersion: pol.Version(), DryRun: dry, At: e.now()}
	switch {
	case to == "":
		plan.State = PlanLeftAlone
		plan.Detail = fmt.Sprintf("DefaultAccessLevel left at %s: ", from)
		if explicit {
			plan.Detail += "the policy says default_access_level: unchanged"
		} else {
			plan.Detail += "the policy's scope is a pilot, and a tighter default would take mail from every phone of the mailboxes it leaves out; set default_access_level to change it"
		}
		return e.putStatus(ctx, "default", plan)
	case strings.EqualFold(to, from):
		plan.State = PlanInPlace
		plan.Detail = "DefaultAccessLevel is " + from + ", as the policy wants"
		return e.putStatus(ctx, "default", plan)
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
		plan.State = PlanDryRun
		plan.Detail = "dry run: would change DefaultAccessLevel from " + from + " to " + to
		if tightens(from, to) {
			plan.Detail += fmt.Sprintf(" after allow-listing what the policy allows; it would take mail from %d of the %d partnerships that have it (%.0f%%, limit %.0f%%)",
				plan.Revoked, plan.Allowed, 100*plan.Share, 100*e.cfg.BlastRadius)
			if trips {
				plan.Detail += ", so the blast-radius guard would hold it"
			}
		}
		return e.putStatus(ctx, "default", plan)
	case len(x.pending) > 0:
		plan.State = PlanWaiting
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
		return e.putStatus(ctx, "default", plan)
	case trips:
		plan.State = PlanHeld
		sum := sha256.Sum256([]byte(from + "|" + to + "|" + strings.Join(x.revokedKeys, "\n")))
		plan.Key, plan.Since = hex.EncodeToString(sum[:12]), plan.At
		plan.Detail = fmt.Sprintf("%s %s; it was not changed. If this is intended, raise EASGUARD_EVALUATOR_BLAST_RADIUS until a full sync has changed it, "+
			"or allow-list the devices first.", change, takes)
		var prev DefaultPlan
		if entry, err := e.status.Get(ctx, string(e.org)+".default"); err == nil && json.Unmarshal(entry.Value(), &prev) == nil && prev.State == PlanHeld && prev.Key == plan.Key {
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
		return e.putStatus(ctx, "default", plan)
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
	plan.State, plan.DecisionID, plan.Detail = PlanReleased, d.GetDecisionId(), d.GetReason()
	e.log.Info("organisation default released", "from", from, "to", to, "revoked", plan.Revoked, "allowed", plan.Allowed, "decision_id", d.GetDecisionId())
	return e.putStatus(ctx, "default", plan)
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
	keys, err := listKeys(ctx, e.staged, string(e.org)+".default.>")
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
	keys, err := listKeys(ctx, e.staged, string(e.org)+".default.>")
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
		if err := e.staged.Delete(ctx, k, jetstream.LastRevision(entry.Revision())); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) && !isWrongLastSequence(err) {
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
		if keys, err := listKeys(ctx, e.staged, string(e.org)+".default.>"); err != nil || len(keys) > 0 {
			return err // a newer plan waits for its own entries
		}
		var plan DefaultPlan
		entry, err := e.status.Get(ctx, string(e.org)+".default")
		if err != nil || json.Unmarshal(entry.Value(), &plan) != nil || plan.State != PlanWaiting {
			return nil // a newer plan took over
		}
		return e.judgeDefault(ctx, plan.SyncID, plan.From, pub)
	})
}
