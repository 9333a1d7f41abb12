package evaluator_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/natsembed"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// leaseTTL is the lease TTL of the replica tests: short, so that a
// takeover is quick to show.
const leaseTTL = 2 * time.Second

// evalReplica is one replica of the evaluator as `easguard run` runs it:
// its own NATS connection, runner (bound to the shared durable consumers)
// and background loop, which campaigns for the evaluator lease.
type evalReplica struct {
	name   string
	nc     *nats.Conn
	e      *evaluator.Evaluator
	logs   *logSink
	cancel context.CancelFunc
	done   chan struct{}
}

// startReplica starts a replica on server s.
func startReplica(tb testing.TB, s *natsembed.Server, cfg evaluator.Config, name string) *evalReplica {
	tb.Helper()
	nc, js := natstest.Connect(tb, s)
	r := &evalReplica{name: name, nc: nc, logs: &logSink{}, done: make(chan struct{})}
	log := slog.New(r.logs)
	var err error
	if r.e, err = evaluator.New(natstest.Context(tb), js, org, testConfig(cfg), log); err != nil {
		tb.Fatal(err)
	}
	r.e.SetInstance(name)
	run, err := bus.NewRunner(js, bus.RunnerConfig{Service: "evaluator", Org: org, Logger: log, DrainTimeout: time.Second}, r.e.Routes()...)
	if err != nil {
		tb.Fatal(err)
	}
	r.e.SetPublisher(run.Publisher())
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() {
		defer close(r.done)
		loop := make(chan struct{})
		go func() { defer close(loop); _ = r.e.Run(ctx) }()
		_ = run.Run(ctx)
		<-loop
	}()
	tb.Cleanup(r.stop)
	natstest.Eventually(tb, 10*time.Second, name+" ready", func() bool { return run.Ready() == nil })
	return r
}

// stop ends the replica; idempotent.
func (r *evalReplica) stop() {
	r.cancel()
	<-r.done
}

// crash stops the replica as a crash would: its connection goes first, so
// it cannot release its lease, which must run out.
func (r *evalReplica) crash() {
	r.nc.Close()
	r.stop()
}

// replicaHarness is a harness whose evaluator is several replicas; the
// test's own publishing and reading goes over its own connection.
func replicaHarness(tb testing.TB, cfg evaluator.Config, names ...string) (*harness, *natsembed.Server, []*evalReplica) {
	tb.Helper()
	s := natstest.Server(tb)
	_, js := natstest.Connect(tb, s)
	ctx := natstest.Context(tb)
	topo := bus.DefaultTopology()
	topo.LeaseTTL = leaseTTL
	if err := bus.Provision(ctx, js, topo); err != nil {
		tb.Fatal(err)
	}
	var reps []*evalReplica
	for _, n := range names {
		reps = append(reps, startReplica(tb, s, cfg, n))
	}
	h := observe(tb, js, &logSink{})
	return h, s, reps
}

// holder names the replica holding the org's evaluator lease ("" none).
func (h *harness) holder() string {
	h.t.Helper()
	ctx := context.Background()
	kv, err := h.js.KeyValue(ctx, bus.BucketLeases)
	if err != nil {
		h.t.Fatal(err)
	}
	l, err := bus.NewLease(ctx, kv, "evaluator", org, "observer", nil)
	if err != nil {
		h.t.Fatal(err)
	}
	name, err := l.Holder(ctx)
	if err != nil {
		h.t.Fatal(err)
	}
	return name
}

// syncCompletedTwice reports the end of a pass twice, under two message
// ids, as a collector retrying after the duplicate window would: the two
// copies may reach two replicas at once.
func (h *harness) syncCompletedTwice(id string) {
	h.t.Helper()
	subject, err := bus.SyncCompleted.Subject(org, "")
	if err != nil {
		h.t.Fatal(err)
	}
	for i := range 2 {
		if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subject, MsgID: fmt.Sprintf("test-sync-%s-%d", id, i), Message: &ev.SyncCompleted{
			Org: string(org), SyncId: id, Kind: ev.SyncKind_SYNC_KIND_QUICK, Success: true, StartedAt: timestamppb.Now(), FinishedAt: timestamppb.Now(),
		}}); err != nil {
			h.t.Fatal(err)
		}
	}
}

