package mailer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html"
	"io"
	"net/http"
	"net/mail"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/notify"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// The formats of EASGUARD_MAILER_ALERT_WEBHOOK_FORMAT.
const (
	// FormatAlertmanager is Alertmanager's webhook payload (version 4):
	// what receivers built for Alertmanager (and Alertmanager-compatible
	// tools) already read.
	FormatAlertmanager = "alertmanager"
	// FormatTeams is a message with one Adaptive Card, what a Microsoft
	// Teams "Send webhook alerts to a channel" workflow posts.
	FormatTeams = "teams"
)

// webhookTimeout bounds one POST of an alert.
const webhookTimeout = 10 * time.Second

// validateAlerts checks the alert delivery settings.
func (c *Config) validateAlerts() error {
	if c.AlertWebhookURL != "" {
		u, err := url.Parse(c.AlertWebhookURL)
		if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
			return config.Invalid(&c.AlertWebhookURL, "%q is not an http(s) URL", c.AlertWebhookURL)
		}
	}
	switch c.AlertWebhookFormat {
	case "", FormatAlertmanager, FormatTeams: // "": alertmanager (a Config built in code)
	default:
		return config.Invalid(&c.AlertWebhookFormat, "use %s or %s, not %q", FormatAlertmanager, FormatTeams, c.AlertWebhookFormat)
	}
	if c.AlertWebhookAuthorization != "" && c.AlertWebhookURL == "" {
		return config.Invalid(&c.AlertWebhookAuthorization, "is set, but EASGUARD_MAILER_ALERT_WEBHOOK_URL is not")
	}
	if strings.ContainsAny(c.AlertWebhookAuthorization.Reveal(), "\r\n") {
		return config.Invalid(&c.AlertWebhookAuthorization, "must be one line")
	}
	if c.AlertMailTo != "" {
		if _, err := mail.ParseAddressList(c.AlertMailTo); err != nil {
			return config.Invalid(&c.AlertMailTo, "%v", err)
		}
	}
	return nil
}

// alertRecipients are the administrators' addresses.
func (c *Config) alertRecipients() []string {
	if c.AlertMailTo == "" {
		return nil
	}
	list, _ := mail.ParseAddressList(c.AlertMailTo) // checked by Validate
	out := make([]string, len(list))
	for i, a := range list {
		out[i] = a.Address
	}
	return out
}

