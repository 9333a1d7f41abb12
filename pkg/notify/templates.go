// Package notify tells a user why their phone lost access to work email and
// how to get it back: it renders the notification from templates (English
// and German built in, overridable per locale) and sends it over SMTP with
// go-mail, classifying every failure as transient, permanent or an
// authentication problem so the caller knows whether to retry.
package notify

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	htmltemplate "html/template"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	texttemplate "text/template"
	"time"
	"unicode"
	"unicode/utf8"
)

// The states and reasons the built-in templates word differently. Render
// maps any other State to StateBlocked and any other Reason to
// ReasonOther, so a policy that grows a new reason still sends a sensible
// mail instead of failing.
const (
	StateBlocked     = "blocked"
	StateQuarantined = "quarantined"

	ReasonNotEnrolled        = "not_enrolled"
	ReasonNoncompliant       = "noncompliant"
	ReasonRetired            = "retired"
	ReasonPlatformNotAllowed = "platform_not_allowed"
	ReasonOther              = "other"
)

// The file names LoadTemplates looks for in each locale directory.
const (
	SubjectFile  = "subject.txt.tmpl"
	TextBodyFile = "body.txt.tmpl"
	HTMLBodyFile = "body.html.tmpl"
)

// DefaultLocale is used for any locale without templates of its own,
// because a mail in English is better than no mail.
const DefaultLocale = "en"

// MaxSubjectLen caps the rendered subject in characters: mail clients cut
// long subjects anyway, and a hostile friendly name must not make a
// header that some relays reject.
const MaxSubjectLen = 200

// maxFieldLen caps each value the phone chooses (device id, friendly name,
// model...) before rendering, so a hostile phone cannot bloat the mail.
const maxFieldLen = 256

// Data is what a notification template may use. Values the phone reports
// (device type, model, OS, id, friendly name) are untrusted: Render strips
// control characters from them and html/template escapes them in HTML.
type Data struct {
	Org, Locale         string // Locale "en" or "de"
	UserName, Recipient string // display name, address
	DeviceType          string
	DeviceModel         string
	DeviceOS            string
	DeviceID            string
	FriendlyName        string
	State               string // "blocked" or "quarantined"
	Reason              string // "not_enrolled", "noncompliant", "retired", "platform_not_allowed" or "other"
	ReasonDetail        string // free text from the policy, may be empty
	EnrolURL            string
	Helpdesk            string
	Company             string
	Time                time.Time
}

// DeviceName is how the mail names the device to its owner: the name the
// user gave it if any, else its model or type, because "Anna's iPhone"
// tells the user which device is meant far better than an id does.
func (d Data) DeviceName() string {
	for _, s := range []string{d.FriendlyName, d.DeviceModel, d.DeviceType} {
		if strings.TrimSpace(s) != "" {
			return s
		}
	}
	if strings.HasPrefix(strings.ToLower(d.Locale), "de") {
		return "Mobilgerät"
	}
	return "mobile device"
}

// Rendered is a notification ready to send: a single-line subject and the
// same message as plain text and as HTML, so every mail client shows it.
type Rendered struct{ Subject, Text, HTML string }

// Templates holds parsed templates per locale. It is immutable after
// construction and safe for concurrent use.
type Templates struct {
	locales map[string]*localeSet
}

type localeSet struct {
	subject *texttemplate.Template
	text    *texttemplate.Template
	html    *htmltemplate.Template
}

//go:embed templates
var embedded embed.FS

var defaults = mustDefaults()

func mustDefaults() *Templates {
	t, err := loadTemplates(nil, "")
	if err != nil {
		panic(fmt.Sprintf("notify: built-in templates are broken: %v", err))
	}
	return t
}

// DefaultTemplates returns the built-in English and German templates. They
// are parsed and tried with every state and reason when the program
// starts, so they cannot fail at send time.
func DefaultTemplates() *Templates { return defaults }

// LoadTemplates returns the built-in templates overridden by the files in
// dir/<locale>/ (subject.txt.tmpl, body.txt.tmpl, body.html.tmpl). A file
// that is missing falls back to the built-in one of that locale, or to
// English for a locale easguard has no texts for, so an administrator can
// change just one part. Every template is executed with sample data for
// every state and reason at load, so a broken template stops the program
// at start with an error naming the file, not at the first blocked phone.
func LoadTemplates(dir string) (*Templates, error) {
	info, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("notify: load templates: %w", err)
	}
	if !info.IsDir() {
		return nil, fmt.Errorf("notify: load templates: %s is not a directory", dir)
	}
	return loadTemplates(os.DirFS(dir), dir)
}

