package exchange

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/Azure/go-ntlmssp"
	"github.com/masterzen/winrm"
	"github.com/masterzen/winrm/soap"
)

// target is one WinRM endpoint: a CAS name and how to reach it.
type target struct {
	// fqdn is the server's name, used in URLs, TLS verification and the
	// remote session's /PowerShell URI.
	fqdn string
	port int
}

func (t target) wsmanURL(https bool) string {
	scheme := "http"
	if https {
		scheme = "https"
	}
	return scheme + "://" + net.JoinHostPort(t.fqdn, fmt.Sprint(t.port)) + "/wsman"
}

// transport carries one worker's WS-Man requests (winrs.go; it is also
// the winrm.Transporter of a one-shot run). It differs from the
// library's transports where those are unsafe for a long-lived worker
// (reference/winrm.md §7): a non-200 answer is an error carrying the
// fault, not an empty success; NTLM is safe because each of the two lanes
// (Receive, and everything else) is one TCP connection, so the NTLM legs
// of a handshake can never land on different connections; and a worker
// context aborts an outstanding long poll at once when the worker is killed.
//
// NTLM over plain HTTP seals every body (see sealedLane): each lane then
// carries its own NTLM security context on its one connection.
type transport struct {
	url        string
	user, pass string
	ntlm       bool
	recv       *http.Client
	other      *http.Client
	// sealRecv and sealOther replace recv and other when bodies are sealed.
	sealRecv, sealOther *sealedLane
	// ctx bounds every request; cancelling it kills the worker's I/O.
	ctx        context.Context
	roundTrips *atomic.Int64
}

var _ winrm.Transporter = (*transport)(nil)

// transportConfig is what every transport of a pool shares.
type transportConfig struct {
	https     bool
	ntlm      bool
	user      string
	pass      string
	tls       *tls.Config
	proxy     func(*http.Request) (*url.URL, error)
	resolve   map[string]string // fqdn → host:port actually dialled
	opTimeout time.Duration
}

func newTransport(ctx context.Context, cfg transportConfig, t target, roundTrips *atomic.Int64) *transport {
	seal := cfg.ntlm && !cfg.https
	url := t.wsmanURL(cfg.https)
	lane := func() (*http.Client, *http.Transport) {
		dialer := &net.Dialer{Timeout: 15 * time.Second, KeepAlive: 30 * time.Second}
		tr := &http.Transport{
			Proxy: cfg.proxy,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				if host, _, err := net.SplitHostPort(addr); err == nil {
					if to, ok := cfg.resolve[strings.ToLower(host)]; ok {
						addr = to
					}
				}
				return dialer.DialContext(ctx, network, addr)
			},
			TLSClientConfig:       cfg.tls.Clone(),
			MaxConnsPerHost:       1,
			MaxIdleConnsPerHost:   1,
			IdleConnTimeout:       5 * time.Minute,
			TLSHandshakeTimeout:   15 * time.Second,
			ResponseHeaderTimeout: cfg.opTimeout + 30*time.Second,
			ForceAttemptHTTP2:     false,
		}
		if tr.TLSClientConfig != nil {
			tr.TLSClientConfig.ServerName = t.fqdn
		}
		var rt http.RoundTripper = tr
		if cfg.ntlm && !seal {
			rt = &ntlmssp.Negotiator{RoundTripper: tr}
		}
		return &http.Client{Transport: rt}, tr
	}
	tp := &transport{url: url, user: cfg.user, pass: cfg.pass, ntlm: cfg.ntlm, ctx: ctx, roundTrips: roundTrips}
	if seal {
		sealed := func() *sealedLane {
			c, tr := lane()
			return &sealedLane{url: url, user: cfg.user, pass: cfg.pass, client: c, closeIdle: tr.CloseIdleConnections}
		}
		tp.sealRecv, tp.sealOther = sealed(), sealed()
		return tp
	}
	tp.recv, _ = lane()
	tp.other, _ = lane()
	return tp
}

// Transport is part of winrm.Transporter; everything was built in newTransport.
func (t *transport) Transport(*winrm.Endpoint) error { return nil }

