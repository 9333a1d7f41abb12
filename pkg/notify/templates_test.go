package notify_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/easguard/easguard/pkg/notify"
)

const enrolURL = "https://portal.contoso.com/enrol?src=mail&x=1"

// sample is a realistic notification for locale, state and reason.
func sample(locale, state, reason string) notify.Data {
	return notify.Data{
		Org: "contoso", Locale: locale, UserName: "Anna Müller", Recipient: "anna@contoso.com",
		DeviceType: "iPhone", DeviceModel: "iPhone15,2", DeviceOS: "iOS 17.4.1", DeviceID: "ApplF17XK0QJN735",
		FriendlyName: "Annas iPhone", State: state, Reason: reason, ReasonDetail: "Passcode required",
		EnrolURL: enrolURL, Helpdesk: "IT Service Desk, +49 30 1234-100, it@contoso.com", Company: "Contoso GmbH",
		Time: time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC),
	}
}

func render(tb testing.TB, t *notify.Templates, d notify.Data) notify.Rendered {
	tb.Helper()
	r, err := t.Render(d)
	if err != nil {
		tb.Fatalf("render %+v: %v", d, err)
	}
	return r
}

// TestRenderCoversEveryReasonStateAndLocale checks that each built-in
// message names the device, carries the link and the steps, and words the
// reason and state in the right language.
func TestRenderCoversEveryReasonStateAndLocale(t *testing.T) {
	reasonWords := map[string]map[string]string{
		"en": {
			notify.ReasonNotEnrolled: "not enrolled in device management", notify.ReasonNoncompliant: "does not currently meet the security requirements",
			notify.ReasonRetired: "removed (retired)", notify.ReasonPlatformNotAllowed: "not allowed to access work email",
			notify.ReasonOther: "does not meet the requirements",
		},
		"de": {
			notify.ReasonNotEnrolled: "nicht in der Geräteverwaltung", notify.ReasonNoncompliant: "erfüllt aber derzeit nicht die Sicherheitsanforderungen",
			notify.ReasonRetired: "aus der Geräteverwaltung entfernt", notify.ReasonPlatformNotAllowed: "nicht zugelassen",
			notify.ReasonOther: "erfüllt nicht die Voraussetzungen",
		},
	}
	stateWords := map[string]map[string]string{
		"en": {notify.StateBlocked: "from your work mailbox", notify.StateQuarantined: "placed in quarantine"},
		"de": {notify.StateBlocked: "gesperrt", notify.StateQuarantined: "unter Quarantäne gestellt"},
	}
	common := map[string][]string{
		"en": {"Hello Anna Müller", "Company Portal", "sign in with your work account", "compliant", "within a minute",
			"do not remove the email account", "IT Service Desk, ", "Contoso GmbH", "6 May 2024"},
		"de": {"Guten Tag Anna Müller", "Unternehmensportal", "dienstlichen Konto an", "konform", "innerhalb einer Minute",
			"E-Mail-Konto nicht", "IT Service Desk, ", "Contoso GmbH", "06.05.2024", "Sie"},
	}
	device := []string{"Annas iPhone", "iPhone15,2", "iOS 17.4.1", "ApplF17XK0QJN735", "Passcode required"}
	tpl := notify.DefaultTemplates()
	for _, loc := range []string{"en", "de"} {
		for _, state := range []string{notify.StateBlocked, notify.StateQuarantined} {
			for reason, word := range reasonWords[loc] {
				t.Run(loc+"/"+state+"/"+reason, func(t *testing.T) {
					r := render(t, tpl, sample(loc, state, reason))
					if !strings.Contains(r.Subject, "Annas iPhone") {
						t.Errorf("subject %q does not name the device", r.Subject)
					}
					for part, body := range map[string]string{"text": r.Text, "html": r.HTML} {
						want := append([]string{word, stateWords[loc][state]}, device...)
						want = append(want, common[loc]...)
						if part == "html" {
							want = append(want, `href="https://portal.contoso.com/enrol?src=mail&amp;x=1"`)
						} else {
							want = append(want, enrolURL)
						}
						for _, w := range want {
							if !strings.Contains(body, w) {
								t.Errorf("%s lacks %q:\n%s", part, w, body)
							}
						}
					}
					if loc == "de" && strings.Contains(r.Text, " you ") {
						t.Errorf("German text contains English:\n%s", r.Text)
					}
				})
			}
		}
	}
}

