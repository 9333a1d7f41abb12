package notify_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	netmail "net/mail"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/notify"
	"github.com/easguard/easguard/tests/smtpsim"
)

const (
	svcUser     = "svc-easguard@contoso.com"
	svcPassword = "S3cret-pässword!"
	fromAddr    = "IT Service <it@contoso.com>"
	recipient   = "anna@contoso.com"
)

func testContext(tb testing.TB) context.Context {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

// relay starts a simulated relay with the service account.
func relay(tb testing.TB, cfg smtpsim.Config) *smtpsim.Server {
	tb.Helper()
	if cfg.Users == nil {
		cfg.Users = map[string]string{svcUser: svcPassword}
	}
	return smtpsim.StartTest(tb, cfg)
}

// senderFor configures a Sender for s as production would (STARTTLS, AUTH,
// the relay's certificate as CA bundle); mutate adjusts the configuration.
func senderFor(tb testing.TB, s *smtpsim.Server, mutate func(*notify.SMTPConfig)) *notify.Sender {
	tb.Helper()
	cfg := notify.SMTPConfig{
		Host: s.Host(), Port: s.Port(), Username: svcUser, Password: svcPassword,
		CABundle: s.CertPEM(), From: fromAddr, HeloName: "easguard.test", Timeout: 10 * time.Second,
	}
	if mutate != nil {
		mutate(&cfg)
	}
	snd, err := notify.NewSender(cfg)
	if err != nil {
		tb.Fatalf("new sender: %v", err)
	}
	return snd
}

func mailDate(values []string) (time.Time, error) {
	if len(values) != 1 {
		return time.Time{}, fmt.Errorf("%d Date headers", len(values))
	}
	return netmail.ParseDate(values[0])
}

func rendered(tb testing.TB, locale string) notify.Rendered {
	tb.Helper()
	return render(tb, notify.DefaultTemplates(), sample(locale, notify.StateBlocked, notify.ReasonNotEnrolled))
}

// assertClass checks that err is exactly the one class want (nil = success).
func assertClass(tb testing.TB, err, want error) {
	tb.Helper()
	if want == nil {
		if err != nil {
			tb.Fatalf("send failed: %v", err)
		}
		return
	}
	if err == nil {
		tb.Fatalf("send succeeded, want %v", want)
	}
	var matched []string
	for _, c := range []error{notify.ErrTransient, notify.ErrPermanent, notify.ErrAuth} {
		if errors.Is(err, c) {
			matched = append(matched, c.Error())
		}
	}
	if len(matched) != 1 || !errors.Is(err, want) {
		tb.Fatalf("error %q is %v, want exactly %q", err, matched, want)
	}
}

func TestSendDeliversBothPartsOverSTARTTLSAndAuth(t *testing.T) {
	tests := []struct {
		name     string
		locale   string
		relayCfg smtpsim.Config
		mutate   func(*notify.SMTPConfig)
		wantUser string
		wantTLS  bool
	}{
		{"English, STARTTLS, AUTH PLAIN", "en", smtpsim.Config{}, nil, svcUser, true},
		{"German, STARTTLS, AUTH PLAIN", "de", smtpsim.Config{}, nil, svcUser, true},
		{"AUTH LOGIN only, as Exchange offers", "en", smtpsim.Config{AuthMechanisms: []string{"LOGIN"}}, nil, svcUser, true},
		{"relay that requires STARTTLS", "en", smtpsim.Config{RequireTLS: true}, nil, svcUser, true},
		{"implicit TLS", "de", smtpsim.Config{ImplicitTLS: true},
			func(c *notify.SMTPConfig) { c.Security = notify.SecurityTLS }, svcUser, true},
		{"no TLS and no AUTH for an internal relay", "en", smtpsim.Config{DisableTLS: true, Users: map[string]string{}},
			func(c *notify.SMTPConfig) { c.Security, c.Username, c.Password, c.CABundle = "none", "", "", nil }, "", false},
		{"InsecureSkipVerify instead of a CA bundle", "en", smtpsim.Config{},
			func(c *notify.SMTPConfig) { c.CABundle, c.InsecureSkipVerify = nil, true }, svcUser, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := relay(t, tt.relayCfg)
			r := rendered(t, tt.locale)
			before := time.Now().Add(-time.Second)
			err := senderFor(t, s, tt.mutate).Send(testContext(t), recipient, r, "<decision-42@easguard.invalid>")
			assertClass(t, err, nil)
			msgs, err := s.WaitFor(testContext(t), 1)
			if err != nil {
				t.Fatal(err)
			}
			m := msgs[0]
			checks := []struct{ what, got, want string }{
				{"envelope from", m.From, "it@contoso.com"},
				{"envelope to", strings.Join(m.To, ","), recipient},
				{"Message-ID", m.MessageID, "<decision-42@easguard.invalid>"},
				{"subject", m.Subject, r.Subject},
				{"Auto-Submitted", strings.Join(m.Headers["Auto-Submitted"], ","), "auto-generated"},
				{"X-Auto-Response-Suppress", strings.Join(m.Headers["X-Auto-Response-Suppress"], ","), "All"},
				{"auth user", m.AuthUser, tt.wantUser},
			}
			for _, c := range checks {
				if c.got != c.want {
					t.Errorf("%s = %q, want %q", c.what, c.got, c.want)
				}
			}
			if m.TLS != tt.wantTLS {
				t.Errorf("TLS = %v, want %v", m.TLS, tt.wantTLS)
			}
			if from := strings.Join(m.Headers["From"], ""); !strings.Contains(from, "IT Service") || !strings.Contains(from, "<it@contoso.com>") {
				t.Errorf("From header %q", from)
			}
			if to := strings.Join(m.Headers["To"], ""); !strings.Contains(to, recipient) {
				t.Errorf("To header %q", to)
			}
			if ct := strings.Join(m.Headers["Content-Type"], ""); !strings.HasPrefix(ct, "multipart/alternative;") {
				t.Errorf("Content-Type %q, want multipart/alternative", ct)
			}
			date, err := mailDate(m.Headers["Date"])
			if err != nil || date.Before(before) || date.After(time.Now().Add(time.Second)) {
				t.Errorf("Date %v (%v), want about now", m.Headers["Date"], err)
			}
			if !strings.Contains(m.Text, enrolURL) || !strings.Contains(m.HTML, `href="https://portal.contoso.com/enrol?src=mail&amp;x=1"`) {
				t.Errorf("enrolment link missing:\ntext:\n%s\nhtml:\n%s", m.Text, m.HTML)
			}
			if m.Text != r.Text {
				t.Errorf("text part differs from what was rendered:\n%q\n%q", m.Text, r.Text)
			}
			if strings.TrimRight(m.HTML, "\r\n") != strings.TrimRight(r.HTML, "\r\n") {
				t.Error("HTML part differs from what was rendered")
			}
			if _, ok := m.Headers["User-Agent"]; ok {
				t.Error("go-mail's User-Agent header was sent")
			}
		})
	}
}

