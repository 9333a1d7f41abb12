package evaluator_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/bus/bustest"
	"github.com/easguard/easguard/pkg/config/configtest"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/policy"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

const org bus.Org = "contoso"

// Short-hands for the enums the tests use most.
const (
	stAllowed     = ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED
	stBlocked     = ev.DeviceAccessState_DEVICE_ACCESS_STATE_BLOCKED
	stQuarantined = ev.DeviceAccessState_DEVICE_ACCESS_STATE_QUARANTINED
	rsGlobal      = ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_GLOBAL
	rsIndividual  = ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_INDIVIDUAL
	wantNone      = ev.DesiredAccess_DESIRED_ACCESS_UNSPECIFIED
	wantAllow     = ev.DesiredAccess_DESIRED_ACCESS_ALLOW
	wantBlock     = ev.DesiredAccess_DESIRED_ACCESS_BLOCK
	wantQuar      = ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE
)

// logSink records the messages the evaluator logs, so a test can wait
// for something that has no other visible effect (a rejected policy file).
type logSink struct {
	mu   sync.Mutex
	msgs []string
}

func (s *logSink) Enabled(context.Context, slog.Level) bool { return true }
func (s *logSink) Handle(_ context.Context, r slog.Record) error {
	s.mu.Lock()
	s.msgs = append(s.msgs, r.Message)
	s.mu.Unlock()
	return nil
}
func (s *logSink) WithAttrs([]slog.Attr) slog.Handler { return s }
func (s *logSink) WithGroup(string) slog.Handler      { return s }

func (s *logSink) count(msg string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, m := range s.msgs {
		if m == msg {
			n++
		}
	}
	return n
}

// harness runs one evaluator the way pkg/pipeline does (runner with its
// routes, SetPublisher, the background loop) on a real JetStream server,
// and records what it publishes.
type harness struct {
	t         testing.TB
	js        jetstream.JetStream
	e         *evaluator.Evaluator
	pub       *bus.Publisher
	status    jetstream.KeyValue
	decisions jetstream.KeyValue
	applied   jetstream.KeyValue
	logs      *logSink
	seq       int

	decided        *natstest.Received[*ev.AccessDecided]
	alerts         *natstest.Received[*ev.Alert]
	takenDecisions int
	takenAlerts    int
}

// testConfig fills what a test leaves zero with the defaults of the
// environment variables, except a short MDM window so that background
// work (windows, rechecks) runs several times a second.
func testConfig(cfg evaluator.Config) evaluator.Config {
	if cfg.BlastRadius == 0 {
		cfg.BlastRadius = 0.1
	}
	if cfg.BlastMinimum == 0 {
		cfg.BlastMinimum = 3
	}
	if cfg.MDMWindow == 0 {
		cfg.MDMWindow = 400 * time.Millisecond
	}
	return cfg
}

func start(tb testing.TB, cfg evaluator.Config) *harness {
	tb.Helper()
	_, _, js := natstest.Start(tb)
	ctx := natstest.Context(tb)
	if err := bus.Provision(ctx, js, bus.DefaultTopology()); err != nil {
		tb.Fatal(err)
	}
	logs := &logSink{}
	log := slog.New(logs)
	e, err := evaluator.New(ctx, js, org, testConfig(cfg), log)
	if err != nil {
		tb.Fatal(err)
	}
	r, err := bus.NewRunner(js, bus.RunnerConfig{Service: "evaluator", Org: org, Logger: log}, e.Routes()...)
	if err != nil {
		tb.Fatal(err)
	}
	e.SetPublisher(r.Publisher())
	// The evaluator's own loop (grace rechecks, policy reloads) beside its
	// runner, as pkg/pipeline runs them.
	ectx, cancel := context.WithCancel(context.Background())
	edone := make(chan struct{})
	go func() { defer close(edone); _ = e.Run(ectx) }()
	tb.Cleanup(func() { cancel(); <-edone })
	bustest.Run(tb, r)

	h := observe(tb, js, logs)
	h.e = e
	return h
}

// observe opens what a test reads of the evaluator's work: its publisher,
// the status, decision and applied buckets, and its decisions and alerts.
func observe(tb testing.TB, js jetstream.JetStream, logs *logSink) *harness {
	tb.Helper()
	ctx := natstest.Context(tb)
	h := &harness{t: tb, js: js, logs: logs}
	var err error
	if h.pub, err = bus.NewPublisher(js, bus.Instrumentation{}); err != nil {
		tb.Fatal(err)
	}
	for _, b := range []struct {
		name string
		kv   *jetstream.KeyValue
	}{{bus.BucketStatus, &h.status}, {bus.BucketDecisions, &h.decisions}, {bus.BucketApplied, &h.applied}} {
		if *b.kv, err = js.KeyValue(ctx, b.name); err != nil {
			tb.Fatal(err)
		}
	}
	h.decided = natstest.Receive[ev.AccessDecided](tb, js, bus.StreamDecisions, bus.AccessDecided.Filter(org))
	h.alerts = natstest.Receive[ev.Alert](tb, js, bus.StreamAlerts, bus.AlertRaised.Filter(org))
	return h
}

// stored counts the messages a stream holds under filter.
func stored(ctx context.Context, js jetstream.JetStream, stream, filter string) (int, bool) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return 0, false
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return 0, false
	}
	n := 0
	for _, c := range info.State.Subjects {
		n += int(c)
	}
	return n, true
}

// settle waits until the evaluator has handled (and acknowledged) every
// device.matched and sync.completed published so far, and the recorders
// have received everything it published. After it, "no decision" means
// none was made.
func (h *harness) settle() {
	h.t.Helper()
	natstest.WaitDrained(h.t, h.js, 20*time.Second, bus.StreamMatch, bus.StreamSync)
	h.catchUp()
}

// catchUp waits until the recorders hold every decision and alert stored.
func (h *harness) catchUp() {
	h.t.Helper()
	ctx := context.Background()
	natstest.Eventually(h.t, 10*time.Second, "decisions and alerts received", func() bool {
		nd, ok1 := stored(ctx, h.js, bus.StreamDecisions, bus.AccessDecided.Filter(org))
		na, ok2 := stored(ctx, h.js, bus.StreamAlerts, bus.AlertRaised.Filter(org))
		return ok1 && ok2 && h.decided.Len() == nd && h.alerts.Len() == na
	})
}

// newDecisions returns the decisions received since the last call.
func (h *harness) newDecisions() []*ev.AccessDecided {
	all := h.decided.All()
	out := all[h.takenDecisions:]
	h.takenDecisions = len(all)
	return out
}

// newAlerts returns the alerts received since the last call.
func (h *harness) newAlerts() []*ev.Alert {
	all := h.alerts.All()
	out := all[h.takenAlerts:]
	h.takenAlerts = len(all)
	return out
}

// publish sends a verdict of the matcher to the evaluator.
func (h *harness) publish(in *ev.DeviceMatched) {
	h.t.Helper()
	h.seq++
	subject, err := bus.DeviceMatched.Subject(org, in.GetObserved().GetPartnership().GetDeviceId())
	if err != nil {
		h.t.Fatal(err)
	}
	if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subject, MsgID: fmt.Sprintf("test-matched-%d", h.seq), Message: in}); err != nil {
		h.t.Fatal(err)
	}
}

