package exchangesim

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim/winauth"
	"github.com/easguard/easguard/tests/exchangesim/wsman"
)

// Config describes a simulated Exchange organisation and its servers.
type Config struct {
	// OrgName and Domain name the organisation (default Contoso, contoso.com).
	OrgName string
	Domain  string
	// Seed, when set, fills the organisation.
	Seed *SeedSpec
	// CAS names the Client Access servers, each its own WS-Man endpoint;
	// default one, EX01. The first is the one clients are told about.
	CAS []string
	// Accounts are the users WinRM and remote sessions accept (user name →
	// password); default svc-easguard with DefaultPassword.
	Accounts map[string]string
	// Basic and NTLM select the authentication schemes; neither set means both.
	Basic, NTLM bool
	// AllowUnencrypted makes the HTTP endpoints accept unencrypted bodies
	// (Basic, NTLM without sealing), like a WinRM service configured with
	// AllowUnencrypted=true. By default, as on Windows, only NTLM-sealed
	// bodies are accepted over HTTP; HTTPS is unaffected.
	AllowUnencrypted bool
	// UnencryptedStatus is the HTTP status refusing an unencrypted body
	// (0: 401); see winauth.Options.UnencryptedStatus (UNCONFIRMED).
	UnencryptedStatus int
	// HTTPS serves WS-Man over TLS with Certificate, or a self-signed
	// certificate for the CAS names, 127.0.0.1 and localhost.
	HTTPS       bool
	Certificate *tls.Certificate
	// Host is the address endpoints listen on (default 127.0.0.1).
	Host string
	// Port, when not 0, is the first CAS's WS-Man port; the next CAS
	// listens on Port+1 and so on. 0: free ports.
	Port int
	// PublicHost is the name clients reach the endpoints by (a
	// container's name), when it is not Host: Env's name resolution and
	// the self-signed certificate use it.
	PublicHost string
	// AdminAddr is the admin API's listen address; empty means no admin API.
	AdminAddr string
	Profile   Profile
	// MaxOperationTimeout caps Receive long-polls (default 60s, Windows').
	MaxOperationTimeout time.Duration
	// Granted limits the cmdlets the service account's role grants.
	Granted []string
	// WorkerHost is the Windows host the worker runs on and what it does to
	// the worker script (culture, time zone, language mode, deserialisation).
	WorkerHost Host
	// MaxSessionsPerUser is Exchange's PowerShellMaxConcurrency: remote
	// sessions per user at once (default 18, 2010–SE), counted apart from
	// WinRM shells; a negative value means unlimited.
	MaxSessionsPerUser int
	// SessionTimeScale scales remote sessions' idle timeouts, so that a test
	// sees a two-minute timeout pass in seconds (0 means 1).
	SessionTimeScale float64
	// Version is the Exchange release the organisation runs: 2010, 2013,
	// 2016 or 2019 (empty: 2019).
	Version Version
	// ReplicationDelay is how long a change written through one CAS takes
	// to be seen through the others (Active Directory replication; see
	// replication.go for what is modelled). Zero, the default for tests:
	// at once. Intra-site replication takes about 15 s.
	ReplicationDelay time.Duration
	// OriginWhenChanged and Keep2013Properties switch UNCONFIRMED
	// behaviours (see Org).
	OriginWhenChanged, Keep2013Properties bool
	// Now is the organisation's clock (default time.Now), for tests that
	// move time on instead of waiting.
	Now func() time.Time
}

// DefaultUser and DefaultPassword are the service account of a simulator
// started without Accounts.
const (
	DefaultUser     = "svc-easguard"
	DefaultPassword = "Exchange-Sim-1!"
)

// Sim is a running simulated Exchange organisation.
type Sim struct {
	Org      *Org
	Recorder *Recorder
	// CertPEM is the TLS certificate clients should trust (HTTPS only).
	CertPEM []byte

	cfg       Config
	profile   Profile
	accounts  winauth.StaticAccounts
	endpoints []*Endpoint
	admin     *http.Server
	adminURL  string
	tlsCert   *tls.Certificate
	pids      atomic.Int64
	// killAfterWrites counts down the writes until a worker dies (KillWorkerAfterWrites).
	killAfterWrites atomic.Int64

	throttleMu sync.Mutex
	calls      map[string][]time.Time

	rps *rpsRegistry
}

