package intunesim_test

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/AzureAD/microsoft-authentication-library-for-go/apps/confidential"

	"github.com/easguard/easguard/tests/intunesim"
)

func TestMSALTokenBySecret(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{Extra: 3})
	cl := secretClient(t, s, intunesim.DefaultClientSecret)
	res, err := cl.AcquireTokenByCredential(context.Background(), []string{s.Scope()})
	if err != nil {
		t.Fatalf("MSAL with the client secret: %v", err)
	}
	if res.AccessToken == "" || time.Until(res.ExpiresOn) < 50*time.Minute {
		t.Fatalf("token %q expires %v", res.AccessToken, res.ExpiresOn)
	}
	if s.TokensIssued() != 1 || s.Recorder.Count("token:issued") != 1 || s.Recorder.Count("discovery:200") != 1 {
		t.Fatalf("issued %d, counts %v", s.TokensIssued(), s.Recorder.Counts())
	}
	if rec := s.Recorder.Records("token")[0]; rec.Auth != "secret" || rec.ClientID != intunesim.DefaultClientID {
		t.Fatalf("token record %+v", rec)
	}
	// The token is a JWT shaped like Entra's app tokens.
	parts := strings.Split(res.AccessToken, ".")
	if len(parts) != 3 {
		t.Fatalf("token %q is not a JWT", res.AccessToken)
	}
	b, _ := base64.RawURLEncoding.DecodeString(parts[1])
	var claims map[string]any
	if err := json.Unmarshal(b, &claims); err != nil || claims["appid"] != intunesim.DefaultClientID || claims["tid"] != intunesim.DefaultTenant || claims["aud"] != s.URL() {
		t.Fatalf("claims %v (%v)", claims, err)
	}
	p := getPage(t, s.HTTPClient(), s.GraphURL()+"/deviceManagement/managedDevices", res.AccessToken)
	if len(p.Value) != 3 {
		t.Fatalf("listed %d devices, want 3", len(p.Value))
	}
	// MSAL caches the token: a second call issues none.
	again, err := cl.AcquireTokenByCredential(context.Background(), []string{s.Scope()})
	if err != nil || again.AccessToken != res.AccessToken || s.TokensIssued() != 1 {
		t.Fatalf("second call: %v, issued %d", err, s.TokensIssued())
	}
}

func TestMSALTokenByCertificate(t *testing.T) {
	cc := testCreds(t)[0]
	s := intunesim.StartTest(t, intunesim.Config{ClientCertPEM: cc.certPEM, Extra: 2})
	certs, key, err := confidential.CertFromPEM(append(append([]byte{}, cc.certPEM...), cc.keyPEM...), "")
	if err != nil {
		t.Fatal(err)
	}
	cred, err := confidential.NewCredFromCert(certs, key)
	if err != nil {
		t.Fatal(err)
	}
	res, err := msalClient(t, s, s.ClientID(), cred).AcquireTokenByCredential(context.Background(), []string{s.Scope()})
	if err != nil {
		t.Fatalf("MSAL with the certificate: %v", err)
	}
	if rec := s.Recorder.Records("token")[0]; rec.Auth != "certificate" || rec.Status != 200 {
		t.Fatalf("token record %+v", rec)
	}
	if p := getPage(t, s.HTTPClient(), s.GraphURL()+"/deviceManagement/managedDevices", res.AccessToken); len(p.Value) != 2 {
		t.Fatalf("listed %d", len(p.Value))
	}
	// The other thumbprint and algorithm Entra accepts: RS256 with x5t (SHA-1).
	now := time.Now()
	r := postForm(t, s, map[string]string{
		"grant_type": "client_credentials", "client_id": s.ClientID(), "scope": s.Scope(),
		"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
		"client_assertion": signAssertion(t, cc, "RS256", true, map[string]any{
			"aud": s.TokenURL(), "iss": s.ClientID(), "sub": s.ClientID(), "jti": "j1", "exp": now.Add(5 * time.Minute).Unix(), "nbf": now.Unix(),
		}),
	})
	if r.status != 200 {
		t.Fatalf("RS256/x5t assertion: %d %s", r.status, r.body)
	}
	m := r.json(t)
	if m["token_type"] != "Bearer" || m["expires_in"] != float64(3599) || m["ext_expires_in"] != float64(3599) || m["access_token"] == "" {
		t.Fatalf("token response %v", m)
	}
}

