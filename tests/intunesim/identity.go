package intunesim

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1" //nolint:gosec // x5t is a SHA-1 thumbprint by definition (RFC 7515 §4.1.7)
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Entra's error codes as the simulator answers them. The codes and the
// gist of the texts are Entra's (AADSTS error code list); the exact
// wording, and the codes marked so, are UNCONFIRMED.
const (
	aadTenantNotFound      = 90002   // invalid_tenant / invalid_request
	aadMissingParameter    = 900144  // invalid_request
	aadPostOnly            = 900561  // invalid_request
	aadUnsupportedGrant    = 70003   // unsupported_grant_type
	aadAppNotFound         = 700016  // unauthorized_client
	aadInvalidScope        = 1002012 // invalid_scope
	aadResourceNotFound    = 500011  // invalid_resource
	aadNoCredential        = 7000218 // invalid_client
	aadBadSecret           = 7000215 // invalid_client
	aadSecretExpired       = 7000222 // invalid_client (token_error 401)
	aadMalformedJWT        = 50027   // invalid_client
	aadBadSignature        = 700027  // invalid_client
	aadAssertionTime       = 700024  // invalid_client
	aadAssertionAudience   = 50012   // invalid_client
	aadAssertionSubject    = 700021  // invalid_client
	aadBadAssertionType    = 90014   // invalid_request, UNCONFIRMED code
	aadTwoCredentials      = 90015   // invalid_request, UNCONFIRMED code
	aadTokenIssuanceError  = 50000   // server_error (token_error 500, 400)
	aadTransient           = 90033   // temporarily_unavailable (token_error 503)
	aadTenantThrottled     = 90055   // temporarily_unavailable (token_error 429)
	clientAssertionTypeJWT = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
)

// assertionSkew is the clock skew tolerated on a client assertion's exp
// and nbf. UNCONFIRMED: Entra's is not documented; 5 minutes is the usual.
const assertionSkew = 5 * time.Minute

// token is an access token the simulator issued.
type token struct {
	exp      time.Time
	clientID string
	roles    []string
	auth     string
}

// entraError writes an OAuth error the way Entra does.
func (s *Sim) entraError(w http.ResponseWriter, r *http.Request, rec *Record, status int, code string, aadsts int, desc string) {
	now := s.now()
	trace := newGUID()
	corr := r.Header.Get("client-request-id")
	if corr == "" {
		corr = newGUID()
	}
	ts := now.Format("2006-01-02 15:04:05Z")
	body := map[string]any{
		"error": code,
		"error_description": fmt.Sprintf("AADSTS%d: %s Trace ID: %s Correlation ID: %s Timestamp: %s",
			aadsts, desc, trace, corr, ts),
		"error_codes":    []int{aadsts},
		"timestamp":      ts,
		"trace_id":       trace,
		"correlation_id": corr,
		"error_uri":      s.url + "/error?code=" + strconv.Itoa(aadsts),
	}
	rec.Error = code
	w.Header().Set("Cache-Control", "no-store, no-cache")
	w.Header().Set("x-ms-request-id", trace)
	writeJSON(w, status, body)
}

// discovery serves the tenant's OpenID configuration. MSAL needs
// authorization_endpoint, token_endpoint and issuer (Validate) and an
// issuer on the authority's scheme and host (ValidateIssuerMatchesAuthority);
// the rest is what Entra publishes.
func (s *Sim) discovery(w http.ResponseWriter, r *http.Request, rec *Record, tenant string) {
	if !strings.EqualFold(tenant, s.cfg.Tenant) {
		s.entraError(w, r, rec, http.StatusBadRequest, "invalid_tenant", aadTenantNotFound,
			fmt.Sprintf("Tenant '%s' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.", tenant))
		return
	}
	base := s.baseURL(r) + "/" + s.cfg.Tenant
	writeJSON(w, http.StatusOK, map[string]any{
		"token_endpoint":                        base + "/oauth2/v2.0/token",
		"token_endpoint_auth_methods_supported": []string{"client_secret_post", "private_key_jwt", "client_secret_basic"},
		"jwks_uri":                              base + "/discovery/v2.0/keys",
		"response_modes_supported":              []string{"query", "fragment", "form_post"},
		"subject_types_supported":               []string{"pairwise"},
		"id_token_signing_alg_values_supported": []string{"RS256"},
		"response_types_supported":              []string{"code", "id_token", "code id_token", "id_token token"},
		"scopes_supported":                      []string{"openid", "profile", "email", "offline_access"},
		"issuer":                                base + "/v2.0",
		"request_uri_parameter_supported":       false,
		"userinfo_endpoint":                     s.baseURL(r) + "/oidc/userinfo",
		"authorization_endpoint":                base + "/oauth2/v2.0/authorize",
		"device_authorization_endpoint":         base + "/oauth2/v2.0/devicecode",
		"http_logout_supported":                 true,
		"frontchannel_logout_supported":         true,
		"end_session_endpoint":                  base + "/oauth2/v2.0/logout",
		"claims_supported":                      []string{"sub", "iss", "cloud_instance_name", "cloud_instance_host_name", "cloud_graph_host_name", "msgraph_host", "aud", "exp", "iat", "auth_time", "acr", "nonce", "preferred_username", "name", "tid", "ver", "at_hash", "c_hash", "email"},
		"kerberos_endpoint":                     base + "/kerberos",
		"tenant_region_scope":                   "EU",
		"cloud_instance_name":                   "microsoftonline.com",
		"cloud_graph_host_name":                 "graph.windows.net",
		"msgraph_host":                          strings.TrimPrefix(s.baseURL(r), "https://"),
		"rbac_url":                              "https://pas.windows.net",
	})
}