// decide sends a verdict and returns the decisions it led to.
func (h *harness) decide(in *ev.DeviceMatched) []*ev.AccessDecided {
	h.t.Helper()
	h.publish(in)
	h.settle()
	return h.newDecisions()
}

// syncCompleted reports the end of a sync pass to the evaluator.
func (h *harness) syncCompleted(id string) {
	h.t.Helper()
	h.seq++
	subject, err := bus.SyncCompleted.Subject(org, "")
	if err != nil {
		h.t.Fatal(err)
	}
	if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subject, MsgID: fmt.Sprintf("test-sync-%d", h.seq), Message: &ev.SyncCompleted{
		Org: string(org), SyncId: id, Kind: ev.SyncKind_SYNC_KIND_QUICK, Success: true, StartedAt: timestamppb.Now(), FinishedAt: timestamppb.Now(),
	}}); err != nil {
		h.t.Fatal(err)
	}
}

// statusOf reads the org's status record under key; false if absent.
func statusOf[T any](h *harness, key string) (T, bool) {
	h.t.Helper()
	v, ok, err := status.Get[T](context.Background(), h.status, org, key)
	if err != nil {
		h.t.Fatal(err)
	}
	return v, ok
}

func (h *harness) policyStatus() status.Policy {
	h.t.Helper()
	st, ok := statusOf[status.Policy](h, status.PolicyKey)
	if !ok {
		h.t.Fatal("no policy status")
	}
	return st
}

// decisionRecord reads the evaluator's record of a device.
func (h *harness) decisionRecord(d device) (*ev.DecisionRecord, bool) {
	h.t.Helper()
	rec, ok, err := bus.Load[ev.DecisionRecord](context.Background(), h.decisions, d.key(h.t))
	if err != nil {
		h.t.Fatal(err)
	}
	return rec, ok
}

// device is one partnership as the collector would report it.
type device struct {
	mailbox string
	id      string
	typ     string
	os      string
	state   ev.DeviceAccessState
	reason  ev.DeviceAccessStateReason
	first   time.Time
}

func phone(mailbox, id string, state ev.DeviceAccessState, reason ev.DeviceAccessStateReason) device {
	return device{mailbox: mailbox, id: id, typ: "iPhone", os: "iOS 17.4 21E219", state: state, reason: reason, first: time.Now().Add(-48 * time.Hour)}
}

func (d device) guid() string {
	return "GUID-" + strings.ToUpper(d.id) + "-" + strings.ToUpper(strings.Split(d.mailbox, "@")[0])
}

