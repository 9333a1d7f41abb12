package executor_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/budget"
	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/bus/bustest"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/executor"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
)

const org bus.Org = "contoso"

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// recordingApplier is the real Exchange client with a note of every batch
// the executor hands it: it forwards each call unchanged, so Exchange (the
// simulator) sees exactly what production would send. It only lets a test
// count ApplyAccess calls and see when one is under way.
type recordingApplier struct {
	client   *exchange.Client
	inflight atomic.Int32
	mu       sync.Mutex
	batches  [][]exchange.Change
}

func (a *recordingApplier) ApplyAccess(ctx context.Context, changes []exchange.Change) ([]exchange.ChangeResult, error) {
	a.mu.Lock()
	a.batches = append(a.batches, slices.Clone(changes))
	a.mu.Unlock()
	a.inflight.Add(1)
	defer a.inflight.Add(-1)
	return a.client.ApplyAccess(ctx, changes)
}

// SetDefaultAccessLevel changes the organisation's default on Exchange.
func (a *recordingApplier) SetDefaultAccessLevel(ctx context.Context, from, to string) (string, error) {
	return a.client.SetDefaultAccessLevel(ctx, from, to)
}

// RemovePartnership removes a partnership on Exchange.
func (a *recordingApplier) RemovePartnership(ctx context.Context, identity string) error {
	return a.client.RemovePartnership(ctx, identity)
}

// WipePartnership asks Exchange to wipe a device.
func (a *recordingApplier) WipePartnership(ctx context.Context, identity string, notify []string) error {
	return a.client.WipePartnership(ctx, identity, notify)
}

// take returns the batches recorded since the last take.
func (a *recordingApplier) take() [][]exchange.Change {
	a.mu.Lock()
	defer a.mu.Unlock()
	b := a.batches
	a.batches = nil
	return b
}

type options struct {
	window         time.Duration
	profile        exchangesim.Profile
	requestTimeout time.Duration
	parallel       int // handlers at once; 16 when 0
	mailboxes      int // seeded; 5 when 0
	budget         int // the pool takes its sessions from a shared budget of this many (0: none)
	allowRemove    bool
	allowWipe      bool
	lostReads      int // the first reads of the applied bucket go unanswered
}

// harness is one executor on a real JetStream server, applying decisions
// through the real Exchange client to a simulated Exchange organisation
// whose DefaultAccessLevel is Quarantine (as easguard enforces it).
type harness struct {
	sim      *exchangesim.Sim
	js       jetstream.JetStream
	pub      *bus.Publisher
	x        *executor.Executor
	client   *exchange.Client
	pool     *exchange.Pool
	applier  *recordingApplier
	user     string
	cas      string
	boxes    []*exchangesim.Mailbox
	consumer string

	applied *natstest.Received[*ev.AccessApplied]
	dead    *natstest.Received[bustest.DeadLetter[*ev.AccessDecided]]
}

func start(tb testing.TB, o options) *harness {
	tb.Helper()
	if o.window == 0 {
		o.window = 150 * time.Millisecond
	}
	if o.mailboxes == 0 {
		o.mailboxes = 5
	}
	sim := exchangesim.StartTest(tb, exchangesim.Config{Profile: o.profile, Seed: &exchangesim.SeedSpec{Mailboxes: o.mailboxes, Seed: 1, NoHostile: true}})
	if err := sim.Org.SetDefaultAccessLevel("Quarantine"); err != nil {
		tb.Fatal(err)
	}
	cfg := sim.ExchangeConfig(tb)
	if o.requestTimeout > 0 {
		cfg.RequestTimeout = o.requestTimeout
	}
	ctx := natstest.Context(tb)
	_, _, js := natstest.Start(tb)
	if err := bus.Provision(ctx, js, bus.DefaultTopology()); err != nil {
		tb.Fatal(err)
	}
	var popts []exchange.PoolOption
	if o.budget > 0 {
		kv, err := js.KeyValue(ctx, bus.BucketLeases)
		if err != nil {
			tb.Fatal(err)
		}
		slots, err := budget.New(ctx, kv, "exchange-session", org, o.budget, "executor-test", quiet())
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(slots.Close)
		popts = append(popts, exchange.WithSessionSlots(slots))
	}
	pool, err := exchange.NewPool(ctx, cfg, quiet(), popts...)
	if err != nil {
		tb.Fatalf("exchange pool: %v", err)
	}
	tb.Cleanup(func() { pool.Close(context.Background()) })
	h := &harness{sim: sim, js: js, user: cfg.User, cas: pool.Current(), pool: pool}
	h.client = exchange.NewClient(pool, cfg)
	h.applier = &recordingApplier{client: h.client}
	if o.parallel == 0 {
		o.parallel = 16
	}
	xcfg := executor.Config{Window: o.window, MaxBatch: 500, Parallel: o.parallel, ClaimTTL: time.Minute, AllowRemove: o.allowRemove, AllowWipe: o.allowWipe}
	if err := xcfg.Validate(); err != nil {
		tb.Fatal(err)
	}
	h.x, err = executor.New(ctx, js, org, xcfg, h.applier, pool.Current, cfg.User, quiet())
	if err != nil {
		tb.Fatal(err)
	}
	if o.lostReads > 0 {
		executor.WrapApplied(h.x, func(kv jetstream.KeyValue) jetstream.KeyValue {
			f := natstest.NewFaultyKV(kv)
			f.UnanswerReads(o.lostReads)
			return f
		})
	}
	runLiveness(tb, h.x)
	// As pkg/pipeline runs it: many handlers at once, one message each.
	r, err := bus.NewRunner(js, bus.RunnerConfig{Service: "executor", Org: org, Concurrency: xcfg.Parallel, Prefetch: 1,
		Retry:  bus.RetryPolicy{Initial: 100 * time.Millisecond, Max: time.Second, Multiplier: 2, Jitter: 0.1},
		Logger: quiet()}, h.x.Routes()...)
	if err != nil {
		tb.Fatal(err)
	}
	h.x.SetPublisher(r.Publisher())
	h.consumer = bus.DefaultTopology().ConsumerConfig("executor", "access-decided", bus.AccessDecided.Filter(org), org).Durable
	bustest.Run(tb, r)
	h.pub, err = bus.NewPublisher(js, bus.Instrumentation{})
	if err != nil {
		tb.Fatal(err)
	}
	h.applied = natstest.Receive[ev.AccessApplied](tb, js, bus.StreamApplied, bus.AccessApplied.Filter(org))
	h.dead = bustest.DeadLetters[ev.AccessDecided](tb, js, org, "executor")
	for _, m := range sim.Org.Mailboxes() {
		if !m.Monitoring {
			h.boxes = append(h.boxes, m)
		}
	}
	if len(h.boxes) < min(o.mailboxes, 5) {
		tb.Fatalf("seeded %d mailboxes", len(h.boxes))
	}
	return h
}

