// Package smtpsim is a real SMTP server for easguard's tests and demo: it
// speaks ESMTP with STARTTLS (or implicit TLS) and AUTH PLAIN/LOGIN over
// loopback, keeps every mail it accepts in memory, decodes them
// (multipart/alternative, quoted-printable, base64, encoded-word subjects)
// and can be told to fail the next transactions, so the code that sends
// mail is exercised against the same protocol a production relay speaks.
//
// Accepted mails can be read in Go (Messages, WaitFor) and, when an API
// address is configured, over HTTP: GET /api/messages lists them as JSON
// (oldest first, newest last), GET /api/messages/{n}/raw returns message n
// as received, DELETE /api/messages forgets them all, and GET / is a small
// HTML page for a person watching a demo. {n} is a message's ID as listed,
// which never changes and is never reused, so a reader cannot fetch the
// wrong mail after someone else deleted the list.
package smtpsim

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// ErrClosed is returned by WaitFor once the server is closed, because no
// further mail can arrive and waiting on would only run into the deadline.
var ErrClosed = errors.New("smtpsim: server closed")

// Config says how the simulated relay behaves. The zero Config is a relay
// on a random loopback port that offers STARTTLS with a fresh self-signed
// certificate and accepts mail without authentication.
type Config struct {
	// Addr is where SMTP is served; "" means "127.0.0.1:0" (a free port).
	Addr string
	// Users are the accounts AUTH PLAIN and AUTH LOGIN accept. When empty
	// the relay is open: AUTH is still advertised so a client configured
	// with credentials works unchanged, any username and password are
	// accepted (the username is recorded as AuthUser), and mail without
	// AUTH is accepted too. When not empty, MAIL before a successful AUTH
	// is refused with 530 5.7.0 and wrong credentials get 535 5.7.8, as
	// Exchange answers.
	Users map[string]string
	// AuthMechanisms are the SASL mechanisms offered, out of "PLAIN" and
	// "LOGIN"; nil offers both. Offering only LOGIN is how Exchange
	// answers, so clients can be tested against that.
	AuthMechanisms []string
	// TLS is the server's TLS configuration; nil means a self-signed
	// certificate for localhost, 127.0.0.1 and ::1 generated at start
	// (CertPEM returns it so clients can trust exactly this server).
	TLS *tls.Config
	// DisableTLS turns STARTTLS off, to test clients that must refuse
	// such a server. AUTH is then offered in clear text.
	DisableTLS bool
	// ImplicitTLS serves TLS from the first byte (SMTPS, as on port 465)
	// instead of offering STARTTLS.
	ImplicitTLS bool
	// RequireTLS refuses MAIL with 530 5.7.0 until STARTTLS was issued.
	RequireTLS bool
	// Domain is the name the server greets with; "" means "smtp.test".
	Domain string
	// APIAddr is where the HTTP API is served; "" means no API.
	APIAddr string
	// ErrorLog receives go-smtp's connection errors; nil discards them,
	// because tests provoke such errors on purpose.
	ErrorLog *log.Logger
}

// Message is one accepted mail: the envelope, the bytes as received, and
// what a test wants to assert on, already decoded.
type Message struct {
	// ID numbers messages from 1 in the order they were accepted; it
	// is the {n} of the HTTP API and is never reused, not even by Reset.
	ID int
	// From and To are the envelope (MAIL FROM and RCPT TO), which is who
	// the mail really goes to, whatever the headers claim.
	From string
	To   []string
	// Raw is the message exactly as received after DATA.
	Raw []byte
	// Subject is the decoded Subject header (encoded-words resolved).
	Subject string
	// MessageID is the Message-ID header as sent, angle brackets included.
	MessageID string
	// Headers are the top-level headers with canonical keys and values as
	// sent (not decoded), so a test can see exactly what went on the wire.
	Headers map[string][]string
	// Text and HTML are the decoded text/plain and text/html bodies (the
	// first of each found, also inside multipart/alternative or mixed),
	// converted to UTF-8 with line breaks as "\n" rather than the wire's
	// CRLF, so tests compare them with what was rendered.
	Text, HTML string
	// Received is when DATA completed.
	Received time.Time
	// TLS says whether the mail travelled over TLS (STARTTLS or implicit).
	TLS bool
	// AuthUser is the username that authenticated, "" without AUTH.
	AuthUser string
}

