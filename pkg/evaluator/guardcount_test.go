package evaluator_test

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/matcher"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// feeder plays the collector and the MDM source in front of the real
// matcher, so that the partnership index the guard counts from is written
// as in production, and publishes the matcher's verdicts to the evaluator.
type feeder struct {
	h *harness
	m *matcher.Matcher
}

func newFeeder(tb testing.TB, h *harness) *feeder {
	tb.Helper()
	m, err := matcher.New(natstest.Context(tb), h.js, org)
	if err != nil {
		tb.Fatal(err)
	}
	return &feeder{h: h, m: m}
}

func (f *feeder) send(outs []bus.Outbound) {
	f.h.t.Helper()
	for _, o := range outs {
		// The runner names a handler's outputs; here the test does.
		f.h.seq++
		o.MsgID = "test-feed-" + strconv.Itoa(f.h.seq)
		if _, err := f.h.pub.Publish(context.Background(), o); err != nil {
			f.h.t.Fatal(err)
		}
	}
}

// mdm reports d's MDM record, compliant or not; publish sends the
// matcher's re-match of d's partnerships (an MDM-window revocation) on.
func (f *feeder) mdm(d device, isCompliant, publish bool) {
	f.h.t.Helper()
	rec := compliant(d)
	if !isCompliant {
		rec = noncompliant(d)
	}
	outs, err := f.m.MDMChanged(context.Background(), &ev.MDMDeviceChanged{Org: string(org), Device: rec, ObservedAt: timestamppb.Now()})
	if err != nil {
		f.h.t.Fatal(err)
	}
	if publish {
		f.send(outs)
	}
}

// observe reports d as a sync pass saw it (gone: no longer there).
func (f *feeder) observe(d device, syncID string, gone bool) {
	f.h.t.Helper()
	change := ev.ObservationChange_OBSERVATION_CHANGE_NEW
	if gone {
		change = ev.ObservationChange_OBSERVATION_CHANGE_GONE
	}
	outs, err := f.m.Observed(context.Background(), &ev.EASPartnershipObserved{Org: string(org), Partnership: d.partnership(), ObservedAt: timestamppb.Now(),
		Change: change, Sync: &ev.SyncRef{SyncId: syncID, Kind: ev.SyncKind_SYNC_KIND_QUICK}})
	if err != nil {
		f.h.t.Fatal(err)
	}
	f.send(outs)
}

// counted asserts that every replica's guard count equals a full recount
// of both buckets, and that the recount is want.
func counted(t *testing.T, step string, want int, reps ...*evalReplica) {
	t.Helper()
	for _, r := range reps {
		view, recount, err := r.e.GuardCounts(natstest.Context(t))
		if err != nil {
			t.Fatalf("%s: %s: %v", step, r.name, err)
		}
		if view != recount || recount != want {
			t.Errorf("%s: %s counts %d with its view, %d by a full recount; want %d", step, r.name, view, recount, want)
		}
	}
}