// mailboxOf is the mailbox as the collector reports it: GUID, canonical
// identity and addresses.
func mailboxOf(m *exchangesim.Mailbox) *ev.Mailbox {
	return &ev.Mailbox{Identity: m.Canonical(), Guid: m.GUID, PrimarySmtpAddress: m.PrimarySMTP, UserPrincipalName: m.UPN, DisplayName: m.DisplayName}
}

// phone lets a phone sync for the first time, which creates its
// partnership on Exchange, and returns the partnership as the collector
// would report it.
func (h *harness) phone(tb testing.TB, m *exchangesim.Mailbox, deviceID string) *ev.EASPartnership {
	tb.Helper()
	res := h.sync(tb, m, deviceID)
	if !res.Created {
		tb.Fatalf("phone %q of %s: partnership not created: %+v", deviceID, m.PrimarySMTP, res)
	}
	p := &ev.EASPartnership{Mailbox: mailboxOf(m), DeviceId: deviceID, DeviceType: "iPhone", DeviceModel: "iPhone15C2"}
	list, err := h.sim.Org.Partnerships(m.PrimarySMTP)
	if err != nil {
		tb.Fatal(err)
	}
	for _, x := range list {
		if x.DeviceID == deviceID {
			p.Identity = x.Identity
		}
	}
	for _, d := range m.Devices {
		if d.DeviceID == deviceID {
			p.Guid = d.GUID
		}
	}
	if p.Identity == "" || p.Guid == "" {
		tb.Fatalf("partnership of %q not found on Exchange", deviceID)
	}
	return p
}

// sync is one ActiveSync request of the phone: what access Exchange gives it now.
func (h *harness) sync(tb testing.TB, m *exchangesim.Mailbox, deviceID string) exchangesim.SyncResult {
	tb.Helper()
	res, err := h.sim.Org.Sync(exchangesim.Phone{Mailbox: m.PrimarySMTP, DeviceID: deviceID, DeviceType: "iPhone", DeviceModel: "iPhone15C2", DeviceOS: "iOS 17.4"})
	if err != nil {
		tb.Fatalf("sync %q: %v", deviceID, err)
	}
	return res
}

func (h *harness) lists(tb testing.TB, m *exchangesim.Mailbox) (allowed, blocked []string) {
	tb.Helper()
	allowed, blocked, err := h.sim.Org.Lists(m.PrimarySMTP)
	if err != nil {
		tb.Fatal(err)
	}
	return allowed, blocked
}

func (h *harness) setCAS() int { return h.sim.Recorder.Count("cmdlet:Set-CASMailbox") }

var ids atomic.Int64

func decision(p *ev.EASPartnership, desired ev.DesiredAccess, at time.Time) *ev.AccessDecided {
	return &ev.AccessDecided{
		Org: string(org), DecisionId: fmt.Sprintf("dec-%d-%d", time.Now().UnixNano(), ids.Add(1)), Partnership: p, Desired: desired,
		Rule: "unknown_device", Reason: "no MDM record", DecidedAt: timestamppb.New(at), PolicyVersion: "policy-7", SyncId: "sync-1",
	}
}

// publish sends a decision as the evaluator does (evaluator.DecisionOutbound);
// a msgID other than "" replaces its message id.
func (h *harness) publish(tb testing.TB, d *ev.AccessDecided, msgID string) {
	tb.Helper()
	out, err := evaluator.DecisionOutbound(org, d)
	if err != nil {
		tb.Fatal(err)
	}
	if msgID != "" {
		out.MsgID = msgID
	}
	if _, err := h.pub.Publish(context.Background(), out); err != nil {
		tb.Fatal(err)
	}
}

// reports returns the access.applied events about one decision.
func (h *harness) reports(decisionID string) []*ev.AccessApplied {
	var out []*ev.AccessApplied
	for _, a := range h.applied.All() {
		if slices.Contains(a.GetDecisionIds(), decisionID) {
			out = append(out, a)
		}
	}
	return out
}

// await waits for the access.applied of a decision.
func (h *harness) await(tb testing.TB, d *ev.AccessDecided) *ev.AccessApplied {
	tb.Helper()
	got := h.applied.Await(tb, 20*time.Second, "access.applied for "+d.GetDecisionId(), func(a *ev.AccessApplied) bool {
		return slices.Contains(a.GetDecisionIds(), d.GetDecisionId())
	})
	if len(got.GetItems()) != 1 {
		tb.Fatalf("access.applied with %d items: %v", len(got.GetItems()), got)
	}
	return got
}

