package winauth_test

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Azure/go-ntlmssp"
	"github.com/masterzen/winrm"

	"github.com/easguard/easguard/tests/exchangesim/winauth"
)

// createResponse is the smallest WS-Man CreateResponse that winrm.Client.CreateShell
// accepts.
const createResponse = `<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer" xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd" xmlns:rsp="http://schemas.microsoft.com/wbem/wsman/1/windows/shell"><s:Header><a:Action>http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse</a:Action></s:Header><s:Body><x:ResourceCreated><a:Address>http://x/wsman</a:Address><a:ReferenceParameters><w:ResourceURI>http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd</w:ResourceURI><w:SelectorSet><w:Selector Name="ShellId">SHELL-1</w:Selector></w:SelectorSet></a:ReferenceParameters></x:ResourceCreated><rsp:Shell><rsp:ShellId>SHELL-1</rsp:ShellId></rsp:Shell></s:Body></s:Envelope>`

// createAction is the WS-Transfer action of the request CreateShell sends; the test
// handler insists on it to prove that the request body reached it intact, in
// particular on the NTLM leg that carries the AUTHENTICATE message.
const createAction = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create"

// rawCreateBody stands in for a WS-Man Create request in tests that bypass winrm.
const rawCreateBody = `<s:Envelope><s:Header><a:Action>` + createAction + `</a:Action></s:Header><s:Body/></s:Envelope>`

const (
	alicePassword = "Wonder-land-2024!"
	bobPassword   = "b0b's Sécret"
	wrongPassword = "not-the-password"
)

// newAccounts returns the simulator's accounts. "Alice" is stored capitalised so
// that tests can tell the canonical name from the spelling the client used.
func newAccounts() winauth.StaticAccounts {
	return winauth.StaticAccounts{"Alice": alicePassword, "bob": bobPassword}
}

// simulator is a WinRM endpoint behind winauth, recording what the handler saw.
type simulator struct {
	srv      *httptest.Server
	requests atomic.Int32 // HTTP requests that reached the middleware

	mu       sync.Mutex
	users    []string // User(ctx) of every served request
	failures []error  // Options.OnFailure reports
}

// startSimulator starts an HTTP or HTTPS server with ConnContext installed and a
// handler answering CreateShell. OnFailure in opts is replaced by a recorder.
//
// It sets AllowUnencrypted: these tests are about authentication and drive the
// server with clients that cannot seal (masterzen/winrm's Basic and ClientNTLM
// transports, raw go-ntlmssp legs), so over HTTP they need a host configured
// with AllowUnencrypted=true. seal_test.go tests the default, which refuses them.
func startSimulator(t testing.TB, useTLS bool, opts winauth.Options) *simulator {
	t.Helper()
	opts.AllowUnencrypted = true
	return startSimulatorAs(t, useTLS, opts)
}

// startSimulatorAs is startSimulator with opts exactly as given.
func startSimulatorAs(t testing.TB, useTLS bool, opts winauth.Options) *simulator {
	t.Helper()
	s := &simulator{}
	opts.OnFailure = func(_ *http.Request, err error) {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.failures = append(s.failures, err)
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil || !strings.Contains(string(body), createAction) {
			http.Error(w, "request body is not a WS-Man Create", http.StatusBadRequest)
			return
		}
		s.mu.Lock()
		s.users = append(s.users, winauth.User(r.Context()))
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/soap+xml;charset=UTF-8")
		_, _ = io.WriteString(w, createResponse)
	})
	auth := winauth.Middleware(newAccounts(), opts, handler)
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		auth.ServeHTTP(w, r)
	}))
	s.srv.Config.ConnContext = winauth.ConnContext
	if useTLS {
		s.srv.StartTLS()
	} else {
		s.srv.Start()
	}
	t.Cleanup(s.srv.Close)
	t.Cleanup(func() { s.checkNoSecrets(t) })
	return s
}

// served returns the users seen by the handler so far.
func (s *simulator) served() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.users...)
}

// failureReasons returns the OnFailure errors so far.
func (s *simulator) failureReasons() []error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]error(nil), s.failures...)
}

// checkNoSecrets fails the test if a rejection reason mentions a password.
func (s *simulator) checkNoSecrets(t testing.TB) {
	t.Helper()
	for _, err := range s.failureReasons() {
		for _, secret := range []string{alicePassword, bobPassword, wrongPassword} {
			if strings.Contains(err.Error(), secret) {
				t.Errorf("failure reason %q leaks a password", err)
			}
		}
	}
}

