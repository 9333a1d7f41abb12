package executor_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
)

// BenchmarkApplyBurst measures the executor's throughput, from decisions
// published to their access.applied reports: bursts of 500 decisions for
// 500 devices on 5 mailboxes, through one executor with the production
// defaults (10ms window, 64 handlers), the real Exchange client and the
// simulator without latency, so that the executor's own path (claims,
// batching, reports) is what is measured. Each burst flips every device
// (allow, then block), so every decision changes Exchange.
func BenchmarkApplyBurst(b *testing.B) {
	const n = 500
	h := start(b, options{window: 10 * time.Millisecond, parallel: 64})
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

// BenchmarkTimeToApply measures the executor's part of the time to allow,
// without the rest of the pipeline: from a decision published to the
// simulated Exchange (default latency profile: a session takes 3.3 s to
// open, Get-CASMailbox 10 ms, Set-CASMailbox 40 ms) answering the phone
// with the decided state. The pool has the default 4 workers, open
// already, and takes further sessions from a shared budget of 12; every
// phone is on its own mailbox.
//
//   - burst: 200 allows 10 ms apart on the 4 open sessions; more open
//     while it runs, ready after 3.3 s.
//   - burst_warm: right after, 200 blocks 10 ms apart, on the sessions the
//     first burst opened (kept for EASGUARD_EXCHANGE_BURST_IDLE).
//   - at_rest: 50 allows 100 ms apart; the target is the cmdlets' own
//     latency plus 50 ms.
func BenchmarkTimeToApply(b *testing.B) {
	for _, c := range []struct {
		name   string
		phones int
		every  time.Duration
		warm   bool
	}{
		{"burst", 200, 10 * time.Millisecond, false},
		{"burst_warm", 200, 10 * time.Millisecond, true},
		{"at_rest", 50, 100 * time.Millisecond, false},
	} {
		b.Run(c.name, func(b *testing.B) {
			var all []time.Duration
			peak := 0
			for range b.N {
				h := start(b, options{window: 10 * time.Millisecond, parallel: 64, profile: exchangesim.DefaultProfile(), mailboxes: c.phones, budget: 12})
				h.openWorkers(b, 4)
				var parts []*ev.EASPartnership
				for i, m := range h.boxes[:c.phones] {
					parts = append(parts, h.phone(b, m, fmt.Sprintf("ApplTTA%03d", i)))
				}
				waits, p := h.applyPaced(b, parts, ev.DesiredAccess_DESIRED_ACCESS_ALLOW, c.every)
				if c.warm {
					waits, p = h.applyPaced(b, parts, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, c.every)
				}
				all, peak = append(all, waits...), max(peak, p)
			}
			slices.Sort(all)
			pct := func(p float64) float64 {
				return float64(all[max(0, min(int(p*float64(len(all))+0.5)-1, len(all)-1))].Microseconds()) / 1000
			}
			b.ReportMetric(pct(0.50), "p50_ms")
			b.ReportMetric(pct(0.99), "p99_ms")
			b.ReportMetric(pct(1), "max_ms")
			b.ReportMetric(float64(peak), "sessions_max")
		})
	}
}

// openWorkers has the pool open n sessions, as a running executor has.
func (h *harness) openWorkers(tb testing.TB, n int) {
	tb.Helper()
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := h.pool.Do(context.Background(), exchange.Request{Op: "ping"}, nil); err != nil {
				tb.Error(err)
			}
		}()
	}
	wg.Wait()
	natstest.Eventually(tb, time.Minute, "the sessions open", func() bool { return h.pool.Sessions() >= n })
}

// applyPaced publishes one decision per partnership, every apart, and
// returns how long each phone waited for its state, and the most sessions
// the pool had open meanwhile.
func (h *harness) applyPaced(tb testing.TB, parts []*ev.EASPartnership, desired ev.DesiredAccess, every time.Duration) ([]time.Duration, int) {
	tb.Helper()
	want := map[ev.DesiredAccess]string{ev.DesiredAccess_DESIRED_ACCESS_ALLOW: "Allowed", ev.DesiredAccess_DESIRED_ACCESS_BLOCK: "Blocked"}[desired]
	sent := make([]atomic.Int64, len(parts))
	go func() {
		tick := time.NewTicker(every)
		defer tick.Stop()
		for i, p := range parts {
			<-tick.C
			sent[i].Store(time.Now().UnixNano())
			h.publish(tb, decision(p, desired, time.Now()), "")
		}
	}()
	var waits []time.Duration
	done := make([]bool, len(parts))
	peak := 0
	natstest.Eventually(tb, 2*time.Minute, "every phone in its decided state", func() bool {
		peak = max(peak, h.pool.Sessions())
		for i, p := range parts {
			at := sent[i].Load()
			if done[i] || at == 0 {
				continue
			}
			res, err := h.sim.Org.Sync(exchangesim.Phone{Mailbox: p.GetMailbox().GetPrimarySmtpAddress(), DeviceID: p.GetDeviceId(), DeviceType: "iPhone", DeviceModel: "iPhone15C2", DeviceOS: "iOS 17.4"})
			if err != nil {
				tb.Fatal(err)
			}
			if res.State == want {
				done[i] = true
				waits = append(waits, time.Since(time.Unix(0, at)))
			}
		}
		return len(waits) == len(parts)
	})
	return waits, peak
}
