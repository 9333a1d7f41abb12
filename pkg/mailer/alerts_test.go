package mailer_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/bus/bustest"
	"github.com/easguard/easguard/pkg/mailer"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/hooksim"
)

func raise(tb testing.TB, h *harness, id string) *ev.Alert {
	tb.Helper()
	a := &ev.Alert{Org: string(org), AlertId: id, Kind: ev.AlertKind_ALERT_KIND_BLAST_RADIUS, Severity: ev.AlertSeverity_ALERT_SEVERITY_CRITICAL,
		Summary: "3 of 4 allowed devices would lose mail <at once>", Detail: map[string]string{"revocations": "3", "allowed": "4"}, RaisedAt: timestamppb.New(time.Now())}
	subject, err := bus.AlertRaised.Subject(org, "blast-radius")
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subject, MsgID: "alert:" + id, Message: a}); err != nil {
		tb.Fatal(err)
	}
	return a
}

// An alert reaches the administrators' webhook, in Alertmanager's payload
// or as a Teams card, and their mailboxes, once each, also when the
// webhook failed first and the alert was retried.
func TestAlertsReachTheAdministrators(t *testing.T) {
	t.Run("alertmanager, after a 503 and a 451", func(t *testing.T) {
		rcv := hooksim.Start(t, http.StatusServiceUnavailable)
		h := start(t, options{alerts: func(c *mailer.Config) {
			c.AlertWebhookURL, c.AlertMailTo = rcv.URL, "ops@contoso.com, Security <sec@contoso.com>"
		}})
		// The webhook fails the first try; the first mail the second, after
		// the webhook took the alert.
		h.relay.FailNext(1, 451, "Temporary local problem, try again")
		a := raise(t, h, "a1b2c3")
		natstest.Eventually(t, 20*time.Second, "the webhook to get the alert", func() bool { return len(rcv.Received()) == 1 })
		natstest.Eventually(t, 20*time.Second, "both administrators mailed", func() bool { return len(h.relay.Messages()) == 2 })
		natstest.WaitDrained(t, h.js, 20*time.Second, bus.StreamAlerts)

		var msg struct {
			Version, Status, GroupKey string
			CommonLabels              map[string]string
			Alerts                    []struct {
				Status      string
				Labels      map[string]string
				Annotations map[string]string
				StartsAt    time.Time
				Fingerprint string
			}
		}
		if err := json.Unmarshal(rcv.Received()[0], &msg); err != nil {
			t.Fatal(err)
		}
		if msg.Version != "4" || msg.Status != "firing" || len(msg.Alerts) != 1 {
			t.Fatalf("payload %s", rcv.Received()[0])
		}
		got := msg.Alerts[0]
		if got.Labels["alertname"] != "EasguardBlastRadius" || got.Labels["easguard_org"] != "contoso" || got.Labels["severity"] != "critical" ||
			got.Annotations["summary"] != a.GetSummary() || got.Annotations["revocations"] != "3" || got.Fingerprint != "a1b2c3" ||
			!got.StartsAt.Equal(a.GetRaisedAt().AsTime()) {
			t.Errorf("alert %+v", got)
		}
		var to []string
		for _, m := range h.relay.Messages() {
			to = append(to, m.To...)
			if !strings.Contains(m.Subject, "CRITICAL") || !strings.Contains(m.Text, "revocations: 3") || !strings.Contains(m.HTML, "&lt;at once&gt;") {
				t.Errorf("mail %q: %q / %q", m.Subject, m.Text, m.HTML)
			}
		}
		if strings.Join(to, " ") != "ops@contoso.com sec@contoso.com" && strings.Join(to, " ") != "sec@contoso.com ops@contoso.com" {
			t.Errorf("mailed %v", to)
		}
		// Each retry delivered only what was missing: nothing twice.
		if n := len(rcv.Received()); n != 1 {
			t.Errorf("webhook got %d posts", n)
		}
	})
	t.Run("teams", func(t *testing.T) {
		rcv := hooksim.Start(t)
		h := start(t, options{alerts: func(c *mailer.Config) {
			c.AlertWebhookURL, c.AlertWebhookFormat, c.AlertWebhookAuthorization = rcv.URL, mailer.FormatTeams, "Bearer hook-token-0123"
		}})
		raise(t, h, "blast:mdm/5988550956") // as the guard names its alerts
		natstest.Eventually(t, 20*time.Second, "the webhook to get the alert", func() bool { return len(rcv.Received()) == 1 })
		var msg struct {
			Type        string
			Attachments []struct {
				ContentType string
				Content     struct {
					Type string
					Body []struct{ Type, Text string }
				}
			}
		}
		if err := json.Unmarshal(rcv.Received()[0], &msg); err != nil {
			t.Fatal(err)
		}
		if msg.Type != "message" || len(msg.Attachments) != 1 || msg.Attachments[0].ContentType != "application/vnd.microsoft.card.adaptive" ||
			msg.Attachments[0].Content.Type != "AdaptiveCard" || !strings.Contains(string(rcv.Received()[0]), "EasguardBlastRadius") {
			t.Errorf("payload %s", rcv.Received()[0])
		}
		if n := len(h.relay.Messages()); n != 0 {
			t.Errorf("%d mails with no administrator to mail", n)
		}
		if a := rcv.Authorizations(); len(a) != 1 || a[0] != "Bearer hook-token-0123" {
			t.Errorf("Authorization %q", a)
		}
	})
	t.Run("refused for good", func(t *testing.T) {
		rcv := hooksim.Start(t, http.StatusNotFound)
		h := start(t, options{alerts: func(c *mailer.Config) { c.AlertWebhookURL = rcv.URL }})
		dead := bustest.DeadLetters[ev.Alert](t, h.js, org, "mailer")
		raise(t, h, "0a0b0c")
		dl := dead.Await(t, 20*time.Second, "the refused alert dead-lettered", func(d bustest.DeadLetter[*ev.Alert]) bool {
			return d.Message.GetAlertId() == "0a0b0c"
		})
		if !strings.Contains(dl.Reason, "404") {
			t.Errorf("reason %q", dl.Reason)
		}
	})
}

