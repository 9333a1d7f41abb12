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
// Over plain HTTP the server behaves like WinRM with its default
// AllowUnencrypted=false: a body must arrive sealed with NTLM session security
// (MS-WSMV session-encrypted messages; see seal.go) and answers go back sealed;
// Basic and NTLM without sealing are refused unless Options.AllowUnencrypted.
// The MIC and channel bindings are not checked, and SPNEGO-wrapped tokens are
// rejected, because the clients under test send raw NTLMSSP.
package winauth

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
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
	// AllowUnencrypted accepts unencrypted bodies over plain HTTP, like a WinRM
	// service configured with AllowUnencrypted=true. Without it, as on a default
	// Windows host, a request over HTTP whose body is not sealed is refused
	// whatever its credentials: Basic, and NTLM without session security. Over
	// HTTPS TLS encrypts the body and nothing is refused.
	AllowUnencrypted bool
	// UnencryptedStatus is the HTTP status of that refusal; 0 means 401 with the
	// usual WWW-Authenticate challenges. Sources disagree: the pywinrm
	// maintainers describe a host that "will constantly send a 401 error" to NTLM
	// without encryption (hashicorp/packer#6205) and Basic over HTTP surfaces as
	// pywinrm's 401 "credentials were rejected" (diyan/pywinrm#296), while
	// unencrypted Kerberos has been reported answered with HTTP 500
	// (diyan/pywinrm#129, cloudsoft/winrm4j#151). UNCONFIRMED for Basic and NTLM
	// on a real host, hence the switch: tests run with 401 and with 500 (empty
	// body, no SOAP content type, also UNCONFIRMED).
	UnencryptedStatus int
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
	offered   uint32  // flags of that CHALLENGE
	user      string  // canonical name once authenticated, "" otherwise
	// session is the NTLM security context when the client negotiated sealing.
	session *sealSession
}

// startHandshake records a new server challenge and forgets any earlier identity,
// because a NEGOTIATE on an authenticated connection restarts authentication.
func (c *connState) startHandshake(challenge [8]byte, offered uint32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending, c.challenge, c.offered, c.user, c.session = true, challenge, offered, "", nil
}

// takeChallenge consumes the pending challenge and its flags; each challenge
// verifies at most one AUTHENTICATE, so a captured AUTHENTICATE cannot be replayed.
func (c *connState) takeChallenge() ([8]byte, uint32, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	challenge, offered, ok := c.challenge, c.offered, c.pending
	c.pending, c.challenge, c.offered, c.user, c.session = false, [8]byte{}, 0, "", nil
	return challenge, offered, ok
}

// setUser marks the connection authenticated, with its security context if any.
func (c *connState) setUser(user string, session *sealSession) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending, c.user, c.session = false, user, session
}

// sealSession returns the connection's security context, nil if none or if c is nil.
func (c *connState) sealSession() *sealSession {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.session
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
	c.pending, c.challenge, c.offered, c.user, c.session = false, [8]byte{}, 0, "", nil
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
		offered := offeredFlags(raw)
		conn.startHandshake(challenge, offered)
		msg := buildChallengeFlags(challenge, m.identity, m.opts.Now(), offered)
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
	challenge, offered, ok := conn.takeChallenge()
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
	responseKeyNT := ntowfv2(password, am.user, am.domain)
	if err := verifyNTLMv2(responseKeyNT, challenge, am.ntResponse); err != nil {
		m.reject(w, r, conn, fmt.Errorf("%s logon of %q in domain %q: %w", scheme, am.user, am.domain, err))
		return
	}
	var session *sealSession
	if flags := am.flags & offered; flags&flagSeal != 0 {
		exported, err := exportedSessionKey(flags, sessionBaseKey(responseKeyNT, am.ntResponse), am.sessionKey)
		if err == nil {
			session, err = newSealSession(flags, exported)
		}
		if err != nil {
			m.reject(w, r, conn, fmt.Errorf("%s logon of %q: %w", scheme, am.user, err))
			return
		}
	}
	user := m.canonical(am.user)
	conn.setUser(user, session)
	m.serve(w, r, conn, user)
}