// trips counts the guard decisions that refused a batch, over replicas.
func trips(reps []*evalReplica) int {
	n := 0
	for _, r := range reps {
		n += r.logs.count("blast-radius guard tripped")
	}
	return n
}

// With two replicas of the evaluator, a mass revocation over the guard's
// share is refused by exactly one guard decision, whole: no part of it is
// released, whether it comes from MDM changes (judged by the loop of the
// lease holder) or from a sync pass whose end is reported twice (judged by
// whichever replicas get the reports).
func TestReplicasGuardHoldsMassRevocationOnce(t *testing.T) {
	const window = 400 * time.Millisecond
	h, _, reps := replicaHarness(t, evaluator.Config{MDMWindow: window}, "replica-a", "replica-b")
	ds := h.fleet(40)
	const revs = 20

	tests := []struct {
		name   string
		revoke []device
		judge  func() string // sends what ends the batch; returns the batch's name
	}{
		{"MDM changes over two windows", ds[:revs], nil},
		{"a sync pass reported twice", ds[revs:], func() string { h.syncCompletedTwice("pass-1"); return "sync/pass-1" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := trips(reps)
			var batch string
			if tt.judge == nil {
				// In windows that have not begun yet, so that none is judged
				// before all have arrived; the burst straddles two windows.
				w := time.Now().UnixNano()/int64(window) + 3
				at := time.Unix(0, w*int64(window)+int64(window)/2)
				for i, d := range tt.revoke {
					if i == len(tt.revoke)/2 {
						at = at.Add(window)
					}
					h.publish(matched(d, how{mdm: noncompliant(d), trigger: "mdm", matched: at.Add(time.Duration(i) * time.Millisecond)}))
				}
				batch = fmt.Sprintf("mdm/%d", w)
			} else {
				for _, d := range tt.revoke {
					h.publish(matched(d, how{mdm: noncompliant(d), syncID: "pass-1"}))
				}
			}
			h.settle()
			none(t, h.newDecisions(), "revocations before their batch was judged")
			if tt.judge != nil {
				batch = tt.judge()
			}
			natstest.Eventually(t, 20*time.Second, batch+" judged", func() bool {
				st, ok := h.guardStatus()
				return ok && st.Batch == batch && h.stagedCount(string(org)+".mdm") == 0 && h.stagedCount(string(org)+".sync") == 0
			})
			h.settle()
			none(t, h.newDecisions(), "a mass revocation over the share (no part of it may be released)")
			if n := trips(reps) - before; n != 1 {
				t.Errorf("%d guard decisions refused the batch, want exactly one", n)
			}
			if tt.judge == nil {
				// MDM windows are judged by the loop, which only the lease
				// holder runs.
				holder := h.holder()
				for _, r := range reps {
					if n := r.logs.count("blast-radius guard tripped"); n > 0 && r.name != holder {
						t.Errorf("%s judged the MDM window, but %q holds the evaluator lease", r.name, holder)
					}
				}
			}
			alerts := h.newAlerts()
			if len(alerts) != 1 || alerts[0].GetKind() != ev.AlertKind_ALERT_KIND_BLAST_RADIUS || alerts[0].GetDetail()["revocations"] != fmt.Sprint(revs) {
				t.Errorf("alerts %v, want one blast-radius alert for %d revocations", alerts, revs)
			}
			if st, _ := h.guardStatus(); st.State != "tripped" || st.Revocations != revs {
				t.Errorf("guard status %+v, want tripped on all %d", st, revs)
			}
			for _, d := range tt.revoke {
				if rec, _ := h.decisionRecord(d); !rec.GetHeld() || rec.GetStaged() {
					t.Errorf("%s: held %v staged %v, want held", d.id, rec.GetHeld(), rec.GetStaged())
				}
			}
		})
	}
}

