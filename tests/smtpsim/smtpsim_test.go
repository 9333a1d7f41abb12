package smtpsim_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/easguard/easguard/tests/smtpsim"
)

// multipartMail is an alternative text/HTML mail as mail clients send it:
// an encoded-word subject, quoted-printable text and base64 HTML.
const multipartMail = "From: \"IT Service\" <it@contoso.com>\r\n" +
	"To: alice@contoso.com\r\n" +
	"Subject: =?UTF-8?q?Ger=C3=A4t_gesperrt?=\r\n" +
	"Message-ID: <decision-1@easguard.invalid>\r\n" +
	"MIME-Version: 1.0\r\n" +
	"Content-Type: multipart/alternative; boundary=\"b1\"\r\n" +
	"\r\n" +
	"--b1\r\n" +
	"Content-Type: text/plain; charset=UTF-8\r\n" +
	"Content-Transfer-Encoding: quoted-printable\r\n" +
	"\r\n" +
	"Hallo J=C3=BCrgen, a long line that is soft-=\r\nwrapped.\r\n" +
	"--b1\r\n" +
	"Content-Type: text/html; charset=UTF-8\r\n" +
	"Content-Transfer-Encoding: base64\r\n" +
	"\r\n" +
	"PHA+SGFsbG8gPGI+SsO8cmdlbjwvYj48L3A+\r\n" +
	"--b1--\r\n"

func ctxTimeout(tb testing.TB) context.Context {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

// trusting returns a TLS configuration that trusts exactly s.
func trusting(tb testing.TB, s *smtpsim.Server) *tls.Config {
	tb.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(s.CertPEM()) {
		tb.Fatal("CertPEM does not parse")
	}
	return &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}
}

