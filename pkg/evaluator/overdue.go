package evaluator

import (
	"context"
	"fmt"
	"time"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// overdueAlertEvery is how often an overdue sync is alerted again while
// it stays overdue.
const overdueAlertEvery = time.Hour

// checkOverdue raises ALERT_KIND_SYNC_OVERDUE for each sync kind whose
// last pass (or, before any, the collector's schedule) ended longer ago
// than the schedule allows, and clears it once a pass ends again. It runs
// in the evaluator's leaseholder: the collector that stopped cannot say
// so, and a failing sync (which ends, and alerts as failed) is not late.
func (e *Evaluator) checkOverdue(ctx context.Context, pub *bus.Publisher) error {
	now := e.now()
	// Often enough for a quick interval of a second (tests), and a handful
	// of reads: the loop also judges MDM windows.
	if now.Sub(e.overdueChecked) < overdueCheckEvery {
		return nil
	}
	e.overdueChecked = now
	ctx, cancel := context.WithTimeout(ctx, overdueCheckEvery)
	defer cancel()
	sched, ok, err := status.Get[status.Schedule](ctx, e.status, e.org, status.ScheduleKey)
	if err != nil || !ok {
		return err
	}
	wait, _, err := status.Get[status.MDMWait](ctx, e.status, e.org, status.MDMWaitKey)
	if err != nil {
		return err
	}
	if wait.Waiting {
		return nil // the first full sync waits for the MDM, within its bound
	}
	last := map[string]status.Sync{}
	for _, k := range []string{"quick", "full"} {
		if last[k], _, err = status.Get[status.Sync](ctx, e.status, e.org, status.SyncLastKey(k)); err != nil {
			return err
		}
	}
	for _, kind := range []string{"quick", "full"} {
		since, what := sched.StartedAt, "the collector's schedule started"
		// A full pass reads all a quick one would: either ends the wait
		// for a quick one.
		for _, k := range []string{kind, "full"} {
			if last[k].FinishedAt.After(since) {
				since, what = last[k].FinishedAt, "the last "+k+" sync ended"
			}
		}
		limit := sched.Overdue(kind)
		key := "sync-overdue." + kind
		if limit <= 0 || now.Sub(since) <= limit {
			bus.AlertResolved(ctx, e.status, e.org, key)
			continue
		}
		late := now.Sub(since).Round(time.Second)
		if err := bus.RaiseDue(ctx, pub, e.status, e.org, key, overdueAlertEvery, now, bus.Alert{
			Kind: ev.AlertKind_ALERT_KIND_SYNC_OVERDUE, Severity: ev.AlertSeverity_ALERT_SEVERITY_WARNING,
			ID:      fmt.Sprintf("sync-overdue:%s:%s:%d", e.org, kind, since.UnixNano()),
			Summary: fmt.Sprintf("no %s sync for %s (%s at %s; one is due every %s): is the collector running?", kind, late, what, since.UTC().Format(time.RFC3339), sched.Interval(kind)),
			Detail:  map[string]string{"kind": kind, "since": since.UTC().Format(time.RFC3339), "limit": limit.String()},
		}); err != nil {
			return err
		}
	}
	return nil
}

// overdueCheckEvery is how often the leaseholder looks for overdue syncs.
const overdueCheckEvery = time.Second