// keys serves the JWKS with the key that signs the simulator's access
// tokens (ES256, not Entra's RS256: clients must treat Graph tokens as
// opaque, and an EC key is cheap to make at every start).
func (s *Sim) keys(w http.ResponseWriter, r *http.Request, rec *Record, tenant string) {
	if !strings.EqualFold(tenant, s.cfg.Tenant) {
		s.entraError(w, r, rec, http.StatusBadRequest, "invalid_tenant", aadTenantNotFound, fmt.Sprintf("Tenant '%s' not found.", tenant))
		return
	}
	pub := s.signKey.PublicKey
	var xb, yb [32]byte
	pub.X.FillBytes(xb[:])
	pub.Y.FillBytes(yb[:])
	writeJSON(w, http.StatusOK, map[string]any{"keys": []map[string]any{{
		"kty": "EC", "use": "sig", "crv": "P-256", "alg": "ES256", "kid": s.keyID,
		"x": base64.RawURLEncoding.EncodeToString(xb[:]), "y": base64.RawURLEncoding.EncodeToString(yb[:]),
		"issuer": "https://sts.windows.net/" + s.cfg.Tenant + "/",
	}}})
}

// tokenEndpoint serves POST /{tenant}/oauth2/v2.0/token for the
// client_credentials grant.
func (s *Sim) tokenEndpoint(w http.ResponseWriter, r *http.Request, rec *Record, tenant string) {
	if r.Method != http.MethodPost {
		s.entraError(w, r, rec, http.StatusBadRequest, "invalid_request", aadPostOnly,
			fmt.Sprintf("The endpoint only accepts POST, OPTIONS requests. Received a %s request.", r.Method))
		return
	}
	if !strings.EqualFold(tenant, s.cfg.Tenant) {
		s.entraError(w, r, rec, http.StatusBadRequest, "invalid_request", aadTenantNotFound,
			fmt.Sprintf("Tenant '%s' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.", tenant))
		return
	}
	if _, f := s.takeFaults("token", 0); f != nil {
		rec.Fault = f.Kind
		s.tokenFault(w, r, rec, f)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 1<<16)
	if err := r.ParseForm(); err != nil {
		s.entraError(w, r, rec, http.StatusBadRequest, "invalid_request", aadMissingParameter,
			"The request body must contain the following parameter: 'grant_type'.")
		return
	}
	form := r.PostForm
	missing := func(name string) {
		s.entraError(w, r, rec, http.StatusBadRequest, "invalid_request", aadMissingParameter,
			fmt.Sprintf("The request body must contain the following parameter: '%s'.", name))
	}
	grant := form.Get("grant_type")
	if grant == "" {
		missing("grant_type")
		return
	}
	if grant != "client_credentials" {
		s.entraError(w, r, rec, http.StatusBadRequest, "unsupported_grant_type", aadUnsupportedGrant,
			fmt.Sprintf("The app requested an unsupported grant type '%s'.", grant))
		return
	}
	clientID := form.Get("client_id")
	if clientID == "" {
		missing("client_id")
		return
	}
	rec.ClientID = clientID
	if !strings.EqualFold(clientID, s.cfg.ClientID) {
		s.entraError(w, r, rec, http.StatusBadRequest, "unauthorized_client", aadAppNotFound,
			fmt.Sprintf("Application with identifier '%s' was not found in the directory '%s'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.", clientID, s.cfg.Tenant))
		return
	}
	resource, ok := s.checkScope(w, r, rec, form.Get("scope"))
	if !ok {
		return
	}
	secret, assertion := form.Get("client_secret"), form.Get("client_assertion")
	switch {
	case secret != "" && assertion != "":
		s.entraError(w, r, rec, http.StatusBadRequest, "invalid_request", aadTwoCredentials,
			"Only one client credential may be presented: client_secret or client_assertion.")
		return
	case secret != "":
		rec.Auth = "secret"
		if secret != s.cfg.ClientSecret {
			s.entraError(w, r, rec, http.StatusUnauthorized, "invalid_client", aadBadSecret,
				fmt.Sprintf("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '%s'.", s.cfg.ClientID))
			return
		}
	case assertion != "":
		rec.Auth = "certificate"
		if t := form.Get("client_assertion_type"); t != clientAssertionTypeJWT {
			s.entraError(w, r, rec, http.StatusBadRequest, "invalid_request", aadBadAssertionType,
				fmt.Sprintf("The client_assertion_type '%s' is not supported; use '%s'.", t, clientAssertionTypeJWT))
			return
		}
		if status, code, aadsts, desc := s.checkAssertion(r, assertion); status != 0 {
			s.entraError(w, r, rec, status, code, aadsts, desc)
			return
		}
	default:
		s.entraError(w, r, rec, http.StatusUnauthorized, "invalid_client", aadNoCredential,
			"The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
		return
	}
	access := s.issue(resource, rec.Auth)
	secs := max(int(s.cfg.TokenLifetime/time.Second), 1)
	w.Header().Set("Cache-Control", "no-store, no-cache")
	writeJSON(w, http.StatusOK, map[string]any{
		"token_type": "Bearer", "expires_in": secs, "ext_expires_in": secs, "access_token": access,
	})
}

// checkScope accepts exactly one "<resource>/.default" among the scopes,
// besides openid, profile and offline_access, which MSAL always adds.
func (s *Sim) checkScope(w http.ResponseWriter, r *http.Request, rec *Record, scope string) (string, bool) {
	var rest []string
	for _, sc := range strings.Fields(scope) {
		switch sc {
		case "openid", "profile", "offline_access":
		default:
			rest = append(rest, sc)
		}
	}
	if len(rest) == 0 {
		s.entraError(w, r, rec, http.StatusBadRequest, "invalid_request", aadMissingParameter,
			"The request body must contain the following parameter: 'scope'.")
		return "", false
	}
	if len(rest) != 1 || !strings.HasSuffix(rest[0], "/.default") {
		s.entraError(w, r, rec, http.StatusBadRequest, "invalid_scope", aadInvalidScope,
			fmt.Sprintf("The provided value for scope %s is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).", strings.Join(rest, " ")))
		return "", false
	}
	resource := strings.TrimSuffix(rest[0], "/.default")
	if s.defaultResources && strings.EqualFold(resource, s.baseURL(r)) {
		return resource, true // the simulator under the name the client used
	}
	for _, res := range s.cfg.Resources {
		if strings.EqualFold(strings.TrimSuffix(res, "/"), resource) {
			return resource, true
		}
	}
	s.entraError(w, r, rec, http.StatusBadRequest, "invalid_resource", aadResourceNotFound,
		fmt.Sprintf("The resource principal named %s was not found in the tenant named %s. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant.", resource, s.cfg.Tenant))
	return "", false
}

// tokenFault answers a token request as a failing Entra would.
func (s *Sim) tokenFault(w http.ResponseWriter, r *http.Request, rec *Record, f *Fault) {
	if (f.Status == 429 || f.Status == 503) && f.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(f.RetryAfter))
	}
	switch f.Status {
	case 400:
		s.entraError(w, r, rec, 400, "invalid_request", aadTokenIssuanceError, "There was an error issuing a token or an issue with our sign-in service. (injected fault)")
	case 401:
		s.entraError(w, r, rec, 401, "invalid_client", aadSecretExpired,
			fmt.Sprintf("The provided client secret keys for app '%s' are expired. (injected fault)", s.cfg.ClientID))
	case 429:
		s.entraError(w, r, rec, 429, "temporarily_unavailable", aadTenantThrottled, "There are too many incoming requests. (injected fault)")
	case 503:
		s.entraError(w, r, rec, 503, "temporarily_unavailable", aadTransient, "A transient error has occurred. Please try again. (injected fault)")
	default:
		s.entraError(w, r, rec, 500, "server_error", aadTokenIssuanceError, "There was an error issuing a token or an issue with our sign-in service. (injected fault)")
	}
}

