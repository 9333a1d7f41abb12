package notify

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"slices"
	"strings"
	"syscall"

	"github.com/wneessen/go-mail"
	"github.com/wneessen/go-mail/smtp"
)

// sendError is what Send returns: one of the three classes, a message with
// the password redacted, and (unless redaction changed it) the underlying
// error for errors.As.
type sendError struct {
	kind  error
	msg   string
	cause error
}

func (e *sendError) Error() string   { return e.msg }
func (e *sendError) Unwrap() []error { return []error{e.kind, e.cause} }

// errNoSTARTTLS is the cause when the relay does not offer STARTTLS.
var errNoSTARTTLS = errors.New(`the server does not offer STARTTLS, which Security "starttls" requires; not sending in clear text`)

// classify turns a go-mail failure into exactly one of ErrTransient,
// ErrPermanent and ErrAuth.
func (s *Sender) classify(ctx context.Context, to string, auth *authenticator, err error) error {
	kind, cause := s.kindOf(ctx, auth, err)
	if cause == nil {
		cause = err
	}
	text := s.redact(cause.Error())
	if text != cause.Error() {
		cause = errors.New(text) // the original would still say the secret
	}
	return &sendError{kind: kind, cause: cause,
		msg: fmt.Sprintf("notify: send to %q via %s: %v: %s", to, net.JoinHostPort(s.cfg.Host, fmt.Sprint(s.cfg.Port)), kind, text)}
}

// kindOf decides the class; a non-nil cause replaces err in the message
// when err alone would not say what went wrong.
func (s *Sender) kindOf(ctx context.Context, auth *authenticator, err error) (kind, cause error) {
	if ctx.Err() != nil {
		// The connection was closed because ctx ended; whatever error
		// that produced, the send may well succeed later.
		return ErrTransient, fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	// go-mail reports a missing STARTTLS only as text (v0.8.1,
	// client.go: "... but target host does not support STARTTLS").
	if s.security == SecurityStartTLS && strings.Contains(err.Error(), "does not support STARTTLS") {
		return ErrPermanent, errNoSTARTTLS
	}
	if isTLSFailure(err) {
		// A certificate that does not verify, or a server that does not
		// speak TLS where we expect it, will not change by retrying
		// the same mail; an administrator must fix the configuration.
		return ErrPermanent, nil
	}
	if code, text := replyCode(err); code != 0 {
		switch {
		case code == 530 && strings.Contains(strings.ToUpper(text), "STARTTLS"):
			return ErrPermanent, nil // "must issue STARTTLS first" under Security "none"
		case code == 530 || code == 534 || code == 535 || code == 538:
			return ErrAuth, nil // auth required / too weak / failed / needs encryption
		case code >= 400 && code < 500:
			return ErrTransient, nil
		case auth.inProgress():
			return ErrAuth, nil // e.g. 504 mechanism not supported
		case code >= 500:
			return ErrPermanent, nil
		}
	}
	if isNetworkFailure(err) {
		return ErrTransient, nil
	}
	if auth.inProgress() {
		// The relay did not take our credentials in a way retrying
		// would change (no usable mechanism, unexpected challenge).
		return ErrAuth, nil
	}
	if errors.Is(err, mail.ErrNoFromAddress) || errors.Is(err, mail.ErrNoRcptAddresses) {
		return ErrPermanent, nil
	}
	// Anything else (an ambiguous connection check, a closed connection
	// go-mail does not describe) is most likely passing.
	return ErrTransient, nil
}

// replyCode finds the SMTP reply code in err: go-mail returns replies as
// *textproto.Error during the dialogue and wraps them in *mail.SendError
// (which does not unwrap) once a transaction started.
func replyCode(err error) (int, string) {
	var te *textproto.Error
	if errors.As(err, &te) {
		return te.Code, te.Msg
	}
	var se *mail.SendError
	if errors.As(err, &se) && se.ErrorCode() != 0 {
		return se.ErrorCode(), se.Error()
	}
	return 0, ""
}

func isTLSFailure(err error) bool {
	var (
		verr   *tls.CertificateVerificationError
		hostna x509.HostnameError
		unkn   x509.UnknownAuthorityError
		inval  x509.CertificateInvalidError
		rec    tls.RecordHeaderError
		alert  tls.AlertError
	)
	return errors.As(err, &verr) || errors.As(err, &hostna) || errors.As(err, &unkn) ||
		errors.As(err, &inval) || errors.As(err, &rec) || errors.As(err, &alert)
}

func isNetworkFailure(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, mail.ErrNoActiveConnection)
}

// redact removes the password, and the AUTH PLAIN blob that carries it, from
// text a server or library produced.
func (s *Sender) redact(text string) string {
	if s.cfg.Password == "" {
		return text
	}
	secrets := []string{
		s.cfg.Password,
		base64.StdEncoding.EncodeToString([]byte(s.cfg.Password)),
		base64.StdEncoding.EncodeToString([]byte("\x00" + s.cfg.Username + "\x00" + s.cfg.Password)),
	}
	slices.SortFunc(secrets, func(a, b string) int { return len(b) - len(a) })
	for _, sec := range secrets {
		text = strings.ReplaceAll(text, sec, "[REDACTED]")
	}
	return text
}

// authenticator speaks AUTH PLAIN, or LOGIN when the relay offers only
// that (as Exchange does), and remembers whether authentication was under
// way so its failures are reported as ErrAuth.
type authenticator struct {
	username, password string
	started, done      bool
	inner              smtp.Auth
}

var errNoMechanism = errors.New("the server offers neither AUTH PLAIN nor AUTH LOGIN")

func (a *authenticator) inProgress() bool { return a.started && !a.done }

func (a *authenticator) Start(server *smtp.ServerInfo) (string, []byte, error) {
	a.started = true
	switch {
	case slices.Contains(server.Auth, "PLAIN"):
		a.inner = smtp.PlainAuth("", a.username, a.password, server.Name, false)
	case slices.Contains(server.Auth, "LOGIN"):
		a.inner = smtp.LoginAuth(a.username, a.password, server.Name, false)
	default:
		return "", nil, errNoMechanism
	}
	return a.inner.Start(server)
}

func (a *authenticator) Next(fromServer []byte, more bool) ([]byte, error) {
	resp, err := a.inner.Next(fromServer, more)
	if err == nil && !more {
		a.done = true // the server answered 235
	}
	return resp, err
}
