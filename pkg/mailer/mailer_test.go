package mailer_test

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/bus/bustest"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/mailer"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/notify"
	"github.com/easguard/easguard/pkg/telemetry/telemetrytest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/smtpsim"
)

const (
	org         bus.Org = "contoso"
	svcUser             = "svc-easguard@contoso.com"
	svcPassword         = "S3cret-pässword!"
	enrolURL            = "https://portal.manage.microsoft.com/enrol?tenant=contoso"
	helpdesk            = "the IT helpdesk on +49 30 1234-567"
	period              = time.Hour
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// clock is the mailer's clock in these tests, so the notification period
// can pass without waiting for it.
type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Date(2026, 3, 2, 9, 30, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *clock) Now() time.Time          { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

type options struct {
	locale string
	// noSentObserver leaves notify.sent unobserved, for a test that
	// deletes its stream.
	noSentObserver bool
	// replicas is how many mailers share the consumer (default 1), each
	// handling several messages at once.
	replicas int
	// alerts sets where alerts go (the Alert* settings).
	alerts func(*mailer.Config)
	// password, when set, is the one easguard logs on to the relay with
	// (the relay knows svcPassword).
	password string
}

// harness is one mailer on a real JetStream server, sending through the
// real notify.Sender to a simulated relay that requires STARTTLS and AUTH.
type harness struct {
	js       jetstream.JetStream
	pub      *bus.Publisher
	relay    *smtpsim.Server
	clock    *clock
	cfg      mailer.Config
	consumer string

	sent *natstest.Received[*ev.NotificationSent] // nil with noSentObserver
	dead *natstest.Received[bustest.DeadLetter[*ev.AccessApplied]]
	// metrics are what the mailers record.
	metrics *telemetrytest.Metrics
}

// wantMails checks easguard.mails by outcome and error class.
func (h *harness) wantMails(tb testing.TB, want map[[2]string]float64) {
	tb.Helper()
	for k, n := range want {
		labels := map[string]string{"easguard.org": string(org), "easguard.outcome": k[0]}
		if k[1] != "" {
			labels["error.type"] = k[1]
		}
		if got := h.metrics.Value(tb, "easguard.mails", labels); got != n {
			tb.Errorf("easguard.mails%v = %v, want %v", labels, got, n)
		}
	}
}

func start(tb testing.TB, o options) *harness {
	tb.Helper()
	if o.locale == "" {
		o.locale = "en"
	}
	relay := smtpsim.StartTest(tb, smtpsim.Config{Users: map[string]string{svcUser: svcPassword}})
	ca := filepath.Join(tb.TempDir(), "smtp-ca.pem")
	if err := os.WriteFile(ca, relay.CertPEM(), 0o600); err != nil {
		tb.Fatal(err)
	}
	cfg := mailer.Config{
		SmtpHost: relay.Host(), SmtpPort: relay.Port(), SmtpSecurity: "starttls", SmtpUser: svcUser, SmtpPassword: config.Secret(cmp.Or(o.password, svcPassword)),
		SmtpCABundle: ca, From: "IT Service <it@contoso.com>", EnrolURL: enrolURL, Helpdesk: helpdesk, Company: "Contoso Ltd",
		Locale: o.locale, Period: period, AlertWebhookFormat: mailer.FormatAlertmanager,
	}
	if o.alerts != nil {
		o.alerts(&cfg)
	}
	if err := cfg.Validate(); err != nil {
		tb.Fatal(err)
	}
	// The sender as pkg/pipeline builds it from the configuration.
	sender, err := cfg.NewSender()
	if err != nil {
		tb.Fatal(err)
	}
	ctx := natstest.Context(tb)
	_, _, js := natstest.Start(tb)
	if err := bus.Provision(ctx, js, bus.DefaultTopology()); err != nil {
		tb.Fatal(err)
	}
	h := &harness{js: js, relay: relay, clock: newClock(), cfg: cfg, metrics: telemetrytest.NewMetrics(tb)}
	for range max(1, o.replicas) {
		m, err := mailer.New(ctx, js, org, cfg, sender, quiet())
		if err != nil {
			tb.Fatal(err)
		}
		if err := m.Instrument(h.metrics.Provider); err != nil {
			tb.Fatal(err)
		}
		mailer.SetClock(m, h.clock.Now)
		r, err := bus.NewRunner(js, bus.RunnerConfig{Service: "mailer", Org: org, Concurrency: max(1, o.replicas),
			Retry:  bus.RetryPolicy{Initial: 100 * time.Millisecond, Max: time.Second, Multiplier: 2, Jitter: 0.1},
			Logger: quiet()}, m.Routes()...)
		if err != nil {
			tb.Fatal(err)
		}
		m.SetPublisher(r.Publisher())
		bustest.Run(tb, r)
	}
	h.consumer = bus.DefaultTopology().ConsumerConfig("mailer", "access-applied", bus.AccessApplied.Filter(org), org).Durable
	if h.pub, err = bus.NewPublisher(js, bus.Instrumentation{}); err != nil {
		tb.Fatal(err)
	}
	if !o.noSentObserver {
		h.sent = natstest.Receive[ev.NotificationSent](tb, js, bus.StreamNotify, bus.NotifySent.Filter(org))
	}
	h.dead = bustest.DeadLetters[ev.AccessApplied](tb, js, org, "mailer")
	return h
}

var seq atomic.Int64

// user is a mailbox as the collector reports it.
func user(name string) *ev.Mailbox {
	alias := strings.ToLower(strings.ReplaceAll(name, " ", "."))
	return &ev.Mailbox{Identity: "contoso.com/Users/" + name, Guid: fmt.Sprintf("5e1f0c2a-0000-4000-8000-%012d", seq.Add(1)),
		PrimarySmtpAddress: alias + "@contoso.com", UserPrincipalName: alias + "@corp.contoso.com", DisplayName: name}
}

// phone is one partnership of mb.
func phone(mb *ev.Mailbox, deviceID, friendly string) *ev.EASPartnership {
	return &ev.EASPartnership{Mailbox: mb, DeviceId: deviceID, DeviceType: "iPhone", DeviceModel: "iPhone15C2", DeviceOs: "iOS 17.4",
		FriendlyName: friendly, Guid: fmt.Sprintf("0b9e6a1d-0000-4000-8000-%012d", seq.Add(1)),
		Identity: mb.GetIdentity() + "/ExchangeActiveSyncDevices/iPhone§" + deviceID}
}

// decision is what the evaluator publishes for a phone it keeps from mail
// and whose user it wants told.
func (h *harness) decision(p *ev.EASPartnership, desired ev.DesiredAccess, reason string) *ev.AccessDecided {
	return &ev.AccessDecided{
		Org: string(org), DecisionId: fmt.Sprintf("dec-%d-%d", time.Now().UnixNano(), seq.Add(1)), Partnership: p, Desired: desired,
		Rule: "unknown_device", Reason: "The device is not enrolled in Intune.", NotifyUser: true, NotifyReason: reason,
		NoMatchReason: ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD, DecidedAt: timestamppb.New(h.clock.Now()), PolicyVersion: "policy-3",
	}
}

// publish sends what the executor publishes once it applied a decision
// on Exchange; a msgID other than "" replaces its message id.
func (h *harness) publish(tb testing.TB, d *ev.AccessDecided, msgID string) {
	tb.Helper()
	h.publishOutcome(tb, d, ev.ApplyOutcome_APPLY_OUTCOME_APPLIED, msgID)
}

// publishOutcome sends the executor's access.applied for d with the given
// outcome, as executor.Apply builds it.
func (h *harness) publishOutcome(tb testing.TB, d *ev.AccessDecided, outcome ev.ApplyOutcome, msgID string) {
	tb.Helper()
	p := d.GetPartnership()
	subject, err := bus.AccessApplied.Subject(org, p.GetDeviceId())
	if err != nil {
		tb.Fatal(err)
	}
	if msgID == "" {
		msgID = "applied:" + d.GetDecisionId()
	}
	a := &ev.AccessApplied{Org: string(org), DecisionIds: []string{d.GetDecisionId()}, Decision: d, AppliedAt: timestamppb.New(h.clock.Now()),
		Items: []*ev.AppliedItem{{Mailbox: p.GetMailbox(), DeviceId: p.GetDeviceId(), Desired: d.GetDesired(), DecisionId: d.GetDecisionId(), Outcome: outcome}}}
	if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subject, MsgID: msgID, Message: a}); err != nil {
		tb.Fatal(err)
	}
}