func TestSendClassifiesFailures(t *testing.T) {
	otherNameTLS, _, err := smtpsim.SelfSignedTLS("mail.other.test")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		relayCfg smtpsim.Config
		inject   func(*smtpsim.Server)
		mutate   func(*notify.SMTPConfig)
		want     error
		wantText string
	}{
		{"server without STARTTLS", smtpsim.Config{DisableTLS: true}, nil, nil, notify.ErrPermanent, "does not offer STARTTLS"},
		{"wrong password", smtpsim.Config{}, nil, func(c *notify.SMTPConfig) { c.Password = "wrong-Pässword" }, notify.ErrAuth, "535"},
		{"unknown user via LOGIN", smtpsim.Config{AuthMechanisms: []string{"LOGIN"}}, nil, func(c *notify.SMTPConfig) { c.Username = "eve" }, notify.ErrAuth, "535"},
		{"relay requires AUTH we do not send", smtpsim.Config{}, nil, func(c *notify.SMTPConfig) { c.Username, c.Password = "", "" }, notify.ErrAuth, "530"},
		{"451 at DATA", smtpsim.Config{}, func(s *smtpsim.Server) { s.FailNext(1, 451, "Temporary local problem") }, nil, notify.ErrTransient, "451"},
		{"550 at DATA", smtpsim.Config{}, func(s *smtpsim.Server) { s.FailNext(1, 550, "Mailbox unavailable") }, nil, notify.ErrPermanent, "550"},
		{"550 at RCPT", smtpsim.Config{}, func(s *smtpsim.Server) { s.FailNextRcpt(1, 550, "Mailbox unavailable") }, nil, notify.ErrPermanent, "550"},
		{"553 at RCPT", smtpsim.Config{}, func(s *smtpsim.Server) { s.FailNextRcpt(1, 553, "Bad address syntax") }, nil, notify.ErrPermanent, "553"},
		{"452 at RCPT", smtpsim.Config{}, func(s *smtpsim.Server) { s.FailNextRcpt(1, 452, "Mailbox full") }, nil, notify.ErrTransient, "452"},
		{"self-signed certificate without CA bundle", smtpsim.Config{}, nil, func(c *notify.SMTPConfig) { c.CABundle = nil }, notify.ErrPermanent, "certificate"},
		{"self-signed certificate with implicit TLS", smtpsim.Config{ImplicitTLS: true}, nil,
			func(c *notify.SMTPConfig) { c.CABundle, c.Security = nil, notify.SecurityTLS }, notify.ErrPermanent, "certificate"},
		{"certificate for another name", smtpsim.Config{TLS: otherNameTLS}, nil, nil, notify.ErrPermanent, "certificate"},
		{"implicit TLS against STARTTLS port", smtpsim.Config{}, nil, func(c *notify.SMTPConfig) { c.Security = notify.SecurityTLS }, notify.ErrPermanent, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := relay(t, tt.relayCfg)
			if tt.inject != nil {
				tt.inject(s)
			}
			err := senderFor(t, s, tt.mutate).Send(testContext(t), recipient, rendered(t, "en"), "<d-1@easguard.invalid>")
			assertClass(t, err, tt.want)
			t.Log(err)
			if !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("error %q does not say %q", err, tt.wantText)
			}
			for _, secret := range []string{svcPassword, "wrong-Pässword"} {
				if strings.Contains(err.Error(), secret) || strings.Contains(fmt.Sprintf("%+v", err), secret) {
					t.Errorf("error reveals the password: %v", err)
				}
			}
			if n := len(s.Messages()); n != 0 {
				t.Errorf("%d mails arrived, want none", n)
			}
		})
	}
}