const receiveAction = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Receive"

// Post sends one WS-Man request and returns the response body, or an
// error that says what went wrong in terms callers can act on.
func (t *transport) Post(_ *winrm.Client, m *soap.SoapMessage) (string, error) {
	b, err := t.post(m.String())
	return string(b), err
}

// send is Post for easguard's own WinRS requests (winrs.go): it frees the
// message and returns the body as it was read, without a copy.
func (t *transport) send(m *soap.SoapMessage) ([]byte, error) {
	defer m.Free()
	return t.post(m.String())
}

// post sends one WS-Man request body and returns the response body.
func (t *transport) post(body string) ([]byte, error) {
	if t.sealRecv != nil {
		return t.postSealed(body)
	}
	client := t.other
	if strings.Contains(body, receiveAction+"<") {
		client = t.recv
	}
	req, err := http.NewRequestWithContext(t.ctx, http.MethodPost, t.url, strings.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("%w: build request: %w", ErrInvalid, err)
	}
	req.Header.Set("Content-Type", "application/soap+xml;charset=UTF-8")
	req.SetBasicAuth(t.user, t.pass)
	resp, err := client.Do(req)
	t.roundTrips.Add(1)
	if err != nil {
		return nil, transportError(err)
	}
	defer resp.Body.Close()
	b, err := readBody(resp)
	if err != nil {
		return nil, fmt.Errorf("%w: read response: %w", ErrTransient, err)
	}
	if resp.StatusCode == http.StatusUnauthorized {
		return nil, fmt.Errorf("%w: the server answered 401 Unauthorized (user %q, %s)", ErrAuth, t.user, scheme(t.ntlm))
	}
	if !strings.Contains(resp.Header.Get("Content-Type"), "application/soap+xml") {
		return nil, fmt.Errorf("%w: HTTP %d without a SOAP body from %s", ErrTransient, resp.StatusCode, t.url)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, parseFault(resp.StatusCode, b)
	}
	return b, nil
}

// postSealed is Post for NTLM over plain HTTP: the body travels sealed and
// the answer is unsealed and its signature checked before it is parsed.
func (t *transport) postSealed(body string) ([]byte, error) {
	lane := t.sealOther
	if strings.Contains(body, receiveAction+"<") {
		lane = t.sealRecv
	}
	status, ctype, b, err := lane.post(t.ctx, []byte(body))
	t.roundTrips.Add(1)
	if err != nil {
		return nil, err
	}
	if status == http.StatusUnauthorized {
		return nil, fmt.Errorf("%w: the server answered 401 Unauthorized (user %q, NTLM with message sealing)", ErrAuth, t.user)
	}
	if !strings.Contains(ctype, "application/soap+xml") {
		return nil, fmt.Errorf("%w: HTTP %d without a SOAP body from %s", ErrTransient, status, t.url)
	}
	if status != http.StatusOK {
		return nil, parseFault(status, b)
	}
	return b, nil
}

// maxBody is the most of a response body that is read; the client asks
// for envelopes of 153,600 bytes.
const maxBody = 16 << 20

// readBody reads a response body, up to maxBody bytes, into one buffer of
// the announced length where there is one: a Receive answer is about
// 150 kB, which io.ReadAll would grow to in a dozen copies.
func readBody(resp *http.Response) ([]byte, error) {
	return readBodyInto(resp, nil)
}

// readBodyInto is readBody into buf when it is large enough.
func readBodyInto(resp *http.Response, buf []byte) ([]byte, error) {
	if n := resp.ContentLength; n > 0 && n <= maxBody {
		b := buf[:0]
		if int64(cap(b)) < n {
			b = make([]byte, n)
		}
		b = b[:n]
		_, err := io.ReadFull(resp.Body, b)
		return b, err
	}
	return io.ReadAll(io.LimitReader(resp.Body, maxBody))
}

// sealedBodies holds the buffers a sealed lane reads its answers into: a
// sealed answer is unsealed into a buffer of its own (ntlmssp's Unwrap
// copies it), after which the sealed one is garbage, and a listing reads
// hundreds of answers of about 150 kB each.
var sealedBodies sync.Pool

