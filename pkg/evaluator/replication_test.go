package evaluator

import (
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Which contradicting observations are taken as predating Active
// Directory's replication of easguard's own change, and which as drift.
func TestReplicationStale(t *testing.T) {
	applied := time.Date(2026, 5, 4, 10, 0, 0, 0, time.UTC)
	rec := &ev.DecisionRecord{DecisionId: "d1"}
	ok := &ev.AppliedRecord{DecisionId: "d1", AppliedAt: timestamppb.New(applied), Outcome: ev.ApplyOutcome_APPLY_OUTCOME_APPLIED}
	changed := func(t time.Time) *ev.EASPartnership { return &ev.EASPartnership{WhenChanged: timestamppb.New(t)} }
	tests := []struct {
		name     string
		grace    time.Duration
		applied  *ev.AppliedRecord
		observed time.Time
		p        *ev.EASPartnership
		want     bool
	}{
		{"read right after the apply, object unchanged since before", 15 * time.Minute, ok, applied.Add(5 * time.Second), changed(applied.Add(-time.Hour)), true},
		{"no WhenChanged: cannot tell, within the grace", 15 * time.Minute, ok, applied.Add(5 * time.Second), &ev.EASPartnership{}, true},
		{"changed after the apply: an edit, drift", 15 * time.Minute, ok, applied.Add(5 * time.Second), changed(applied.Add(2 * time.Second)), false},
		{"read after the grace", 15 * time.Minute, ok, applied.Add(16 * time.Minute), changed(applied.Add(-time.Hour)), false},
		{"read before the apply (in flight, not this rule)", 15 * time.Minute, ok, applied.Add(-time.Second), changed(applied.Add(-time.Hour)), false},
		{"grace off", 0, ok, applied.Add(5 * time.Second), changed(applied.Add(-time.Hour)), false},
		{"another decision was applied", 15 * time.Minute, &ev.AppliedRecord{DecisionId: "d0", AppliedAt: timestamppb.New(applied), Outcome: ev.ApplyOutcome_APPLY_OUTCOME_APPLIED},
			applied.Add(5 * time.Second), changed(applied.Add(-time.Hour)), false},
		{"not applied", 15 * time.Minute, &ev.AppliedRecord{DecisionId: "d1", AppliedAt: timestamppb.New(applied), Outcome: ev.ApplyOutcome_APPLY_OUTCOME_NOT_FOUND},
			applied.Add(5 * time.Second), changed(applied.Add(-time.Hour)), false},
		{"nothing applied", 15 * time.Minute, nil, applied.Add(5 * time.Second), changed(applied.Add(-time.Hour)), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := replicationStale(tt.grace, rec, tt.applied, tt.observed, tt.p); got != tt.want {
				t.Fatalf("stale = %v, want %v", got, tt.want)
			}
		})
	}
}