func TestSendRetryAfterTransientFailureKeepsMessageID(t *testing.T) {
	s := relay(t, smtpsim.Config{})
	s.FailNext(1, 451, "4.3.0 Try again later")
	snd := senderFor(t, s, nil)
	r := rendered(t, "en")
	const id = "<decision-7f3a@easguard.invalid>"
	assertClass(t, snd.Send(testContext(t), recipient, r, id), notify.ErrTransient)
	assertClass(t, snd.Send(testContext(t), recipient, r, id), nil)
	msgs, err := s.WaitFor(testContext(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 1 || msgs[0].MessageID != id {
		t.Fatalf("got %d mails (first id %q), want exactly one with id %s", len(msgs), msgs[0].MessageID, id)
	}
}

// TestSendNetworkFailuresAreTransient uses real sockets that refuse or
// never answer.
func TestSendNetworkFailuresAreTransient(t *testing.T) {
	closedPort := func(tb testing.TB) int {
		tb.Helper()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		return port
	}
	// silentPort accepts connections and never greets, as a hung relay.
	silentPort := func(tb testing.TB) int {
		tb.Helper()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			var conns []net.Conn
			defer func() {
				for _, c := range conns {
					c.Close()
				}
			}()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				conns = append(conns, c)
			}
		}()
		tb.Cleanup(func() { ln.Close(); <-done })
		return ln.Addr().(*net.TCPAddr).Port
	}
	tests := []struct {
		name    string
		port    func(testing.TB) int
		timeout time.Duration
		ctx     func(testing.TB) context.Context
		wantCtx error
	}{
		{"connection refused", closedPort, 10 * time.Second, testContext, nil},
		{"relay never answers: Timeout", silentPort, 300 * time.Millisecond, testContext, nil},
		{"relay never answers: ctx deadline", silentPort, time.Minute, func(tb testing.TB) context.Context {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			tb.Cleanup(cancel)
			return ctx
		}, context.DeadlineExceeded},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			snd, err := notify.NewSender(notify.SMTPConfig{Host: "127.0.0.1", Port: tt.port(t), From: fromAddr, Timeout: tt.timeout})
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			err = snd.Send(tt.ctx(t), recipient, rendered(t, "en"), "")
			assertClass(t, err, notify.ErrTransient)
			t.Log(err)
			if tt.wantCtx != nil && !errors.Is(err, tt.wantCtx) {
				t.Errorf("error %v does not wrap %v", err, tt.wantCtx)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("took %s to give up", d)
			}
		})
	}
}

