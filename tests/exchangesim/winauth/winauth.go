// Package winauth is the HTTP authentication layer of the Exchange/WinRM server
// simulator used in tests.
//
// It exists so that tests exercise the real client stacks (github.com/masterzen/winrm
// with Basic, and NTLM through github.com/Azure/go-ntlmssp) against a server that
// behaves like Windows HTTP.SYS: passwords are really checked (NTLMv2 proofs are
// recomputed from the account password), NTLM is bound to the TCP connection, and
// rejections look like the ones Windows sends, so that client error handling is
// tested against realistic responses rather than a permissive stub.
//
// Install Middleware around the simulator's handler and ConnContext as the
// http.Server's ConnContext:
//
//	srv := httptest.NewUnstartedServer(winauth.Middleware(accounts, opts, handler))
//	srv.Config.ConnContext = winauth.ConnContext
//	srv.Start()
//
// Only authentication is simulated: NTLM session security (signing, sealing, the
// MIC and channel bindings) is neither negotiated nor checked, and SPNEGO-wrapped
// tokens are rejected, because the clients under test send raw NTLMSSP in the
// clear over HTTP or inside TLS.
package winauth

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Options selects the authentication schemes a simulated server offers and how it
// presents itself, so that one simulator can mimic differently configured Windows
// hosts (Basic only, NTLM only, both) and inject authentication faults.
type Options struct {
	// Basic offers and accepts Basic, the masterzen/winrm default transport.
	Basic bool
	// NTLM offers and accepts NTLM via both "Negotiate" and "NTLM" schemes, because
	// Windows advertises Negotiate while some clients only speak the NTLM scheme.
	NTLM bool
	// Realm is the Basic realm; it defaults to "WSMAN" like WinRM.
	Realm string
	// NetBIOSDomain, DNSDomain, NetBIOSComputer and DNSComputer fill the CHALLENGE
	// TargetName and TargetInfo. Clients hash the TargetName as their domain, so the
	// values matter for interoperability, not only for display. They default to
	// "CONTOSO", "contoso.com", "EX01" and "ex01.contoso.com".
	NetBIOSDomain, DNSDomain, NetBIOSComputer, DNSComputer string
	// Refuse, when non-nil and returning true for a request, makes authentication
	// fail with 401 even for good credentials (fault injection: "refuse auth"), so
	// that tests can check how a client copes with a locked-out or disabled account.
	//
	// It is consulted only for requests that would otherwise be served, after their
	// credentials were verified or the connection was found authenticated, so a
	// counting hook sees one call per would-be-successful request and none for the
	// intermediate legs of an NTLM handshake. A refusal also drops the connection's
	// NTLM identity, so the client has to authenticate again afterwards.
	Refuse func(r *http.Request) bool
	// Now supplies the MsvAvTimestamp of each CHALLENGE, so that tests can pin the
	// bytes a client hashes; nil means time.Now.
	Now func() time.Time
	// OnFailure, when non-nil, is told why a request presenting credentials was
	// rejected, so that a test can tell a wrong password from a protocol mistake
	// without a packet capture. It is not called for requests without credentials
	// nor for the 401 that carries an NTLM CHALLENGE, which are normal handshake
	// steps. The error never contains passwords, hashes or tokens.
	OnFailure func(r *http.Request, err error)
}

// Reasons for rejections that are not specific to NTLM messages.
var (
	errNoConnState  = errors.New("winauth.ConnContext is not installed as http.Server.ConnContext; NTLM is per connection")
	errScheme       = errors.New("authentication scheme not supported or not enabled")
	errBasicHeader  = errors.New("malformed Basic credentials")
	errUnknownUser  = errors.New("unknown user")
	errBadPassword  = errors.New("wrong password")
	errBadBase64    = errors.New("token is not valid base64")
	errRefusedByOpt = errors.New("authentication refused by Options.Refuse")
)

// maxDrain bounds how much of a rejected request body is read so that the
// connection can be reused for the next handshake leg, as HTTP.SYS does.
const maxDrain = 1 << 20

type ctxKey int

const (
	connStateKey ctxKey = iota
	userKey
)

// connState is the NTLM state of one TCP connection. HTTP/1.1 serves one request at
// a time per connection, but the mutex keeps the state consistent under HTTP/2 and
// makes the race detector's job trivial.
type connState struct {
	mu        sync.Mutex
	pending   bool    // a CHALLENGE was sent and its AUTHENTICATE is awaited
	challenge [8]byte // server challenge of the pending handshake
	user      string  // canonical name once authenticated, "" otherwise
}

// startHandshake records a new server challenge and forgets any earlier identity,
// because a NEGOTIATE on an authenticated connection restarts authentication.
func (c *connState) startHandshake(challenge [8]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending, c.challenge, c.user = true, challenge, ""
}

// takeChallenge consumes the pending challenge; each challenge verifies at most one
// AUTHENTICATE, so a captured AUTHENTICATE cannot be replayed.
func (c *connState) takeChallenge() ([8]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	challenge, ok := c.challenge, c.pending
	c.pending, c.challenge, c.user = false, [8]byte{}, ""
	return challenge, ok
}