// key is the state key of the partnership, as the evaluator and the
// executor compute it: org, device id, lower-cased partnership GUID.
func (d device) key(tb testing.TB) string {
	tb.Helper()
	k, err := bus.StateKey(org, d.id, strings.ToLower(d.guid()))
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

func (d device) partnership() *ev.EASPartnership {
	local := strings.Split(d.mailbox, "@")[0]
	identity := "contoso.com/Users/" + local
	return &ev.EASPartnership{
		Mailbox:  &ev.Mailbox{Identity: identity, PrimarySmtpAddress: d.mailbox, UserPrincipalName: d.mailbox, DisplayName: local},
		DeviceId: d.id, DeviceType: d.typ, DeviceModel: d.typ, DeviceOs: d.os, FriendlyName: local + "'s " + d.typ,
		DeviceAccessState: d.state, DeviceAccessStateReason: d.reason, FirstSyncTime: timestamppb.New(d.first),
		Identity: identity + "/ExchangeActiveSyncDevices/" + d.typ + "§" + d.id, Guid: d.guid(),
	}
}

// how is what the matcher found and when.
type how struct {
	mdm      *ev.MDMDevice // nil: no MDM record
	trigger  string        // "eas" (default) or "mdm"
	syncID   string        // default "sync-1" for trigger eas
	observed time.Time     // default now
	matched  time.Time     // default now
}

func compliant(d device) *ev.MDMDevice {
	return &ev.MDMDevice{Source: "test", MdmDeviceId: "mdm-" + d.id, UserPrincipalName: d.mailbox, EasDeviceId: d.id,
		EnrollmentState: ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT}
}

func noncompliant(d device) *ev.MDMDevice {
	m := compliant(d)
	m.ComplianceState = ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT
	return m
}

// matched builds the matcher's verdict about d.
func matched(d device, w how) *ev.DeviceMatched {
	now := time.Now()
	if w.trigger == "" {
		w.trigger = "eas"
	}
	if w.syncID == "" && w.trigger == "eas" {
		w.syncID = "sync-1"
	}
	if w.observed.IsZero() {
		w.observed = now
	}
	if w.matched.IsZero() {
		w.matched = now
	}
	in := &ev.DeviceMatched{
		Org: string(org),
		Observed: &ev.EASPartnershipObserved{Org: string(org), Partnership: d.partnership(), ObservedAt: timestamppb.New(w.observed),
			Change: ev.ObservationChange_OBSERVATION_CHANGE_NEW, Sync: &ev.SyncRef{SyncId: w.syncID, Kind: ev.SyncKind_SYNC_KIND_QUICK}},
		MatchedAt: timestamppb.New(w.matched), Trigger: w.trigger,
	}
	if w.mdm != nil {
		in.Mdm, in.Method = w.mdm, ev.MatchMethod_MATCH_METHOD_EAS_DEVICE_ID_AND_USER
	} else {
		in.NoMatchReason = ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD
	}
	return in
}

// writePolicy writes a policy file for the org (version and org are
// added) with the given modification time, so that a rewrite is always
// seen as a change.
func writePolicy(tb testing.TB, path, body string, mtime time.Time) {
	tb.Helper()
	if err := os.WriteFile(path, []byte("version: 1\norg: contoso\n"+body), 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.Chtimes(path, mtime, mtime); err != nil {
		tb.Fatal(err)
	}
}

func policyFile(tb testing.TB, body string) string {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "policy.yaml")
	writePolicy(tb, path, body, time.Now())
	return path
}

func versionOf(tb testing.TB, path string) string {
	tb.Helper()
	p, err := policy.Load(path)
	if err != nil {
		tb.Fatal(err)
	}
	return p.Version()
}

// only asserts that exactly one decision was made, and returns it.
func only(tb testing.TB, got []*ev.AccessDecided, what string) *ev.AccessDecided {
	tb.Helper()
	if len(got) != 1 {
		tb.Fatalf("%s: %d decisions, want 1: %v", what, len(got), got)
	}
	return got[0]
}

func none(tb testing.TB, got []*ev.AccessDecided, what string) {
	tb.Helper()
	if len(got) != 0 {
		tb.Fatalf("%s: %d decisions, want none: %v", what, len(got), got)
	}
}

// A worker that records a decision and dies before publishing it leaves
// the decision to the redelivery of its input; when a newer verdict about
// the device is judged first, the redelivery is dropped as older, so the
// newer verdict offers the recorded decision again. A decision that did go
// out is offered again under the same message id and dropped by the stream.
func TestRecordedButUnpublishedDecisionIsOfferedAgain(t *testing.T) {
	h := start(t, evaluator.Config{})
	ctx := natstest.Context(t)
	d := phone("alice@contoso.com", "ApplLOST0001", stQuarantined, rsGlobal)
	first := only(t, h.decide(matched(d, how{observed: time.Now().Add(-time.Minute)})), "unknown device")
	if first.GetDesired() != wantBlock {
		t.Fatalf("first decision: %v", first)
	}
	// Seen again before it was applied: the same decision, dropped by the
	// stream as a copy.
	none(t, h.decide(matched(d, how{observed: time.Now().Add(-30 * time.Second)})), "the decision again before it was applied")

	// The record a worker left that recorded a decision and died before
	// publishing it.
	rec, ok := h.decisionRecord(d)
	if !ok {
		t.Fatal("no decision record")
	}
	lost := proto.Clone(evaluator.WholeLastDecision(rec)).(*ev.AccessDecided)
	lost.DecisionId = "lost-" + first.GetDecisionId()
	rec.LastDecision, rec.DecisionId, rec.LastDecisionSharesMatched = lost, lost.GetDecisionId(), false
	if err := bus.Put(ctx, h.decisions, d.key(t), rec); err != nil {
		t.Fatal(err)
	}
	again := only(t, h.decide(matched(d, how{})), "the newer verdict")
	if again.GetDecisionId() != lost.GetDecisionId() || !proto.Equal(again, lost) {
		t.Fatalf("offered %v, want the recorded decision %v", again, lost)
	}
}

// A decision is published only when Exchange's state is not the desired
// one, or when the user of a device Exchange already holds back has not
// been told how to enrol yet.
func TestDecidesOnlyWhenExchangeDiffers(t *testing.T) {
	type step struct {
		state        ev.DeviceAccessState
		reason       ev.DeviceAccessStateReason
		mdm          bool // a compliant MDM record
		want         ev.DesiredAccess
		rule         string
		notifyReason string // "" means notify_user false
	}
	cases := []struct {
		name   string
		policy string // "" means no file: the default policy
		steps  []step
	}{
		{name: "quarantined unknown device is blocked and its user told", steps: []step{
			{state: stQuarantined, reason: rsGlobal, want: wantBlock, rule: policy.RuleUnknownDevice, notifyReason: policy.NotifyNotEnrolled},
		}},
		{name: "blocked device: the user is told once, then nothing", steps: []step{
			{state: stBlocked, reason: rsIndividual, want: wantBlock, rule: policy.RuleUnknownDevice, notifyReason: policy.NotifyNotEnrolled},
			{state: stBlocked, reason: rsIndividual, want: wantNone},
		}},
		{name: "blocked device without notification is left alone", policy: "notify: false\n", steps: []step{
			{state: stBlocked, reason: rsIndividual, want: wantNone},
		}},
		{name: "compliant device already allowed is left alone", steps: []step{
			{state: stAllowed, reason: rsIndividual, mdm: true, want: wantNone},
		}},
		{name: "compliant quarantined device is allowed without a mail", steps: []step{
			{state: stQuarantined, reason: rsGlobal, mdm: true, want: wantAllow, rule: policy.RuleCompliant},
		}},
		{name: "allowed only by the org default is allowed individually", steps: []step{
			{state: stAllowed, reason: rsGlobal, mdm: true, want: wantAllow, rule: policy.RuleCompliant},
		}},
		{name: "unknown quarantine: a quarantined device stays, quietly", policy: "unknown_device: quarantine\nnotify: false\n", steps: []step{
			{state: stQuarantined, reason: rsGlobal, want: wantNone},
		}},
		{name: "unknown quarantine: a blocked device is moved to quarantine", policy: "unknown_device: quarantine\nnotify: false\n", steps: []step{
			{state: stBlocked, reason: rsIndividual, want: wantQuar, rule: policy.RuleUnknownDevice},
		}},
		{name: "unknown block: a quarantined device is blocked without a mail", policy: "notify: false\n", steps: []step{
			{state: stQuarantined, reason: rsGlobal, want: wantBlock, rule: policy.RuleUnknownDevice},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := evaluator.Config{}
			if tc.policy != "" {
				cfg.PolicyFile = policyFile(t, tc.policy)
			}
			h := start(t, cfg)
			version := h.policyStatus().Version
			for i, s := range tc.steps {
				d := phone("alice@contoso.com", "ApplDEV1", s.state, s.reason)
				w := how{}
				if s.mdm {
					w.mdm = compliant(d)
				}
				got := h.decide(matched(d, w))
				what := fmt.Sprintf("step %d", i+1)
				if s.want == wantNone {
					none(t, got, what)
					continue
				}
				dec := only(t, got, what)
				if dec.GetDesired() != s.want || dec.GetRule() != s.rule {
					t.Fatalf("%s: %v by %q, want %v by %q", what, dec.GetDesired(), dec.GetRule(), s.want, s.rule)
				}
				if dec.GetNotifyUser() != (s.notifyReason != "") || dec.GetNotifyReason() != s.notifyReason {
					t.Fatalf("%s: notify_user %v reason %q, want reason %q", what, dec.GetNotifyUser(), dec.GetNotifyReason(), s.notifyReason)
				}
				if dec.GetDecisionId() == "" || dec.GetOrg() != string(org) || dec.GetDryRun() || dec.GetPolicyVersion() != version ||
					dec.GetExchangeState() != s.state || dec.GetExchangeReason() != s.reason || dec.GetPartnership().GetDeviceId() != d.id || dec.GetSyncId() != "sync-1" {
					t.Fatalf("%s: decision %v", what, dec)
				}
			}
		})
	}
}

// Scope, platforms and exemptions of the policy file decide; out of
// scope means nothing is decided and nothing remembered.
func TestPolicyRules(t *testing.T) {
	now := time.Now()
	path := policyFile(t, fmt.Sprintf(`
scope:
  include: {domains: [contoso.com]}
  exclude: {mailboxes: [ceo@contoso.com]}
allowed_platforms: [ios, android]
platform_not_allowed: quarantine
default_access_level: quarantine
exemptions:
  - {mailbox: "frank@contoso.com", device_id: "ApplEXEMPT1", reason: "break-glass"}
  - {device_type: "EASProbeDeviceType", reason: "health probes", trust_client_reported: true}
  - {mailbox: "helpdesk@contoso.com", reason: "shared phone"}
  - {mailbox: "gina@contoso.com", device_id: "ApplEXPIRED", reason: "was temporary", until: %q}
  - {mailbox: "hugo@contoso.com", device_id: "ApplLATER", reason: "temporary", until: %q}
`, now.Add(-time.Hour).UTC().Format(time.RFC3339), now.Add(time.Hour).UTC().Format(time.RFC3339)))
	h := start(t, evaluator.Config{PolicyFile: path})

	windows := phone("bob@contoso.com", "WINPHONE1", stQuarantined, rsGlobal)
	windows.typ, windows.os = "WindowsMail", "Windows 10"
	probe := phone("carol@contoso.com", "EASProbeDevice1", stQuarantined, rsGlobal)
	probe.typ, probe.os = "EASProbeDeviceType", ""
	cases := []struct {
		name         string
		dev          device
		mdm          bool
		want         ev.DesiredAccess
		rule         string
		notifyReason string
	}{
		{name: "another domain is out of scope", dev: phone("eve@fabrikam.com", "ApplOUT1", stQuarantined, rsGlobal), want: wantNone},
		{name: "an excluded mailbox is out of scope", dev: phone("ceo@contoso.com", "ApplCEO1", stQuarantined, rsGlobal), want: wantNone},
		{name: "allowed platform, compliant", dev: phone("dave@contoso.com", "ApplDAVE1", stQuarantined, rsGlobal), mdm: true, want: wantAllow, rule: policy.RuleCompliant},
		{name: "platform not allowed, even compliant", dev: windows, mdm: true, want: wantQuar, rule: policy.RulePlatformNotAllowed, notifyReason: policy.NotifyPlatformNotAllowed},
		{name: "exempt by device id, any case", dev: phone("frank@contoso.com", "applexempt1", stQuarantined, rsGlobal), want: wantAllow, rule: policy.RuleExemptionDeviceID},
		{name: "an exempt device id on another mailbox is not exempt", dev: phone("ivan@contoso.com", "ApplEXEMPT1", stQuarantined, rsGlobal), want: wantBlock, rule: policy.RuleUnknownDevice, notifyReason: policy.NotifyNotEnrolled},
		{name: "exempt by device type", dev: probe, want: wantAllow, rule: policy.RuleExemptionDeviceType},
		{name: "exempt by mailbox", dev: phone("helpdesk@contoso.com", "ApplHELP1", stQuarantined, rsGlobal), want: wantAllow, rule: policy.RuleExemptionMailbox},
		{name: "expired exemption no longer allows", dev: phone("gina@contoso.com", "ApplEXPIRED", stQuarantined, rsGlobal), want: wantBlock, rule: policy.RuleUnknownDevice, notifyReason: policy.NotifyNotEnrolled},
		{name: "exemption until later still allows", dev: phone("hugo@contoso.com", "ApplLATER", stQuarantined, rsGlobal), want: wantAllow, rule: policy.RuleExemptionDeviceID},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h.t = t
			w := how{}
			if tc.mdm {
				w.mdm = compliant(tc.dev)
				if tc.dev.typ == "WindowsMail" {
					w.mdm.Platform = ev.Platform_PLATFORM_WINDOWS
				}
			}
			got := h.decide(matched(tc.dev, w))
			if tc.want == wantNone {
				none(t, got, tc.name)
				if _, ok := h.decisionRecord(tc.dev); ok {
					t.Fatal("an out-of-scope partnership was remembered")
				}
				return
			}
			dec := only(t, got, tc.name)
			if dec.GetDesired() != tc.want || dec.GetRule() != tc.rule || dec.GetNotifyReason() != tc.notifyReason || dec.GetNotifyUser() != (tc.notifyReason != "") {
				t.Fatalf("%v by %q (notify %v %q), want %v by %q (notify %q): %s", dec.GetDesired(), dec.GetRule(), dec.GetNotifyUser(), dec.GetNotifyReason(),
					tc.want, tc.rule, tc.notifyReason, dec.GetReason())
			}
		})
	}
}

