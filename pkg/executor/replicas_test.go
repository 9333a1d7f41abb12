package executor_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/bus/bustest"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/executor"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
)

// replica is a second executor of the same organisation: its own Exchange
// pool, its own Executor and its own runner bound to the same durable
// consumer as the harness's, as a second `easguard run` would be.
type replica struct {
	x       *executor.Executor
	applier *recordingApplier
}

// replica starts another executor beside the harness's.
func (h *harness) replica(tb testing.TB, window time.Duration) *replica {
	tb.Helper()
	ctx := natstest.Context(tb)
	cfg := h.sim.ExchangeConfig(tb)
	pool, err := exchange.NewPool(ctx, cfg, quiet())
	if err != nil {
		tb.Fatalf("exchange pool: %v", err)
	}
	tb.Cleanup(func() { pool.Close(context.Background()) })
	r := &replica{applier: &recordingApplier{client: exchange.NewClient(pool, cfg)}}
	xcfg := executor.Config{Window: window, MaxBatch: 500, Parallel: 16, ClaimTTL: time.Minute}
	if err := xcfg.Validate(); err != nil {
		tb.Fatal(err)
	}
	if r.x, err = executor.New(ctx, h.js, org, xcfg, r.applier, pool.Current, cfg.User, quiet()); err != nil {
		tb.Fatal(err)
	}
	runLiveness(tb, r.x)
	run, err := bus.NewRunner(h.js, bus.RunnerConfig{Service: "executor", Org: org, Concurrency: xcfg.Parallel, Prefetch: 1,
		Retry:  bus.RetryPolicy{Initial: 100 * time.Millisecond, Max: time.Second, Multiplier: 2, Jitter: 0.1},
		Logger: quiet()}, r.x.Routes()...)
	if err != nil {
		tb.Fatal(err)
	}
	bustest.Run(tb, run)
	return r
}

// runLiveness runs x's liveness lease, as pkg/pipeline does, until the
// test ends.
func runLiveness(tb testing.TB, x *executor.Executor) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- x.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("executor liveness: %v", err)
		}
	})
}

// setCASFor returns the Set-CASMailbox calls Exchange received that
// change deviceID, in the order they started.
func (h *harness) setCASFor(deviceID string) []exchangesim.Record {
	var out []exchangesim.Record
	for _, r := range h.sim.Recorder.Records("cmdlet") {
		if r.Cmdlet != "Set-CASMailbox" {
			continue
		}
		var p map[string]json.RawMessage
		if json.Unmarshal(r.Params, &p) != nil {
			continue
		}
		for _, list := range []string{"ActiveSyncAllowedDeviceIDs", "ActiveSyncBlockedDeviceIDs"} {
			var mv exchange.MultiValued
			if json.Unmarshal(p[list], &mv) == nil && (slices.Contains(mv.Add, deviceID) || slices.Contains(mv.Remove, deviceID)) {
				out = append(out, r)
				break
			}
		}
	}
	slices.SortFunc(out, func(a, b exchangesim.Record) int { return a.Time.Compare(b.Time) })
	return out
}

// calls renders recorded calls for a failure message.
func callsOf(rs []exchangesim.Record) string {
	var b strings.Builder
	for _, r := range rs {
		fmt.Fprintf(&b, "\n\t%s %s %s (%s)", r.Time.Format("15:04:05.000"), r.Cmdlet, r.Params, r.Duration.Round(time.Millisecond))
	}
	return b.String()
}

// adds reports whether a recorded Set-CASMailbox adds deviceID to list.
func adds(r exchangesim.Record, list, deviceID string) bool {
	var p map[string]json.RawMessage
	if json.Unmarshal(r.Params, &p) != nil {
		return false
	}
	var mv exchange.MultiValued
	return json.Unmarshal(p[list], &mv) == nil && slices.Contains(mv.Add, deviceID)
}