// serve hands an authenticated request to next unless Options.Refuse objects or
// its body travels unencrypted over HTTP where that is not allowed. A sealed body
// is unsealed for next and next's answer sealed for the client.
func (m *middleware) serve(w http.ResponseWriter, r *http.Request, conn *connState, user string) {
	if m.refused(r) {
		m.reject(w, r, conn, errRefusedByOpt)
		return
	}
	r = r.WithContext(context.WithValue(r.Context(), userKey, user))
	switch {
	case isSealedContent(r.Header.Get("Content-Type")):
		m.serveSealed(w, r, conn)
	case r.ContentLength == 0 && conn.sealSession() != nil:
		// An empty POST is how sealing clients (pywinrm, masterzen/winrm's
		// Encryption, easguard) authenticate before any body can be sealed;
		// they require 200 to it.
		drain(r)
		w.Header().Set("Content-Length", "0")
		w.WriteHeader(http.StatusOK)
	case r.TLS == nil && r.ContentLength != 0 && !m.opts.AllowUnencrypted:
		m.refuseUnencrypted(w, r, conn)
	default:
		m.next.ServeHTTP(w, r)
	}
}

// refuseUnencrypted answers an unsealed body over HTTP as WinRM does with
// AllowUnencrypted=false (see Options.UnencryptedStatus).
func (m *middleware) refuseUnencrypted(w http.ResponseWriter, r *http.Request, conn *connState) {
	m.report(r, errUnencrypted)
	conn.reset()
	if m.opts.UnencryptedStatus == 0 || m.opts.UnencryptedStatus == http.StatusUnauthorized {
		m.unauthorized(w, r)
		return
	}
	drain(r)
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(m.opts.UnencryptedStatus)
}

// serveSealed unseals a session-encrypted request, checks its signature,
// sequence number and length, lets next answer the plaintext and seals the
// answer with the connection's context.
func (m *middleware) serveSealed(w http.ResponseWriter, r *http.Request, conn *connState) {
	session := conn.sealSession()
	if session == nil {
		m.reject(w, r, conn, errNoSession)
		return
	}
	raw, err := io.ReadAll(io.LimitReader(r.Body, maxSealed))
	var plain []byte
	if err == nil {
		var signature, sealed []byte
		var length int
		if signature, sealed, length, err = parseSealed(raw); err == nil {
			if plain, err = session.unseal(signature, sealed); err == nil && len(plain) != length {
				err = errBadLength
			}
		}
	}
	if err != nil {
		// The RC4 streams are now out of step: the context is dead. The
		// status Windows sends for a message that fails its signature check is
		// UNCONFIRMED; 400 with an empty body, and the connection is closed.
		m.report(r, err)
		conn.reset()
		w.Header().Set("Connection", "close")
		w.Header().Set("Content-Length", "0")
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	inner := r.Clone(r.Context())
	inner.Body = io.NopCloser(bytes.NewReader(plain))
	inner.ContentLength = int64(len(plain))
	inner.Header.Set("Content-Type", "application/soap+xml;charset=UTF-8")
	answer := &bufferedAnswer{header: http.Header{}}
	m.next.ServeHTTP(answer, inner)
	signature, sealed := session.seal(answer.body.Bytes())
	body := frameSealed(signature, sealed, answer.body.Len())
	for k, v := range answer.header {
		w.Header()[k] = v
	}
	w.Header().Set("Content-Type", sealContentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	if answer.status == 0 {
		answer.status = http.StatusOK
	}
	w.WriteHeader(answer.status)
	_, _ = w.Write(body)
}

// maxSealed bounds a sealed request body; WinRM's own limit (MaxEnvelopeSizekb,
// 500 KB by default) is far below it and enforced on the plaintext by next.
const maxSealed = 16 << 20

// bufferedAnswer collects next's answer so that it can be sealed as a whole.
type bufferedAnswer struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (b *bufferedAnswer) Header() http.Header { return b.header }

func (b *bufferedAnswer) WriteHeader(status int) {
	if b.status == 0 {
		b.status = status
	}
}

func (b *bufferedAnswer) Write(p []byte) (int, error) {
	if b.status == 0 {
		b.status = http.StatusOK
	}
	return b.body.Write(p)
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
