package collector_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/bus/bustest"
	"github.com/easguard/easguard/pkg/collector"
	"github.com/easguard/easguard/pkg/config/configtest"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
)

const org bus.Org = "contoso"

const (
	full  = ev.SyncKind_SYNC_KIND_FULL
	quick = ev.SyncKind_SYNC_KIND_QUICK
)

var quiet = slog.New(slog.DiscardHandler)

// options shape one collector under test.
type options struct {
	cfg      collector.Config       // zero fields take test defaults
	exchange func(*exchange.Config) // changes easguard's Exchange settings
	clock    func() time.Time       // the collector's clock; nil: time.Now
	// policy, when set, starts an evaluator (default policy, dry run as
	// given) so that the org's policy status is published as in production.
	policy *bool
}

// harness is a collector on a real JetStream server, reading a simulated
// Exchange organisation through easguard's own WinRM client.
type harness struct {
	t      testing.TB
	sim    *exchangesim.Sim
	client *exchange.Client
	js     jetstream.JetStream
	pub    *bus.Publisher
	status jetstream.KeyValue
	c      *collector.Collector

	observed  *natstest.Received[*ev.EASPartnershipObserved]
	confirmed *natstest.Received[*ev.EASPartnershipsConfirmed]
	completed *natstest.Received[*ev.SyncCompleted]
}

func testConfig(cfg collector.Config) collector.Config {
	if cfg.QuickInterval == 0 {
		cfg.QuickInterval = 5 * time.Minute
	}
	if cfg.FullInterval == 0 {
		cfg.FullInterval = 24 * time.Hour
	}
	if cfg.QuickOverlap == 0 {
		cfg.QuickOverlap = 2 * time.Minute
	}
	return cfg
}

func start(tb testing.TB, o options) *harness {
	tb.Helper()
	ctx := natstest.Context(tb)
	sim := exchangesim.StartTest(tb, exchangesim.Config{Seed: &exchangesim.SeedSpec{Mailboxes: 20, Partnerships: 30, Seed: 1, NoHostile: true}})
	xcfg := sim.ExchangeConfig(tb)
	xcfg.Workers = 2
	if o.exchange != nil {
		o.exchange(&xcfg)
	}
	pool, err := exchange.NewPool(ctx, xcfg, quiet)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { pool.Close(context.Background()) })
	client := exchange.NewClient(pool, xcfg)

	_, _, js := natstest.Start(tb)
	if err := bus.Provision(ctx, js, bus.DefaultTopology()); err != nil {
		tb.Fatal(err)
	}
	pub, err := bus.NewPublisher(js, bus.Instrumentation{})
	if err != nil {
		tb.Fatal(err)
	}
	if o.policy != nil {
		if _, err := evaluator.New(ctx, js, org, evaluator.Config{DryRun: *o.policy, BlastRadius: 0.1, BlastMinimum: 3, MDMWindow: 3 * time.Second}, quiet); err != nil {
			tb.Fatal(err)
		}
	}
	c, err := collector.New(ctx, js, org, testConfig(o.cfg), client, pub, pool.Current, quiet)
	if err != nil {
		tb.Fatal(err)
	}
	if o.clock != nil {
		collector.SetClock(c, o.clock)
	}
	h := &harness{t: tb, sim: sim, client: client, js: js, pub: pub, c: c}
	if h.status, err = js.KeyValue(ctx, bus.BucketStatus); err != nil {
		tb.Fatal(err)
	}
	h.observed = natstest.Receive[ev.EASPartnershipObserved](tb, js, bus.StreamEAS, bus.EASObserved.Filter(org))
	h.confirmed = natstest.Receive[ev.EASPartnershipsConfirmed](tb, js, bus.StreamEAS, bus.EASConfirmed.Filter(org))
	h.completed = natstest.Receive[ev.SyncCompleted](tb, js, bus.StreamSync, bus.SyncCompleted.Filter(org))
	return h
}

// sync runs one sync pass that must succeed, and returns its
// sync.completed as published, once every observation of it has arrived.
func (h *harness) sync(kind ev.SyncKind, id string) *ev.SyncCompleted {
	h.t.Helper()
	done, err := h.c.Sync(natstest.Context(h.t), kind, id, "test")
	if err != nil {
		h.t.Fatalf("sync %s: %v", id, err)
	}
	got := h.completedOf(id)
	if !proto.Equal(got, done) {
		h.t.Fatalf("sync %s: published %v, returned %v", id, got, done)
	}
	if !got.GetSuccess() || got.GetKind() != kind || got.GetCounts().GetFailed() != 0 || len(got.GetErrors()) != 0 {
		h.t.Fatalf("sync %s: %v", id, got)
	}
	h.observationsOf(id, int(got.GetCounts().GetObserved()+got.GetCounts().GetGone()))
	return got
}