// wantFailure fails the test unless the last OnFailure report contains reason.
func (s *simulator) wantFailure(t testing.TB, reason string) {
	t.Helper()
	failures := s.failureReasons()
	if len(failures) == 0 {
		t.Fatalf("no failure reported, want one containing %q", reason)
	}
	if last := failures[len(failures)-1]; !strings.Contains(last.Error(), reason) {
		t.Fatalf("last failure = %q, want it to contain %q", last, reason)
	}
}

// newWinRMClient builds a masterzen/winrm client for the simulator, with the
// default (Basic) transport or with winrm.ClientNTLM.
func newWinRMClient(t testing.TB, s *simulator, useNTLM bool, user, password string) *winrm.Client {
	t.Helper()
	u, err := url.Parse(s.srv.URL)
	if err != nil {
		t.Fatalf("parse server URL: %v", err)
	}
	port, err := strconv.Atoi(u.Port())
	if err != nil {
		t.Fatalf("parse server port: %v", err)
	}
	endpoint := winrm.NewEndpoint(u.Hostname(), port, u.Scheme == "https", true, nil, nil, nil, 0)
	params := winrm.NewParameters("PT60S", "en-US", 153600)
	if useNTLM {
		params.TransportDecorator = func() winrm.Transporter { return &winrm.ClientNTLM{} }
	}
	client, err := winrm.NewClientWithParameters(endpoint, user, password, params)
	if err != nil {
		t.Fatalf("new winrm client: %v", err)
	}
	return client
}

func TestWinRMClientsAuthenticate(t *testing.T) {
	schemes := []struct {
		name    string
		useNTLM bool
		opts    winauth.Options
		badPass string // OnFailure reason for a wrong password
	}{
		{"Basic", false, winauth.Options{Basic: true}, "wrong password"},
		{"NTLM", true, winauth.Options{NTLM: true}, "NTLMv2 proof does not match"},
	}
	transports := []struct {
		name   string
		useTLS bool
	}{{"HTTP", false}, {"HTTPS", true}}
	creds := []struct {
		name     string
		user     string
		password string
		ok       bool
		reason   string // "" means the scheme's badPass reason
	}{
		{"good password", "alice", alicePassword, true, ""},
		{"wrong password", "alice", wrongPassword, false, ""},
		{"unknown user", "mallory", alicePassword, false, "unknown user"},
	}
	for _, sc := range schemes {
		for _, tr := range transports {
			for _, cr := range creds {
				t.Run(sc.name+"/"+tr.name+"/"+cr.name, func(t *testing.T) {
					sim := startSimulator(t, tr.useTLS, sc.opts)
					client := newWinRMClient(t, sim, sc.useNTLM, cr.user, cr.password)
					_, err := client.CreateShell()
					if cr.ok {
						if err != nil {
							t.Fatalf("CreateShell: %v", err)
						}
						if got := sim.served(); len(got) != 1 || got[0] != "Alice" {
							t.Fatalf("handler saw users %q, want [Alice]", got)
						}
						return
					}
					// What masterzen/winrm reports for the Windows-style empty 401.
					if err == nil || !strings.Contains(err.Error(), "http response error: 401 - invalid content type") {
						t.Fatalf("CreateShell error = %v, want a 401 with invalid content type", err)
					}
					if got := sim.served(); len(got) != 0 {
						t.Fatalf("handler served %q despite bad credentials", got)
					}
					reason := cr.reason
					if reason == "" {
						reason = sc.badPass
					}
					sim.wantFailure(t, reason)
				})
			}
		}
	}
}

func TestUserIsCanonicalForEveryNameForm(t *testing.T) {
	forms := []string{"alice", "ALICE", "Alice", `CONTOSO\alice`, `contoso\ALICE`, "alice@contoso.com", "ALICE@CONTOSO.COM"}
	for _, useNTLM := range []bool{false, true} {
		scheme := "Basic"
		if useNTLM {
			scheme = "NTLM"
		}
		for _, form := range forms {
			t.Run(scheme+"/"+form, func(t *testing.T) {
				sim := startSimulator(t, false, winauth.Options{Basic: !useNTLM, NTLM: useNTLM})
				if _, err := newWinRMClient(t, sim, useNTLM, form, alicePassword).CreateShell(); err != nil {
					t.Fatalf("CreateShell as %q: %v", form, err)
				}
				if got := sim.served(); len(got) != 1 || got[0] != "Alice" {
					t.Fatalf("User(ctx) = %q, want [Alice]", got)
				}
			})
		}
	}
}