func TestRenderDistinguishesReasons(t *testing.T) {
	tpl := notify.DefaultTemplates()
	seen := map[string]string{}
	for _, reason := range []string{notify.ReasonNotEnrolled, notify.ReasonNoncompliant, notify.ReasonRetired, notify.ReasonPlatformNotAllowed, notify.ReasonOther} {
		r := render(t, tpl, sample("en", notify.StateBlocked, reason))
		if prev, ok := seen[r.Subject]; ok {
			t.Errorf("reasons %s and %s share the subject %q", prev, reason, r.Subject)
		}
		seen[r.Subject] = reason
	}
	blocked := render(t, tpl, sample("en", notify.StateBlocked, notify.ReasonOther))
	quarantined := render(t, tpl, sample("en", notify.StateQuarantined, notify.ReasonOther))
	if blocked.Subject == quarantined.Subject || blocked.Text == quarantined.Text {
		t.Error("blocked and quarantined read the same")
	}
}

func TestRenderLocaleAndFallbacks(t *testing.T) {
	tpl := notify.DefaultTemplates()
	longURL := "https://portal.contoso.com/enrol?token=" + strings.Repeat("x", 400)
	longName := strings.Repeat("N", 300)
	tests := []struct {
		name   string
		mutate func(*notify.Data)
		want   string // in the text body
	}{
		{"German", func(d *notify.Data) { d.Locale = "de" }, "Guten Tag"},
		{"German region", func(d *notify.Data) { d.Locale = "de-AT" }, "Guten Tag"},
		{"German underscore, upper case", func(d *notify.Data) { d.Locale = "DE_de" }, "Guten Tag"},
		{"unknown locale is English", func(d *notify.Data) { d.Locale = "fr" }, "Hello"},
		{"empty locale is English", func(d *notify.Data) { d.Locale = "" }, "Hello"},
		{"unknown reason reads as other", func(d *notify.Data) { d.Reason = "jailbroken" }, "does not meet the requirements"},
		{"unknown state reads as blocked", func(d *notify.Data) { d.State = "" }, "has been blocked"},
		{"no friendly name names the model", func(d *notify.Data) { d.FriendlyName = "" }, "“iPhone15,2”"},
		{"nothing known names a mobile device", func(d *notify.Data) { *d = notify.Data{} }, "“mobile device”"},
		{"German without names", func(d *notify.Data) { *d = notify.Data{Locale: "de"} }, "„Mobilgerät“"},
		{"no helpdesk", func(d *notify.Data) { d.Helpdesk = "" }, "Contact your IT helpdesk"},
		{"no company uses the org", func(d *notify.Data) { d.Company = "" }, "Your IT team, contoso"},
		{"long enrolment link is kept whole", func(d *notify.Data) { d.EnrolURL = longURL }, longURL + "\n"},
		{"long friendly name is cut", func(d *notify.Data) { d.FriendlyName = longName }, "“" + longName[:255] + "…”"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := sample("en", notify.StateBlocked, notify.ReasonNotEnrolled)
			tt.mutate(&d)
			r := render(t, tpl, d)
			if !strings.Contains(r.Text, tt.want) {
				t.Errorf("text lacks %q:\n%s", tt.want, r.Text)
			}
			if r.Subject == "" || r.HTML == "" {
				t.Error("empty subject or HTML")
			}
		})
	}
}

