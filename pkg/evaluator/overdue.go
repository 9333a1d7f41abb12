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
	sched, ok, err := status.Get[status.Schedule](ctx, e.status, e.org, status.ScheduleKey)
	if err != nil || !ok {
		return err
	}
	now := e.now()
	st, err := status.Read(ctx, e.status, e.org)
	if err != nil && len(st.Last) == 0 {
		return err
	}
	if st.MDMWait != nil && st.MDMWait.Waiting {
		return nil // the first full sync waits for the MDM, within its bound
	}
	for _, kind := range []string{"quick", "full"} {
		since, what := sched.StartedAt, "the collector's schedule started"
		// A full pass reads all a quick one would: either ends the wait
		// for a quick one.
		for _, k := range []string{kind, "full"} {
			if last, ok := st.Last[k]; ok && last.FinishedAt.After(since) {
				since, what = last.FinishedAt, "the last "+k+" sync ended"
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
			Summary: fmt.Sprintf("no %s sync for %s (%s at %s; one is due every %s): is the collector running?", kind, late, what, since.UTC().Format(time.RFC3339), interval(sched, kind)),
			Detail:  map[string]string{"kind": kind, "since": since.UTC().Format(time.RFC3339), "limit": limit.String()},
		}); err != nil {
			return err
		}
	}
	return nil
}

func interval(s status.Schedule, kind string) time.Duration {
	if kind == "full" {
		return s.FullInterval
	}
	return s.QuickInterval
}