// The guard loop runs in one replica, the lease holder; when it stops
// without a word (its connection gone, its lease not released), another
// replica takes the loop over within the lease TTL and judges the next
// MDM window.
func TestReplicasGuardLoopTakeover(t *testing.T) {
	const window = 400 * time.Millisecond
	h, s, reps := replicaHarness(t, evaluator.Config{MDMWindow: window}, "replica-a")
	a := reps[0]
	natstest.Eventually(t, 10*time.Second, "replica-a holding the evaluator lease", func() bool { return h.holder() == "replica-a" })
	b := startReplica(t, s, evaluator.Config{MDMWindow: window}, "replica-b")
	ds := h.fleet(10)
	if got := h.holder(); got != "replica-a" {
		t.Fatalf("lease holder %q after a second replica started, want replica-a", got)
	}

	crashed := time.Now()
	a.crash()
	natstest.Eventually(t, 3*leaseTTL, "replica-b holding the evaluator lease", func() bool { return h.holder() == "replica-b" })
	took := time.Since(crashed)
	t.Logf("replica-b took the guard loop over %s after replica-a stopped (lease TTL %s)", took.Round(time.Millisecond), leaseTTL)
	if took > leaseTTL {
		t.Errorf("takeover took %s, more than the lease TTL %s", took, leaseTTL)
	}

	// The new holder's loop judges an MDM window: one revocation, under
	// the guard's minimum, released.
	d := ds[0]
	w := time.Now().UnixNano()/int64(window) + 1
	h.publish(matched(d, how{mdm: noncompliant(d), trigger: "mdm", matched: time.Unix(0, w*int64(window)+int64(window)/2)}))
	natstest.Eventually(t, 10*time.Second, "the window judged by replica-b's loop", func() bool {
		st, ok := h.guardStatus()
		return ok && st.Batch == fmt.Sprintf("mdm/%d", w)
	})
	h.settle()
	if got := only(t, h.newDecisions(), "one revocation under the minimum"); got.GetDesired() != wantBlock || got.GetPartnership().GetDeviceId() != d.id {
		t.Errorf("released %v", got)
	}
	_ = b
}

// A guard decision that refused a batch and stopped half-way (its replica
// died after it marked the revocations held, having dropped only some of
// the staged entries) is not finished by the next one as a judgement of
// the entries left: judged alone, those few would be under the guard's
// minimum and released, and their devices would lose mail although the
// guard refused the batch they belong to.
func TestReplicasGuardDecisionStoppedHalfWay(t *testing.T) {
	h, _, _ := replicaHarness(t, evaluator.Config{}, "replica-a", "replica-b")
	ctx := natstest.Context(t)
	ds := h.fleet(40)
	const revs = 20
	for _, d := range ds[:revs] {
		h.publish(matched(d, how{mdm: noncompliant(d), syncID: "pass-1"}))
	}
	h.settle()
	none(t, h.newDecisions(), "revocations before their pass completed")
	staged, err := h.js.KeyValue(ctx, bus.BucketStaged)
	if err != nil {
		t.Fatal(err)
	}
	// What the first guard decision left: every record held, the staged
	// entries dropped but for two (under the guard's minimum of three).
	for i, d := range ds[:revs] {
		if _, err := bus.Modify(ctx, h.decisions, d.key(t), func(rec *ev.DecisionRecord, exists bool) (bus.Change, error) {
			if !exists || !rec.GetStaged() {
				return bus.Keep, fmt.Errorf("%s not staged: %v", d.id, rec)
			}
			rec.Staged, rec.Held = false, true
			return bus.Write, nil
		}); err != nil {
			t.Fatal(err)
		}
		if i >= 2 {
			key, err := bus.StateKey(org, "sync", "pass-1", d.id, strings.ToLower(d.guid()))
			if err != nil {
				t.Fatal(err)
			}
			if err := staged.Delete(ctx, key); err != nil {
				t.Fatalf("drop %s: %v", key, err)
			}
		}
	}
	if n := h.stagedCount(string(org) + ".sync.pass-1"); n != 2 {
		t.Fatalf("%d staged entries left, want 2", n)
	}
	// The pass's end is delivered again (the first guard decision never
	// acknowledged it).
	h.syncCompleted("pass-1")
	natstest.Eventually(t, 20*time.Second, "the staged entries left dropped", func() bool { return h.stagedCount(string(org)+".sync") == 0 })
	h.settle()
	none(t, h.newDecisions(), "what a refused batch left (releasing it would take mail from devices the guard held)")
	for _, d := range ds[:revs] {
		if rec, _ := h.decisionRecord(d); !rec.GetHeld() {
			t.Errorf("%s: no longer held", d.id)
		}
	}
}