// sentFor returns the notify.sent events of one decision.
func (h *harness) sentFor(decisionID string) []*ev.NotificationSent {
	var out []*ev.NotificationSent
	for _, s := range h.sent.All() {
		if s.GetDecisionId() == decisionID {
			out = append(out, s)
		}
	}
	return out
}

// awaitSent waits for the notify.sent of a decision and returns it with
// the mail the relay received for it.
func (h *harness) awaitSent(tb testing.TB, d *ev.AccessDecided) (*ev.NotificationSent, smtpsim.Message) {
	tb.Helper()
	s := h.sent.Await(tb, 20*time.Second, "notify.sent for "+d.GetDecisionId(), func(s *ev.NotificationSent) bool {
		return s.GetDecisionId() == d.GetDecisionId()
	})
	mails := h.mailsWithID(s.GetMessageId())
	if len(mails) != 1 {
		tb.Fatalf("%d mails with Message-ID %s, want 1", len(mails), s.GetMessageId())
	}
	return s, mails[0]
}

// awaitDead waits for the dead letter of a decision.
func (h *harness) awaitDead(tb testing.TB, d *ev.AccessDecided) bustest.DeadLetter[*ev.AccessApplied] {
	tb.Helper()
	return h.dead.Await(tb, 20*time.Second, "dead letter for "+d.GetDecisionId(), func(dl bustest.DeadLetter[*ev.AccessApplied]) bool {
		return dl.Message.GetDecision().GetDecisionId() == d.GetDecisionId()
	})
}

