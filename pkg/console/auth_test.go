package console_test

import (
	"maps"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"

	"github.com/easguard/easguard/pkg/config/configtest"
	"github.com/easguard/easguard/pkg/console"
)

// TestSignInWithOpenIDConnect signs in through a real OpenID provider
// (authorisation code flow with PKCE, nonce, ID token verified) and gets
// the role the groups claim grants; a user without a role, a viewer's
// actions and forged forms are refused.
func TestSignInWithOpenIDConnect(t *testing.T) {
	f := start(t, nil)
	t.Run("operator", func(t *testing.T) {
		c := browser(t)
		code, page := f.signIn(t, c, "olga", "staff", "easguard-operators")
		if code != http.StatusOK || !strings.Contains(page, "olga (operator)") || !strings.Contains(page, `id="sync-full"`) {
			t.Fatalf("operator after sign-in: %d\n%s", code, page)
		}
		// The session's own form token lets a sync through; a form
		// without it, or one posted from another site, is refused.
		tok := csrf(t, page)
		if code, body := post(t, c, f.url+"/orgs/"+org+"/sync", url.Values{"kind": {"quick"}}, nil); code != http.StatusForbidden {
			t.Errorf("sync without the CSRF token: %d %s", code, body)
		}
		if code, _ := post(t, c, f.url+"/orgs/"+org+"/sync", url.Values{"kind": {"quick"}, "csrf": {tok}}, map[string]string{"Sec-Fetch-Site": "cross-site"}); code != http.StatusForbidden {
			t.Errorf("sync posted from another site: %d", code)
		}
		code, body := post(t, c, f.url+"/orgs/"+org+"/sync", url.Values{"kind": {"quick"}, "csrf": {tok}, "back": {"/orgs/" + org}}, nil)
		if code != http.StatusOK || !strings.Contains(body, "quick sync requested") {
			t.Errorf("sync with the token: %d\n%s", code, body)
		}
		// Signing out ends the session on the server: the cookie is
		// worth nothing after.
		post(t, c, f.url+"/logout", url.Values{"csrf": {tok}}, nil)
		if code, body := get(t, c, f.url+"/orgs/"+org); !strings.Contains(body, "Sign in to easguard") {
			t.Errorf("after sign-out: %d %s", code, body)
		}
	})
	t.Run("viewer", func(t *testing.T) {
		c := browser(t)
		code, page := f.signIn(t, c, "vera", "easguard-viewers")
		if code != http.StatusOK || !strings.Contains(page, "vera (viewer)") || strings.Contains(page, `id="sync-full"`) {
			t.Fatalf("viewer after sign-in: %d\n%s", code, page)
		}
		code, body := post(t, c, f.url+"/orgs/"+org+"/sync", url.Values{"kind": {"full"}, "csrf": {csrf(t, page)}}, nil)
		if code != http.StatusForbidden || !strings.Contains(body, "needs the operator role") {
			t.Errorf("viewer's sync: %d %s", code, body)
		}
	})
	t.Run("no role", func(t *testing.T) {
		c := browser(t)
		code, page := f.signIn(t, c, "nora", "staff")
		if code != http.StatusForbidden || !strings.Contains(page, "without an easguard role") {
			t.Errorf("user without a role: %d %s", code, page)
		}
		if _, body := get(t, c, f.url+"/orgs/"+org); !strings.Contains(body, "Sign in to easguard") {
			t.Error("a user without a role got a session")
		}
	})
	t.Run("forged state", func(t *testing.T) {
		c := browser(t)
		code, body := get(t, c, f.url+"/auth/callback?state=forged&code=whatever")
		if !strings.Contains(body, "unknown, used or expired") {
			t.Errorf("callback with a forged state: %d %s", code, body)
		}
	})
}

// TestBreakGlassSignIn checks the users file: the right password signs
// in with the file's role, a wrong one or an unknown user does not.
func TestBreakGlassSignIn(t *testing.T) {
	f := start(t, nil)
	cases := []struct {
		user, password, want string
	}{
		{"admin", "correct horse battery", "admin (operator)"},
		{"ADMIN", "correct horse battery", "admin (operator)"},
		{"watcher", "correct horse battery", "watcher (viewer)"},
		{"admin", "wrong horse battery", "wrong user name or password"},
		{"mallory", "correct horse battery", "wrong user name or password"},
	}
	for _, tc := range cases {
		t.Run(tc.user+"/"+tc.password, func(t *testing.T) {
			c := browser(t)
			_, body := post(t, c, f.url+"/login/local", url.Values{"user": {tc.user}, "password": {tc.password}, "next": {"/orgs/" + org}}, nil)
			if !strings.Contains(body, tc.want) {
				t.Errorf("want %q in\n%s", tc.want, body)
			}
		})
	}
}

