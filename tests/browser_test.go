//go:build browser

package tests

import (
	"context"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/oauth2-proxy/mockoidc"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/console"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
)

// chromium finds Debian's chromium; the browser suite is run by
// `make browser-test` (and .ci/run, which installs it), so a missing
// browser is a failure, not a skip.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("no chromium: install Debian's chromium package (make browser-test needs it)")
	return ""
}

// TestConsoleInABrowser is the console's acceptance: an operator signs in
// through the OpenID provider, sees the overview, starts a full sync and
// sees its time change, finds the demo phone and opens its history,
// approves a held mass revocation and sees the devices blocked on the
// simulated Exchange; a viewer is refused the actions.
func TestConsoleInABrowser(t *testing.T) {
	exe := chromium(t)
	idp, err := mockoidc.Run()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = idp.Shutdown() })
	s := startStack(t, stackOptions{
		evaluate: func(c *evaluator.Config) { c.BlastRadius, c.BlastMinimum = 0.5, 3 },
		console: func(c *console.Config) {
			c.OIDCIssuer, c.OIDCClientID, c.OIDCClientSecret = idp.Issuer(), idp.ClientID, config.Secret(idp.ClientSecret)
			c.OIDCScopes, c.OIDCRolesClaim = []string{"openid", "profile", "email", "groups"}, "groups"
			c.OIDCViewerRoles, c.OIDCOperatorRoles = []string{"easguard-viewers"}, []string{"easguard-operators"}
		},
	})
	demo := iPhone("alice@contoso.com", "ApplDEMO0000001")
	s.waitFullSync()
	s.phoneSync(demo)
	s.waitPhone(demo, "Blocked", 30*time.Second)

	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(exe), chromedp.NoSandbox)
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancel)
	run := func(ctx context.Context, what string, actions ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		if err := chromedp.Do(tctx, actions...); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	text := func(ctx context.Context, sel string) string {
		t.Helper()
		tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		v, err := chromedp.Run(tctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("read %s: %v", sel, err)
		}
		return strings.TrimSpace(v)
	}
	eval := func(ctx context.Context, what, js string) string {
		t.Helper()
		tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		v, err := chromedp.Run(tctx, chromedp.Evaluate[string](js))
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		return v
	}

	op, cancelOp := chromedp.NewContext(actx)
	t.Cleanup(cancelOp)
	// The first action on a tab's own context starts the browser and the
	// tab; a deadline's context would close them when it ends.
	if err := chromedp.Do(op); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	idp.QueueUser(&mockoidc.MockUser{Subject: "olga", PreferredUsername: "olga@contoso.com", Groups: []string{"easguard-operators"}})
	run(op, "sign in", chromedp.Navigate(s.consoleURL+"/"), chromedp.WaitVisible(chromedp.CSS("#sso")), chromedp.Click(chromedp.CSS("#sso")),
		chromedp.WaitVisible(chromedp.CSS("#guard")))
	if who := text(op, "#who"); who != "olga@contoso.com (operator)" {
		t.Fatalf("signed in as %q", who)
	}

	// A full sync from the overview: its time changes.
	before := text(op, "#last-ok-full")
	run(op, "full sync", chromedp.Click(chromedp.CSS("#sync-full")), chromedp.WaitVisible(chromedp.CSS("#done")))
	if done := text(op, "#done"); !strings.Contains(done, "full sync requested") {
		t.Fatalf("after the click: %q", done)
	}
	natstest.Eventually(t, 60*time.Second, "the last full sync's time to change on the overview", func() bool {
		run(op, "reload", chromedp.Reload(), chromedp.WaitVisible(chromedp.CSS("#last-ok-full")))
		return text(op, "#last-ok-full") != before
	})

	// The demo phone, found by its id, and its history.
	run(op, "search for the phone", chromedp.Click(chromedp.CSS("#devices-link")), chromedp.WaitVisible(chromedp.CSS("#q")),
		chromedp.SendKeys(chromedp.CSS("#q"), demo.DeviceID), chromedp.Click(chromedp.CSS("#search")))
	// The unfiltered list shows the phone's link too: wait for the
	// results page, or the click below may find the link on the list the
	// search is replacing ("Could not find node with given id").
	natstest.Eventually(t, 30*time.Second, "the search's results page", func() bool {
		tctx, cancel := context.WithTimeout(op, 5*time.Second)
		defer cancel()
		v, err := chromedp.Run(tctx, chromedp.Evaluate[string](`new URLSearchParams(location.search).get("q") === `+strconv.Quote(demo.DeviceID)+
			` && document.readyState === "complete" ? "results" : ""`))
		return err == nil && v == "results"
	})
	run(op, "open the phone", chromedp.WaitVisible(chromedp.CSS(`a[href$="/devices/`+demo.DeviceID+`"]`)),
		chromedp.Click(chromedp.CSS(`a[href$="/devices/`+demo.DeviceID+`"]`)), chromedp.WaitVisible(chromedp.CSS("#history")))
	history := text(op, "#history")
	for _, want := range []string{"Exchange: new partnership of alice@contoso.com", "No match", "Decided Block", "Applied on", "Set-CASMailbox"} {
		if !strings.Contains(history, want) {
			t.Errorf("the history lacks %q:\n%s", want, history)
		}
	}

	// A mass revocation the guard holds, approved from the overview.
	phones, _ := s.massRevocation("ApplAPPROVE0")
	natstest.Eventually(t, 60*time.Second, "the guard tripped on the overview", func() bool {
		run(op, "overview", chromedp.Navigate(s.consoleURL+"/orgs/"+s.org), chromedp.WaitVisible(chromedp.CSS("#guard-state")))
		return text(op, "#guard-state") == "tripped"
	})
	run(op, "approve", chromedp.SendKeys(chromedp.CSS("#approve-reason"), "the three phones were stolen"), chromedp.Click(chromedp.CSS("#approve")),
		chromedp.WaitVisible(chromedp.CSS("#confirm")), chromedp.Click(chromedp.CSS("#confirm")), chromedp.WaitVisible(chromedp.CSS("#done")))
	if done := text(op, "#done"); !strings.Contains(done, "approved") {
		t.Fatalf("after approving: %q", done)
	}
	for _, p := range phones[:3] {
		s.waitPhone(p, "Blocked", 60*time.Second)
	}
	if r := s.phoneSync(phones[3]); r.State != "Allowed" {
		t.Errorf("the compliant phone lost mail: %+v", r)
	}

	// A viewer sees and is refused.
	vctx, cancelV := chromedp.NewContext(actx)
	t.Cleanup(cancelV)
	if err := chromedp.Do(vctx); err != nil {
		t.Fatalf("second tab: %v", err)
	}
	idp.QueueUser(&mockoidc.MockUser{Subject: "vera", PreferredUsername: "vera@contoso.com", Groups: []string{"easguard-viewers"}})
	run(vctx, "viewer signs in", chromedp.Navigate(s.consoleURL+"/"), chromedp.WaitVisible(chromedp.CSS("#sso")), chromedp.Click(chromedp.CSS("#sso")),
		chromedp.WaitVisible(chromedp.CSS("#guard")))
	if n := eval(vctx, "count action buttons", `String(document.querySelectorAll("#sync-full, #sync-quick, #approve, #discard").length)`); n != "0" {
		t.Errorf("a viewer is offered %s actions", n)
	}
	// The form an operator would post, posted by the viewer's browser
	// with the viewer's own session and token: refused.
	eval(vctx, "viewer posts a sync", `(() => { const f = document.createElement("form"); f.method = "post"; f.action = "/orgs/`+s.org+`/sync";
		for (const [k, v] of [["kind", "full"], ["csrf", document.querySelector("input[name=csrf]").value]]) { const i = document.createElement("input"); i.type = "hidden"; i.name = k; i.value = v; f.appendChild(i); }
		document.body.appendChild(f); f.submit(); return "sent"; })()`)
	run(vctx, "the refusal", chromedp.WaitVisible(chromedp.CSS("#error")))
	if refused := text(vctx, "#error"); !strings.Contains(refused, "needs the operator role") {
		t.Errorf("a viewer's sync: %q", refused)
	}
}