// setUser marks the connection authenticated.
func (c *connState) setUser(user string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending, c.user = false, user
}

// authenticatedUser returns the connection's identity, "" if none or if c is nil.
func (c *connState) authenticatedUser() string {
	if c == nil {
		return ""
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.user
}

// reset forgets any handshake and identity; it is a no-op on nil.
func (c *connState) reset() {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending, c.challenge, c.user = false, [8]byte{}, ""
}

// ConnContext must be installed as http.Server.ConnContext; NTLM authentication is per TCP connection, like Windows HTTP.SYS.
//
// The NTLM handshake spans several HTTP requests and its result applies to later
// requests on the same connection, so the server needs somewhere to keep state that
// lives exactly as long as the connection; the connection's base context is that
// place.
func ConnContext(ctx context.Context, _ net.Conn) context.Context {
	return context.WithValue(ctx, connStateKey, &connState{})
}

// User returns the authenticated account name (canonical: as stored in Accounts) or "".
//
// Handlers use it to authorize per account, the way Exchange applies RBAC to the
// logged-on user, without caring which scheme or name form the client used.
func User(ctx context.Context) string {
	user, _ := ctx.Value(userKey).(string)
	return user
}

// Middleware authenticates every request and calls next with the account name in the request context.
//
// A request is served when it carries valid Basic credentials, completes an NTLM
// handshake (the AUTHENTICATE request itself is served, body included), or arrives
// without credentials on a connection that completed one. Everything else gets
// the 401 Windows sends: one WWW-Authenticate header per enabled scheme, an empty
// body and no SOAP content type. Middleware panics when accounts or next is nil or
// when no scheme is enabled, because such a server could never serve anyone and
// the mistake is better caught at construction than as a puzzling 401.
func Middleware(accounts Accounts, opts Options, next http.Handler) http.Handler {
	if accounts == nil || next == nil {
		panic("winauth: Middleware needs non-nil accounts and next")
	}
	if !opts.Basic && !opts.NTLM {
		panic("winauth: Middleware needs Options.Basic or Options.NTLM")
	}
	setDefault := func(field *string, value string) {
		if *field == "" {
			*field = value
		}
	}
	setDefault(&opts.Realm, "WSMAN")
	setDefault(&opts.NetBIOSDomain, "CONTOSO")
	setDefault(&opts.DNSDomain, "contoso.com")
	setDefault(&opts.NetBIOSComputer, "EX01")
	setDefault(&opts.DNSComputer, "ex01.contoso.com")
	if opts.Now == nil {
		opts.Now = time.Now
	}

	m := &middleware{accounts: accounts, opts: opts, next: next}
	if opts.NTLM {
		m.challenges = append(m.challenges, "Negotiate", "NTLM")
	}
	if opts.Basic {
		m.challenges = append(m.challenges, `Basic realm="`+opts.Realm+`"`)
	}
	m.identity = serverIdentity{
		nbDomain:    opts.NetBIOSDomain,
		dnsDomain:   opts.DNSDomain,
		nbComputer:  opts.NetBIOSComputer,
		dnsComputer: opts.DNSComputer,
	}
	return m
}

// middleware is the handler returned by Middleware.
type middleware struct {
	accounts   Accounts
	opts       Options
	next       http.Handler
	challenges []string // WWW-Authenticate values of a plain 401
	identity   serverIdentity
}

// ServeHTTP dispatches on the Authorization scheme.
func (m *middleware) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	conn, _ := r.Context().Value(connStateKey).(*connState)
	header := strings.TrimSpace(r.Header.Get("Authorization"))
	if header == "" {
		if user := conn.authenticatedUser(); user != "" {
			m.serve(w, r, conn, user)
			return
		}
		m.unauthorized(w, r)
		return
	}
	scheme, token, _ := strings.Cut(header, " ")
	token = strings.TrimSpace(token)
	switch {
	case m.opts.Basic && strings.EqualFold(scheme, "Basic"):
		m.basic(w, r, conn)
	case m.opts.NTLM && strings.EqualFold(scheme, "Negotiate"):
		m.ntlm(w, r, conn, "Negotiate", token)
	case m.opts.NTLM && strings.EqualFold(scheme, "NTLM"):
		m.ntlm(w, r, conn, "NTLM", token)
	default:
		m.reject(w, r, conn, errScheme)
	}
}

// basic checks Basic credentials, which are self-contained in every request.
func (m *middleware) basic(w http.ResponseWriter, r *http.Request, conn *connState) {
	user, password, ok := r.BasicAuth()
	if !ok || user == "" {
		m.reject(w, r, conn, fmt.Errorf("basic: %w", errBasicHeader))
		return
	}
	want, found := m.accounts.Password(user)
	if !found {
		m.reject(w, r, conn, fmt.Errorf("basic logon of %q: %w", user, errUnknownUser))
		return
	}
	if subtle.ConstantTimeCompare([]byte(password), []byte(want)) != 1 {
		m.reject(w, r, conn, fmt.Errorf("basic logon of %q: %w", user, errBadPassword))
		return
	}
	m.serve(w, r, conn, m.canonical(user))
}