func (h *harness) mailsWithID(id string) []smtpsim.Message {
	var out []smtpsim.Message
	for _, m := range h.relay.Messages() {
		if m.MessageID == id {
			out = append(out, m)
		}
	}
	return out
}

// redeliveries counts how often applied decisions were delivered to the
// mailer again; every event in the stream is one it consumes.
func (h *harness) redeliveries(tb testing.TB) int {
	tb.Helper()
	return natstest.Redeliveries(tb, h.js, bus.StreamApplied, h.consumer)
}

// settle waits until the mailer has settled every decision published so
// far. It sends and publishes before it acknowledges, so after settle
// every mail it was going to send is at the relay and every notify.sent is
// in the stream.
func (h *harness) settle(tb testing.TB) {
	tb.Helper()
	natstest.WaitDrained(tb, h.js, 20*time.Second, bus.StreamApplied)
}

// settleSent waits until the notify.sent events in the stream have all
// reached the observer.
func (h *harness) settleSent(tb testing.TB) {
	tb.Helper()
	natstest.Eventually(tb, 10*time.Second, "notify.sent observed", func() bool {
		s, err := h.js.Stream(context.Background(), bus.StreamNotify)
		if err != nil {
			return false
		}
		return uint64(h.sent.Len()) == s.CachedInfo().State.Msgs
	})
}

func messageID(d *ev.AccessDecided) string { return "<" + d.GetDecisionId() + "@easguard.invalid>" }

// A decision that asks for it sends the user exactly one mail, with the
// enrolment link, the device and the reason, and notify.sent says so with
// the mail's Message-ID, which is derived from the decision.
func TestNotifySendsTheEnrolmentMail(t *testing.T) {
	h := start(t, options{})
	mb := user("Anna Schmidt")
	p := phone(mb, "ApplF17QX2N3P0D", "Anna's iPhone")
	d := h.decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled)
	h.publish(t, d, "")
	s, mail := h.awaitSent(t, d)
	h.settle(t)
	if n := len(h.relay.Messages()); n != 1 {
		t.Fatalf("%d mails, want 1", n)
	}

	if !slices.Equal(mail.To, []string{"anna.schmidt@contoso.com"}) || mail.From != "it@contoso.com" || !mail.TLS || mail.AuthUser != svcUser {
		t.Errorf("envelope to %v from %q, TLS %v, auth %q", mail.To, mail.From, mail.TLS, mail.AuthUser)
	}
	if mail.MessageID != messageID(d) {
		t.Errorf("Message-ID %q, want %q", mail.MessageID, messageID(d))
	}
	if want := "Action required: enrol your device “Anna's iPhone” to use work email"; mail.Subject != want {
		t.Errorf("subject %q, want %q", mail.Subject, want)
	}
	for _, want := range []string{"Hello Anna Schmidt", enrolURL, "Anna's iPhone", "ApplF17QX2N3P0D", "iPhone15C2", "iOS 17.4",
		"not enrolled in device management", "Details: The device is not enrolled in Intune.", helpdesk, "Contoso Ltd", "anna.schmidt@contoso.com"} {
		if !strings.Contains(mail.Text, want) {
			t.Errorf("text body does not say %q:\n%s", want, mail.Text)
		}
	}
	if !strings.Contains(mail.HTML, `href="https://portal.manage.microsoft.com/enrol?tenant=contoso"`) || !strings.Contains(mail.HTML, "ApplF17QX2N3P0D") {
		t.Errorf("HTML body lacks the enrolment link or the device id:\n%s", mail.HTML)
	}

	if s.GetMessageId() != messageID(d) || s.GetRecipient() != "anna.schmidt@contoso.com" || s.GetTemplate() != "blocked/not_enrolled" ||
		s.GetLocale() != "en" || s.GetDeviceId() != "ApplF17QX2N3P0D" || s.GetOrg() != string(org) ||
		!proto.Equal(s.GetMailbox(), mb) || !s.GetSentAt().AsTime().Equal(h.clock.Now()) {
		t.Errorf("notify.sent %v", s)
	}

	// The same decision again (a redelivery): no second mail, and the
	// report is not repeated either.
	h.publish(t, d, "decided-again:"+d.GetDecisionId())
	h.settle(t)
	h.settleSent(t)
	if n := len(h.relay.Messages()); n != 1 {
		t.Errorf("%d mails after a redelivery, want 1", n)
	}
	if n := len(h.sentFor(d.GetDecisionId())); n != 1 {
		t.Errorf("%d notify.sent for the decision, want 1", n)
	}
}

