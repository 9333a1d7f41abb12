// Package mailer tells the users of blocked or quarantined devices how to
// enrol them: it consumes what the executor applied on Exchange
// (access.applied), and for a block or quarantine that asked for a
// notification and really took effect renders the org's templates, sends
// the mail over SMTP, and reports notify.sent. A decision that was never
// applied (dead-lettered, superseded, its mailbox gone) sends no mail. A
// user gets at most one mail per device per period, however often the
// device is re-evaluated and however many mailer replicas run.
package mailer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/metric/noop"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/notify"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Config configures the mailer of one organisation.
type Config struct {
	SmtpHost     string        `split_words:"true" desc:"Required. SMTP server that relays easguard's mails."`
	SmtpPort     int           `split_words:"true" default:"587" desc:"SMTP port (587 for STARTTLS, 465 for implicit TLS)."`
	SmtpSecurity string        `split_words:"true" default:"starttls" desc:"starttls (refuse to send without it), tls (implicit) or none."`
	SmtpUser     string        `split_words:"true" desc:"SMTP user; empty sends without authentication."`
	SmtpPassword config.Secret `split_words:"true" secret:"true" desc:"SMTP password."`
	SmtpCABundle string        `split_words:"true" desc:"PEM file of the CA of the SMTP server's certificate (default: the system's)."`
	From         string        `split_words:"true" desc:"Required. Sender, e.g. IT Service <it@contoso.com>."`
	EnrolURL     string        `split_words:"true" desc:"Required. Where users enrol their devices, e.g. https://portal.manage.microsoft.com."`
	Helpdesk     string        `split_words:"true" desc:"How users reach the helpdesk, shown in every mail."`
	Company      string        `split_words:"true" desc:"Company name shown in the mails."`
	Locale       string        `split_words:"true" default:"en" desc:"Language of the mails: en or de."`
	TemplateDir  string        `split_words:"true" desc:"Directory with template overrides (<locale>/subject.txt.tmpl, body.txt.tmpl, body.html.tmpl)."`
	Period       time.Duration `split_words:"true" default:"24h" desc:"A user gets at most one mail per device in this period."`
	// Alerts go to the administrators (alerts.go).
	AlertWebhookURL    string `split_words:"true" desc:"Where every alert is POSTed as JSON (a receiver, an Alertmanager-compatible tool, a Teams workflow); empty: no webhook."`
	AlertWebhookFormat string `split_words:"true" default:"alertmanager" desc:"alertmanager (Alertmanager's webhook payload, version 4) or teams (a message with an Adaptive Card, for a Teams workflow's webhook)."`
	AlertMailTo        string `split_words:"true" desc:"Administrators who get every alert by mail, comma-separated; empty: none."`
	// AlertWebhookAuthorization is sent as the Authorization header.
	AlertWebhookAuthorization config.Secret `split_words:"true" secret:"true" desc:"Authorization header of the alert webhook's requests, e.g. Bearer <token> for a receiver that wants one; empty: none."`
}

// Validate checks the settings.
func (c *Config) Validate() error {
	if c.SmtpHost == "" {
		return config.Invalid(&c.SmtpHost, "is required: the SMTP server easguard sends through")
	}
	if c.From == "" {
		return config.Invalid(&c.From, "is required: the sender of easguard's mails")
	}
	if c.SmtpPort < 1 || c.SmtpPort > 65535 {
		return config.Invalid(&c.SmtpPort, "%d is not a port", c.SmtpPort)
	}
	switch c.SmtpSecurity {
	case "starttls", "tls", "none":
	default:
		return config.Invalid(&c.SmtpSecurity, "use starttls, tls or none, not %q", c.SmtpSecurity)
	}
	if !strings.HasPrefix(c.EnrolURL, "https://") && !strings.HasPrefix(c.EnrolURL, "http://") {
		return config.Invalid(&c.EnrolURL, "%q is not an http(s) URL", c.EnrolURL)
	}
	if c.Locale != "en" && c.Locale != "de" {
		return config.Invalid(&c.Locale, "use en or de, not %q", c.Locale)
	}
	if c.Period < time.Minute {
		return config.Invalid(&c.Period, "must be at least 1m")
	}
	if c.TemplateDir != "" {
		if _, err := notify.LoadTemplates(c.TemplateDir); err != nil {
			return config.Invalid(&c.TemplateDir, "%v", err)
		}
	}
	return c.validateAlerts()
}

