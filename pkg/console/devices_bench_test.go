package console

import (
	"fmt"
	"testing"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// BenchmarkDeviceQuery100k pages and searches an organisation of 100,000
// partnerships as the devices page does: the first page (the sorted list
// cached), a search that scans every row, a state filter, and the first
// page right after a record changed (the sort redone).
func BenchmarkDeviceQuery100k(b *testing.B) {
	x := newDeviceIndex("contoso")
	for i := range 100_000 {
		user := fmt.Sprintf("user%06d@contoso.com", i%50_000)
		p := &ev.EASPartnership{Mailbox: &ev.Mailbox{PrimarySmtpAddress: user, UserPrincipalName: user}, DeviceId: fmt.Sprintf("ApplBENCH%07d", i),
			DeviceType: "iPhone", DeviceModel: "iPhone16,1", Guid: fmt.Sprintf("guid-%d", i), DeviceAccessState: ev.DeviceAccessState(2 + i%3)}
		rec := &ev.DecisionRecord{Desired: ev.DesiredAccess_DESIRED_ACCESS_ALLOW, Rule: "compliant",
			LastMatched: &ev.DeviceMatched{Observed: &ev.EASPartnershipObserved{Partnership: p}}}
		key := fmt.Sprintf("contoso.applbench%07d.guid-%d", i, i)
		d := deviceFromRecord(key, rec)
		x.byKey[key] = &d
	}
	for _, q := range []struct {
		name  string
		query DeviceQuery
		stale bool
	}{
		{"first page", DeviceQuery{Page: 1}, false},
		{"search", DeviceQuery{Search: "user04999"}, false},
		{"state", DeviceQuery{State: "Blocked", Page: 7}, false},
		{"after a change", DeviceQuery{Page: 1}, true},
	} {
		b.Run(q.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if q.stale {
					x.mu.Lock()
					x.sorted = nil
					x.mu.Unlock()
				}
				if p := x.query(q.query); p.Total == 0 {
					b.Fatal("nothing found")
				}
			}
		})
	}
}