// An SMTP server that refuses easguard's credentials holds every user mail
// back (retried until an administrator fixes them): the administrators are
// alerted once, and reminded each hour it goes on, not at every retry.
func TestSMTPRefusingCredentialsIsAlertedOnce(t *testing.T) {
	h := start(t, options{password: "not-the-password"})
	alerts := natstest.Receive[ev.Alert](t, h.js, bus.StreamAlerts, bus.AlertRaised.Filter(org))
	d := h.decision(phone(user("Erik Lang"), "ApplAUTHFAIL01", "Erik's iPhone"), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, "not_enrolled")
	h.publish(t, d, "")
	natstest.Eventually(t, 20*time.Second, "three tries refused", func() bool { return h.redeliveries(t) >= 2 })
	a := alerts.Await(t, 10*time.Second, "the alert", func(a *ev.Alert) bool { return true })
	if a.GetKind() != ev.AlertKind_ALERT_KIND_NOTIFICATION_FAILED || a.GetSeverity() != ev.AlertSeverity_ALERT_SEVERITY_CRITICAL ||
		a.GetDetail()["smtp_user"] == "" || strings.Contains(a.String(), "not-the-password") {
		t.Errorf("alert %v", a)
	}
	// Ten minutes on, still refused: no second alert. An hour after the
	// first, a reminder.
	for _, step := range []struct {
		advance time.Duration
		want    int
	}{{10 * time.Minute, 1}, {55 * time.Minute, 2}} {
		h.clock.Advance(step.advance)
		tries := h.redeliveries(t)
		natstest.Eventually(t, 20*time.Second, "another try refused", func() bool { return h.redeliveries(t) >= tries+2 })
		if step.want > 1 {
			natstest.Eventually(t, 10*time.Second, "the reminder", func() bool { return alerts.Len() >= step.want })
		}
		if n := alerts.Len(); n != step.want {
			t.Errorf("%s on: %d alerts for one refusing server, want %d", step.advance, n, step.want)
		}
	}
	if n := len(h.relay.Messages()); n != 0 {
		t.Errorf("%d mails through a server that refused the credentials", n)
	}
}