// Server is a running simulated relay. Its methods are safe for concurrent
// use.
type Server struct {
	cfg     Config
	smtp    *smtp.Server
	ln      net.Listener
	certPEM []byte
	api     *http.Server
	apiLn   net.Listener
	wg      sync.WaitGroup

	mu       sync.Mutex
	msgs     []Message
	nextID   int
	changed  chan struct{} // closed and replaced whenever msgs changes
	faults   map[stage]fault
	closed   bool
	closeErr error
	once     sync.Once
}

type stage int

const (
	stageRcpt stage = iota
	stageData
)

type fault struct {
	left int
	code int
	msg  string
}

// Start starts the relay (and its HTTP API when cfg.APIAddr is set) and
// returns once both listen, so Addr and APIURL are usable at once.
func Start(cfg Config) (*Server, error) {
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.Domain == "" {
		cfg.Domain = "smtp.test"
	}
	for _, m := range cfg.AuthMechanisms {
		if m != sasl.Plain && m != sasl.Login {
			return nil, fmt.Errorf("smtpsim: start: AuthMechanisms: %q is not PLAIN or LOGIN", m)
		}
	}
	if cfg.AuthMechanisms == nil {
		cfg.AuthMechanisms = []string{sasl.Plain, sasl.Login}
	}
	if cfg.DisableTLS && (cfg.ImplicitTLS || cfg.RequireTLS) {
		return nil, errors.New("smtpsim: start: DisableTLS contradicts ImplicitTLS and RequireTLS")
	}
	s := &Server{cfg: cfg, changed: make(chan struct{}), faults: map[stage]fault{}}

	var tlsCfg *tls.Config
	if !cfg.DisableTLS {
		var err error
		tlsCfg, s.certPEM, err = serverTLS(cfg.TLS)
		if err != nil {
			return nil, fmt.Errorf("smtpsim: start: %w", err)
		}
	}

	srv := smtp.NewServer(&backend{s: s})
	srv.Addr = cfg.Addr
	srv.Domain = cfg.Domain
	srv.ReadTimeout = time.Minute
	srv.WriteTimeout = time.Minute
	srv.MaxMessageBytes = 10 << 20
	srv.MaxRecipients = 100
	if cfg.ErrorLog != nil {
		srv.ErrorLog = cfg.ErrorLog
	} else {
		srv.ErrorLog = log.New(io.Discard, "", 0)
	}
	// go-smtp advertises AUTH only over TLS unless told otherwise; without
	// TLS there is no other way to test AUTH.
	srv.AllowInsecureAuth = cfg.DisableTLS
	if !cfg.ImplicitTLS {
		srv.TLSConfig = tlsCfg // nil when disabled: no STARTTLS
	}
	s.smtp = srv

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("smtpsim: listen on %s: %w", cfg.Addr, err)
	}
	if cfg.ImplicitTLS {
		ln = tls.NewListener(ln, tlsCfg)
	}
	s.ln = ln

	if cfg.APIAddr != "" {
		apiLn, err := net.Listen("tcp", cfg.APIAddr)
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("smtpsim: listen for the API on %s: %w", cfg.APIAddr, err)
		}
		s.apiLn = apiLn
		s.api = &http.Server{Handler: s.apiHandler(), ReadHeaderTimeout: 10 * time.Second}
		s.wg.Go(func() {
			if err := s.api.Serve(apiLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				srv.ErrorLog.Printf("smtpsim: API: %v", err)
			}
		})
	}
	s.wg.Go(func() {
		if err := srv.Serve(ln); err != nil {
			srv.ErrorLog.Printf("smtpsim: serve: %v", err)
		}
	})
	return s, nil
}

// Addr is the host:port SMTP listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Host is the IP address SMTP listens on, for clients configured by host
// and port rather than by address.
func (s *Server) Host() string {
	h, _, _ := net.SplitHostPort(s.Addr())
	return h
}

// Port is the TCP port SMTP listens on.
func (s *Server) Port() int { return s.ln.Addr().(*net.TCPAddr).Port }

// CertPEM is the server's certificate in PEM, for a client's trust store:
// trusting it (rather than skipping verification) is what lets a test
// prove the client verifies certificates. It is nil with DisableTLS.
func (s *Server) CertPEM() []byte { return s.certPEM }

// APIURL is the HTTP API's base URL ("http://127.0.0.1:port"), or "" when
// no APIAddr was configured.
func (s *Server) APIURL() string {
	if s.apiLn == nil {
		return ""
	}
	return "http://" + s.apiLn.Addr().String()
}

