package winauth

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// mustHex decodes a hex test vector, ignoring spaces.
func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

// MS-NLMP 4.2.4 (NTLMv2 authentication) test vectors.
const (
	vecUser            = "User"
	vecDomain          = "Domain"
	vecPassword        = "Password"
	vecServerChallenge = "0123456789abcdef"
	vecNTHash          = "a4f49c406510bdcab6824ee7c30fd852"        // 4.2.2.1.2 NTOWFv1("Password")
	vecResponseKeyNT   = "0c868a403bfd7a93a3001ef22ef02e3f"        // 4.2.4.1.1 NTOWFv2
	vecNTProofStr      = "68cd0ab851e51c96aabc927bebef6a1c"        // 4.2.4.2.2
	vecBlob            = "0101000000000000" + "0000000000000000" + // RespType, HiRespType, reserved; Time = 0
		"aaaaaaaaaaaaaaaa" + "00000000" + // ClientChallenge, Reserved3
		"02000c0044006f006d00610069006e00" + // MsvAvNbDomainName "Domain"
		"01000c0053006500720076006500720000000000" + // MsvAvNbComputerName "Server", MsvAvEOL
		"00000000" // trailing Reserved4
)

func TestNTLMv2VectorsFromMSNLMP(t *testing.T) {
	var challenge [8]byte
	copy(challenge[:], mustHex(t, vecServerChallenge))
	response := append(mustHex(t, vecNTProofStr), mustHex(t, vecBlob)...)

	if got := hex.EncodeToString(ntHash(vecPassword)); got != vecNTHash {
		t.Fatalf("NTOWFv1 = %s, want %s", got, vecNTHash)
	}
	key := ntowfv2(vecPassword, vecUser, vecDomain)
	if got := hex.EncodeToString(key); got != vecResponseKeyNT {
		t.Fatalf("NTOWFv2 = %s, want %s", got, vecResponseKeyNT)
	}
	if err := verifyNTLMv2(key, challenge, response); err != nil {
		t.Fatalf("published NTLMv2 response rejected: %v", err)
	}

	flip := func(b []byte, i int) []byte {
		c := bytes.Clone(b)
		c[i] ^= 0x01
		return c
	}
	otherChallenge := challenge
	otherChallenge[7] ^= 0xff
	cases := []struct {
		name      string
		key       []byte
		challenge [8]byte
		response  []byte
		wantErr   error
	}{
		{"user name is case-insensitive", ntowfv2(vecPassword, "USER", vecDomain), challenge, response, nil},
		{"wrong password", ntowfv2("password", vecUser, vecDomain), challenge, response, errBadProof},
		{"domain is case-sensitive", ntowfv2(vecPassword, vecUser, "DOMAIN"), challenge, response, errBadProof},
		{"empty domain", ntowfv2(vecPassword, vecUser, ""), challenge, response, errBadProof},
		{"other server challenge", key, otherChallenge, response, errBadProof},
		{"tampered NTProofStr", key, challenge, flip(response, 3), errBadProof},
		{"tampered blob timestamp", key, challenge, flip(response, 16+8), errBadProof},
		{"tampered target info", key, challenge, flip(response, len(response)-10), errBadProof},
		{"truncated", key, challenge, response[:16+minBlobLen-1], errMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := verifyNTLMv2(tc.key, tc.challenge, tc.response); !errors.Is(err, tc.wantErr) {
				t.Fatalf("verifyNTLMv2 = %v, want %v", err, tc.wantErr)
			}
		})
	}
}