// sendTimeout bounds one SMTP conversation, so a relay that stops
// answering holds a decision only until its redelivery.
const sendTimeout = 30 * time.Second

// NewSender builds the SMTP sender the settings describe, reading the CA
// bundle if one is named. It is separate from New so that tests and the
// pipeline build the sender the same way yet can hand New another one.
func (c *Config) NewSender() (*notify.Sender, error) {
	var ca []byte
	if c.SmtpCABundle != "" {
		var err error
		if ca, err = os.ReadFile(c.SmtpCABundle); err != nil {
			return nil, fmt.Errorf("read SMTP CA bundle: %w", err)
		}
	}
	s, err := notify.NewSender(notify.SMTPConfig{Host: c.SmtpHost, Port: c.SmtpPort, Username: c.SmtpUser, Password: c.SmtpPassword.Reveal(),
		Security: c.SmtpSecurity, CABundle: ca, From: c.From, Timeout: sendTimeout})
	if err != nil {
		return nil, fmt.Errorf("SMTP sender: %w", err)
	}
	return s, nil
}

// Sender sends one rendered mail (notify.Sender does it).
type Sender interface {
	Send(ctx context.Context, to string, r notify.Rendered, messageID string) error
}

// Mailer is the mailer worker of one organisation.
type Mailer struct {
	org      bus.Org
	cfg      Config
	tmpl     *notify.Templates
	sender   Sender
	notified jetstream.KeyValue
	log      *slog.Logger
	now      func() time.Time
	// metrics are the domain metrics (Instrument), nowhere by default.
	metrics *instruments
	// http posts alerts to the webhook.
	http *http.Client
	// status remembers when a failing SMTP server was last alerted, and
	// pub raises the alert (SetPublisher).
	status jetstream.KeyValue
	pub    atomic.Pointer[bus.Publisher]
}

// SetPublisher gives the mailer the publisher it raises its own alerts
// with (the SMTP server refusing its credentials), which no handler
// output can carry: the handler that meets the refusal fails, to retry.
func (m *Mailer) SetPublisher(p *bus.Publisher) { m.pub.Store(p) }

// New prepares the mailer.
func New(ctx context.Context, js jetstream.JetStream, org bus.Org, cfg Config, sender Sender, log *slog.Logger) (*Mailer, error) {
	tmpl := notify.DefaultTemplates()
	if cfg.TemplateDir != "" {
		var err error
		if tmpl, err = notify.LoadTemplates(cfg.TemplateDir); err != nil {
			return nil, fmt.Errorf("mailer: %w", err)
		}
	}
	kv, err := js.KeyValue(ctx, bus.BucketNotified)
	if err != nil {
		return nil, fmt.Errorf("mailer: open %s: %w", bus.BucketNotified, err)
	}
	if log == nil {
		log = slog.Default()
	}
	in, err := newInstruments(noop.NewMeterProvider(), string(org))
	if err != nil {
		return nil, err
	}
	if cfg.AlertWebhookFormat == "" {
		cfg.AlertWebhookFormat = FormatAlertmanager
	}
	status, err := js.KeyValue(ctx, bus.BucketStatus)
	if err != nil {
		return nil, fmt.Errorf("mailer: open %s: %w", bus.BucketStatus, err)
	}
	return &Mailer{org: org, cfg: cfg, tmpl: tmpl, sender: sender, notified: kv, log: log.With("worker", "mailer"), now: time.Now, metrics: in,
		http: &http.Client{Timeout: webhookTimeout}, status: status}, nil
}

