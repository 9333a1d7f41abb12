package exchange_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/telemetry/telemetrytest"
	"github.com/easguard/easguard/tests/exchangesim"
)

// listingBenchSizeEnv sets the partnerships BenchmarkFullListing lists
// (default 100,000, on half as many mailboxes); the same variable sizes
// the reconcile benchmark in tests/.
const listingBenchSizeEnv = "EASGUARD_BENCH_PARTNERSHIPS"

// listingBenchProfileEnv names the simulator's latency profile for
// BenchmarkFullListing (exchangesim.ProfileByName: default, slow); the
// metric names carry any but the default (listing_slow_10k_…).
const listingBenchProfileEnv = "EASGUARD_BENCH_LISTING_PROFILE"

// listingBenchSessions is the sessions both listings may use: the default
// EASGUARD_EXCHANGE_WORKERS, and the reconcile benchmark's.
const listingBenchSessions = 4

// BenchmarkFullListing reads what a full sync reads, the recipients with
// partnerships and every partnership, from the simulator with its default
// latency profile (tests/exchangesim/profile.go: PerObject for every
// object a cmdlet returns), twice in the same run over the same pool of
// four sessions, all started before anything is timed: serially, one
// listing each (exchange.Config.ListPartitions = 1, as easguard read them
// before), and partitioned (the default: parts over every session).
//
// Lines (for 100,000; another size has its own prefix): listing_100k_
// serial_s and partitioned_s, the partnership listing's time each way;
// limit_s, the physical limit objects × per-object cost ÷ sessions, and
// serial_limit_ratio and partitioned_limit_ratio, each time over it;
// speedup, serial over partitioned; recipients_serial_s and
// recipients_partitioned_s, the Get-Recipient listing each way.
// EASGUARD_BENCH_PARTNERSHIPS changes the size, and
// EASGUARD_BENCH_LISTING_PROFILE the profile (slow: where the per-object
// cost, not this machine's CPU, is what a listing waits for).
func BenchmarkFullListing(b *testing.B) {
	n := 100_000
	if v := os.Getenv(listingBenchSizeEnv); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 2 {
			b.Fatalf("%s=%q: want a number of partnerships, at least 2", listingBenchSizeEnv, v)
		}
	}
	label := strconv.Itoa(n)
	if n%1000 == 0 {
		label = strconv.Itoa(n/1000) + "k"
	}
	prefix := "listing_" + label + "_"
	profile := exchangesim.DefaultProfile()
	if name := os.Getenv(listingBenchProfileEnv); name != "" && name != "default" {
		var err error
		if profile, err = exchangesim.ProfileByName(name); err != nil {
			b.Fatalf("%s: %v", listingBenchProfileEnv, err)
		}
		prefix = "listing_" + name + "_" + label + "_"
	}
	b.StopTimer()
	for range b.N {
		s := startSim(b, exchangesim.Config{Profile: profile, Seed: &exchangesim.SeedSpec{Mailboxes: max(1, n/2), Partnerships: n, Seed: 7}})
		cfg := simConfig(b, s)
		cfg.Workers = listingBenchSessions
		pool := newPool(b, cfg)
		serial, parted := exchange.NewClient(pool, cfg), exchange.NewClient(pool, cfg)
		serial.ListPartitions = 1
		ctx := context.Background()
		want := s.Org.ActiveSyncCount()

		// Every session started (a partitioned listing runs one part on
		// each), so neither side pays for a session's start.
		if err := parted.ListRecipients(ctx, func([]exchange.Recipient) error { return nil }); err != nil {
			b.Fatal(err)
		}

		timed := func(what string, list func() (int, error)) (time.Duration, int) {
			cpu0 := telemetrytest.ProcessCPU(b)
			b.StartTimer()
			start := time.Now()
			got, err := list()
			took := time.Since(start)
			b.StopTimer()
			if err != nil {
				b.Fatalf("%s: %v", what, err)
			}
			// The simulator runs in this process: its CPU and easguard's.
			cpu := telemetrytest.ProcessCPU(b) - cpu0
			b.Logf("%s: %d objects in %.1fs, %.1f CPU-s in this process (%.0f µs an object)", what, got, took.Seconds(), cpu.Seconds(),
				float64(cpu.Microseconds())/float64(max(1, got)))
			return took, got
		}
		partnerships := func(c *exchange.Client) func() (int, error) {
			return func() (int, error) {
				got := 0
				err := c.ListPartnerships(ctx, exchange.ListOptions{}, func(ps []exchange.Partnership) error { got += len(ps); return nil })
				return got, err
			}
		}
		recipients := func(c *exchange.Client) func() (int, error) {
			return func() (int, error) {
				got := 0
				err := c.ListRecipients(ctx, func(rs []exchange.Recipient) error { got += len(rs); return nil })
				return got, err
			}
		}
		rSerial, mailboxes := timed("serial recipients", recipients(serial))
		pSerial, got := timed("serial partnerships", partnerships(serial))
		if got != want {
			b.Fatalf("the serial listing read %d partnerships, the organisation has %d", got, want)
		}
		rParted, mailboxes2 := timed("partitioned recipients", recipients(parted))
		if mailboxes2 != mailboxes {
			b.Fatalf("the partitioned recipient listing read %d recipients, the serial one %d", mailboxes2, mailboxes)
		}
		s.Recorder.Reset()
		pParted, got := timed("partitioned partnerships", partnerships(parted))
		var parts []string
		for _, r := range s.Recorder.Records("cmdlet") {
			if r.Cmdlet == "Get-MobileDevice" {
				parts = append(parts, fmt.Sprintf("%d objects in %.1fs, ok %v", r.Objects, r.Duration.Seconds(), r.OK))
			}
		}
		if len(parts) < 2 {
			b.Fatalf("the partitioned listing was read as %d listings: %q", len(parts), parts)
		}
		b.Logf("parts: %s", strings.Join(parts, "; "))
		if got != want {
			b.Fatalf("the partitioned listing read %d partnerships, the organisation has %d", got, want)
		}

		limit := time.Duration(want) * profile.PerObject / listingBenchSessions
		b.Logf("%d partnerships over %d sessions: serial %.1fs, partitioned %.1fs, limit %.1fs; %d recipients: serial %.1fs, partitioned %.1fs",
			want, listingBenchSessions, pSerial.Seconds(), pParted.Seconds(), limit.Seconds(), mailboxes, rSerial.Seconds(), rParted.Seconds())
		b.ReportMetric(pSerial.Seconds(), prefix+"serial_s:s")
		b.ReportMetric(pParted.Seconds(), prefix+"partitioned_s:s")
		b.ReportMetric(limit.Seconds(), prefix+"limit_s:s")
		b.ReportMetric(pSerial.Seconds()/limit.Seconds(), prefix+"serial_limit_ratio:ratio")
		b.ReportMetric(pParted.Seconds()/limit.Seconds(), prefix+"partitioned_limit_ratio:ratio")
		b.ReportMetric(pSerial.Seconds()/pParted.Seconds(), prefix+"speedup:ratio")
		b.ReportMetric(rSerial.Seconds(), prefix+"recipients_serial_s:s")
		b.ReportMetric(rParted.Seconds(), prefix+"recipients_partitioned_s:s")
	}
}