// TestRenderEscapesHostileValues feeds what a hostile phone can report
// (device ids and friendly names are chosen by the phone) and checks the
// HTML escapes it and the subject stays one bounded line.
func TestRenderEscapesHostileValues(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*notify.Data)
	}{
		{"script in the friendly name", func(d *notify.Data) { d.FriendlyName = `<script>alert("x")</script>` }},
		{"quotes and tags in the device id", func(d *notify.Data) { d.DeviceID = `"><img src=x onerror=alert(1)>` }},
		{"header injection in the friendly name", func(d *notify.Data) { d.FriendlyName = "Phone\r\nBcc: victim@evil.test\r\n\r\nbody" }},
		{"header injection via unicode line separators", func(d *notify.Data) { d.FriendlyName = "Phone\u2028Bcc: victim@evil.test\u0085x" }},
		{"javascript enrolment URL", func(d *notify.Data) { d.EnrolURL = "javascript:alert(1)" }},
		{"very long friendly name", func(d *notify.Data) { d.FriendlyName = strings.Repeat("A very long name ", 100) }},
		{"invalid UTF-8", func(d *notify.Data) { d.FriendlyName = "bad\xff\xfe name" }},
	}
	for _, loc := range []string{"en", "de"} {
		for _, tt := range tests {
			t.Run(loc+"/"+tt.name, func(t *testing.T) {
				d := sample(loc, notify.StateQuarantined, notify.ReasonNotEnrolled)
				tt.mutate(&d)
				r := render(t, notify.DefaultTemplates(), d)
				assertSafeSubject(t, r.Subject)
				for _, bad := range []string{"<script", "<img", `href="javascript`, "\u2028"} {
					if strings.Contains(r.HTML, bad) {
						t.Errorf("HTML contains %q unescaped:\n%s", bad, r.HTML)
					}
				}
				if strings.Contains(r.Text, "\r\nBcc:") || strings.Contains(r.Text, "\nBcc:") {
					t.Errorf("text body carries the injected line:\n%s", r.Text)
				}
				if !utf8.ValidString(r.Subject) || !utf8.ValidString(r.Text) || !utf8.ValidString(r.HTML) {
					t.Error("output is not valid UTF-8")
				}
			})
		}
	}
	t.Run("escaped forms are present", func(t *testing.T) {
		d := sample("en", notify.StateBlocked, notify.ReasonNotEnrolled)
		d.FriendlyName = `<script>alert("x")</script>`
		r := render(t, notify.DefaultTemplates(), d)
		if !strings.Contains(r.HTML, "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") {
			t.Errorf("HTML lacks the escaped friendly name:\n%s", r.HTML)
		}
	})
}

func assertSafeSubject(tb testing.TB, s string) {
	tb.Helper()
	if strings.ContainsAny(s, "\r\n\t\u0085\u2028\u2029") {
		tb.Errorf("subject has a line break or control character: %q", s)
	}
	if n := utf8.RuneCountInString(s); n > notify.MaxSubjectLen || n == 0 {
		tb.Errorf("subject has %d characters, want 1..%d: %q", n, notify.MaxSubjectLen, s)
	}
	if strings.Contains(s, "  ") {
		tb.Errorf("subject has runs of spaces: %q", s)
	}
}

// writeTree creates files (path relative to the returned dir → content).
func writeTree(tb testing.TB, files map[string]string) string {
	tb.Helper()
	dir := tb.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	return dir
}