// awaitDead waits for the dead letter of a decision.
func (h *harness) awaitDead(tb testing.TB, d *ev.AccessDecided) bustest.DeadLetter[*ev.AccessDecided] {
	tb.Helper()
	return h.dead.Await(tb, 20*time.Second, "dead letter for "+d.GetDecisionId(), func(dl bustest.DeadLetter[*ev.AccessDecided]) bool {
		return dl.Message.GetDecisionId() == d.GetDecisionId()
	})
}

// redeliveries counts how often decisions were delivered to the executor
// again; every decision in the stream is one it consumes.
func (h *harness) redeliveries(tb testing.TB) int {
	tb.Helper()
	return natstest.Redeliveries(tb, h.js, bus.StreamDecisions, h.consumer)
}

// settle waits until the executor has settled every decision published so
// far: nothing pending, nothing awaiting an ack. Handlers publish their
// outputs before the ack, so after settle every report is out.
func (h *harness) settle(tb testing.TB) {
	tb.Helper()
	natstest.WaitDrained(tb, h.js, 20*time.Second, bus.StreamDecisions)
}

func outcome(a *ev.AccessApplied) ev.ApplyOutcome { return a.GetItems()[0].GetOutcome() }

// param finds a parameter of an audited cmdlet invocation.
func param(inv *ev.CmdletInvocation, name string) *ev.CmdletParameter {
	for _, p := range inv.GetParameters() {
		if p.GetName() == name {
			return p
		}
	}
	return nil
}

// casCalls returns the calls of cmdlet Exchange received for one mailbox
// identity, with their parameters as sent.
func (h *harness) casCalls(cmdlet, identity string) []map[string]any {
	var out []map[string]any
	for _, r := range h.sim.Recorder.Records("cmdlet") {
		if r.Cmdlet != cmdlet {
			continue
		}
		var p map[string]any
		if json.Unmarshal(r.Params, &p) == nil && p["Identity"] == identity {
			out = append(out, p)
		}
	}
	return out
}

// A decision reaches Exchange's lists, the phone gets the access it
// asks for, and access.applied reports APPLIED with the cmdlet for audit.
func TestDecisionsReachExchange(t *testing.T) {
	h := start(t, options{})
	tests := []struct {
		name    string
		box     int
		before  exchange.Access // list placement before the decision; 0 = none
		desired ev.DesiredAccess
		allowed bool // the id ends up on the allowed list
		blocked bool // the id ends up on the blocked list
		state   string
		reason  string
		adds    string // the list the invocation adds to ("" = none)
	}{
		{"block", 0, 0, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, false, true, "Blocked", "Individual", "ActiveSyncBlockedDeviceIDs"},
		{"allow a blocked phone", 1, exchange.AccessBlock, ev.DesiredAccess_DESIRED_ACCESS_ALLOW, true, false, "Allowed", "Individual", "ActiveSyncAllowedDeviceIDs"},
		{"quarantine an allowed phone (unlist)", 2, exchange.AccessAllow, ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE, false, false, "Quarantined", "Global", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := h.boxes[tt.box]
			dev := "ApplDEV" + fmt.Sprint(tt.box)
			p := h.phone(t, m, dev)
			if tt.before != 0 {
				res, err := h.client.ApplyAccess(context.Background(), []exchange.Change{{Mailbox: m.GUID, DeviceID: dev, Access: tt.before}})
				if err != nil || res[0].Err != nil {
					t.Fatalf("set up %s: %v %v", tt.before, err, res[0].Err)
				}
			}
			before := h.setCAS()
			d := decision(p, tt.desired, time.Now())
			h.publish(t, d, "")
			a := h.await(t, d)

			if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED || a.GetItems()[0].GetError() != "" {
				t.Fatalf("outcome %s (%q), want APPLIED", outcome(a), a.GetItems()[0].GetError())
			}
			it := a.GetItems()[0]
			if it.GetDeviceId() != dev || it.GetDecisionId() != d.GetDecisionId() || it.GetDesired() != tt.desired || it.GetMailbox().GetGuid() != m.GUID {
				t.Errorf("item %v", it)
			}
			if a.GetOrg() != string(org) || a.GetActor() != h.user || a.GetCasServer() != h.cas || a.GetPolicyVersion() != "policy-7" || !a.GetAppliedAt().IsValid() {
				t.Errorf("report: org %q actor %q cas %q policy %q applied_at %v", a.GetOrg(), a.GetActor(), a.GetCasServer(), a.GetPolicyVersion(), a.GetAppliedAt())
			}
			if n := h.setCAS() - before; n != 1 {
				t.Errorf("%d Set-CASMailbox calls, want 1", n)
			}
			// The audit record names the call Exchange received.
			if len(a.GetCmdlets()) != 1 || a.GetCmdlets()[0].GetName() != "Set-CASMailbox" {
				t.Fatalf("cmdlets %v", a.GetCmdlets())
			}
			inv := a.GetCmdlets()[0]
			if id := param(inv, "Identity"); id == nil || !slices.Equal(id.GetValues(), []string{m.GUID}) {
				t.Errorf("Identity parameter %v, want %s", id, m.GUID)
			}
			for _, list := range []string{"ActiveSyncAllowedDeviceIDs", "ActiveSyncBlockedDeviceIDs"} {
				want := "Remove"
				if list == tt.adds {
					want = "Add"
				}
				if p := param(inv, list); p == nil || p.GetOperation() != want || !slices.Equal(p.GetValues(), []string{dev}) {
					t.Errorf("%s parameter %v, want %s %s", list, p, want, dev)
				}
			}
			calls := h.casCalls("Set-CASMailbox", m.GUID)
			if len(calls) == 0 {
				t.Fatalf("Exchange received no Set-CASMailbox for %s", m.GUID)
			}
			if last := fmt.Sprint(calls[len(calls)-1]); !strings.Contains(last, dev) {
				t.Errorf("Set-CASMailbox as received: %s", last)
			}

			allowed, blocked := h.lists(t, m)
			if slices.Contains(allowed, dev) != tt.allowed || slices.Contains(blocked, dev) != tt.blocked {
				t.Errorf("lists: allowed %q blocked %q", allowed, blocked)
			}
			if res := h.sync(t, m, dev); res.State != tt.state || res.Reason != tt.reason {
				t.Errorf("the phone syncs and gets %s/%s, want %s/%s", res.State, res.Reason, tt.state, tt.reason)
			}
		})
	}
}