func TestNTLMConnectionIsReusedWithoutNewHandshake(t *testing.T) {
	sim := startSimulator(t, false, winauth.Options{NTLM: true})
	client := newWinRMClient(t, sim, true, "bob", bobPassword)
	for i := range 3 {
		before := sim.requests.Load()
		if _, err := client.CreateShell(); err != nil {
			t.Fatalf("CreateShell %d: %v", i, err)
		}
		// The first call needs anonymous probe, NEGOTIATE and AUTHENTICATE; later
		// ones are served from the connection's identity by the anonymous probe.
		want := int32(1)
		if i == 0 {
			want = 3
		}
		if got := sim.requests.Load() - before; got != want {
			t.Fatalf("CreateShell %d took %d HTTP requests, want %d", i, got, want)
		}
	}
	if got := sim.served(); len(got) != 3 || got[2] != "bob" {
		t.Fatalf("handler saw users %q, want three times bob", got)
	}
}

func TestConcurrentNTLMClients(t *testing.T) {
	const clients, calls = 8, 20
	sim := startSimulator(t, false, winauth.Options{NTLM: true})
	var wg sync.WaitGroup
	errs := make(chan error, clients*calls)
	for i := range clients {
		user, password := "alice", alicePassword
		if i%2 == 1 {
			user, password = `CONTOSO\bob`, bobPassword
		}
		client := newWinRMClient(t, sim, true, user, password)
		wg.Go(func() {
			for range calls {
				if _, err := client.CreateShell(); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("CreateShell: %v", err)
	}
	users := sim.served()
	if len(users) != clients*calls {
		t.Fatalf("handler served %d requests, want %d", len(users), clients*calls)
	}
	counts := map[string]int{}
	for _, u := range users {
		counts[u]++
	}
	if counts["Alice"] != clients*calls/2 || counts["bob"] != clients*calls/2 {
		t.Fatalf("served users %v, want %d each of Alice and bob", counts, clients*calls/2)
	}
}

func TestRefuse(t *testing.T) {
	t.Run("always", func(t *testing.T) {
		for _, useNTLM := range []bool{false, true} {
			name := "Basic"
			if useNTLM {
				name = "NTLM"
			}
			t.Run(name, func(t *testing.T) {
				var calls atomic.Int32
				sim := startSimulator(t, false, winauth.Options{Basic: !useNTLM, NTLM: useNTLM, Refuse: func(r *http.Request) bool {
					calls.Add(1)
					return r.URL.Path == "/wsman"
				}})
				_, err := newWinRMClient(t, sim, useNTLM, "alice", alicePassword).CreateShell()
				if err == nil || !strings.Contains(err.Error(), "401") {
					t.Fatalf("CreateShell error = %v, want a 401", err)
				}
				if got := sim.served(); len(got) != 0 {
					t.Fatalf("handler served %q despite Refuse", got)
				}
				if got := calls.Load(); got != 1 {
					t.Fatalf("Refuse called %d times, want once (only for the verified request)", got)
				}
				sim.wantFailure(t, "refused")
			})
		}
	})
	t.Run("toggled on an authenticated NTLM connection", func(t *testing.T) {
		var refuse atomic.Bool
		sim := startSimulator(t, false, winauth.Options{NTLM: true, Refuse: func(*http.Request) bool { return refuse.Load() }})
		client := newWinRMClient(t, sim, true, "alice", alicePassword)
		if _, err := client.CreateShell(); err != nil {
			t.Fatalf("CreateShell before refusing: %v", err)
		}
		refuse.Store(true)
		if _, err := client.CreateShell(); err == nil || !strings.Contains(err.Error(), "401") {
			t.Fatalf("CreateShell while refusing: error = %v, want a 401", err)
		}
		refuse.Store(false)
		if _, err := client.CreateShell(); err != nil {
			t.Fatalf("CreateShell after refusing: %v", err)
		}
		if got := sim.served(); len(got) != 2 {
			t.Fatalf("handler served %q, want two requests", got)
		}
	})
}

func TestUnauthorizedResponseLooksLikeWindows(t *testing.T) {
	negotiate, err := ntlmssp.NewNegotiateMessage("", "")
	if err != nil {
		t.Fatalf("NewNegotiateMessage: %v", err)
	}
	spnego := []byte{0x60, 0x28, 0x06, 0x06, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x02, 0xa0, 0x1e}
	cases := []struct {
		name    string
		opts    winauth.Options
		authz   string
		schemes []string
	}{
		{"both schemes, no credentials", winauth.Options{Basic: true, NTLM: true}, "", []string{"Negotiate", "NTLM", `Basic realm="WSMAN"`}},
		{"basic only, no credentials", winauth.Options{Basic: true}, "", []string{`Basic realm="WSMAN"`}},
		{"basic only, custom realm", winauth.Options{Basic: true, Realm: "EXCHANGE"}, "", []string{`Basic realm="EXCHANGE"`}},
		{"ntlm only, no credentials", winauth.Options{NTLM: true}, "", []string{"Negotiate", "NTLM"}},
		{"bad basic password", winauth.Options{Basic: true, NTLM: true}, basicAuth("alice", wrongPassword), []string{"Negotiate", "NTLM", `Basic realm="WSMAN"`}},
		{"basic when only ntlm is enabled", winauth.Options{NTLM: true}, basicAuth("alice", alicePassword), []string{"Negotiate", "NTLM"}},
		{"ntlm when only basic is enabled", winauth.Options{Basic: true}, "Negotiate " + base64.StdEncoding.EncodeToString(negotiate), []string{`Basic realm="WSMAN"`}},
		{"spnego-wrapped token", winauth.Options{NTLM: true}, "Negotiate " + base64.StdEncoding.EncodeToString(spnego), []string{"Negotiate", "NTLM"}},
		{"kerberos scheme", winauth.Options{NTLM: true, Basic: true}, "Kerberos AAAA", []string{"Negotiate", "NTLM", `Basic realm="WSMAN"`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sim := startSimulator(t, false, tc.opts)
			req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, sim.srv.URL+"/wsman", strings.NewReader(rawCreateBody))
			if err != nil {
				t.Fatalf("new request: %v", err)
			}
			req.Header.Set("Content-Type", "application/soap+xml;charset=UTF-8")
			if tc.authz != "" {
				req.Header.Set("Authorization", tc.authz)
			}
			resp, err := sim.srv.Client().Do(req)
			if err != nil {
				t.Fatalf("POST: %v", err)
			}
			body, err := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if err != nil {
				t.Fatalf("read body: %v", err)
			}
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("status = %d, want 401", resp.StatusCode)
			}
			if len(body) != 0 {
				t.Fatalf("body = %q, want empty", body)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "" {
				t.Fatalf("Content-Type = %q, want none", ct)
			}
			if got := resp.Header.Values("WWW-Authenticate"); !equalStrings(got, tc.schemes) {
				t.Fatalf("WWW-Authenticate = %q, want %q", got, tc.schemes)
			}
		})
	}
}

// basicAuth returns a Basic Authorization header value.
func basicAuth(user, password string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+password))
}

