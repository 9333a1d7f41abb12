// Package status is the one typed contract for the status bucket
// (bus.BucketStatus): what each worker records there about an
// organisation, under which key, and how to read it back. The collector,
// the evaluator, the executor and the MDM sources write their records
// through it, and /status, the console and the tests read them through it,
// so a record's shape is declared once instead of being re-parsed by every
// reader from another worker's ad-hoc JSON. The JSON names are the wire
// format the bucket already holds: changing one breaks every reader of a
// running installation's records, so they only ever gain fields.
package status

import "time"

// Sync is one sync pass as the collector reports it, under SyncLastKey
// (the last pass of its kind, failed or not) and SyncOKKey (the last
// successful one, which the collector's schedule runs from).
type Sync struct {
	SyncID      string           `json:"sync_id"`
	Kind        string           `json:"kind"`
	RequestedBy string           `json:"requested_by"`
	StartedAt   time.Time        `json:"started_at"`
	FinishedAt  time.Time        `json:"finished_at"`
	Success     bool             `json:"success"`
	Counts      map[string]int64 `json:"counts"`
	Errors      []string         `json:"errors,omitempty"`
	Settings    []string         `json:"settings_enforced,omitempty"`
	// SettingsNote says why settings were not enforced (a dry run, no
	// policy known yet) and what a dry run would have changed.
	SettingsNote string `json:"settings_note,omitempty"`
	// DefaultAccessLevel is the organisation's as this full sync read it.
	DefaultAccessLevel string            `json:"default_access_level,omitempty"`
	Server             string            `json:"cas_server,omitempty"`
	Extra              map[string]string `json:"extra,omitempty"`
}

// MDMWait is the first full sync's wait for the MDM inventory, under
// MDMWaitKey: the collector holds that sync until the inventory is read
// and indexed, so that no enrolled phone is judged unknown meanwhile, and
// an administrator looking at a sync that has not started sees why.
type MDMWait struct {
	// Waiting is true while the first full sync waits.
	Waiting bool      `json:"waiting"`
	Since   time.Time `json:"since"`
	Until   time.Time `json:"until,omitzero"`
	// InventoryRead says an MDM inventory source delivered a complete
	// read; Indexed that the matcher has handled every MDM change since.
	InventoryRead bool `json:"inventory_read"`
	Indexed       bool `json:"indexed"`
	// Checks counts the looks at both so far.
	Checks int `json:"checks"`
}

// PassJudged says when the evaluator had judged every partnership a sync
// pass observed, under PassJudgedKey: the end of a pass as a user sees it,
// where the collector's Sync ends with the listing. A judgement that
// changes nothing writes nothing, so this is also the only trace of how
// long the judging of a pass took.
type PassJudged struct {
	SyncID string `json:"sync_id"`
	Kind   string `json:"kind"`
	// Observed is the partnerships the pass observed.
	Observed   int64     `json:"observed"`
	FinishedAt time.Time `json:"finished_at"`
	// JudgedAt is when the pass's last observation had been matched and
	// judged (within the barrier's 100 ms poll).
	JudgedAt time.Time `json:"judged_at"`
}

// The states of the blast-radius guard (Guard.State).
const (
	// GuardOK: the last batch judged was released, or none was judged yet.
	GuardOK = "ok"
	// GuardTripped: the guard holds a set of revocations (Guard.Key)
	// until an administrator approves it or the set changes.
	GuardTripped = "tripped"
	// GuardApproved: a held set was released because an administrator
	// approved exactly that set (GuardApproval).
	GuardApproved = "approved"
	// GuardDiscarded: an administrator discarded a held set; its
	// revocations are not applied, and a new set is judged afresh.
	GuardDiscarded = "discarded"
)

// Guard is the blast-radius guard's state, under GuardKey: whether it
// holds a mass revocation, which one (Key, what an approval names), and
// the share that tripped it, so that an administrator can tell an intended
// change from a broken MDM before approving.
type Guard struct {
	// State is GuardOK, GuardTripped, GuardApproved or GuardDiscarded.
	State       string    `json:"state"`
	Batch       string    `json:"batch"`
	Revocations int       `json:"revocations"`
	Allowed     int       `json:"allowed"`
	Share       float64   `json:"share"`
	Threshold   float64   `json:"threshold"`
	At          time.Time `json:"at"`
	Detail      string    `json:"detail"`
	// Since is when the guard first refused this same set of revocations;
	// Key names the set. The alert is raised once per set, not per pass.
	Since time.Time `json:"since,omitempty"`
	Key   string    `json:"key,omitempty"`
}

// GuardApproval is an administrator's approval of the set of revocations
// the blast-radius guard holds, under GuardApprovalKey: the next
// judgement of exactly that set (Key is Guard.Key) releases it instead of
// holding it again. A set that changed since (one device more or fewer)
// has another key and is held again.
type GuardApproval struct {
	Key    string    `json:"key"`
	By     string    `json:"by"`
	Reason string    `json:"reason,omitempty"`
	At     time.Time `json:"at"`
}