// The guard's count of partnerships with mail, which each replica keeps
// in a view of the decision and partnership buckets, is the count a full
// recount of both finds, through decisions, revocations staged for a sync
// pass, refused (held) and released (MDM window), partnerships gone,
// undecided partnerships out of scope and one taken out of scope, a
// restart of the evaluator, and a lease takeover by a new replica.
func TestGuardCountMatchesRecount(t *testing.T) {
	const window = 400 * time.Millisecond
	path := policyFile(t, "scope:\n  exclude: {domains: [fabrikam.com]}\n")
	cfg := evaluator.Config{MDMWindow: window, PolicyFile: path}
	h, s, reps := replicaHarness(t, cfg, "replica-a", "replica-b")
	f := newFeeder(t, h)
	a, b := reps[0], reps[1]

	// 30 compliant phones allowed on their lists; four out of scope, two
	// of them allowed by the default (counted though never decided); four
	// unknown phones, quarantined, decided Block (no mail to take).
	var allowed, outside, unknown []device
	for i := range 30 {
		d := phone("user"+strconv.Itoa(i)+"@contoso.com", "ApplCOUNT"+strconv.Itoa(i), stAllowed, rsIndividual)
		f.mdm(d, true, false)
		allowed = append(allowed, d)
	}
	for i := range 4 {
		d := phone("guest"+strconv.Itoa(i)+"@fabrikam.com", "ApplGUEST"+strconv.Itoa(i), stAllowed, rsGlobal)
		if i >= 2 {
			d.state, d.reason = stBlocked, rsIndividual
		}
		outside = append(outside, d)
	}
	for i := range 4 {
		unknown = append(unknown, phone("new"+strconv.Itoa(i)+"@contoso.com", "ApplNEW"+strconv.Itoa(i), stQuarantined, rsGlobal))
	}
	for _, d := range append(append(append([]device{}, allowed...), outside...), unknown...) {
		f.observe(d, "p1", false)
	}
	h.syncCompleted("p1")
	h.settle()
	if n := len(h.newDecisions()); n != len(unknown) {
		t.Fatalf("%d decisions after the first pass, want %d (the unknown phones)", n, len(unknown))
	}
	counted(t, "first pass", 32, a, b)

	// Six phones fall out of compliance; a pass sees them: six
	// revocations staged (the guard adds those itself), then refused and
	// held (held devices keep their mail).
	for _, d := range allowed[1:7] {
		f.mdm(d, false, false)
		f.observe(d, "p2", false)
	}
	h.settle()
	if n := h.stagedCount(string(org) + ".sync.p2"); n != 6 {
		t.Fatalf("%d revocations staged, want 6", n)
	}
	counted(t, "six revocations staged", 26, a, b)
	h.syncCompleted("p2")
	natstest.Eventually(t, 20*time.Second, "p2 refused", func() bool {
		st, ok := h.guardStatus()
		return ok && st.Batch == "sync/p2" && st.State == "tripped" && h.stagedCount(string(org)+".sync") == 0
	})
	h.settle()
	counted(t, "six revocations held", 32, a, b)

	// One more falls out of compliance in an MDM window: under the
	// guard's minimum, released by the lease holder's loop.
	released := allowed[7]
	f.mdm(released, false, true)
	h.settle()
	natstest.Eventually(t, 20*time.Second, "the MDM window judged", func() bool {
		st, ok := h.guardStatus()
		rec, _ := h.decisionRecord(released)
		return ok && strings.HasPrefix(st.Batch, "mdm/") && h.stagedCount(string(org)+".mdm") == 0 && rec.GetDesired() == wantBlock && !rec.GetStaged()
	})
	h.settle()
	counted(t, "one revocation released", 31, a, b)

	// Partnerships gone from Exchange: an allowed one, an undecided one
	// that had mail, a blocked one.
	for _, d := range []device{allowed[8], outside[0], unknown[0]} {
		f.observe(d, "p3", true)
	}
	h.settle()
	counted(t, "three partnerships gone", 29, a, b)

	// The evaluator restarts: every replica stops, a new one starts.
	a.crash()
	b.stop()
	c := startReplica(t, s, cfg, "replica-c")
	counted(t, "after a restart", 29, c)

	// The released phone's mailbox leaves the scope: its record goes, and
	// Exchange still shows it allowed (its block was never applied here),
	// so it counts again, undecided.
	writePolicy(t, path, "scope:\n  exclude: {domains: [fabrikam.com], mailboxes: ["+released.mailbox+"]}\n", time.Now().Add(time.Second))
	natstest.Eventually(t, 20*time.Second, "the record of a partnership out of scope dropped", func() bool {
		f.observe(released, "p4", false)
		h.settle()
		_, ok := h.decisionRecord(released)
		return !ok
	})
	counted(t, "one out of scope", 30, c)

	// Another replica takes the lease over from one that crashed, and
	// judges: three phones fall out of compliance in one MDM window, 3 of
	// 30 is 10%, not over the share: released.
	natstest.Eventually(t, 3*leaseTTL, "replica-c holding the evaluator lease", func() bool { return h.holder() == "replica-c" })
	d := startReplica(t, s, cfg, "replica-d")
	c.crash()
	natstest.Eventually(t, 3*leaseTTL, "replica-d holding the evaluator lease", func() bool { return h.holder() == "replica-d" })
	counted(t, "after a takeover", 30, d)
	for _, dev := range allowed[9:12] {
		f.mdm(dev, false, true)
	}
	h.settle()
	natstest.Eventually(t, 20*time.Second, "the window judged by replica-d", func() bool {
		for _, dev := range allowed[9:12] {
			if rec, _ := h.decisionRecord(dev); rec.GetDesired() != wantBlock || rec.GetStaged() || rec.GetHeld() {
				return false
			}
		}
		return h.stagedCount(string(org)+".mdm") == 0
	})
	h.settle()
	counted(t, "three revocations released after the takeover", 27, d)
}