func TestBuildChallenge(t *testing.T) {
	var challenge [8]byte
	copy(challenge[:], mustHex(t, vecServerChallenge))
	now := time.Date(2024, 5, 6, 7, 8, 9, 123456700, time.UTC)
	id := serverIdentity{nbDomain: "CONTOSO", dnsDomain: "contoso.com", nbComputer: "EX01", dnsComputer: "ex01.contoso.com"}
	msg := buildChallenge(challenge, id, now)

	if !bytes.Equal(msg[:8], []byte("NTLMSSP\x00")) || binary.LittleEndian.Uint32(msg[8:12]) != 2 {
		t.Fatalf("header %x is not a CHALLENGE", msg[:12])
	}
	flags := binary.LittleEndian.Uint32(msg[20:24])
	const want = 0x00000001 | 0x00000004 | 0x00000200 | 0x00008000 | 0x00010000 |
		0x00080000 | 0x00800000 | 0x02000000 | 0x20000000 | 0x80000000
	if flags != want {
		t.Fatalf("flags = %#08x, want %#08x", flags, want)
	}
	if flags&(flagKeyExch|flagLMKey) != 0 {
		t.Fatalf("flags %#08x include KEY_EXCH or LM_KEY", flags)
	}
	if !bytes.Equal(msg[24:32], challenge[:]) {
		t.Fatalf("server challenge = %x, want %x", msg[24:32], challenge)
	}
	if !bytes.Equal(msg[48:56], []byte{10, 0, 0x63, 0x45, 0, 0, 0, 0x0f}) {
		t.Fatalf("version = %x, want 10.0.17763 rev 15", msg[48:56])
	}
	field := func(at int) []byte {
		l := int(binary.LittleEndian.Uint16(msg[at:]))
		o := int(binary.LittleEndian.Uint32(msg[at+4:]))
		return msg[o : o+l]
	}
	if got, err := decodeString(field(12), flagUnicode); err != nil || got != "CONTOSO" {
		t.Fatalf("TargetName = %q, %v; want CONTOSO", got, err)
	}

	type av struct {
		id    uint16
		value []byte
	}
	var ts [8]byte
	binary.LittleEndian.PutUint64(ts[:], fileTime(now))
	wantAVs := []av{
		{avNbDomainName, utf16le("CONTOSO")},
		{avNbComputerName, utf16le("EX01")},
		{avDNSDomainName, utf16le("contoso.com")},
		{avDNSComputerName, utf16le("ex01.contoso.com")},
		{avTimestamp, ts[:]},
		{avEOL, []byte{}},
	}
	info := field(40)
	var got []av
	for len(info) >= 4 {
		id, l := binary.LittleEndian.Uint16(info), int(binary.LittleEndian.Uint16(info[2:]))
		got = append(got, av{id, info[4 : 4+l]})
		info = info[4+l:]
	}
	if len(info) != 0 || len(got) != len(wantAVs) {
		t.Fatalf("TargetInfo has %d AV pairs and %d trailing bytes, want %d and 0", len(got), len(info), len(wantAVs))
	}
	for i := range wantAVs {
		if got[i].id != wantAVs[i].id || !bytes.Equal(got[i].value, wantAVs[i].value) {
			t.Fatalf("AV pair %d = %d:%x, want %d:%x", i, got[i].id, got[i].value, wantAVs[i].id, wantAVs[i].value)
		}
	}
}

func TestFileTime(t *testing.T) {
	cases := []struct {
		t    time.Time
		want uint64
	}{
		{time.Unix(0, 0), windowsEpochOffset},
		{time.Date(1601, 1, 1, 0, 0, 0, 0, time.UTC), 0},
		{time.Unix(1, 500), windowsEpochOffset + 10_000_005},
	}
	for _, tc := range cases {
		if got := fileTime(tc.t); got != tc.want {
			t.Errorf("fileTime(%v) = %d, want %d", tc.t, got, tc.want)
		}
	}
}

// authFields are the inputs of a hand-made AUTHENTICATE message.
type authFields struct {
	flags            uint32
	lm, nt           []byte
	domain, user, ws string
}

// marshalAuthenticate builds an AUTHENTICATE message the way MS-NLMP 2.2.1.3 lays it
// out, so that tests can send what no well-behaved client library would.
func marshalAuthenticate(t testing.TB, f authFields) []byte {
	t.Helper()
	enc := func(s string) []byte {
		if f.flags&flagUnicode != 0 {
			return utf16le(s)
		}
		return []byte(s)
	}
	payloads := [][]byte{f.lm, f.nt, enc(f.domain), enc(f.user), enc(f.ws), nil}
	msg := make([]byte, authenticateHeaderLen)
	copy(msg, ntlmSignature)
	binary.LittleEndian.PutUint32(msg[8:], msgAuthenticate)
	offset := authenticateHeaderLen
	for i, p := range payloads {
		putVarField(msg[12+8*i:], len(p), offset)
		offset += len(p)
	}
	binary.LittleEndian.PutUint32(msg[60:], f.flags)
	for _, p := range payloads {
		msg = append(msg, p...)
	}
	return msg
}