// The states of an MDM source (MDMSource.State).
const (
	// MDMOK: the source's last read or delivery of changes worked.
	MDMOK = "ok"
	// MDMAlert: the source raised an alert (MDMSource.Alert) and did not
	// act on what it read, such as an inventory that lists no devices.
	MDMAlert = "alert"
)

// MDMSource is what an MDM source last reported, under MDMSourceKey of its
// kind (graph, file, webhook): the one place that says whether easguard
// still hears from the MDM, without which every device would drift to
// "unknown".
type MDMSource struct {
	// Source is the source's name; State is MDMOK or MDMAlert.
	Source string    `json:"source"`
	State  string    `json:"state"`
	At     time.Time `json:"at"`
	// Devices is set after a complete read: how many devices it listed,
	// zero included. LastChanges is set instead after the source published
	// changes. Pointers, because "read nothing" and "not a read" differ.
	Devices     *int `json:"devices,omitempty"`
	LastChanges *int `json:"last_changes,omitempty"`
	// Alert is the alert kind (ev.AlertKind's name) of an MDMAlert state,
	// with its Summary and Detail as the alert carried them.
	Alert   string            `json:"alert,omitempty"`
	Summary string            `json:"summary,omitempty"`
	Detail  map[string]string `json:"detail,omitempty"`
}

// Policy is the policy in force as the evaluator loaded it, under
// PolicyKey. The collector reads it too: in a dry run it must not enforce
// the organisation settings either.
type Policy struct {
	Version  string    `json:"version"`
	File     string    `json:"file,omitempty"`
	DryRun   bool      `json:"dry_run"`
	LoadedAt time.Time `json:"loaded_at"`
	// Warnings name the rules that trust values the phone reports about
	// itself (policy.Policy.Warnings), so that an administrator sees them
	// where the policy in force is shown, not only in a log.
	Warnings []string `json:"warnings,omitempty"`
}

// The states of the plan for the organisation's DefaultAccessLevel
// (DefaultPlan.State).
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

// DefaultPlan is the evaluator's plan for the organisation's
// DefaultAccessLevel, under DefaultPlanKey. Exchange gives the default to
// every partnership that no list entry or device rule covers, at its next
// sync, so tightening it is a mass revocation, planned from the level a
// successful full sync read: the devices the policy allows are
// allow-listed first, the partnerships it would still take mail from are
// counted, and the blast-radius guard judges that count as it judges any
// batch of revocations.
type DefaultPlan struct {
	// State is one of the Plan constants.
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
	// Sample names some of the revoked partnerships (mailbox/device id),
	// so an administrator sees whose mail it is.
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

// The outcomes of the executor's change of the organisation's
// DefaultAccessLevel (DefaultApplied.Outcome).
const (
	// DefaultChanged: Exchange had the planned level and now has the new
	// one.
	DefaultChanged = "changed"
	// DefaultAlready: Exchange already had the new level (a redelivery).
	DefaultAlready = "already_in_state"
	// DefaultStale: Exchange had neither level; someone changed the
	// default since the full sync the plan rests on, and the next full
	// sync plans again from what they set.
	DefaultStale = "stale"
)

// DefaultApplied is the executor's last change of the organisation's
// DefaultAccessLevel, under DefaultAppliedKey: what the plan asked, what
// Exchange had, and whether it was changed, since a plan can go stale
// between the sync it rests on and the change.
type DefaultApplied struct {
	DecisionID string `json:"decision_id"`
	From       string `json:"from"`
	To         string `json:"to"`
	Found      string `json:"found"`
	// Outcome is one of the Default constants.
	Outcome string    `json:"outcome"`
	Server  string    `json:"cas_server,omitempty"`
	Actor   string    `json:"actor,omitempty"`
	At      time.Time `json:"at"`
	Detail  string    `json:"detail"`
}

// Schedule is the collector's schedule, recorded when the active collector
// starts it (ScheduleKey). It is how another worker knows when a sync is
// overdue: a collector that stopped cannot say so itself.
type Schedule struct {
	QuickInterval time.Duration `json:"quick_interval"`
	FullInterval  time.Duration `json:"full_interval"`
	// Holder is the collector replica that started it, at StartedAt.
	Holder    string    `json:"holder,omitempty"`
	StartedAt time.Time `json:"started_at"`
}

// Overdue is how long after the last pass of a kind (or after the
// schedule started, before any) the next one counts as overdue: three
// quick intervals, or a full interval and a twelfth (26 hours of a daily
// full sync), as the Prometheus rules say.
func (s Schedule) Overdue(kind string) time.Duration {
	if kind == "full" {
		return s.FullInterval + s.FullInterval/12
	}
	return 3 * s.QuickInterval
}

// Interval is how often a sync of kind ("quick", "full") is due.
func (s Schedule) Interval(kind string) time.Duration {
	if kind == "full" {
		return s.FullInterval
	}
	return s.QuickInterval
}

// SyncRequest is the last sync of a kind the console asked for
// (SyncRequestedKey): one of a kind is in flight at a time.
type SyncRequest struct {
	SyncID      string    `json:"sync_id"`
	By          string    `json:"by"`
	RequestedAt time.Time `json:"requested_at"`
}
