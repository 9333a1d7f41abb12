package executor_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// BenchmarkApplyBurst measures the executor's throughput, from decisions
// published to their access.applied reports: bursts of 500 decisions for
// 500 devices on 5 mailboxes, through one executor with the production
// defaults (50ms window, 64 handlers), the real Exchange client and the
// simulator without latency, so that the executor's own path (claims,
// batching, reports) is what is measured. Each burst flips every device
// (allow, then block), so every decision changes Exchange.
func BenchmarkApplyBurst(b *testing.B) {
	const n = 500
	h := start(b, options{window: 50 * time.Millisecond, parallel: 64})
	var parts []*ev.EASPartnership
	for i := range n {
		parts = append(parts, h.phone(b, h.boxes[i%len(h.boxes)], fmt.Sprintf("ApplBENCH%03d", i)))
	}
	b.ResetTimer()
	began := time.Now()
	for it := 0; it < b.N; it++ {
		desired := ev.DesiredAccess_DESIRED_ACCESS_ALLOW
		if it%2 == 1 {
			desired = ev.DesiredAccess_DESIRED_ACCESS_BLOCK
		}
		want := make(map[string]bool, n)
		for _, p := range parts {
			d := decision(p, desired, time.Now())
			want[d.GetDecisionId()] = true
			h.publish(b, d, "")
		}
		natstest.Eventually(b, 2*time.Minute, "the burst applied", func() bool {
			got := 0
			for _, a := range h.applied.All() {
				for _, id := range a.GetDecisionIds() {
					if want[id] {
						if o := a.GetItems()[0].GetOutcome(); o != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
							b.Fatalf("decision %s: %s %q", id, o, a.GetItems()[0].GetError())
						}
						got++
					}
				}
			}
			return got == n
		})
	}
	b.ReportMetric(float64(n*b.N)/time.Since(began).Seconds(), "decisions/s")
}