// Endpoint is one Client Access server: a WS-Man listener with its own
// shells, faults and quota, serving the shared organisation.
type Endpoint struct {
	Name string
	FQDN string
	sim  *Sim
	addr string

	mu       sync.Mutex
	server   *wsman.Server
	http     *http.Server
	listener net.Listener
	down     bool

	refuseAuth  atomic.Bool
	slowReceive atomic.Int64 // nanoseconds
	slowCreate  atomic.Int64 // nanoseconds
	inFlight    atomic.Int64 // HTTP requests being handled
	// stallReceive and stallAll are guarded by mu; released is closed
	// whenever either is cleared, waking the requests they hold.
	stallReceive bool
	stallAll     bool
	released     chan struct{}
}

// Start builds the organisation and starts every endpoint (and the admin
// API when asked).
func Start(cfg Config) (*Sim, error) {
	if cfg.OrgName == "" {
		cfg.OrgName = "Contoso"
	}
	if cfg.Domain == "" {
		cfg.Domain = "contoso.com"
	}
	if len(cfg.CAS) == 0 {
		cfg.CAS = []string{"EX01"}
	}
	if len(cfg.Accounts) == 0 {
		cfg.Accounts = map[string]string{DefaultUser: DefaultPassword}
	}
	if !cfg.Basic && !cfg.NTLM {
		cfg.Basic, cfg.NTLM = true, true
	}
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	if cfg.MaxOperationTimeout == 0 {
		cfg.MaxOperationTimeout = 60 * time.Second
	}
	s := &Sim{cfg: cfg, profile: cfg.Profile, accounts: winauth.StaticAccounts(cfg.Accounts), Recorder: NewRecorder(200_000), calls: map[string][]time.Time{}}
	version, err := ParseVersion(string(cfg.Version))
	if err != nil {
		return nil, err
	}
	s.Org = NewOrg(cfg.OrgName, cfg.Domain)
	s.rps = newRPSRegistry(cfg.MaxSessionsPerUser, cfg.SessionTimeScale, time.Now)
	s.Org.SetVersion(version)
	s.Org.ReplicationDelay = cfg.ReplicationDelay
	s.Org.OriginWhenChanged, s.Org.Keep2013Properties = cfg.OriginWhenChanged, cfg.Keep2013Properties
	if cfg.Now != nil {
		s.Org.Now = cfg.Now
	}
	s.Org.Servers[0].Name = strings.ToUpper(cfg.CAS[0])
	s.Org.Servers[0].FQDN = strings.ToLower(cfg.CAS[0]) + "." + cfg.Domain
	for _, n := range cfg.CAS[1:] {
		s.Org.AddServer(strings.ToUpper(n), strings.ToLower(n)+"."+cfg.Domain, s.Org.Servers[0].Version)
	}
	if len(cfg.Granted) > 0 {
		s.Org.Grant(cfg.Granted)
	}
	if cfg.Seed != nil {
		if err := Seed(s.Org, *cfg.Seed); err != nil {
			return nil, err
		}
	}
	if cfg.HTTPS {
		if cfg.Certificate != nil {
			s.tlsCert = cfg.Certificate
			s.CertPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cfg.Certificate.Certificate[0]})
		} else {
			cert, pemBytes, err := selfSigned(cfg)
			if err != nil {
				return nil, err
			}
			s.tlsCert, s.CertPEM = cert, pemBytes
		}
	}
	for i, n := range cfg.CAS {
		port := 0
		if cfg.Port != 0 {
			port = cfg.Port + i
		}
		ep := &Endpoint{Name: strings.ToUpper(n), FQDN: strings.ToLower(n) + "." + cfg.Domain, sim: s, addr: net.JoinHostPort(cfg.Host, strconv.Itoa(port))}
		if err := ep.up(); err != nil {
			s.Close()
			return nil, err
		}
		s.endpoints = append(s.endpoints, ep)
	}
	if cfg.AdminAddr != "" {
		ln, err := net.Listen("tcp", cfg.AdminAddr)
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("exchangesim admin listen: %w", err)
		}
		s.admin = &http.Server{Handler: s.AdminHandler(), ReadHeaderTimeout: 5 * time.Second}
		s.adminURL = "http://" + ln.Addr().String()
		go func() { _ = s.admin.Serve(ln) }()
	}
	return s, nil
}

