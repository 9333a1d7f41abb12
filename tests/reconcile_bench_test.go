package tests

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/status"
	"github.com/easguard/easguard/pkg/telemetry/telemetrytest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
)

// benchSizeEnv sets the number of partnerships of BenchmarkReconcile100k,
// so that the benchmark can be worked on at a size that takes seconds; the
// metric names say the size (reconcile_5k_… at 5000).
const benchSizeEnv = "EASGUARD_BENCH_PARTNERSHIPS"

// benchEnvEnv adds settings to the easguard process of
// BenchmarkReconcile100k (space-separated NAME=value), so that one setting
// can be compared with another on the same benchmark.
const benchEnvEnv = "EASGUARD_BENCH_ENV"

// benchProfileEnv names a directory where BenchmarkReconcile100k's steady
// shape saves the all-in-one's allocation profiles at the measured pass's
// start and end (steady-1-allocs-start.pb.gz, steady-1-allocs-end.pb.gz for
// the first measured pass; compare them with pprof -diff_base) and its CPU
// profile over the pass (steady-1-cpu.pb.gz), so that a profile shows the
// pass and nothing of the unmeasured one before it. Their in-use figures
// at the ends of two passes show what the process kept from one to the
// next.
const benchProfileEnv = "EASGUARD_BENCH_PROFILE_DIR"

// benchSessions is the Exchange workers (sessions) of the easguard process,
// EASGUARD_EXCHANGE_WORKERS's default, written out because the onboarding
// limit divides by it.
const benchSessions = 4

// reconcilePolicy covers every mailbox: compliant devices are allowed,
// everything else blocked, and the organisation's default is quarantine,
// which the simulated organisation already has, so that no plan to change
// it runs alongside the reconcile.
const reconcilePolicy = `version: 1
org: contoso
unknown_device: block
noncompliant: block
notify: true
default_access_level: quarantine
`

// peakRSSMB is the largest all-in-one easguard peak RSS seen by the shapes
// run so far in this process, so that the last shape can report the
// maximum over them.
var peakRSSMB float64

// BenchmarkReconcile100k measures a full reconcile of a large organisation:
// the all-in-one easguard binary (`easguard run`, its own process around its
// embedded NATS server, so that its peak RSS is its own), the Exchange
// simulator seeded with 100,000 partnerships on 50,000 mailboxes
// (EASGUARD_BENCH_PARTNERSHIPS changes the size) behind its default latency
// profile and reached over real WinRM, an inventory file in which every
// ActiveSync device is enrolled and compliant, and a policy for everyone.
//
//   - steady: Exchange already matches the policy (every device
//     allow-listed, the default quarantine). easguard's first full sync
//     runs unmeasured (quick syncs are off); then one full sync is asked
//     for and timed until the pipeline has settled: read and judge only,
//     and the benchmark fails if anything is written to Exchange. With
//     -benchtime Nx, N full syncs are timed one after the other on the
//     same organisation (as in hops and split), and the lines are their
//     means: one run's spread, apart from the day's.
//   - hops: steady against a simulator without latency (its `none`
//     profile), so that Exchange is not what paces the pass: the hops'
//     own throughput on the CPU they share with the simulator.
//   - hops_only: the matcher and the evaluator with no Exchange at all: a
//     steady pass's pages of confirmations (as the collector published
//     them) published to them again at once, so that neither the listing
//     nor the simulator shares the cores; what the hops alone keep up.
//   - split: steady with easguard deployed as its containers are
//     (deploy/compose): an easguard process per worker, all on one NATS
//     server that is a process of its own, so that each worker's peak RSS
//     is its own.
//   - onboarding: no device is on any list, so every one needs an allow;
//     timed from the start of easguard's first full sync until every
//     device is allow-listed on the simulator.
//
// Lines (for 100,000; another size has its own prefix): reconcile_100k_
// steady_s; listing_s, a bare exchange.Client reading what a full sync
// reads (Get-Recipient and Get-MobileDevice listings, each in parts over
// the sessions as the collector reads them) over the same simulator in the
// same run; partnerships_per_s end to end, and through
// each hop (observed, matched: each hop's output over the time between its
// first and last output of the pass; decided: the partnerships over the
// time from the first match to the evaluator's status that it judged the
// pass, since a judgement that changes nothing writes nothing), and the
// same of the hops shape (hops_steady_s, hops_listing_s, hops_partnerships_per_s_…);
// hops_only_partnerships_per_s_matched and _decided (from the first page
// published to the matcher's last verdicts, and to the evaluator's
// consumer drained) and hops_only_cpu_us_per_partnership; decisions_per_partnership,
// the device.matched events the evaluator judged per partnership;
// steady_cpu_busy_pct, the share of the machine's cores that easguard and
// the simulator (this test process) used in the steady pass: near 100, the
// pass waited for the CPU they share, not for Exchange;
// steady_alloc_kb_per_partnership and steady_allocs_per_partnership, what
// the all-in-one allocated in the pass (its profiler's heap statistics),
// which the machine's speed does not move where CPU time does; onboarding_s and onboarding_limit_ratio, onboarding's time over the
// physical limit (one Set-CASMailbox per mailbox with devices × the
// profile's write latency ÷ the sessions); the peak RSS of the easguard
// process of each all-in-one shape and the largest of them (rss_mb_max);
// and of the split shape, its pass (split_steady_s), the largest worker
// process's peak RSS (worker_rss_mb_max) and the NATS server's
// (split_nats_rss_mb).
func BenchmarkReconcile100k(b *testing.B) {
	n := benchPartnerships(b)
	prefix := "reconcile_" + sizeLabel(n) + "_"
	b.Run("steady", func(b *testing.B) {
		b.StopTimer()
		var steady, listing, e2e, observed, matched, decided, perPartnership, rss, passRSS, busy, cpu, allocKB, allocObjects []float64
		rig := startSteady(b, n, exchangesim.DefaultProfile(), false)
		for range b.N {
			r := rig.steadyPass(b)
			steady, listing, e2e = append(steady, r.wall.Seconds()), append(listing, r.listing.Seconds()), append(e2e, r.perSecond)
			busy, cpu = append(busy, r.cpuBusy), append(cpu, r.cpuMicros)
			observed, matched, decided = append(observed, r.observed), append(matched, r.matched), append(decided, r.decided)
			perPartnership, rss = append(perPartnership, r.decisionsPerPartnership), append(rss, r.rssMB)
			passRSS = append(passRSS, r.passRSSMB)
			allocKB, allocObjects = append(allocKB, r.allocKB), append(allocObjects, r.allocObjects)
		}
		b.ReportMetric(mean(steady), prefix+"steady_s:s")
		b.ReportMetric(mean(listing), prefix+"listing_s:s")
		b.ReportMetric(mean(e2e), prefix+"partnerships_per_s:partnerships/s")
		b.ReportMetric(mean(observed), prefix+"partnerships_per_s_observed:partnerships/s")
		b.ReportMetric(mean(matched), prefix+"partnerships_per_s_matched:partnerships/s")
		b.ReportMetric(mean(decided), prefix+"partnerships_per_s_decided:partnerships/s")
		b.ReportMetric(mean(perPartnership), prefix+"decisions_per_partnership:decisions")
		b.ReportMetric(slices.Max(rss), prefix+"steady_rss_mb:MB")
		b.ReportMetric(slices.Max(passRSS), prefix+"steady_pass_rss_mb:MB")
		b.ReportMetric(mean(busy), prefix+"steady_cpu_busy_pct:%")
		b.ReportMetric(mean(cpu), prefix+"steady_cpu_us_per_partnership:µs")
		b.ReportMetric(mean(allocKB), prefix+"steady_alloc_kb_per_partnership:kB")
		b.ReportMetric(mean(allocObjects), prefix+"steady_allocs_per_partnership:objects")
	})
	b.Run("hops", func(b *testing.B) {
		// The steady pass against a simulator without latency: Exchange
		// answers as fast as the simulator can serialise, so what paces
		// the pass is easguard's hops and the CPU they share with it.
		b.StopTimer()
		var wall, listing, observed, matched, decided []float64
		rig := startSteady(b, n, exchangesim.TestProfile(), false)
		for range b.N {
			r := rig.steadyPass(b)
			wall, listing = append(wall, r.wall.Seconds()), append(listing, r.listing.Seconds())
			observed, matched, decided = append(observed, r.observed), append(matched, r.matched), append(decided, r.decided)
		}
		b.ReportMetric(mean(wall), prefix+"hops_steady_s:s")
		b.ReportMetric(mean(listing), prefix+"hops_listing_s:s")
		b.ReportMetric(mean(observed), prefix+"hops_partnerships_per_s_observed:partnerships/s")
		b.ReportMetric(mean(matched), prefix+"hops_partnerships_per_s_matched:partnerships/s")
		b.ReportMetric(mean(decided), prefix+"hops_partnerships_per_s_decided:partnerships/s")
	})
	b.Run("hops_only", func(b *testing.B) {
		// The matcher and the evaluator alone: a steady pass's pages of
		// confirmations published to them at once, with no Exchange
		// listing and no simulator sharing the cores.
		b.StopTimer()
		var matched, decided, cpu []float64
		for range b.N {
			r := reconcileHopsOnly(b, n)
			matched, decided, cpu = append(matched, r.matched), append(decided, r.decided), append(cpu, r.cpuMicros)
		}
		b.ReportMetric(mean(matched), prefix+"hops_only_partnerships_per_s_matched:partnerships/s")
		b.ReportMetric(mean(decided), prefix+"hops_only_partnerships_per_s_decided:partnerships/s")
		b.ReportMetric(mean(cpu), prefix+"hops_only_cpu_us_per_partnership:µs")
	})
	b.Run("split", func(b *testing.B) {
		// The steady pass with easguard deployed as its containers are
		// (deploy/compose): a process per worker on a NATS server of its
		// own. What it measures is each worker process's peak RSS, the
		// server's apart.
		b.StopTimer()
		var wall, rss, server []float64
		rig := startSteady(b, n, exchangesim.DefaultProfile(), true)
		for range b.N {
			r := rig.steadyPass(b)
			wall, rss, server = append(wall, r.wall.Seconds()), append(rss, r.rssMB), append(server, r.rssByProcess["nats"])
			var each []string
			for _, name := range slices.Sorted(maps.Keys(r.rssByProcess)) {
				each = append(each, fmt.Sprintf("%s %.0f MB", name, r.rssByProcess[name]))
			}
			b.Logf("split, peak RSS of each process: %s", strings.Join(each, ", "))
		}
		b.ReportMetric(mean(wall), prefix+"split_steady_s:s")
		b.ReportMetric(slices.Max(rss), prefix+"worker_rss_mb_max:MB")
		b.ReportMetric(slices.Max(server), prefix+"split_nats_rss_mb:MB")
	})
	b.Run("onboarding", func(b *testing.B) {
		b.StopTimer()
		var wall, ratio, perPartnership, rss []float64
		for range b.N {
			r := reconcileOnboarding(b, n)
			wall, ratio = append(wall, r.wall.Seconds()), append(ratio, r.limitRatio)
			perPartnership, rss = append(perPartnership, r.decisionsPerPartnership), append(rss, r.rssMB)
		}
		b.ReportMetric(mean(wall), prefix+"onboarding_s:s")
		b.ReportMetric(mean(ratio), prefix+"onboarding_limit_ratio:ratio")
		b.ReportMetric(mean(perPartnership), prefix+"onboarding_decisions_per_partnership:decisions")
		b.ReportMetric(slices.Max(rss), prefix+"onboarding_rss_mb:MB")
		b.ReportMetric(max(peakRSSMB, slices.Max(rss)), prefix+"rss_mb_max:MB")
	})
}

