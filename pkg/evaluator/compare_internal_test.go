package evaluator

import (
	"google.golang.org/protobuf/reflect/protoreflect"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

func TestEqualExceptAndShallowCopy(t *testing.T) {
	base := func() *ev.DecisionRecord {
		return &ev.DecisionRecord{DecisionId: "d1", Desired: ev.DesiredAccess_DESIRED_ACCESS_ALLOW, Rule: "compliant",
			ConfirmedAt: timestamppb.New(time.Unix(100, 0)), Traceparent: "tp",
			LastMatched: &ev.DeviceMatched{Org: "contoso", Detail: "x", Mdm: &ev.MDMDevice{MdmDeviceId: "m1"}}}
	}
	skip := []string{"last_matched", "confirmed_at", "traceparent"}
	for _, tc := range []struct {
		name  string
		edit  func(*ev.DecisionRecord)
		equal bool
	}{
		{"the same", func(*ev.DecisionRecord) {}, true},
		{"skipped fields differ", func(r *ev.DecisionRecord) {
			r.ConfirmedAt, r.Traceparent, r.LastMatched = nil, "other", &ev.DeviceMatched{Detail: "y"}
		}, true},
		{"a scalar differs", func(r *ev.DecisionRecord) { r.Rule = "unknown_device" }, false},
		{"an enum differs", func(r *ev.DecisionRecord) { r.Desired = ev.DesiredAccess_DESIRED_ACCESS_BLOCK }, false},
		{"a message set on one side", func(r *ev.DecisionRecord) { r.DecidedAt = timestamppb.New(time.Unix(5, 0)) }, false},
		{"a nested field differs", func(r *ev.DecisionRecord) { r.LastDecision = &ev.AccessDecided{DecisionId: "d1"} }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := base(), base()
			tc.edit(b)
			names := make([]protoreflect.Name, len(skip))
			for i, s := range skip {
				names[i] = protoreflect.Name(s)
			}
			if got := equalExcept(a, b, names...); got != tc.equal {
				t.Fatalf("equalExcept = %v, want %v", got, tc.equal)
			}
		})
	}
	t.Run("a shallow copy keeps the record as read", func(t *testing.T) {
		r := base()
		before := shallowCopy(r)
		r.Rule, r.LastMatched = "changed", nil
		if before.GetRule() != "compliant" || before.GetLastMatched().GetDetail() != "x" || before.GetConfirmedAt().AsTime() != time.Unix(100, 0).UTC() {
			t.Fatalf("copy %v", before)
		}
	})
	t.Run("verdicts equal but for when and why", func(t *testing.T) {
		a := &ev.DeviceMatched{Org: "contoso", Detail: "x", MatchedAt: timestamppb.New(time.Unix(1, 0)), Trigger: "eas",
			Observed: &ev.EASPartnershipObserved{Partnership: &ev.EASPartnership{DeviceId: "d"}, ObservedAt: timestamppb.New(time.Unix(1, 0)),
				Change: ev.ObservationChange_OBSERVATION_CHANGE_NEW, Sync: &ev.SyncRef{SyncId: "s1"}}}
		b := &ev.DeviceMatched{Org: "contoso", Detail: "x", MatchedAt: timestamppb.New(time.Unix(2, 0)), Trigger: "mdm",
			Observed: &ev.EASPartnershipObserved{Partnership: &ev.EASPartnership{DeviceId: "d"}, ObservedAt: timestamppb.New(time.Unix(2, 0)),
				Change: ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED, Sync: &ev.SyncRef{SyncId: "s2"}}}
		if !sameVerdictInput(a, b) {
			t.Fatal("same verdict input reported different")
		}
		b.Observed.Partnership.DeviceOs = "iOS 18"
		if sameVerdictInput(a, b) {
			t.Fatal("a changed partnership reported the same")
		}
	})
}