// Routes returns the mailer's handlers. It follows access.applied, not
// access.decided: a user is told of a block only once Exchange holds it.
// With a webhook or administrators to mail, it delivers every alert.
func (m *Mailer) Routes() []bus.Route {
	routes := []bus.Route{bus.Handle("access-applied", bus.AccessApplied, m.Applied)}
	if m.cfg.AlertWebhookURL != "" || m.cfg.AlertMailTo != "" {
		routes = append(routes, bus.Handle("alert-raised", bus.AlertRaised, m.Alert))
	}
	return routes
}

// Applied mails the user of a device whose block or quarantine the
// executor applied (or found already in place) when its decision asked for
// it; any other outcome sends nothing.
func (m *Mailer) Applied(ctx context.Context, a *ev.AccessApplied) ([]bus.Outbound, error) {
	d := a.GetDecision()
	if d == nil {
		// An executor that does not say what it applied (older than the
		// mailer): nothing to tell the user from.
		return nil, nil
	}
	for _, it := range a.GetItems() {
		if it.GetDecisionId() != d.GetDecisionId() {
			continue
		}
		switch it.GetOutcome() {
		case ev.ApplyOutcome_APPLY_OUTCOME_APPLIED, ev.ApplyOutcome_APPLY_OUTCOME_ALREADY_IN_STATE:
			return m.notify(ctx, d)
		}
		m.log.DebugContext(ctx, "no mail: the decision did not take effect", "decision", d.GetDecisionId(), "outcome", it.GetOutcome())
		return nil, nil
	}
	return nil, nil
}

// notifyReason picks the mail: the policy's choice when the decision
// carries one, otherwise what the decision says about the device.
func notifyReason(d *ev.AccessDecided) string {
	switch {
	case d.GetNotifyReason() != "":
		switch r := d.GetNotifyReason(); r {
		case notify.ReasonNotEnrolled, notify.ReasonNoncompliant, notify.ReasonRetired, notify.ReasonPlatformNotAllowed:
			return r
		}
		return notify.ReasonOther // what the templates fall back to
	case d.GetRule() == notify.ReasonPlatformNotAllowed:
		return notify.ReasonPlatformNotAllowed
	case d.GetNoMatchReason() == ev.NoMatchReason_NO_MATCH_REASON_RETIRED:
		return notify.ReasonRetired
	case d.GetMdm() != nil && d.GetRule() == notify.ReasonNoncompliant:
		return notify.ReasonNoncompliant
	case d.GetMdm() == nil:
		return notify.ReasonNotEnrolled
	}
	return notify.ReasonOther
}

