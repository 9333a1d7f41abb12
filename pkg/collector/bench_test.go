package collector_test

import (
	"context"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/collector"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/tests/exchangesim"
)

// BenchmarkFullSync50kSlow is a full sync of 50,000 partnerships (20,000
// mailboxes) by the real collector, reading through easguard's pool from
// the simulator's slow profile (a large organisation through an Exchange
// remote session: 4 ms an object, so the partnership listing alone takes
// over 3 minutes) and reporting to an in-process JetStream. The request
// deadline is the simulator settings' 2 minutes, shorter than the listing:
// the sync completes only because the deadline counts per page (the
// listing is read as one, not in parts). It
// reports the sync's wall time as full_sync_50k_slow_s; the organisation,
// the pool and the bus are started before the clock runs.
func BenchmarkFullSync50kSlow(b *testing.B) {
	const partnerships = 50_000
	for range b.N {
		ctx := natstest.Context(b)
		sim := exchangesim.StartTest(b, exchangesim.Config{Profile: exchangesim.SlowProfile(), MaxOperationTimeout: 20 * time.Second,
			Seed: &exchangesim.SeedSpec{Mailboxes: 20_000, Partnerships: partnerships, Seed: 50, NoHostile: true}})
		xcfg := sim.ExchangeConfig(b)
		xcfg.OperationTimeout = 20 * time.Second
		// One listing, on one session: what this measures is a listing
		// longer than the request deadline (a full sync in parts reads
		// each part within it; BenchmarkFullListing in pkg/exchange
		// compares the two).
		xcfg.ListPartitions = 1
		pool, err := exchange.NewPool(ctx, xcfg, quiet)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { pool.Close(context.Background()) })
		_, _, js := natstest.Start(b)
		if err := bus.Provision(ctx, js, bus.DefaultTopology()); err != nil {
			b.Fatal(err)
		}
		pub, err := bus.NewPublisher(js, bus.Instrumentation{})
		if err != nil {
			b.Fatal(err)
		}
		c, err := collector.New(ctx, js, org, testConfig(collector.Config{}), exchange.NewClient(pool, xcfg), pub, pool.Current, quiet)
		if err != nil {
			b.Fatal(err)
		}
		sim.Recorder.Reset()

		b.ResetTimer()
		began := time.Now()
		done, err := c.Sync(ctx, full, "bench-full-50k", "bench")
		took := time.Since(began)
		b.StopTimer()
		if err != nil || !done.GetSuccess() {
			b.Fatalf("full sync after %s: %v (%v)", took, err, done.GetErrors())
		}
		want := 0
		for _, r := range sim.Recorder.Records("cmdlet") {
			if r.Cmdlet == "Get-MobileDevice" && r.OK {
				want = r.Objects
			}
		}
		if got := done.GetCounts().GetObserved(); want < partnerships*9/10 || got != int64(want) || done.GetCounts().GetFailed() != 0 {
			b.Fatalf("observed %d of the %d partnerships listed (%d failed)", got, want, done.GetCounts().GetFailed())
		}
		if took < xcfg.RequestTimeout {
			b.Fatalf("the sync took %s, within the %s request deadline: the slow profile is not slow", took, xcfg.RequestTimeout)
		}
		b.ReportMetric(took.Seconds(), "full_sync_50k_slow_s:s")
	}
}