// The policy file is re-read when it changes: decisions follow the new
// version, a mailbox the new scope leaves out is forgotten, and a broken
// file keeps the last good policy in force.
func TestPolicyReload(t *testing.T) {
	path := policyFile(t, "unknown_device: block\n")
	v1 := versionOf(t, path)
	h := start(t, evaluator.Config{PolicyFile: path})
	if st := h.policyStatus(); st.Version != v1 || st.DryRun || st.File != path {
		t.Fatalf("policy status %+v, want version %s, no dry run", st, v1)
	}
	alice := phone("alice@contoso.com", "ApplALICE1", stQuarantined, rsGlobal)
	if d := only(t, h.decide(matched(alice, how{})), "v1"); d.GetDesired() != wantBlock || d.GetPolicyVersion() != v1 {
		t.Fatalf("under v1: %v", d)
	}
	if _, ok := h.decisionRecord(alice); !ok {
		t.Fatal("no record of alice's decision")
	}

	// The evaluator looks at the file at most every two seconds, when it
	// judges something: a harmless verdict (an allowed, compliant device)
	// is sent until the change shows.
	probe := phone("probe@contoso.com", "ApplPROBE1", stAllowed, rsIndividual)
	poke := func(what string, done func() bool) {
		t.Helper()
		var last time.Time
		natstest.Eventually(t, 15*time.Second, what, func() bool {
			if done() {
				return true
			}
			if time.Since(last) > 250*time.Millisecond {
				last = time.Now()
				h.publish(matched(probe, how{mdm: compliant(probe)}))
			}
			return false
		})
		h.settle()
		none(t, h.newDecisions(), "probes")
	}

	writePolicy(t, path, "unknown_device: quarantine\ndefault_access_level: quarantine\nscope:\n  exclude: {mailboxes: [alice@contoso.com]}\n", time.Now().Add(time.Second))
	v2 := versionOf(t, path)
	poke("policy v2 loaded", func() bool {
		st, ok := statusOf[status.Policy](h, status.PolicyKey)
		return ok && st.Version == v2
	})
	bob := phone("bob@contoso.com", "ApplBOB1", stBlocked, rsIndividual)
	if d := only(t, h.decide(matched(bob, how{})), "v2"); d.GetDesired() != wantQuar || d.GetPolicyVersion() != v2 {
		t.Fatalf("under v2: %v", d)
	}
	none(t, h.decide(matched(alice, how{})), "alice out of scope")
	if _, ok := h.decisionRecord(alice); ok {
		t.Fatal("the decision of a mailbox now out of scope was not forgotten")
	}

	writePolicy(t, path, "unknown_device: maybe\n", time.Now().Add(2*time.Second))
	poke("broken policy noticed", func() bool { return h.logs.count("policy file invalid; keeping the last good policy") > 0 })
	if st := h.policyStatus(); st.Version != v2 {
		t.Fatalf("policy status after a broken file: %+v, want version %s", st, v2)
	}
	carol := phone("carol@contoso.com", "ApplCAROL1", stBlocked, rsIndividual)
	if d := only(t, h.decide(matched(carol, how{})), "after the broken file"); d.GetDesired() != wantQuar || d.GetPolicyVersion() != v2 {
		t.Fatalf("after the broken file: %v", d)
	}
}