// A user gets at most one mail per device per period, however often the
// device is decided again; after the period, a new decision mails again.
func TestAtMostOneMailPerDevicePerPeriod(t *testing.T) {
	h := start(t, options{})
	mb := user("Ben Meyer")
	p := phone(mb, "androidc4711081500", "Ben's Pixel")
	first := h.decision(p, ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE, notify.ReasonNotEnrolled)
	h.publish(t, first, "")
	s1, _ := h.awaitSent(t, first)
	if s1.GetTemplate() != "quarantine/not_enrolled" {
		t.Errorf("template %q", s1.GetTemplate())
	}

	steps := []struct {
		name    string
		advance time.Duration // clock moves this far before the decision
		phone   *ev.EASPartnership
		desired ev.DesiredAccess
		mails   bool
	}{
		{"decided again at once", 0, p, ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE, false},
		{"blocked now, same device, within the period", 10 * time.Minute, p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, false},
		{"a second device of the same user", 0, phone(mb, "ApplSECONDPHONE1", "Ben's iPad"), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, true},
		{"one second before the period ends", period - 10*time.Minute - time.Second, p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, false},
		{"the period is over", time.Second, p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, true},
		{"and the new mail starts a new period", time.Minute, p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, false},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			h.clock.Advance(st.advance)
			before := len(h.relay.Messages())
			d := h.decision(st.phone, st.desired, notify.ReasonNotEnrolled)
			h.publish(t, d, "")
			if st.mails {
				s, mail := h.awaitSent(t, d)
				if mail.MessageID == s1.GetMessageId() || s.GetMessageId() != messageID(d) {
					t.Errorf("Message-ID %q for a new decision (first was %q)", mail.MessageID, s1.GetMessageId())
				}
			}
			h.settle(t)
			h.settleSent(t)
			want := 0
			if st.mails {
				want = 1
			}
			if n := len(h.relay.Messages()) - before; n != want {
				t.Errorf("%d mails, want %d", n, want)
			}
			if n := len(h.sentFor(d.GetDecisionId())); n != want {
				t.Errorf("%d notify.sent, want %d", n, want)
			}
		})
	}
}

// Decisions that do not keep a user from mail, or only pretend to, or do
// not ask for a mail, send none and are not errors.
func TestNoMailWhenNotWanted(t *testing.T) {
	h := start(t, options{})
	tests := []struct {
		name   string
		mutate func(*ev.AccessDecided)
	}{
		{"dry run", func(d *ev.AccessDecided) { d.DryRun = true }},
		{"allow", func(d *ev.AccessDecided) { d.Desired = ev.DesiredAccess_DESIRED_ACCESS_ALLOW; d.Rule = "compliant" }},
		{"notify_user false", func(d *ev.AccessDecided) { d.NotifyUser, d.NotifyReason = false, "" }},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := h.decision(phone(user(fmt.Sprintf("Quiet User%d", i)), fmt.Sprintf("ApplQUIET%d", i), ""), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled)
			tt.mutate(d)
			h.publish(t, d, "")
			h.settle(t)
			h.settleSent(t)
			if n := len(h.relay.Messages()); n != 0 {
				t.Errorf("%d mails", n)
			}
			if n := len(h.sentFor(d.GetDecisionId())); n != 0 {
				t.Errorf("%d notify.sent", n)
			}
			if dl := h.dead.All(); len(dl) != 0 {
				t.Errorf("dead letters %v", dl)
			}
		})
	}
	if n := h.redeliveries(t); n != 0 {
		t.Errorf("%d redeliveries", n)
	}
}