// entraError checks an Entra error body.
func entraError(t *testing.T, r response, status int, code, aadsts string) {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d: %s", r.status, status, r.body)
	}
	m := r.json(t)
	desc, _ := m["error_description"].(string)
	if m["error"] != code || !strings.HasPrefix(desc, aadsts+":") || m["correlation_id"] == nil || m["trace_id"] == nil {
		t.Fatalf("error body %v, want %s %s", m, code, aadsts)
	}
}

func TestBadCredentialsRefused(t *testing.T) {
	cc := testCreds(t)
	s := intunesim.StartTest(t, intunesim.Config{ClientCertPEM: cc[0].certPEM})

	_, err := secretClient(t, s, "wrong-secret").AcquireTokenByCredential(context.Background(), []string{s.Scope()})
	if err == nil || !strings.Contains(err.Error(), "AADSTS7000215") || !strings.Contains(err.Error(), "401") {
		t.Fatalf("MSAL with a wrong secret: %v", err)
	}
	// A certificate that is not registered.
	cred, err := confidential.NewCredFromCert([]*x509.Certificate{cc[1].cert}, cc[1].key)
	if err != nil {
		t.Fatal(err)
	}
	_, err = msalClient(t, s, s.ClientID(), cred).AcquireTokenByCredential(context.Background(), []string{s.Scope()})
	if err == nil || !strings.Contains(err.Error(), "AADSTS700027") {
		t.Fatalf("MSAL with an unregistered certificate: %v", err)
	}
	if s.TokensIssued() != 0 {
		t.Fatalf("issued %d tokens to bad credentials", s.TokensIssued())
	}

	now := time.Now()
	claims := func(mod func(map[string]any)) map[string]any {
		c := map[string]any{"aud": s.TokenURL(), "iss": s.ClientID(), "sub": s.ClientID(), "jti": "j", "exp": now.Add(5 * time.Minute).Unix(), "nbf": now.Unix()}
		mod(c)
		return c
	}
	form := func(assertion string) map[string]string {
		return map[string]string{"grant_type": "client_credentials", "client_id": s.ClientID(), "scope": s.Scope(),
			"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer", "client_assertion": assertion}
	}
	good := signAssertion(t, cc[0], "PS256", false, claims(func(map[string]any) {}))
	tampered := good[:strings.LastIndexByte(good, '.')] + "." + base64.RawURLEncoding.EncodeToString(make([]byte, 256))
	for _, tc := range []struct {
		name      string
		form      map[string]string
		status    int
		code, aad string
	}{
		{"bad signature", form(tampered), 401, "invalid_client", "AADSTS700027"},
		{"wrong audience", form(signAssertion(t, cc[0], "PS256", false, claims(func(c map[string]any) { c["aud"] = "https://elsewhere/token" }))), 401, "invalid_client", "AADSTS50012"},
		{"wrong issuer", form(signAssertion(t, cc[0], "PS256", false, claims(func(c map[string]any) { c["iss"] = "someone" }))), 401, "invalid_client", "AADSTS700021"},
		{"expired", form(signAssertion(t, cc[0], "PS256", false, claims(func(c map[string]any) { c["exp"] = now.Add(-time.Hour).Unix() }))), 401, "invalid_client", "AADSTS700024"},
		{"no jti", form(signAssertion(t, cc[0], "PS256", false, claims(func(c map[string]any) { delete(c, "jti") }))), 401, "invalid_client", "AADSTS50027"},
		{"garbage", form("not-a-jwt"), 401, "invalid_client", "AADSTS50027"},
		{"no credential", map[string]string{"grant_type": "client_credentials", "client_id": s.ClientID(), "scope": s.Scope()}, 401, "invalid_client", "AADSTS7000218"},
		{"unknown application", map[string]string{"grant_type": "client_credentials", "client_id": "11111111-2222-3333-4444-555555555555", "scope": s.Scope(), "client_secret": s.ClientSecret()}, 400, "unauthorized_client", "AADSTS700016"},
		{"scope without .default", map[string]string{"grant_type": "client_credentials", "client_id": s.ClientID(), "scope": s.URL() + "/DeviceManagementManagedDevices.Read.All", "client_secret": s.ClientSecret()}, 400, "invalid_scope", "AADSTS1002012"},
		{"unknown resource", map[string]string{"grant_type": "client_credentials", "client_id": s.ClientID(), "scope": "https://vault.azure.net/.default", "client_secret": s.ClientSecret()}, 400, "invalid_resource", "AADSTS500011"},
		{"password grant", map[string]string{"grant_type": "password", "client_id": s.ClientID(), "scope": s.Scope()}, 400, "unsupported_grant_type", "AADSTS70003"},
		{"no grant", map[string]string{"client_id": s.ClientID()}, 400, "invalid_request", "AADSTS900144"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			entraError(t, postForm(t, s, tc.form), tc.status, tc.code, tc.aad)
		})
	}
	// Graph's own identifiers name the resource as well as the URL does.
	for _, scope := range []string{"https://graph.microsoft.com/.default", intunesim.GraphAppID + "/.default"} {
		r := postForm(t, s, map[string]string{"grant_type": "client_credentials", "client_id": s.ClientID(), "scope": scope + " openid profile offline_access", "client_secret": s.ClientSecret()})
		if r.status != 200 {
			t.Fatalf("scope %s: %d %s", scope, r.status, r.body)
		}
	}
	// An unknown tenant, at discovery and at the token endpoint.
	r := get(t, s.HTTPClient(), s.URL()+"/contoso.onmicrosoft.com/v2.0/.well-known/openid-configuration", "")
	entraError(t, r, 400, "invalid_tenant", "AADSTS90002")
	bad, err := confidential.New(s.URL()+"/00000000-0000-0000-0000-000000000000", s.ClientID(), mustSecret(t, s.ClientSecret()),
		confidential.WithHTTPClient(s.HTTPClient()), confidential.WithInstanceDiscovery(false))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bad.AcquireTokenByCredential(context.Background(), []string{s.Scope()}); err == nil || !strings.Contains(err.Error(), "AADSTS90002") {
		t.Fatalf("MSAL with a wrong tenant: %v", err)
	}
	if n := len(s.Recorder.Records("token")); n == 0 {
		t.Fatal("token requests not recorded")
	}
}