// selfSigned makes the certificate a freshly installed Exchange server
// would have: self-signed, for its names.
func selfSigned(cfg Config) (*tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("exchangesim certificate: %w", err)
	}
	names := []string{"localhost"}
	if cfg.PublicHost != "" {
		names = append(names, cfg.PublicHost)
	}
	for _, n := range cfg.CAS {
		names = append(names, strings.ToLower(n), strings.ToLower(n)+"."+cfg.Domain)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: strings.ToLower(cfg.CAS[0]) + "." + cfg.Domain},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(365 * 24 * time.Hour),
		DNSNames: names, IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(cfg.Host)},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("exchangesim certificate: %w", err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

// up starts (or restarts) the endpoint's listener on its address; a
// restarted CAS has lost its shells, as after a reboot.
func (e *Endpoint) up() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.listener != nil {
		return nil
	}
	ln, err := net.Listen("tcp", e.addr)
	if err != nil {
		return fmt.Errorf("exchangesim %s listen %s: %w", e.Name, e.addr, err)
	}
	e.addr = ln.Addr().String()
	s := e.sim
	e.server = wsman.NewServer(launcher{ep: e}, wsman.Options{
		UserFromRequest:     func(r *http.Request) string { return winauth.User(r.Context()) },
		MaxShellsPerUser:    s.profile.MaxShellsPerUser,
		MaxOperationTimeout: s.cfg.MaxOperationTimeout,
		Machine:             e.FQDN,
		Hooks: wsman.Hooks{
			OnRequest: func(r wsman.Request) {
				s.Recorder.Add(Record{Time: r.Time, Endpoint: e.Name, Kind: "wsman", User: r.User, Action: actionName(r.Action), ShellID: r.ShellID, OK: true})
			},
			BeforeAction: func(r wsman.Request) *wsman.Fault {
				if actionName(r.Action) == "Create" {
					sleep(s.profile.ShellCreate)
					// Not bounded by the request's context: a client that
					// stops waiting does not stop WinRM making the shell.
					sleep(time.Duration(e.slowCreate.Load()))
				}
				sleep(s.profile.RoundTrip)
				return nil
			},
			BeforeReceive: func(ctx context.Context, shellID, commandID string) *wsman.Fault {
				if d := time.Duration(e.slowReceive.Load()); d > 0 {
					sleepCtx(ctx, d)
				}
				e.waitWhile(ctx, func() bool { return e.stallReceive })
				return nil
			},
		},
	})
	handler := winauth.Middleware(s.accounts, winauth.Options{
		Basic: s.cfg.Basic, NTLM: s.cfg.NTLM, NetBIOSDomain: s.Org.defaultDomain().NetBIOS, DNSDomain: s.cfg.Domain,
		NetBIOSComputer: e.Name, DNSComputer: e.FQDN,
		Refuse:           func(*http.Request) bool { return e.refuseAuth.Load() },
		AllowUnencrypted: s.cfg.AllowUnencrypted, UnencryptedStatus: s.cfg.UnencryptedStatus,
	}, e.server)
	mux := http.NewServeMux()
	mux.Handle("/wsman", handler)
	stallable := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.inFlight.Add(1)
		defer e.inFlight.Add(-1)
		e.waitWhile(r.Context(), func() bool { return e.stallAll })
		mux.ServeHTTP(w, r)
	})
	srv := &http.Server{Handler: stallable, ConnContext: winauth.ConnContext, ReadHeaderTimeout: 10 * time.Second}
	e.http, e.listener = srv, ln
	if s.tlsCert != nil {
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{*s.tlsCert}, MinVersion: tls.VersionTLS12}
		go func() { _ = srv.ServeTLS(ln, "", "") }()
	} else {
		go func() { _ = srv.Serve(ln) }()
	}
	e.down = false
	return nil
}