// Alert delivers an alert to the administrators: POSTed to the webhook and
// mailed to each address of EASGUARD_MAILER_ALERT_MAIL_TO. Each delivery is
// recorded once done, so a redelivery after a partial failure (the webhook
// took it, the mail server did not) repeats only what is missing. A
// receiver that refuses the alert for good (4xx, a mailbox that does not
// exist) dead-letters it with the reason; anything else is retried.
func (m *Mailer) Alert(ctx context.Context, a *ev.Alert) ([]bus.Outbound, error) {
	if m.cfg.AlertWebhookURL != "" {
		if err := m.once(ctx, a, "webhook", func() error { return m.postAlert(ctx, a) }); err != nil {
			return nil, err
		}
	}
	for i, to := range m.cfg.alertRecipients() {
		err := m.once(ctx, a, fmt.Sprintf("mail%d", i), func() error {
			err := m.sender.Send(ctx, to, renderAlert(a), fmt.Sprintf("<%s.%d@easguard.invalid>", a.GetAlertId(), i))
			m.metrics.sent(ctx, err)
			if errors.Is(err, notify.ErrPermanent) {
				return bus.Poison(fmt.Errorf("alert mail to %s: %w", to, err))
			}
			if err != nil {
				return fmt.Errorf("alert mail to %s: %w", to, err)
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	return nil, nil
}

// once runs deliver unless the alert already reached target, and records
// that it did.
func (m *Mailer) once(ctx context.Context, a *ev.Alert, target string, deliver func() error) error {
	// Alert ids are the raiser's (blast:mdm/1234, drift:…): hashed, any
	// id makes a valid key.
	sum := sha256.Sum256([]byte(a.GetAlertId()))
	key := string(m.org) + ".alert." + hex.EncodeToString(sum[:12]) + "." + target
	if _, err := m.notified.Get(ctx, key); err == nil {
		return nil
	} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("alert %s: %w", a.GetAlertId(), err)
	}
	if err := deliver(); err != nil {
		return err
	}
	if _, err := m.notified.Put(ctx, key, []byte(m.now().UTC().Format(time.RFC3339Nano))); err != nil {
		m.log.WarnContext(ctx, "alert delivered but not recorded; a redelivery could deliver it again", "alert", a.GetAlertId(), "target", target, "error", err)
	}
	return nil
}

// postAlert sends the alert to the webhook in the configured format.
func (m *Mailer) postAlert(ctx context.Context, a *ev.Alert) error {
	var payload any = alertmanagerPayload(a)
	if m.cfg.AlertWebhookFormat == FormatTeams {
		payload = teamsPayload(a)
	}
	body, err := json.Marshal(payload)
	if err != nil {
		return bus.Poison(fmt.Errorf("alert webhook payload: %w", err))
	}
	ctx, cancel := context.WithTimeout(ctx, webhookTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, m.cfg.AlertWebhookURL, bytes.NewReader(body))
	if err != nil {
		return bus.Poison(fmt.Errorf("alert webhook: %w", err))
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "easguard")
	if auth := m.cfg.AlertWebhookAuthorization.Reveal(); auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := m.http.Do(req)
	if err != nil {
		return fmt.Errorf("alert webhook: %w", err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return nil
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusRequestTimeout || resp.StatusCode >= 500:
		return fmt.Errorf("alert webhook answered %s: %s", resp.Status, strings.TrimSpace(string(msg)))
	default:
		// A wrong URL or a payload the receiver refuses: retrying sends
		// the same again.
		return bus.Poison(fmt.Errorf("alert webhook refused the alert: %s: %s", resp.Status, strings.TrimSpace(string(msg))))
	}
}

// alertName names an alert kind as Prometheus names alerts:
// ALERT_KIND_BLAST_RADIUS → EasguardBlastRadius.
func alertName(k ev.AlertKind) string {
	var b strings.Builder
	b.WriteString("Easguard")
	for _, w := range strings.Split(strings.TrimPrefix(k.String(), "ALERT_KIND_"), "_") {
		if w != "" {
			b.WriteString(w[:1] + strings.ToLower(w[1:]))
		}
	}
	return b.String()
}

// severity is the alert's severity as a label value (critical, warning).
func severity(a *ev.Alert) string {
	return strings.ToLower(strings.TrimPrefix(a.GetSeverity().String(), "ALERT_SEVERITY_"))
}

// amMessage is Alertmanager's webhook payload, version 4.
type amMessage struct {
	Version           string            `json:"version"`
	GroupKey          string            `json:"groupKey"`
	TruncatedAlerts   int               `json:"truncatedAlerts"`
	Status            string            `json:"status"`
	Receiver          string            `json:"receiver"`
	GroupLabels       map[string]string `json:"groupLabels"`
	CommonLabels      map[string]string `json:"commonLabels"`
	CommonAnnotations map[string]string `json:"commonAnnotations"`
	ExternalURL       string            `json:"externalURL"`
	Alerts            []amAlert         `json:"alerts"`
}

type amAlert struct {
	Status       string            `json:"status"`
	Labels       map[string]string `json:"labels"`
	Annotations  map[string]string `json:"annotations"`
	StartsAt     time.Time         `json:"startsAt"`
	EndsAt       time.Time         `json:"endsAt"`
	GeneratorURL string            `json:"generatorURL"`
	Fingerprint  string            `json:"fingerprint"`
}

// alertmanagerPayload is the alert as Alertmanager would post it: its kind
// the alertname, the organisation and severity labels, the summary and
// each detail an annotation, the alert id the fingerprint (a receiver
// that sees it twice can tell).
func alertmanagerPayload(a *ev.Alert) amMessage {
	labels := map[string]string{"alertname": alertName(a.GetKind()), "easguard_org": a.GetOrg(), "severity": severity(a)}
	ann := map[string]string{}
	for k, v := range a.GetDetail() {
		ann[k] = v
	}
	ann["summary"] = a.GetSummary()
	return amMessage{
		Version: "4", GroupKey: "easguard:" + a.GetOrg() + ":" + labels["alertname"], Status: "firing", Receiver: "easguard",
		GroupLabels: map[string]string{"alertname": labels["alertname"]}, CommonLabels: labels, CommonAnnotations: ann,
		Alerts: []amAlert{{Status: "firing", Labels: labels, Annotations: ann, StartsAt: a.GetRaisedAt().AsTime(), Fingerprint: a.GetAlertId()}},
	}
}

// teamsPayload is the alert as one Adaptive Card in a message, the body a
// Teams workflow's webhook trigger takes.
func teamsPayload(a *ev.Alert) map[string]any {
	facts := []map[string]string{{"title": "Organisation", "value": a.GetOrg()}, {"title": "Severity", "value": severity(a)},
		{"title": "Raised", "value": a.GetRaisedAt().AsTime().UTC().Format(time.RFC3339)}}
	for _, k := range sortedKeys(a.GetDetail()) {
		facts = append(facts, map[string]string{"title": k, "value": a.GetDetail()[k]})
	}
	card := map[string]any{
		"$schema": "http://adaptivecards.io/schemas/adaptive-card.json", "type": "AdaptiveCard", "version": "1.4",
		"body": []any{
			map[string]any{"type": "TextBlock", "size": "Medium", "weight": "Bolder", "wrap": true, "text": "easguard: " + alertName(a.GetKind())},
			map[string]any{"type": "TextBlock", "wrap": true, "text": a.GetSummary()},
			map[string]any{"type": "FactSet", "facts": facts},
		},
	}
	return map[string]any{"type": "message", "attachments": []any{map[string]any{"contentType": "application/vnd.microsoft.card.adaptive", "content": card}}}
}

// renderAlert is the mail to an administrator.
func renderAlert(a *ev.Alert) notify.Rendered {
	subject := fmt.Sprintf("[easguard %s] %s: %s", a.GetOrg(), strings.ToUpper(severity(a)), a.GetSummary())
	var text, htm strings.Builder
	fmt.Fprintf(&text, "%s\n\nAlert: %s\nOrganisation: %s\nSeverity: %s\nRaised: %s\n", a.GetSummary(), alertName(a.GetKind()), a.GetOrg(), severity(a),
		a.GetRaisedAt().AsTime().UTC().Format(time.RFC3339))
	fmt.Fprintf(&htm, "<p>%s</p><table>", html.EscapeString(a.GetSummary()))
	row := func(k, v string) {
		fmt.Fprintf(&htm, "<tr><th align=\"left\">%s</th><td>%s</td></tr>", html.EscapeString(k), html.EscapeString(v))
	}
	row("Alert", alertName(a.GetKind()))
	row("Organisation", a.GetOrg())
	row("Severity", severity(a))
	for _, k := range sortedKeys(a.GetDetail()) {
		fmt.Fprintf(&text, "%s: %s\n", k, a.GetDetail()[k])
		row(k, a.GetDetail()[k])
	}
	htm.WriteString("</table>")
	return notify.Rendered{Subject: subject, Text: text.String(), HTML: htm.String()}
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