// On a three-node cluster (R3 buckets) the guard's view counts what a full
// recount finds for its own organisation only, while another organisation
// writes to the same buckets, and again after the node leading the
// decisions bucket is killed and another takes over.
func TestGuardCountOnClusterPerOrganisation(t *testing.T) {
	c := natstest.StartCluster(t, 3)
	ctx := natstest.Context(t)
	topo := bus.DefaultTopology()
	topo.Replicas = 3
	// The leader of the decisions bucket is killed below: connect through
	// another node.
	_, probe := c.Connect(t, 0)
	retry(t, "provision", func(ctx context.Context) error { return bus.Provision(ctx, probe, topo) })
	var leader string
	retry(t, "the decisions bucket's leader", func(ctx context.Context) error {
		s, err := probe.Stream(ctx, "KV_"+bus.BucketDecisions)
		if err != nil {
			return err
		}
		if cl := s.CachedInfo().Cluster; cl != nil && cl.Leader != "" {
			leader = cl.Leader
			return nil
		}
		return errors.New("no leader yet")
	})
	via, victim := 0, 0
	for i := range c.Size() {
		if c.Name(i) == leader {
			victim = i
		}
	}
	if victim == 0 {
		via = 1
	}
	_, js := c.Connect(t, via)
	orgs := []bus.Org{org, "fabrikam"}
	evals := map[bus.Org]*evaluator.Evaluator{}
	for _, o := range orgs {
		e, err := evaluator.New(ctx, js, o, testConfig(evaluator.Config{}), slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		evals[o] = e
		// Run bounds the views' life: they stay up from one count to the
		// next, through the leader change.
		rctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); _ = e.Run(rctx) }()
		t.Cleanup(func() { cancel(); <-done })
	}
	decisions, err := js.KeyValue(ctx, bus.BucketDecisions)
	if err != nil {
		t.Fatal(err)
	}
	parts, err := js.KeyValue(ctx, bus.BucketPartnerships)
	if err != nil {
		t.Fatal(err)
	}
	// write stores, for o, devices [from, to): each in the index (allowed
	// by Exchange when i is even), decided Allow when i%3 == 0, Block when
	// i%3 == 1, undecided otherwise. It returns how many have mail.
	write := func(o bus.Org, from, to int) int {
		t.Helper()
		n := 0
		for i := from; i < to; i++ {
			dev := "ApplCLUSTER" + strconv.Itoa(i)
			d := phone("user"+strconv.Itoa(i)+"@"+string(o)+".com", dev, stBlocked, rsIndividual)
			if i%2 == 0 {
				d.state = stAllowed
			}
			p := d.partnership()
			id := ev.PartnershipID(p)
			ik, err := bus.StateKey(o, dev)
			if err != nil {
				t.Fatal(err)
			}
			dk, err := bus.StateKey(o, dev, id)
			if err != nil {
				t.Fatal(err)
			}
			retry(t, "index "+ik, func(ctx context.Context) error {
				return bus.Put(ctx, parts, ik, &ev.PartnershipIndex{ById: map[string]*ev.EASPartnershipObserved{id: {Org: string(o), Partnership: p, ObservedAt: timestamppb.Now()}}})
			})
			switch i % 3 {
			case 0:
				retry(t, "decide "+dk, func(ctx context.Context) error {
					return bus.Put(ctx, decisions, dk, &ev.DecisionRecord{Desired: wantAllow, DecisionId: "allow-" + dev})
				})
				n++
			case 1:
				retry(t, "decide "+dk, func(ctx context.Context) error {
					return bus.Put(ctx, decisions, dk, &ev.DecisionRecord{Desired: wantBlock, DecisionId: "block-" + dev})
				})
			default:
				if i%2 == 0 {
					n++
				}
			}
		}
		return n
	}
	want := map[bus.Org]int{}
	check := func(step string) {
		t.Helper()
		for _, o := range orgs {
			var view, recount int
			retry(t, step+" count of "+string(o), func(ctx context.Context) (err error) {
				view, recount, err = evals[o].GuardCounts(ctx)
				return err
			})
			if view != recount || recount != want[o] {
				t.Errorf("%s: %s counts %d with its view, %d by a full recount; want %d", step, o, view, recount, want[o])
			}
		}
	}
	want[org] = write(org, 0, 30)
	want["fabrikam"] = write("fabrikam", 0, 12)
	check("two organisations")
	want["fabrikam"] += write("fabrikam", 12, 40)
	check("the other organisation grew")

	c.Kill(victim)
	c.WaitReady(t, time.Minute)
	want[org] += write(org, 30, 45)
	check("after the decisions bucket's leader was killed")
}

// retry runs fn until it succeeds, for calls that fail while a cluster
// elects a leader.
func retry(tb testing.TB, what string, fn func(ctx context.Context) error) {
	tb.Helper()
	var err error
	natstest.Eventually(tb, time.Minute, what, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err = fn(ctx)
		return err == nil
	})
}

// A record the guard cannot read stops its count, as it stopped the full
// recount: the guard must not judge with a base it could not establish.
// Once the record is readable again, the count is whole.
func TestGuardCountRefusesAnUnreadableRecord(t *testing.T) {
	h := start(t, evaluator.Config{})
	ctx := natstest.Context(t)
	ds := h.fleet(3)
	if _, err := h.decisions.Put(ctx, ds[0].key(t), []byte("not a record")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := h.e.GuardCounts(ctx); err == nil || !strings.Contains(err.Error(), ds[0].key(t)) {
		t.Fatalf("count with an unreadable record: err %v, want one that names %s", err, ds[0].key(t))
	}
	if err := bus.Put(ctx, h.decisions, ds[0].key(t), &ev.DecisionRecord{Desired: wantAllow}); err != nil {
		t.Fatal(err)
	}
	view, recount, err := h.e.GuardCounts(ctx)
	if err != nil || view != 3 || recount != 3 {
		t.Fatalf("count once the record is readable: view %d, recount %d, err %v; want 3", view, recount, err)
	}
}