// Decisions that arrive within the window go to Exchange as one batch
// with one Set-CASMailbox per mailbox; for one device, the newest decision
// (by DecidedAt, not by arrival) wins and the older is SUPERSEDED.
func TestDecisionsInOneWindowAreOneBatch(t *testing.T) {
	h := start(t, options{window: 600 * time.Millisecond})

	t.Run("several mailboxes", func(t *testing.T) {
		type want struct {
			m   *exchangesim.Mailbox
			dev string
			acc ev.DesiredAccess
		}
		var wants []want
		// Three phones of the first mailbox, one of each of three others.
		for i, box := range []int{0, 0, 0, 1, 2, 3} {
			acc := ev.DesiredAccess_DESIRED_ACCESS_BLOCK
			if i%2 == 1 {
				acc = ev.DesiredAccess_DESIRED_ACCESS_ALLOW
			}
			wants = append(wants, want{h.boxes[box], fmt.Sprintf("ApplBATCH%02d", i), acc})
		}
		var decisions []*ev.AccessDecided
		for _, w := range wants {
			decisions = append(decisions, decision(h.phone(t, w.m, w.dev), w.acc, time.Now()))
		}
		h.applier.take()
		before := h.setCAS()
		for _, d := range decisions {
			h.publish(t, d, "")
		}
		for _, d := range decisions {
			if a := h.await(t, d); outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
				t.Errorf("%s: %s %q", d.GetPartnership().GetDeviceId(), outcome(a), a.GetItems()[0].GetError())
			}
		}
		batches := h.applier.take()
		if len(batches) != 1 || len(batches[0]) != len(decisions) {
			var sizes []int
			for _, b := range batches {
				sizes = append(sizes, len(b))
			}
			t.Errorf("%d decisions went to Exchange in %d batches of %v, want one batch", len(decisions), len(batches), sizes)
		}
		if n := h.setCAS() - before; n != 4 {
			t.Errorf("%d Set-CASMailbox calls for %d decisions on 4 mailboxes, want 4 (one per mailbox)", n, len(decisions))
		}
		for _, w := range wants {
			allowed, blocked := h.lists(t, w.m)
			ok := slices.Contains(blocked, w.dev) && !slices.Contains(allowed, w.dev)
			if w.acc == ev.DesiredAccess_DESIRED_ACCESS_ALLOW {
				ok = slices.Contains(allowed, w.dev) && !slices.Contains(blocked, w.dev)
			}
			if !ok {
				t.Errorf("%s on %s: allowed %q blocked %q, want %s", w.dev, w.m.PrimarySMTP, allowed, blocked, w.acc)
			}
		}
	})

	t.Run("one device twice: the newest decision wins", func(t *testing.T) {
		m := h.boxes[4]
		p := h.phone(t, m, "ApplTWICE")
		now := time.Now()
		older := decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, now.Add(-time.Minute))
		newer := decision(p, ev.DesiredAccess_DESIRED_ACCESS_ALLOW, now)
		h.applier.take()
		before := h.setCAS()
		// The newer arrives first: decision time decides, not arrival.
		h.publish(t, newer, "")
		h.publish(t, older, "")
		if a := h.await(t, newer); outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
			t.Errorf("newer: %s %q", outcome(a), a.GetItems()[0].GetError())
		}
		a := h.await(t, older)
		if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_SUPERSEDED || !strings.Contains(a.GetItems()[0].GetError(), "superseded") {
			t.Errorf("older: %s %q, want SUPERSEDED", outcome(a), a.GetItems()[0].GetError())
		}
		if len(a.GetCmdlets()) != 0 {
			t.Errorf("a superseded decision reports cmdlets %v", a.GetCmdlets())
		}
		// Only the newer reaches Exchange: the batch claims the newest
		// decision per device, and the older is never sent.
		if b := h.applier.take(); len(b) != 1 || len(b[0]) != 1 || b[0][0].Access != exchange.AccessAllow {
			t.Errorf("batches %v, want one batch with the newer decision's change", b)
		}
		if n := h.setCAS() - before; n != 1 {
			t.Errorf("%d Set-CASMailbox calls, want 1", n)
		}
		if allowed, blocked := h.lists(t, m); !slices.Equal(allowed, []string{"ApplTWICE"}) || len(blocked) != 0 {
			t.Errorf("lists: allowed %q blocked %q, want the newer decision (allow)", allowed, blocked)
		}
	})
}