// notify mails the user about an applied decision that keeps their device
// from mail, once per device per period.
func (m *Mailer) notify(ctx context.Context, d *ev.AccessDecided) ([]bus.Outbound, error) {
	if !d.GetNotifyUser() || d.GetDryRun() || d.GetDesired() == ev.DesiredAccess_DESIRED_ACCESS_ALLOW {
		return nil, nil
	}
	p := d.GetPartnership()
	mb := p.GetMailbox()
	to := mb.GetPrimarySmtpAddress()
	if to == "" {
		to = mb.GetUserPrincipalName()
	}
	if to == "" {
		return nil, bus.Poison(fmt.Errorf("no address for mailbox %q", mb.GetIdentity()))
	}
	key, err := bus.StateKey(m.org, p.GetDeviceId(), strings.ToLower(p.GetGuid()+p.GetIdentity()))
	if err != nil {
		return nil, bus.Poison(err)
	}
	// A claim the bucket's stream did not answer (a leader election) is
	// asked again rather than backed off: the user's mail would wait for
	// the runner's growing delay. Asking again is safe: a claim that was
	// stored although its answer was lost is read back as this
	// decision's own unfinished claim, and taken again.
	var claim claimed
	if err := bus.AskAgain(ctx, func() error {
		var err error
		claim, err = m.claim(ctx, key, d.GetDecisionId())
		return err
	}); err != nil {
		return nil, err
	}
	if claim.told {
		return nil, nil // already told within the period
	}
	resend := claim.resend
	state := notify.StateBlocked
	if d.GetDesired() == ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE {
		state = notify.StateQuarantined
	}
	r, err := m.tmpl.Render(notify.Data{
		Org: string(m.org), Locale: m.cfg.Locale, UserName: mb.GetDisplayName(), Recipient: to,
		DeviceType: p.GetDeviceType(), DeviceModel: p.GetDeviceModel(), DeviceOS: p.GetDeviceOs(), DeviceID: p.GetDeviceId(), FriendlyName: p.GetFriendlyName(),
		State: state, Reason: notifyReason(d), ReasonDetail: d.GetReason(), EnrolURL: m.cfg.EnrolURL, Helpdesk: m.cfg.Helpdesk, Company: m.cfg.Company, Time: m.now(),
	})
	if err != nil {
		m.release(key, claim.rev)
		return nil, bus.Poison(fmt.Errorf("render: %w", err))
	}
	msgID := "<" + d.GetDecisionId() + "@easguard.invalid>"
	sent := m.now()
	if resend != nil {
		sent = *resend
	} else if err := m.sender.Send(ctx, to, r, msgID); err != nil {
		m.metrics.sent(ctx, err)
		m.release(key, claim.rev)
		switch {
		case errors.Is(err, notify.ErrPermanent):
			return nil, bus.Poison(fmt.Errorf("send to %s: %w", to, err))
		case errors.Is(err, notify.ErrAuth):
			// Retried like a transient failure, so the mail goes out once
			// an admin fixes the credentials; said loudly meanwhile.
			m.log.ErrorContext(ctx, "the SMTP server refused easguard's credentials; check the mailer's SMTP user and password", "error", err)
			m.alertSMTPAuth(ctx, err)
			return nil, fmt.Errorf("send to %s: %w", to, err)
		default:
			return nil, fmt.Errorf("send to %s: %w", to, err)
		}
	}
	if resend == nil {
		m.metrics.sent(ctx, nil)
		// The decision id lets a redelivery of this decision report the
		// mail again instead of being dropped as "already told".
		if _, err := m.notified.Update(ctx, key, record(sent, d.GetDecisionId(), false), claim.rev); err != nil {
			m.log.WarnContext(ctx, "mail sent but not recorded; a redelivery could send it again", "to", to, "error", err)
		}
	}
	subject, err := bus.NotifySent.Subject(m.org, p.GetDeviceId())
	if err != nil {
		return nil, bus.Poison(err)
	}
	template := "blocked"
	if state == notify.StateQuarantined {
		template = "quarantine"
	}
	return []bus.Outbound{{Subject: subject, MsgID: "sent:" + d.GetDecisionId(), Message: &ev.NotificationSent{
		Org: string(m.org), Recipient: to, Template: template + "/" + notifyReason(d), Locale: m.cfg.Locale, MessageId: msgID,
		DeviceId: p.GetDeviceId(), Mailbox: mb, DecisionId: d.GetDecisionId(), SentAt: timestamppb.New(sent),
	}}}, nil
}

// smtpAlertEvery is how often an SMTP server that goes on refusing
// easguard's credentials is alerted again.
const smtpAlertEvery = time.Hour

