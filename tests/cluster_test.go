package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/tests/exchangesim"
)

// waveSize is the onboarding wave of the cluster test: partnerships, one
// per mailbox, nine in ten enrolled and compliant.
const waveSize = 1000

// clusterLeaseTTL is the worker processes' lease TTL on the cluster.
const clusterLeaseTTL = 15 * time.Second

// waveDevice is one phone of the wave and what the policy says for it.
type waveDevice struct {
	phone    exchangesim.Phone
	mailbox  *exchangesim.Mailbox
	enrolled bool
}

// easguard split into worker processes on a real three-node JetStream
// cluster (R3 streams and buckets), two replicas each of matcher,
// evaluator and executor, takes an onboarding wave of 1,000 partnerships
// that appear while their MDM records arrive, and loses one NATS node the
// hard way in the middle of it; then the whole cluster is stopped and
// started again with work still in flight. Nothing is lost, nothing is
// applied twice, and every phone ends as the policy says: enrolled and
// compliant allowed, unknown blocked with one mail to its user.
//
// What reached Exchange is read from the simulator's record, per device:
// an enrolled phone gets one allow, or, when its partnership was judged
// before its MDM record arrived, one block and then one allow; an unknown
// phone gets one block. Any other sequence is a lost, repeated or
// reordered application.
func TestClusterWaveSurvivesNodeLossAndFullRestart(t *testing.T) {
	began := time.Now()
	c := natstest.StartCluster(t, 3)
	provisionCluster(t, c)
	s := startStack(t, stackOptions{natsURL: c.URL(), replicas: 3, workers: []string{},
		seed: &exchangesim.SeedSpec{Mailboxes: waveSize, Seed: 11, NoHostile: true}})
	var collector *process
	for _, w := range []string{pipeline.Matcher, pipeline.Matcher, pipeline.Evaluator, pipeline.Evaluator,
		pipeline.Executor, pipeline.Executor, pipeline.Collector, pipeline.MDM, pipeline.Mailer} {
		env := append(s.processEnv(w),
			// The production lease TTL, not the tests' 2s: a leader
			// election after a node's hard death takes seconds (4 to 9
			// of Raft election timeout), and a lease shorter than that
			// hands the collector's duty around, each new holder
			// starting over with a listing, instead of riding it out.
			"EASGUARD_LEASE_TTL="+clusterLeaseTTL.String(),
			// One clock for the simulator and every process: a quick
			// sync need not read back the tests' minute, which would
			// publish every partnership of the wave again each second.
			"EASGUARD_COLLECTOR_QUICK_OVERLAP=2s")
		p := start(t, env...)
		p.waitReady(t)
		if w == pipeline.Collector {
			collector = p
		}
	}
	s.waitFullSync()
	t.Logf("cluster, stack and 9 worker processes ready in %s", time.Since(began).Round(time.Millisecond))

	var wave []waveDevice
	var inventory []managedDevice
	for _, mb := range s.sim.Org.Mailboxes() {
		if len(wave) == waveSize {
			break
		}
		if mb.PrimarySMTP == "alice@contoso.com" || mb.PrimarySMTP == "bob@contoso.com" || mb.PrimarySMTP == "carol@contoso.com" {
			continue
		}
		i := len(wave)
		d := waveDevice{phone: iPhone(mb.PrimarySMTP, fmt.Sprintf("ApplWAVE%06d", i)), mailbox: mb, enrolled: i%10 != 0}
		wave = append(wave, d)
		if d.enrolled {
			inventory = append(inventory, compliant(fmt.Sprintf("mdm-wave-%d", i), mb.UPN, d.phone.DeviceID))
		}
	}
	if len(wave) != waveSize {
		t.Fatalf("%d mailboxes for a wave of %d", len(wave), waveSize)
	}
	done := func() int {
		n := 0
		for _, d := range wave {
			allowed, blocked, err := s.sim.Org.Lists(d.phone.Mailbox)
			if err != nil {
				continue
			}
			inA, inB := containsFold(allowed, d.phone.DeviceID), containsFold(blocked, d.phone.DeviceID)
			if d.enrolled && inA && !inB || !d.enrolled && inB && !inA {
				n++
			}
		}
		return n
	}
	progress := startProgress(t, 100*time.Millisecond, done)

	// The wave: every 100 ms ten phones start syncing and, at the same
	// moment, the MDM export is rewritten with their records, so that
	// partnerships and their MDM records reach the two matchers
	// interleaved, in either order.
	start := time.Now()
	half := make(chan struct{})
	waveDone := make(chan error, 1)
	go func() {
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		var exported []managedDevice
		for i := 0; i < len(wave); i += 10 {
			<-tick.C
			if i == waveSize/2 {
				close(half)
			}
			batch := wave[i:min(i+10, len(wave))]
			for _, d := range batch {
				if d.enrolled {
					exported = append(exported, inventory[len(exported)])
				}
			}
			if err := s.tryWriteInventory(exported...); err != nil {
				waveDone <- err
				return
			}
			for _, d := range batch {
				if _, err := s.sim.Org.Sync(d.phone); err != nil {
					waveDone <- fmt.Errorf("phone %s: %w", d.phone.DeviceID, err)
					return
				}
			}
		}
		waveDone <- nil
	}()
	<-half
	victim := busiestNode(t, s, c)
	killedAt := time.Now()
	c.Kill(victim)
	t.Logf("killed NATS node %s (leader of the most streams and buckets) %s into the wave, %d of %d devices done",
		c.Name(victim), killedAt.Sub(start).Round(time.Millisecond), progress.at(killedAt), waveSize)
	if err := <-waveDone; err != nil {
		t.Fatal(err)
	}
	// Stop the whole cluster with work still in flight.
	natstest.Eventually(t, 3*time.Minute, "three quarters of the wave done on two nodes", func() bool { return done() >= waveSize*3/4 })
	stoppedAt := time.Now()
	before := progress.at(stoppedAt)
	c.StopAll()
	c.StartAll()
	readyAt := time.Now()
	t.Logf("stopped all three nodes at %d of %d devices done, %s into the wave; cluster ready again after %s",
		before, waveSize, stoppedAt.Sub(start).Round(time.Millisecond), readyAt.Sub(stoppedAt).Round(time.Millisecond))

	if !waitFor(3*time.Minute, func() bool { return done() == waveSize }) {
		applied := appliedPerDevice(t, s.sim)
		var stuck []string
		for _, d := range wave {
			allowed, blocked, _ := s.sim.Org.Lists(d.phone.Mailbox)
			if d.enrolled && containsFold(allowed, d.phone.DeviceID) && !containsFold(blocked, d.phone.DeviceID) ||
				!d.enrolled && containsFold(blocked, d.phone.DeviceID) && !containsFold(allowed, d.phone.DeviceID) {
				continue
			}
			stuck = append(stuck, fmt.Sprintf("%s (enrolled %v): applied %v, allowed %v, blocked %v",
				d.phone.DeviceID, d.enrolled, applied[strings.ToLower(d.phone.DeviceID)], allowed, blocked))
		}
		t.Fatalf("after 3m, %d devices not as the policy says; the first:\n%s", len(stuck), strings.Join(stuck[:min(len(stuck), 20)], "\n"))
	}
	finished := time.Now()
	// With no more sync passes, the pipeline runs dry: what the workers
	// will ever do about the wave is then done and can be counted.
	collector.stop(t)
	s.drained()
	progress.stop()
	t.Logf("wave of %d done %s after it began; first progress %s after the kill; the full stop: cluster down or electing for %s, first progress %s after it was ready; longest stall %s",
		waveSize, finished.Sub(start).Round(time.Millisecond), progress.stall(killedAt).Round(time.Millisecond),
		readyAt.Sub(stoppedAt).Round(time.Millisecond), progress.stall(readyAt).Round(time.Millisecond), progress.longestStall(start, finished).Round(time.Millisecond))

	// What reached Exchange, per device.
	applied := appliedPerDevice(t, s.sim)
	blockedFirst := 0
	for _, d := range wave {
		got := applied[strings.ToLower(d.phone.DeviceID)]
		switch {
		case d.enrolled && slices.Equal(got, []string{"allow"}):
		case d.enrolled && slices.Equal(got, []string{"block", "allow"}):
			blockedFirst++
		case !d.enrolled && slices.Equal(got, []string{"block"}):
		default:
			t.Errorf("%s (enrolled %v): Set-CASMailbox applied %v", d.phone.DeviceID, d.enrolled, got)
		}
		allowed, blocked, err := s.sim.Org.Lists(d.phone.Mailbox)
		if err != nil {
			t.Fatal(err)
		}
		if want := d.enrolled; containsFold(allowed, d.phone.DeviceID) != want || containsFold(blocked, d.phone.DeviceID) == want {
			t.Errorf("%s (enrolled %v): allowed %v, blocked %v", d.phone.DeviceID, d.enrolled, allowed, blocked)
		}
		r := s.phoneSync(d.phone)
		if want := map[bool]string{true: "Allowed", false: "Blocked"}[d.enrolled]; r.State != want {
			t.Errorf("%s (enrolled %v): the phone sees %s", d.phone.DeviceID, d.enrolled, r.State)
		}
		ids := map[string]bool{}
		for _, m := range s.mailsTo(d.phone.Mailbox) {
			ids[m.MessageID] = true
		}
		if !d.enrolled && len(ids) != 1 || d.enrolled && len(ids) > 1 {
			t.Errorf("%s (enrolled %v): %d mails", d.phone.DeviceID, d.enrolled, len(ids))
		}
		if t.Failed() && len(applied) > 0 && blockedFirst > 20 {
			break // enough said
		}
	}
	t.Logf("%d enrolled phones were judged before their MDM record arrived (blocked, then allowed)", blockedFirst)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dlq, err := s.svc.JS.Stream(ctx, bus.StreamDLQ)
	if err != nil {
		t.Fatal(err)
	}
	if n := dlq.CachedInfo().State.Msgs; n != 0 {
		t.Errorf("%d dead letters: %v", n, s.events.deadLetters())
	}
	t.Logf("test took %s", time.Since(began).Round(time.Millisecond))
}

