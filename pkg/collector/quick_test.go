package collector_test

import (
	"testing"

	"github.com/easguard/easguard/pkg/exchange"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// An administrator blocks a known phone by hand, out of band: the next
// quick sync reports it changed, with its new state, because it reads the
// partnerships of every mailbox changed since the last sync. Whether a
// list edit shows in the mailbox's WhenChanged is UNCONFIRMED: where it
// does not, the quick sync cannot see the edit, and the full sync reports
// it. An unchanged organisation costs a quick sync two cmdlets.
func TestQuickSyncReportsChangedAccess(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		// keep: list edits leave the mailbox's WhenChanged as it was.
		keep bool
	}{
		{"list edits stamp WhenChanged", false},
		{"list edits keep WhenChanged", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := start(t, options{})
			h.sim.Org.SetListEditsKeepWhenChanged(tc.keep)
			parts := h.visible()
			n := int64(len(parts))
			h.sync(full, "full-1")

			// Nothing changed: the quick sync reports nothing, cheaply.
			base := h.sim.Recorder.Count("cmdlet")
			checkCounts(t, "quick sync of an unchanged organisation", h.sync(quick, "quick-0").GetCounts(), &ev.SyncCounts{})
			if c := h.sim.Recorder.Count("cmdlet") - base; c > 2 {
				t.Fatalf("a quick sync of an unchanged organisation ran %d cmdlets, want at most 2", c)
			}

			victim := allowedByDefault(t, parts)
			mates := int64(0) // visible partnerships of the victim's mailbox
			for _, p := range parts {
				if p.Mailbox == victim.Mailbox {
					mates++
				}
			}
			if _, _, err := h.sim.Org.AdminInvoke(exchange.Call{Cmdlet: "Set-CASMailbox", Params: exchange.Params{
				"Identity": victim.PrimarySMTP, "ActiveSyncBlockedDeviceIDs": exchange.MultiValued{Add: []string{victim.DeviceID}}}}); err != nil {
				t.Fatal(err)
			}

			base = h.sim.Recorder.Count("cmdlet")
			q := h.sync(quick, "quick-1")
			if tc.keep {
				checkCounts(t, "quick sync", q.GetCounts(), &ev.SyncCounts{})
			} else {
				checkCounts(t, "quick sync", q.GetCounts(), &ev.SyncCounts{Observed: mates, Changed: 1, Unchanged: mates - 1})
				checkChanged(t, h.observationsOf("quick-1", int(mates)), victim.DeviceID)
				if c := h.sim.Recorder.Count("cmdlet") - base; c > 3 {
					t.Fatalf("a quick sync with one changed mailbox ran %d cmdlets, want at most 3", c)
				}
			}

			f := h.sync(full, "full-2")
			want := &ev.SyncCounts{Observed: n, Unchanged: n, Mailboxes: f.GetCounts().GetMailboxes()}
			if tc.keep {
				want.Unchanged, want.Changed = n-1, 1
				checkChanged(t, h.observationsOf("full-2", int(n)), victim.DeviceID)
			}
			checkCounts(t, "full sync after", f.GetCounts(), want)
		})
	}
}

// checkChanged checks that the one CHANGED observation is the blocked phone, blocked.
func checkChanged(t *testing.T, obs []*ev.EASPartnershipObserved, deviceID string) {
	t.Helper()
	c := byChange(obs)[ev.ObservationChange_OBSERVATION_CHANGE_CHANGED]
	if len(c) != 1 || c[0].GetPartnership().GetDeviceId() != deviceID ||
		c[0].GetPartnership().GetDeviceAccessState() != ev.DeviceAccessState_DEVICE_ACCESS_STATE_BLOCKED ||
		c[0].GetPartnership().GetDeviceAccessStateReason() != ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_INDIVIDUAL {
		t.Fatalf("changed: %v, want %s blocked individually", c, deviceID)
	}
}