// maxPooledBody is the largest buffer sealedBodies keeps: a larger answer
// is rare and would pin its size in the pool.
const maxPooledBody = 1 << 20

// sealedBody returns a buffer for a sealed answer.
func sealedBody() []byte {
	if b, ok := sealedBodies.Get().(*[]byte); ok {
		return *b
	}
	return nil
}

// overlaps reports whether a and b share memory: a sealed answer's buffer
// goes back to the pool only when the plaintext is not in it, so that an
// ntlmssp that unsealed in place would cost the pool, not the answer.
func overlaps(a, b []byte) bool {
	if cap(a) == 0 || cap(b) == 0 {
		return false
	}
	a0, b0 := uintptr(unsafe.Pointer(unsafe.SliceData(a))), uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	return a0 < b0+uintptr(cap(b)) && b0 < a0+uintptr(cap(a))
}

// releaseSealedBody gives a sealed answer's buffer back once nothing refers to it.
func releaseSealedBody(b []byte) {
	if cap(b) == 0 || cap(b) > maxPooledBody {
		return
	}
	b = b[:0]
	sealedBodies.Put(&b)
}

func scheme(ntlm bool) string {
	if ntlm {
		return "NTLM"
	}
	return "Basic"
}

// transportError classifies a failed HTTP exchange.
func transportError(err error) error {
	var uerr x509.UnknownAuthorityError
	var herr x509.HostnameError
	var cerr *tls.CertificateVerificationError
	switch {
	case errors.As(err, &uerr), errors.As(err, &herr), errors.As(err, &cerr):
		return fmt.Errorf("%w: %w", ErrTLS, err)
	case errors.Is(err, context.Canceled):
		return fmt.Errorf("%w: worker stopped: %w", ErrTransient, err)
	}
	var nerr net.Error
	var oerr *net.OpError
	if errors.As(err, &oerr) || (errors.As(err, &nerr) && nerr.Timeout()) {
		return fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	return fmt.Errorf("%w: %w", ErrTransient, err)
}

// FaultError is a WS-Man fault: HTTP 500 with a SOAP fault body.
type FaultError struct {
	Status  int
	Code    uint32
	Subcode string
	Reason  string
	kind    error
}

func (e *FaultError) Error() string {
	return fmt.Sprintf("WS-Man fault %d (%s): %s", e.Code, e.Subcode, strings.TrimSpace(e.Reason))
}

// Unwrap returns the fault's kind.
func (e *FaultError) Unwrap() error { return e.kind }

// RetryAfter is the back-off for a quota fault.
func (e *FaultError) RetryAfter() time.Duration {
	if errors.Is(e.kind, ErrThrottled) {
		return 30 * time.Second
	}
	return 0
}

// WS-Man fault codes the pool reacts to (reference/winrm.md §3.3, §5.6).
const (
	faultTimedOut      = 2150858793
	faultShellNotFound = 2150858843
	faultShellQuota    = 2150859174
)

func parseFault(status int, body []byte) error {
	var env struct {
		Fault struct {
			Subcode string `xml:"Code>Subcode>Value"`
			Reason  string `xml:"Reason>Text"`
			Detail  struct {
				WSManFault struct {
					Code    uint32 `xml:"Code,attr"`
					Message string `xml:"Message"`
				} `xml:"WSManFault"`
			} `xml:"Detail"`
		} `xml:"Body>Fault"`
	}
	_ = xml.Unmarshal(body, &env)
	f := &FaultError{Status: status, Code: env.Fault.Detail.WSManFault.Code, Subcode: env.Fault.Subcode, Reason: env.Fault.Reason}
	if f.Reason == "" {
		f.Reason = env.Fault.Detail.WSManFault.Message
	}
	switch f.Code {
	case faultTimedOut:
		// The long poll's "no output yet": the reason text contains
		// "OperationTimeout", which is how the winrm client recognises it.
		f.kind = ErrTransient
	case faultShellQuota:
		f.kind = ErrThrottled
	default:
		f.kind = ErrTransient
	}
	return f
}