// Close stops SMTP and the API at once, dropping open connections, and
// wakes every WaitFor with ErrClosed. Calling it again returns the first
// result.
func (s *Server) Close() error {
	s.once.Do(func() {
		var errs []error
		if err := s.smtp.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close SMTP: %w", err))
		}
		// go-smtp closes only the listeners Serve already registered; a
		// Close right after Start can beat that, so close ours as well.
		if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, fmt.Errorf("close SMTP listener: %w", err))
		}
		if s.api != nil {
			if err := s.api.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close API: %w", err))
			}
		}
		s.wg.Wait()
		s.mu.Lock()
		s.closed = true
		close(s.changed)
		s.changed = make(chan struct{})
		s.mu.Unlock()
		if len(errs) > 0 {
			s.closeErr = fmt.Errorf("smtpsim: %w", errors.Join(errs...))
		}
	})
	return s.closeErr
}

// Messages returns the accepted mails, oldest first. The slice is a copy;
// the Raw, To and Headers of each Message are shared with the server and
// must not be modified.
func (s *Server) Messages() []Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Message(nil), s.msgs...)
}

// WaitFor blocks until at least n mails were accepted and returns all of
// them, oldest first. It returns early with ctx's error, or with ErrClosed
// when the server closes, saying how many mails had arrived.
func (s *Server) WaitFor(ctx context.Context, n int) ([]Message, error) {
	for {
		s.mu.Lock()
		if len(s.msgs) >= n {
			msgs := append([]Message(nil), s.msgs...)
			s.mu.Unlock()
			return msgs, nil
		}
		have, closed, changed := len(s.msgs), s.closed, s.changed
		s.mu.Unlock()
		if closed {
			return nil, fmt.Errorf("smtpsim: wait for %d messages, have %d: %w", n, have, ErrClosed)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("smtpsim: wait for %d messages, have %d: %w", n, have, ctx.Err())
		case <-changed:
		}
	}
}

// Reset forgets every accepted mail and every pending FailNext, so one
// server can serve several independent steps of a test. IDs keep counting.
func (s *Server) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.msgs = nil
	clear(s.faults)
	s.notifyLocked()
}

// FailNext makes the next n mail transactions fail at the end of DATA with
// the given reply (for example 451 for a temporary failure, 550 or 554 for
// a permanent one): the mail is read and then rejected, not stored, which
// is where a real relay's content and quota checks reject mail. The reply
// carries the enhanced code c.0.0 (c = code/100). n <= 0 cancels it.
func (s *Server) FailNext(n int, code int, msg string) { s.failNext(stageData, n, code, msg) }

// FailNextRcpt makes the next n RCPT TO commands fail with the given reply
// (for example 550 mailbox unavailable or 553 bad address), where a real
// relay rejects unknown recipients. n <= 0 cancels it.
func (s *Server) FailNextRcpt(n int, code int, msg string) { s.failNext(stageRcpt, n, code, msg) }

func (s *Server) failNext(st stage, n, code int, msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n <= 0 {
		delete(s.faults, st)
		return
	}
	if msg == "" {
		msg = "Injected failure"
	}
	s.faults[st] = fault{left: n, code: code, msg: msg}
}

// takeFault consumes one injected failure for st, if any is pending.
func (s *Server) takeFault(st stage) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	f, ok := s.faults[st]
	if !ok {
		return nil
	}
	f.left--
	if f.left <= 0 {
		delete(s.faults, st)
	} else {
		s.faults[st] = f
	}
	cls := f.code / 100
	return &smtp.SMTPError{Code: f.code, EnhancedCode: smtp.EnhancedCode{cls, 0, 0}, Message: f.msg}
}

func (s *Server) store(m Message) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextID++
	m.ID = s.nextID
	s.msgs = append(s.msgs, m)
	s.notifyLocked()
}

func (s *Server) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Server) message(id int) (Message, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range s.msgs {
		if m.ID == id {
			return m, true
		}
	}
	return Message{}, false
}

// certPEMOf returns the leaf certificate of cfg in PEM, parsing it when the
// caller supplied a configuration, so CertPEM works in both cases.
func certPEMOf(cfg *tls.Config) ([]byte, error) {
	if len(cfg.Certificates) == 0 || len(cfg.Certificates[0].Certificate) == 0 {
		return nil, nil
	}
	der := cfg.Certificates[0].Certificate[0]
	if _, err := x509.ParseCertificate(der); err != nil {
		return nil, fmt.Errorf("parse the configured certificate: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}