// TestAPITokens checks bearer tokens: each role's token does what its role
// may, an unknown token or none gets 401, and a token needs no CSRF token
// (it is not a cookie a browser would send on its own).
func TestAPITokens(t *testing.T) {
	f := start(t, nil)
	var who console.Principal
	if code := f.api(t, "GET", "/whoami", "device-admin", nil, &who); code != 200 || who.Role != console.RoleDeviceAdmin || who.Name != "token:ci-device-admin" {
		t.Errorf("whoami: %d %+v", code, who)
	}
	cases := []struct {
		role string
		want int
	}{{"", http.StatusUnauthorized}, {"viewer", http.StatusForbidden}, {"operator", http.StatusOK}}
	for _, tc := range cases {
		t.Run("sync as "+tc.role, func(t *testing.T) {
			var out map[string]any
			if code := f.api(t, "POST", "/orgs/"+org+"/sync", tc.role, url.Values{"kind": {"quick"}}, &out); code != tc.want && !(tc.want == 200 && code == http.StatusConflict) {
				t.Errorf("got %d %v, want %d", code, out, tc.want)
			}
		})
	}
	t.Run("unknown token", func(t *testing.T) {
		req, _ := http.NewRequest("GET", f.url+"/api/v1/orgs", nil)
		req.Header.Set("Authorization", "Bearer nope")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("unknown token: %d", resp.StatusCode)
		}
	})
	t.Run("unknown org", func(t *testing.T) {
		if code := f.api(t, "GET", "/orgs/fabrikam", "viewer", nil, nil); code != http.StatusNotFound {
			t.Errorf("another organisation: %d", code)
		}
	})
}

// consoleSpec loads the console's settings as the binary does, under
// EASGUARD_CONSOLE_.
type consoleSpec struct{ Console console.Config }

func (s *consoleSpec) Validate() error { return s.Console.Validate() }

// TestConfigValidate names the variable of each broken setting.
func TestConfigValidate(t *testing.T) {
	users := filepath.Join(t.TempDir(), "users")
	write(t, users, "admin operator not-a-hash\n")
	ok := map[string]string{"EASGUARD_CONSOLE_ADDR": "127.0.0.1:8443", "EASGUARD_CONSOLE_OIDC_ISSUER": "https://login.example/v2.0", "EASGUARD_CONSOLE_OIDC_CLIENT_ID": "id"}
	with := func(kv ...string) map[string]string {
		m := maps.Clone(ok)
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	configtest.Check[consoleSpec](t, []configtest.Case{
		{Name: "ok", Env: ok},
		{Name: "off", Env: map[string]string{}},
		{Name: "plain beyond loopback", Env: with("EASGUARD_CONSOLE_ADDR", "0.0.0.0:8443"), Want: "EASGUARD_CONSOLE_ADDR"},
		{Name: "behind a proxy", Env: with("EASGUARD_CONSOLE_ADDR", "0.0.0.0:8443", "EASGUARD_CONSOLE_BEHIND_PROXY", "true")},
		{Name: "half TLS", Env: with("EASGUARD_CONSOLE_TLS_CERT_FILE", "/cert.pem"), Want: "EASGUARD_CONSOLE_TLS_CERT_FILE"},
		{Name: "no sign-in", Env: with("EASGUARD_CONSOLE_OIDC_ISSUER", ""), Want: "no way to sign in"},
		{Name: "no client id", Env: with("EASGUARD_CONSOLE_OIDC_CLIENT_ID", ""), Want: "EASGUARD_CONSOLE_OIDC_CLIENT_ID"},
		{Name: "session too long", Env: with("EASGUARD_CONSOLE_SESSION_TTL", "48h"), Want: "EASGUARD_CONSOLE_SESSION_TTL"},
		{Name: "trace URL", Env: with("EASGUARD_CONSOLE_TRACE_URL", "http://jaeger/trace/"), Want: "EASGUARD_CONSOLE_TRACE_URL"},
		{Name: "bad org", Env: with("EASGUARD_CONSOLE_ORGS", "Contoso Ltd"), Want: "EASGUARD_CONSOLE_ORGS"},
		{Name: "users file without hashes", Env: with("EASGUARD_CONSOLE_LOCAL_USERS_FILE", users), Want: "EASGUARD_CONSOLE_LOCAL_USERS_FILE"},
	})
}
