package evaluator

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// benchSizeEnv sets the number of partnerships of the guard count
// benchmark (the 100k reconcile benchmark in tests/ reads it too).
const benchSizeEnv = "EASGUARD_BENCH_PARTNERSHIPS"

// BenchmarkGuardCount measures one count of the blast-radius guard's base
// (partnerships with mail now) at 100,000 partnerships, as a guard
// decision makes it, both ways in the same run on the same buckets: the
// full recount it used to make (every key of the decisions and
// partnership buckets read) and the view it keeps now (one change applied
// since the last count, the leader asked for the last sequences, the view
// waited for). It also reports what starting the view costs a replica
// that judges for the first time (replay of both buckets) and the heap
// the view holds. Every count is checked against the recount.
func BenchmarkGuardCount(b *testing.B) {
	n := 100_000
	if v := os.Getenv(benchSizeEnv); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 10 {
			b.Fatalf("%s=%q: want a number of partnerships, at least 10", benchSizeEnv, v)
		}
	}
	label := "guard_count_" + strconv.Itoa(n) + "_"
	if n%1000 == 0 {
		label = "guard_count_" + strconv.Itoa(n/1000) + "k_"
	}
	_, _, js := natstest.Start(b)
	ctx := natstest.Context(b)
	if err := bus.Provision(ctx, js, bus.DefaultTopology()); err != nil {
		b.Fatal(err)
	}
	e, err := New(ctx, js, "contoso", Config{BlastRadius: 0.1, BlastMinimum: 3, MDMWindow: time.Second}, slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	filled := time.Now()
	want := fillGuardBuckets(b, js, e, n)
	b.Logf("%d partnerships (%d with mail) stored in %s", n, want, time.Since(filled).Round(time.Millisecond))

	start := time.Now()
	got, err := e.allowedCount(ctx)
	if err != nil {
		b.Fatal(err)
	}
	replay := time.Since(start)
	if got != want {
		b.Fatalf("view counts %d after its replay, want %d", got, want)
	}
	keys, indexes := e.view.size()
	// The view's heap: the live heap with it, less the live heap once it is
	// dropped (the NATS server runs in this process; its caches are in
	// both).
	var with, without runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&with)
	v := e.view
	e.dropView(v)
	<-v.done
	v = nil
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&without)
	if _, err := e.allowedCount(ctx); err != nil { // a new view, for the rounds
		b.Fatal(err)
	}
	t0 := time.Now()
	if _, err := lastSeq(ctx, e.view.streams[0], e.view.orgKeys[0]); err != nil {
		b.Fatal(err)
	}
	b.Logf("the leader's last sequence of the decisions under contoso.> in %s", time.Since(t0).Round(time.Microsecond))

	var recount, incremental time.Duration
	rounds := 0
	for b.Loop() {
		// One partnership changes between two guard decisions.
		key := fmt.Sprintf("contoso.applbench%d.guid-%d", rounds%n, rounds%n)
		rec := benchRecord(key, ev.DesiredAccess_DESIRED_ACCESS_ALLOW, rounds%2 == 0, false)
		if err := bus.Put(ctx, e.decisions, key, rec); err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		viewN, err := e.allowedCount(ctx)
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		recN, err := e.recountAllowed(ctx)
		if err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		if viewN != recN {
			b.Fatalf("round %d: view counts %d, the recount %d", rounds, viewN, recN)
		}
		incremental += t1.Sub(t0)
		recount += t2.Sub(t1)
		rounds++
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(rounds) }
	b.ReportMetric(ms(recount), label+"recount_ms:ms")
	b.ReportMetric(ms(incremental), label+"incremental_ms:ms")
	b.ReportMetric(float64(replay.Microseconds())/1000, label+"view_replay_ms:ms")
	b.ReportMetric(float64(int64(with.HeapAlloc)-int64(without.HeapAlloc))/(1<<20), label+"view_heap_mb:MB")
	b.Logf("%d rounds: recount %.1f ms, view %.2f ms; the view's replay %s; it holds %d keys and %d index entries",
		rounds, ms(recount), ms(incremental), replay.Round(time.Millisecond), keys, indexes)
}

