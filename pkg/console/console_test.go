package console_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"

	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/oauth2-proxy/mockoidc"
	"golang.org/x/crypto/bcrypt"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/console"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
)

const org = "contoso"

// fixture is a console on a real in-process JetStream server, signing in
// against a real OpenID provider (mockoidc), a users file and a tokens file.
type fixture struct {
	url    string
	nc     *nats.Conn
	js     jetstream.JetStream
	pub    *bus.Publisher
	idp    *mockoidc.MockOIDC
	tokens map[string]string // role → token
}

func start(t testing.TB, mut func(*console.Config)) *fixture {
	t.Helper()
	_, nc, js := natstest.Start(t)
	ctx := natstest.Context(t)
	if err := bus.Provision(ctx, js, bus.DefaultTopology()); err != nil {
		t.Fatal(err)
	}
	pub, err := bus.NewPublisher(js, bus.Instrumentation{})
	if err != nil {
		t.Fatal(err)
	}
	idp, err := mockoidc.Run()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = idp.Shutdown() })
	dir := t.TempDir()
	hash, _ := bcrypt.GenerateFromPassword([]byte("correct horse battery"), bcrypt.MinCost)
	users := filepath.Join(dir, "users")
	write(t, users, fmt.Sprintf("# break glass\nadmin operator %s\nwatcher viewer %s\n", hash, hash))
	f := &fixture{nc: nc, js: js, pub: pub, idp: idp, tokens: map[string]string{}}
	var lines []string
	for _, role := range []string{"viewer", "operator", "device-admin"} {
		f.tokens[role] = "tok-" + role + "-0123456789abcdef"
		lines = append(lines, fmt.Sprintf("ci-%s %s %s", role, role, console.HashToken(f.tokens[role])))
	}
	tokens := filepath.Join(dir, "tokens")
	write(t, tokens, strings.Join(lines, "\n")+"\n")
	cfg := console.Config{Addr: "127.0.0.1:0", OIDCIssuer: idp.Issuer(), OIDCClientID: idp.ClientID,
		OIDCScopes: []string{"openid", "profile", "email", "groups"}, OIDCRolesClaim: "groups",
		OIDCViewerRoles: []string{"easguard-viewers"}, OIDCOperatorRoles: []string{"easguard-operators"}, OIDCDeviceAdminRoles: []string{"easguard-device-admins"},
		LocalUsersFile: users, TokensFile: tokens, SessionTTL: time.Hour, TraceURL: "http://jaeger.test/trace/{trace_id}"}
	cfg.OIDCClientSecret = config.Secret(idp.ClientSecret)
	if mut != nil {
		mut(&cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	ln, err := console.Listen(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := console.New(ctx, cfg, org, ln.Addr().String(), js, pub, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { _ = srv.Serve(sctx, ln); done <- struct{}{} }()
	go func() { _ = srv.Run(sctx); done <- struct{}{} }()
	t.Cleanup(func() { cancel(); <-done; <-done })
	f.url = srv.URL()
	return f
}

func write(t testing.TB, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

// browser is an HTTP client with a cookie jar, as a browser signs in.
func browser(t testing.TB) *http.Client {
	t.Helper()
	jar, _ := cookiejar.New(nil)
	return &http.Client{Jar: jar, Timeout: 30 * time.Second}
}

func get(t testing.TB, c *http.Client, u string) (int, string) {
	t.Helper()
	resp, err := c.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

var csrfField = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// csrf is the session's form token, read off a page as a browser has it.
func csrf(t testing.TB, page string) string {
	t.Helper()
	m := csrfField.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no CSRF token on the page:\n%s", page)
	}
	return m[1]
}

func post(t testing.TB, c *http.Client, u string, form url.Values, hdr map[string]string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, u, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// signIn signs in through the OpenID provider as a user of these groups
// and returns the overview page.
func (f *fixture) signIn(t testing.TB, c *http.Client, name string, groups ...string) (int, string) {
	t.Helper()
	f.idp.QueueUser(&mockoidc.MockUser{Subject: "sub-" + name, PreferredUsername: name, Email: name + "@contoso.com", Groups: groups})
	return get(t, c, f.url+"/login/oidc?next="+url.QueryEscape("/orgs/"+org))
}

func (f *fixture) api(t testing.TB, method, path, role string, form url.Values, out any) int {
	t.Helper()
	code, b := f.call(t, method, path, role, form)
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: %d %s: %v", method, path, code, b, err)
		}
	}
	return code
}

// raw reads path of the API as it comes (an export); anything but 200
// fails the test.
func (f *fixture) raw(t testing.TB, path, role string) string {
	t.Helper()
	code, b := f.call(t, http.MethodGet, path, role, nil)
	if code != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, code, b)
	}
	return string(b)
}

// call sends one API request with role's token (none for "").
func (f *fixture) call(t testing.TB, method, path, role string, form url.Values) (int, []byte) {
	t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, _ := http.NewRequest(method, f.url+"/api/v1"+path, body)
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	if role != "" {
		req.Header.Set("Authorization", "Bearer "+f.tokens[role])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}