// waitWhile blocks while stalled() (read under mu) holds, or until ctx ends.
func (e *Endpoint) waitWhile(ctx context.Context, stalled func() bool) {
	for {
		e.mu.Lock()
		if !stalled() {
			e.mu.Unlock()
			return
		}
		if e.released == nil {
			e.released = make(chan struct{})
		}
		ch := e.released
		e.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return
		}
	}
}

// setStall changes a stall flag and wakes the held requests.
func (e *Endpoint) setStall(flag *bool, v bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	*flag = v
	if !v && e.released != nil {
		close(e.released)
		e.released = nil
	}
}

// stop closes the listener and every connection and drops the shells.
func (e *Endpoint) stop() {
	e.mu.Lock()
	srv, ws, ln := e.http, e.server, e.listener
	e.http, e.server, e.listener = nil, nil, nil
	e.down = true
	e.mu.Unlock()
	if ln == nil {
		return
	}
	e.setStall(&e.stallAll, false)
	e.setStall(&e.stallReceive, false)
	_ = srv.Close()
	ws.Close()
}

func actionName(uri string) string {
	if i := strings.LastIndexByte(uri, '/'); i >= 0 {
		return uri[i+1:]
	}
	return uri
}

// URL returns the endpoint's WS-Man URL.
func (e *Endpoint) URL() string {
	scheme := "http"
	if e.sim.tlsCert != nil {
		scheme = "https"
	}
	return scheme + "://" + e.addr + "/wsman"
}

// Addr returns host:port of the endpoint.
func (e *Endpoint) Addr() string { return e.addr }

// SetDown takes the CAS off the network (connections refused, shells
// lost) or brings it back on the same port.
func (e *Endpoint) SetDown(down bool) error {
	if down {
		e.stop()
		return nil
	}
	return e.up()
}

// Down reports whether the CAS is down.
func (e *Endpoint) Down() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.down
}

// SetRefuseAuth makes the CAS answer 401 even to good credentials.
func (e *Endpoint) SetRefuseAuth(v bool) { e.refuseAuth.Store(v) }

// SetSlowReceive delays every Receive by d before it starts waiting.
func (e *Endpoint) SetSlowReceive(d time.Duration) { e.slowReceive.Store(int64(d)) }

// SetSlowCreate makes every shell Create take d before the shell exists
// and the answer is sent. The shell is made even when the client has
// stopped waiting, so a client that gives up on a slow Create and never
// learns the shell's id leaves it behind: UNCONFIRMED that Windows carries
// on with a Create whose HTTP request was abandoned; it is the worst case,
// and nothing in WinRM's documentation says it rolls the Create back.
func (e *Endpoint) SetSlowCreate(d time.Duration) { e.slowCreate.Store(int64(d)) }

// SetStallReceive holds every Receive until the stall is cleared: a CAS
// that accepts requests and never answers the long poll.
func (e *Endpoint) SetStallReceive(v bool) { e.setStall(&e.stallReceive, v) }

// SetStall holds every request (the CAS stopped answering, the network
// dropped its packets) until cleared.
func (e *Endpoint) SetStall(v bool) { e.setStall(&e.stallAll, v) }

// DropShells terminates every shell of the CAS mid-command.
func (e *Endpoint) DropShells() int {
	e.mu.Lock()
	ws := e.server
	e.mu.Unlock()
	if ws == nil {
		return 0
	}
	n := 0
	for _, user := range e.sim.accountNames() {
		for _, id := range ws.ShellIDs(user) {
			ws.DropShell(id)
			n++
		}
	}
	return n
}