// applyAsync runs the handler of x for d, as a delivery to that replica.
func applyAsync(x *executor.Executor, d *ev.AccessDecided) <-chan *ev.AccessApplied {
	done := make(chan *ev.AccessApplied, 1)
	go func() {
		outs, err := x.Apply(context.Background(), d)
		if err != nil || len(outs) != 1 {
			done <- &ev.AccessApplied{Items: []*ev.AppliedItem{{Outcome: ev.ApplyOutcome_APPLY_OUTCOME_FAILED, Error: fmt.Sprint(err)}}}
			return
		}
		done <- outs[0].Message.(*ev.AccessApplied)
	}()
	return done
}

func awaitApplied(tb testing.TB, c <-chan *ev.AccessApplied, what string) *ev.AccessApplied {
	tb.Helper()
	select {
	case a := <-c:
		return a
	case <-time.After(30 * time.Second):
		tb.Fatalf("%s: no outcome within 30s", what)
		return nil
	}
}

// Two replicas of the executor, each with its own batcher and Exchange
// sessions, get two decisions for one device. Whichever replica gets
// which, and while the other's change is still on its way to Exchange,
// the older decision never reaches Exchange after the newer one.
func TestReplicasApplyDecisionsInOrder(t *testing.T) {
	profile := exchangesim.TestProfile()
	profile.CmdletWrite = 500 * time.Millisecond // a change stays in flight this long after Exchange made it
	h := start(t, options{window: 50 * time.Millisecond, profile: profile})
	other := h.replica(t, 50*time.Millisecond)

	tests := []struct {
		name string
		// firstNewer: the first replica gets the newer decision, and the
		// second the older one while the newer's batch is in flight; else
		// the other way round.
		firstNewer bool
	}{
		{"older to a second replica while the newer is in flight", true},
		{"newer to a second replica while the older is in flight", false},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := h.boxes[i]
			dev := fmt.Sprintf("ApplREPL%d", i)
			p := h.phone(t, m, dev)
			now := time.Now()
			newer := decision(p, ev.DesiredAccess_DESIRED_ACCESS_ALLOW, now)
			older := decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, now.Add(-time.Minute))
			first, second := newer, older
			if !tt.firstNewer {
				first, second = older, newer
			}
			firstDone := applyAsync(h.x, first)
			natstest.Eventually(t, 10*time.Second, "the first replica's batch in flight, its change made on Exchange", func() bool {
				allowed, blocked := h.lists(t, m)
				return h.applier.inflight.Load() == 1 && (slices.Contains(allowed, dev) || slices.Contains(blocked, dev))
			})
			secondDone := applyAsync(other.x, second)
			a1 := awaitApplied(t, firstDone, "first decision")
			a2 := awaitApplied(t, secondDone, "second decision")
			h.settle(t)

			byID := map[string]*ev.AccessApplied{first.GetDecisionId(): a1, second.GetDecisionId(): a2}
			if o := outcome(byID[newer.GetDecisionId()]); o != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
				t.Errorf("newer decision: %s %q, want APPLIED", o, byID[newer.GetDecisionId()].GetItems()[0].GetError())
			}
			calls := h.setCASFor(dev)
			allowed, blocked := h.lists(t, m)
			if !slices.Equal(allowed, []string{dev}) || len(blocked) != 0 {
				t.Errorf("Exchange ends with allowed %q blocked %q: the older decision (block) undid the newer (allow)", allowed, blocked)
			}
			if tt.firstNewer {
				// The older one is refused: it was claimed too late.
				if o := outcome(a2); o != ev.ApplyOutcome_APPLY_OUTCOME_SUPERSEDED || !strings.Contains(a2.GetItems()[0].GetError(), newer.GetDecisionId()) {
					t.Errorf("older decision: %s %q, want SUPERSEDED naming %s", o, a2.GetItems()[0].GetError(), newer.GetDecisionId())
				}
				if len(calls) != 1 || !adds(calls[0], "ActiveSyncAllowedDeviceIDs", dev) {
					t.Errorf("Exchange received %d Set-CASMailbox for %s, want only the newer decision's:%s", len(calls), dev, callsOf(calls))
				}
				return
			}
			// The older one was sent first; the newer one waits for it to be
			// done on Exchange, then goes, so it is the last word.
			if o := outcome(a1); o != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
				t.Errorf("older decision: %s, want APPLIED (it was sent before the newer arrived)", o)
			}
			if len(calls) != 2 || !adds(calls[0], "ActiveSyncBlockedDeviceIDs", dev) || !adds(calls[1], "ActiveSyncAllowedDeviceIDs", dev) {
				t.Fatalf("Exchange received %d Set-CASMailbox for %s, want the older's then the newer's:%s", len(calls), dev, callsOf(calls))
			}
			if end := calls[0].Time.Add(calls[0].Duration); calls[1].Time.Before(end) {
				t.Errorf("the newer decision's Set-CASMailbox started %s before the older's finished: two replicas changed the device at once",
					end.Sub(calls[1].Time))
			}
		})
	}
}