// equalStrings reports whether a and b hold the same strings in the same order.
func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// schemeRecorder sits between ntlmssp.Negotiator and the network, recording the
// Authorization scheme of each request and the WWW-Authenticate values of each
// response. With hideNTLM it removes the "NTLM" offer from responses, which is the
// only way to make the Negotiator pick the "Negotiate" scheme when both are offered.
type schemeRecorder struct {
	next     http.RoundTripper
	hideNTLM bool

	mu        sync.Mutex
	requests  []string
	responses [][]string
}

// RoundTrip records and forwards one request.
func (s *schemeRecorder) RoundTrip(req *http.Request) (*http.Response, error) {
	scheme, _, _ := strings.Cut(req.Header.Get("Authorization"), " ")
	resp, err := s.next.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	values := resp.Header.Values("WWW-Authenticate")
	if s.hideNTLM {
		var kept []string
		for _, v := range values {
			if name, _, _ := strings.Cut(v, " "); !strings.EqualFold(name, "NTLM") {
				kept = append(kept, v)
			}
		}
		resp.Header.Del("WWW-Authenticate")
		for _, v := range kept {
			resp.Header.Add("WWW-Authenticate", v)
		}
		values = kept
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, scheme)
	s.responses = append(s.responses, values)
	return resp, nil
}