// A decision is applied once, whatever happens to it afterwards: a
// redelivery reports the first outcome without another Set-CASMailbox, a
// stale decision does not undo a newer one, a dry run changes nothing, and
// a mailbox that is gone is reported, not retried.
func TestAppliedOnceAndOnlyWhenCurrent(t *testing.T) {
	h := start(t, options{})

	t.Run("redelivered decision is not applied again", func(t *testing.T) {
		m := h.boxes[0]
		d := decision(h.phone(t, m, "ApplREDELIVER"), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, time.Now())
		h.publish(t, d, "")
		if a := h.await(t, d); outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
			t.Fatalf("first delivery: %s", outcome(a))
		}
		h.settle(t)
		calls := h.setCAS()
		// The same decision again, as a publisher retrying after its
		// duplicate window would send it.
		h.publish(t, d, "decided-again:"+d.GetDecisionId())
		h.settle(t)
		if n := h.setCAS() - calls; n != 0 {
			t.Errorf("the redelivery ran Set-CASMailbox %d more times", n)
		}
		if r := h.reports(d.GetDecisionId()); len(r) != 1 || outcome(r[0]) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
			t.Errorf("%d reports for the decision, want the one APPLIED: %v", len(r), r)
		}
		// What the handler answers a redelivery with: the original outcome.
		outs, err := h.x.Apply(context.Background(), d)
		if err != nil || len(outs) != 1 {
			t.Fatalf("apply again: %v %v", outs, err)
		}
		a := outs[0].Message.(*ev.AccessApplied)
		if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED || len(a.GetCmdlets()) != 0 || outs[0].MsgID != "applied:"+d.GetDecisionId() {
			t.Errorf("redelivery answered %s with cmdlets %v, msg id %q", outcome(a), a.GetCmdlets(), outs[0].MsgID)
		}
		if n := h.setCAS() - calls; n != 0 {
			t.Errorf("applying again ran Set-CASMailbox %d times", n)
		}
		if _, blocked := h.lists(t, m); !slices.Equal(blocked, []string{"ApplREDELIVER"}) {
			t.Errorf("blocked %q", blocked)
		}
	})

	t.Run("older decision after a newer one is superseded", func(t *testing.T) {
		m := h.boxes[1]
		p := h.phone(t, m, "ApplSTALE")
		now := time.Now()
		newer := decision(p, ev.DesiredAccess_DESIRED_ACCESS_ALLOW, now)
		older := decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, now.Add(-time.Minute))
		h.publish(t, newer, "")
		if a := h.await(t, newer); outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
			t.Fatalf("newer: %s", outcome(a))
		}
		calls := h.setCAS()
		h.publish(t, older, "")
		a := h.await(t, older)
		if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_SUPERSEDED || !strings.Contains(a.GetItems()[0].GetError(), newer.GetDecisionId()) {
			t.Errorf("older: %s %q, want SUPERSEDED naming %s", outcome(a), a.GetItems()[0].GetError(), newer.GetDecisionId())
		}
		if n := h.setCAS() - calls; n != 0 {
			t.Errorf("the stale decision ran Set-CASMailbox %d times", n)
		}
		if allowed, blocked := h.lists(t, m); !slices.Equal(allowed, []string{"ApplSTALE"}) || len(blocked) != 0 {
			t.Errorf("lists: allowed %q blocked %q", allowed, blocked)
		}
	})

	t.Run("dry run", func(t *testing.T) {
		m := h.boxes[2]
		d := decision(h.phone(t, m, "ApplDRYRUN"), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, time.Now())
		d.DryRun = true
		calls := h.setCAS()
		h.publish(t, d, "")
		a := h.await(t, d)
		if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_SKIPPED_DRY_RUN {
			t.Errorf("outcome %s, want SKIPPED_DRY_RUN", outcome(a))
		}
		// The report says what would have run.
		if len(a.GetCmdlets()) != 1 || param(a.GetCmdlets()[0], "ActiveSyncBlockedDeviceIDs").GetOperation() != "Add" {
			t.Errorf("cmdlets %v", a.GetCmdlets())
		}
		h.settle(t)
		if n := h.setCAS() - calls; n != 0 {
			t.Errorf("a dry run ran Set-CASMailbox %d times", n)
		}
		if allowed, blocked := h.lists(t, m); len(allowed)+len(blocked) != 0 {
			t.Errorf("lists changed: allowed %q blocked %q", allowed, blocked)
		}
		if res := h.sync(t, m, "ApplDRYRUN"); res.State != "Quarantined" {
			t.Errorf("phone %s", res.State)
		}
	})

	t.Run("mailbox not found", func(t *testing.T) {
		ghost := &ev.EASPartnership{Mailbox: &ev.Mailbox{Identity: "ghost.user@contoso.com", PrimarySmtpAddress: "ghost.user@contoso.com"},
			DeviceId: "ApplGHOST", DeviceType: "iPhone", Guid: "8a1f4c52-0000-4000-8000-00000000dead"}
		d := decision(ghost, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, time.Now())
		redelivered := h.redeliveries(t)
		calls := h.setCAS()
		h.publish(t, d, "")
		a := h.await(t, d)
		if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_NOT_FOUND || !strings.Contains(a.GetItems()[0].GetError(), "ghost.user@contoso.com") {
			t.Errorf("outcome %s %q, want NOT_FOUND naming the mailbox", outcome(a), a.GetItems()[0].GetError())
		}
		if len(a.GetCmdlets()) != 1 || a.GetCmdlets()[0].GetError() == "" {
			t.Errorf("the audited invocation does not carry Exchange's error: %v", a.GetCmdlets())
		}
		h.settle(t)
		// Its lists are read first (Get-CASMailbox), which finds no mailbox.
		if n := h.setCAS() - calls; n != 0 {
			t.Errorf("Set-CASMailbox ran %d times for a missing mailbox", n)
		}
		if n := len(h.casCalls("Get-CASMailbox", "ghost.user@contoso.com")); n != 1 {
			t.Errorf("Get-CASMailbox ran %d times for a missing mailbox, want once", n)
		}
		if n := h.redeliveries(t) - redelivered; n != 0 {
			t.Errorf("the decision was redelivered %d times", n)
		}
		if dl := h.dead.All(); len(dl) != 0 {
			t.Errorf("dead letters %v", dl)
		}
	})
}