// In a dry run (the policy's dry_run, or EASGUARD_EVALUATOR_DRY_RUN)
// decisions are made, marked dry_run and published at once, even those
// that take mail away, which the guard would otherwise hold.
func TestDryRun(t *testing.T) {
	cases := []struct {
		name string
		cfg  func(t *testing.T) evaluator.Config
	}{
		{"policy file", func(t *testing.T) evaluator.Config {
			return evaluator.Config{PolicyFile: policyFile(t, "dry_run: true\n")}
		}},
		{"configuration", func(*testing.T) evaluator.Config { return evaluator.Config{DryRun: true} }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, tc.cfg(t))
			st := h.policyStatus()
			if !st.DryRun || st.Version == "" {
				t.Fatalf("policy status %+v, want dry_run", st)
			}
			d := only(t, h.decide(matched(phone("alice@contoso.com", "ApplALICE1", stQuarantined, rsGlobal), how{})), "unknown device")
			if d.GetDesired() != wantBlock || !d.GetDryRun() || d.GetPolicyVersion() != st.Version {
				t.Fatalf("unknown device in a dry run: %v", d)
			}
			bob := phone("bob@contoso.com", "ApplBOB1", stAllowed, rsIndividual)
			none(t, h.decide(matched(bob, how{mdm: compliant(bob)})), "compliant and allowed")
			d = only(t, h.decide(matched(bob, how{mdm: noncompliant(bob)})), "noncompliant")
			if d.GetDesired() != wantBlock || !d.GetDryRun() || d.GetRule() != policy.RuleNoncompliant {
				t.Fatalf("revocation in a dry run: %v", d)
			}
			// Nothing changed on Exchange: seen again, nothing new to say.
			none(t, h.decide(matched(bob, how{mdm: noncompliant(bob)})), "noncompliant again")
		})
	}
}

// A verdict redelivered after its decision was recorded (the worker died
// before its output went out) yields the identical decision again.
func TestRedeliveryReoffersTheDecision(t *testing.T) {
	h := start(t, evaluator.Config{})
	ctx := natstest.Context(t)
	in := matched(phone("alice@contoso.com", "ApplALICE1", stQuarantined, rsGlobal), how{})

	// The first delivery is judged and recorded, but its output is lost.
	first, err := h.e.Decide(ctx, proto.Clone(in).(*ev.DeviceMatched))
	if err != nil {
		t.Fatal(err)
	}
	if len(first) != 1 {
		t.Fatalf("first delivery: %d outputs", len(first))
	}
	lost, ok := first[0].Message.(*ev.AccessDecided)
	if !ok || lost.GetDesired() != wantBlock {
		t.Fatalf("first delivery: %v", first[0].Message)
	}

	// The redelivery goes through the runner and publishes it after all.
	got := only(t, h.decide(proto.Clone(in).(*ev.DeviceMatched)), "redelivery")
	if got.GetDecisionId() != lost.GetDecisionId() || !proto.Equal(got, lost) {
		t.Fatalf("redelivery decided %v, the lost decision was %v", got, lost)
	}

	// Offered again, it keeps its message id, so the stream drops the copy.
	again, err := h.e.Decide(ctx, proto.Clone(in).(*ev.DeviceMatched))
	if err != nil {
		t.Fatal(err)
	}
	if len(again) != 1 || again[0].MsgID != first[0].MsgID || again[0].MsgID != "decided:"+lost.GetDecisionId() {
		t.Fatalf("second redelivery: %v, first had id %q", again, first[0].MsgID)
	}
	for _, o := range again {
		if _, err := h.pub.Publish(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	h.settle()
	none(t, h.newDecisions(), "a copy of an already published decision")
}

// A phone blocked for non-compliance gets its mail back as soon as the
// MDM says it is compliant again, even when that change is matched
// against the partnership as the collector last read it, before the
// block: that reading shows the phone allowed, which it no longer is.
// Before, the evaluator took it for agreement and decided nothing, and
// the collector's next reading (blocked, within the replication grace of
// the block) for replication lag: the phone stayed blocked for 15 minutes.
func TestCompliantAgainBeforeTheBlockWasSeen(t *testing.T) {
	h := start(t, evaluator.Config{ReplicationGrace: 15 * time.Minute})
	ctx := natstest.Context(t)
	d := phone("alice@contoso.com", "ApplALICE1", stQuarantined, rsGlobal)
	allow := only(t, h.decide(matched(d, how{mdm: compliant(d), observed: time.Now().Add(-2 * time.Minute)})), "compliant")
	applied := func(dec *ev.AccessDecided) {
		t.Helper()
		if err := bus.Put(ctx, h.applied, d.key(t), &ev.AppliedRecord{DecisionId: dec.GetDecisionId(), DecidedAt: dec.GetDecidedAt(),
			Desired: dec.GetDesired(), AppliedAt: timestamppb.New(time.Now()), Outcome: ev.ApplyOutcome_APPLY_OUTCOME_APPLIED}); err != nil {
			t.Fatal(err)
		}
	}
	applied(allow)
	// The collector reads it allowed: the partnership as the matcher
	// indexes it from now on.
	d.state, d.reason = stAllowed, rsIndividual
	seen := time.Now()
	none(t, h.decide(matched(d, how{mdm: compliant(d), observed: seen})), "allowed as decided")

	// Non-compliant: blocked (a single revocation, under the guard's
	// minimum, released with its MDM window).
	h.publish(matched(d, how{mdm: noncompliant(d), trigger: "mdm", observed: seen}))
	block := h.decided.Await(t, 10*time.Second, "the block", func(dec *ev.AccessDecided) bool { return dec.GetDesired() == wantBlock })
	h.catchUp()
	h.newDecisions() // the block taken: the next decide returns only its own
	applied(block)

	// Compliant again, matched against the same reading from before the
	// block: allowed again at once.
	again := only(t, h.decide(matched(d, how{mdm: compliant(d), trigger: "mdm", observed: seen})), "compliant again")
	if again.GetDesired() != wantAllow || again.GetDecisionId() == allow.GetDecisionId() {
		t.Fatalf("compliant again: %v", again)
	}
}

// After a decision was applied, an observation taken later that shows
// Exchange disagreeing is a manual edit: the decision is made again as
// drift, with one alert. An observation from before the apply is not.
func TestDrift(t *testing.T) {
	cases := []struct {
		name      string
		observed  func(applied time.Time) time.Time
		wantDrift bool
	}{
		{"observed after the apply", func(a time.Time) time.Time { return a.Add(time.Second) }, true},
		{"observed before the apply", func(a time.Time) time.Time { return a.Add(-time.Second) }, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, evaluator.Config{})
			ctx := natstest.Context(t)
			d := phone("alice@contoso.com", "ApplALICE1", stQuarantined, rsGlobal)
			allow := only(t, h.decide(matched(d, how{mdm: compliant(d), observed: time.Now().Add(-time.Minute)})), "compliant")
			if allow.GetDesired() != wantAllow {
				t.Fatalf("compliant: %v", allow)
			}
			// The executor applied it (its record, under its key).
			appliedAt := time.Now()
			if err := bus.Put(ctx, h.applied, d.key(t), &ev.AppliedRecord{DecisionId: allow.GetDecisionId(), DecidedAt: allow.GetDecidedAt(),
				Desired: wantAllow, AppliedAt: timestamppb.New(appliedAt), Outcome: ev.ApplyOutcome_APPLY_OUTCOME_APPLIED}); err != nil {
				t.Fatal(err)
			}
			// An administrator blocked the device by hand.
			d.state, d.reason = stBlocked, rsIndividual
			got := h.decide(matched(d, how{mdm: compliant(d), observed: tc.observed(appliedAt)}))
			alerts := h.newAlerts()
			if !tc.wantDrift {
				none(t, got, "stale observation")
				if len(alerts) != 0 {
					t.Fatalf("alerts for a stale observation: %v", alerts)
				}
				return
			}
			dec := only(t, got, "drift")
			if dec.GetDesired() != wantAllow || !strings.HasPrefix(dec.GetReason(), "drift:") || dec.GetDecisionId() == allow.GetDecisionId() {
				t.Fatalf("drift decision: %v", dec)
			}
			if len(alerts) != 1 || alerts[0].GetKind() != ev.AlertKind_ALERT_KIND_DRIFT || alerts[0].GetDetail()["decision_id"] != dec.GetDecisionId() {
				t.Fatalf("drift alerts: %v", alerts)
			}
			// Seen again before the correction is applied: no second alert.
			none(t, h.decide(matched(d, how{mdm: compliant(d), observed: tc.observed(appliedAt).Add(time.Second)})), "drift again")
			if a := h.newAlerts(); len(a) != 0 {
				t.Fatalf("second drift alert: %v", a)
			}
		})
	}
}

