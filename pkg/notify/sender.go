package notify

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	netmail "net/mail"
	"strconv"
	"strings"
	"time"

	"github.com/wneessen/go-mail"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// Security modes for SMTPConfig.Security.
const (
	// SecurityStartTLS upgrades a plain connection (usually port 587 or
	// 25) with STARTTLS and refuses to send when the server does not
	// offer it, so mail and password never cross the network in clear.
	SecurityStartTLS = "starttls"
	// SecurityTLS speaks TLS from the first byte (SMTPS, usually 465).
	SecurityTLS = "tls"
	// SecurityNone sends in clear text, for a relay on the same host or
	// an internal relay that accepts mail without TLS and without AUTH.
	SecurityNone = "none"
)

// DefaultTimeout bounds each network step of a send when SMTPConfig's
// Timeout is zero.
const DefaultTimeout = 30 * time.Second

// Every Send failure is exactly one of these, checked with errors.Is, so
// the caller can decide without parsing messages: retry ErrTransient later
// with the same message id, drop the notification on ErrPermanent, and
// alert an administrator on ErrAuth because no retry fixes credentials.
var (
	ErrTransient = errors.New("transient mail delivery failure")
	ErrPermanent = errors.New("permanent mail delivery failure")
	ErrAuth      = errors.New("SMTP authentication failed")
)

// ErrInvalidConfig is wrapped by NewSender's errors, which name the field,
// so a configuration loader can tell a bad setting from other failures.
var ErrInvalidConfig = errors.New("invalid SMTP configuration")

// SMTPConfig says how to reach the mail relay. Password never appears in
// errors, String or logs.
type SMTPConfig struct {
	Host     string
	Port     int
	Username string // empty = no AUTH
	Password string
	// Security is "starttls" (default), "tls" (implicit TLS) or "none".
	Security           string
	InsecureSkipVerify bool
	CABundle           []byte // PEM; nil = system roots
	From               string // e.g. "IT Service <it@contoso.com>"
	HeloName           string // "" = this host's name
	Timeout            time.Duration
}

// String describes the configuration without the password, so a logged or
// printed configuration cannot leak it.
func (c SMTPConfig) String() string {
	pw := ""
	if c.Password != "" {
		pw = " password=[REDACTED]"
	}
	return fmt.Sprintf("smtp://%s security=%s user=%q%s from=%q", net.JoinHostPort(c.Host, strconv.Itoa(c.Port)),
		c.security(), c.Username, pw, c.From)
}

// GoString keeps %#v from printing the password.
func (c SMTPConfig) GoString() string { return "notify.SMTPConfig{" + c.String() + "}" }

// LogValue keeps slog from printing the password.
func (c SMTPConfig) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("host", c.Host), slog.Int("port", c.Port), slog.String("security", c.security()),
		slog.String("username", c.Username), slog.Bool("password_set", c.Password != ""),
		slog.String("from", c.From), slog.Bool("insecure_skip_verify", c.InsecureSkipVerify),
	)
}

func (c SMTPConfig) security() string {
	s := strings.ToLower(strings.TrimSpace(c.Security))
	if s == "" {
		return SecurityStartTLS
	}
	return s
}

// Sender sends notifications through one relay. It is safe for concurrent
// use; each Send uses its own connection, so one stuck send cannot hold up
// another and a retried send starts clean.
type Sender struct {
	tracer   trace.Tracer
	cfg      SMTPConfig
	security string
	from     *netmail.Address
	tls      *tls.Config
	timeout  time.Duration
}

