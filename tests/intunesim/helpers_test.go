package intunesim_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1" //nolint:gosec // x5t is SHA-1 by definition
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/AzureAD/microsoft-authentication-library-for-go/apps/confidential"

	"github.com/easguard/easguard/tests/intunesim"
)

// clock is a settable clock for Config.Now.
type clock struct{ offset atomic.Int64 }

func (c *clock) Now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *clock) Advance(d time.Duration) { c.offset.Add(int64(d)) }

// clientCred is one generated application certificate, shared by the
// tests of a run (RSA key generation is slow under -race).
type clientCred struct {
	certPEM, keyPEM []byte
	cert            *x509.Certificate
	key             *rsa.PrivateKey
}

var (
	credOnce sync.Once
	creds    [2]clientCred
	credErr  error
)

// testCreds returns two different application certificates.
func testCreds(t testing.TB) [2]clientCred {
	t.Helper()
	credOnce.Do(func() {
		for i := range creds {
			c, k, err := intunesim.GenerateClientCert("easguard-test")
			if err != nil {
				credErr = err
				return
			}
			certs, key, err := confidential.CertFromPEM(append(append([]byte{}, c...), k...), "")
			if err != nil {
				credErr = err
				return
			}
			creds[i] = clientCred{certPEM: c, keyPEM: k, cert: certs[0], key: key.(*rsa.PrivateKey)}
		}
	})
	if credErr != nil {
		t.Fatal(credErr)
	}
	return creds
}

// msalClient is the confidential client easguard's Graph source uses.
func msalClient(t testing.TB, s *intunesim.Sim, clientID string, cred confidential.Credential) confidential.Client {
	t.Helper()
	c, err := confidential.New(s.Authority(), clientID, cred,
		confidential.WithHTTPClient(s.HTTPClient()), confidential.WithInstanceDiscovery(false))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func secretClient(t testing.TB, s *intunesim.Sim, secret string) confidential.Client {
	t.Helper()
	cred, err := confidential.NewCredFromSecret(secret)
	if err != nil {
		t.Fatal(err)
	}
	return msalClient(t, s, s.ClientID(), cred)
}

// token gets an access token with the simulator's secret through MSAL.
func token(t testing.TB, s *intunesim.Sim) string {
	t.Helper()
	res, err := secretClient(t, s, s.ClientSecret()).AcquireTokenByCredential(context.Background(), []string{s.Scope()})
	if err != nil {
		t.Fatalf("token: %v", err)
	}
	return res.AccessToken
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) json(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		t.Fatalf("body %.300q: %v", r.body, err)
	}
	return m
}

// graphCode returns the error code of a Graph error body.
func (r response) graphCode(t testing.TB) string {
	t.Helper()
	e, _ := r.json(t)["error"].(map[string]any)
	code, _ := e["code"].(string)
	return code
}

func do(t testing.TB, c *http.Client, method, url, bearer string, body io.Reader, contentType string) response {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{resp.StatusCode, resp.Header, b}
}

func get(t testing.TB, c *http.Client, url, bearer string) response {
	t.Helper()
	return do(t, c, http.MethodGet, url, bearer, nil, "")
}

// page is one managedDevices page.
type page struct {
	Context  string           `json:"@odata.context"`
	NextLink string           `json:"@odata.nextLink"`
	Count    *int             `json:"@odata.count"`
	Value    []map[string]any `json:"value"`
}

func getPage(t testing.TB, c *http.Client, url, bearer string) page {
	t.Helper()
	r := get(t, c, url, bearer)
	if r.status != http.StatusOK {
		t.Fatalf("GET %s: %d %s", url, r.status, r.body)
	}
	var p page
	if err := json.Unmarshal(r.body, &p); err != nil {
		t.Fatalf("page %s: %v", url, err)
	}
	return p
}

// listAll follows @odata.nextLink verbatim until it is absent.
func listAll(t testing.TB, c *http.Client, url, bearer string) ([]map[string]any, int) {
	t.Helper()
	var all []map[string]any
	pages := 0
	for url != "" {
		p := getPage(t, c, url, bearer)
		all = append(all, p.Value...)
		pages++
		url = p.NextLink
		if pages > 10_000 {
			t.Fatal("paging does not end")
		}
	}
	return all, pages
}

// signAssertion makes a client assertion by hand, for the cases MSAL
// would never send.
func signAssertion(t testing.TB, cred clientCred, alg string, sha1Thumb bool, claims map[string]any) string {
	t.Helper()
	header := map[string]any{"alg": alg, "typ": "JWT"}
	if sha1Thumb {
		sum := sha1.Sum(cred.cert.Raw) //nolint:gosec // see import
		header["x5t"] = base64.RawURLEncoding.EncodeToString(sum[:])
	} else {
		sum := sha256.Sum256(cred.cert.Raw)
		header["x5t#S256"] = base64.RawURLEncoding.EncodeToString(sum[:])
	}
	hb, _ := json.Marshal(header)
	cb, _ := json.Marshal(claims)
	signing := base64.RawURLEncoding.EncodeToString(hb) + "." + base64.RawURLEncoding.EncodeToString(cb)
	digest := sha256.Sum256([]byte(signing))
	var sig []byte
	var err error
	if alg == "PS256" {
		sig, err = rsa.SignPSS(rand.Reader, cred.key, crypto.SHA256, digest[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	} else {
		sig, err = rsa.SignPKCS1v15(rand.Reader, cred.key, crypto.SHA256, digest[:])
	}
	if err != nil {
		t.Fatal(err)
	}
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// postForm posts a token request by hand.
func postForm(t testing.TB, s *intunesim.Sim, form map[string]string) response {
	t.Helper()
	v := url.Values{}
	for k, x := range form {
		v.Set(k, x)
	}
	return do(t, s.HTTPClient(), http.MethodPost, s.TokenURL(), "", strings.NewReader(v.Encode()), "application/x-www-form-urlencoded")
}