func mustSecret(t testing.TB, secret string) confidential.Credential {
	t.Helper()
	c, err := confidential.NewCredFromSecret(secret)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestDiscoveryDocument(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{Tenant: "Contoso-Tenant"})
	// MSAL lower-cases the authority; tenants compare case-insensitively.
	r := get(t, s.HTTPClient(), s.URL()+"/contoso-tenant/v2.0/.well-known/openid-configuration", "")
	m := r.json(t)
	base := s.URL() + "/Contoso-Tenant"
	if r.status != 200 || m["token_endpoint"] != base+"/oauth2/v2.0/token" || m["issuer"] != base+"/v2.0" ||
		m["authorization_endpoint"] != base+"/oauth2/v2.0/authorize" || m["jwks_uri"] != base+"/discovery/v2.0/keys" {
		t.Fatalf("discovery %d %v", r.status, m)
	}
	keys := get(t, s.HTTPClient(), m["jwks_uri"].(string), "").json(t)
	if ks, _ := keys["keys"].([]any); len(ks) != 1 {
		t.Fatalf("jwks %v", keys)
	}
	if _, err := secretClient(t, s, s.ClientSecret()).AcquireTokenByCredential(context.Background(), []string{s.Scope()}); err != nil {
		t.Fatal(err)
	}
	// Under the name localhost, the documents name localhost, and the
	// scope may too.
	local := strings.Replace(s.URL(), "127.0.0.1", "localhost", 1)
	app, err := confidential.New(local+"/Contoso-Tenant", s.ClientID(), mustSecret(t, s.ClientSecret()),
		confidential.WithHTTPClient(s.HTTPClient()), confidential.WithInstanceDiscovery(false))
	if err != nil {
		t.Fatal(err)
	}
	res, err := app.AcquireTokenByCredential(context.Background(), []string{local + "/.default"})
	if err != nil {
		t.Fatalf("MSAL via localhost: %v", err)
	}
	if r := get(t, s.HTTPClient(), local+"/v1.0/deviceManagement/managedDevices", res.AccessToken); r.status != 200 {
		t.Fatalf("Graph via localhost: %d", r.status)
	}
}