// The mail follows what happened on Exchange, not what was decided: a
// block the executor applied, or found already in place, is mailed about;
// one that was superseded, whose mailbox is gone, that failed or that was
// only a dry run is not, and neither is an executor's report that does not
// say which decision it applied.
func TestMailFollowsTheAppliedOutcome(t *testing.T) {
	h := start(t, options{})
	tests := []struct {
		outcome ev.ApplyOutcome
		mails   bool
	}{
		{ev.ApplyOutcome_APPLY_OUTCOME_APPLIED, true},
		{ev.ApplyOutcome_APPLY_OUTCOME_ALREADY_IN_STATE, true},
		{ev.ApplyOutcome_APPLY_OUTCOME_SUPERSEDED, false},
		{ev.ApplyOutcome_APPLY_OUTCOME_NOT_FOUND, false},
		{ev.ApplyOutcome_APPLY_OUTCOME_FAILED, false},
		{ev.ApplyOutcome_APPLY_OUTCOME_INVALID, false},
		{ev.ApplyOutcome_APPLY_OUTCOME_SKIPPED_DRY_RUN, false},
	}
	for i, tt := range tests {
		t.Run(tt.outcome.String(), func(t *testing.T) {
			before := len(h.relay.Messages())
			d := h.decision(phone(user(fmt.Sprintf("Outcome User%d", i)), fmt.Sprintf("ApplOUTCOME%d", i), ""), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled)
			h.publishOutcome(t, d, tt.outcome, "")
			if tt.mails {
				h.awaitSent(t, d)
			}
			h.settle(t)
			h.settleSent(t)
			want := 0
			if tt.mails {
				want = 1
			}
			if n := len(h.relay.Messages()) - before; n != want {
				t.Errorf("%d mails, want %d", n, want)
			}
			if n := len(h.sentFor(d.GetDecisionId())); n != want {
				t.Errorf("%d notify.sent, want %d", n, want)
			}
		})
	}
	t.Run("no decision in the report", func(t *testing.T) {
		before := len(h.relay.Messages())
		mb := user("Old Executor")
		subject, err := bus.AccessApplied.Subject(org, "ApplOLDEXEC")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subject, MsgID: "applied:old", Message: &ev.AccessApplied{
			Org: string(org), DecisionIds: []string{"dec-old"}, AppliedAt: timestamppb.New(h.clock.Now()), Items: []*ev.AppliedItem{{Mailbox: mb, DeviceId: "ApplOLDEXEC",
				Desired: ev.DesiredAccess_DESIRED_ACCESS_BLOCK, DecisionId: "dec-old", Outcome: ev.ApplyOutcome_APPLY_OUTCOME_APPLIED}},
		}}); err != nil {
			t.Fatal(err)
		}
		h.settle(t)
		if n := len(h.relay.Messages()) - before; n != 0 {
			t.Errorf("%d mails", n)
		}
	})
	if dl := h.dead.All(); len(dl) != 0 {
		t.Errorf("dead letters %v", dl)
	}
}

// Several mailer replicas handling many applied decisions for one device
// at once send its user one mail: the notified key is claimed with
// compare-and-set before the mail goes out.
func TestOneMailPerDeviceAcrossReplicas(t *testing.T) {
	const replicas, decisions = 3, 24
	h := start(t, options{replicas: replicas})
	p := phone(user("Carla Vogel"), "ApplREPLICAS0001", "Carla's iPhone")
	ds := make([]*ev.AccessDecided, decisions)
	for i := range ds {
		ds[i] = h.decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled)
	}
	for _, d := range ds {
		h.publish(t, d, "")
	}
	h.settle(t)
	h.settleSent(t)
	if n := len(h.relay.Messages()); n != 1 {
		t.Errorf("%d mails from %d replicas for %d decisions about one device, want 1", n, replicas, decisions)
	}
	if n := h.sent.Len(); n != 1 {
		t.Errorf("%d notify.sent, want 1", n)
	}
	t.Logf("%d replicas, %d decisions for one device: %d mail", replicas, decisions, len(h.relay.Messages()))
}