// ntlmv2Response computes a valid NtChallengeResponse for the given inputs.
func ntlmv2Response(password, user, domain string, challenge [8]byte) []byte {
	blob := []byte{1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	proof := hmacMD5(ntowfv2(password, user, domain), challenge[:], blob)
	return append(proof, blob...)
}

// connHarness drives the middleware directly with one simulated connection.
type connHarness struct {
	t        testing.TB
	h        http.Handler
	ctx      context.Context
	lastErr  error
	lastUser string
}

// newConnHarness builds an NTLM-only middleware with a single account "Alice".
// Its requests carry unsealed bodies over HTTP, so it allows unencrypted ones.
func newConnHarness(t testing.TB) *connHarness {
	t.Helper()
	c := &connHarness{t: t, ctx: ConnContext(context.Background(), nil)}
	opts := Options{NTLM: true, AllowUnencrypted: true, OnFailure: func(_ *http.Request, err error) { c.lastErr = err }}
	c.h = Middleware(StaticAccounts{"Alice": "secret"}, opts, http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
		c.lastUser = User(r.Context())
	}))
	return c
}

// send posts a request with the given Authorization value on the harness connection.
func (c *connHarness) send(authz string) *httptest.ResponseRecorder {
	c.t.Helper()
	c.lastErr, c.lastUser = nil, ""
	req := httptest.NewRequestWithContext(c.ctx, http.MethodPost, "/wsman", strings.NewReader("body"))
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	rec := httptest.NewRecorder()
	c.h.ServeHTTP(rec, req)
	return rec
}

// negotiate runs the NEGOTIATE leg and returns the server challenge.
func (c *connHarness) negotiate() [8]byte {
	c.t.Helper()
	neg := append(bytes.Clone(ntlmSignature), 1, 0, 0, 0, 0x01, 0x02, 0x08, 0xa0)
	rec := c.send("NTLM " + base64.StdEncoding.EncodeToString(neg))
	scheme, token, _ := strings.Cut(rec.Header().Get("WWW-Authenticate"), " ")
	msg, err := base64.StdEncoding.DecodeString(token)
	if rec.Code != http.StatusUnauthorized || scheme != "NTLM" || err != nil || len(msg) < 32 {
		c.t.Fatalf("NEGOTIATE: status %d, WWW-Authenticate %q", rec.Code, rec.Header().Get("WWW-Authenticate"))
	}
	var challenge [8]byte
	copy(challenge[:], msg[24:32])
	return challenge
}