// client dials s the way cfg asks and closes the client at cleanup.
func client(tb testing.TB, s *smtpsim.Server, mode string) *smtp.Client {
	tb.Helper()
	var (
		c   *smtp.Client
		err error
	)
	switch mode {
	case "plain":
		c, err = smtp.Dial(s.Addr())
	case "starttls":
		c, err = smtp.DialStartTLS(s.Addr(), trusting(tb, s))
	case "tls":
		c, err = smtp.DialTLS(s.Addr(), trusting(tb, s))
	default:
		tb.Fatalf("unknown mode %q", mode)
	}
	if err != nil {
		tb.Fatalf("dial %s (%s): %v", s.Addr(), mode, err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

func code(err error) int {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code
	}
	return 0
}

func TestReceivesAndDecodes(t *testing.T) {
	tests := []struct {
		name     string
		cfg      smtpsim.Config
		mode     string
		auth     sasl.Client
		wantTLS  bool
		wantUser string
	}{
		{"starttls and AUTH PLAIN", smtpsim.Config{Users: map[string]string{"svc": "pw"}}, "starttls",
			sasl.NewPlainClient("", "svc", "pw"), true, "svc"},
		{"starttls and AUTH LOGIN", smtpsim.Config{Users: map[string]string{"svc": "pw"}}, "starttls",
			sasl.NewLoginClient("svc", "pw"), true, "svc"},
		{"implicit TLS", smtpsim.Config{ImplicitTLS: true}, "tls", nil, true, ""},
		{"open relay without TLS", smtpsim.Config{DisableTLS: true}, "plain", nil, false, ""},
		{"open relay accepts any credentials", smtpsim.Config{}, "starttls",
			sasl.NewPlainClient("", "anyone", "anything"), true, "anyone"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := smtpsim.StartTest(t, tt.cfg)
			c := client(t, s, tt.mode)
			if tt.auth != nil {
				if err := c.Auth(tt.auth); err != nil {
					t.Fatalf("auth: %v", err)
				}
			}
			if err := c.SendMail("it@contoso.com", []string{"alice@contoso.com"}, strings.NewReader(multipartMail)); err != nil {
				t.Fatalf("send: %v", err)
			}
			msgs, err := s.WaitFor(ctxTimeout(t), 1)
			if err != nil {
				t.Fatal(err)
			}
			m := msgs[0]
			checks := []struct{ what, got, want string }{
				{"envelope from", m.From, "it@contoso.com"},
				{"envelope to", strings.Join(m.To, ","), "alice@contoso.com"},
				{"subject", m.Subject, "Gerät gesperrt"},
				{"message id", m.MessageID, "<decision-1@easguard.invalid>"},
				{"text", m.Text, "Hallo Jürgen, a long line that is soft-wrapped."},
				{"html", m.HTML, "<p>Hallo <b>Jürgen</b></p>"},
				{"from header", strings.Join(m.Headers["From"], ""), "\"IT Service\" <it@contoso.com>"},
				{"auth user", m.AuthUser, tt.wantUser},
				{"raw", string(m.Raw), multipartMail},
			}
			for _, c := range checks {
				if c.got != c.want {
					t.Errorf("%s = %q, want %q", c.what, c.got, c.want)
				}
			}
			if m.TLS != tt.wantTLS || m.ID != 1 || m.Received.IsZero() {
				t.Errorf("TLS=%v ID=%d Received=%v, want TLS=%v ID=1 and a time", m.TLS, m.ID, m.Received, tt.wantTLS)
			}
		})
	}
}

func TestRefusals(t *testing.T) {
	users := map[string]string{"svc": "pw"}
	tests := []struct {
		name     string
		cfg      smtpsim.Config
		mode     string
		auth     sasl.Client
		wantAuth int // reply code of AUTH, 0 = success or not tried
		wantMail int // reply code of MAIL, 0 = accepted
	}{
		{"wrong password", smtpsim.Config{Users: users}, "starttls", sasl.NewPlainClient("", "svc", "nope"), 535, 530},
		{"unknown user via LOGIN", smtpsim.Config{Users: users}, "starttls", sasl.NewLoginClient("eve", "pw"), 535, 530},
		{"mail without auth", smtpsim.Config{Users: users}, "starttls", nil, 0, 530},
		{"PLAIN when only LOGIN is offered", smtpsim.Config{Users: users, AuthMechanisms: []string{"LOGIN"}}, "starttls",
			sasl.NewPlainClient("", "svc", "pw"), 504, 530},
		{"mail before STARTTLS", smtpsim.Config{RequireTLS: true}, "plain", nil, 0, 530},
		{"after STARTTLS", smtpsim.Config{RequireTLS: true}, "starttls", nil, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := smtpsim.StartTest(t, tt.cfg)
			c := client(t, s, tt.mode)
			if tt.auth != nil {
				if got := code(c.Auth(tt.auth)); got != tt.wantAuth {
					t.Errorf("AUTH replied %d, want %d", got, tt.wantAuth)
				}
			}
			if got := code(c.Mail("it@contoso.com", nil)); got != tt.wantMail {
				t.Errorf("MAIL replied %d, want %d", got, tt.wantMail)
			}
			if tt.wantMail != 0 && len(s.Messages()) != 0 {
				t.Error("a refused session stored mail")
			}
		})
	}
}

func TestDisableTLSOffersNoSTARTTLS(t *testing.T) {
	s := smtpsim.StartTest(t, smtpsim.Config{DisableTLS: true, Users: map[string]string{"svc": "pw"}})
	c := client(t, s, "plain")
	if err := c.Hello("localhost"); err != nil {
		t.Fatal(err)
	}
	if ok, _ := c.Extension("STARTTLS"); ok {
		t.Error("STARTTLS offered although TLS is disabled")
	}
	if s.CertPEM() != nil {
		t.Error("CertPEM is set although TLS is disabled")
	}
	if err := c.Auth(sasl.NewPlainClient("", "svc", "pw")); err != nil {
		t.Errorf("AUTH in clear text with TLS disabled: %v", err)
	}
}