// provisionCluster creates the streams and buckets an operator would
// before starting easguard, retrying while the fresh cluster settles: the
// first creation of two dozen R3 groups on a loaded machine under the race
// detector can outlast a service's 30 s provisioning deadline. The topology
// is the stack's (startStack), so its own provisioning finds it current.
func provisionCluster(t *testing.T, c *natstest.Cluster) {
	t.Helper()
	nc, err := nats.Connect(c.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	common := config.Common{NatsReplicas: 3, LeaseTTL: testLeaseTTL, AckWait: testAckWait, Retention: time.Hour}
	natstest.Eventually(t, 3*time.Minute, "the topology provisioned on the cluster", func() bool {
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		defer cancel()
		err := bus.Provision(ctx, js, common.Topology())
		if err != nil {
			t.Logf("provision: %v; again", err)
		}
		return err == nil
	})
}

// drained waits until every consumer of the pipeline's streams has
// acknowledged all it was given and the guard holds nothing: what the
// workers will ever do about the wave is done. The matchers still work
// off the collector's last passes (every allow re-stamps a partnership,
// which the next quick sync reports changed): under the race detector
// that backlog takes over a minute. (settle also waits for the
// streams to stop growing, which on a cluster, where each look takes a
// round of stream infos through the leaders, the collector's quick syncs
// every second never allow.)
func (s *stack) drained() {
	s.t.Helper()
	natstest.WaitDrained(s.t, s.svc.JS, 3*time.Minute, bus.StreamEAS, bus.StreamMDM, bus.StreamMatch, bus.StreamDecisions, bus.StreamApplied, bus.StreamNotify)
	ctx := s.t.Context()
	staged, err := s.svc.JS.KeyValue(ctx, bus.BucketStaged)
	if err != nil {
		s.t.Fatal(err)
	}
	natstest.Eventually(s.t, 3*time.Minute, "nothing staged for the guard", func() bool {
		keys, err := staged.ListKeys(ctx)
		if err != nil {
			return false
		}
		for range keys.Keys() {
			return false
		}
		return true
	})
}

// busiestNode returns the node that leads the most of easguard's streams
// and buckets: killing it makes the most groups elect a new leader.
func busiestNode(t *testing.T, s *stack, c *natstest.Cluster) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	led := map[string]int{}
	names := s.svc.JS.StreamNames(ctx)
	for name := range names.Name() {
		st, err := s.svc.JS.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if cl := st.CachedInfo().Cluster; cl != nil {
			led[cl.Leader]++
		}
	}
	if err := names.Err(); err != nil {
		t.Fatal(err)
	}
	best := 0
	for i := range c.Size() {
		if led[c.Name(i)] > led[c.Name(best)] {
			best = i
		}
	}
	return best
}