// benchPartnerships reads the benchmark's size.
func benchPartnerships(b *testing.B) int {
	b.Helper()
	v := os.Getenv(benchSizeEnv)
	if v == "" {
		return 100_000
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 2 {
		b.Fatalf("%s=%q: want a number of partnerships, at least 2", benchSizeEnv, v)
	}
	return n
}

// sizeLabel names a size in metric names: 100000 → "100k".
func sizeLabel(n int) string {
	if n%1000 == 0 {
		return strconv.Itoa(n/1000) + "k"
	}
	return strconv.Itoa(n)
}

func mean(xs []float64) float64 {
	s := 0.0
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}

// steadyResult is one measured steady-state pass.
type steadyResult struct {
	wall, listing              time.Duration
	perSecond                  float64 // partnerships ÷ wall
	observed, matched, decided float64 // partnerships/s through each hop
	decisionsPerPartnership    float64
	cpuBusy                    float64            // share of the cores easguard and the simulator used, in %
	cpuMicros                  float64            // easguard's CPU per partnership: what the 1.2 ratio needs halved
	rssMB                      float64            // the all-in-one's, or the largest worker's, since it started
	rssByProcess               map[string]float64 // each process's, since it started
	passRSSMB                  float64            // the all-in-one's, or the largest worker's, in the pass alone
	startRSSMB                 float64            // the same before the pass: the first full sync's, or an earlier pass's
	// allocKB and allocObjects are what the all-in-one allocated in the
	// pass per partnership: the garbage collector's work, and a figure
	// that, unlike CPU time, does not move with the machine's speed.
	allocKB, allocObjects float64
}

// steadyRig is an organisation as the policy says, with easguard running
// and its first full sync behind it, ready for measured passes.
type steadyRig struct {
	*reconcileRig
	listing time.Duration // the bare listing's, measured before easguard started
	split   bool
	passes  int // measured so far, which numbers their profiles
}

// startSteady seeds the organisation, times the bare listing, starts
// easguard (the all-in-one, or a process per worker when split) and lets
// its first full sync and what follows settle, unmeasured. Each pass
// (steadyPass) then measures one full sync: with -benchtime Nx, N passes
// on one organisation, so that N figures of one build and day can be
// compared without seeding 100,000 partnerships N times.
func startSteady(b *testing.B, n int, profile exchangesim.Profile, split bool) *steadyRig {
	b.Helper()
	r := newReconcileRig(b, n, true, profile)
	listing := r.timeListing()
	r.phase("bare listing")
	// No quick sync (one every 5 minutes by default) falls into the
	// measured pass: it is the full sync's alone.
	if split {
		r.startSplit("EASGUARD_COLLECTOR_QUICK_INTERVAL=24h")
	} else {
		r.start("EASGUARD_COLLECTOR_QUICK_INTERVAL=24h")
	}
	r.phase("easguard started")
	// Unmeasured: the first full sync (every partnership new to easguard).
	for _, sync := range r.waitSyncs(0, 30*time.Minute, ev.SyncKind_SYNC_KIND_FULL) {
		if !sync.GetSuccess() {
			b.Fatalf("unmeasured %s sync failed: %v", sync.GetKind(), sync.GetErrors())
		}
	}
	r.phase("unmeasured full sync")
	r.waitIdle(30 * time.Minute)
	r.phase("unmeasured pass settled")
	if missing := r.notAllowListed(r.mailboxIDs()); len(missing) > 0 {
		b.Fatalf("after the first full sync %d mailboxes lack allow-list entries (e.g. %s): steady state is not what the policy says", len(missing), missing[0])
	}
	return &steadyRig{reconcileRig: r, listing: listing, split: split}
}

// steadyPass measures one full sync of an organisation already as the
// policy says, until the pipeline has settled.
func (r *steadyRig) steadyPass(b *testing.B) steadyResult {
	b.Helper()
	res := steadyResult{listing: r.listing}
	split := r.split
	before := r.snapshot()
	writes := r.f.sim.Recorder.Count("cmdlet:Set-CASMailbox")
	// The peak before the pass (the first full sync's, or an earlier
	// pass's) is kept apart from the pass's own: the kernel's peak is
	// reset, so what it says afterwards is the pass's.
	res.startRSSMB = largestEasguard(r.resetPeakRSS())
	alloc0, objects0, _ := r.allocated()
	r.passes++
	r.saveProfile("allocs", fmt.Sprintf("steady-%d-allocs-start.pb.gz", r.passes))
	stopCPU := r.profileCPU(fmt.Sprintf("steady-%d-cpu.pb.gz", r.passes))
	cpu0, sim0 := r.cpuSeconds(), telemetrytest.ProcessCPU(b).Seconds()
	b.StartTimer()
	t0 := time.Now()
	r.requestFullSync()
	done := r.waitSyncs(before.seq[bus.StreamSync], 30*time.Minute, ev.SyncKind_SYNC_KIND_FULL)[0]
	r.waitIdle(30 * time.Minute)
	b.StopTimer()
	stopCPU()
	r.saveProfile("allocs", fmt.Sprintf("steady-%d-allocs-end.pb.gz", r.passes))
	r.phase("measured full sync settled")
	cpu, sim := r.cpuSeconds()-cpu0, telemetrytest.ProcessCPU(b).Seconds()-sim0
	if alloc1, objects1, ok := r.allocated(); ok {
		res.allocKB = (alloc1 - alloc0) / 1024 / float64(len(r.parts))
		res.allocObjects = (objects1 - objects0) / float64(len(r.parts))
	}
	pass := r.since(before)

	if !done.GetSuccess() {
		b.Fatalf("the measured full sync failed: %v", done.GetErrors())
	}
	if got := done.GetCounts().GetObserved(); got != int64(len(r.parts)) {
		b.Errorf("the measured full sync observed %d partnerships, Exchange has %d", got, len(r.parts))
	}
	if w := r.f.sim.Recorder.Count("cmdlet:Set-CASMailbox") - writes; w != 0 {
		b.Errorf("steady state wrote %d Set-CASMailbox calls to Exchange; it should only read and judge", w)
	}
	if d := pass[bus.StreamDecisions].n; d != 0 {
		b.Logf("note: %d decisions published although Exchange already matched the policy", d)
	}
	// The pass ends with the last thing it made: the sync's report, the
	// last observation, match, judgement, decision or apply.
	end := pass.last(bus.StreamEAS, bus.StreamMatch, decisionsKV, bus.StreamDecisions, bus.StreamApplied)
	if f := done.GetFinishedAt().AsTime(); f.After(end) {
		end = f
	}
	// A judgement that changes nothing writes nothing: the evaluator's
	// hop ends when it says the pass is judged.
	judged := r.passJudged(done.GetSyncId())
	if judged.After(end) {
		end = judged
	}
	res.wall = end.Sub(t0)
	parts := float64(len(r.parts))
	res.perSecond = parts / res.wall.Seconds()
	res.observed = pass[bus.StreamEAS].rate()
	res.matched = pass[bus.StreamMatch].rate()
	if first := pass[bus.StreamMatch].first; !first.IsZero() && judged.After(first) {
		res.decided = parts / judged.Sub(first).Seconds()
	}
	res.decisionsPerPartnership = float64(pass[bus.StreamMatch].items) / parts
	passRSS := r.peakRSSByProcess()
	res.passRSSMB = largestEasguard(passRSS)
	res.rssByProcess = map[string]float64{}
	for name, mb := range passRSS {
		res.rssByProcess[name] = max(mb, r.startRSS[name])
	}
	res.rssMB = largestEasguard(res.rssByProcess)
	if !split {
		peakRSSMB = max(peakRSSMB, res.rssMB)
	}

	collectorPass := done.GetFinishedAt().AsTime().Sub(done.GetStartedAt().AsTime())
	b.Logf("steady, %d partnerships on %d mailboxes: reconcile %.1fs (asked at 0; the collector's pass %.1fs→%.1fs, %.1fs; last event %.1fs), bare listing %.1fs",
		len(r.parts), len(r.byMailbox), res.wall.Seconds(), done.GetStartedAt().AsTime().Sub(t0).Seconds(), done.GetFinishedAt().AsTime().Sub(t0).Seconds(),
		collectorPass.Seconds(), end.Sub(t0).Seconds(), res.listing.Seconds())
	res.cpuMicros = cpu * 1e6 / float64(len(r.parts))
	b.Logf("steady: easguard used %.1f s of CPU in the pass, %.0f µs a partnership; peak RSS %.0f MB in the pass, %.0f MB before it", cpu, res.cpuMicros, res.passRSSMB, res.startRSSMB)
	if !split {
		b.Logf("steady: easguard allocated %.1f kB in %.0f objects a partnership in the pass", res.allocKB, res.allocObjects)
	}
	// The cores are shared with the simulator: what the pass left of them
	// says whether it waited for Exchange or for the CPU.
	cores := res.wall.Seconds() * float64(runtime.NumCPU())
	res.cpuBusy = 100 * (cpu + sim) / cores
	b.Logf("steady: the simulator (this test process) used %.1f s of CPU in the pass; with easguard's, %.1f s of the %d cores' %.1f s (%.0f%%)",
		sim, cpu+sim, runtime.NumCPU(), cores, res.cpuBusy)
	r.logAll("steady", t0, pass)
	return res
}

// hopsOnlyResult is one measured hops-only pass.
type hopsOnlyResult struct {
	matched, decided float64 // partnerships/s
	cpuMicros        float64 // easguard's CPU per partnership
}

// reconcileHopsOnly measures the matcher and the evaluator without
// Exchange: after the first full sync and a second one (steady, so that
// the collector publishes its partnerships as pages of confirmations,
// unmeasured), it publishes that second pass's pages again under a new
// sync id, all at once, and times the hops until the evaluator has judged
// every partnership: matched over the time from the first page published
// to the matcher's last verdicts, decided to the evaluator's consumer
// drained (polled every 50 ms).
func reconcileHopsOnly(b *testing.B, n int) hopsOnlyResult {
	b.Helper()
	r := newReconcileRig(b, n, true, exchangesim.TestProfile())
	r.start("EASGUARD_COLLECTOR_QUICK_INTERVAL=24h")
	for _, sync := range r.waitSyncs(0, 30*time.Minute, ev.SyncKind_SYNC_KIND_FULL) {
		if !sync.GetSuccess() {
			b.Fatalf("first full sync failed: %v", sync.GetErrors())
		}
	}
	r.waitIdle(30 * time.Minute)
	primed := r.snapshot()
	r.requestFullSync()
	r.waitSyncs(primed.seq[bus.StreamSync], 30*time.Minute, ev.SyncKind_SYNC_KIND_FULL)
	r.waitIdle(30 * time.Minute)
	r.phase("two full syncs, unmeasured")

	// The second pass's pages, under a sync id of their own.
	ref := &ev.SyncRef{SyncId: fmt.Sprintf("hops-%d", time.Now().UnixNano()), Kind: ev.SyncKind_SYNC_KIND_FULL}
	var pages []bus.Outbound
	parts := 0
	for seq, last := primed.seq[bus.StreamEAS]+1, r.lastSeq(bus.StreamEAS); seq <= last; seq++ {
		m := r.message(bus.StreamEAS, seq, nil)
		if !strings.Contains(m.Subject, ".eas.confirmed.") {
			continue
		}
		var page ev.EASPartnershipsConfirmed
		if err := proto.Unmarshal(m.Data, &page); err != nil {
			b.Fatalf("page %d of %s: %v", seq, bus.StreamEAS, err)
		}
		page.Sync = ref
		subject, err := bus.EASConfirmed.Subject(testOrg, ev.PageKey(ref, page.GetPage()))
		if err != nil {
			b.Fatal(err)
		}
		pages = append(pages, bus.Outbound{Subject: subject, MsgID: "eas-confirmed:" + ev.PageKey(ref, page.GetPage()), Message: &page})
		parts += len(page.GetPartnerships())
	}
	if parts != len(r.parts) {
		b.Fatalf("the steady pass confirmed %d partnerships in %d pages, Exchange has %d: not a steady pass", parts, len(pages), len(r.parts))
	}
	pub, err := bus.NewPublisher(r.js, bus.Instrumentation{})
	if err != nil {
		b.Fatal(err)
	}
	ctx := b.Context()
	c, err := r.js.Consumer(ctx, bus.StreamMatch, bus.DurableName("evaluator", "device-confirmed", testOrg))
	if err != nil {
		b.Fatalf("the evaluator's consumer of confirmed pages: %v", err)
	}
	before := r.snapshot()
	cpu0 := r.cpuSeconds()
	b.StartTimer()
	t0 := time.Now()
	for _, o := range pages {
		if _, err := pub.Publish(ctx, o); err != nil {
			b.Fatalf("publish %s: %v", o.Subject, err)
		}
	}
	published := time.Since(t0)
	var drained time.Time
	pollEvery(b, 30*time.Minute, 50*time.Millisecond, "the evaluator to judge every page", func() bool {
		info, err := c.Info(ctx)
		if err != nil {
			b.Fatalf("the evaluator's consumer: %v", err)
		}
		last := r.lastSeq(bus.StreamMatch)
		if info.Delivered.Stream < last || last-before.seq[bus.StreamMatch] < uint64(len(pages)) ||
			info.NumPending > 0 || info.NumAckPending > 0 {
			return false
		}
		drained = time.Now()
		return true
	})
	b.StopTimer()
	cpu := r.cpuSeconds() - cpu0
	pass := r.since(before)
	if d := pass[bus.StreamDecisions].n; d != 0 {
		b.Errorf("%d decisions published for pages of partnerships already as the policy says", d)
	}
	if got := pass[bus.StreamMatch].items; got != uint64(parts) {
		b.Errorf("the matcher published verdicts on %d partnerships, the pages held %d", got, parts)
	}
	res := hopsOnlyResult{
		matched:   float64(parts) / pass[bus.StreamMatch].last.Sub(t0).Seconds(),
		decided:   float64(parts) / drained.Sub(t0).Seconds(),
		cpuMicros: cpu * 1e6 / float64(parts),
	}
	b.Logf("hops only, %d partnerships in %d pages: published %.1fs, matched %.1fs, judged %.1fs after the first page; easguard used %.1f s of CPU, %.0f µs a partnership",
		parts, len(pages), published.Seconds(), pass[bus.StreamMatch].last.Sub(t0).Seconds(), drained.Sub(t0).Seconds(), cpu, res.cpuMicros)
	r.logAll("hops only", t0, pass)
	return res
}

// onboardingResult is one measured onboarding.
type onboardingResult struct {
	wall                    time.Duration
	limitRatio              float64
	decisionsPerPartnership float64
	rssMB                   float64
}

func reconcileOnboarding(b *testing.B, n int) onboardingResult {
	b.Helper()
	r := newReconcileRig(b, n, false, exchangesim.DefaultProfile())
	pending := r.mailboxIDs()
	if missing := r.notAllowListed(pending); len(missing) != len(pending) {
		b.Fatalf("%d of %d mailboxes already allow-list their devices before onboarding", len(pending)-len(missing), len(pending))
	}
	before := r.snapshot()
	writes := r.f.sim.Recorder.Count("cmdlet:Set-CASMailbox")

	b.StartTimer()
	r.start()
	// Every mailbox checked once more each poll until it lists all its
	// devices: a mailbox at a time, so that the simulator's lock is never
	// held for a scan of the whole organisation.
	var end time.Time
	pollEvery(b, 60*time.Minute, time.Second, "every device allow-listed", func() bool {
		r.alive()
		pending = r.notAllowListed(pending)
		end = time.Now()
		return len(pending) == 0
	})
	b.StopTimer()
	first := r.waitSyncs(before.seq[bus.StreamSync], time.Minute, ev.SyncKind_SYNC_KIND_FULL)[0]
	t0 := first.GetStartedAt().AsTime()
	if !first.GetSuccess() {
		b.Errorf("the first full sync failed: %v", first.GetErrors())
	}
	r.phase("onboarding (from easguard's start)")
	r.waitIdle(30 * time.Minute)
	r.phase("settled after onboarding")
	pass := r.since(before)
	if dl := pass[bus.StreamDLQ].n; dl != 0 {
		b.Errorf("%d dead letters during onboarding", dl)
	}

	var res onboardingResult
	res.wall = end.Sub(t0)
	profile := exchangesim.DefaultProfile()
	limit := time.Duration(len(r.byMailbox)) * profile.CmdletWrite / benchSessions
	res.limitRatio = res.wall.Seconds() / limit.Seconds()
	res.decisionsPerPartnership = float64(pass[bus.StreamMatch].items) / float64(len(r.parts))
	res.rssMB = largestEasguard(r.peakRSSByProcess())
	peakRSSMB = max(peakRSSMB, res.rssMB)
	b.Logf("onboarding, %d partnerships on %d mailboxes: every device allow-listed %.1fs after the first full sync began (its pass: %.1fs; easguard started %.1fs before it); limit %.1fs (%d mailboxes × %s ÷ %d sessions); %d Set-CASMailbox calls",
		len(r.parts), len(r.byMailbox), res.wall.Seconds(), first.GetFinishedAt().AsTime().Sub(t0).Seconds(), t0.Sub(r.started).Seconds(),
		limit.Seconds(), len(r.byMailbox), profile.CmdletWrite, benchSessions, r.f.sim.Recorder.Count("cmdlet:Set-CASMailbox")-writes)
	r.logAll("onboarding", t0, pass)
	return res
}

// reconcileRig is one reconcile's world: the seeded simulator, the
// inventory, and the easguard process once started.
type reconcileRig struct {
	tb        testing.TB
	f         *fixture
	parts     []exchangesim.Partnership // those a full sync lists (ActiveSync, no probes)
	byMailbox map[string][]string       // primary SMTP address → its device ids
	natsAddr  string
	// debugAddr is the all-in-one's profiler, whose heap statistics say
	// what a pass allocated ("" in the split shape).
	debugAddr string
	proc      *process // the all-in-one, or in the split shape the NATS host
	workers   []worker // the split shape's worker processes
	started   time.Time
	js        jetstream.JetStream
	mark      time.Time // end of the last phase noted
	phases    []string
	startRSS  map[string]float64 // each process's peak RSS before the last resetPeakRSS, in MB
}

// newReconcileRig seeds the organisation (n partnerships on n/2 mailboxes),
// sets its default to quarantine, makes every mailbox's lists what the
// shape needs (each device allow-listed, or no list entries at all), and
// writes the inventory with every device compliant.
func newReconcileRig(tb testing.TB, n int, allowListed bool, profile exchangesim.Profile) *reconcileRig {
	tb.Helper()
	begun := time.Now()
	easguardBinary(tb) // built before anything is timed
	f := newFixture(tb, stackOptions{
		seed:    &exchangesim.SeedSpec{Mailboxes: n / 2, Partnerships: n, Seed: 11, NoHostile: true},
		profile: profile,
		policy:  reconcilePolicy,
	})
	r := &reconcileRig{tb: tb, f: f, byMailbox: map[string][]string{}, mark: begun}
	if err := f.sim.Org.SetDefaultAccessLevel("Quarantine"); err != nil {
		tb.Fatal(err)
	}
	all, err := f.sim.Org.Partnerships("")
	if err != nil {
		tb.Fatal(err)
	}
	for _, p := range all {
		if p.ListedByActiveSync() {
			r.parts = append(r.parts, p)
			r.byMailbox[p.PrimarySMTP] = append(r.byMailbox[p.PrimarySMTP], p.DeviceID)
		}
	}
	for _, mb := range f.sim.Org.Mailboxes() {
		allowed, blocked, err := f.sim.Org.Lists(mb.PrimarySMTP)
		if err != nil {
			tb.Fatal(err)
		}
		var want []string
		if allowListed {
			want = r.byMailbox[mb.PrimarySMTP]
		}
		if slices.Equal(allowed, want) && len(blocked) == 0 {
			continue
		}
		// As an administrator would: the lists replaced, the blocked one emptied.
		params := exchange.Params{"Identity": mb.PrimarySMTP, "ActiveSyncAllowedDeviceIDs": nil, "ActiveSyncBlockedDeviceIDs": nil}
		if len(want) > 0 {
			params["ActiveSyncAllowedDeviceIDs"] = want
		}
		if _, _, err := f.sim.Org.AdminInvoke(exchange.Call{Cmdlet: "Set-CASMailbox", Params: params}); err != nil {
			tb.Fatalf("lists of %s: %v", mb.PrimarySMTP, err)
		}
	}
	devices := make([]managedDevice, len(r.parts))
	for i, p := range r.parts {
		d := compliant(fmt.Sprintf("m-%d", i), p.UPN, p.DeviceID)
		d.OperatingSystem, d.OSVersion, d.Model = osOf(p.DeviceOS), osVersionOf(p.DeviceOS), p.DeviceModel
		devices[i] = d
	}
	if err := writeInventoryFile(f.inventory, devices...); err != nil {
		tb.Fatal(err)
	}
	r.phase("seeded, lists set, inventory written")
	return r
}

// phase notes how long the part of the setup or run since the last one
// took; logPhases logs them.
func (r *reconcileRig) phase(what string) {
	r.phases = append(r.phases, fmt.Sprintf("%s %.1fs", what, time.Since(r.mark).Seconds()))
	r.mark = time.Now()
}

// logAll logs a shape's phases, what its pass stored per stream, and what
// easguard's consumers handled.
func (r *reconcileRig) logAll(shape string, t0 time.Time, pass passStats) {
	r.tb.Helper()
	r.logPhases(shape)
	r.logPass(shape, t0, pass)
	r.logStores(shape)
	r.logMetrics(shape)
}

// logStores logs, on one line, what each stream and bucket holds after
// the pass: messages, distinct subjects and bytes, and the bytes a
// partnership costs it. The embedded server's memory follows these: an
// index entry per subject, and the blocks a pass reads or writes cached.
func (r *reconcileRig) logStores(shape string) {
	r.tb.Helper()
	var parts []string
	var total uint64
	infos := r.js.ListStreams(r.tb.Context())
	for info := range infos.Info() {
		name, st := info.Config.Name, info.State
		if st.Msgs == 0 {
			continue
		}
		total += st.Bytes
		parts = append(parts, fmt.Sprintf("%s %d msgs %d subjects %.1f MB (%.0f B a partnership)",
			name, st.Msgs, st.NumSubjects, float64(st.Bytes)/1e6, float64(st.Bytes)/float64(len(r.parts))))
	}
	if err := infos.Err(); err != nil {
		r.tb.Fatalf("list streams: %v", err)
	}
	slices.Sort(parts)
	r.tb.Logf("%s, stored after the pass: %.1f MB, %.0f B a partnership; %s", shape, float64(total)/1e6, float64(total)/float64(len(r.parts)), strings.Join(parts, "; "))
}

func (r *reconcileRig) logPhases(shape string) {
	r.tb.Logf("%s, phases: %s", shape, strings.Join(r.phases, ", "))
}

// osOf is the MDM's operating system name of an EAS DeviceOS ("iOS 17.4 21F70" → "iOS").
func osOf(deviceOS string) string {
	if name, _, ok := strings.Cut(deviceOS, " "); ok {
		return name
	}
	return deviceOS
}

// osVersionOf is the version of an EAS DeviceOS ("iOS 17.4 21F70" → "17.4").
func osVersionOf(deviceOS string) string {
	if f := strings.Fields(deviceOS); len(f) > 1 {
		return f[1]
	}
	return ""
}

// mailboxIDs lists the mailboxes that have partnerships.
func (r *reconcileRig) mailboxIDs() []string {
	out := make([]string, 0, len(r.byMailbox))
	for mb := range r.byMailbox {
		out = append(out, mb)
	}
	slices.Sort(out)
	return out
}

// notAllowListed returns the mailboxes of mbs whose allowed list lacks one
// of their devices.
func (r *reconcileRig) notAllowListed(mbs []string) []string {
	var out []string
	for _, mb := range mbs {
		allowed, _, err := r.f.sim.Org.Lists(mb)
		if err != nil {
			r.tb.Fatal(err)
		}
		for _, id := range r.byMailbox[mb] {
			if !slices.ContainsFunc(allowed, func(a string) bool { return strings.EqualFold(a, id) }) {
				out = append(out, mb)
				break
			}
		}
	}
	return out
}

// timeListing reads what a full sync reads, the way it reads it: the
// mailboxes and then every partnership, each listing in parts over all
// benchSessions sessions at once (exchange.Client's partitioned full
// listing, with easguard's default EASGUARD_EXCHANGE_LIST_PARTITIONS),
// with a bare exchange.Client over a pool of its own, and returns how
// long the two listings took. Neither the pool's start nor its sessions'
// are counted: an unmeasured partitioned read of the mailboxes first
// starts every session, as easguard's are by the measured full sync (its
// first full sync ran before).
func (r *reconcileRig) timeListing() time.Duration {
	tb := r.tb
	tb.Helper()
	ctx := tb.Context()
	cfg := r.f.sim.ExchangeConfig(tb)
	cfg.Workers = benchSessions
	c, closePool := bareClient(tb, cfg)
	defer closePool()
	if err := c.ListRecipients(ctx, func([]exchange.Recipient) error { return nil }); err != nil {
		tb.Fatal(err)
	}
	start, cpu0 := time.Now(), telemetrytest.ProcessCPU(tb).Seconds()
	mailboxes, parts := 0, 0
	if err := c.ListRecipients(ctx, func(rs []exchange.Recipient) error { mailboxes += len(rs); return nil }); err != nil {
		tb.Fatal(err)
	}
	recipients := time.Since(start)
	if err := c.ListPartnerships(ctx, exchange.ListOptions{}, func(ps []exchange.Partnership) error { parts += len(ps); return nil }); err != nil {
		tb.Fatal(err)
	}
	took, cpu := time.Since(start), telemetrytest.ProcessCPU(tb).Seconds()-cpu0
	if parts != len(r.parts) {
		tb.Fatalf("the bare listing read %d partnerships, Exchange has %d", parts, len(r.parts))
	}
	tb.Logf("bare listing over %d sessions: %d mailboxes in %.1fs, %d partnerships in %.1fs; the simulator and the bare client used %.1f s of CPU, %.0f%% of the %d cores' %.1f s",
		benchSessions, mailboxes, recipients.Seconds(), parts, (took - recipients).Seconds(), cpu, 100*cpu/(took.Seconds()*float64(runtime.NumCPU())), runtime.NumCPU(), took.Seconds()*float64(runtime.NumCPU()))
	return took
}

// start runs `easguard run` with every worker around its embedded NATS
// server, which also listens on loopback so that the benchmark can read
// the streams; its settings are env's.
func (r *reconcileRig) start(extra ...string) {
	tb := r.tb
	tb.Helper()
	r.natsAddr = natstest.FreeAddr(tb)
	r.started = time.Now()
	env := r.env(append([]string{"EASGUARD_NATS_LISTEN=" + r.natsAddr, "EASGUARD_DEBUG_ADDR=" + natstest.FreeAddr(tb)}, extra...)...)
	for _, kv := range env { // EASGUARD_BENCH_ENV's, if it names one, wins
		if v, ok := strings.CutPrefix(kv, "EASGUARD_DEBUG_ADDR="); ok {
			r.debugAddr = v
		}
	}
	r.proc = start(tb, env...)
	r.proc.waitReady(tb)
	r.connect()
}

// allocated returns how many bytes and objects the all-in-one has
// allocated since it started (runtime.MemStats' TotalAlloc and Mallocs,
// which its profiler's heap page prints): unlike its CPU time, a figure
// the machine's speed that day does not move. ok is false in the split
// shape.
func (r *reconcileRig) allocated() (bytes, objects float64, ok bool) {
	r.tb.Helper()
	if r.debugAddr == "" {
		return 0, 0, false
	}
	resp, err := http.Get("http://" + r.debugAddr + "/debug/pprof/allocs?debug=1")
	if err != nil {
		r.tb.Fatalf("easguard's heap statistics: %v", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64*1024), 4*1024*1024)
	seen := 0
	for sc.Scan() {
		name, value, found := strings.Cut(strings.TrimPrefix(sc.Text(), "# "), " = ")
		if !found || name != "TotalAlloc" && name != "Mallocs" {
			continue
		}
		n, err := strconv.ParseFloat(value, 64)
		if err != nil {
			r.tb.Fatalf("easguard's heap statistics: %s = %q: %v", name, value, err)
		}
		if name == "TotalAlloc" {
			bytes = n
		} else {
			objects = n
		}
		seen++
	}
	if err := sc.Err(); err != nil || seen != 2 {
		r.tb.Fatalf("easguard's heap statistics: %d of TotalAlloc and Mallocs found (%v)", seen, err)
	}
	return bytes, objects, true
}

// profilePath is where the profile name goes in benchProfileEnv's
// directory; "" when none is asked for, or the process has no profiler.
func (r *reconcileRig) profilePath(name string) string {
	dir := os.Getenv(benchProfileEnv)
	if dir == "" || r.debugAddr == "" {
		return ""
	}
	return filepath.Join(dir, name)
}

// saveProfile saves the all-in-one's profile of kind (a /debug/pprof
// name) as name in benchProfileEnv's directory; nothing without one.
func (r *reconcileRig) saveProfile(kind, name string) {
	r.tb.Helper()
	path := r.profilePath(name)
	if path == "" {
		return
	}
	if err := fetchProfile("http://"+r.debugAddr+"/debug/pprof/"+kind, path); err != nil {
		r.tb.Fatal(err)
	}
	r.tb.Logf("saved %s", path)
}

// fetchProfile saves what url answers as path.
func fetchProfile(url, path string) error {
	resp, err := http.Get(url)
	if err != nil {
		return fmt.Errorf("profile %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("profile %s: %s", url, resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("profile %s: %w", url, err)
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return fmt.Errorf("profile %s: %w", url, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("profile %s: %w", url, err)
	}
	return nil
}

// profileCPU starts a CPU profile of the all-in-one, saved as name in
// benchProfileEnv's directory by the returned func; nothing without one.
// net/http/pprof profiles for a time given in advance and writes nothing
// to a client that leaves early, so the profile covers three times the
// bare listing's time from the pass's start, longer than any pass took,
// and the returned func waits for it: the idle tail adds no samples.
func (r *steadyRig) profileCPU(name string) (wait func()) {
	r.tb.Helper()
	path := r.profilePath(name)
	if path == "" {
		return func() {}
	}
	seconds := int(3*r.listing.Seconds()) + 1
	done := make(chan error, 1)
	go func() {
		done <- fetchProfile(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", r.debugAddr, seconds), path)
	}()
	return func() {
		r.tb.Helper()
		if err := <-done; err != nil {
			r.tb.Fatal(err)
		}
		r.tb.Logf("saved %s (%d s from the pass's start)", path, seconds)
	}
}

// splitWorkers are the worker processes of the split shape, one each, in
// the order they start: the collector last, so that its first full sync
// finds every consumer bound.
var splitWorkers = []string{pipeline.MDM, pipeline.Matcher, pipeline.Evaluator, pipeline.Executor, pipeline.Mailer, pipeline.Collector}

// startSplit runs easguard as a deployment does (deploy/compose): a
// process per worker, each with its own EASGUARD_WORKERS, all on one NATS
// server, here an easguard process with no worker but its embedded
// server, so that the server's peak RSS is measured apart from the
// workers'.
func (r *reconcileRig) startSplit(extra ...string) {
	tb := r.tb
	tb.Helper()
	r.natsAddr = natstest.FreeAddr(tb)
	r.started = time.Now()
	r.proc = start(tb, r.env(append([]string{"EASGUARD_NATS_LISTEN=" + r.natsAddr, "EASGUARD_WORKERS=none"}, extra...)...)...)
	r.proc.waitReady(tb)
	for _, w := range splitWorkers {
		p := start(tb, r.env(append([]string{"EASGUARD_NATS_URL=nats://" + r.natsAddr, "EASGUARD_WORKERS=" + w}, extra...)...)...)
		p.waitReady(tb)
		r.workers = append(r.workers, worker{name: w, proc: p})
	}
	r.connect()
}

// worker is one worker process of the split shape.
type worker struct {
	name string
	proc *process
}

// processes lists every easguard process of the rig by name: "easguard"
// (the all-in-one) or "nats" (the split shape's server) and the workers.
func (r *reconcileRig) processes() []worker {
	name := "easguard"
	if len(r.workers) > 0 {
		name = "nats"
	}
	return append([]worker{{name: name, proc: r.proc}}, r.workers...)
}

// connect connects the benchmark to the easguard NATS server.
func (r *reconcileRig) connect() {
	tb := r.tb
	tb.Helper()
	nc, err := nats.Connect("nats://"+r.natsAddr, nats.MaxReconnects(-1))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(nc.Close)
	if r.js, err = jetstream.New(nc); err != nil {
		tb.Fatal(err)
	}
}

// env is the environment of an easguard process of the rig: the binary's
// defaults but for the environment's (Exchange, SMTP, the inventory, the
// policy) and extra NAME=value settings; EASGUARD_BENCH_ENV's come last
// and win.
func (r *reconcileRig) env(extra ...string) []string {
	tb := r.tb
	tb.Helper()
	f := r.f
	host, port := splitAddr(tb, f.smtp.Addr())
	env := append([]string{
		"EASGUARD_ORG=" + testOrg, "EASGUARD_LOG_LEVEL=warn",
		fmt.Sprint("EASGUARD_EXCHANGE_WORKERS=", benchSessions),
		// The simulator caps a Receive long-poll at 2 s (exchangesim.StartTest).
		"EASGUARD_EXCHANGE_OPERATION_TIMEOUT=2s",
		"EASGUARD_EVALUATOR_POLICY_FILE=" + f.policy,
		"EASGUARD_MAILER_SMTP_HOST=" + host, fmt.Sprint("EASGUARD_MAILER_SMTP_PORT=", port), "EASGUARD_MAILER_SMTP_SECURITY=starttls",
		"EASGUARD_MAILER_SMTP_USER=" + smtpUser, "EASGUARD_MAILER_SMTP_PASSWORD=" + smtpPass, "EASGUARD_MAILER_SMTP_CA_BUNDLE=" + f.smtpCA,
		"EASGUARD_MAILER_FROM=IT Service <it@contoso.com>", "EASGUARD_MAILER_ENROL_URL=" + enrolURL,
		"EASGUARD_MDM_FILE=" + f.inventory,
	}, f.sim.Env(exchangesim.DefaultUser, exchangesim.DefaultPassword, "")...)
	env = append(env, extra...)
	// Settings to compare (EASGUARD_CONCURRENCY=1, say) come last and win.
	return append(env, strings.Fields(os.Getenv(benchEnvEnv))...)
}

// alive fails the benchmark if the easguard process has exited.
func (r *reconcileRig) alive() {
	for _, w := range r.processes() {
		select {
		case <-w.proc.exited:
			r.tb.Fatalf("easguard (%s) exited: %v\n%s", w.name, w.proc.err, w.proc.stderr.String())
		default:
		}
	}
}

// requestFullSync asks the collector for a full sync on the bus, as the
// console does for an operator.
func (r *reconcileRig) requestFullSync() {
	r.tb.Helper()
	pub, err := bus.NewPublisher(r.js, bus.Instrumentation{})
	if err != nil {
		r.tb.Fatal(err)
	}
	subject, err := bus.SyncRequested.Subject(testOrg, "")
	if err != nil {
		r.tb.Fatal(err)
	}
	id := fmt.Sprintf("bench-%d", time.Now().UnixNano())
	if _, err := pub.Publish(context.Background(), bus.Outbound{Subject: subject, MsgID: id, Message: &ev.SyncRequested{
		Org: testOrg, SyncId: id, Kind: ev.SyncKind_SYNC_KIND_FULL, RequestedBy: "benchmark", RequestedAt: timestamppb.Now()}}); err != nil {
		r.tb.Fatal(err)
	}
}

// waitSyncs waits until syncs of the given kinds, in that order, have
// completed after the sync stream's sequence from, and returns them.
func (r *reconcileRig) waitSyncs(from uint64, timeout time.Duration, kinds ...ev.SyncKind) []*ev.SyncCompleted {
	r.tb.Helper()
	var got []*ev.SyncCompleted
	next := from + 1
	what := fmt.Sprintf("syncs %v", kinds)
	pollEvery(r.tb, timeout, 250*time.Millisecond, what, func() bool {
		r.alive()
		last := r.lastSeq(bus.StreamSync)
		for ; next <= last && len(got) < len(kinds); next++ {
			var m ev.SyncCompleted
			r.message(bus.StreamSync, next, &m)
			if m.GetKind() == kinds[len(got)] {
				got = append(got, &m)
			}
		}
		return len(got) == len(kinds)
	})
	return got
}

// waitIdle waits until the easguard process has nothing left to do.
func (r *reconcileRig) waitIdle(timeout time.Duration) {
	r.tb.Helper()
	waitIdle(r.tb, r.js, timeout, 250*time.Millisecond)
}

func (r *reconcileRig) stream(name string) jetstream.Stream {
	r.tb.Helper()
	s, err := r.js.Stream(r.tb.Context(), name)
	if err != nil {
		r.tb.Fatalf("stream %s: %v", name, err)
	}
	return s
}

func (r *reconcileRig) lastSeq(name string) uint64 {
	r.tb.Helper()
	info, err := r.stream(name).Info(r.tb.Context())
	if err != nil {
		r.tb.Fatalf("stream %s: %v", name, err)
	}
	return info.State.LastSeq
}

// message reads one stored message; into, when set, gets its body.
func (r *reconcileRig) message(name string, seq uint64, into proto.Message) *jetstream.RawStreamMsg {
	r.tb.Helper()
	m, err := r.stream(name).GetMsg(r.tb.Context(), seq)
	if err != nil {
		r.tb.Fatalf("message %d of %s: %v", seq, name, err)
	}
	if into != nil {
		if err := proto.Unmarshal(m.Data, into); err != nil {
			r.tb.Fatalf("message %d of %s: %v", seq, name, err)
		}
	}
	return m
}

// passJudged waits for the evaluator's status that it has judged a sync
// pass, and returns when it had.
func (r *reconcileRig) passJudged(syncID string) time.Time {
	r.tb.Helper()
	kv, err := r.js.KeyValue(r.tb.Context(), bus.BucketStatus)
	if err != nil {
		r.tb.Fatal(err)
	}
	var st status.PassJudged
	pollEvery(r.tb, time.Minute, 50*time.Millisecond, "the evaluator's judged status of "+syncID, func() bool {
		var err error
		st, _, err = status.Get[status.PassJudged](r.tb.Context(), kv, testOrg, status.PassJudgedKey("full"))
		return err == nil && st.SyncID == syncID
	})
	return st.JudgedAt
}

// decisionsKV is the stream of the evaluator's records: every partnership
// judged writes its record, whether or not a decision is published.
const decisionsKV = "KV_" + bus.BucketDecisions

// passStreams are the streams a reconcile pass writes to, in pipeline order.
var passStreams = []string{bus.StreamMDM, bus.StreamEAS, bus.StreamMatch, decisionsKV, bus.StreamDecisions, bus.StreamApplied, bus.StreamSync, bus.StreamAlerts, bus.StreamDLQ}

// streamSnapshot is the last sequence of every pass stream.
type streamSnapshot struct{ seq map[string]uint64 }

func (r *reconcileRig) snapshot() streamSnapshot {
	s := streamSnapshot{seq: map[string]uint64{}}
	if r.js == nil { // easguard not started: every stream starts empty
		return s
	}
	for _, name := range passStreams {
		s.seq[name] = r.lastSeq(name)
	}
	return s
}

// hop is what one stream received during a pass.
type hop struct {
	// n is messages; items is partnerships, a page of confirmations
	// counting as the partnerships it carries.
	n, items    uint64
	first, last time.Time
}

// rate is the hop's partnerships per second between its first and last
// message.
func (h hop) rate() float64 {
	if h.n < 2 || !h.last.After(h.first) {
		return 0
	}
	return float64(h.items) / h.last.Sub(h.first).Seconds()
}

type passStats map[string]hop

// last is when the last message of the named streams was stored.
func (p passStats) last(streams ...string) time.Time {
	var t time.Time
	for _, name := range streams {
		if h := p[name]; h.last.After(t) {
			t = h.last
		}
	}
	return t
}

// since returns what each pass stream received after the snapshot.
func (r *reconcileRig) since(before streamSnapshot) passStats {
	out := passStats{}
	for _, name := range passStreams {
		from, last := before.seq[name], r.lastSeq(name)
		if last <= from {
			out[name] = hop{}
			continue
		}
		h := hop{n: last - from, items: last - from, first: r.firstFrom(name, from+1).Time, last: r.message(name, last, nil).Time}
		if page, ok := pagesOf[name]; ok {
			pages, items := r.pageItems(name, page, from+1)
			h.items = h.n - pages + items
		}
		out[name] = h
	}
	return out
}

// pagesOf is, for each stream that carries pages of confirmations, the
// family of its pages.
var pagesOf = map[string]bus.Event{bus.StreamEAS: bus.EASConfirmed, bus.StreamMatch: bus.DevicesConfirmed}

// pageItems counts the pages a stream stored from seq on and the
// partnerships they carry.
func (r *reconcileRig) pageItems(stream string, family bus.Event, seq uint64) (pages, items uint64) {
	r.tb.Helper()
	ctx := r.tb.Context()
	c, err := r.stream(stream).OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{family.Filter(testOrg)}, DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: seq,
	})
	if err != nil {
		r.tb.Fatalf("pages of %s: %v", stream, err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		r.tb.Fatalf("pages of %s: %v", stream, err)
	}
	for left := info.NumPending; left > 0; {
		batch, err := c.Fetch(int(min(left, 256)), jetstream.FetchMaxWait(10*time.Second))
		if err != nil {
			r.tb.Fatalf("pages of %s: %v", stream, err)
		}
		got := uint64(0)
		for m := range batch.Messages() {
			got++
			switch family {
			case bus.EASConfirmed:
				var p ev.EASPartnershipsConfirmed
				if err := proto.Unmarshal(m.Data(), &p); err != nil {
					r.tb.Fatalf("page on %s: %v", m.Subject(), err)
				}
				items += uint64(len(p.GetPartnerships()))
			default:
				var p ev.DevicesMatched
				if err := proto.Unmarshal(m.Data(), &p); err != nil {
					r.tb.Fatalf("page on %s: %v", m.Subject(), err)
				}
				items += uint64(len(p.GetMatches()))
			}
		}
		if batch.Error() != nil {
			r.tb.Fatalf("pages of %s: %v", stream, batch.Error())
		}
		if got == 0 {
			r.tb.Fatalf("pages of %s: %d pending, none delivered", stream, left)
		}
		pages += got
		left -= min(left, got)
	}
	return pages, items
}

// firstFrom reads the first message of a stream still stored at or after
// seq: a bucket keeps a key's last revision only, so a long pass that
// writes a key twice has removed its first write.
func (r *reconcileRig) firstFrom(name string, seq uint64) *jetstream.RawStreamMsg {
	r.tb.Helper()
	m, err := r.stream(name).GetMsg(r.tb.Context(), seq, jetstream.WithGetMsgSubject(">"))
	if err != nil {
		r.tb.Fatalf("first message of %s from %d: %v", name, seq, err)
	}
	return m
}

// logPass logs, on one line (a benchmark's log keeps only its first
// ten), each stream's count and timing relative to t0.
func (r *reconcileRig) logPass(shape string, t0 time.Time, p passStats) {
	var parts []string
	for _, name := range passStreams {
		h := p[name]
		if h.n == 0 {
			parts = append(parts, name+" 0")
			continue
		}
		n := strconv.FormatUint(h.n, 10)
		if h.items != h.n {
			n += fmt.Sprintf(" (%d partnerships)", h.items)
		}
		parts = append(parts, fmt.Sprintf("%s %s %.1fs→%.1fs %.0f/s", name, n, h.first.Sub(t0).Seconds(), h.last.Sub(t0).Seconds(), h.rate()))
	}
	r.tb.Logf("%s, messages stored per stream (first→last, from the pass's start): %s", shape, strings.Join(parts, "; "))
}

// logMetrics logs, on one line, the easguard process's messages handled
// and time spent handling them per consumer since it started, which say
// where the time went.
func (r *reconcileRig) logMetrics(shape string) {
	type handled struct{ n, seconds float64 }
	by := map[string]*handled{}
	for _, w := range r.processes() {
		resp, err := http.Get(w.proc.http + "/metrics")
		if err != nil {
			r.tb.Logf("%s: /metrics of %s: %v", shape, w.name, err)
			continue
		}
		r.readHandled(resp.Body, func(group string, n, seconds float64) {
			if by[group] == nil {
				by[group] = &handled{}
			}
			by[group].n += n
			by[group].seconds += seconds
		})
		resp.Body.Close()
	}
	var parts []string
	for _, g := range slices.Sorted(maps.Keys(by)) {
		parts = append(parts, fmt.Sprintf("%s %.0f in %.1fs", strings.TrimSuffix(g, "-"+testOrg), by[g].n, by[g].seconds))
	}
	r.tb.Logf("%s, handled by easguard since it started (messages in handler time): %s", shape, strings.Join(parts, "; "))
}

// readHandled reads, from a /metrics page, each consumer group's messages
// handled and seconds spent handling them.
func (r *reconcileRig) readHandled(body io.Reader, add func(group string, n, seconds float64)) {
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		_, group, ok := strings.Cut(line, `messaging_consumer_group_name="`)
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		group, _, _ = strings.Cut(group, `"`)
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			continue
		}
		switch {
		case strings.HasPrefix(line, "messaging_client_consumed_messages_total"):
			add(group, v, 0)
		case strings.HasPrefix(line, "messaging_process_duration_seconds_sum"):
			add(group, 0, v)
		}
	}
}

// cpuSeconds is the CPU time the easguard processes have used so far
// (user and system, from /proc): over a pass, it says what the pass cost
// whatever else shares the machine, which wall time does not.
func (r *reconcileRig) cpuSeconds() float64 {
	r.tb.Helper()
	total := 0.0
	for _, w := range r.processes() {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(w.proc.cmd.Process.Pid), "stat"))
		if err != nil {
			r.tb.Fatalf("CPU time of easguard (%s): %v", w.name, err)
		}
		// The fields after the command name, which is in parentheses and may
		// hold spaces: state is the first, utime the 12th and stime the 13th.
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) < 13 {
			r.tb.Fatalf("CPU time of easguard (%s): short stat %q", w.name, b)
		}
		for _, v := range f[11:13] {
			n, err := strconv.Atoi(v)
			if err != nil {
				r.tb.Fatalf("CPU time of easguard (%s): %q: %v", w.name, v, err)
			}
			total += float64(n) / 100 // USER_HZ, 100 on Linux
		}
	}
	return total
}