// stagedCount counts the entries of the guard's bucket under prefix.
func (h *harness) stagedCount(prefix string) int {
	h.t.Helper()
	ctx := context.Background()
	kv, err := h.js.KeyValue(ctx, bus.BucketStaged)
	if err != nil {
		h.t.Fatal(err)
	}
	l, err := kv.ListKeysFiltered(ctx, prefix+".>")
	if err != nil {
		h.t.Fatal(err)
	}
	n := 0
	for range l.Keys() {
		n++
	}
	return n
}

// guardStatus reads <org>.guard.
func (h *harness) guardStatus() (status.Guard, bool) {
	h.t.Helper()
	return statusOf[status.Guard](h, status.GuardKey)
}

// fleet makes n devices that have mail (allowed individually, compliant)
// and are known to the evaluator.
func (h *harness) fleet(n int) []device {
	h.t.Helper()
	var ds []device
	for i := range n {
		d := phone(fmt.Sprintf("user%d@contoso.com", i), fmt.Sprintf("ApplFLEET%d", i), stAllowed, rsIndividual)
		h.publish(matched(d, how{mdm: compliant(d)}))
		ds = append(ds, d)
	}
	h.settle()
	none(h.t, h.newDecisions(), "allowed fleet")
	return ds
}

// The blast-radius guard holds the revocations of a sync pass that would
// take mail from more than its share of the allowed devices, alerts once
// per set, and releases passes under the share or the minimum.
func TestBlastRadiusGuard(t *testing.T) {
	cases := []struct {
		name        string
		cfg         evaluator.Config
		fleet, revs int
		tripped     bool
	}{
		{name: "half the fleet", fleet: 10, revs: 5, tripped: true},
		{name: "under the minimum", cfg: evaluator.Config{BlastMinimum: 3}, fleet: 3, revs: 2},
		{name: "under the share", cfg: evaluator.Config{BlastRadius: 0.5}, fleet: 10, revs: 3},
		{name: "exactly the share", cfg: evaluator.Config{BlastRadius: 0.3}, fleet: 10, revs: 3},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, tc.cfg)
			ds := h.fleet(tc.fleet)
			revoke := func(syncID string) {
				for _, d := range ds[:tc.revs] {
					h.publish(matched(d, how{mdm: noncompliant(d), syncID: syncID}))
				}
				h.settle()
				none(t, h.newDecisions(), "revocations before their pass completed")
				h.syncCompleted(syncID)
				h.settle()
			}
			revoke("pass-1")
			got, alerts := h.newDecisions(), h.newAlerts()
			st, ok := h.guardStatus()
			if !ok {
				t.Fatal("no guard status")
			}
			if !tc.tripped {
				if len(got) != tc.revs || len(alerts) != 0 || st.State != "ok" || st.Revocations != tc.revs {
					t.Fatalf("released: %d decisions, %d alerts, status %+v", len(got), len(alerts), st)
				}
				for _, d := range got {
					if d.GetDesired() != wantBlock || d.GetRule() != policy.RuleNoncompliant || d.GetSyncId() != "pass-1" {
						t.Fatalf("released decision: %v", d)
					}
				}
				return
			}
			none(t, got, "tripped guard")
			if len(alerts) != 1 || alerts[0].GetKind() != ev.AlertKind_ALERT_KIND_BLAST_RADIUS || alerts[0].GetDetail()["revocations"] != fmt.Sprint(tc.revs) {
				t.Fatalf("alerts: %v", alerts)
			}
			if st.State != "tripped" || st.Revocations != tc.revs || st.Allowed != tc.fleet || st.Batch != "sync/pass-1" || st.Key == "" {
				t.Fatalf("guard status %+v", st)
			}
			// The devices keep their mail: the records say held, not staged.
			rec, _ := h.decisionRecord(ds[0])
			if !rec.GetHeld() || rec.GetStaged() {
				t.Fatalf("record of a refused revocation: held %v staged %v", rec.GetHeld(), rec.GetStaged())
			}

			// The next pass brings the same revocations: still held, no new alert.
			revoke("pass-2")
			none(t, h.newDecisions(), "tripped guard, second pass")
			if a := h.newAlerts(); len(a) != 0 {
				t.Fatalf("second alert for the same revocations: %v", a)
			}
			st2, _ := h.guardStatus()
			if st2.State != "tripped" || st2.Batch != "sync/pass-2" || st2.Key != st.Key || !st2.Since.Equal(st.Since) {
				t.Fatalf("guard status after the second pass %+v, first %+v", st2, st)
			}
		})
	}
}

// Revocations caused by MDM changes are gathered over the MDM window and
// judged together by the background loop, also when a burst of them
// straddles the boundary of two windows.
func TestBlastRadiusGuardMDMWindow(t *testing.T) {
	cases := []struct {
		name        string
		fleet, revs int
		later       int // of revs, how many fall into the next window
		tripped     bool
	}{
		{"mass revocation in one window", 10, 5, 0, true},
		{"mass revocation across two windows", 10, 5, 3, true},
		{"a few revocations", 10, 1, 0, false},
	}
	const window = 400 * time.Millisecond
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, evaluator.Config{MDMWindow: window})
			ds := h.fleet(tc.fleet)
			// All in one window that has not begun yet, so that none of
			// them is judged before the others have arrived.
			w := time.Now().UnixNano()/int64(window) + 3
			at := time.Unix(0, w*int64(window)+int64(window)/2)
			for i, d := range ds[:tc.revs] {
				if i == tc.revs-tc.later {
					at = at.Add(window) // the rest in the next window
				}
				h.publish(matched(d, how{mdm: noncompliant(d), trigger: "mdm", matched: at.Add(time.Duration(i) * time.Millisecond)}))
			}
			h.settle()
			none(t, h.newDecisions(), "revocations before their window closed")
			// The guard records its verdict, publishes, and only then drops
			// the staged revocations: once they are gone, all is out.
			batch := fmt.Sprintf("mdm/%d", w)
			natstest.Eventually(t, 10*time.Second, "window "+batch+" judged", func() bool {
				st, ok := h.guardStatus()
				return ok && st.Batch == batch && h.stagedCount(fmt.Sprintf("%s.mdm", org)) == 0
			})
			h.catchUp()
			got, alerts := h.newDecisions(), h.newAlerts()
			st, _ := h.guardStatus()
			if tc.tripped {
				none(t, got, "tripped guard")
				if len(alerts) != 1 || alerts[0].GetKind() != ev.AlertKind_ALERT_KIND_BLAST_RADIUS || st.State != "tripped" || st.Revocations != tc.revs {
					t.Fatalf("alerts %v, status %+v", alerts, st)
				}
				return
			}
			if len(got) != tc.revs || len(alerts) != 0 || st.State != "ok" {
				t.Fatalf("released: %v, alerts %v, status %+v", got, alerts, st)
			}
		})
	}
}