func TestGoNTLMSSPNegotiatorSchemes(t *testing.T) {
	cases := []struct {
		name     string
		hideNTLM bool
		scheme   string
	}{
		{"NTLM offered", false, "NTLM"},
		{"only Negotiate offered", true, "Negotiate"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sim := startSimulator(t, false, winauth.Options{NTLM: true, Basic: true})
			transport := &http.Transport{}
			t.Cleanup(transport.CloseIdleConnections)
			rec := &schemeRecorder{next: transport, hideNTLM: tc.hideNTLM}
			client := &http.Client{Transport: ntlmssp.Negotiator{RoundTripper: rec}}

			req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, sim.srv.URL+"/wsman", strings.NewReader(rawCreateBody))
			if err != nil {
				t.Fatalf("new request: %v", err)
			}
			req.SetBasicAuth(`CONTOSO\alice`, alicePassword)
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("POST: %v", err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status = %d, want 200 (failures: %v)", resp.StatusCode, sim.failureReasons())
			}
			if want := []string{"", tc.scheme, tc.scheme}; !equalStrings(rec.requests, want) {
				t.Fatalf("Authorization schemes = %q, want %q", rec.requests, want)
			}
			if challenge := rec.responses[1]; len(challenge) != 1 || !strings.HasPrefix(challenge[0], tc.scheme+" ") {
				t.Fatalf("CHALLENGE WWW-Authenticate = %q, want one %q value", challenge, tc.scheme)
			}
			if got := sim.served(); len(got) != 1 || got[0] != "Alice" {
				t.Fatalf("handler saw users %q, want [Alice]", got)
			}
		})
	}
}

// rawConn drives HTTP/1.1 requests over one TCP connection, so that tests control
// exactly which connection each NTLM message travels on.
type rawConn struct {
	t    testing.TB
	conn net.Conn
	br   *bufio.Reader
	url  string
}

// dialRaw opens a new connection to the simulator.
func dialRaw(t testing.TB, s *simulator) *rawConn {
	t.Helper()
	conn, err := net.Dial("tcp", s.srv.Listener.Addr().String())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &rawConn{t: t, conn: conn, br: bufio.NewReader(conn), url: s.srv.URL + "/wsman"}
}

// do sends a Create request with the given Authorization value ("" for none) and
// returns the status and the WWW-Authenticate values of the response.
func (c *rawConn) do(authz string) (int, []string) {
	c.t.Helper()
	req, err := http.NewRequest(http.MethodPost, c.url, strings.NewReader(rawCreateBody))
	if err != nil {
		c.t.Fatalf("new request: %v", err)
	}
	req.Header.Set("Content-Type", "application/soap+xml;charset=UTF-8")
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	if err := req.Write(c.conn); err != nil {
		c.t.Fatalf("write request: %v", err)
	}
	resp, err := http.ReadResponse(c.br, req)
	if err != nil {
		c.t.Fatalf("read response: %v", err)
	}
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		c.t.Fatalf("read body: %v", err)
	}
	_ = resp.Body.Close()
	return resp.StatusCode, resp.Header.Values("WWW-Authenticate")
}

// negotiate sends a NEGOTIATE with scheme and returns the decoded CHALLENGE.
func (c *rawConn) negotiate(scheme string) []byte {
	c.t.Helper()
	msg, err := ntlmssp.NewNegotiateMessage("", "")
	if err != nil {
		c.t.Fatalf("NewNegotiateMessage: %v", err)
	}
	status, values := c.do(scheme + " " + base64.StdEncoding.EncodeToString(msg))
	if status != http.StatusUnauthorized || len(values) != 1 {
		c.t.Fatalf("NEGOTIATE: status %d, WWW-Authenticate %q; want 401 with one value", status, values)
	}
	name, token, _ := strings.Cut(values[0], " ")
	if name != scheme {
		c.t.Fatalf("CHALLENGE scheme = %q, want %q", name, scheme)
	}
	challenge, err := base64.StdEncoding.DecodeString(token)
	if err != nil {
		c.t.Fatalf("decode CHALLENGE: %v", err)
	}
	return challenge
}

// authenticateMessage answers challenge with go-ntlmssp, as winrm.ClientNTLM would.
func authenticateMessage(t testing.TB, challenge []byte, user, password string) string {
	t.Helper()
	msg, err := ntlmssp.ProcessChallenge(challenge, user, password, true)
	if err != nil {
		t.Fatalf("ProcessChallenge: %v", err)
	}
	return base64.StdEncoding.EncodeToString(msg)
}