// fillGuardBuckets stores n partnerships, one per device, with decision
// records of the sizes the evaluator writes: nine in ten decided (most
// allowed, some blocked, held, or staged for the guard), one in ten out of
// scope (undecided; half of them allowed by Exchange). It returns how many
// have mail now.
func fillGuardBuckets(tb testing.TB, js jetstream.JetStream, e *Evaluator, n int) int {
	tb.Helper()
	ctx := context.Background()
	want := 0
	put := func(kv jetstream.KeyValue, key string, m proto.Message) {
		data, err := proto.Marshal(m)
		if err != nil {
			tb.Fatal(err)
		}
		// A KV put is a publish to the key's subject; asynchronously, so
		// that filling 100,000 keys takes seconds.
		if _, err := js.PublishAsync("$KV."+kv.Bucket()+"."+key, data); err != nil {
			tb.Fatal(err)
		}
	}
	for i := range n {
		dev, id := "applbench"+strconv.Itoa(i), "guid-"+strconv.Itoa(i)
		dk := "contoso." + dev + "." + id
		state := ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED
		var rec *ev.DecisionRecord
		switch i % 20 {
		case 0, 1: // out of scope: undecided
			if i%20 == 1 {
				state = ev.DeviceAccessState_DEVICE_ACCESS_STATE_BLOCKED
			} else {
				want++
			}
		case 2, 3: // blocked
			state = ev.DeviceAccessState_DEVICE_ACCESS_STATE_BLOCKED
			rec = benchRecord(dk, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, false, false)
		case 4: // refused by the guard: keeps its mail
			rec = benchRecord(dk, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, false, true)
			want++
		case 5: // waiting for the guard: the guard adds it itself
			rec = benchRecord(dk, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, true, false)
		default:
			rec = benchRecord(dk, ev.DesiredAccess_DESIRED_ACCESS_ALLOW, false, false)
			want++
		}
		p := benchPartnership(dev, id, state)
		put(e.parts, "contoso."+dev, &ev.PartnershipIndex{ById: map[string]*ev.EASPartnershipObserved{id: {Org: "contoso", Partnership: p, ObservedAt: timestamppb.Now()}}})
		if rec != nil {
			put(e.decisions, dk, rec)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(5 * time.Minute):
		tb.Fatal("filling the buckets took over 5 minutes")
	}
	_ = ctx
	return want
}

func benchPartnership(dev, id string, state ev.DeviceAccessState) *ev.EASPartnership {
	mb := "user-" + dev + "@contoso.com"
	return &ev.EASPartnership{
		Mailbox:  &ev.Mailbox{Identity: "contoso.com/Users/" + dev, PrimarySmtpAddress: mb, UserPrincipalName: mb, DisplayName: dev},
		DeviceId: dev, DeviceType: "iPhone", DeviceModel: "iPhone15,2", DeviceOs: "iOS 17.4 21E219", FriendlyName: dev + "'s iPhone",
		DeviceAccessState: state, DeviceAccessStateReason: ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_INDIVIDUAL,
		FirstSyncTime: timestamppb.Now(), Identity: "contoso.com/Users/" + dev + "/ExchangeActiveSyncDevices/iPhone§" + dev, Guid: id,
	}
}

// benchRecord is a decision record as Decide writes it, with the verdict
// and the decision it keeps.
func benchRecord(dk string, want ev.DesiredAccess, staged, held bool) *ev.DecisionRecord {
	dev, id := dk, dk
	p := benchPartnership(dev, id, ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED)
	obs := &ev.EASPartnershipObserved{Org: "contoso", Partnership: p, ObservedAt: timestamppb.Now(), Change: ev.ObservationChange_OBSERVATION_CHANGE_NEW,
		Sync: &ev.SyncRef{SyncId: "sync-bench", Kind: ev.SyncKind_SYNC_KIND_FULL}}
	mdm := &ev.MDMDevice{Source: "file", MdmDeviceId: "mdm-" + dev, UserPrincipalName: p.GetMailbox().GetUserPrincipalName(), EasDeviceId: dev,
		EnrollmentState: ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT}
	d := &ev.AccessDecided{Org: "contoso", Partnership: p, Desired: want, Rule: "compliant", Reason: "enrolled and compliant", DecidedAt: timestamppb.Now(),
		PolicyVersion: "v-bench", Mdm: mdm, DecisionId: "d-" + dk, SyncId: "sync-bench"}
	return &ev.DecisionRecord{Desired: want, DecisionId: d.GetDecisionId(), DecidedAt: d.GetDecidedAt(), Rule: d.GetRule(), PolicyVersion: d.GetPolicyVersion(),
		Staged: staged, Held: held, LastDecision: d, Traceparent: "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01",
		LastMatched: &ev.DeviceMatched{Org: "contoso", Observed: obs, Mdm: mdm, MatchedAt: timestamppb.Now(), Trigger: "eas", Method: ev.MatchMethod_MATCH_METHOD_EAS_DEVICE_ID_AND_USER}}
}