// TestSendHostileValuesCannotInjectHeaders sends what a hostile phone can
// report all the way through SMTP and reads the headers the relay got.
func TestSendHostileValuesCannotInjectHeaders(t *testing.T) {
	s := relay(t, smtpsim.Config{})
	d := sample("en", notify.StateBlocked, notify.ReasonNotEnrolled)
	d.FriendlyName = "Phone\r\nBcc: victim@evil.test\r\nX-Injected: yes\r\n\r\n<script>alert('x')</script>"
	d.DeviceID = "\"><img src=x onerror=alert(1)>\nSubject: forged"
	r := render(t, notify.DefaultTemplates(), d)
	snd := senderFor(t, s, nil)
	assertClass(t, snd.Send(testContext(t), recipient, r, "<hostile-1@easguard.invalid>"), nil)

	// A caller that builds Rendered itself is protected by Send too.
	raw := notify.Rendered{Subject: "Hi\r\nBcc: victim@evil.test", Text: "text", HTML: "<p>html</p>"}
	assertClass(t, snd.Send(testContext(t), recipient, raw, "<hostile-2@easguard.invalid>"), nil)

	msgs, err := s.WaitFor(testContext(t), 2)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		if len(m.To) != 1 || m.To[0] != recipient {
			t.Errorf("envelope recipients %v, want only %s", m.To, recipient)
		}
		for _, h := range []string{"Bcc", "X-Injected"} {
			if v, ok := m.Headers[h]; ok {
				t.Errorf("injected header %s: %v", h, v)
			}
		}
		if n := len(m.Headers["Subject"]); n != 1 {
			t.Errorf("%d Subject headers", n)
		}
		assertSafeSubject(t, m.Subject)
	}
	if strings.Contains(msgs[0].HTML, "<script") || strings.Contains(msgs[0].HTML, "<img") {
		t.Errorf("HTML carries live markup:\n%s", msgs[0].HTML)
	}
	if !strings.Contains(msgs[0].HTML, "&lt;script&gt;") {
		t.Error("HTML lacks the escaped friendly name")
	}
	if msgs[1].Subject != "Hi Bcc: victim@evil.test" {
		t.Errorf("subject %q", msgs[1].Subject)
	}
}

func TestSendRejectsBadInputPermanently(t *testing.T) {
	s := relay(t, smtpsim.Config{})
	snd := senderFor(t, s, nil)
	r := rendered(t, "en")
	tests := []struct {
		name, to, id string
		r            notify.Rendered
	}{
		{"recipient is not an address", "not an address", "<a@b>", r},
		{"recipient with a header", "anna@contoso.com\r\nBcc: x@evil.test", "<a@b>", r},
		{"message id with a line break", recipient, "<a@b>\r\nBcc: x@evil.test", r},
		{"message id without @", recipient, "<decision-1>", r},
		{"nothing to send", recipient, "<a@b>", notify.Rendered{Subject: "s"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assertClass(t, snd.Send(testContext(t), tt.to, tt.r, tt.id), notify.ErrPermanent)
		})
	}
	if n := len(s.Messages()); n != 0 {
		t.Errorf("%d mails arrived", n)
	}
}