// checkAssertion verifies a client assertion (RFC 7523) as Entra does for
// certificate credentials: a JWT signed RS256 or PS256 by the key of a
// registered certificate named by x5t (SHA-1) or x5t#S256 (SHA-256)
// thumbprint, aud the token endpoint, iss and sub the client id, exp
// (and nbf, if any) current, jti present. It returns status 0 when good.
func (s *Sim) checkAssertion(r *http.Request, assertion string) (status int, code string, aadsts int, desc string) {
	bad := func(n int, d string) (int, string, int, string) {
		return http.StatusUnauthorized, "invalid_client", n, d
	}
	parts := strings.Split(assertion, ".")
	if len(parts) != 3 {
		return bad(aadMalformedJWT, "JWT token is invalid or malformed.")
	}
	var header struct {
		Alg     string `json:"alg"`
		X5t     string `json:"x5t"`
		X5tS256 string `json:"x5t#S256"`
	}
	claims := map[string]any{}
	if err := decodeSegment(parts[0], &header); err != nil {
		return bad(aadMalformedJWT, "JWT token is invalid or malformed.")
	}
	if err := decodeSegment(parts[1], &claims); err != nil {
		return bad(aadMalformedJWT, "JWT token is invalid or malformed.")
	}
	sig, err := b64decode(parts[2])
	if err != nil {
		return bad(aadMalformedJWT, "JWT token is invalid or malformed.")
	}
	var cert *x509.Certificate
	var shown string
	for _, c := range s.clientCerts {
		if header.X5tS256 != "" {
			sum := sha256.Sum256(c.Raw)
			if t, err := b64decode(header.X5tS256); err == nil && bytes.Equal(t, sum[:]) {
				cert = c
			}
		} else if header.X5t != "" {
			sum := sha1.Sum(c.Raw) //nolint:gosec // see import
			if t, err := b64decode(header.X5t); err == nil && bytes.Equal(t, sum[:]) {
				cert = c
			}
		}
	}
	if header.X5tS256 != "" {
		shown = header.X5tS256
	} else {
		shown = header.X5t
	}
	if cert == nil {
		return bad(aadBadSignature, fmt.Sprintf("Client assertion failed signature validation. [Reason - The key was not found., Thumbprint of key used by client: '%s', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '%s'.]", shown, s.cfg.ClientID))
	}
	pub := cert.PublicKey.(*rsa.PublicKey)
	digest := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	switch header.Alg {
	case "RS256":
		err = rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig)
	case "PS256":
		err = rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
	default:
		return bad(aadMalformedJWT, fmt.Sprintf("JWT token is invalid or malformed: unsupported signing algorithm '%s'.", header.Alg))
	}
	if err != nil {
		return bad(aadBadSignature, "Client assertion failed signature validation. [Reason - The provided signature value did not match the expected signature value.]")
	}
	str := func(k string) string { v, _ := claims[k].(string); return v }
	num := func(k string) (time.Time, bool) {
		switch v := claims[k].(type) {
		case float64:
			return time.Unix(int64(v), 0), true
		case json.Number:
			n, err := v.Int64()
			return time.Unix(n, 0), err == nil
		}
		return time.Time{}, false
	}
	if !s.audienceOK(r, str("aud")) {
		return bad(aadAssertionAudience, "Client assertion audience claim does not match Realm issuer.")
	}
	if !strings.EqualFold(str("iss"), s.cfg.ClientID) || !strings.EqualFold(str("sub"), s.cfg.ClientID) {
		return bad(aadAssertionSubject, "Client assertion application identifier doesn't match 'client_id' parameter.")
	}
	if str("jti") == "" {
		return bad(aadMalformedJWT, "JWT token is invalid or malformed: the jti claim is missing.")
	}
	now := s.now()
	exp, ok := num("exp")
	if !ok {
		return bad(aadMalformedJWT, "JWT token is invalid or malformed: the exp claim is missing.")
	}
	nbf, hasNbf := num("nbf")
	if now.After(exp.Add(assertionSkew)) || (hasNbf && now.Add(assertionSkew).Before(nbf)) {
		return bad(aadAssertionTime, fmt.Sprintf("Client assertion is not within its valid time range. Current time: %s, assertion valid from %s, expiry time of assertion %s.",
			now.Format(time.RFC3339), nbf.UTC().Format(time.RFC3339), exp.UTC().Format(time.RFC3339)))
	}
	return 0, "", 0, ""
}