// completedOf waits for the sync.completed of a pass.
func (h *harness) completedOf(id string) *ev.SyncCompleted {
	h.t.Helper()
	return h.completed.Await(h.t, 30*time.Second, "sync.completed of "+id, func(c *ev.SyncCompleted) bool {
		return c.GetSyncId() == id
	})
}

// observationsOf waits for the n observations of a pass and returns them:
// those sent alone and those confirmed in pages, each page as the
// observations it stands for.
func (h *harness) observationsOf(id string, n int) []*ev.EASPartnershipObserved {
	h.t.Helper()
	var got []*ev.EASPartnershipObserved
	natstest.Eventually(h.t, 10*time.Second, fmt.Sprintf("%d observations of %s", n, id), func() bool {
		got = got[:0]
		for _, o := range h.observed.All() {
			if o.GetSync().GetSyncId() == id {
				got = append(got, o)
			}
		}
		for _, c := range h.confirmed.All() {
			if c.GetSync().GetSyncId() == id {
				got = append(got, c.Observations()...)
			}
		}
		return len(got) >= n
	})
	if len(got) != n {
		h.t.Fatalf("%d observations of %s, want %d", len(got), id, n)
	}
	return got
}

// syncStatus reads the sync record under key (status.SyncLastKey,
// status.SyncOKKey).
func (h *harness) syncStatus(key string) (status.Sync, bool) {
	h.t.Helper()
	st, ok, err := status.Get[status.Sync](context.Background(), h.status, org, key)
	if err != nil {
		h.t.Fatal(err)
	}
	return st, ok
}

// partnerships lists what the simulated organisation holds.
func (h *harness) partnerships() []exchangesim.Partnership {
	h.t.Helper()
	ps, err := h.sim.Org.Partnerships("")
	if err != nil {
		h.t.Fatal(err)
	}
	return ps
}

// visible lists the partnerships a collector can see: Get-MobileDevice
// hides the monitoring mailboxes' health probes unless asked for them,
// and -ActiveSync leaves out OWA for Devices.
func (h *harness) visible() []exchangesim.Partnership {
	h.t.Helper()
	var out []exchangesim.Partnership
	for _, p := range h.partnerships() {
		if p.ListedByActiveSync() {
			out = append(out, p)
		}
	}
	return out
}

// newPhone makes a phone sync for the first time, creating a partnership.
func (h *harness) newPhone(mailbox, id string) {
	h.t.Helper()
	res, err := h.sim.Org.Sync(exchangesim.Phone{Mailbox: mailbox, DeviceID: id, DeviceType: "iPhone", DeviceModel: "iPhone15,2",
		DeviceOS: "iOS 17.4 21E219", UserAgent: "Apple-iPhone15C2/2104.183", ActiveSyncVersion: "16.1"})
	if err != nil || !res.Created {
		h.t.Fatalf("phone %s of %s: %+v, %v", id, mailbox, res, err)
	}
}

func byChange(obs []*ev.EASPartnershipObserved) map[ev.ObservationChange][]*ev.EASPartnershipObserved {
	m := map[ev.ObservationChange][]*ev.EASPartnershipObserved{}
	for _, o := range obs {
		m[o.GetChange()] = append(m[o.GetChange()], o)
	}
	return m
}

func checkCounts(tb testing.TB, what string, got *ev.SyncCounts, want *ev.SyncCounts) {
	tb.Helper()
	if !proto.Equal(got, want) {
		tb.Fatalf("%s: counts %v, want %v", what, got, want)
	}
}