func TestLoadTemplatesOverrides(t *testing.T) {
	dir := writeTree(t, map[string]string{
		"en/subject.txt.tmpl": "Contoso: {{.DeviceName}}\n is {{.State}}",
		"de/body.txt.tmpl":    "Hallo {{.UserName}}, Link: {{.EnrolURL}}",
		"fr/subject.txt.tmpl": "Votre appareil {{.DeviceName}} est bloqué",
		"fr/body.html.tmpl":   `<p>Bonjour {{.UserName}} <a href="{{.EnrolURL}}">inscrire</a></p>`,
		"en/README.md":        "notes are ignored",
	})
	tpl, err := notify.LoadTemplates(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(tpl.Locales(), ","); got != "de,en,fr" {
		t.Errorf("locales %s, want de,en,fr", got)
	}
	def := notify.DefaultTemplates()
	tests := []struct {
		name   string
		locale string
		check  func(t *testing.T, got, builtin notify.Rendered)
	}{
		{"en subject overridden, whitespace collapsed", "en", func(t *testing.T, got, builtin notify.Rendered) {
			if got.Subject != "Contoso: Annas iPhone is blocked" {
				t.Errorf("subject %q", got.Subject)
			}
			if got.Text != builtin.Text || got.HTML != builtin.HTML {
				t.Error("en bodies are not the built-in ones")
			}
		}},
		{"de text overridden, rest built in", "de", func(t *testing.T, got, builtin notify.Rendered) {
			if got.Text != "Hallo Anna Müller, Link: "+enrolURL {
				t.Errorf("text %q", got.Text)
			}
			if got.Subject != builtin.Subject || got.HTML != builtin.HTML {
				t.Error("de subject or HTML is not the built-in one")
			}
		}},
		{"new locale falls back to English for missing files", "fr", func(t *testing.T, got, _ notify.Rendered) {
			en := render(t, def, sample("en", notify.StateBlocked, notify.ReasonNotEnrolled))
			if got.Subject != "Votre appareil Annas iPhone est bloqué" || !strings.Contains(got.HTML, "Bonjour Anna Müller") {
				t.Errorf("fr overrides not used: %+v", got)
			}
			if got.Text != en.Text {
				t.Error("fr text is not the English built-in one")
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := sample(tt.locale, notify.StateBlocked, notify.ReasonNotEnrolled)
			tt.check(t, render(t, tpl, d), render(t, def, d))
		})
	}
}

func TestLoadTemplatesRejectsBrokenTemplates(t *testing.T) {
	tests := []struct {
		name     string
		files    map[string]string
		wantFile string
		wantText string
	}{
		{"parse error in HTML", map[string]string{"en/body.html.tmpl": "<p>{{if .UserName}}</p>"}, "en/body.html.tmpl", "unexpected EOF"},
		{"unknown field in text", map[string]string{"de/body.txt.tmpl": "Hallo {{.Vorname}}"}, "de/body.txt.tmpl", "Vorname"},
		{"error only in one branch", map[string]string{"en/subject.txt.tmpl": `{{if eq .Reason "retired"}}{{.Nope}}{{else}}ok{{end}}`}, "en/subject.txt.tmpl", "Nope"},
		{"empty subject", map[string]string{"fr/subject.txt.tmpl": "{{/* nothing */}}  \n"}, "fr/subject.txt.tmpl", "subject is empty"},
		{"HTML ending inside an attribute", map[string]string{"en/body.html.tmpl": `<a href="{{.EnrolURL}}>Link</a>`}, "en/body.html.tmpl", "non-text context"},
		{"misspelt file name", map[string]string{"en/body.htm.tmpl": "x"}, "en/body.htm.tmpl", "unexpected file name"},
		{"template outside a locale directory", map[string]string{"subject.txt.tmpl": "x"}, "", "must be in a locale directory"},
		{"upper-case locale directory", map[string]string{"DE/subject.txt.tmpl": "x"}, "", "must be lower case"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := writeTree(t, tt.files)
			_, err := notify.LoadTemplates(dir)
			if err == nil {
				t.Fatal("loaded")
			}
			if want := filepath.Join(dir, filepath.FromSlash(tt.wantFile)); !strings.Contains(err.Error(), want) {
				t.Errorf("error does not name %s: %v", want, err)
			}
			if !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("error does not say %q: %v", tt.wantText, err)
			}
		})
	}
	t.Run("missing directory", func(t *testing.T) {
		missing := filepath.Join(t.TempDir(), "nope")
		if _, err := notify.LoadTemplates(missing); err == nil || !strings.Contains(err.Error(), missing) {
			t.Errorf("got %v, want an error naming %s", err, missing)
		}
	})
}