func TestNTLMStateIsPerConnection(t *testing.T) {
	sim := startSimulator(t, false, winauth.Options{NTLM: true})
	expect := func(t testing.TB, step string, got, want int) {
		t.Helper()
		if got != want {
			t.Fatalf("%s: status %d, want %d (failures: %v)", step, got, want, sim.failureReasons())
		}
	}
	c1 := dialRaw(t, sim)
	status, _ := c1.do("")
	expect(t, "anonymous before handshake", status, http.StatusUnauthorized)

	challenge1 := c1.negotiate("NTLM")
	auth1 := "NTLM " + authenticateMessage(t, challenge1, "alice", alicePassword)
	status, _ = c1.do(auth1)
	expect(t, "AUTHENTICATE", status, http.StatusOK)
	status, _ = c1.do("")
	expect(t, "anonymous on authenticated connection", status, http.StatusOK)

	c2 := dialRaw(t, sim)
	status, _ = c2.do("")
	expect(t, "anonymous on another connection", status, http.StatusUnauthorized)
	status, _ = c2.do(auth1)
	expect(t, "AUTHENTICATE replayed on another connection", status, http.StatusUnauthorized)
	sim.wantFailure(t, "without a pending CHALLENGE")

	c1.negotiate("Negotiate")
	status, _ = c1.do("")
	expect(t, "anonymous after a new NEGOTIATE", status, http.StatusUnauthorized)

	c1.negotiate("Negotiate")
	status, _ = c1.do(auth1)
	expect(t, "AUTHENTICATE replayed against a new challenge", status, http.StatusUnauthorized)
	sim.wantFailure(t, "proof does not match")

	challenge := c1.negotiate("Negotiate")
	status, _ = c1.do("Negotiate " + authenticateMessage(t, challenge, "alice", wrongPassword))
	expect(t, "AUTHENTICATE with a wrong password", status, http.StatusUnauthorized)
	status, _ = c1.do("")
	expect(t, "anonymous after a failed AUTHENTICATE", status, http.StatusUnauthorized)

	challenge = c1.negotiate("Negotiate")
	status, _ = c1.do("Negotiate " + authenticateMessage(t, challenge, "bob", bobPassword))
	expect(t, "second successful AUTHENTICATE", status, http.StatusOK)
	status, _ = c1.do("")
	expect(t, "anonymous after re-authentication", status, http.StatusOK)

	if got, want := sim.served(), []string{"Alice", "Alice", "bob", "bob"}; !equalStrings(got, want) {
		t.Fatalf("handler saw users %q, want %q", got, want)
	}
}

func TestChallengeIsAcceptedByGoNTLMSSP(t *testing.T) {
	now := time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)
	sim := startSimulator(t, false, winauth.Options{NTLM: true, Now: func() time.Time { return now }})
	challenge := dialRaw(t, sim).negotiate("Negotiate")

	flags := binary.LittleEndian.Uint32(challenge[20:24])
	const keyExch, lmKey = 0x40000000, 0x00000080
	if flags&(keyExch|lmKey) != 0 {
		t.Fatalf("CHALLENGE flags %#08x set KEY_EXCH or LM_KEY", flags)
	}
	// The client hashes with TargetName as the domain; it must be the NetBIOS domain.
	nameLen := int(binary.LittleEndian.Uint16(challenge[12:14]))
	nameOff := int(binary.LittleEndian.Uint32(challenge[16:20]))
	if got := challenge[nameOff : nameOff+nameLen]; !bytes.Equal(got, []byte("C\x00O\x00N\x00T\x00O\x00S\x00O\x00")) {
		t.Fatalf("TargetName = %q, want UTF-16LE CONTOSO", got)
	}
	if _, err := ntlmssp.ProcessChallenge(challenge, "alice", alicePassword, true); err != nil {
		t.Fatalf("go-ntlmssp refuses the CHALLENGE: %v", err)
	}
}