// A full sync reports every partnership, as new the first time, unchanged
// after, and changed when Exchange's view of it changed.
func TestFullSyncReportsChanges(t *testing.T) {
	t.Parallel()
	h := start(t, options{})
	ctx := natstest.Context(t)
	parts := h.visible()
	n := int64(len(parts))
	// Mailboxes are every recipient with a partnership, probes included.
	mailboxes := map[string]bool{}
	for _, p := range h.partnerships() {
		mailboxes[p.Mailbox] = true
	}
	if n < 25 {
		t.Fatalf("the seeded organisation has %d visible partnerships", n)
	}

	first := h.sync(full, "full-1")
	checkCounts(t, "first full sync", first.GetCounts(), &ev.SyncCounts{Observed: n, New: n, Mailboxes: int64(len(mailboxes))})
	for _, o := range h.observationsOf("full-1", int(n)) {
		p := o.GetPartnership()
		if o.GetChange() != ev.ObservationChange_OBSERVATION_CHANGE_NEW || o.GetSync().GetKind() != full || o.GetOrg() != string(org) ||
			p.GetGuid() == "" || p.GetDeviceId() == "" || p.GetMailbox().GetPrimarySmtpAddress() == "" || !o.GetObservedAt().IsValid() ||
			p.GetDeviceAccessState() == ev.DeviceAccessState_DEVICE_ACCESS_STATE_UNSPECIFIED {
			t.Fatalf("first full sync: %v", o)
		}
	}
	st, ok := h.syncStatus(status.SyncOKKey("full"))
	if !ok || st.SyncID != "full-1" || !st.Success || st.Counts["new"] != n || st.Kind != "full" || st.Server == "" {
		t.Fatalf("status full.ok %+v", st)
	}

	second := h.sync(full, "full-2")
	checkCounts(t, "second full sync", second.GetCounts(), &ev.SyncCounts{Observed: n, Unchanged: n, Mailboxes: int64(len(mailboxes))})
	// Unchanged, every partnership goes in pages, none alone.
	h.observationsOf("full-2", int(n))
	for _, o := range h.observed.All() {
		if o.GetSync().GetSyncId() == "full-2" {
			t.Fatalf("second full sync: %s sent alone although unchanged", o.GetPartnership().GetDeviceId())
		}
	}
	for _, c := range h.confirmed.All() {
		if c.GetSync().GetSyncId() == "full-2" && (c.GetPage() != 1 || len(c.GetPartnerships()) != int(n) || c.Validate() != nil) {
			t.Fatalf("second full sync: page %d of %d partnerships (%v), want one page of %d", c.GetPage(), len(c.GetPartnerships()), c.Validate(), n)
		}
	}

	// An administrator blocks one phone; another phone syncs for the first time.
	victim := allowedByDefault(t, parts)
	res, err := h.client.ApplyAccess(ctx, []exchange.Change{{Mailbox: victim.PrimarySMTP, DeviceID: victim.DeviceID, Access: exchange.AccessBlock}})
	if err != nil || len(res) != 1 || res[0].Err != nil {
		t.Fatalf("block %s: %v %v", victim.DeviceID, res, err)
	}
	h.newPhone(parts[0].PrimarySMTP, "TestPhone0001")

	third := h.sync(full, "full-3")
	checkCounts(t, "third full sync", third.GetCounts(), &ev.SyncCounts{Observed: n + 1, New: 1, Changed: 1, Unchanged: n - 1, Mailboxes: int64(len(mailboxes))})
	changes := byChange(h.observationsOf("full-3", int(n+1)))
	if c := changes[ev.ObservationChange_OBSERVATION_CHANGE_CHANGED]; len(c) != 1 || c[0].GetPartnership().GetDeviceId() != victim.DeviceID ||
		c[0].GetPartnership().GetDeviceAccessState() != ev.DeviceAccessState_DEVICE_ACCESS_STATE_BLOCKED ||
		c[0].GetPartnership().GetDeviceAccessStateReason() != ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_INDIVIDUAL {
		t.Fatalf("changed: %v", c)
	}
	if c := changes[ev.ObservationChange_OBSERVATION_CHANGE_NEW]; len(c) != 1 || c[0].GetPartnership().GetDeviceId() != "TestPhone0001" {
		t.Fatalf("new: %v", c)
	}
}

// A partnership removed from Exchange is reported gone by the next full
// sync, once; quick syncs do not look for removals.
func TestRemovedPartnershipReportedGoneOnce(t *testing.T) {
	t.Parallel()
	h := start(t, options{})
	ctx := natstest.Context(t)
	parts := h.visible()
	n := int64(len(parts))
	h.sync(full, "full-1")

	victim := parts[len(parts)/2]
	if err := h.client.RemovePartnership(ctx, victim.Identity); err != nil {
		t.Fatalf("remove %s: %v", victim.Identity, err)
	}
	if left := int64(len(h.visible())); left != n-1 {
		t.Fatalf("%d partnerships left after removing one of %d", left, n)
	}

	q := h.sync(quick, "quick-1")
	if q.GetCounts().GetGone() != 0 {
		t.Fatalf("quick sync reported removals: %v", q.GetCounts())
	}

	second := h.sync(full, "full-2")
	if c := second.GetCounts(); c.GetGone() != 1 || c.GetObserved() != n-1 || c.GetUnchanged() != n-1 {
		t.Fatalf("full sync after the removal: %v", c)
	}
	gone := byChange(h.observationsOf("full-2", int(n)))[ev.ObservationChange_OBSERVATION_CHANGE_GONE]
	if len(gone) != 1 || gone[0].GetPartnership().GetDeviceId() != victim.DeviceID || gone[0].GetPartnership().GetIdentity() != victim.Identity {
		t.Fatalf("gone: %v, want %s", gone, victim.Identity)
	}

	third := h.sync(full, "full-3")
	if c := third.GetCounts(); c.GetGone() != 0 || c.GetObserved() != n-1 {
		t.Fatalf("second full sync after the removal: %v", c)
	}
	if g := byChange(h.observationsOf("full-3", int(n-1)))[ev.ObservationChange_OBSERVATION_CHANGE_GONE]; len(g) != 0 {
		t.Fatalf("reported gone twice: %v", g)
	}
}