// loadTemplates builds the locale sets from the embedded defaults and, when
// override is not nil, the files in it; dir is only used in messages.
func loadTemplates(override fs.FS, dir string) (*Templates, error) {
	builtin, err := fs.Sub(embedded, "templates")
	if err != nil {
		return nil, fmt.Errorf("notify: load templates: %w", err)
	}
	locales, err := localeDirs(builtin)
	if err != nil {
		return nil, fmt.Errorf("notify: load templates: %w", err)
	}
	if override != nil {
		extra, err := localeDirs(override)
		if err != nil {
			return nil, fmt.Errorf("notify: load templates from %s: %w", dir, err)
		}
		locales = mergeSorted(locales, extra)
	}
	t := &Templates{locales: map[string]*localeSet{}}
	for _, loc := range locales {
		if override != nil {
			if err := checkFileNames(override, loc, dir); err != nil {
				return nil, err
			}
		}
		read := func(name string) (string, string, error) {
			if override != nil {
				b, err := fs.ReadFile(override, loc+"/"+name)
				if err == nil {
					return string(b), filepath.Join(dir, loc, name), nil
				}
				if !errors.Is(err, fs.ErrNotExist) {
					return "", "", fmt.Errorf("notify: load templates: %w", err)
				}
			}
			fallback := loc
			if _, err := fs.Stat(builtin, loc); err != nil {
				fallback = DefaultLocale
			}
			b, err := fs.ReadFile(builtin, fallback+"/"+name)
			if err != nil {
				return "", "", fmt.Errorf("notify: load built-in template %s/%s: %w", fallback, name, err)
			}
			return string(b), "built-in " + fallback + "/" + name, nil
		}
		set, err := parseLocale(read)
		if err != nil {
			return nil, err
		}
		t.locales[loc] = set
	}
	if _, ok := t.locales[DefaultLocale]; !ok {
		return nil, fmt.Errorf("notify: load templates: no %q templates", DefaultLocale)
	}
	return t, nil
}

// parseLocale parses one locale's three templates and tries them.
func parseLocale(read func(name string) (src, origin string, err error)) (*localeSet, error) {
	set := &localeSet{}
	var origins [3]string
	for i, name := range []string{SubjectFile, TextBodyFile, HTMLBodyFile} {
		src, origin, err := read(name)
		if err != nil {
			return nil, err
		}
		origins[i] = origin
		switch name {
		case SubjectFile:
			set.subject, err = texttemplate.New(origin).Option("missingkey=error").Parse(src)
		case TextBodyFile:
			set.text, err = texttemplate.New(origin).Option("missingkey=error").Parse(src)
		case HTMLBodyFile:
			set.html, err = htmltemplate.New(origin).Option("missingkey=error").Parse(src)
		}
		if err != nil {
			return nil, fmt.Errorf("notify: template %s: %w", origin, err)
		}
	}
	for _, d := range sampleData() {
		var subj, text, html bytes.Buffer
		if err := set.subject.Execute(&subj, d); err != nil {
			return nil, fmt.Errorf("notify: template %s: %w", origins[0], err)
		}
		if cleanSubject(subj.String()) == "" {
			return nil, fmt.Errorf("notify: template %s: subject is empty for state %q and reason %q", origins[0], d.State, d.Reason)
		}
		if err := set.text.Execute(&text, d); err != nil {
			return nil, fmt.Errorf("notify: template %s: %w", origins[1], err)
		}
		if err := set.html.Execute(&html, d); err != nil {
			return nil, fmt.Errorf("notify: template %s: %w", origins[2], err)
		}
	}
	return set, nil
}

// sampleData covers every state and reason, with and without the optional
// values, so each branch of a template runs once at load.
func sampleData() []Data {
	full := Data{
		Org: "contoso", Locale: "en", UserName: "Alex Example", Recipient: "alex@example.com",
		DeviceType: "iPhone", DeviceModel: "iPhone 15", DeviceOS: "iOS 17.4", DeviceID: "ABCDEF0123456789",
		FriendlyName: "Alex's iPhone", ReasonDetail: "Screen lock is not set.",
		EnrolURL: "https://portal.manage.microsoft.com/", Helpdesk: "the IT helpdesk (+1 555 0100)",
		Company: "Contoso Ltd.", Time: time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC),
	}
	var out []Data
	for _, st := range []string{StateBlocked, StateQuarantined} {
		for _, r := range []string{ReasonNotEnrolled, ReasonNoncompliant, ReasonRetired, ReasonPlatformNotAllowed, ReasonOther} {
			d := full
			d.State, d.Reason = st, r
			out = append(out, d, Data{State: st, Reason: r, Locale: "en"})
		}
	}
	return out
}

// localeDirs lists the locale directories at the top of fsys. Template
// files outside a locale directory, and locale names Render could never
// select (it lower-cases the wanted locale), are errors rather than
// silently unused overrides.
func localeDirs(fsys fs.FS) ([]string, error) {
	entries, err := fs.ReadDir(fsys, ".")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		n := e.Name()
		switch {
		case strings.HasPrefix(n, "."):
		case e.IsDir() && n != strings.ToLower(n):
			return nil, fmt.Errorf("locale directory %q must be lower case", n)
		case e.IsDir():
			out = append(out, n)
		case strings.HasSuffix(n, ".tmpl"):
			return nil, fmt.Errorf("template %s must be in a locale directory such as %s/", n, DefaultLocale)
		}
	}
	sort.Strings(out)
	return out, nil
}