// A burst of decisions, with older decisions and second copies of some
// mixed in, goes to two replicas bound to the same consumer: every device
// ends as its newest decision says, every decision is reported once, and
// no device is changed on Exchange more than once.
func TestReplicasBurstAppliedOnce(t *testing.T) {
	h := start(t, options{window: 50 * time.Millisecond})
	other := h.replica(t, 50*time.Millisecond)
	const n = 60
	type device struct {
		m      *exchangesim.Mailbox
		id     string
		newest *ev.AccessDecided
		older  *ev.AccessDecided
	}
	var devs []device
	for i := range n {
		m := h.boxes[i%len(h.boxes)]
		id := fmt.Sprintf("ApplBURST%03d", i)
		devs = append(devs, device{m: m, id: id})
	}
	for i := range devs {
		devs[i].newest = decision(h.phone(t, devs[i].m, devs[i].id), ev.DesiredAccess_DESIRED_ACCESS_ALLOW, time.Now())
		if i%3 == 0 {
			devs[i].older = decision(devs[i].newest.GetPartnership(), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, time.Now().Add(-time.Minute))
		}
	}
	h.applier.take()
	other.applier.take()
	start := time.Now()
	for i, d := range devs {
		h.publish(t, d.newest, "")
		if d.older != nil {
			h.publish(t, d.older, "")
		}
		if i%4 == 0 {
			// A second copy, as a publisher retrying after the duplicate
			// window would send it: any replica may get it.
			h.publish(t, d.newest, "decided-again:"+d.newest.GetDecisionId())
		}
	}
	for _, d := range devs {
		if a := h.await(t, d.newest); outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
			t.Errorf("%s: %s %q", d.id, outcome(a), a.GetItems()[0].GetError())
		}
	}
	h.settle(t)
	took := time.Since(start)
	mine, theirs := len(h.applier.take()), len(other.applier.take())
	t.Logf("%d decisions (%d newest) on two replicas in %s; batches: %d and %d", n+n/3+n/4, n, took.Round(time.Millisecond), mine, theirs)
	if mine == 0 || theirs == 0 {
		t.Fatalf("one replica sent no batch (%d and %d): the test shows nothing about replicas", mine, theirs)
	}
	for _, d := range devs {
		// The older decision may have been claimed first (then it was sent
		// first); never after the newest, and each change at most once.
		calls := h.setCASFor(d.id)
		var allows, blocks []int
		for i, c := range calls {
			if adds(c, "ActiveSyncAllowedDeviceIDs", d.id) {
				allows = append(allows, i)
			}
			if adds(c, "ActiveSyncBlockedDeviceIDs", d.id) {
				blocks = append(blocks, i)
			}
		}
		if len(allows) != 1 || len(blocks) > 1 || len(blocks) == 1 && (d.older == nil || blocks[0] > allows[0]) || len(calls) != len(allows)+len(blocks) {
			t.Errorf("%s: Set-CASMailbox calls (allow at %v, block at %v), want the newest decision's once, after the older's if that went at all:%s", d.id, allows, blocks, callsOf(calls))
		}
		allowed, blocked := h.lists(t, d.m)
		if !slices.Contains(allowed, d.id) || slices.Contains(blocked, d.id) {
			t.Errorf("%s: allowed %q blocked %q, want allowed", d.id, allowed, blocked)
		}
		if r := h.reports(d.newest.GetDecisionId()); len(r) != 1 {
			t.Errorf("%s: %d reports of the newest decision, want 1", d.id, len(r))
		}
		if d.older != nil {
			want := ev.ApplyOutcome_APPLY_OUTCOME_SUPERSEDED
			if len(blocks) == 1 {
				want = ev.ApplyOutcome_APPLY_OUTCOME_APPLIED
			}
			if r := h.reports(d.older.GetDecisionId()); len(r) != 1 || outcome(r[0]) != want {
				t.Errorf("%s: the older decision was reported %v, want %s once", d.id, r, want)
			}
		}
	}
	if dl := h.dead.All(); len(dl) != 0 {
		t.Errorf("dead letters %v", dl)
	}
}