// alertSMTPAuth raises NOTIFICATION_FAILED when the SMTP server refuses
// easguard's credentials: every user mail waits (retried) until an
// administrator fixes them. Once, and again each hour it goes on; a mail
// refused for good is dead-lettered, which alerts by itself.
func (m *Mailer) alertSMTPAuth(ctx context.Context, cause error) {
	pub := m.pub.Load()
	if pub == nil {
		return
	}
	now := m.now()
	err := bus.RaiseDue(ctx, pub, m.status, m.org, "smtp.auth", smtpAlertEvery, now, bus.Alert{Kind: ev.AlertKind_ALERT_KIND_NOTIFICATION_FAILED,
		Severity: ev.AlertSeverity_ALERT_SEVERITY_CRITICAL, ID: fmt.Sprintf("smtp-auth:%d", now.Unix()),
		Summary: "the SMTP server refuses easguard's credentials: users of blocked phones are not told how to enrol",
		Detail:  map[string]string{"smtp_host": m.cfg.SmtpHost, "smtp_user": m.cfg.SmtpUser, "error": cause.Error()}})
	if err != nil {
		m.log.WarnContext(ctx, "SMTP failure not alerted", "error", err)
	}
}

// claimStale is how old another decision's unfinished claim on a device
// must be before a mailer takes it over: its holder died or gave up
// between claiming and sending.
const claimStale = 2 * sendTimeout

// claimed is the outcome of claim.
type claimed struct {
	// told: the user was mailed about the device within the period, or
	// another mailer is mailing them now; send nothing.
	told bool
	// resend: this decision's mail went out at this time; report it again.
	resend *time.Time
	// rev is the revision of this mailer's claim, to record the mail on.
	rev uint64
}

// record is the value of a notified key: when, for which decision, and
// whether the mail is still being sent (a claim) or went out.
func record(at time.Time, decisionID string, sending bool) []byte {
	v := at.Format(time.RFC3339Nano) + " " + decisionID
	if sending {
		v += " sending"
	}
	return []byte(v)
}

// claim decides, with compare-and-set on the device's notified key, whether
// this mailer sends the mail: of several replicas handling decisions for
// one device at once, exactly one writes its claim; the others see it and
// send nothing. A read that raced a write (or a follower that lags, in a
// cluster) only makes the write fail and the loop read again.
func (m *Mailer) claim(ctx context.Context, key, decisionID string) (claimed, error) {
	for attempt := 0; attempt < 50; attempt++ {
		var rev uint64
		e, err := m.notified.Get(ctx, key)
		switch {
		case err == nil:
			rev = e.Revision()
			at, rest, _ := strings.Cut(string(e.Value()), " ")
			id, state, _ := strings.Cut(rest, " ")
			t, perr := time.Parse(time.RFC3339Nano, at)
			if perr == nil && m.now().Sub(t) < m.cfg.Period {
				sending := state == "sending"
				switch {
				case id == decisionID && !sending:
					return claimed{resend: &t}, nil
				case id != decisionID && (!sending || m.now().Sub(t) < claimStale):
					return claimed{told: true}, nil
				}
				// Our own unfinished claim (a crash or failed send before
				// this delivery), or a stale one of another decision.
			}
		case errors.Is(err, jetstream.ErrKeyNotFound), errors.Is(err, jetstream.ErrKeyDeleted):
		default:
			return claimed{}, fmt.Errorf("mailer: read %s: %w", key, err)
		}
		v := record(m.now(), decisionID, true)
		if rev == 0 {
			rev, err = m.notified.Create(ctx, key, v)
		} else {
			rev, err = m.notified.Update(ctx, key, v, rev)
		}
		switch {
		case err == nil:
			return claimed{rev: rev}, nil
		case errors.Is(err, jetstream.ErrKeyExists), errors.Is(err, jetstream.ErrKeyRevisionMismatch):
			continue // another mailer wrote first: read what it wrote
		default:
			return claimed{}, fmt.Errorf("mailer: claim %s: %w", key, err)
		}
	}
	return claimed{}, fmt.Errorf("mailer: claim %s: too much contention", key)
}

// release withdraws a claim whose mail did not go out, so that the next
// decision for the device is not held back by it; if that fails, the claim
// goes stale after claimStale.
func (m *Mailer) release(key string, rev uint64) {
	if rev == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.notified.Delete(ctx, key, jetstream.LastRevision(rev)); err != nil {
		m.log.Debug("claim not withdrawn; it goes stale", "key", key, "error", err)
	}
}