// notify_reason picks the mail (and, without one, what the decision says
// about the device does); a quarantine gets the quarantine wording.
func TestTemplateFollowsTheReason(t *testing.T) {
	h := start(t, options{})
	mdm := &ev.MDMDevice{Source: "intune", MdmDeviceId: "m-1", UserPrincipalName: "x@contoso.com", ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT}
	tests := []struct {
		name     string
		desired  ev.DesiredAccess
		reason   string
		mutate   func(*ev.AccessDecided)
		template string // "" = not checked
		subject  string
	}{
		{"not enrolled", ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled, nil, "blocked/not_enrolled",
			"Action required: enrol your device “Work Phone” to use work email"},
		{"noncompliant", ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNoncompliant, nil, "blocked/noncompliant",
			"Action required: your device “Work Phone” does not meet the security requirements"},
		{"retired", ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonRetired, nil, "blocked/retired",
			"Action required: enrol your device “Work Phone” again to use work email"},
		{"platform not allowed", ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonPlatformNotAllowed, nil, "blocked/platform_not_allowed",
			"Your device “Work Phone” cannot be used for work email"},
		{"other, quarantined", ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE, notify.ReasonOther, nil, "quarantine/other",
			"Action required: your device “Work Phone” is quarantined"},
		{"other, blocked", ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonOther, nil, "blocked/other",
			"Action required: your device “Work Phone” is blocked from work email"},
		{"no reason, no MDM record", ev.DesiredAccess_DESIRED_ACCESS_BLOCK, "", nil, "blocked/not_enrolled",
			"Action required: enrol your device “Work Phone” to use work email"},
		{"no reason, retired in the MDM", ev.DesiredAccess_DESIRED_ACCESS_BLOCK, "",
			func(d *ev.AccessDecided) { d.NoMatchReason = ev.NoMatchReason_NO_MATCH_REASON_RETIRED }, "blocked/retired",
			"Action required: enrol your device “Work Phone” again to use work email"},
		{"no reason, rule platform_not_allowed", ev.DesiredAccess_DESIRED_ACCESS_BLOCK, "",
			func(d *ev.AccessDecided) { d.Rule = "platform_not_allowed" }, "blocked/platform_not_allowed",
			"Your device “Work Phone” cannot be used for work email"},
		{"no reason, matched and noncompliant", ev.DesiredAccess_DESIRED_ACCESS_BLOCK, "",
			func(d *ev.AccessDecided) { d.Mdm, d.NoMatchReason, d.Rule = mdm, 0, "noncompliant" }, "blocked/noncompliant",
			"Action required: your device “Work Phone” does not meet the security requirements"},
		{"no reason, matched, another rule", ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE, "",
			func(d *ev.AccessDecided) { d.Mdm, d.NoMatchReason, d.Rule = mdm, 0, "grace_expired" }, "quarantine/other",
			"Action required: your device “Work Phone” is quarantined"},
		{"a reason the templates do not know", ev.DesiredAccess_DESIRED_ACCESS_BLOCK, "byod_limit", nil, "",
			"Action required: your device “Work Phone” is blocked from work email"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := h.decision(phone(user(fmt.Sprintf("Template User%d", i)), fmt.Sprintf("ApplTMPL%02d", i), "Work Phone"), tt.desired, tt.reason)
			if tt.mutate != nil {
				tt.mutate(d)
			}
			h.publish(t, d, "")
			s, mail := h.awaitSent(t, d)
			if mail.Subject != tt.subject {
				t.Errorf("subject %q, want %q", mail.Subject, tt.subject)
			}
			if tt.template != "" && s.GetTemplate() != tt.template {
				t.Errorf("template %q, want %q", s.GetTemplate(), tt.template)
			}
		})
	}
	// Each reason has its own subject.
	subjects := map[string]bool{}
	for _, m := range h.relay.Messages() {
		subjects[m.Subject] = true
	}
	if len(subjects) != 6 {
		t.Errorf("%d different subjects for 6 kinds of mail: %v", len(subjects), subjects)
	}

	t.Run("German", func(t *testing.T) {
		de := start(t, options{locale: "de"})
		d := de.decision(phone(user("Greta Weber"), "ApplGERMAN01", "Gretas iPhone"), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled)
		de.publish(t, d, "")
		s, mail := de.awaitSent(t, d)
		if want := "Handlungsbedarf: Registrieren Sie Ihr Gerät „Gretas iPhone“ für dienstliche E-Mails"; mail.Subject != want {
			t.Errorf("subject %q, want %q", mail.Subject, want)
		}
		for _, want := range []string{"Guten Tag Greta Weber", "nicht in der Geräteverwaltung", "Geräte-ID:      ApplGERMAN01", enrolURL} {
			if !strings.Contains(mail.Text, want) {
				t.Errorf("German text does not say %q:\n%s", want, mail.Text)
			}
		}
		if s.GetLocale() != "de" {
			t.Errorf("locale %q", s.GetLocale())
		}
	})
}

// A temporary SMTP failure is retried and the mail goes out once; a
// permanent one dead-letters the decision without a mail, and a later
// decision for the device is not held back by the failed one.
func TestSMTPFailures(t *testing.T) {
	t.Run("451 once", func(t *testing.T) {
		h := start(t, options{})
		h.relay.FailNext(1, 451, "Temporary local problem, try again")
		d := h.decision(phone(user("Carl Koch"), "ApplTEMPFAIL01", "Carl's iPhone"), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled)
		h.publish(t, d, "")
		s, mail := h.awaitSent(t, d)
		h.settle(t)
		h.settleSent(t)
		if n := len(h.relay.Messages()); n != 1 {
			t.Errorf("%d mails, want 1", n)
		}
		if mail.MessageID != messageID(d) || s.GetMessageId() != messageID(d) {
			t.Errorf("Message-ID %q / %q, want %q from the decision", mail.MessageID, s.GetMessageId(), messageID(d))
		}
		if n := len(h.sentFor(d.GetDecisionId())); n != 1 {
			t.Errorf("%d notify.sent", n)
		}
		if n := h.redeliveries(t); n != 1 {
			t.Errorf("%d redelivered messages, want the one that failed", n)
		}
		if dl := h.dead.All(); len(dl) != 0 {
			t.Errorf("dead letters %v", dl)
		}
		h.wantMails(t, map[[2]string]float64{{"sent", ""}: 1, {"failed", "transient"}: 1})
	})

	permanent := []struct {
		name   string
		inject func(*smtpsim.Server)
		reason string
	}{
		{"550 after DATA", func(s *smtpsim.Server) { s.FailNext(1, 550, "Message rejected by policy") }, "550"},
		{"550 unknown recipient", func(s *smtpsim.Server) { s.FailNextRcpt(1, 550, "Recipient address rejected: User unknown") }, "User unknown"},
	}
	for _, tt := range permanent {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t, options{})
			tt.inject(h.relay)
			p := phone(user("Dora Richter"), "ApplPERMFAIL01", "Dora's iPhone")
			d := h.decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled)
			h.publish(t, d, "")
			dl := h.awaitDead(t, d)
			if !strings.Contains(dl.Reason, "permanent") || !strings.Contains(dl.Reason, tt.reason) || !strings.Contains(dl.Reason, "dora.richter@contoso.com") {
				t.Errorf("dead-letter reason %q", dl.Reason)
			}
			h.settle(t)
			h.settleSent(t)
			if n := len(h.relay.Messages()); n != 0 {
				t.Errorf("%d mails", n)
			}
			if n := h.sent.Len(); n != 0 {
				t.Errorf("%d notify.sent", n)
			}
			if n := h.redeliveries(t); n != 0 {
				t.Errorf("a permanent failure was retried (%d redeliveries)", n)
			}
			// Nothing was sent, so nothing holds the next decision back.
			again := h.decision(p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled)
			h.publish(t, again, "")
			h.awaitSent(t, again)
			h.wantMails(t, map[[2]string]float64{{"sent", ""}: 1, {"failed", "permanent"}: 1, {"failed", "transient"}: 0})
		})
	}
}

