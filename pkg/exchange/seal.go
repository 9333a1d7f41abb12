package exchange

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/bodgit/ntlmssp"
)

// sealedLane is one lane of a worker's transport when NTLM runs over plain
// HTTP: every WS-Man body is sealed and signed with NTLM session security
// (MS-WSMV "session-encrypted" messages, reference/winrm.md §4.6), because
// WinRM's default AllowUnencrypted=false refuses anything else over HTTP.
//
// Why not the library's winrm.Encryption: it runs a new NTLM handshake for
// every message on a bare http.Client (so it ignores our TLS, proxy and
// name-resolution settings and the one-connection lanes, and its two
// requests per message may land on different pooled connections, #142),
// it returns a non-200 answer as a normal body, and when the handshake fails
// it silently falls back to plain NTLM, sending the body in the clear. None
// of that can be changed from outside. So the lane keeps our own transport's
// properties (one TCP connection, errors for non-200, the worker context)
// and borrows only the cryptography: bodgit/ntlmssp (the library's own
// dependency) runs the handshake and its SecuritySession seals, signs,
// unseals and checks signatures with per-direction sequence numbers. The
// MIME framing is written here because bodgit's http.Wrap frames the
// binary part line by line and can mangle ciphertext that happens to
// contain CR LF sequences.
//
// One lane is one TCP connection and one NTLM security context: the RC4
// streams and sequence numbers only stay in step with the server's if
// messages are sealed, sent and answered one at a time in order, so the
// lane's mutex is held for a whole exchange. When the server no longer
// knows the context (a new connection after the old one closed, or any
// error that may have desynchronised the streams) the lane forgets it and
// authenticates again on its next message.
type sealedLane struct {
	url        string
	user, pass string
	client     *http.Client
	closeIdle  func()

	mu  sync.Mutex
	sec *ntlmssp.SecuritySession // nil until a handshake succeeded
}

// Wire names of MS-WSMV session-encrypted messages (reference/winrm.md §4.6).
const (
	sealProtocol    = "application/HTTP-SPNEGO-session-encrypted"
	sealBoundary    = "Encrypted Boundary"
	sealContentType = `multipart/encrypted;protocol="` + sealProtocol + `";boundary="` + sealBoundary + `"`
	soapContentType = "application/soap+xml;charset=UTF-8"
	ntlmSignLen     = 16
	// flagSeal is NTLMSSP_NEGOTIATE_SEAL (MS-NLMP 2.2.2.5).
	flagSeal = 0x00000020
)

// errNoSeal means the server did not agree to seal messages.
var errNoSeal = errors.New("the server did not agree to NTLM message sealing")

// post sends one sealed WS-Man request and returns the unsealed answer with
// its HTTP status and content type.
func (l *sealedLane) post(ctx context.Context, body []byte) (int, string, []byte, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for attempt := 0; ; attempt++ {
		if l.sec == nil {
			if err := l.handshake(ctx); err != nil {
				return 0, "", nil, err
			}
		}
		status, ctype, out, err := l.exchange(ctx, body)
		if err != nil {
			l.forget()
			return 0, "", nil, err
		}
		if status == http.StatusUnauthorized && attempt == 0 {
			// The server does not know this context: the connection it
			// belonged to is gone and the message arrived on a new one, or
			// the server dropped it. The message was not processed, so
			// authenticating again and resending it is safe.
			l.forget()
			continue
		}
		if status == http.StatusUnauthorized {
			l.forget()
		}
		return status, ctype, out, nil
	}
}

// forget drops the security context and the connection it lives on, so
// that the next message starts a fresh handshake on a fresh connection.
func (l *sealedLane) forget() {
	l.sec = nil
	l.closeIdle()
}