// Device ids and mailbox identities come from phones and the directory:
// whatever they hold stays data. Exchange gets them byte for byte, or the
// decision is refused with the reason; nothing runs.
func TestHostileValuesStayData(t *testing.T) {
	h := start(t, options{})
	m := h.boxes[0]
	accepted := []struct{ name, id string }{
		{"single quote and subexpression", "it's'; $(Stop-Computer)"},
		{"typographic single quotes", "\u2018curly\u2019\u201Aid\u201B"},
		{"double quotes of every kind", "dq\"\u201C\u201D\u201Eid"},
		{"backticks", "`backtick`id"},
		{"subexpression", "$(Get-Process)"},
		{"separators and redirections", "a;b|c&d>e<f"},
		{"trailing dollar", "ends-with-dollar$"},
		{"looks like a parameter", "--Identity"},
		{"hashtable literal", "@{Add='x'}"},
		{"variable", "$env:USERNAME"},
		{"unicode", "Zoë-Müller-📱-設備"},
		{"exactly 32 characters", "0123456789ABCDEFGHIJKLMNOPQRSTUV"},
	}
	for _, tt := range accepted {
		t.Run("applied: "+tt.name, func(t *testing.T) {
			d := decision(h.phone(t, m, tt.id), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, time.Now())
			h.publish(t, d, "")
			a := h.await(t, d)
			if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
				t.Fatalf("outcome %s %q", outcome(a), a.GetItems()[0].GetError())
			}
			if a.GetItems()[0].GetDeviceId() != tt.id {
				t.Errorf("reported device id %q", a.GetItems()[0].GetDeviceId())
			}
			if p := param(a.GetCmdlets()[0], "ActiveSyncBlockedDeviceIDs"); p == nil || !slices.Equal(p.GetValues(), []string{tt.id}) {
				t.Errorf("audited parameter %v", p)
			}
			_, blocked := h.lists(t, m)
			if !slices.Contains(blocked, tt.id) {
				t.Errorf("%q is not on the blocked list byte for byte: %q", tt.id, blocked)
			}
			if res := h.sync(t, m, tt.id); res.State != "Blocked" || res.Reason != "Individual" {
				t.Errorf("the phone gets %s/%s", res.State, res.Reason)
			}
		})
	}
	// Nothing else reached the list: no value was split, re-quoted or evaluated.
	_, blocked := h.lists(t, m)
	if len(blocked) != len(accepted) {
		t.Errorf("blocked list has %d entries for %d ids: %q", len(blocked), len(accepted), blocked)
	}

	refused := []struct{ name, id, reason string }{
		{"line break", "line\nbreak", "control character"},
		{"NUL", "nul\x00byte", "control character"},
		{"33 characters", strings.Repeat("x", 33), "longer than 32 characters"},
	}
	for _, tt := range refused {
		t.Run("refused: "+tt.name, func(t *testing.T) {
			p := &ev.EASPartnership{Mailbox: mailboxOf(m), DeviceId: tt.id, DeviceType: "iPhone", Guid: fmt.Sprintf("guid-refused-%d", ids.Add(1))}
			d := decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, time.Now())
			calls, redelivered := h.setCAS(), h.redeliveries(t)
			h.publish(t, d, "")
			dl := h.awaitDead(t, d)
			if !strings.Contains(dl.Reason, tt.reason) {
				t.Errorf("dead-letter reason %q does not say %q", dl.Reason, tt.reason)
			}
			h.settle(t)
			if n := h.setCAS() - calls; n != 0 {
				t.Errorf("Set-CASMailbox ran %d times for a refused id", n)
			}
			if r := h.reports(d.GetDecisionId()); len(r) != 0 {
				t.Errorf("reported %v", r)
			}
			if n := h.redeliveries(t) - redelivered; n != 0 {
				t.Errorf("a refused decision was retried %d times", n)
			}
		})
	}

	mailboxes := []struct{ name, identity string }{
		{"statement injection", "alice'; Remove-Mailbox -Identity * -Confirm:$false; '"},
		{"subexpression", "$(Get-Mailbox | Remove-Mailbox)"},
		{"backtick escape", "bob`; Stop-Computer"},
	}
	for _, tt := range mailboxes {
		t.Run("mailbox: "+tt.name, func(t *testing.T) {
			p := &ev.EASPartnership{Mailbox: &ev.Mailbox{Identity: tt.identity}, DeviceId: "ApplHOSTILEMB", DeviceType: "iPhone", Guid: fmt.Sprintf("guid-mb-%d", ids.Add(1))}
			d := decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, time.Now())
			h.publish(t, d, "")
			a := h.await(t, d)
			if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_NOT_FOUND || !strings.Contains(a.GetItems()[0].GetError(), tt.identity) {
				t.Errorf("outcome %s %q, want NOT_FOUND quoting the identity exactly", outcome(a), a.GetItems()[0].GetError())
			}
			// The lists are read first, and the read finds no such mailbox.
			if calls := h.casCalls("Get-CASMailbox", tt.identity); len(calls) != 1 {
				t.Errorf("Exchange received %d Get-CASMailbox with the identity as one value", len(calls))
			}
		})
	}
	if n := len(h.sim.Org.Mailboxes()); n != 6 {
		t.Errorf("%d mailboxes left, want the 5 seeded and the monitoring mailbox", n)
	}
	for k, n := range h.sim.Recorder.Counts() {
		if strings.HasPrefix(k, "cmdlet:") && k != "cmdlet:Set-CASMailbox" && !strings.HasPrefix(k, "cmdlet:Get-") {
			t.Errorf("Exchange ran %s %d times", strings.TrimPrefix(k, "cmdlet:"), n)
		}
	}
}

