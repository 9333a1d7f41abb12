package winauth

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/bodgit/ntlmssp"
)

// The published example of MS-NLMP 4.2.4 (NTLMv2 with key exchange): the
// server's context, derived from the client's exported session key, must
// unseal the client's sealed "Plaintext" and accept its signature.
func TestSealSessionVectorsFromMSNLMP(t *testing.T) {
	const flags = 0xe28a8233 // 4.2.4: KEY_EXCH, 56, 128, VERSION, TARGET_INFO, ESS, ..., SEAL, SIGN, UNICODE
	base := sessionBaseKey(mustHex(t, vecResponseKeyNT), mustHex(t, vecNTProofStr))
	if got := hex.EncodeToString(base); got != "8de40ccadbc14a82f15cb0ad0de95ca3" {
		t.Fatalf("SessionBaseKey = %s", got)
	}
	exported, err := exportedSessionKey(flags, base, mustHex(t, "c5dad2544fc9799094ce1ce90bc9d03e"))
	if err != nil || !bytes.Equal(exported, bytes.Repeat([]byte{0x55}, 16)) {
		t.Fatalf("ExportedSessionKey = %x, %v", exported, err)
	}
	s, err := newSealSession(flags, exported)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := s.unseal(mustHex(t, "010000007fb38ec5c55d497600000000"), mustHex(t, "54e50165bf1936dc996020c1811b0f06fb5f"))
	if err != nil {
		t.Fatal(err)
	}
	if want := utf16le("Plaintext"); !bytes.Equal(plain, want) {
		t.Fatalf("unsealed %x, want %x", plain, want)
	}
}

// sealedClient is a sealing client built from bodgit/ntlmssp, the library
// masterzen/winrm and easguard use, talking to the middleware over one
// connection.
type sealedClient struct {
	t    *testing.T
	url  string
	http *http.Client
	sec  *ntlmssp.SecuritySession
}

func newSealedClient(t *testing.T, url, user, password string) *sealedClient {
	t.Helper()
	c := &sealedClient{t: t, url: url, http: &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1}}}
	t.Cleanup(c.http.CloseIdleConnections)
	nc, err := ntlmssp.NewClient(ntlmssp.SetUserInfo(user, password), ntlmssp.SetVersion(ntlmssp.DefaultVersion()))
	if err != nil {
		t.Fatal(err)
	}
	negotiate, _ := nc.Authenticate(nil, nil)
	resp := c.leg(negotiate)
	token := strings.TrimPrefix(resp.Header.Get("WWW-Authenticate"), "Negotiate ")
	challenge, err := base64.StdEncoding.DecodeString(token)
	if resp.StatusCode != http.StatusUnauthorized || err != nil {
		t.Fatalf("NEGOTIATE answered %d %q", resp.StatusCode, token)
	}
	authenticate, err := nc.Authenticate(challenge, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp := c.leg(authenticate); resp.StatusCode != http.StatusOK {
		t.Fatalf("AUTHENTICATE on an empty POST answered %d, want 200", resp.StatusCode)
	}
	if c.sec = nc.SecuritySession(); c.sec == nil {
		t.Fatal("no security context")
	}
	return c
}

func (c *sealedClient) leg(token []byte) *http.Response {
	c.t.Helper()
	req, _ := http.NewRequest(http.MethodPost, c.url, http.NoBody)
	req.Header.Set("Authorization", "Negotiate "+base64.StdEncoding.EncodeToString(token))
	resp, err := c.http.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp
}

// seal returns msg framed as a session-encrypted body.
func (c *sealedClient) seal(msg []byte) []byte {
	sealed, signature, err := c.sec.Wrap(msg)
	if err != nil {
		c.t.Fatal(err)
	}
	return frameSealed(signature, sealed, len(msg))
}