// largestEasguard is the largest peak RSS of peakRSSByProcess's but the
// split shape's NATS server: the all-in-one's, or the largest worker's.
func largestEasguard(byProcess map[string]float64) float64 {
	peak := 0.0
	for name, mb := range byProcess {
		if name != "nats" {
			peak = max(peak, mb)
		}
	}
	return peak
}

// resetPeakRSS resets each easguard process's peak RSS (VmHWM) to its RSS
// now and returns the peaks it had (since the start, or the last reset),
// keeping each process's largest in startRSS: the next peakRSSByProcess
// then says what the pass in between needed, apart from the first full
// sync and from earlier passes.
func (r *reconcileRig) resetPeakRSS() map[string]float64 {
	r.tb.Helper()
	peaks := r.peakRSSByProcess()
	if r.startRSS == nil {
		r.startRSS = map[string]float64{}
	}
	for _, w := range r.processes() {
		r.startRSS[w.name] = max(r.startRSS[w.name], peaks[w.name])
		path := filepath.Join("/proc", strconv.Itoa(w.proc.cmd.Process.Pid), "clear_refs")
		// 5 resets the peak resident set size (proc(5)).
		if err := os.WriteFile(path, []byte("5"), 0); err != nil {
			r.tb.Fatalf("reset the peak RSS of easguard (%s): %v", w.name, err)
		}
	}
	return peaks
}

// peakRSSByProcess reads the peak resident set (VmHWM) of each easguard
// process of the rig, by name (see processes).
func (r *reconcileRig) peakRSSByProcess() map[string]float64 {
	r.tb.Helper()
	out := map[string]float64{}
	for _, w := range r.processes() {
		path := filepath.Join("/proc", strconv.Itoa(w.proc.cmd.Process.Pid), "status")
		b, err := os.ReadFile(path)
		if err != nil {
			r.tb.Fatalf("peak RSS of easguard (%s): %v", w.name, err)
		}
		found := false
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
				kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
				if err != nil {
					r.tb.Fatalf("peak RSS of easguard (%s): %q: %v", w.name, line, err)
				}
				out[w.name], found = float64(kb)/1024, true
			}
		}
		if !found {
			r.tb.Fatalf("peak RSS of easguard (%s): no VmHWM in %s", w.name, path)
		}
	}
	return out
}