func TestNewSenderValidates(t *testing.T) {
	valid := notify.SMTPConfig{Host: "smtp.contoso.com", Port: 587, Username: "svc", Password: svcPassword, From: fromAddr}
	tests := []struct {
		name      string
		mutate    func(*notify.SMTPConfig)
		wantField string // "" = valid
	}{
		{"valid", func(*notify.SMTPConfig) {}, ""},
		{"security defaults to starttls", func(c *notify.SMTPConfig) { c.Security = "" }, ""},
		{"security is case-insensitive", func(c *notify.SMTPConfig) { c.Security = "TLS" }, ""},
		{"bare From address", func(c *notify.SMTPConfig) { c.From = "it@contoso.com" }, ""},
		{"empty host", func(c *notify.SMTPConfig) { c.Host = "" }, "Host"},
		{"host with a space", func(c *notify.SMTPConfig) { c.Host = "smtp contoso" }, "Host"},
		{"port 0", func(c *notify.SMTPConfig) { c.Port = 0 }, "Port"},
		{"port 65536", func(c *notify.SMTPConfig) { c.Port = 65536 }, "Port"},
		{"unknown security", func(c *notify.SMTPConfig) { c.Security = "ssl" }, "Security"},
		{"From not an address", func(c *notify.SMTPConfig) { c.From = "IT Service" }, "From"},
		{"From empty", func(c *notify.SMTPConfig) { c.From = "" }, "From"},
		{"From with a header", func(c *notify.SMTPConfig) { c.From = "it@contoso.com\r\nBcc: x@evil.test" }, "From"},
		{"password without user", func(c *notify.SMTPConfig) { c.Username = "" }, "Password"},
		{"AUTH in clear text", func(c *notify.SMTPConfig) { c.Security = "none" }, "Username"},
		{"CA bundle without certificates", func(c *notify.SMTPConfig) { c.CABundle = []byte("not pem") }, "CABundle"},
		{"negative timeout", func(c *notify.SMTPConfig) { c.Timeout = -time.Second }, "Timeout"},
		{"HELO with a line break", func(c *notify.SMTPConfig) { c.HeloName = "a\r\nMAIL FROM:<x>" }, "HeloName"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := valid
			tt.mutate(&cfg)
			_, err := notify.NewSender(cfg)
			if tt.wantField == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				return
			}
			if !errors.Is(err, notify.ErrInvalidConfig) || !strings.Contains(err.Error(), tt.wantField) {
				t.Fatalf("got %v, want ErrInvalidConfig naming %s", err, tt.wantField)
			}
			if strings.Contains(err.Error(), svcPassword) {
				t.Errorf("error reveals the password: %v", err)
			}
		})
	}
}

func TestSMTPConfigNeverPrintsThePassword(t *testing.T) {
	cfg := notify.SMTPConfig{Host: "smtp.contoso.com", Port: 587, Username: "svc", Password: svcPassword, From: fromAddr}
	var logged strings.Builder
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("config", "smtp", cfg)
	for name, s := range map[string]string{
		"%v": fmt.Sprintf("%v", cfg), "%+v": fmt.Sprintf("%+v", cfg), "%#v": fmt.Sprintf("%#v", cfg),
		"%s": fmt.Sprintf("%s", cfg), "slog": logged.String(),
	} {
		if strings.Contains(s, svcPassword) {
			t.Errorf("%s prints the password: %s", name, s)
		}
		if !strings.Contains(s, "smtp.contoso.com") {
			t.Errorf("%s lacks the host: %s", name, s)
		}
	}
}