// The mail goes to the primary SMTP address, else to the UPN; a decision
// with neither is dead-lettered with the reason.
func TestRecipientAddress(t *testing.T) {
	h := start(t, options{})
	t.Run("UPN when there is no SMTP address", func(t *testing.T) {
		mb := user("Emil Becker")
		mb.PrimarySmtpAddress = ""
		d := h.decision(phone(mb, "ApplUPNONLY01", ""), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled)
		h.publish(t, d, "")
		s, mail := h.awaitSent(t, d)
		if !slices.Equal(mail.To, []string{"emil.becker@corp.contoso.com"}) || s.GetRecipient() != "emil.becker@corp.contoso.com" {
			t.Errorf("sent to %v (%q)", mail.To, s.GetRecipient())
		}
		if want := "Action required: enrol your device “iPhone15C2” to use work email"; mail.Subject != want {
			t.Errorf("without a friendly name: subject %q, want %q", mail.Subject, want)
		}
	})
	t.Run("no address at all", func(t *testing.T) {
		mb := user("Finn Wagner")
		mb.PrimarySmtpAddress, mb.UserPrincipalName = "", ""
		before := len(h.relay.Messages())
		d := h.decision(phone(mb, "ApplNOADDR01", ""), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled)
		h.publish(t, d, "")
		dl := h.awaitDead(t, d)
		if want := `no address for mailbox "contoso.com/Users/Finn Wagner"`; !strings.Contains(dl.Reason, want) {
			t.Errorf("dead-letter reason %q does not say %q", dl.Reason, want)
		}
		h.settle(t)
		if n := len(h.relay.Messages()) - before; n != 0 {
			t.Errorf("%d mails", n)
		}
		if n := len(h.sentFor(d.GetDecisionId())); n != 0 {
			t.Errorf("%d notify.sent", n)
		}
	})
}

// The runner publishes a handler's outputs before it acknowledges the
// input, so that nothing is lost: if notify.sent cannot be published after
// the mail went out, the redelivered decision must still report it (and
// must not mail again).
func TestNotifySentSurvivesAFailedPublish(t *testing.T) {
	h := start(t, options{noSentObserver: true})
	ctx := context.Background()
	if err := h.js.DeleteStream(ctx, bus.StreamNotify); err != nil {
		t.Fatal(err)
	}
	d := h.decision(phone(user("Hanna Schulz"), "ApplLOSTSENT01", "Hanna's iPhone"), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, notify.ReasonNotEnrolled)
	h.publish(t, d, "")
	if _, err := h.relay.WaitFor(testContext(t), 1); err != nil {
		t.Fatal(err)
	}
	natstest.Eventually(t, 20*time.Second, "the decision redelivered after the failed publish", func() bool { return h.redeliveries(t) > 0 })
	// NATS is back.
	if err := bus.Provision(ctx, h.js, bus.DefaultTopology()); err != nil {
		t.Fatal(err)
	}
	h.settle(t)
	if n := len(h.relay.Messages()); n != 1 {
		t.Errorf("%d mails, want 1", n)
	}
	subj, err := bus.NotifySent.Subject(org, d.GetPartnership().GetDeviceId())
	if err != nil {
		t.Fatal(err)
	}
	s, err := h.js.Stream(ctx, bus.StreamNotify)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := s.GetLastMsgForSubject(ctx, subj)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Fatalf("the mail went out (Message-ID %s) but notify.sent was never published: the redelivered decision was acknowledged without it", messageID(d))
	}
	if err != nil {
		t.Fatal(err)
	}
	var sent ev.NotificationSent
	if err := proto.Unmarshal(msg.Data, &sent); err != nil || sent.GetDecisionId() != d.GetDecisionId() || sent.GetMessageId() != messageID(d) {
		t.Errorf("notify.sent %v (%v)", &sent, err)
	}
}