// A quick sync reads only partnerships first synced since the last sync
// began, less the overlap, which covers a collector clock that runs ahead
// of Exchange's; what it misses, the next full sync finds.
func TestQuickSyncReportsOnlyNew(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name     string
		ahead    time.Duration // how far the collector's clock runs ahead of Exchange's
		overlap  time.Duration
		reported bool
	}{
		{"same clock", 0, 2 * time.Minute, true},
		{"collector ahead within the overlap", time.Minute, 2 * time.Minute, true},
		{"collector ahead beyond the overlap", 3 * time.Minute, 2 * time.Minute, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, options{cfg: collector.Config{QuickOverlap: tc.overlap}, clock: func() time.Time { return time.Now().Add(tc.ahead) }})
			parts := h.visible()
			n := int64(len(parts))
			h.sync(full, "full-1")
			h.newPhone(parts[0].PrimarySMTP, "TestPhone0001")

			q := h.sync(quick, "quick-1")
			if !tc.reported {
				checkCounts(t, "quick sync", q.GetCounts(), &ev.SyncCounts{})
			} else {
				checkCounts(t, "quick sync", q.GetCounts(), &ev.SyncCounts{Observed: 1, New: 1})
				o := h.observationsOf("quick-1", 1)[0]
				if o.GetPartnership().GetDeviceId() != "TestPhone0001" || o.GetChange() != ev.ObservationChange_OBSERVATION_CHANGE_NEW || o.GetSync().GetKind() != quick ||
					o.GetPartnership().GetMailbox().GetPrimarySmtpAddress() != parts[0].PrimarySMTP {
					t.Fatalf("quick sync: %v", o)
				}
			}
			st, ok := h.syncStatus(status.SyncOKKey("quick"))
			if !ok || st.SyncID != "quick-1" {
				t.Fatalf("status quick.ok %+v", st)
			}
			f := h.sync(full, "full-2")
			want := &ev.SyncCounts{Observed: n + 1, Unchanged: n + 1, Mailboxes: f.GetCounts().GetMailboxes()}
			if !tc.reported {
				want.Unchanged, want.New = n, 1
			}
			checkCounts(t, "full sync after", f.GetCounts(), want)
		})
	}
}