// A verdict that changes by time alone (the end of a grace period or of
// an exemption) is judged again when that time comes, without any new
// event: the device allowed for a while is then blocked.
func TestRecheckWhenTimeRunsOut(t *testing.T) {
	cases := []struct {
		name    string
		policy  func(until time.Time) string
		trigger string
		rule    string
	}{
		{"grace period ends (new device seen by a sync)", func(time.Time) string { return "grace_period: 3s\n" }, "eas", policy.RuleGracePeriod},
		{"grace period ends (MDM change)", func(time.Time) string { return "grace_period: 3s\n" }, "mdm", policy.RuleGracePeriod},
		{"exemption ends", func(until time.Time) string {
			return fmt.Sprintf("exemptions:\n  - {mailbox: alice@contoso.com, device_id: ApplNEW1, reason: travel, until: %q}\n", until.UTC().Format(time.RFC3339))
		}, "eas", policy.RuleExemptionDeviceID},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			now := time.Now()
			h := start(t, evaluator.Config{PolicyFile: policyFile(t, tc.policy(now.Add(4*time.Second)))})
			d := phone("alice@contoso.com", "ApplNEW1", stQuarantined, rsGlobal)
			d.first = now
			allow := only(t, h.decide(matched(d, how{trigger: tc.trigger})), "new device")
			if allow.GetDesired() != wantAllow || allow.GetRule() != tc.rule || allow.GetNotifyUser() {
				t.Fatalf("new device: %v", allow)
			}
			rec, _ := h.decisionRecord(d)
			if !rec.GetRecheckAt().IsValid() {
				t.Fatal("no recheck scheduled")
			}
			block := h.decided.Await(t, 8*time.Second, "a block decision after "+tc.rule+" ended", func(dec *ev.AccessDecided) bool {
				return dec.GetDesired() == wantBlock
			})
			if block.GetRule() != policy.RuleUnknownDevice || !block.GetNotifyUser() || block.GetPartnership().GetDeviceId() != d.id {
				t.Fatalf("after %s: %v", tc.rule, block)
			}
		})
	}
}

// evaluatorSpec is the evaluator's section as a worker binary loads it.
type evaluatorSpec struct{ Evaluator evaluator.Config }

func (s *evaluatorSpec) Validate() error { return s.Evaluator.Validate() }

// Bad settings are refused with an error that names the variable.
func TestConfigValidate(t *testing.T) {
	broken := filepath.Join(t.TempDir(), "broken.yaml")
	writePolicy(t, broken, "unknown_device: maybe\n", time.Now())
	good := policyFile(t, "notify: false\n")
	configtest.Check[evaluatorSpec](t, []configtest.Case{
		{Name: "defaults", Want: ""},
		{Name: "a policy file", Env: map[string]string{"EASGUARD_EVALUATOR_POLICY_FILE": good}, Want: ""},
		{Name: "share zero", Env: map[string]string{"EASGUARD_EVALUATOR_BLAST_RADIUS": "0"}, Want: "EASGUARD_EVALUATOR_BLAST_RADIUS"},
		{Name: "share above one", Env: map[string]string{"EASGUARD_EVALUATOR_BLAST_RADIUS": "1.5"}, Want: "EASGUARD_EVALUATOR_BLAST_RADIUS"},
		{Name: "share negative", Env: map[string]string{"EASGUARD_EVALUATOR_BLAST_RADIUS": "-0.1"}, Want: "EASGUARD_EVALUATOR_BLAST_RADIUS"},
		{Name: "share of one", Env: map[string]string{"EASGUARD_EVALUATOR_BLAST_RADIUS": "1"}, Want: ""},
		{Name: "minimum zero", Env: map[string]string{"EASGUARD_EVALUATOR_BLAST_MINIMUM": "0"}, Want: "EASGUARD_EVALUATOR_BLAST_MINIMUM"},
		{Name: "window too short", Env: map[string]string{"EASGUARD_EVALUATOR_MDM_WINDOW": "50ms"}, Want: "EASGUARD_EVALUATOR_MDM_WINDOW"},
		{Name: "missing policy file", Env: map[string]string{"EASGUARD_EVALUATOR_POLICY_FILE": filepath.Join(t.TempDir(), "none.yaml")}, Want: "EASGUARD_EVALUATOR_POLICY_FILE"},
		{Name: "broken policy file", Env: map[string]string{"EASGUARD_EVALUATOR_POLICY_FILE": broken}, Want: "EASGUARD_EVALUATOR_POLICY_FILE"},
	})
}

// A full sync of an organisation that is as the policy says judges every
// partnership and writes nothing: a verdict equal to the one a decision
// was last confirmed with, but for when it was made, leaves the record as
// it is. A verdict that differs in anything else (here the MDM record's
// check-in) is recorded. The pass's end is in the status either way.
func TestSteadyJudgementWritesNothing(t *testing.T) {
	h := start(t, evaluator.Config{})
	d := phone("alice@contoso.com", "ApplSTEADY", stAllowed, rsIndividual)
	mdm := compliant(d)
	t0 := time.Now().Add(-time.Hour)
	none(t, h.decide(matched(d, how{mdm: mdm, observed: t0, matched: t0})), "first verdict")
	revision := func() uint64 {
		t.Helper()
		e, err := h.decisions.Get(context.Background(), d.key(t))
		if err != nil {
			t.Fatal(err)
		}
		return e.Revision()
	}
	rev := revision()
	if rec, _ := h.decisionRecord(d); !rec.GetConfirmedAt().IsValid() {
		t.Fatalf("first verdict: not confirmed: %v", rec)
	}

	steps := []struct {
		name    string
		edit    func(*ev.MDMDevice)
		written bool
	}{
		{"the same verdict later: not written", nil, false},
		{"the MDM record checked in since: written", func(m *ev.MDMDevice) { m.LastCheckIn = timestamppb.New(t0.Add(time.Minute)) }, true},
		{"that verdict again: not written", func(m *ev.MDMDevice) { m.LastCheckIn = timestamppb.New(t0.Add(time.Minute)) }, false},
	}
	for i, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			m := proto.Clone(mdm).(*ev.MDMDevice)
			if s.edit != nil {
				s.edit(m)
			}
			at := t0.Add(time.Duration(i+1) * 5 * time.Minute)
			none(t, h.decide(matched(d, how{mdm: m, syncID: fmt.Sprint("sync-", i+2), observed: at, matched: at})), s.name)
			got := revision()
			if written := got != rev; written != s.written {
				t.Fatalf("record written = %v (revision %d → %d), want %v", written, rev, got, s.written)
			}
			rev = got
		})
	}

	h.syncCompleted("sync-4")
	var st status.PassJudged
	natstest.Eventually(t, 10*time.Second, "the pass's judged status", func() bool {
		var ok bool
		st, ok = statusOf[status.PassJudged](h, status.PassJudgedKey("quick"))
		return ok && st.SyncID == "sync-4"
	})
	if st.JudgedAt.Before(st.FinishedAt) || st.Kind != "quick" {
		t.Fatalf("judged status %+v", st)
	}
}