// Exchange unreachable: the decision is retried (not dropped, not
// dead-lettered) and applied once the server answers again.
func TestExchangeDownIsRetried(t *testing.T) {
	h := start(t, options{requestTimeout: 2 * time.Second})
	m := h.boxes[0]
	d := decision(h.phone(t, m, "ApplDOWN"), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, time.Now())
	if _, err := h.sim.Inject(exchangesim.Fault{Endpoint: "EX01", Kind: "down"}); err != nil {
		t.Fatal(err)
	}
	h.publish(t, d, "")
	natstest.Eventually(t, 20*time.Second, "the decision to be redelivered", func() bool { return h.redeliveries(t) > 0 })
	if r := h.reports(d.GetDecisionId()); len(r) != 0 {
		t.Fatalf("reported while Exchange is down: %v", r)
	}
	if _, blocked := h.lists(t, m); len(blocked) != 0 {
		t.Fatalf("blocked %q while down", blocked)
	}
	if _, err := h.sim.Inject(exchangesim.Fault{Endpoint: "EX01", Kind: "up"}); err != nil {
		t.Fatal(err)
	}
	a := h.await(t, d)
	if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
		t.Fatalf("outcome %s %q", outcome(a), a.GetItems()[0].GetError())
	}
	if a.GetAttempts() < 2 {
		t.Errorf("attempts %d: the report must say it took retries", a.GetAttempts())
	}
	if _, blocked := h.lists(t, m); !slices.Equal(blocked, []string{"ApplDOWN"}) {
		t.Errorf("blocked %q", blocked)
	}
	if res := h.sync(t, m, "ApplDOWN"); res.State != "Blocked" {
		t.Errorf("phone %s", res.State)
	}
	if dl := h.dead.All(); len(dl) != 0 {
		t.Errorf("dead letters %v", dl)
	}
}

// A decision older than one being applied must not undo it: batches run
// one after the other, so an older decision submitted while the newer
// one's batch is in flight reaches Exchange after it.
func TestOlderDecisionDuringNewerBatchIsSuperseded(t *testing.T) {
	profile := exchangesim.TestProfile()
	profile.CmdletWrite = 500 * time.Millisecond // the newer batch stays in flight this long after Exchange changed
	h := start(t, options{window: 50 * time.Millisecond, profile: profile})
	m := h.boxes[0]
	p := h.phone(t, m, "ApplRACE")
	now := time.Now()
	newer := decision(p, ev.DesiredAccess_DESIRED_ACCESS_ALLOW, now)
	older := decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, now.Add(-time.Minute))
	h.publish(t, newer, "")
	natstest.Eventually(t, 10*time.Second, "the newer decision's batch in flight, applied on Exchange", func() bool {
		allowed, _ := h.lists(t, m)
		return h.applier.inflight.Load() == 1 && slices.Contains(allowed, "ApplRACE")
	})
	h.publish(t, older, "")
	if a := h.await(t, newer); outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
		t.Errorf("newer: %s", outcome(a))
	}
	a := h.await(t, older)
	h.settle(t)
	allowed, blocked := h.lists(t, m)
	if !slices.Equal(allowed, []string{"ApplRACE"}) || len(blocked) != 0 {
		t.Errorf("Exchange ends with allowed %q blocked %q: the older decision (block, %s) undid the newer (allow, %s)",
			allowed, blocked, older.GetDecisionId(), newer.GetDecisionId())
	}
	if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_SUPERSEDED {
		t.Errorf("older decision reported %s, want SUPERSEDED", outcome(a))
	}
}

// section is how the services embed the executor's settings, so that
// config.Load names them EASGUARD_EXECUTOR_*.
type section struct{ Executor executor.Config }

func (s *section) Validate() error { return s.Executor.Validate() }

// clearEnv unsets every EASGUARD_ variable for the test.
func clearEnv(t testing.TB) {
	t.Helper()
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, config.Prefix+"_") {
			t.Setenv(k, "")
			os.Unsetenv(k)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	clearEnv(t)
	var defaults section
	if err := config.Load(&defaults); err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	if defaults.Executor.Window != 10*time.Millisecond || defaults.Executor.MaxBatch != 500 || defaults.Executor.Parallel != 64 || defaults.Executor.ClaimTTL != 2*time.Minute {
		t.Fatalf("defaults %+v", defaults.Executor)
	}
	tests := []struct {
		name, env, value string
		mutate           func(*executor.Config)
	}{
		{"zero window", "EASGUARD_EXECUTOR_WINDOW", "0s", func(c *executor.Config) { c.Window = 0 }},
		{"negative window", "EASGUARD_EXECUTOR_WINDOW", "-1s", func(c *executor.Config) { c.Window = -time.Second }},
		{"window over 10s", "EASGUARD_EXECUTOR_WINDOW", "11s", func(c *executor.Config) { c.Window = 11 * time.Second }},
		{"zero batch", "EASGUARD_EXECUTOR_MAX_BATCH", "0", func(c *executor.Config) { c.MaxBatch = 0 }},
		{"negative batch", "EASGUARD_EXECUTOR_MAX_BATCH", "-5", func(c *executor.Config) { c.MaxBatch = -5 }},
		{"zero parallel", "EASGUARD_EXECUTOR_PARALLEL", "0", func(c *executor.Config) { c.Parallel = 0 }},
		{"claim ttl under 5s", "EASGUARD_EXECUTOR_CLAIM_TTL", "1s", func(c *executor.Config) { c.ClaimTTL = time.Second }},
		{"claim ttl over 1h", "EASGUARD_EXECUTOR_CLAIM_TTL", "2h", func(c *executor.Config) { c.ClaimTTL = 2 * time.Hour }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := defaults.Executor
			tt.mutate(&c)
			var fe *config.FieldError
			if err := c.Validate(); !errors.As(err, &fe) {
				t.Fatalf("Validate: %v, want a config.FieldError", err)
			}
			// Loaded from the environment, the error names the variable of
			// exactly the field that is wrong.
			clearEnv(t)
			t.Setenv(tt.env, tt.value)
			var s section
			err := config.Load(&s)
			if !errors.Is(err, config.ErrConfig) || !strings.Contains(err.Error(), tt.env+":") {
				t.Errorf("load: %v, want an error naming %s", err, tt.env)
			}
		})
	}
}