func testContext(tb testing.TB) context.Context {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

// section is how the services embed the mailer's settings, so that
// config.Load names them EASGUARD_MAILER_*.
type section struct{ Mailer mailer.Config }

func (s *section) Validate() error { return s.Mailer.Validate() }

// clearEnv unsets every EASGUARD_ variable for the test.
func clearEnv(tb testing.TB) {
	tb.Helper()
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, config.Prefix+"_") {
			tb.Setenv(k, "")
			os.Unsetenv(k)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	required := map[string]string{
		"EASGUARD_MAILER_SMTP_HOST": "smtp.contoso.com",
		"EASGUARD_MAILER_FROM":      "IT Service <it@contoso.com>",
		"EASGUARD_MAILER_ENROL_URL": "https://portal.manage.microsoft.com",
	}
	setEnv := func(t *testing.T, override map[string]string) {
		t.Helper()
		clearEnv(t)
		for k, v := range required {
			t.Setenv(k, v)
		}
		for k, v := range override {
			t.Setenv(k, v)
		}
	}
	setEnv(t, nil)
	var defaults section
	if err := config.Load(&defaults); err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	if c := defaults.Mailer; c.SmtpPort != 587 || c.SmtpSecurity != "starttls" || c.Locale != "en" || c.Period != 24*time.Hour {
		t.Fatalf("defaults %+v", c)
	}
	badTemplates := t.TempDir()
	if err := os.MkdirAll(filepath.Join(badTemplates, "en"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(badTemplates, "en", notify.SubjectFile), []byte("{{.Nope"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, env, value string
		mutate           func(*mailer.Config)
	}{
		{"no SMTP host", "EASGUARD_MAILER_SMTP_HOST", "", func(c *mailer.Config) { c.SmtpHost = "" }},
		{"no sender", "EASGUARD_MAILER_FROM", "", func(c *mailer.Config) { c.From = "" }},
		{"port 0", "EASGUARD_MAILER_SMTP_PORT", "0", func(c *mailer.Config) { c.SmtpPort = 0 }},
		{"port 70000", "EASGUARD_MAILER_SMTP_PORT", "70000", func(c *mailer.Config) { c.SmtpPort = 70000 }},
		{"security ssl", "EASGUARD_MAILER_SMTP_SECURITY", "ssl", func(c *mailer.Config) { c.SmtpSecurity = "ssl" }},
		{"enrol URL without scheme", "EASGUARD_MAILER_ENROL_URL", "portal.manage.microsoft.com", func(c *mailer.Config) { c.EnrolURL = "portal.manage.microsoft.com" }},
		{"enrol URL javascript", "EASGUARD_MAILER_ENROL_URL", "javascript:alert(1)", func(c *mailer.Config) { c.EnrolURL = "javascript:alert(1)" }},
		{"locale fr", "EASGUARD_MAILER_LOCALE", "fr", func(c *mailer.Config) { c.Locale = "fr" }},
		{"period under a minute", "EASGUARD_MAILER_PERIOD", "30s", func(c *mailer.Config) { c.Period = 30 * time.Second }},
		{"template dir missing", "EASGUARD_MAILER_TEMPLATE_DIR", "/does/not/exist", func(c *mailer.Config) { c.TemplateDir = "/does/not/exist" }},
		{"template that does not parse", "EASGUARD_MAILER_TEMPLATE_DIR", badTemplates, func(c *mailer.Config) { c.TemplateDir = badTemplates }},
		{"alert webhook without scheme", "EASGUARD_MAILER_ALERT_WEBHOOK_URL", "hooks.contoso.com/easguard", func(c *mailer.Config) { c.AlertWebhookURL = "hooks.contoso.com/easguard" }},
		{"alert format slack", "EASGUARD_MAILER_ALERT_WEBHOOK_FORMAT", "slack", func(c *mailer.Config) { c.AlertWebhookFormat = "slack" }},
		{"alert mail to a bad address", "EASGUARD_MAILER_ALERT_MAIL_TO", "ops@contoso.com, not an address", func(c *mailer.Config) { c.AlertMailTo = "ops@contoso.com, not an address" }},
		{"alert authorization without a webhook", "EASGUARD_MAILER_ALERT_WEBHOOK_AUTHORIZATION", "Bearer x", func(c *mailer.Config) { c.AlertWebhookAuthorization = "Bearer x" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := defaults.Mailer
			tt.mutate(&c)
			var fe *config.FieldError
			if err := c.Validate(); !errors.As(err, &fe) {
				t.Fatalf("Validate: %v, want a config.FieldError", err)
			}
			// Loaded from the environment, the error names the variable of
			// exactly the field that is wrong.
			setEnv(t, map[string]string{tt.env: tt.value})
			var s section
			err := config.Load(&s)
			if !errors.Is(err, config.ErrConfig) || !strings.Contains(err.Error(), tt.env+":") {
				t.Errorf("load: %v, want an error naming %s", err, tt.env)
			}
			if err != nil && strings.Contains(err.Error(), svcPassword) {
				t.Errorf("error leaks the password: %v", err)
			}
		})
	}
}