func TestTokenExpiryAndRevocation(t *testing.T) {
	var clk clock
	s := intunesim.StartTest(t, intunesim.Config{Extra: 1, TokenLifetime: 10 * time.Minute, Now: clk.Now})
	c := s.HTTPClient()
	url := s.GraphURL() + "/deviceManagement/managedDevices"
	r := postForm(t, s, map[string]string{"grant_type": "client_credentials", "client_id": s.ClientID(), "scope": s.Scope(), "client_secret": s.ClientSecret()})
	if r.status != 200 || r.json(t)["expires_in"] != float64(600) {
		t.Fatalf("token: %d %s", r.status, r.body)
	}
	tok := r.json(t)["access_token"].(string)
	if got := get(t, c, url, tok); got.status != 200 {
		t.Fatalf("fresh token: %d %s", got.status, got.body)
	}
	clk.Advance(11 * time.Minute)
	got := get(t, c, url, tok)
	if got.status != http.StatusUnauthorized || got.graphCode(t) != "InvalidAuthenticationToken" ||
		!strings.Contains(got.json(t)["error"].(map[string]any)["message"].(string), "expired") || got.header.Get("WWW-Authenticate") == "" {
		t.Fatalf("expired token: %d %s", got.status, got.body)
	}
	for _, bearer := range []string{"", "garbage", "a.b.c"} {
		if got := get(t, c, url, bearer); got.status != 401 || got.graphCode(t) != "InvalidAuthenticationToken" {
			t.Fatalf("token %q: %d %s", bearer, got.status, got.body)
		}
	}
	// MSAL refreshes a token that expires within 5 minutes, so a short
	// lifetime makes it fetch one every time.
	short := intunesim.StartTest(t, intunesim.Config{TokenLifetime: time.Minute})
	cl := secretClient(t, short, short.ClientSecret())
	for i := 0; i < 2; i++ {
		if _, err := cl.AcquireTokenByCredential(context.Background(), []string{short.Scope()}); err != nil {
			t.Fatal(err)
		}
	}
	if short.TokensIssued() != 2 {
		t.Fatalf("issued %d tokens, want 2 (no caching of short-lived tokens)", short.TokensIssued())
	}
	// ExpireTokens revokes what MSAL has cached.
	long := intunesim.StartTest(t, intunesim.Config{})
	tok = token(t, long)
	if n := long.ExpireTokens(); n != 1 {
		t.Fatalf("expired %d tokens", n)
	}
	if got := get(t, long.HTTPClient(), long.GraphURL()+"/deviceManagement/managedDevices", tok); got.status != 401 {
		t.Fatalf("revoked token: %d", got.status)
	}
}

func TestMissingPermission(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{Roles: []string{"User.Read.All"}})
	got := get(t, s.HTTPClient(), s.GraphURL()+"/deviceManagement/managedDevices", token(t, s))
	if got.status != http.StatusForbidden || got.graphCode(t) != "Forbidden" {
		t.Fatalf("without the permission: %d %s", got.status, got.body)
	}
}