// checkFileNames refuses template files with unexpected names, because a
// typo such as body.htm.tmpl would otherwise silently send the built-in
// text the administrator meant to replace.
func checkFileNames(fsys fs.FS, loc, dir string) error {
	entries, err := fs.ReadDir(fsys, loc)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("notify: load templates: %w", err)
	}
	for _, e := range entries {
		n := e.Name()
		if !strings.HasSuffix(n, ".tmpl") || n == SubjectFile || n == TextBodyFile || n == HTMLBodyFile {
			continue
		}
		return fmt.Errorf("notify: template %s: unexpected file name (want %s, %s or %s)",
			filepath.Join(dir, loc, n), SubjectFile, TextBodyFile, HTMLBodyFile)
	}
	return nil
}

func mergeSorted(a, b []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range append(append([]string(nil), a...), b...) {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	sort.Strings(out)
	return out
}

// Render produces the notification for d in d.Locale ("de-AT" and "de_DE"
// use "de"; a locale without templates uses English). The subject is one
// line of at most MaxSubjectLen characters whatever the templates and
// values produce, so it can never inject a header.
func (t *Templates) Render(d Data) (Rendered, error) {
	d = sanitize(d)
	loc, set := t.locale(d.Locale)
	d.Locale = loc
	var subj, text, html bytes.Buffer
	if err := set.subject.Execute(&subj, d); err != nil {
		return Rendered{}, fmt.Errorf("notify: render subject (%s): %w", loc, err)
	}
	if err := set.text.Execute(&text, d); err != nil {
		return Rendered{}, fmt.Errorf("notify: render text body (%s): %w", loc, err)
	}
	if err := set.html.Execute(&html, d); err != nil {
		return Rendered{}, fmt.Errorf("notify: render HTML body (%s): %w", loc, err)
	}
	return Rendered{Subject: cleanSubject(subj.String()), Text: text.String(), HTML: html.String()}, nil
}

// Locales lists the locales that have templates, for configuration checks.
func (t *Templates) Locales() []string {
	out := make([]string, 0, len(t.locales))
	for l := range t.locales {
		out = append(out, l)
	}
	sort.Strings(out)
	return out
}

func (t *Templates) locale(want string) (string, *localeSet) {
	want = strings.ToLower(strings.TrimSpace(want))
	if s, ok := t.locales[want]; ok {
		return want, s
	}
	if i := strings.IndexAny(want, "-_"); i > 0 {
		if s, ok := t.locales[want[:i]]; ok {
			return want[:i], s
		}
	}
	return DefaultLocale, t.locales[DefaultLocale]
}

// sanitize normalises the state and reason and makes the values a phone
// chooses single-line and bounded; the policy's ReasonDetail keeps its line
// breaks but loses other control characters.
func sanitize(d Data) Data {
	switch d.State {
	case StateBlocked, StateQuarantined:
	default:
		d.State = StateBlocked
	}
	switch d.Reason {
	case ReasonNotEnrolled, ReasonNoncompliant, ReasonRetired, ReasonPlatformNotAllowed, ReasonOther:
	default:
		d.Reason = ReasonOther
	}
	// The phone and the directory choose these; cap them.
	for _, p := range []*string{&d.UserName, &d.Recipient, &d.DeviceType, &d.DeviceModel, &d.DeviceOS,
		&d.DeviceID, &d.FriendlyName} {
		*p = truncate(oneLine(*p), maxFieldLen)
	}
	// The administrator configures these; a cut enrolment link would be
	// worse than a long one, so they are only made single-line.
	for _, p := range []*string{&d.Org, &d.EnrolURL, &d.Helpdesk, &d.Company} {
		*p = oneLine(*p)
	}
	d.ReasonDetail = truncate(strings.Map(func(r rune) rune {
		if r == '\n' {
			return r
		}
		if unicode.IsControl(r) || r == '\u2028' || r == '\u2029' {
			return -1
		}
		return r
	}, strings.ReplaceAll(d.ReasonDetail, "\r\n", "\n")), 4*maxFieldLen)
	if d.Company == "" {
		d.Company = d.Org
	}
	return d
}

// oneLine replaces line breaks and other control characters with spaces
// and collapses runs of white space.
func oneLine(s string) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || unicode.IsSpace(r) || r == '\u2028' || r == '\u2029' {
			return ' '
		}
		return r
	}, strings.ToValidUTF8(s, "\uFFFD"))
	return strings.Join(strings.Fields(s), " ")
}

// cleanSubject is the last defence against header injection: whatever the
// template did, the subject is one line without control characters.
func cleanSubject(s string) string {
	return truncate(oneLine(s), MaxSubjectLen)
}

// truncate cuts s to at most n characters, ending in "…" when cut.
func truncate(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return strings.TrimSpace(string(r[:n-1])) + "…"
}
