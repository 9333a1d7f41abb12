package collector_test

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// The full sync reads its listings in parts over the sessions (the
// exchange client's partitioned listing): it still reports every
// partnership, finds exactly the removed ones gone, whichever part held
// them and whether Exchange's -like minds case (UNCONFIRMED), and a part
// that fails fails the sync without a single partnership reported gone.
func TestFullSyncInPartsFindsGone(t *testing.T) {
	for _, caseSensitive := range []bool{false, true} {
		name := "like ignores case"
		if caseSensitive {
			name = "like minds case"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			h := start(t, options{exchange: func(c *exchange.Config) { c.Workers = 3 }})
			h.sim.Org.SetCaseSensitiveLike(caseSensitive)
			ctx := natstest.Context(t)
			boxes := h.sim.Org.Mailboxes()
			// Ids in the remainder (quotes, a trailing dash, non-ASCII) and in
			// groups, in either case.
			odd := []string{"it's'; $(Stop-Computer)", "ends-with-dash-", "endsé", "lowerenda", "UPPERENDA", "7"}
			for i, id := range odd {
				h.newPhone(boxes[i%len(boxes)].PrimarySMTP, id)
			}
			parts := h.visible()
			n := int64(len(parts))
			h.sim.Recorder.Reset()
			first := h.sync(full, "full-1")
			if c := first.GetCounts(); c.GetObserved() != n || c.GetNew() != n || c.GetGone() != 0 {
				t.Fatalf("first full sync: %v, want %d new", c, n)
			}
			if got := len(mobileDeviceFilters(t, h)); got != 2*3+1 {
				t.Fatalf("the full sync listed partnerships in %d parts, want %d", got, 2*3+1)
			}

			// One removed from the remainder, one from a group.
			var victims []string
			for _, p := range parts {
				if p.DeviceID == "ends-with-dash-" || p.DeviceID == "lowerenda" {
					if err := h.client.RemovePartnership(ctx, p.Identity); err != nil {
						t.Fatal(err)
					}
					victims = append(victims, p.Identity)
				}
			}
			second := h.sync(full, "full-2")
			if c := second.GetCounts(); c.GetGone() != 2 || c.GetObserved() != n-2 || c.GetUnchanged() != n-2 {
				t.Fatalf("full sync after removing two: %v", c)
			}
			var gone []string
			for _, o := range byChange(h.observationsOf("full-2", int(n)))[ev.ObservationChange_OBSERVATION_CHANGE_GONE] {
				gone = append(gone, o.GetPartnership().GetIdentity())
			}
			slices.Sort(gone)
			slices.Sort(victims)
			if !slices.Equal(gone, victims) {
				t.Fatalf("reported gone %q, removed %q", gone, victims)
			}

			// A part failing: the sync fails, and nothing is reported gone.
			h.sim.Org.SetCallFault(func(c exchange.Call) *exchange.Error {
				if f, _ := c.Params["Filter"].(string); c.Cmdlet == "Get-MobileDevice" && strings.Contains(f, "DeviceId -like '*7'") && !strings.HasPrefix(f, "-not") {
					return &exchange.Error{Message: "Active Directory operation failed on DC01.contoso.com.", Category: "NotSpecified", Reason: "ADTransientException"}
				}
				return nil
			})
			done, err := h.c.Sync(ctx, full, "full-3", "test")
			if err == nil || done.GetSuccess() {
				t.Fatalf("the full sync succeeded with a part failing: %v, %v", done, err)
			}
			if c := h.completedOf("full-3"); c.GetSuccess() || c.GetCounts().GetGone() != 0 {
				t.Fatalf("failed full sync reported %v", c)
			}
			obs := h.observationsOf("full-3", int(done.GetCounts().GetObserved()))
			if g := byChange(obs)[ev.ObservationChange_OBSERVATION_CHANGE_GONE]; len(g) != 0 {
				t.Fatalf("a failed full sync reported %d partnerships gone", len(g))
			}
			h.sim.Org.SetCallFault(nil)
			if c := h.sync(full, "full-4").GetCounts(); c.GetGone() != 0 || c.GetObserved() != n-2 {
				t.Fatalf("full sync after the failed one: %v", c)
			}
		})
	}
}

// mobileDeviceFilters returns the -Filter of every Get-MobileDevice the
// simulator recorded.
func mobileDeviceFilters(t *testing.T, h *harness) []string {
	t.Helper()
	var out []string
	for _, r := range h.sim.Recorder.Records("cmdlet") {
		if r.Cmdlet != "Get-MobileDevice" {
			continue
		}
		var p struct{ Filter string }
		if err := json.Unmarshal(r.Params, &p); err != nil {
			t.Fatal(err)
		}
		out = append(out, p.Filter)
	}
	return out
}
