package evaluator_test

import (
	"context"
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