// A full sync makes the organisation's mail settings what easguard needs,
// but only once the evaluator has said the policy is live; in a dry run it
// only says what it would change. Settings easguard was not given are
// left as the administrator set them. DefaultAccessLevel is never the
// collector's to change: it reports the level it read, for the evaluator
// to plan from, unless enforcement is off.
func TestFullSyncEnforcesSettings(t *testing.T) {
	t.Parallel()
	live, dry := false, true
	const insert = "Enrol your phone at https://enrol.contoso.com"
	cases := []struct {
		name     string
		policy   *bool
		cfg      collector.Config
		before   exchange.OrgSettings // what the administrator set
		want     exchange.OrgSettings // what Exchange has after the full sync
		enforced []string
		note     string
		sets     int    // Set-ActiveSyncOrganizationSettings by the collector
		level    string // DefaultAccessLevel the full sync reports
	}{
		{name: "live policy: every setting", policy: &live,
			cfg:      collector.Config{EnforceSettings: true, AdminMailRecipients: []string{"secops@contoso.com"}, UserMailInsert: insert},
			want:     exchange.OrgSettings{DefaultAccessLevel: "Allow", AdminMailRecipients: []string{"secops@contoso.com"}, UserMailInsert: insert},
			enforced: []string{"AdminMailRecipients", "UserMailInsert"}, sets: 1, level: "Allow"},
		{name: "live policy: unset settings are left alone", policy: &live,
			cfg:    collector.Config{EnforceSettings: true},
			before: exchange.OrgSettings{AdminMailRecipients: []string{"boss@contoso.com"}, UserMailInsert: "Call the helpdesk"},
			want:   exchange.OrgSettings{DefaultAccessLevel: "Allow", AdminMailRecipients: []string{"boss@contoso.com"}, UserMailInsert: "Call the helpdesk"},
			level:  "Allow"},
		{name: "live policy: recipients replaced, not added to", policy: &live,
			cfg:      collector.Config{EnforceSettings: true, AdminMailRecipients: []string{"secops@contoso.com"}},
			before:   exchange.OrgSettings{AdminMailRecipients: []string{"boss@contoso.com", "SecOps@contoso.com"}},
			want:     exchange.OrgSettings{DefaultAccessLevel: "Allow", AdminMailRecipients: []string{"SecOps@contoso.com"}},
			enforced: []string{"AdminMailRecipients"}, sets: 1, level: "Allow"},
		{name: "dry run changes nothing", policy: &dry,
			cfg:   collector.Config{EnforceSettings: true, UserMailInsert: insert},
			want:  exchange.OrgSettings{DefaultAccessLevel: "Allow"},
			note:  "dry run: would change UserMailInsert",
			level: "Allow"},
		{name: "enforcement switched off", policy: &live,
			cfg:  collector.Config{EnforceSettings: false, UserMailInsert: insert},
			want: exchange.OrgSettings{DefaultAccessLevel: "Allow"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := start(t, options{cfg: tc.cfg, policy: tc.policy})
			ctx := natstest.Context(t)
			if tc.before.AdminMailRecipients != nil || tc.before.UserMailInsert != "" {
				params := exchange.Params{}
				if tc.before.AdminMailRecipients != nil {
					params["AdminMailRecipients"] = exchange.MultiValued{Add: tc.before.AdminMailRecipients}
				}
				if tc.before.UserMailInsert != "" {
					params["UserMailInsert"] = tc.before.UserMailInsert
				}
				if _, _, err := h.client.Invoke(ctx, exchange.Call{Cmdlet: "Set-ActiveSyncOrganizationSettings", Params: params}); err != nil {
					t.Fatal(err)
				}
			}
			const set = "cmdlet:Set-ActiveSyncOrganizationSettings"
			base := h.sim.Recorder.Count(set)

			// Quick syncs never touch the settings.
			h.sync(quick, "quick-1")
			if n := h.sim.Recorder.Count(set) - base; n != 0 {
				t.Fatalf("a quick sync changed the organisation settings (%d calls)", n)
			}

			done := h.sync(full, "full-1")
			if n := h.sim.Recorder.Count(set) - base; n != tc.sets {
				t.Fatalf("%d Set-ActiveSyncOrganizationSettings, want %d", n, tc.sets)
			}
			if done.GetDefaultAccessLevel() != tc.level {
				t.Fatalf("reported DefaultAccessLevel %q, want %q", done.GetDefaultAccessLevel(), tc.level)
			}
			if !slices.Equal(done.GetSettingsEnforced(), tc.enforced) {
				t.Fatalf("settings_enforced %q, want %q", done.GetSettingsEnforced(), tc.enforced)
			}
			st, _ := h.syncStatus(status.SyncLastKey("full"))
			if st.SyncID != "full-1" || st.SettingsNote != tc.note || !slices.Equal(st.Settings, tc.enforced) {
				t.Fatalf("status: note %q settings %q, want note %q", st.SettingsNote, st.Settings, tc.note)
			}
			have, err := h.client.GetOrgSettings(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if have.DefaultAccessLevel != tc.want.DefaultAccessLevel || !slices.Equal(have.AdminMailRecipients, tc.want.AdminMailRecipients) ||
				have.UserMailInsert != tc.want.UserMailInsert {
				t.Fatalf("Exchange has %+v, want %+v", have, tc.want)
			}

			// Once the settings agree, nothing more is written.
			again := h.sync(full, "full-2")
			if n := h.sim.Recorder.Count(set) - base; n != tc.sets || (tc.note == "" && len(again.GetSettingsEnforced()) != 0) {
				t.Fatalf("second full sync: %d calls in all, enforced %q", n, again.GetSettingsEnforced())
			}
		})
	}
}

// Without a policy status a full sync cannot rule out a dry run, so it
// leaves the settings alone and says why. It waits for the evaluator
// first (20 s, the collector's policyWait), which makes this test slow.
func TestFullSyncWithoutPolicyLeavesSettings(t *testing.T) {
	t.Parallel()
	h := start(t, options{cfg: collector.Config{EnforceSettings: true}})
	ctx := natstest.Context(t)
	done := h.sync(full, "full-1")
	if n := h.sim.Recorder.Count("cmdlet:Set-ActiveSyncOrganizationSettings"); n != 0 || len(done.GetSettingsEnforced()) != 0 {
		t.Fatalf("settings changed without a policy status: %d calls, %q", n, done.GetSettingsEnforced())
	}
	st, _ := h.syncStatus(status.SyncOKKey("full"))
	if !strings.HasPrefix(st.SettingsNote, "organisation settings not enforced: no evaluator has published the policy yet") {
		t.Fatalf("settings note %q", st.SettingsNote)
	}
	if have, err := h.client.GetOrgSettings(ctx); err != nil || have.DefaultAccessLevel != "Allow" {
		t.Fatalf("Exchange has %+v, %v", have, err)
	}
}

// A sync.requested command runs a sync pass with its id and kind.
func TestManualSyncRequest(t *testing.T) {
	t.Parallel()
	h := start(t, options{})
	r, err := bus.NewRunner(h.js, bus.RunnerConfig{Service: "collector", Org: org, Logger: quiet}, h.c.Route())
	if err != nil {
		t.Fatal(err)
	}
	bustest.Run(t, r)

	n := int64(len(h.visible()))
	cases := []struct {
		id   string
		kind ev.SyncKind
		want ev.SyncKind
		name string
	}{
		{"manual-full", full, full, "full"},
		{"manual-quick", quick, quick, "quick"},
	}
	subject, err := bus.SyncRequested.Subject(org, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subject, MsgID: tc.id, Message: &ev.SyncRequested{
			Org: string(org), SyncId: tc.id, Kind: tc.kind, RequestedBy: "console:alice", RequestedAt: timestamppb.Now(), Reason: "test",
		}}); err != nil {
			t.Fatal(err)
		}
		c := h.completedOf(tc.id)
		if !c.GetSuccess() || c.GetKind() != tc.want || c.GetRequestedBy() != "console:alice" {
			t.Fatalf("%s: %v", tc.id, c)
		}
		// The status is recorded right after sync.completed is published.
		var st status.Sync
		natstest.Eventually(t, 5*time.Second, "status of "+tc.id, func() bool {
			st, _ = h.syncStatus(status.SyncOKKey(tc.name))
			return st.SyncID == tc.id
		})
		if st.RequestedBy != "console:alice" || !st.Success {
			t.Fatalf("%s: status %+v", tc.id, st)
		}
	}
	if c := h.completedOf("manual-full"); c.GetCounts().GetObserved() != n {
		t.Fatalf("manual full sync observed %d of %d", c.GetCounts().GetObserved(), n)
	}
}