// A claim left by another instance holds the device back while that
// instance lives (its liveness lease is in the lease bucket), until the
// claim runs out; a claim of an instance whose lease is gone (it crashed)
// is taken over at once, not after ClaimTTL.
func TestClaimOfAnotherInstance(t *testing.T) {
	h := start(t, options{window: 50 * time.Millisecond})
	ctx := natstest.Context(t)
	applied, err := h.js.KeyValue(ctx, bus.BucketApplied)
	if err != nil {
		t.Fatal(err)
	}
	leases, err := h.js.KeyValue(ctx, bus.BucketLeases)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		alive bool
		claim time.Duration // how long the other instance's claim still runs
	}{
		{"the other instance crashed", false, time.Hour},
		{"the other instance lives", true, 3 * time.Second},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := h.boxes[i]
			dev := fmt.Sprintf("ApplGHOST%d", i)
			p := h.phone(t, m, dev)
			key, err := bus.StateKey(org, dev, ev.PartnershipID(p))
			if err != nil {
				t.Fatal(err)
			}
			nonce := fmt.Sprintf("%016x", i+0xfeed)
			until := time.Now().Add(tt.claim)
			if err := bus.Put(ctx, applied, key, &ev.AppliedRecord{ClaimDecisionId: "ghost-decision", ClaimDecidedAt: timestamppb.New(time.Now().Add(-time.Hour)),
				ClaimHolder: "ghost-host-4242-" + nonce, ClaimUntil: timestamppb.New(until)}); err != nil {
				t.Fatal(err)
			}
			if tt.alive {
				if _, err := leases.Put(ctx, "executor-"+nonce+"."+string(org), []byte(`{"holder":"ghost-host-4242-`+nonce+`"}`)); err != nil {
					t.Fatal(err)
				}
			}
			d := decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, time.Now())
			h.publish(t, d, "")
			a := h.await(t, d)
			if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
				t.Fatalf("outcome %s %q", outcome(a), a.GetItems()[0].GetError())
			}
			calls := h.setCASFor(dev)
			if len(calls) != 1 {
				t.Fatalf("%d Set-CASMailbox for %s:%s", len(calls), dev, callsOf(calls))
			}
			if tt.alive && calls[0].Time.Before(until) {
				t.Errorf("sent %s before the live instance's claim ran out", until.Sub(calls[0].Time))
			}
			if !tt.alive && !calls[0].Time.Before(until) {
				t.Errorf("sent at %s, after the claim of the crashed instance ran out (%s)", calls[0].Time, until)
			}
			if _, blocked := h.lists(t, m); !slices.Contains(blocked, dev) {
				t.Errorf("blocked %q", blocked)
			}
		})
	}
}
