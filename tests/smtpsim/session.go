package smtpsim

import (
	"crypto/subtle"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

var (
	errTLSRequired = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Must issue a STARTTLS command first"}
	errAuthNeeded  = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Authentication required"}
	errNoMail      = &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "Bad sequence of commands"}
)

type backend struct{ s *Server }

// NewSession starts a session per EHLO; go-smtp starts a new one after
// STARTTLS, so the TLS state seen here is the one the mail travels under.
func (b *backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	_, isTLS := c.TLSConnectionState()
	return &session{s: b.s, tls: isTLS}, nil
}

type session struct {
	s        *Server
	tls      bool
	authUser string
	from     string
	hasFrom  bool
	to       []string
}

var _ smtp.AuthSession = (*session)(nil)

func (ss *session) AuthMechanisms() []string { return ss.s.cfg.AuthMechanisms }

func (ss *session) Auth(mech string) (sasl.Server, error) {
	if !slices.Contains(ss.s.cfg.AuthMechanisms, mech) {
		return nil, smtp.ErrAuthUnknownMechanism
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(identity, username, password string) error {
			if identity != "" && identity != username {
				return smtp.ErrAuthFailed
			}
			return ss.login(username, password)
		}), nil
	case sasl.Login:
		return &loginServer{check: ss.login}, nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

// login checks credentials against Users; an open relay accepts any.
func (ss *session) login(username, password string) error {
	if len(ss.s.cfg.Users) > 0 {
		want, ok := ss.s.cfg.Users[username]
		if !ok || subtle.ConstantTimeCompare([]byte(want), []byte(password)) != 1 {
			return smtp.ErrAuthFailed
		}
	}
	ss.authUser = username
	return nil
}

func (ss *session) Mail(from string, _ *smtp.MailOptions) error {
	if ss.s.cfg.RequireTLS && !ss.tls {
		return errTLSRequired
	}
	if len(ss.s.cfg.Users) > 0 && ss.authUser == "" {
		return errAuthNeeded
	}
	ss.from, ss.hasFrom, ss.to = from, true, nil
	return nil
}

func (ss *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	if !ss.hasFrom {
		return errNoMail
	}
	if err := ss.s.takeFault(stageRcpt); err != nil {
		return err
	}
	ss.to = append(ss.to, to)
	return nil
}

func (ss *session) Data(r io.Reader) error {
	raw, err := io.ReadAll(r)
	if err != nil {
		return fmt.Errorf("read message: %w", err)
	}
	if err := ss.s.takeFault(stageData); err != nil {
		return err
	}
	m := decode(raw)
	m.From, m.To, m.Raw = ss.from, append([]string(nil), ss.to...), raw
	m.Received, m.TLS, m.AuthUser = time.Now(), ss.tls, ss.authUser
	ss.s.store(m)
	return nil
}

func (ss *session) Reset() { ss.from, ss.hasFrom, ss.to = "", false, nil }

func (ss *session) Logout() error { return nil }

// loginServer is the server side of AUTH LOGIN, which go-sasl does not
// provide but Exchange and many clients still use. It accepts the username
// as an initial response too.
type loginServer struct {
	check    func(username, password string) error
	step     int
	username string
}

func (l *loginServer) Next(response []byte) (challenge []byte, done bool, err error) {
	switch l.step {
	case 0:
		l.step = 1
		if response == nil {
			return []byte("Username:"), false, nil
		}
		l.username, l.step = string(response), 2
		return []byte("Password:"), false, nil
	case 1:
		l.username, l.step = string(response), 2
		return []byte("Password:"), false, nil
	case 2:
		l.step = 3
		return nil, true, l.check(l.username, string(response))
	}
	return nil, true, smtp.ErrAuthFailed
}
