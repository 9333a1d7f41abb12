package wsman

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/masterzen/winrm"
	"github.com/masterzen/winrm/soap"
)

const testPassword = "Secr3t!"

// fakeProc is a scripted process: behaviour is plugged in through onStdin/onClose and goroutines started by the
// launcher; output goes through the real OutputQueue so the tests also cover it.
type fakeProc struct {
	*OutputQueue
	mu         sync.Mutex
	stdin      bytes.Buffer
	onStdin    func(p *fakeProc, data []byte)
	onClose    func(p *fakeProc)
	terminated chan struct{}
	termOnce   sync.Once
}

func newFakeProc() *fakeProc {
	return &fakeProc{OutputQueue: NewOutputQueue(), terminated: make(chan struct{})}
}

func (p *fakeProc) WriteStdin(b []byte) error {
	select {
	case <-p.terminated:
		return io.ErrClosedPipe
	default:
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stdin.Write(b)
	if p.onStdin != nil {
		p.onStdin(p, b)
	}
	return nil
}

func (p *fakeProc) CloseStdin() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.onClose != nil {
		p.onClose(p)
	}
	return nil
}

func (p *fakeProc) Terminate() {
	p.termOnce.Do(func() {
		close(p.terminated)
		p.Exit(1)
	})
}

func (p *fakeProc) stdinString() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stdin.String()
}

func (p *fakeProc) isTerminated() bool {
	select {
	case <-p.terminated:
		return true
	default:
		return false
	}
}

// echoProc upper-cases each stdin line to stdout and exits with code 3 when stdin closes.
func echoProc(context.Context) *fakeProc {
	p := newFakeProc()
	var line []byte
	p.onStdin = func(p *fakeProc, data []byte) {
		for _, b := range data {
			line = append(line, b)
			if b == '\n' {
				_, _ = p.Stdout().Write(bytes.ToUpper(line))
				line = line[:0]
			}
		}
	}
	p.onClose = func(p *fakeProc) {
		if len(line) > 0 {
			_, _ = p.Stdout().Write(bytes.ToUpper(line))
		}
		p.Exit(3)
	}
	return p
}

const bigSize = 1 << 20

// bigPattern is the deterministic 1 MiB the big process writes, so ordering errors show up as mismatches.
func bigPattern() []byte {
	b := make([]byte, bigSize)
	for i := range b {
		b[i] = byte('a' + (i*7+i/4096)%26)
	}
	return b
}

// bigProc writes 1 MiB to stdout in 4 KiB writes, a stderr line every 256 KiB, then exits 0.
func bigProc(ctx context.Context) *fakeProc {
	p := newFakeProc()
	data := bigPattern()
	go func() {
		for off := 0; off < len(data); off += 4096 {
			if ctx.Err() != nil {
				return
			}
			_, _ = p.Stdout().Write(data[off : off+4096])
			if (off+4096)%(256<<10) == 0 {
				_, _ = fmt.Fprintf(p.Stderr(), "progress %d\n", (off+4096)>>10)
			}
		}
		p.Exit(0)
	}()
	return p
}

// lateProc stays silent for 1.5 s, then prints one line and exits 0.
func lateProc(ctx context.Context) *fakeProc {
	p := newFakeProc()
	go func() {
		t := time.NewTimer(1500 * time.Millisecond)
		defer t.Stop()
		select {
		case <-t.C:
			_, _ = p.Stdout().Write([]byte("late\n"))
			p.Exit(0)
		case <-ctx.Done():
		}
	}()
	return p
}

// silentProc writes nothing and exits 0 when stdin closes.
func silentProc(context.Context) *fakeProc {
	p := newFakeProc()
	p.onClose = func(p *fakeProc) { p.Exit(0) }
	return p
}

// helloProc writes one stdout and one stderr line and exits 0 at once, like a short cmd.exe command.
func helloProc(context.Context) *fakeProc {
	p := newFakeProc()
	_, _ = p.Stdout().Write([]byte("hi\n"))
	_, _ = p.Stderr().Write([]byte("warn\n"))
	p.Exit(0)
	return p
}

type launch struct {
	user, commandLine string
	args              []string
}

// fakeLauncher starts fakeProcs with a per-test behaviour and remembers what it was asked to run.
type fakeLauncher struct {
	mu       sync.Mutex
	make     func(ctx context.Context) *fakeProc
	launches []launch
	procs    []*fakeProc
}

func (l *fakeLauncher) Launch(ctx context.Context, user, commandLine string, args []string) (Process, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if commandLine == "fail-to-start" {
		return nil, fmt.Errorf("starting %q: %w", commandLine, errors.New("file not found"))
	}
	mk := l.make
	if mk == nil {
		mk = echoProc
	}
	p := mk(ctx)
	l.launches = append(l.launches, launch{user: user, commandLine: commandLine, args: args})
	l.procs = append(l.procs, p)
	return p, nil
}