// The schedule starts with a full sync (none succeeded yet), then quick
// syncs every quick interval.
func TestScheduleStartsWithFullSync(t *testing.T) {
	t.Parallel()
	h := start(t, options{cfg: collector.Config{QuickInterval: time.Second, FullInterval: time.Hour}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.c.Schedule(ctx) }()
	natstest.Eventually(t, 20*time.Second, "two scheduled syncs", func() bool {
		return h.completed.Len() >= 2
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	completed := h.completed.All()
	first, second := completed[0], completed[1]
	if first.GetKind() != full || first.GetRequestedBy() != "schedule" || !first.GetSuccess() || !strings.HasPrefix(first.GetSyncId(), "full-") {
		t.Fatalf("first scheduled sync: %v", first)
	}
	if second.GetKind() != quick || second.GetRequestedBy() != "schedule" || !second.GetSuccess() || !strings.HasPrefix(second.GetSyncId(), "quick-") {
		t.Fatalf("second scheduled sync: %v", second)
	}
	if gap := second.GetStartedAt().AsTime().Sub(first.GetStartedAt().AsTime()); gap < time.Second {
		t.Fatalf("quick sync %s after the full sync, want at least the quick interval", gap)
	}
}

// When Exchange cannot be reached, the pass is reported failed with the
// error; the last successful pass stays recorded as such.
func TestExchangeUnreachable(t *testing.T) {
	t.Parallel()
	h := start(t, options{exchange: func(c *exchange.Config) { c.RequestTimeout, c.CASFailover = 3*time.Second, false }})
	ctx := natstest.Context(t)
	alerts := natstest.Receive[ev.Alert](t, h.js, bus.StreamAlerts, bus.AlertRaised.Filter(org))
	h.sync(quick, "quick-ok")

	cas := h.sim.Endpoints()[0]
	if err := cas.SetDown(true); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		kind  ev.SyncKind
		name  string
		id    string
		error string
		ok    string // the id under <kind>.ok afterwards; "" for none
	}{
		{quick, "quick", "quick-down", "list partnerships", "quick-ok"},
		{full, "full", "full-down", "list mailboxes", ""},
	}
	for _, tc := range cases {
		done, err := h.c.Sync(ctx, tc.kind, tc.id, "test")
		if err == nil || done == nil || done.GetSuccess() {
			t.Fatalf("%s with Exchange down: %v, %v", tc.id, done, err)
		}
		c := h.completedOf(tc.id)
		if c.GetSuccess() || len(c.GetErrors()) != 1 || !strings.Contains(c.GetErrors()[0], tc.error) {
			t.Fatalf("%s: %v", tc.id, c)
		}
		last, _ := h.syncStatus(status.SyncLastKey(tc.name))
		if last.SyncID != tc.id || last.Success || len(last.Errors) != 1 {
			t.Fatalf("%s: status last %+v", tc.id, last)
		}
		okSt, ok := h.syncStatus(status.SyncOKKey(tc.name))
		if ok != (tc.ok != "") || okSt.SyncID != tc.ok {
			t.Fatalf("%s: status ok %+v", tc.id, okSt)
		}
	}

	// Each kind alerted when it started failing, as Exchange unreachable,
	// and not again at the next failure within the hour.
	if _, err := h.c.Sync(ctx, quick, "quick-down-again", "test"); err == nil {
		t.Fatal("quick sync with Exchange down succeeded")
	}
	natstest.Eventually(t, 10*time.Second, "two alerts", func() bool { return alerts.Len() >= 2 })
	for _, a := range alerts.All() {
		if a.GetKind() != ev.AlertKind_ALERT_KIND_EXCHANGE_UNREACHABLE || !strings.Contains(a.GetSummary(), "Exchange is unreachable") ||
			(a.GetDetail()["sync_id"] != "quick-down" && a.GetDetail()["sync_id"] != "full-down") {
			t.Errorf("alert %v", a)
		}
	}

	if err := cas.SetDown(false); err != nil {
		t.Fatal(err)
	}
	h.sync(quick, "quick-back")
	if st, _ := h.syncStatus(status.SyncOKKey("quick")); st.SyncID != "quick-back" {
		t.Fatalf("status quick.ok after Exchange came back: %+v", st)
	}
	// Resolved by the success: the next failure is alerted at once.
	if err := cas.SetDown(true); err != nil {
		t.Fatal(err)
	}
	if _, err := h.c.Sync(ctx, quick, "quick-down-later", "test"); err == nil {
		t.Fatal("quick sync with Exchange down succeeded")
	}
	natstest.Eventually(t, 10*time.Second, "the alert of the new failure", func() bool {
		return slices.ContainsFunc(alerts.All(), func(a *ev.Alert) bool { return a.GetDetail()["sync_id"] == "quick-down-later" })
	})
	if n := alerts.Len(); n != 3 {
		t.Errorf("%d alerts, want 3: %v", n, alerts.All())
	}
}

// collectorSpec is the collector's section as a worker binary loads it.
type collectorSpec struct{ Collector collector.Config }

func (s *collectorSpec) Validate() error { return s.Collector.Validate() }

// Bad settings are refused with an error that names the variable.
func TestConfigValidate(t *testing.T) {
	configtest.Check[collectorSpec](t, []configtest.Case{
		{Name: "defaults", Want: ""},
		{Name: "quick interval too short", Env: map[string]string{"EASGUARD_COLLECTOR_QUICK_INTERVAL": "500ms"}, Want: "EASGUARD_COLLECTOR_QUICK_INTERVAL"},
		{Name: "full interval shorter than quick", Env: map[string]string{"EASGUARD_COLLECTOR_QUICK_INTERVAL": "10m", "EASGUARD_COLLECTOR_FULL_INTERVAL": "5m"}, Want: "EASGUARD_COLLECTOR_FULL_INTERVAL"},
		{Name: "full interval equal to quick", Env: map[string]string{"EASGUARD_COLLECTOR_QUICK_INTERVAL": "10m", "EASGUARD_COLLECTOR_FULL_INTERVAL": "10m"}, Want: ""},

		{Name: "mail insert of 256 characters", Env: map[string]string{"EASGUARD_COLLECTOR_USER_MAIL_INSERT": strings.Repeat("é", 256)}, Want: ""},
		{Name: "mail insert too long", Env: map[string]string{"EASGUARD_COLLECTOR_USER_MAIL_INSERT": strings.Repeat("é", 257)}, Want: "EASGUARD_COLLECTOR_USER_MAIL_INSERT"},
	})
}

// allowedByDefault returns a phone that gets mail through the org default
// alone (on neither list), the one the tests change by hand.
func allowedByDefault(t testing.TB, parts []exchangesim.Partnership) exchangesim.Partnership {
	t.Helper()
	for _, p := range parts {
		if p.State == "Allowed" && p.Reason == "Global" && !p.Allowed && !p.Blocked {
			return p
		}
	}
	t.Fatal("no phone allowed by the org default in the seeded organisation")
	return exchangesim.Partnership{}
}

// A full sync whose record of what it knows cannot be read (here the
// bucket is gone; in production, NATS lost its quorum) fails as a whole:
// it returns, says so in its report, and reports nothing gone, although
// the pages of the listing are read beside it, several at a time.
func TestFullSyncFailsWhenItsRecordCannotBeRead(t *testing.T) {
	t.Parallel()
	h := start(t, options{})
	h.client.PageSize = 4 // many pages, several of them in flight
	h.sync(full, "full-1")
	// What the collector remembers would spare it the reads: it forgets
	// it as it does when it takes the lease.
	h.c.Forget()
	ctx, cancel := context.WithTimeout(natstest.Context(t), time.Minute)
	defer cancel()
	if err := h.js.DeleteKeyValue(ctx, bus.BucketCollector); err != nil {
		t.Fatal(err)
	}
	done, err := h.c.Sync(ctx, full, "full-2", "test")
	if err == nil || !strings.Contains(err.Error(), "remember") {
		t.Fatalf("full sync without its record = %v, want a failure to remember", err)
	}
	if ctx.Err() != nil {
		t.Fatal("the failed sync took its whole deadline")
	}
	got := h.completedOf("full-2")
	if !proto.Equal(got, done) || got.GetSuccess() || got.GetCounts().GetGone() != 0 || got.GetCounts().GetFailed() == 0 {
		t.Fatalf("report of the failed sync: %v", got)
	}
	for _, o := range h.observed.All() {
		if o.GetSync().GetSyncId() == "full-2" && o.GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_GONE {
			t.Fatalf("the failed sync reported %s gone", o.GetPartnership().GetDeviceId())
		}
	}
}

// reads counts the batched and single reads of what the collector knows
// (direct gets on its bucket's stream), as the server receives them.
func reads(tb testing.TB, js jetstream.JetStream) func() int {
	tb.Helper()
	var mu sync.Mutex
	n := 0
	subject := "$JS.API.DIRECT.GET.KV_" + bus.BucketCollector
	for _, subj := range []string{subject, subject + ".>"} {
		sub, err := js.Conn().Subscribe(subj, func(*nats.Msg) {
			mu.Lock()
			defer mu.Unlock()
			n++
		})
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	if err := js.Conn().Flush(); err != nil {
		tb.Fatal(err)
	}
	return func() int {
		tb.Helper()
		// Every request the collector made before this is at the server,
		// and so at the subscription, once a round trip after it is.
		if err := js.Conn().Flush(); err != nil {
			tb.Fatal(err)
		}
		mu.Lock()
		defer mu.Unlock()
		return n
	}
}

// The collector remembers what it wrote, so that a full sync of an
// organisation where nothing changed reads nothing back. That memory is
// sound only while no one else writes the bucket: a replica that takes
// the lease forgets it (Forget), because the replica that held the lease
// meanwhile may have written. Here the other replica saw a phone blocked;
// the block is lifted again, which puts the phone back exactly as this
// collector last saw it, and yet it changed since the bucket's record.
func TestCollectorRemembersWhatItWroteUntilItForgets(t *testing.T) {
	t.Parallel()
	h := start(t, options{})
	ctx := natstest.Context(t)
	n := int64(len(h.visible()))
	count := reads(t, h.js)
	h.sync(full, "full-1")

	before := count()
	second := h.sync(full, "full-2")
	if got := count() - before; got != 0 || second.GetCounts().GetUnchanged() != n {
		t.Fatalf("second full sync of an unchanged organisation: %d reads of what the collector knows (want 0), counts %v", got, second.GetCounts())
	}

	// Another replica holds the lease for a while.
	other, err := collector.New(ctx, h.js, org, testConfig(collector.Config{}), h.client, h.pub, nil, quiet)
	if err != nil {
		t.Fatal(err)
	}
	victim := allowedByDefault(t, h.visible())
	for _, a := range []exchange.Access{exchange.AccessBlock, exchange.AccessUnlist} {
		if a == exchange.AccessUnlist {
			done, err := other.Sync(ctx, full, "full-other", "test")
			if err != nil || done.GetCounts().GetChanged() != 1 {
				t.Fatalf("the other replica's full sync after the block: %v, %v", done.GetCounts(), err)
			}
		}
		res, err := h.client.ApplyAccess(ctx, []exchange.Change{{Mailbox: victim.PrimarySMTP, DeviceID: victim.DeviceID, Access: a}})
		if err != nil || len(res) != 1 || res[0].Err != nil {
			t.Fatalf("%s %s: %v %v", a, victim.DeviceID, res, err)
		}
	}
	// Unlisted, the phone is judged again at its next sync: allowed by
	// the organisation's default, as before the block.
	if res, err := h.sim.Org.Sync(exchangesim.Phone{Mailbox: victim.PrimarySMTP, DeviceID: victim.DeviceID, DeviceType: victim.DeviceType}); err != nil ||
		res.State != victim.State || res.Reason != victim.Reason {
		t.Fatalf("the phone's sync after the block was lifted: %+v, %v; want %s/%s", res, err, victim.State, victim.Reason)
	}

	h.c.Forget() // it takes the lease back
	before = count()
	third := h.sync(full, "full-3")
	checkCounts(t, "full sync after the lease came back", third.GetCounts(), &ev.SyncCounts{Observed: n, Changed: 1, Unchanged: n - 1, Mailboxes: second.GetCounts().GetMailboxes()})
	if got := count() - before; got == 0 {
		t.Fatal("the full sync after Forget read nothing of what the collector knows")
	}
	changed := byChange(h.observationsOf("full-3", int(n)))[ev.ObservationChange_OBSERVATION_CHANGE_CHANGED]
	if len(changed) != 1 || changed[0].GetPartnership().GetDeviceId() != victim.DeviceID ||
		changed[0].GetPartnership().GetDeviceAccessStateReason() != ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_GLOBAL {
		t.Fatalf("changed after the block was lifted: %v", changed)
	}
}