func TestAuthenticateMessageHandling(t *testing.T) {
	const unicode = flagUnicode | flagNTLM | flagExtendedSessionSecurity
	cases := []struct {
		name    string
		build   func(t testing.TB, challenge [8]byte) []byte
		wantErr error // nil: accepted
	}{
		{"valid NTLMv2", func(t testing.TB, c [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: unicode, nt: ntlmv2Response("secret", "alice", "CONTOSO", c), domain: "CONTOSO", user: "alice"})
		}, nil},
		{"valid NTLMv2 with OEM strings", func(t testing.TB, c [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: flagNTLM, nt: ntlmv2Response("secret", "alice", "CONTOSO", c), domain: "CONTOSO", user: "alice"})
		}, nil},
		{"valid NTLMv2 for user@domain with empty domain", func(t testing.TB, c [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: unicode, nt: ntlmv2Response("secret", "alice@contoso.com", "", c), user: "alice@contoso.com"})
		}, nil},
		{"proof keyed with CONTOSO but domain field empty", func(t testing.TB, c [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: unicode, nt: ntlmv2Response("secret", "alice", "CONTOSO", c), user: "alice"})
		}, errBadProof},
		{"proof keyed with empty domain but domain field CONTOSO", func(t testing.TB, c [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: unicode, nt: ntlmv2Response("secret", "alice", "", c), domain: "CONTOSO", user: "alice"})
		}, errBadProof},
		{"wrong password", func(t testing.TB, c [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: unicode, nt: ntlmv2Response("Secret", "alice", "CONTOSO", c), domain: "CONTOSO", user: "alice"})
		}, errBadProof},
		{"unknown user", func(t testing.TB, c [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: unicode, nt: ntlmv2Response("secret", "mallory", "CONTOSO", c), domain: "CONTOSO", user: "mallory"})
		}, errUnknownUser},
		{"NTLMv1 response", func(t testing.TB, _ [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: unicode, lm: make([]byte, 24), nt: make([]byte, 24), domain: "CONTOSO", user: "alice"})
		}, errNTLMv1},
		{"LM-only response", func(t testing.TB, _ [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: unicode, lm: make([]byte, 24), domain: "CONTOSO", user: "alice"})
		}, errNTLMv1},
		{"anonymous", func(t testing.TB, _ [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: unicode | flagAnonymous, lm: []byte{0}})
		}, errAnonymous},
		{"anonymous flag with a user", func(t testing.TB, c [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: unicode | flagAnonymous, nt: ntlmv2Response("secret", "alice", "CONTOSO", c), domain: "CONTOSO", user: "alice"})
		}, errAnonymous},
		{"wrong blob version", func(t testing.TB, c [8]byte) []byte {
			nt := ntlmv2Response("secret", "alice", "CONTOSO", c)
			nt[16] = 2
			return marshalAuthenticate(t, authFields{flags: unicode, nt: nt, domain: "CONTOSO", user: "alice"})
		}, errMalformed},
		{"truncated header", func(t testing.TB, c [8]byte) []byte {
			return marshalAuthenticate(t, authFields{flags: unicode, user: "alice"})[:40]
		}, errMalformed},
		{"field outside the message", func(t testing.TB, c [8]byte) []byte {
			msg := marshalAuthenticate(t, authFields{flags: unicode, nt: ntlmv2Response("secret", "alice", "CONTOSO", c), domain: "CONTOSO", user: "alice"})
			binary.LittleEndian.PutUint32(msg[24:], uint32(len(msg)-4))
			return msg
		}, errMalformed},
		{"odd-length unicode user", func(t testing.TB, c [8]byte) []byte {
			msg := marshalAuthenticate(t, authFields{flags: unicode, nt: ntlmv2Response("secret", "alice", "CONTOSO", c), domain: "CONTOSO", user: "alice"})
			binary.LittleEndian.PutUint16(msg[36:], 9)
			return msg
		}, errMalformed},
		{"CHALLENGE sent by the client", func(t testing.TB, c [8]byte) []byte {
			return buildChallenge(c, serverIdentity{nbDomain: "X"}, time.Unix(0, 0))
		}, errUnexpectedType},
		{"SPNEGO NegTokenResp", func(t testing.TB, _ [8]byte) []byte {
			return []byte{0xa1, 0x07, 0x30, 0x05, 0xa0, 0x03, 0x0a, 0x01, 0x01}
		}, errNotNTLMSSP},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newConnHarness(t)
			challenge := h.negotiate()
			rec := h.send("NTLM " + base64.StdEncoding.EncodeToString(tc.build(t, challenge)))
			if tc.wantErr == nil {
				if rec.Code != http.StatusOK || h.lastUser != "Alice" {
					t.Fatalf("status %d, user %q, failure %v; want 200 as Alice", rec.Code, h.lastUser, h.lastErr)
				}
				if rec := h.send(""); rec.Code != http.StatusOK {
					t.Fatalf("follow-up on the authenticated connection: status %d", rec.Code)
				}
				return
			}
			if rec.Code != http.StatusUnauthorized || !errors.Is(h.lastErr, tc.wantErr) {
				t.Fatalf("status %d, failure %v; want 401 with %v", rec.Code, h.lastErr, tc.wantErr)
			}
			if rec.Body.Len() != 0 || len(rec.Header().Values("WWW-Authenticate")) != 2 {
				t.Fatalf("401 body %q, WWW-Authenticate %q; want empty body and both NTLM schemes", rec.Body, rec.Header().Values("WWW-Authenticate"))
			}
			// The failure must have reset the connection: the challenge is spent.
			valid := marshalAuthenticate(t, authFields{flags: unicode, nt: ntlmv2Response("secret", "alice", "CONTOSO", challenge), domain: "CONTOSO", user: "alice"})
			if rec := h.send("NTLM " + base64.StdEncoding.EncodeToString(valid)); rec.Code != http.StatusUnauthorized || !errors.Is(h.lastErr, errNoChallenge) {
				t.Fatalf("AUTHENTICATE after a failure: status %d, failure %v; want 401 without a pending challenge", rec.Code, h.lastErr)
			}
		})
	}
}

func TestMalformedTokens(t *testing.T) {
	cases := []struct {
		name    string
		authz   string
		wantErr error
	}{
		{"bad base64", "Negotiate ***", errBadBase64},
		{"empty token", "NTLM", errNotNTLMSSP},
		{"AUTHENTICATE without NEGOTIATE", "NTLM " + base64.StdEncoding.EncodeToString(append(bytes.Clone(ntlmSignature), 3, 0, 0, 0)), errNoChallenge},
		{"unknown message type", "NTLM " + base64.StdEncoding.EncodeToString(append(bytes.Clone(ntlmSignature), 9, 0, 0, 0)), errUnexpectedType},
		{"disabled Basic", "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:secret")), errScheme},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newConnHarness(t)
			if rec := h.send(tc.authz); rec.Code != http.StatusUnauthorized || !errors.Is(h.lastErr, tc.wantErr) {
				t.Fatalf("status %d, failure %v; want 401 with %v", rec.Code, h.lastErr, tc.wantErr)
			}
		})
	}
}
