package mdm

import (
	"context"
	"log/slog"
	"slices"
	"testing"
	"time"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// readOf normalises managed devices into one complete read.
func readOf(tb testing.TB, ds []ManagedDevice) *inventory {
	tb.Helper()
	var out []*ev.MDMDevice
	for _, m := range ds {
		d, err := Normalize("graph:test", m)
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, d)
	}
	inv, err := newInventory(out)
	if err != nil {
		tb.Fatal(err)
	}
	return inv
}

// A device missing from complete reads is reported removed only once it
// has been missing for missingAfter; coming back in between forgets it;
// a resync publishes every record again.
func TestReconcilerMissingAfterAndResync(t *testing.T) {
	sink := &recordingSink{}
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	r := newReconciler("test", "graph:test", 0.5, sink, slog.Default())
	r.missingAfter, r.now = time.Hour, func() time.Time { return now }
	ctx := context.Background()
	all := devices(20)
	step := func(name string, ds []ManagedDevice, resync bool, wantChanged, wantRemoved []string) {
		t.Helper()
		before := len(sink.calls())
		if err := r.apply(ctx, readOf(t, ds), resync); err != nil {
			t.Fatal(err)
		}
		var changed, removed []string
		for _, call := range sink.calls()[before:] {
			for _, c := range call {
				if c.Removed {
					removed = append(removed, c.Device.GetMdmDeviceId())
				} else {
					changed = append(changed, c.Device.GetMdmDeviceId())
				}
			}
		}
		if !slices.Equal(changed, wantChanged) || !slices.Equal(removed, wantRemoved) {
			t.Fatalf("%s: changed %v removed %v, want %v and %v", name, changed, removed, wantChanged, wantRemoved)
		}
	}
	ids := func(ds []ManagedDevice) []string {
		var out []string
		for _, d := range ds {
			out = append(out, d.ID)
		}
		return out
	}
	step("first read", all, false, ids(all), nil)
	step("unchanged", all, false, nil, nil)
	without := slices.Concat(all[:3], all[4:])
	step("device 4 missing", without, false, nil, nil)
	now = now.Add(30 * time.Minute)
	step("still missing, within the hour", without, false, nil, nil)
	step("back again", all, false, nil, nil)
	now = now.Add(45 * time.Minute)
	step("missing again: the clock starts over", without, false, nil, nil)
	now = now.Add(59 * time.Minute)
	step("59 minutes later", without, false, nil, nil)
	now = now.Add(time.Minute)
	step("an hour later: removed", without, false, nil, []string{all[3].ID})
	step("removed once", without, false, nil, nil)
	changed := slices.Clone(without)
	changed[0].ComplianceState = "noncompliant"
	step("one change", changed, false, []string{changed[0].ID}, nil)
	step("resync publishes all", changed, true, ids(changed), nil)
}