// ntlm runs one leg of the NTLM handshake; scheme is echoed in the CHALLENGE
// because clients look for the scheme they used.
func (m *middleware) ntlm(w http.ResponseWriter, r *http.Request, conn *connState, scheme, token string) {
	if conn == nil {
		m.report(r, errNoConnState)
		http.Error(w, errNoConnState.Error(), http.StatusInternalServerError)
		return
	}
	raw, err := base64.StdEncoding.DecodeString(token)
	if err != nil {
		m.reject(w, r, conn, fmt.Errorf("%s: %w", scheme, errBadBase64))
		return
	}
	typ, err := messageType(raw)
	if err != nil {
		m.reject(w, r, conn, fmt.Errorf("%s: %w", scheme, err))
		return
	}
	switch typ {
	case msgNegotiate:
		var challenge [8]byte
		_, _ = rand.Read(challenge[:]) // crypto/rand.Read never fails since Go 1.24.
		conn.startHandshake(challenge)
		msg := buildChallenge(challenge, m.identity, m.opts.Now())
		drain(r)
		w.Header().Set("WWW-Authenticate", scheme+" "+base64.StdEncoding.EncodeToString(msg))
		w.Header().Set("Content-Length", "0")
		w.WriteHeader(http.StatusUnauthorized)
	case msgAuthenticate:
		m.authenticate(w, r, conn, scheme, raw)
	default:
		m.reject(w, r, conn, fmt.Errorf("%s: type %d: %w", scheme, typ, errUnexpectedType))
	}
}

// authenticate verifies an AUTHENTICATE against the connection's pending challenge.
func (m *middleware) authenticate(w http.ResponseWriter, r *http.Request, conn *connState, scheme string, raw []byte) {
	challenge, ok := conn.takeChallenge()
	if !ok {
		m.reject(w, r, conn, fmt.Errorf("%s: %w", scheme, errNoChallenge))
		return
	}
	am, err := parseAuthenticate(raw)
	if err != nil {
		m.reject(w, r, conn, fmt.Errorf("%s: %w", scheme, err))
		return
	}
	if err := checkNTLMv2Shape(am); err != nil {
		m.reject(w, r, conn, fmt.Errorf("%s logon of %q: %w", scheme, am.user, err))
		return
	}
	password, found := m.accounts.Password(am.user)
	if !found {
		m.reject(w, r, conn, fmt.Errorf("%s logon of %q: %w", scheme, am.user, errUnknownUser))
		return
	}
	// MS-NLMP 3.3.2 keys the proof with the domain the client put in the
	// AUTHENTICATE; go-ntlmssp puts the CHALLENGE TargetName there for "user" and
	// "DOMAIN\user", and nothing for "user@domain". No other domain is tried.
	if err := verifyNTLMv2(ntowfv2(password, am.user, am.domain), challenge, am.ntResponse); err != nil {
		m.reject(w, r, conn, fmt.Errorf("%s logon of %q in domain %q: %w", scheme, am.user, am.domain, err))
		return
	}
	user := m.canonical(am.user)
	if m.refused(r) {
		m.reject(w, r, conn, errRefusedByOpt)
		return
	}
	conn.setUser(user)
	m.next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), userKey, user)))
}

// serve hands an authenticated request to next unless Options.Refuse objects.
func (m *middleware) serve(w http.ResponseWriter, r *http.Request, conn *connState, user string) {
	if m.refused(r) {
		m.reject(w, r, conn, errRefusedByOpt)
		return
	}
	m.next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), userKey, user)))
}

// refused reports whether fault injection vetoes an otherwise successful request.
func (m *middleware) refused(r *http.Request) bool {
	return m.opts.Refuse != nil && m.opts.Refuse(r)
}

// canonical maps a logon name to the account name handlers see.
func (m *middleware) canonical(user string) string {
	if namer, ok := m.accounts.(CanonicalNamer); ok {
		if name, ok := namer.CanonicalName(user); ok {
			return name
		}
	}
	return bareUserName(user)
}

// reject reports err, drops the connection's NTLM state (a failed attempt must not
// leave an earlier identity or handshake usable) and answers 401.
func (m *middleware) reject(w http.ResponseWriter, r *http.Request, conn *connState, err error) {
	m.report(r, err)
	conn.reset()
	m.unauthorized(w, r)
}

// report forwards a rejection reason to Options.OnFailure.
func (m *middleware) report(r *http.Request, err error) {
	if m.opts.OnFailure != nil {
		m.opts.OnFailure(r, err)
	}
}

// unauthorized writes the 401 Windows sends: every enabled scheme, an empty body
// and no content type. masterzen/winrm turns that into "http response error: 401 -
// invalid content type", which is what client code is written against.
func (m *middleware) unauthorized(w http.ResponseWriter, r *http.Request) {
	drain(r)
	for _, c := range m.challenges {
		w.Header().Add("WWW-Authenticate", c)
	}
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusUnauthorized)
}

// drain reads what is left of a rejected request body so that the client can send
// the next handshake leg on the same connection; NTLM depends on that.
func drain(r *http.Request) {
	_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, maxDrain))
}