// appliedPerDevice reads the simulator's record: for each device id (lower
// case), what the successful Set-CASMailbox calls that named it did, in
// order: "allow" (added to the allowed list) or "block" (to the blocked).
func appliedPerDevice(t *testing.T, sim *exchangesim.Sim) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, r := range sim.Recorder.Records("cmdlet") {
		if r.Cmdlet != "Set-CASMailbox" || !r.OK {
			continue
		}
		var params map[string]json.RawMessage
		if err := json.Unmarshal(r.Params, &params); err != nil {
			t.Fatalf("Set-CASMailbox params %s: %v", r.Params, err)
		}
		for key, effect := range map[string]string{"ActiveSyncAllowedDeviceIDs": "allow", "ActiveSyncBlockedDeviceIDs": "block"} {
			raw, ok := params[key]
			if !ok {
				continue
			}
			var mv struct{ Add, Remove []string }
			if err := json.Unmarshal(raw, &mv); err != nil {
				t.Fatalf("Set-CASMailbox %s %s: %v", key, raw, err)
			}
			for _, id := range mv.Add {
				out[strings.ToLower(id)] = append(out[strings.ToLower(id)], effect)
			}
		}
	}
	return out
}

// progress samples how many devices are done (every interval given to
// startProgress), so the test can say how long the pipeline stalled after a fault.
type progress struct {
	mu      sync.Mutex
	samples []sample
	quit    chan struct{}
	stopped chan struct{}
}