// audienceOK accepts the v2.0 token endpoint (what MSAL puts in aud) and
// the v1.0 one, on the host the request came to.
func (s *Sim) audienceOK(r *http.Request, aud string) bool {
	base := strings.ToLower(s.baseURL(r) + "/" + s.cfg.Tenant)
	a := strings.ToLower(aud)
	return a == base+"/oauth2/v2.0/token" || a == base+"/oauth2/token"
}

func decodeSegment(seg string, v any) error {
	b, err := b64decode(seg)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	return dec.Decode(v)
}

// b64decode reads base64url or standard base64, padded or not (MSAL sends
// x5t#S256 in standard base64 with padding).
func b64decode(s string) ([]byte, error) {
	s = strings.TrimRight(s, "=")
	s = strings.NewReplacer("+", "-", "/", "_").Replace(s)
	return base64.RawURLEncoding.DecodeString(s)
}

// issue makes an access token for resource: a JWT shaped like Entra's
// v1.0 app tokens, signed ES256 by the simulator's key.
func (s *Sim) issue(resource, auth string) string {
	now := s.now()
	exp := now.Add(s.cfg.TokenLifetime)
	acr := "1"
	if auth == "certificate" {
		acr = "2"
	}
	sp := userID(0, "sp|"+s.cfg.ClientID)
	header, _ := json.Marshal(map[string]string{"typ": "JWT", "alg": "ES256", "kid": s.keyID})
	claims, _ := json.Marshal(map[string]any{
		"aud": resource, "iss": "https://sts.windows.net/" + s.cfg.Tenant + "/", "iat": now.Unix(), "nbf": now.Unix(),
		"exp": exp.Unix(), "appid": s.cfg.ClientID, "appidacr": acr, "idp": "https://sts.windows.net/" + s.cfg.Tenant + "/",
		"idtyp": "app", "oid": sp, "sub": sp, "roles": s.cfg.Roles, "tid": s.cfg.Tenant, "uti": newGUID(), "ver": "1.0",
	})
	signing := base64.RawURLEncoding.EncodeToString(header) + "." + base64.RawURLEncoding.EncodeToString(claims)
	digest := sha256.Sum256([]byte(signing))
	rr, ss, err := ecdsa.Sign(rand.Reader, s.signKey, digest[:])
	if err != nil {
		panic(err) // crypto/rand failed
	}
	var sig [64]byte
	rr.FillBytes(sig[:32])
	ss.FillBytes(sig[32:])
	access := signing + "." + base64.RawURLEncoding.EncodeToString(sig[:])

	s.mu.Lock()
	if len(s.tokens) >= 1024 {
		for k, t := range s.tokens {
			if now.After(t.exp) {
				delete(s.tokens, k)
			}
		}
	}
	s.tokens[access] = &token{exp: exp, clientID: s.cfg.ClientID, roles: append([]string(nil), s.cfg.Roles...), auth: auth}
	s.mu.Unlock()
	s.tokenCnt.Add(1)
	return access
}