func (l *fakeLauncher) setMake(mk func(ctx context.Context) *fakeProc) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.make = mk
}

func (l *fakeLauncher) last() (launch, *fakeProc) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.procs) == 0 {
		return launch{}, nil
	}
	return l.launches[len(l.launches)-1], l.procs[len(l.procs)-1]
}

func (l *fakeLauncher) allProcs() []*fakeProc {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*fakeProc(nil), l.procs...)
}

// recorder collects Hooks.OnRequest calls and the size of every response body.
type recorder struct {
	mu        sync.Mutex
	reqs      []Request
	respSizes []int
}

func (r *recorder) onRequest(req Request) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reqs = append(r.reqs, req)
}

func (r *recorder) count(action string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, q := range r.reqs {
		if q.Action == action {
			n++
		}
	}
	return n
}

func (r *recorder) actions() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, len(r.reqs))
	for i, q := range r.reqs {
		out[i] = q.Action[strings.LastIndex(q.Action, "/")+1:]
	}
	return out
}

func (r *recorder) requests() []Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Request(nil), r.reqs...)
}

func (r *recorder) maxResponse() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := 0
	for _, n := range r.respSizes {
		m = max(m, n)
	}
	return m
}

type userKey struct{}

func userFromContext(r *http.Request) string {
	u, _ := r.Context().Value(userKey{}).(string)
	return u
}

type sizeWriter struct {
	http.ResponseWriter
	n int
}

func (w *sizeWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.n += n
	return n, err
}