// Two batches go to Exchange at once when they share no mailbox: a
// decision that arrives while a slow batch is on Exchange is applied
// before that batch ends, while one for the batch's mailbox waits for it,
// so that one mailbox never has two Set-CASMailbox calls at once.
func TestSecondBatchInFlightUnlessItSharesAMailbox(t *testing.T) {
	profile := exchangesim.TestProfile()
	profile.CmdletWrite = 700 * time.Millisecond // Exchange changes the lists, then the call takes this long
	h := start(t, options{window: 20 * time.Millisecond, profile: profile})
	first := decision(h.phone(t, h.boxes[0], "ApplFIRST"), ev.DesiredAccess_DESIRED_ACCESS_ALLOW, time.Now())
	h.publish(t, first, "")
	natstest.Eventually(t, 10*time.Second, "the first batch on Exchange", func() bool {
		allowed, _ := h.lists(t, h.boxes[0])
		return h.applier.inflight.Load() == 1 && slices.Contains(allowed, "ApplFIRST")
	})
	same := decision(h.phone(t, h.boxes[0], "ApplSAME"), ev.DesiredAccess_DESIRED_ACCESS_ALLOW, time.Now())
	other := decision(h.phone(t, h.boxes[1], "ApplOTHER"), ev.DesiredAccess_DESIRED_ACCESS_ALLOW, time.Now())
	h.publish(t, same, "")
	h.publish(t, other, "")
	for _, d := range []*ev.AccessDecided{first, same, other} {
		if a := h.await(t, d); outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
			t.Fatalf("%s: %s %q", d.GetPartnership().GetDeviceId(), outcome(a), a.GetItems()[0].GetError())
		}
	}
	sets := map[string]exchangesim.Record{}
	for _, r := range h.sim.Recorder.Records("cmdlet") {
		for _, id := range []string{"ApplFIRST", "ApplSAME", "ApplOTHER"} {
			if r.Cmdlet == "Set-CASMailbox" && strings.Contains(string(r.Params), id) {
				sets[id] = r
			}
		}
	}
	if len(sets) != 3 {
		t.Fatalf("Set-CASMailbox calls found for %d of 3 devices: %v", len(sets), sets)
	}
	end := func(r exchangesim.Record) time.Time { return r.Time.Add(r.Duration) }
	if !sets["ApplOTHER"].Time.Before(end(sets["ApplFIRST"])) {
		t.Errorf("the other mailbox's change started %s after the first batch's Set-CASMailbox ended: it waited for a batch it shares nothing with",
			sets["ApplOTHER"].Time.Sub(end(sets["ApplFIRST"])))
	}
	if sets["ApplSAME"].Time.Before(end(sets["ApplFIRST"])) {
		t.Errorf("two Set-CASMailbox calls on %s at once: the second started %s before the first ended",
			h.boxes[0].PrimarySMTP, end(sets["ApplFIRST"]).Sub(sets["ApplSAME"].Time))
	}
}

// A role that lost Set-CASMailbox refuses every change while reads go on
// working, so only the executor sees it: the administrators are alerted
// once (the change is retried meanwhile), and the change goes through once
// the role is back.
func TestRefusedChangeIsAlerted(t *testing.T) {
	h := start(t, options{})
	alerts := natstest.Receive[ev.Alert](t, h.js, bus.StreamAlerts, bus.AlertRaised.Filter(org))
	var readOnly []string
	for _, c := range exchange.AllowedCmdlets {
		if c != "Set-CASMailbox" {
			readOnly = append(readOnly, c)
		}
	}
	h.sim.Org.Grant(readOnly)
	d := decision(h.phone(t, h.boxes[0], "ApplROLE0001"), ev.DesiredAccess_DESIRED_ACCESS_ALLOW, time.Now())
	h.publish(t, d, "")
	a := alerts.Await(t, 20*time.Second, "the alert", func(a *ev.Alert) bool { return true })
	if a.GetKind() != ev.AlertKind_ALERT_KIND_EXCHANGE_PERMISSION || a.GetSeverity() != ev.AlertSeverity_ALERT_SEVERITY_CRITICAL ||
		!strings.Contains(a.GetDetail()["error"], "Set-CASMailbox") {
		t.Errorf("alert %v", a)
	}
	natstest.Eventually(t, 20*time.Second, "a retry refused too", func() bool { return natstest.Redeliveries(t, h.js, bus.StreamDecisions, h.consumer) >= 2 })
	if n := alerts.Len(); n != 1 {
		t.Errorf("%d alerts for one refusing role, want 1", n)
	}
	h.sim.Org.Grant(nil) // the role is back
	if got := h.await(t, d); outcome(got) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
		t.Fatalf("after the role came back: %s", outcome(got))
	}
}

// A read of the applied bucket that is never answered (its request went
// to a stream leader that died; the new leader answers the next one) costs
// the claim one attempt's deadline, not the whole batch: with ClaimTTL a
// minute the batch would wait 48 s before giving up. Seen for real in the
// compose test as an 80 s stall after a NATS node was killed.
func TestUnansweredClaimReadCostsOneAttempt(t *testing.T) {
	h := start(t, options{lostReads: 1})
	m := h.boxes[0]
	p := h.phone(t, m, "ApplLOST0")
	d := decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, time.Now())
	began := time.Now()
	h.publish(t, d, "")
	a := h.await(t, d)
	if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
		t.Fatalf("outcome %s (%q), want APPLIED", outcome(a), a.GetItems()[0].GetError())
	}
	took := time.Since(began)
	if took > 15*time.Second {
		t.Errorf("applied after %s, want one claim attempt's deadline and a little more", took)
	}
	if _, blocked := h.lists(t, m); !slices.Contains(blocked, "ApplLOST0") {
		t.Errorf("blocked list %v lacks the phone", blocked)
	}
	t.Logf("applied %s after the decision, the first claim read unanswered", took.Round(time.Millisecond))
}