// handshake authenticates the lane's connection with NTLM on empty POSTs,
// so that no WS-Man body ever travels before it can be sealed, and keeps the
// resulting security context.
func (l *sealedLane) handshake(ctx context.Context) error {
	user, domain := splitLogon(l.user)
	nc, err := ntlmssp.NewClient(ntlmssp.SetUserInfo(user, l.pass), ntlmssp.SetDomain(domain), ntlmssp.SetVersion(ntlmssp.DefaultVersion()))
	if err != nil {
		return fmt.Errorf("%w: NTLM client: %w", ErrInvalid, err)
	}
	negotiate, err := nc.Authenticate(nil, nil)
	if err != nil {
		return fmt.Errorf("%w: NTLM NEGOTIATE: %w", ErrInvalid, err)
	}
	resp, err := l.authLeg(ctx, negotiate)
	if err != nil {
		return err
	}
	challenge, ok := negotiateToken(resp.Header)
	if resp.StatusCode != http.StatusUnauthorized || !ok {
		return fmt.Errorf("%w: the server answered the NTLM NEGOTIATE with HTTP %d and no NTLM challenge (%s)", ErrAuth, resp.StatusCode, l.url)
	}
	if len(challenge) < 24 || binary.LittleEndian.Uint32(challenge[20:24])&flagSeal == 0 {
		return fmt.Errorf("%w: %w (%s)", ErrAuth, errNoSeal, l.url)
	}
	authenticate, err := nc.Authenticate(challenge, nil)
	if err != nil {
		return fmt.Errorf("%w: NTLM CHALLENGE from %s: %w", ErrAuth, l.url, err)
	}
	resp, err = l.authLeg(ctx, authenticate)
	if err != nil {
		return err
	}
	switch {
	case resp.StatusCode == http.StatusUnauthorized:
		return fmt.Errorf("%w: the server answered 401 Unauthorized (user %q, NTLM with message sealing)", ErrAuth, l.user)
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("%w: HTTP %d to the NTLM AUTHENTICATE from %s", ErrTransient, resp.StatusCode, l.url)
	case nc.SecuritySession() == nil:
		return fmt.Errorf("%w: %w (%s)", ErrAuth, errNoSeal, l.url)
	}
	l.sec = nc.SecuritySession()
	return nil
}

// authLeg sends one handshake leg: an empty POST carrying an NTLM token.
func (l *sealedLane) authLeg(ctx context.Context, token []byte) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, l.url, http.NoBody)
	if err != nil {
		return nil, fmt.Errorf("%w: build request: %w", ErrInvalid, err)
	}
	req.Header.Set("Content-Type", soapContentType)
	req.Header.Set("Authorization", "Negotiate "+base64.StdEncoding.EncodeToString(token))
	resp, err := l.client.Do(req)
	if err != nil {
		l.forget()
		return nil, transportError(err)
	}
	// Drain the body so the next leg reuses the connection: NTLM
	// authenticates the connection, not the request.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	_ = resp.Body.Close()
	return resp, nil
}