// basicAuth is the trivial authentication wrapper: any user with testPassword is accepted, as the real simulator's
// Basic handler would; it also measures response sizes for the envelope-size assertions.
func basicAuth(next http.Handler, rec *recorder) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, pass, ok := r.BasicAuth()
		if ok && pass == testPassword {
			r = r.WithContext(context.WithValue(r.Context(), userKey{}, user))
		} else if r.Header.Get("X-Test-Anonymous") == "" {
			w.Header().Set("WWW-Authenticate", `Basic realm="WSMAN"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		sw := &sizeWriter{ResponseWriter: w}
		next.ServeHTTP(sw, r)
		rec.mu.Lock()
		rec.respSizes = append(rec.respSizes, sw.n)
		rec.mu.Unlock()
	})
}

// testEnv is one simulator WS-Man endpoint on a loopback httptest server.
type testEnv struct {
	srv      *Server
	ts       *httptest.Server
	launcher *fakeLauncher
	rec      *recorder
	host     string
	port     int
	https    bool
}

func newEnv(t testing.TB, opts Options, useTLS bool) *testEnv {
	t.Helper()
	e := &testEnv{launcher: &fakeLauncher{}, rec: &recorder{}, https: useTLS}
	if opts.UserFromRequest == nil {
		opts.UserFromRequest = userFromContext
	}
	if opts.Hooks.OnRequest == nil {
		opts.Hooks.OnRequest = e.rec.onRequest
	}
	e.srv = NewServer(e.launcher, opts)
	h := basicAuth(e.srv, e.rec)
	if useTLS {
		e.ts = httptest.NewTLSServer(h)
	} else {
		e.ts = httptest.NewServer(h)
	}
	// Cleanups run last-in first-out: the WS-Man server closes first, which ends any long-poll, so the HTTP server
	// does not wait for them.
	t.Cleanup(e.ts.Close)
	t.Cleanup(e.srv.Close)
	host, portStr, err := net.SplitHostPort(e.ts.Listener.Addr().String())
	if err != nil {
		t.Fatalf("split listener address: %v", err)
	}
	e.host = host
	if e.port, err = strconv.Atoi(portStr); err != nil {
		t.Fatalf("parse port: %v", err)
	}
	return e
}

func (e *testEnv) url() string { return e.ts.URL + "/wsman" }

// client returns a masterzen/winrm client with its default (Basic) transport, exactly as production code builds it.
func (e *testEnv) client(t testing.TB, user string, params *winrm.Parameters) *winrm.Client {
	t.Helper()
	if params == nil {
		params = winrm.NewParameters("PT60S", "en-US", 153600)
	}
	ep := winrm.NewEndpoint(e.host, e.port, e.https, true, nil, nil, nil, 0)
	c, err := winrm.NewClientWithParameters(ep, user, testPassword, params)
	if err != nil {
		t.Fatalf("new client: %v", err)
	}
	return c
}

// strictClient uses a Transporter that turns non-200 answers into errors carrying the body, as the cmdlet executor's
// own transport does (reference §8.2). The library's default transport swallows faults on Send and loops forever on
// a non-timeout Receive fault, so fault-injection tests need this one to observe the faults.
func (e *testEnv) strictClient(t testing.TB, user string, params *winrm.Parameters) *winrm.Client {
	t.Helper()
	if params == nil {
		params = winrm.NewParameters("PT60S", "en-US", 153600)
	}
	tr := &strictTransport{user: user, password: testPassword}
	params.TransportDecorator = func() winrm.Transporter { return tr }
	t.Cleanup(tr.close)
	return e.client(t, user, params)
}

type strictTransport struct {
	user, password string
	url            string
	hc             *http.Client
}

func (s *strictTransport) Transport(ep *winrm.Endpoint) error {
	scheme := "http"
	if ep.HTTPS {
		scheme = "https"
	}
	s.url = scheme + "://" + net.JoinHostPort(ep.Host, strconv.Itoa(ep.Port)) + "/wsman"
	s.hc = &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: ep.Insecure}, //nolint:gosec // loopback test server
	}}
	return nil
}

func (s *strictTransport) Post(_ *winrm.Client, m *soap.SoapMessage) (string, error) {
	req, err := http.NewRequest(http.MethodPost, s.url, strings.NewReader(m.String()))
	if err != nil {
		return "", fmt.Errorf("building request: %w", err)
	}
	req.Header.Set("Content-Type", "application/soap+xml;charset=UTF-8")
	req.SetBasicAuth(s.user, s.password)
	resp, err := s.hc.Do(req)
	if err != nil {
		return "", fmt.Errorf("posting: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("reading response: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("http %d: %s", resp.StatusCode, body)
	}
	return string(body), nil
}

func (s *strictTransport) close() {
	if s.hc != nil {
		s.hc.CloseIdleConnections()
	}
}

// errText includes the SOAP body that masterzen/winrm attaches to its errors: with the default transport a Create or
// Command fault only says "received error response" and the Windows message is in the body.
func errText(err error) string {
	if err == nil {
		return ""
	}
	var ece *winrm.ExecuteCommandError
	if errors.As(err, &ece) {
		return err.Error() + " " + ece.Body
	}
	return err.Error()
}

// waitFor polls cond until it holds or the deadline passes; tests use it instead of sleeping.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		<-tick.C
	}
}

// readLine reads one line, failing the test instead of hanging when the server never answers.
func readLine(t testing.TB, r *bufio.Reader, timeout time.Duration) string {
	t.Helper()
	type result struct {
		s   string
		err error
	}
	ch := make(chan result, 1)
	go func() {
		s, err := r.ReadString('\n')
		ch <- result{s, err}
	}()
	select {
	case res := <-ch:
		if res.err != nil {
			t.Fatalf("reading line: %v (partial %q)", res.err, res.s)
		}
		return res.s
	case <-time.After(timeout):
		t.Fatalf("no line within %v", timeout)
		return ""
	}
}

// drain copies a reader to a buffer in the background; the returned function waits and returns the bytes.
func drain(r io.Reader) func() []byte {
	var buf bytes.Buffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(&buf, r)
	}()
	return func() []byte {
		<-done
		return buf.Bytes()
	}
}

func testContext(t testing.TB, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

type rawResponse struct {
	status int
	header http.Header
	body   string
}

// postRaw sends a hand-written envelope, for the prefixes, shapes and faults the library never produces.
func (e *testEnv) postRaw(t testing.TB, user, contentType string, body io.Reader, contentLength int64) rawResponse {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, e.url(), body)
	if err != nil {
		t.Fatalf("building request: %v", err)
	}
	req.ContentLength = contentLength
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if user != "" {
		req.SetBasicAuth(user, testPassword)
	} else {
		req.Header.Set("X-Test-Anonymous", "1")
	}
	resp, err := e.ts.Client().Do(req)
	if err != nil {
		t.Fatalf("posting: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading response: %v", err)
	}
	return rawResponse{status: resp.StatusCode, header: resp.Header, body: string(b)}
}

func (e *testEnv) soapPost(t testing.TB, user, envelope string) rawResponse {
	t.Helper()
	return e.postRaw(t, user, "application/soap+xml;charset=UTF-8", strings.NewReader(envelope), int64(len(envelope)))
}

// parsedResponse is what the tests read back from a response, located by namespace URI like the real client does.
type parsedResponse struct {
	Action    string
	RelatesTo string
	ShellIDs  []string // rsp:ShellId
	Selector  string   // x:ResourceCreated//w:Selector[@Name=ShellId]
	CommandID string
	Streams   []struct {
		Name, CommandID, End, Data string
	}
	State, ExitCode string
	FaultCode       string
	FaultSubcode    string
	FaultReason     string
	WSManCode       string
	WSManMachine    string
	WSManMessage    string
	hasReceive      bool
}

func parseResponse(t testing.TB, body string) parsedResponse {
	t.Helper()
	var out parsedResponse
	d := xml.NewDecoder(strings.NewReader(body))
	var path []xml.Name
	var attrs [][]xml.Attr
	var text strings.Builder
	attr := func(as []xml.Attr, name string) string {
		for _, a := range as {
			if a.Name.Local == name && a.Name.Space == "" {
				return a.Value
			}
		}
		return ""
	}
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("response is not XML: %v\n%s", err, body)
		}
		switch tk := tok.(type) {
		case xml.StartElement:
			path = append(path, tk.Name)
			attrs = append(attrs, tk.Attr)
			text.Reset()
		case xml.CharData:
			text.Write(tk)
		case xml.EndElement:
			name := tk.Name
			as := attrs[len(attrs)-1]
			v := text.String()
			parent := xml.Name{}
			if len(path) > 1 {
				parent = path[len(path)-2]
			}
			switch {
			case name == xml.Name{Space: NamespaceAddressing, Local: "Action"}:
				out.Action = v
			case name == xml.Name{Space: NamespaceAddressing, Local: "RelatesTo"}:
				out.RelatesTo = v
			case name == xml.Name{Space: NamespaceShell, Local: "ShellId"}:
				out.ShellIDs = append(out.ShellIDs, v)
			case name == xml.Name{Space: NamespaceWSMan, Local: "Selector"} && attr(as, "Name") == "ShellId":
				out.Selector = v
			case name == xml.Name{Space: NamespaceShell, Local: "CommandId"}:
				out.CommandID = v
			case name == xml.Name{Space: NamespaceShell, Local: "Stream"}:
				out.Streams = append(out.Streams, struct{ Name, CommandID, End, Data string }{
					attr(as, "Name"), attr(as, "CommandId"), attr(as, "End"), v})
			case name == xml.Name{Space: NamespaceShell, Local: "CommandState"}:
				out.State = attr(as, "State")
			case name == xml.Name{Space: NamespaceShell, Local: "ExitCode"}:
				out.ExitCode = v
			case name == xml.Name{Space: NamespaceShell, Local: "ReceiveResponse"}:
				out.hasReceive = true
			case name == xml.Name{Space: NamespaceSOAP, Local: "Value"} &&
				parent == xml.Name{Space: NamespaceSOAP, Local: "Code"}:
				out.FaultCode = v
			case name == xml.Name{Space: NamespaceSOAP, Local: "Value"} &&
				parent == xml.Name{Space: NamespaceSOAP, Local: "Subcode"}:
				out.FaultSubcode = v
			case name == xml.Name{Space: NamespaceSOAP, Local: "Text"}:
				out.FaultReason = v
			case name == xml.Name{Space: NamespaceFault, Local: "WSManFault"}:
				out.WSManCode = attr(as, "Code")
				out.WSManMachine = attr(as, "Machine")
			case name == xml.Name{Space: NamespaceFault, Local: "Message"}:
				out.WSManMessage = v
			}
			path = path[:len(path)-1]
			attrs = attrs[:len(attrs)-1]
			text.Reset()
		}
	}
	return out
}

// envelopeFor builds a request the way masterzen/winrm lays it out, for raw tests that vary one detail.
func envelopeFor(action, shellID, body string) string {
	selector := ""
	if shellID != "" {
		selector = `<w:SelectorSet><w:Selector Name="ShellId">` + shellID + `</w:Selector></w:SelectorSet>`
	}
	return `<env:Envelope xmlns:env="` + NamespaceSOAP + `" xmlns:a="` + NamespaceAddressing + `" xmlns:p="` +
		NamespaceMSWSMan + `" xmlns:rsp="` + NamespaceShell + `" xmlns:w="` + NamespaceWSMan + `"><env:Header>` +
		`<a:To>http://localhost/wsman</a:To><a:ReplyTo><a:Address mustUnderstand="true">` + anonymousRole +
		`</a:Address></a:ReplyTo><w:MaxEnvelopeSize mustUnderstand="true">153600</w:MaxEnvelopeSize>` +
		`<w:OperationTimeout>PT1S</w:OperationTimeout><a:MessageID>uuid:11111111-2222-4333-8444-555555555555</a:MessageID>` +
		`<a:Action mustUnderstand="true">` + action + `</a:Action>` + selector +
		`<w:ResourceURI mustUnderstand="true">` + ResourceURICmd + `</w:ResourceURI></env:Header><env:Body>` + body +
		`</env:Body></env:Envelope>`
}