func TestNTLMWithoutConnContextIsAServerError(t *testing.T) {
	srv := httptest.NewServer(winauth.Middleware(newAccounts(), winauth.Options{NTLM: true}, http.NotFoundHandler()))
	t.Cleanup(srv.Close)
	msg, err := ntlmssp.NewNegotiateMessage("", "")
	if err != nil {
		t.Fatalf("NewNegotiateMessage: %v", err)
	}
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, srv.URL+"/wsman", nil)
	if err != nil {
		t.Fatalf("new request: %v", err)
	}
	req.Header.Set("Authorization", "Negotiate "+base64.StdEncoding.EncodeToString(msg))
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatalf("POST: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusInternalServerError || !strings.Contains(string(body), "ConnContext") {
		t.Fatalf("status %d body %q, want 500 naming ConnContext", resp.StatusCode, body)
	}
}

func TestStaticAccounts(t *testing.T) {
	accounts := winauth.StaticAccounts{"Alice": "a", "bob": "b", "BOB": "B"}
	cases := []struct {
		user     string
		name     string
		password string
		ok       bool
	}{
		{"Alice", "Alice", "a", true},
		{"alice", "Alice", "a", true},
		{`CONTOSO\ALICE`, "Alice", "a", true},
		{"alice@contoso.com", "Alice", "a", true},
		{"bob", "bob", "b", true},
		{"BOB", "BOB", "B", true},
		{"Bob", "BOB", "B", true}, // smallest case-insensitive match, independent of map order
		{"mallory", "", "", false},
		{`CONTOSO\`, "", "", false},
		{"", "", "", false},
	}
	for _, tc := range cases {
		t.Run(tc.user, func(t *testing.T) {
			password, ok := accounts.Password(tc.user)
			if ok != tc.ok || password != tc.password {
				t.Fatalf("Password(%q) = %q, %v; want %q, %v", tc.user, password, ok, tc.password, tc.ok)
			}
			name, ok := accounts.CanonicalName(tc.user)
			if ok != tc.ok || name != tc.name {
				t.Fatalf("CanonicalName(%q) = %q, %v; want %q, %v", tc.user, name, ok, tc.name, tc.ok)
			}
		})
	}
}

// plainAccounts implements only Accounts, to check the fallback naming.
type plainAccounts map[string]string

// Password looks the bare user name up without case folding.
func (p plainAccounts) Password(user string) (string, bool) {
	if i := strings.LastIndexByte(user, '\\'); i >= 0 {
		user = user[i+1:]
	}
	password, ok := p[user]
	return password, ok
}

func TestUserWithoutCanonicalNamer(t *testing.T) {
	var got string
	handler := http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) { got = winauth.User(r.Context()) })
	h := winauth.Middleware(plainAccounts{"carol": "c"}, winauth.Options{Basic: true}, handler)
	req := httptest.NewRequest(http.MethodPost, "/wsman", nil)
	req.Header.Set("Authorization", basicAuth(`CONTOSO\carol`, "c"))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK || got != "carol" {
		t.Fatalf("status %d, User %q; want 200 and carol", rec.Code, got)
	}
	if u := winauth.User(t.Context()); u != "" {
		t.Fatalf("User of an unauthenticated context = %q, want empty", u)
	}
}

func TestMiddlewarePanicsOnMisconfiguration(t *testing.T) {
	cases := []struct {
		name     string
		accounts winauth.Accounts
		opts     winauth.Options
		next     http.Handler
	}{
		{"no scheme", newAccounts(), winauth.Options{}, http.NotFoundHandler()},
		{"nil accounts", nil, winauth.Options{Basic: true}, http.NotFoundHandler()},
		{"nil next", newAccounts(), winauth.Options{Basic: true}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("Middleware did not panic")
				}
			}()
			winauth.Middleware(tc.accounts, tc.opts, tc.next)
		})
	}
}

// Ensure errors.Is works through the wrapping chain reported to OnFailure: the
// reasons are meant for humans, but wrapping must not lose the cause.
func TestFailureReasonsAreWrapped(t *testing.T) {
	var reported error
	h := winauth.Middleware(newAccounts(), winauth.Options{Basic: true, OnFailure: func(_ *http.Request, err error) { reported = err }}, http.NotFoundHandler())
	req := httptest.NewRequest(http.MethodPost, "/wsman", nil)
	req.Header.Set("Authorization", basicAuth("alice", wrongPassword))
	h.ServeHTTP(httptest.NewRecorder(), req)
	if reported == nil || errors.Unwrap(reported) == nil {
		t.Fatalf("reported %v, want a wrapped error", reported)
	}
	if strings.Contains(reported.Error(), wrongPassword) || strings.Contains(reported.Error(), alicePassword) {
		t.Fatalf("reported %q leaks a password", reported)
	}
}