// InFlight returns how many HTTP requests the CAS is handling now, including
// ones whose client has stopped waiting: a test that must see what those
// leave behind waits for this to reach zero.
func (e *Endpoint) InFlight() int { return int(e.inFlight.Load()) }

// Shells returns the open shells of a user on this CAS.
func (e *Endpoint) Shells(user string) int {
	e.mu.Lock()
	ws := e.server
	e.mu.Unlock()
	if ws == nil {
		return 0
	}
	return ws.Shells(user)
}

func (s *Sim) accountNames() []string {
	var out []string
	for u := range s.accounts {
		out = append(out, u)
	}
	return out
}

// Endpoints returns the CAS endpoints, primary first.
func (s *Sim) Endpoints() []*Endpoint { return s.endpoints }

// Endpoint returns the CAS with the given name, or nil.
func (s *Sim) Endpoint(name string) *Endpoint {
	for _, e := range s.endpoints {
		if strings.EqualFold(e.Name, name) || strings.EqualFold(e.FQDN, name) {
			return e
		}
	}
	return nil
}

// AdminURL returns the admin API's base URL ("" without one).
func (s *Sim) AdminURL() string { return s.adminURL }

// checkPassword verifies explicit credentials of a remote session.
func (s *Sim) checkPassword(user, password string) bool {
	pw, ok := s.accounts.Password(user)
	return ok && pw == password
}

// throttle is Exchange 2013+'s cmdlet budget refusal. UNCONFIRMED
// wording (reference/exchange.md §11: the English text is not sourced);
// it carries the back-off in seconds as Exchange's does, in the session's
// language (German for a de-DE session; UNCONFIRMED translation).
func (s *Sim) throttle(user, culture string) *exchange.Error {
	p := s.profile
	if p.MaxCmdlets <= 0 || p.CmdletPeriod <= 0 {
		return nil
	}
	s.throttleMu.Lock()
	defer s.throttleMu.Unlock()
	now := time.Now()
	kept := s.calls[user][:0]
	for _, t := range s.calls[user] {
		if now.Sub(t) < p.CmdletPeriod {
			kept = append(kept, t)
		}
	}
	s.calls[user] = kept
	if len(kept) >= p.MaxCmdlets {
		wait := p.CmdletPeriod - now.Sub(kept[0])
		if german(culture) {
			e := newError(fmt.Sprintf("Das Cmdlet kann nicht ausgeführt werden, weil der Benutzer %s die maximale Anzahl von %d Cmdlets in %d Sekunden überschritten hat (PowerShellMaxCmdlets). Warten Sie %d Sekunden, bevor Sie es erneut versuchen. Richtlinie: GlobalThrottlingPolicy; Momentaufnahme: Besitzer: %s.",
				user, p.MaxCmdlets, int(p.CmdletPeriod.Seconds()), int(wait.Seconds()+0.999), user),
				"ResourceUnavailable", "OverBudgetException", "OverBudgetException", "")
			return &e
		}
		e := newError(fmt.Sprintf("Fail to execute the cmdlet because the user %s has exceeded the maximum of %d cmdlets allowed in %d seconds (PowerShellMaxCmdlets). Please wait %d seconds before trying again. Policy: GlobalThrottlingPolicy; Snapshot: Owner: %s.",
			user, p.MaxCmdlets, int(p.CmdletPeriod.Seconds()), int(wait.Seconds()+0.999), user),
			"ResourceUnavailable", "OverBudgetException", "OverBudgetException", "")
		return &e
	}
	s.calls[user] = append(kept, now)
	return nil
}

// Close stops every endpoint and the admin API.
func (s *Sim) Close() {
	for _, e := range s.endpoints {
		e.stop()
	}
	if s.admin != nil {
		_ = s.admin.Close()
	}
}

// ErrUnknownEndpoint is returned by fault injection for a CAS that does not exist.
var ErrUnknownEndpoint = errors.New("unknown CAS endpoint")
