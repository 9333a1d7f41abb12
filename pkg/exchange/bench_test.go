package exchange_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// BenchmarkPoolVersusOneShot applies 10,000 per-device changes with the
// simulator's default latency profile through the pool, and a sample of
// them through the one-shot, one-cmdlet-per-device baseline, in the same
// run with the same concurrency, and reports both. The baseline is run on
// a sample of 500 changes and scaled linearly to 10,000 (at full size it
// would take over an hour); the pool's side is never scaled. Round trips
// are WS-Man requests as the simulator counted them.
func BenchmarkPoolVersusOneShot(b *testing.B) {
	const (
		total       = 10000
		sample      = 500
		concurrency = 8
	)
	for i := 0; i < b.N; i++ {
		s := startSim(b, exchangesim.Config{Profile: exchangesim.DefaultProfile(), MaxOperationTimeout: 20 * time.Second,
			Seed: &exchangesim.SeedSpec{Mailboxes: 10000, Partnerships: 20000, Seed: 11, NoHostile: true}})
		cfg := simConfig(b, s)
		cfg.Workers = concurrency
		cfg.OperationTimeout = 20 * time.Second
		var changes []exchange.Change
		for _, m := range s.Org.Mailboxes() {
			ps, _ := s.Org.Partnerships(m.Alias)
			for _, p := range ps {
				if len(changes) == total {
					break
				}
				acc := exchange.AccessAllow
				if len(changes)%2 == 1 {
					acc = exchange.AccessBlock
				}
				changes = append(changes, exchange.Change{Mailbox: m.PrimarySMTP, DeviceID: p.DeviceID, Access: acc})
			}
		}

		// The pool, at full size.
		s.Recorder.Reset()
		start := time.Now()
		p, err := exchange.NewPool(context.Background(), cfg, quiet())
		if err != nil {
			b.Fatal(err)
		}
		res, err := exchange.NewClient(p, cfg).ApplyAccess(context.Background(), changes)
		poolWall := time.Since(start)
		if err != nil {
			b.Fatal(err)
		}
		for _, r := range res {
			if r.Err != nil {
				b.Fatal(r.Err)
			}
		}
		p.Close(context.Background())
		poolRT := s.Recorder.Count("wsman")

		// The baseline: one shell, one PowerShell, one Exchange session
		// and one cmdlet per device.
		o, err := exchange.NewOneShot(cfg)
		if err != nil {
			b.Fatal(err)
		}
		one := exchange.NewClient(o, cfg)
		s.Recorder.Reset()
		start = time.Now()
		var wg sync.WaitGroup
		sem := make(chan struct{}, concurrency)
		errs := make(chan error, sample)
		for _, ch := range changes[:sample] {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				// The naive connector's one Set-CASMailbox per device, as
				// easguard used to send it (no read of the lists first).
				add, remove := "ActiveSyncAllowedDeviceIDs", "ActiveSyncBlockedDeviceIDs"
				if ch.Access == exchange.AccessBlock {
					add, remove = remove, add
				}
				_, _, err := one.Invoke(context.Background(), exchange.Call{Cmdlet: "Set-CASMailbox", Params: exchange.Params{"Identity": ch.Mailbox,
					add: exchange.MultiValued{Add: []string{ch.DeviceID}}, remove: exchange.MultiValued{Remove: []string{ch.DeviceID}}}})
				if err != nil {
					errs <- err
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			b.Fatal(err)
		}
		baseWall := time.Since(start)
		baseRT := s.Recorder.Count("wsman")
		scale := float64(total) / float64(sample)
		b.ReportMetric(float64(total), "exchange_changes:changes")
		b.ReportMetric(float64(concurrency), "exchange_concurrency:workers")
		b.ReportMetric(poolWall.Seconds(), "exchange_pool_wall:s")
		b.ReportMetric(float64(poolRT), "exchange_pool_round_trips:requests")
		b.ReportMetric(float64(sample), "exchange_baseline_sample:changes")
		b.ReportMetric(baseWall.Seconds()*scale, "exchange_baseline_wall_scaled:s")
		b.ReportMetric(float64(baseRT)*scale, "exchange_baseline_round_trips_scaled:requests")
		b.ReportMetric(float64(baseRT)*scale/float64(poolRT), "exchange_round_trips_ratio:ratio")
		b.ReportMetric(baseWall.Seconds()*scale/poolWall.Seconds(), "exchange_wall_time_ratio:ratio")
	}
}