// post sends a session-encrypted body and returns the status and, for a
// sealed answer, the unsealed body.
func (c *sealedClient) post(body []byte) (int, []byte) {
	c.t.Helper()
	req, _ := http.NewRequest(http.MethodPost, c.url, bytes.NewReader(body))
	req.Header.Set("Content-Type", sealContentType)
	resp, err := c.http.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if !isSealedContent(resp.Header.Get("Content-Type")) {
		return resp.StatusCode, nil
	}
	signature, sealed, length, err := parseSealed(raw)
	if err != nil {
		c.t.Fatal(err)
	}
	plain, err := c.sec.Unwrap(sealed, signature)
	if err != nil || len(plain) != length {
		c.t.Fatalf("answer does not unseal: %v (length %d, header %d)", err, len(plain), length)
	}
	return resp.StatusCode, plain
}

// A sealed request reaches the handler as plaintext and its answer comes
// back sealed; a tampered, replayed or unauthenticated one is refused and
// never reaches the handler.
func TestSealedMessages(t *testing.T) {
	var served atomic.Int64
	var failures []error
	h := Middleware(StaticAccounts{"Alice": "secret"}, Options{NTLM: true, OnFailure: func(_ *http.Request, err error) { failures = append(failures, err) }},
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			served.Add(1)
			body, _ := io.ReadAll(r.Body)
			w.Header().Set("Content-Type", "application/soap+xml;charset=UTF-8")
			w.WriteHeader(http.StatusInternalServerError) // a fault is sealed too
			_, _ = io.WriteString(w, "echo:"+string(body))
		}))
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ConnContext = ConnContext
	srv.Start()
	t.Cleanup(srv.Close)

	t.Run("round trip", func(t *testing.T) {
		c := newSealedClient(t, srv.URL, "Alice", "secret")
		for i := range 3 { // sequence numbers advance in both directions
			msg := []byte(strings.Repeat("<s:Envelope/>", i+1))
			status, plain := c.post(c.seal(msg))
			if status != http.StatusInternalServerError || string(plain) != "echo:"+string(msg) {
				t.Fatalf("message %d: %d %q", i, status, plain)
			}
		}
	})
	refused := []struct {
		name   string
		body   func(c *sealedClient) []byte
		reason error
	}{
		{"ciphertext changed", func(c *sealedClient) []byte {
			b := c.seal([]byte("<s:Envelope/>"))
			b[len(b)-len("--Encrypted Boundary--\r\n")-1] ^= 1
			return b
		}, errBadSignature},
		{"signature changed", func(c *sealedClient) []byte {
			b := c.seal([]byte("<s:Envelope/>"))
			i := bytes.Index(b, []byte("octet-stream\r\n")) + len("octet-stream\r\n") + 4 + 5
			b[i] ^= 1
			return b
		}, errBadSignature},
		{"replayed", func(c *sealedClient) []byte {
			b := c.seal([]byte("<s:Envelope/>"))
			if status, _ := c.post(b); status != http.StatusInternalServerError {
				t.Fatalf("first send answered %d", status)
			}
			return b
		}, errBadSignature}, // the RC4 stream has moved on, so the checksum fails first
		{"length header wrong", func(c *sealedClient) []byte {
			return bytes.Replace(c.seal([]byte("<s:Envelope/>")), []byte("Length=13"), []byte("Length=12"), 1)
		}, errBadLength},
	}
	for _, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			c := newSealedClient(t, srv.URL, "Alice", "secret")
			body := tc.body(c)
			before := served.Load()
			failures = nil
			if status, _ := c.post(body); status != http.StatusBadRequest {
				t.Fatalf("status %d, want 400", status)
			}
			if served.Load() != before {
				t.Fatal("a refused message reached the handler")
			}
			if len(failures) != 1 || !errors.Is(failures[0], tc.reason) {
				t.Fatalf("failures %v, want %v", failures, tc.reason)
			}
		})
	}
	t.Run("no security context", func(t *testing.T) {
		c := newSealedClient(t, srv.URL, "Alice", "secret")
		body := c.seal([]byte("<s:Envelope/>"))
		other := &http.Client{} // a new connection the server has not authenticated
		t.Cleanup(other.CloseIdleConnections)
		req, _ := http.NewRequestWithContext(context.Background(), http.MethodPost, srv.URL, bytes.NewReader(body))
		req.Header.Set("Content-Type", sealContentType)
		resp, err := other.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("status %d, want 401", resp.StatusCode)
		}
	})
}