// NewSender checks cfg completely, so a mistake is reported at start with
// the field it concerns rather than at the first blocked phone.
func NewSender(cfg SMTPConfig) (*Sender, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("notify: %w: %s", ErrInvalidConfig, fmt.Sprintf(format, a...))
	}
	s := &Sender{tracer: noop.NewTracerProvider().Tracer(""), cfg: cfg, security: cfg.security(), timeout: cfg.Timeout}
	if strings.TrimSpace(cfg.Host) == "" || strings.ContainsFunc(cfg.Host, isSpaceOrControl) {
		return nil, bad("Host %q must be a host name or IP address", cfg.Host)
	}
	if cfg.Port < 1 || cfg.Port > 65535 {
		return nil, bad("Port %d must be between 1 and 65535", cfg.Port)
	}
	switch s.security {
	case SecurityStartTLS, SecurityTLS, SecurityNone:
	default:
		return nil, bad("Security %q must be %q, %q or %q", cfg.Security, SecurityStartTLS, SecurityTLS, SecurityNone)
	}
	from, err := netmail.ParseAddress(cfg.From)
	if err != nil {
		return nil, bad("From %q is not a mail address: %v", cfg.From, err)
	}
	s.from = from
	if cfg.Username == "" && cfg.Password != "" {
		return nil, bad("Password is set but Username is empty")
	}
	if strings.ContainsFunc(cfg.Username, isControl) {
		return nil, bad("Username must not contain control characters")
	}
	if cfg.Username != "" && s.security == SecurityNone {
		return nil, bad("Username needs Security %q or %q: a password is never sent in clear text", SecurityStartTLS, SecurityTLS)
	}
	if strings.ContainsFunc(cfg.HeloName, isSpaceOrControl) {
		return nil, bad("HeloName %q must be a single host name", cfg.HeloName)
	}
	if cfg.Timeout < 0 {
		return nil, bad("Timeout %s must not be negative", cfg.Timeout)
	}
	if s.timeout == 0 {
		s.timeout = DefaultTimeout
	}
	s.tls = &tls.Config{ServerName: cfg.Host, MinVersion: tls.VersionTLS12, InsecureSkipVerify: cfg.InsecureSkipVerify} //nolint:gosec // the administrator's explicit choice
	if cfg.CABundle != nil {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(cfg.CABundle) {
			return nil, bad("CABundle holds no PEM certificate")
		}
		s.tls.RootCAs = pool
	}
	return s, nil
}

// Send delivers r to one recipient. messageID (e.g.
// "<decision-id@easguard.invalid>") becomes the Message-ID, so a retry
// after ErrTransient carries the same id and the recipient's server and
// client can recognise a duplicate; "" lets go-mail pick a random one.
// The mail is marked as automatically generated so out-of-office replies
// and bounces to IT do not loop. ctx bounds the whole send: cancelling it
// closes the connection.
func (s *Sender) Send(ctx context.Context, to string, r Rendered, messageID string) error {
	ctx, span := s.tracer.Start(ctx, "smtp send", trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(
		attribute.String("server.address", s.cfg.Host), attribute.Int("server.port", s.cfg.Port), attribute.String("easguard.mail.message_id", messageID)))
	err := s.send(ctx, to, r, messageID)
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
	return err
}

// Trace has every send traced as a client span (the SMTP server, the
// Message-ID), in the trace of the device journey the mail belongs to.
func (s *Sender) Trace(tp trace.TracerProvider) {
	s.tracer = tp.Tracer("github.com/easguard/easguard/pkg/notify")
}