// exchange seals body, sends it and unseals the answer. A 401 comes back
// as a status for post to handle; an answer that is not sealed, fails its
// signature or has the wrong length is an error.
func (l *sealedLane) exchange(ctx context.Context, body []byte) (int, string, []byte, error) {
	sealed, signature, err := l.sec.Wrap(body)
	if err != nil {
		return 0, "", nil, fmt.Errorf("%w: seal request: %w", ErrInvalid, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, l.url, bytes.NewReader(frameSealed(signature, sealed, len(body))))
	if err != nil {
		return 0, "", nil, fmt.Errorf("%w: build request: %w", ErrInvalid, err)
	}
	req.Header.Set("Content-Type", sealContentType)
	resp, err := l.client.Do(req)
	if err != nil {
		return 0, "", nil, transportError(err)
	}
	defer resp.Body.Close()
	raw, err := readBodyInto(resp, sealedBody())
	// raw goes back to the pool on the way out, unless the answer is raw
	// itself (unsealed) or shares its memory.
	var answer []byte
	defer func() {
		if !overlaps(answer, raw) {
			releaseSealedBody(raw)
		}
	}()
	if err != nil {
		return 0, "", nil, fmt.Errorf("%w: read response: %w", ErrTransient, err)
	}
	if resp.StatusCode == http.StatusUnauthorized {
		return resp.StatusCode, "", nil, nil
	}
	ctype := resp.Header.Get("Content-Type")
	if !isSealed(ctype) {
		if resp.StatusCode == http.StatusOK {
			return 0, "", nil, fmt.Errorf("%w: %s answered a sealed request without sealing its answer", ErrTransient, l.url)
		}
		// An error the server could not or did not seal (e.g. a refused
		// message); callers see its status.
		answer = raw
		return resp.StatusCode, ctype, raw, nil
	}
	signature, sealed, length, err := unframeSealed(raw)
	if err != nil {
		return 0, "", nil, fmt.Errorf("%w: sealed answer from %s: %w", ErrTransient, l.url, err)
	}
	plain, err := l.sec.Unwrap(sealed, signature) // unsealed into a copy of its own
	answer = plain
	if err != nil {
		return 0, "", nil, fmt.Errorf("%w: the answer from %s failed the NTLM signature check: %w", ErrTransient, l.url, err)
	}
	if len(plain) != length {
		return 0, "", nil, fmt.Errorf("%w: sealed answer from %s is %d bytes, its header says %d", ErrTransient, l.url, len(plain), length)
	}
	return resp.StatusCode, soapContentType, plain, nil
}

// splitLogon turns DOMAIN\user into its parts; user@domain and a bare name
// go to NTLM unchanged with no domain, which Windows accepts.
func splitLogon(logon string) (user, domain string) {
	if d, u, ok := strings.Cut(logon, `\`); ok {
		return u, d
	}
	return logon, ""
}

// negotiateToken returns the NTLM token of a "WWW-Authenticate: Negotiate
// <token>" header.
func negotiateToken(h http.Header) ([]byte, bool) {
	for _, v := range h.Values("WWW-Authenticate") {
		scheme, token, ok := strings.Cut(strings.TrimSpace(v), " ")
		if !ok || !strings.EqualFold(scheme, "Negotiate") {
			continue
		}
		b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(token))
		if err == nil {
			return b, true
		}
	}
	return nil, false
}

// isSealed reports whether a Content-Type names session-encrypted content.
func isSealed(ctype string) bool {
	mt, params, err := mime.ParseMediaType(ctype)
	return err == nil && strings.EqualFold(mt, "multipart/encrypted") && strings.EqualFold(params["protocol"], sealProtocol)
}

// frameSealed builds the MS-WSMV multipart body of a sealed message: a
// header part naming the original content and its length, then the
// octet-stream part holding the signature length, the signature and the
// sealed bytes, then the closing boundary.
func frameSealed(signature, sealed []byte, plainLen int) []byte {
	var b bytes.Buffer
	b.WriteString("--" + sealBoundary + "\r\n")
	b.WriteString("\tContent-Type: " + sealProtocol + "\r\n")
	b.WriteString("\tOriginalContent: type=" + soapContentType + ";Length=" + strconv.Itoa(plainLen) + "\r\n")
	b.WriteString("--" + sealBoundary + "\r\n")
	b.WriteString("\tContent-Type: application/octet-stream\r\n")
	var n [4]byte
	binary.LittleEndian.PutUint32(n[:], uint32(len(signature)))
	b.Write(n[:])
	b.Write(signature)
	b.Write(sealed)
	b.WriteString("--" + sealBoundary + "--\r\n")
	return b.Bytes()
}

// unframeSealed takes a sealed message apart; it reads the octet-stream
// part by position, never line by line, because ciphertext may contain
// anything.
func unframeSealed(raw []byte) (signature, sealed []byte, length int, err error) {
	open := []byte("--" + sealBoundary + "\r\n")
	end := []byte("--" + sealBoundary + "--\r\n")
	if !bytes.HasPrefix(raw, open) {
		return nil, nil, 0, errors.New("does not start with the MIME boundary")
	}
	rest := raw[len(open):]
	i := bytes.Index(rest, open)
	if i < 0 {
		return nil, nil, 0, errors.New("no second MIME part")
	}
	header, rest := rest[:i], rest[i+len(open):]
	_, lenText, ok := bytes.Cut(header, []byte("Length="))
	if !ok {
		return nil, nil, 0, errors.New("no OriginalContent length")
	}
	if length, err = strconv.Atoi(string(bytes.TrimSpace(lenText))); err != nil || length < 0 {
		return nil, nil, 0, fmt.Errorf("bad OriginalContent length %q", bytes.TrimSpace(lenText))
	}
	_, rest, ok = bytes.Cut(rest, []byte("application/octet-stream\r\n"))
	if !ok {
		return nil, nil, 0, errors.New("no octet-stream part")
	}
	rest, ok = bytes.CutSuffix(rest, end)
	if !ok {
		return nil, nil, 0, errors.New("no closing MIME boundary")
	}
	if len(rest) < 4 {
		return nil, nil, 0, errors.New("truncated")
	}
	n := int(binary.LittleEndian.Uint32(rest[:4]))
	if n != ntlmSignLen || len(rest) < 4+n {
		return nil, nil, 0, fmt.Errorf("signature of %d bytes", n)
	}
	return rest[4 : 4+n], rest[4+n:], length, nil
}