// A decision still waiting for the executor is not decided again when its
// partnership is seen unchanged long after (an onboarding queued behind
// Exchange's pace): that would queue a second apply behind the first. Once
// the executor has settled it without applying it (dead-lettered), the next
// sighting decides again.
func TestQueuedDecisionIsNotDecidedAgain(t *testing.T) {
	h := start(t, evaluator.Config{})
	ctx := natstest.Context(t)
	// The executor's consumer, bound but not consuming: a backlog.
	cons, err := h.js.CreateOrUpdateConsumer(ctx, bus.StreamDecisions,
		bus.DefaultTopology().ConsumerConfig("executor", "access-decided", bus.AccessDecided.Filter(org), org))
	if err != nil {
		t.Fatal(err)
	}
	d := phone("alice@contoso.com", "ApplQUEUED01", stQuarantined, rsGlobal)
	first := only(t, h.decide(matched(d, how{})), "unknown device")
	if first.GetDesired() != wantBlock {
		t.Fatalf("first decision: %v", first)
	}
	later := time.Now().Add(3 * time.Minute) // past the margin for a lost decision
	none(t, h.decide(matched(d, how{observed: later, matched: later})), "seen again while the decision waits for the executor")

	// The executor settles it without applying it.
	batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for m := range batch.Messages() {
		n++
		if err := m.Term(); err != nil {
			t.Fatal(err)
		}
	}
	if n != 1 {
		t.Fatalf("executor fetched %d decisions, want 1", n)
	}
	natstest.Eventually(t, 10*time.Second, "the executor's ack floor past the decision", func() bool {
		info, err := cons.Info(ctx)
		return err == nil && info.AckFloor.Stream >= 1 && info.NumAckPending == 0
	})
	later = later.Add(3 * time.Minute)
	again := only(t, h.decide(matched(d, how{observed: later, matched: later})), "seen again after the executor dropped the decision")
	if again.GetDesired() != wantBlock || again.GetDecisionId() == first.GetDecisionId() {
		t.Fatalf("decided again: %v (first %s)", again, first.GetDecisionId())
	}
}

// A decision is always later than the one it replaces, even when the
// replica that makes it read its clock before another replica's decision
// was recorded: the executor applies the newest by decision time, and
// would otherwise supersede the newer one (an Allow taken for older than
// the Block it replaces leaves an enrolled phone blocked).
func TestNewDecisionIsLaterThanTheOneItReplaces(t *testing.T) {
	h := start(t, evaluator.Config{})
	d := phone("alice@contoso.com", "ApplCLOCK001", stQuarantined, rsGlobal)
	block := only(t, h.decide(matched(d, how{})), "unknown device")
	behind := block.GetDecidedAt().AsTime().Add(-10 * time.Second)
	h.e.SetClock(func() time.Time { return behind })
	allow := only(t, h.decide(matched(d, how{mdm: compliant(d)})), "enrolled")
	if allow.GetDesired() != ev.DesiredAccess_DESIRED_ACCESS_ALLOW || !allow.GetDecidedAt().AsTime().After(block.GetDecidedAt().AsTime()) {
		t.Fatalf("allow decided at %v, block at %v: the newer decision must be later", allow.GetDecidedAt().AsTime(), block.GetDecidedAt().AsTime())
	}
}

// A page of the matcher's verdicts on confirmed partnerships is judged as
// the verdicts would be alone: a partnership as the policy says is neither
// written nor decided, one that Exchange holds back although it is
// compliant is allowed, and that decision continues the partnership's
// journey (the trace its partnership was first seen in), not the page's.
func TestConfirmedPageIsJudgedAsVerdictsAre(t *testing.T) {
	h := start(t, evaluator.Config{})
	steady := phone("alice@contoso.com", "ApplSTEADY", stAllowed, rsIndividual)
	held := phone("bob@contoso.com", "ApplHELD", stQuarantined, rsGlobal)
	t0 := time.Now().Add(-time.Hour)
	none(t, h.decide(matched(steady, how{mdm: compliant(steady), observed: t0, matched: t0})), "first verdict on the steady phone")
	e, err := h.decisions.Get(context.Background(), steady.key(t))
	if err != nil {
		t.Fatal(err)
	}
	rev := e.Revision()

	at := t0.Add(5 * time.Minute)
	page := &ev.DevicesMatched{Org: string(org), Sync: &ev.SyncRef{SyncId: "full-2", Kind: ev.SyncKind_SYNC_KIND_FULL}, Page: 1}
	journey := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	for i, d := range []device{steady, held} {
		m := matched(d, how{mdm: compliant(d), syncID: "full-2", observed: at, matched: at})
		m.Observed.Change = ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED
		page.Matches = append(page.Matches, m)
		page.Journeys = append(page.Journeys, []string{"", journey}[i])
	}
	subject, err := bus.DevicesConfirmed.Subject(org, ev.PageKey(page.GetSync(), 1))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subject, MsgID: "page-1", Message: page}); err != nil {
		t.Fatal(err)
	}
	h.settle()
	d := only(t, h.newDecisions(), "the page")
	if d.GetPartnership().GetDeviceId() != held.id || d.GetDesired() != ev.DesiredAccess_DESIRED_ACCESS_ALLOW {
		t.Fatalf("decision %v, want an allow for %s", d, held.id)
	}
	if e, err := h.decisions.Get(context.Background(), steady.key(t)); err != nil || e.Revision() != rev {
		t.Fatalf("the steady phone's record was rewritten (revision %d → %v, %v)", rev, e, err)
	}
	s, err := h.js.Stream(context.Background(), bus.StreamDecisions)
	if err != nil {
		t.Fatal(err)
	}
	subj, _ := bus.AccessDecided.Subject(org, held.id)
	msg, err := s.GetLastMsgForSubject(context.Background(), subj)
	if err != nil {
		t.Fatal(err)
	}
	if tp := msg.Header.Get("traceparent"); !strings.Contains(tp, "0af7651916cd43dd8448eb211c80319c") {
		t.Fatalf("the decision's traceparent %q is not of the partnership's journey", tp)
	}
}