func (s *Sender) send(ctx context.Context, to string, r Rendered, messageID string) error {
	msg, err := s.message(to, r, messageID)
	if err != nil {
		return &sendError{kind: ErrPermanent, msg: fmt.Sprintf("notify: send to %q: %v: %v", to, ErrPermanent, err), cause: err}
	}
	auth := &authenticator{username: s.cfg.Username, password: s.cfg.Password}
	var stops []func() bool
	defer func() {
		for _, stop := range stops {
			stop()
		}
	}()
	dial := func(dctx context.Context, network, addr string) (net.Conn, error) {
		var conn net.Conn
		var err error
		nd := &net.Dialer{}
		if s.security == SecurityTLS {
			conn, err = (&tls.Dialer{NetDialer: nd, Config: s.tls}).DialContext(dctx, network, addr)
		} else {
			conn, err = nd.DialContext(dctx, network, addr)
		}
		if err != nil {
			return nil, err
		}
		// go-mail bounds each step with Timeout; closing the connection
		// when ctx ends makes cancellation stop a send in progress too.
		stops = append(stops, context.AfterFunc(ctx, func() { conn.Close() }))
		return conn, nil
	}
	opts := []mail.Option{
		mail.WithTimeout(s.timeout),
		mail.WithDialContextFunc(dial),
		mail.WithTLSConfig(s.tls),
		mail.WithPort(s.cfg.Port),
	}
	switch s.security {
	case SecurityStartTLS:
		opts = append(opts, mail.WithTLSPolicy(mail.TLSMandatory))
	case SecurityTLS:
		opts = append(opts, mail.WithSSL())
	case SecurityNone:
		opts = append(opts, mail.WithTLSPolicy(mail.NoTLS))
	}
	if s.cfg.HeloName != "" {
		opts = append(opts, mail.WithHELO(s.cfg.HeloName))
	}
	if s.cfg.Username != "" {
		opts = append(opts, mail.WithSMTPAuthCustom(auth))
	}
	client, err := mail.NewClient(s.cfg.Host, opts...)
	if err != nil {
		return s.classify(ctx, to, auth, fmt.Errorf("set up SMTP client: %w", err))
	}
	if err := client.DialAndSendWithContext(ctx, msg); err != nil {
		return s.classify(ctx, to, auth, err)
	}
	return nil
}

// message builds the MIME message; its errors are the caller's fault and
// permanent, since resending the same input fails the same way.
func (s *Sender) message(to string, r Rendered, messageID string) (*mail.Msg, error) {
	rcpt, err := netmail.ParseAddress(to)
	if err != nil || strings.ContainsFunc(to, isControl) {
		return nil, fmt.Errorf("recipient %q is not a mail address", to)
	}
	if r.Text == "" && r.HTML == "" {
		return nil, errors.New("the rendered notification has neither text nor HTML")
	}
	id := strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(messageID), "<"), ">")
	if messageID != "" && !validMessageID(id) {
		return nil, fmt.Errorf("message id %q is not of the form <left@right>", messageID)
	}
	m := mail.NewMsg(mail.WithNoDefaultUserAgent())
	m.FromMailAddress(s.from)
	m.ToMailAddress(rcpt)
	m.Subject(cleanSubject(r.Subject))
	if id != "" {
		m.SetMessageIDWithValue(id)
	} else {
		m.SetMessageID()
	}
	m.SetDateWithValue(time.Now())
	m.SetGenHeader(mail.Header("Auto-Submitted"), "auto-generated")
	m.SetGenHeader(mail.HeaderXAutoResponseSuppress, "All")
	switch {
	case r.Text != "" && r.HTML != "":
		m.SetBodyString(mail.TypeTextPlain, r.Text)
		m.AddAlternativeString(mail.TypeTextHTML, r.HTML)
	case r.Text != "":
		m.SetBodyString(mail.TypeTextPlain, r.Text)
	default:
		m.SetBodyString(mail.TypeTextHTML, r.HTML)
	}
	return m, nil
}

// validMessageID accepts the dot-atom form RFC 5322 asks for, without the
// angle brackets; anything else could break the header.
func validMessageID(id string) bool {
	left, right, ok := strings.Cut(id, "@")
	if !ok || left == "" || right == "" || strings.Contains(right, "@") {
		return false
	}
	for _, c := range id {
		if c <= ' ' || c >= 0x7f || strings.ContainsRune(`<>()[]\,;:"`, c) {
			return false
		}
	}
	return true
}

func isControl(r rune) bool { return r < ' ' || r == 0x7f }

func isSpaceOrControl(r rune) bool { return isControl(r) || r == ' ' }
