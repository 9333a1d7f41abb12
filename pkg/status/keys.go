package status

import "github.com/easguard/easguard/pkg/bus"

// The keys of the records an organisation has one of, relative to the
// organisation (Put and Get prefix "<org>.").
const (
	// GuardKey holds the Guard.
	GuardKey = "guard"
	// GuardApprovalKey holds the GuardApproval waiting to be used.
	GuardApprovalKey = "guard.approval"
	// MDMWaitKey holds the first full sync's MDMWait.
	MDMWaitKey = "sync.full.mdm_wait"
	// PolicyKey holds the Policy in force.
	PolicyKey = "policy"
	// DefaultPlanKey holds the DefaultPlan.
	DefaultPlanKey = "default"
	// DefaultAppliedKey holds the executor's DefaultApplied.
	DefaultAppliedKey = "default.applied"
	// ScheduleKey holds the collector's Schedule.
	ScheduleKey = "sync.schedule"
)

const (
	syncPrefix = "sync."
	mdmPrefix  = "mdm."
	lastSuffix = ".last"
	okSuffix   = ".ok"
	judgedEnd  = ".judged"
	requestEnd = ".requested"
)

// SyncRequestedKey is where the console records the last sync of a kind
// it asked for (a SyncRequest).
func SyncRequestedKey(kind string) string { return syncPrefix + kind + requestEnd }

// SyncLastKey is where the last sync pass of a kind ("quick", "full") is
// recorded, failed or not.
func SyncLastKey(kind string) string { return syncPrefix + kind + lastSuffix }

// SyncOKKey is where the last successful sync pass of a kind is recorded:
// the collector schedules the next pass from it.
func SyncOKKey(kind string) string { return syncPrefix + kind + okSuffix }

// PassJudgedKey is where the evaluator records the PassJudged of the last
// sync pass of a kind.
func PassJudgedKey(kind string) string { return syncPrefix + kind + judgedEnd }

// MDMSourceKey is where an MDM source of a kind (graph, file, webhook)
// records its MDMSource.
func MDMSourceKey(kind string) string { return mdmPrefix + kind }

// AlertKey is where bus.AlertDue remembers when the condition what (such
// as "sync.quick" or "smtp.auth") was last alerted. Its value is RFC 3339
// text, not JSON, so it is read through Read (Org.Alerts), not Get.
func AlertKey(what string) string { return bus.AlertedKeyPrefix + what }