func TestFailNext(t *testing.T) {
	tests := []struct {
		name     string
		inject   func(*smtpsim.Server)
		wantCode []int // per attempt, 0 = accepted
	}{
		{"451 at DATA once", func(s *smtpsim.Server) { s.FailNext(1, 451, "try later") }, []int{451, 0}},
		{"550 at DATA twice", func(s *smtpsim.Server) { s.FailNext(2, 550, "no") }, []int{550, 550, 0}},
		{"550 at RCPT once", func(s *smtpsim.Server) { s.FailNextRcpt(1, 550, "mailbox unavailable") }, []int{550, 0}},
		{"cancelled", func(s *smtpsim.Server) { s.FailNext(3, 451, ""); s.FailNext(0, 0, "") }, []int{0}},
		{"reset clears faults", func(s *smtpsim.Server) { s.FailNext(3, 451, ""); s.Reset() }, []int{0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := smtpsim.StartTest(t, smtpsim.Config{})
			tt.inject(s)
			c := client(t, s, "starttls")
			accepted := 0
			for i, want := range tt.wantCode {
				err := c.SendMail("it@contoso.com", []string{"alice@contoso.com"}, strings.NewReader(multipartMail))
				if got := code(err); got != want || (want == 0 && err != nil) {
					t.Fatalf("attempt %d: %v (code %d), want code %d", i+1, err, got, want)
				}
				if err != nil {
					if err := c.Reset(); err != nil {
						t.Fatal(err)
					}
				} else {
					accepted++
				}
			}
			if got := len(s.Messages()); got != accepted {
				t.Errorf("stored %d mails, want %d", got, accepted)
			}
		})
	}
}