// TokensIssued is how many access tokens the token endpoint issued.
func (s *Sim) TokensIssued() int { return int(s.tokenCnt.Load()) }

// ExpireTokens makes every access token issued so far expired (as if
// their lifetime had passed) and returns how many were still valid.
func (s *Sim) ExpireTokens() int {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, t := range s.tokens {
		if !now.After(t.exp) {
			n++
		}
		t.exp = now.Add(-time.Second)
	}
	return n
}

// authenticate checks a Graph request's bearer token; it returns the
// token, or "" and the message of Graph's 401.
func (s *Sim) authenticate(r *http.Request) (*token, string) {
	h := r.Header.Get("Authorization")
	if h == "" {
		return nil, "Access token is empty."
	}
	scheme, tok, ok := strings.Cut(h, " ")
	tok = strings.TrimSpace(tok)
	if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
		return nil, "Access token is empty."
	}
	s.mu.RLock()
	var t *token
	if p := s.tokens[tok]; p != nil {
		c := *p // ExpireTokens changes exp under the lock
		t = &c
	}
	s.mu.RUnlock()
	if t == nil {
		if strings.Count(tok, ".") != 2 {
			return nil, "IDX14100: JWT is not well formed, there are no dots (.). The token needs to be in JWS or JWE Compact Serialization Format."
		}
		return nil, "Access token validation failure. Invalid audience."
	}
	if !s.now().Before(t.exp) {
		return nil, "Lifetime validation failed, the token is expired."
	}
	return t, ""
}

// newGUID returns a random lower-case GUID.
func newGUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return guidFrom(b[:])
}