type sample struct {
	at   time.Time
	done int
}

func startProgress(t testing.TB, every time.Duration, done func() int) *progress {
	p := &progress{quit: make(chan struct{}), stopped: make(chan struct{})}
	go func() {
		defer close(p.stopped)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			n := done()
			p.mu.Lock()
			p.samples = append(p.samples, sample{time.Now(), n})
			p.mu.Unlock()
			select {
			case <-p.quit:
				return
			case <-tick.C:
			}
		}
	}()
	t.Cleanup(p.stop)
	return p
}

func (p *progress) stop() {
	select {
	case <-p.quit:
	default:
		close(p.quit)
	}
	<-p.stopped
}

// at returns the count last sampled at or before t.
func (p *progress) at(t time.Time) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, s := range p.samples {
		if s.at.After(t) {
			break
		}
		n = s.done
	}
	return n
}

// stall returns how long after t the count first grew.
func (p *progress) stall(t time.Time) time.Duration {
	base := p.at(t)
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range p.samples {
		if s.at.After(t) && s.done > base {
			return s.at.Sub(t)
		}
	}
	return -1
}

// longestStall returns the longest time between two increases of the
// count from one time to another.
func (p *progress) longestStall(from, to time.Time) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	var longest time.Duration
	last, n := from, -1
	for _, s := range p.samples {
		if s.at.Before(from) || s.at.After(to) {
			continue
		}
		if s.done != n {
			longest = max(longest, s.at.Sub(last))
			last, n = s.at, s.done
		}
	}
	return longest
}

// waitFor polls cond every 100 ms until it holds or timeout passes; it is
// natstest.Eventually for a caller that explains a timeout itself.
func waitFor(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		<-tick.C
	}
	return true
}

// containsFold reports whether list holds id, compared as Exchange
// compares device ids: without regard to case.
func containsFold(list []string, id string) bool {
	return slices.ContainsFunc(list, func(v string) bool { return strings.EqualFold(v, id) })
}