func TestWaitFor(t *testing.T) {
	t.Run("wakes when mail arrives", func(t *testing.T) {
		s := smtpsim.StartTest(t, smtpsim.Config{})
		done := make(chan error, 1)
		go func() {
			_, err := s.WaitFor(ctxTimeout(t), 2)
			done <- err
		}()
		c := client(t, s, "starttls")
		for range 2 {
			if err := c.SendMail("a@b.test", []string{"c@d.test"}, strings.NewReader(multipartMail)); err != nil {
				t.Fatal(err)
			}
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
	t.Run("deadline", func(t *testing.T) {
		s := smtpsim.StartTest(t, smtpsim.Config{})
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := s.WaitFor(ctx, 1); !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
	})
	t.Run("close", func(t *testing.T) {
		s, err := smtpsim.Start(smtpsim.Config{})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			_, err := s.WaitFor(ctxTimeout(t), 1)
			done <- err
		}()
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if err := <-done; !errors.Is(err, smtpsim.ErrClosed) {
			t.Fatalf("got %v, want ErrClosed", err)
		}
		if err := s.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
}

func get(tb testing.TB, url string) (int, string, http.Header) {
	tb.Helper()
	req, err := http.NewRequestWithContext(ctxTimeout(tb), http.MethodGet, url, nil)
	if err != nil {
		tb.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatal(err)
	}
	return resp.StatusCode, string(b), resp.Header
}

func TestHTTPAPI(t *testing.T) {
	s := smtpsim.StartTest(t, smtpsim.Config{APIAddr: "127.0.0.1:0"})
	if !strings.HasPrefix(s.APIURL(), "http://127.0.0.1:") {
		t.Fatalf("APIURL = %q", s.APIURL())
	}
	c := client(t, s, "starttls")
	hostile := strings.Replace(multipartMail, "=?UTF-8?q?Ger=C3=A4t_gesperrt?=", "<script>alert(1)</script>", 1)
	for _, body := range []string{multipartMail, hostile} {
		if err := c.SendMail("it@contoso.com", []string{"alice@contoso.com"}, strings.NewReader(body)); err != nil {
			t.Fatal(err)
		}
	}

	code, body, hdr := get(t, s.APIURL()+"/api/messages")
	var list []smtpsim.APIMessage
	if err := json.Unmarshal([]byte(body), &list); err != nil || code != 200 {
		t.Fatalf("GET /api/messages: %d %v\n%s", code, err, body)
	}
	if ct := hdr.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	if len(list) != 2 || list[0].ID != 1 || list[1].ID != 2 {
		t.Fatalf("listed %+v, want ids 1 and 2, newest last", list)
	}
	m := list[0]
	if m.Subject != "Gerät gesperrt" || m.Text != "Hallo Jürgen, a long line that is soft-wrapped." ||
		m.HTML != "<p>Hallo <b>Jürgen</b></p>" || m.MessageID != "<decision-1@easguard.invalid>" ||
		!m.TLS || m.From != "it@contoso.com" || len(m.To) != 1 || m.To[0] != "alice@contoso.com" || m.Size != len(multipartMail) {
		t.Errorf("message 1 = %+v", m)
	}

	tests := []struct {
		name, path   string
		wantCode     int
		wantContains string
		wantAbsent   string
	}{
		{"raw", "/api/messages/1/raw", 200, "Content-Transfer-Encoding: base64\r\n", ""},
		{"raw of unknown id", "/api/messages/9/raw", 404, "", ""},
		{"raw of a non-number", "/api/messages/x/raw", 400, "", ""},
		{"text", "/messages/1/text", 200, "Hallo Jürgen", ""},
		{"html", "/messages/1/html", 200, "<b>Jürgen</b>", ""},
		{"index escapes subjects", "/", 200, "&lt;script&gt;alert(1)&lt;/script&gt;", "<script>"},
		{"index links the mails", "/", 200, `href="/api/messages/1/raw"`, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body, _ := get(t, s.APIURL()+tt.path)
			if code != tt.wantCode || !strings.Contains(body, tt.wantContains) {
				t.Errorf("GET %s = %d, want %d containing %q:\n%s", tt.path, code, tt.wantCode, tt.wantContains, body)
			}
			if tt.wantAbsent != "" && strings.Contains(body, tt.wantAbsent) {
				t.Errorf("GET %s contains %q", tt.path, tt.wantAbsent)
			}
		})
	}
	if _, body, _ := get(t, s.APIURL()+"/api/messages/1/raw"); body != multipartMail {
		t.Errorf("raw is not byte for byte what was sent:\n%q", body)
	}

	req, err := http.NewRequestWithContext(ctxTimeout(t), http.MethodDelete, s.APIURL()+"/api/messages", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent || len(s.Messages()) != 0 {
		t.Fatalf("DELETE: %d, %d messages left", resp.StatusCode, len(s.Messages()))
	}
	if _, body, _ := get(t, s.APIURL()+"/api/messages"); strings.TrimSpace(body) != "[]" {
		t.Errorf("after DELETE the list is %s, want []", body)
	}
}

func TestStartRejectsBadConfig(t *testing.T) {
	tests := []struct {
		name string
		cfg  smtpsim.Config
	}{
		{"DisableTLS with RequireTLS", smtpsim.Config{DisableTLS: true, RequireTLS: true}},
		{"DisableTLS with ImplicitTLS", smtpsim.Config{DisableTLS: true, ImplicitTLS: true}},
		{"unknown mechanism", smtpsim.Config{AuthMechanisms: []string{"CRAM-MD5"}}},
		{"bad address", smtpsim.Config{Addr: "127.0.0.1:notaport"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := smtpsim.Start(tt.cfg)
			if err == nil {
				s.Close()
				t.Fatal("started")
			}
		})
	}
}

func TestCustomCertificate(t *testing.T) {
	cfg, pem, err := smtpsim.SelfSignedTLS("mail.other.test")
	if err != nil {
		t.Fatal(err)
	}
	s := smtpsim.StartTest(t, smtpsim.Config{TLS: cfg})
	if !bytes.Equal(s.CertPEM(), pem) {
		t.Fatal("CertPEM is not the configured certificate")
	}
	tlsCfg := trusting(t, s)
	tlsCfg.ServerName = "mail.other.test"
	c, err := smtp.DialStartTLS(s.Addr(), tlsCfg)
	if err != nil {
		t.Fatalf("STARTTLS with the configured certificate: %v", err)
	}
	c.Close()
}
