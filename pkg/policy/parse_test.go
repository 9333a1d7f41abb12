package policy

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

func TestLoadExample(t *testing.T) {
	p, err := Load(filepath.Join("testdata", "contoso.yaml"))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	want := &Policy{
		SchemaVersion: 1,
		Org:           "contoso",
		Scope: Scope{
			Include: Selector{Domains: []string{"contoso.com"}, Groups: []string{"all-staff"}},
			Exclude: Selector{Mailboxes: []string{"ceo@contoso.com", "healthmailbox*@contoso.com"}, Groups: []string{"service-accounts"}},
		},
		Groups: map[string][]string{
			"all-staff":        {"*@contoso.com"},
			"service-accounts": {"svc-*@contoso.com"},
		},
		UnknownDevice:      ActionBlock,
		Noncompliant:       ActionBlock,
		AllowedPlatforms:   []ev.Platform{ev.Platform_PLATFORM_IOS, ev.Platform_PLATFORM_IPADOS, ev.Platform_PLATFORM_ANDROID},
		PlatformNotAllowed: ActionBlock,
		Exemptions: []Exemption{
			{Mailbox: "cfo@contoso.com", DeviceID: "ApplF17LTTCGFFG8", Reason: "CFO iPhone, INC-4711", Until: time.Date(2026, 12, 31, 0, 0, 0, 0, time.UTC)},
			{Mailbox: "helpdesk@contoso.com", Reason: "shared helpdesk phone"},
		},
		Notify: true,
	}
	if !reflect.DeepEqual(p, want) {
		t.Errorf("Load\n got %+v\nwant %+v", p, want)
	}
	if err := p.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}

func TestParse(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want func(*Policy) // changes to Default("contoso")
	}{
		{name: "minimal file is the default",
			yaml: "version: 1\norg: contoso\n",
			want: func(*Policy) {}},
		{name: "empty values are absent keys",
			yaml: "version: 1\norg: contoso\nscope:\n  include:\n  exclude: {mailboxes: ~}\ngroups:\nunknown_device:\nallowed_platforms: []\nexemptions: []\nnotify: ~\n",
			want: func(*Policy) {}},
		{name: "flags",
			yaml: "version: 1\norg: contoso\ndry_run: true\nnotify: false\n",
			want: func(p *Policy) { p.DryRun, p.Notify = true, false }},
		{name: "quarantine actions",
			yaml: "version: 1\norg: contoso\nunknown_device: quarantine\nnoncompliant: quarantine\nplatform_not_allowed: quarantine\n",
			want: func(p *Policy) {
				p.UnknownDevice, p.Noncompliant, p.PlatformNotAllowed = ActionQuarantine, ActionQuarantine, ActionQuarantine
			}},
		{name: "grace in days and hours",
			yaml: "version: 1\norg: contoso\ngrace_period: 2d12h\n",
			want: func(p *Policy) { p.GracePeriod = 60 * time.Hour }},
		{name: "addresses lower-cased, sets sorted and deduplicated",
			yaml: `version: 1
org: contoso
scope:
  include: {mailboxes: [B@Contoso.com, a@contoso.com, b@contoso.com], domains: [Contoso.COM]}
groups: {staff: ["*@Contoso.com", "*@contoso.com"]}
allowed_platforms: [Android, ios, android]
`,
			want: func(p *Policy) {
				p.Scope.Include = Selector{Mailboxes: []string{"a@contoso.com", "b@contoso.com"}, Domains: []string{"contoso.com"}}
				p.Groups = map[string][]string{"staff": {"*@contoso.com"}}
				p.AllowedPlatforms = []ev.Platform{ev.Platform_PLATFORM_IOS, ev.Platform_PLATFORM_ANDROID}
			}},
		{name: "device ids keep their case and leading zeros",
			yaml: "version: 1\norg: contoso\nexemptions:\n  - {device_id: 0123, reason: r, trust_client_reported: true}\n  - {mailbox: a@contoso.com, device_id: AbC, reason: r, until: 2026-12-31T01:00:00+01:00}\n",
			want: func(p *Policy) {
				p.Exemptions = []Exemption{
					{DeviceID: "0123", Reason: "r", TrustClientReported: true},
					{Mailbox: "a@contoso.com", DeviceID: "AbC", Reason: "r", Until: time.Date(2026, 12, 31, 0, 0, 0, 0, time.UTC)},
				}
			}},
		{name: "anchors and aliases",
			yaml: "version: 1\norg: contoso\ngroups:\n  a: &staff [x@contoso.com]\n  b: *staff\nscope: {include: {groups: [a, b]}}\n",
			want: func(p *Policy) {
				p.Groups = map[string][]string{"a": {"x@contoso.com"}, "b": {"x@contoso.com"}}
				p.Scope.Include.Groups = []string{"a", "b"}
			}},
		{name: "an empty group",
			yaml: "version: 1\norg: contoso\ngroups: {nobody: }\nscope: {include: {groups: [nobody]}}\n",
			want: func(p *Policy) {
				p.Groups = map[string][]string{"nobody": nil}
				p.Scope.Include.Groups = []string{"nobody"}
			}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse([]byte(tc.yaml))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			want := Default("contoso")
			tc.want(want)
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Parse\n got %+v\nwant %+v", got, want)
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	const head = "version: 1\norg: contoso\n"
	tests := []struct {
		name string
		yaml string
		path string // the path of a problem
		msg  string // a part of that problem's message
		line int    // its line, when known
	}{
		{"unknown key", head + "colour: red\n", "colour", "unknown key", 3},
		{"unknown nested key", head + "scope: {include: {domainz: [contoso.com]}}\n", "scope.include.domainz", "unknown key (known here: mailboxes, domains, groups)", 3},
		{"not a domain", head + "scope:\n  include:\n    domains: [contoso.com, contoso]\n", "scope.include.domains[1]", `"contoso" is not a domain name`, 5},
		{"bad action", head + "unknown_device: deny\n", "unknown_device", `"deny" is not block or quarantine`, 3},
		{"action with capital", head + "noncompliant: Block\n", "noncompliant", `"Block" is not block or quarantine`, 3},
		{"bad until", head + "exemptions:\n  - {device_id: a, reason: r, until: 2026-12-31}\n", "exemptions[0].until", "not an RFC 3339 time", 4},
		{"undefined group", head + "scope: {exclude: {groups: [x]}}\n", "groups", `"x" used in scope.exclude.groups is not defined`, 3},
		{"unsupported version", "version: 2\norg: contoso\n", "version", "2 is not supported", 1},
		{"version as string", "version: \"1\"\norg: contoso\n", "version", `must be the number 1, not "1"`, 1},
		{"missing version", "org: contoso\n", "version", "is missing", 1},
		{"missing org", "version: 1\n", "org", "is missing", 0},
		{"org not a token", "version: 1\norg: Contoso Ltd\n", "org", `"Contoso Ltd" is not an organisation name`, 2},
		{"bad platform", head + "allowed_platforms: [ios, symbian]\n", "allowed_platforms[1]", `"symbian" is not a platform`, 3},
		{"bad grace", head + "grace_period: 2 weeks\n", "grace_period", `"2 weeks" is not a duration`, 3},
		{"grace without unit", head + "grace_period: 5\n", "grace_period", `"5" is not a duration`, 3},
		{"negative grace", head + "grace_period: -1h\n", "grace_period", "is negative", 3},
		{"grace too long", head + "grace_period: 400d\n", "grace_period", "longer than 365 days", 3},
		{"dry_run yes", head + "dry_run: yes\n", "dry_run", `"yes" is not true or false`, 3},
		{"notify list", head + "notify: [true]\n", "notify", "must be true or false, not a list", 3},
		{"exemption without reason", head + "exemptions:\n  - device_id: a\n", "exemptions[0].reason", "is missing", 4},
		{"exemption with device id and type", head + "exemptions:\n  - {device_id: a, device_type: b, mailbox: a@contoso.com, reason: r}\n", "exemptions[0]", "has both device_id and device_type", 4},
		{"exemption with no selector", head + "exemptions:\n  - {reason: r}\n", "exemptions[0]", "needs a mailbox", 4},
		{"device id exemption without mailbox", head + "exemptions:\n  - {device_id: a, reason: r}\n", "exemptions[0]", `exempts every phone that reports device_id "a" on any mailbox`, 4},
		{"device type exemption without mailbox", head + "exemptions:\n  - {device_type: EASProbeDeviceType, reason: r}\n", "exemptions[0]", "trust_client_reported: true", 4},
		{"device id exemption acknowledged false", head + "exemptions:\n  - {device_id: a, reason: r, trust_client_reported: false}\n", "exemptions[0]", "bind it to a mailbox", 4},
		{"acknowledgement on a bound exemption", head + "exemptions:\n  - {mailbox: a@contoso.com, device_id: a, reason: r,\n     trust_client_reported: true}\n", "exemptions[0].trust_client_reported", "only for exemptions without a mailbox", 5},
		{"acknowledgement not a bool", head + "exemptions:\n  - {device_id: a, reason: r, trust_client_reported: yes please}\n", "exemptions[0].trust_client_reported", "not true or false", 4},
		{"trust_mdm_records_without_user not a bool", head + "trust_mdm_records_without_user: sometimes\n", "trust_mdm_records_without_user", "not true or false", 3},
		{"exemption mailbox wildcard", head + "exemptions:\n  - {mailbox: \"*@contoso.com\", reason: r}\n", "exemptions[0].mailbox", "no wildcards", 4},
		{"exemption device id too long", head + "exemptions:\n  - {device_id: " + strings.Repeat("A", 33) + ", reason: r}\n", "exemptions[0].device_id", "1 to 32 characters", 4},
		{"exemption device type with space", head + "exemptions:\n  - {device_type: \"EAS Probe\", reason: r}\n", "exemptions[0].device_type", "not a device type", 4},
		{"exemption unknown key", head + "exemptions:\n  - {devic_id: a, reason: r}\n", "exemptions[0].devic_id", "unknown key", 4},
		{"exemption null", head + "exemptions:\n  -\n", "exemptions[0]", "is empty", 0},
		{"exemptions not a list", head + "exemptions: {device_id: a}\n", "exemptions", "must be a list of exemptions", 3},
		{"mailbox without domain", head + "scope: {exclude: {mailboxes: [alice]}}\n", "scope.exclude.mailboxes[0]", `"alice" is not an address or address pattern`, 3},
		{"comma-separated addresses", head + "scope: {exclude: {mailboxes: [\"a@contoso.com, b@contoso.com\"]}}\n", "scope.exclude.mailboxes[0]", "is not an address", 3},
		{"bad group member", head + "groups:\n  staff: [alice@contoso.com, bob@contoso]\n", "groups.staff[1]", `"bob@contoso" is not an address`, 4},
		{"bad group name", head + "groups: {\"all staff\": []}\n", "groups", `"all staff" is not a group name`, 3},
		{"group defined twice", head + "groups: {a: [], a: []}\n", "groups.a", "is defined twice", 3},
		{"group not a list", head + "groups: {a: x@contoso.com}\n", "groups.a", "must be a list, not a string (write [x@contoso.com] for one entry)", 3},
		{"scalar for a list", head + "scope: {include: {domains: contoso.com}}\n", "scope.include.domains", "must be a list", 3},
		{"null list entry", head + "scope: {include: {domains: [contoso.com, ~]}}\n", "scope.include.domains[1]", "is empty", 3},
		{"mapping for a string", head + "unknown_device: {block: true}\n", "unknown_device", "must be a string, not a mapping", 3},
		{"scope not a mapping", head + "scope: [a]\n", "scope", "must be a mapping (include, exclude)", 3},
		{"duplicate key", head + "org: fabrikam\n", "org", "is given twice", 3},
		{"merge key", head + "base: &b {include: {domains: [contoso.com]}}\nscope:\n  <<: *b\n", "scope.<<", "merge keys are not supported", 5},
		{"list key", head + "? [a]\n: b\n", "", "has a key that is a list", 3},
		{"root is a list", "- version: 1\n", "", "a policy must be a mapping", 1},
		{"root is a scalar", "contoso\n", "", "a policy must be a mapping", 1},
		{"empty file", "", "", "the file is empty", 0},
		{"only comments", "# nothing here\n", "", "the file is empty", 0},
		{"two documents", head + "---\n" + head, "", "more than one YAML document", 3},
		{"syntax error", head + "scope: {include: [\n", "", "yaml: ", 0},
		{"tab indentation", head + "scope:\n\tinclude: {}\n", "", "yaml: ", 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Parse([]byte(tc.yaml))
			if err == nil {
				t.Fatalf("Parse accepted the file: %+v", p)
			}
			if p != nil {
				t.Errorf("Parse returned a policy with an error")
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error %v does not wrap ErrInvalid", err)
			}
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("error %T is not an *Error", err)
			}
			found := false
			for _, prob := range pe.Problems {
				if prob.Path == tc.path && strings.Contains(prob.Message, tc.msg) {
					found = true
					if tc.line != 0 && prob.Line != tc.line {
						t.Errorf("problem %q is on line %d, want %d", prob, prob.Line, tc.line)
					}
				}
			}
			if !found {
				t.Errorf("no problem at path %q containing %q in:\n%v", tc.path, tc.msg, err)
			}
			if tc.path != "" && !strings.Contains(err.Error(), tc.path+": ") {
				t.Errorf("error %q does not name the path %q", err, tc.path)
			}
		})
	}
}

// TestParseReportsEveryProblem checks that one pass names every mistake,
// in file order, without follow-on errors from values already reported.
func TestParseReportsEveryProblem(t *testing.T) {
	_, err := Parse([]byte(`version: 1
org: contoso
scope:
  include: {domains: [contoso]}
unknown_device: deny
exemptions:
  - {device_id: [a], reason: r}
groups: {a: x@contoso.com}
`))
	var pe *Error
	if !errors.As(err, &pe) {
		t.Fatalf("Parse: %v", err)
	}
	var got []string
	for _, p := range pe.Problems {
		got = append(got, p.Path)
	}
	want := []string{"scope.include.domains[0]", "unknown_device", "exemptions[0].device_id", "groups.a"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("problem paths = %q, want %q\n%v", got, want, err)
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	t.Run("missing file", func(t *testing.T) {
		name := filepath.Join(dir, "missing.yaml")
		_, err := Load(name)
		if !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Load: %v, want fs.ErrNotExist", err)
		}
		if errors.Is(err, ErrInvalid) {
			t.Errorf("an unreadable file is not an invalid policy: %v", err)
		}
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error %q does not name the file", err)
		}
	})
	t.Run("invalid file", func(t *testing.T) {
		name := filepath.Join(dir, "contoso.yaml")
		if err := os.WriteFile(name, []byte("version: 1\norg: contoso\nunknown_device: deny\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Load(name)
		if !errors.Is(err, ErrInvalid) {
			t.Fatalf("Load: %v, want ErrInvalid", err)
		}
		want := name + `: invalid policy: unknown_device: "deny" is not block or quarantine (line 3)`
		if err.Error() != want {
			t.Errorf("Load error\n got %s\nwant %s", err, want)
		}
	})
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		change func(*Policy)
		path   string // "" for valid
	}{
		{"default", func(*Policy) {}, ""},
		{"nil", nil, ""},
		{"empty org", func(p *Policy) { p.Org = "" }, "org"},
		{"empty action", func(p *Policy) { p.UnknownDevice = "" }, "unknown_device"},
		{"unspecified platform", func(p *Policy) { p.AllowedPlatforms = []ev.Platform{ev.Platform_PLATFORM_UNSPECIFIED} }, "allowed_platforms[0]"},
		{"undefined group", func(p *Policy) { p.Scope.Include.Groups = []string{"x"} }, "groups"},
		{"exemption without reason", func(p *Policy) { p.Exemptions = []Exemption{{DeviceID: "a", Reason: " "}} }, "exemptions[0].reason"},
		{"device exemption not bound to a mailbox", func(p *Policy) { p.Exemptions = []Exemption{{DeviceID: "a", Reason: "r"}} }, "exemptions[0]"},
		{"valid exemption", func(p *Policy) { p.Exemptions = []Exemption{{DeviceID: "a", Mailbox: "a@contoso.com", Reason: "r"}} }, ""},
		{"valid acknowledged exemption", func(p *Policy) {
			p.Exemptions = []Exemption{{DeviceType: "EASProbeDeviceType", Reason: "r", TrustClientReported: true}}
		}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var p *Policy
			if tc.change != nil {
				p = Default("contoso")
				tc.change(p)
			}
			err := p.Validate()
			if tc.change == nil {
				if !errors.Is(err, ErrInvalid) {
					t.Errorf("Validate(nil) = %v, want ErrInvalid", err)
				}
				return
			}
			if tc.path == "" {
				if err != nil {
					t.Errorf("Validate: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.path+": ") {
				t.Errorf("Validate = %v, want a problem at %s", err, tc.path)
			}
		})
	}
}

func TestParseGrace(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"0s", 0, true},
		{"0", 0, true},
		{"90m", 90 * time.Minute, true},
		{"36h", 36 * time.Hour, true},
		{"7d", 7 * 24 * time.Hour, true},
		{"0d", 0, true},
		{"1d12h30m", 36*time.Hour + 30*time.Minute, true},
		{"d", 0, false},
		{"-1d", 0, false},
		{"1d-1h", 0, false},
		{"1dd", 0, false},
		{"1.5d", 0, false},
		{"7 days", 0, false},
		{"", 0, false},
		{"99999999d", 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := parseGrace(tc.in)
			if (err == nil) != tc.ok || got != tc.want {
				t.Errorf("parseGrace(%q) = %v, %v; want %v, ok %v", tc.in, got, err, tc.want, tc.ok)
			}
		})
	}
}

func TestDefault(t *testing.T) {
	p := Default("contoso")
	if err := p.Validate(); err != nil {
		t.Fatalf("Default is not valid: %v", err)
	}
	checks := []struct {
		name string
		ok   bool
	}{
		{"org", p.Org == "contoso"},
		{"schema version", p.SchemaVersion == SchemaVersion},
		{"everyone in scope", p.Scope.Include.empty() && p.Scope.Exclude.empty()},
		{"unknown devices blocked", p.UnknownDevice == ActionBlock},
		{"noncompliant blocked", p.Noncompliant == ActionBlock},
		{"all platforms", len(p.AllowedPlatforms) == 0},
		{"no grace", p.GracePeriod == 0},
		{"no exemptions", len(p.Exemptions) == 0},
		{"notify", p.Notify},
		{"not dry run", !p.DryRun},
		{"fresh each call", Default("contoso") != p},
	}
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) {
			if !c.ok {
				t.Errorf("Default(%q) = %+v", "contoso", p)
			}
		})
	}
}

// TestParseAliasBudget checks that aliases cannot make Parse do unbounded
// work: 150 groups that each alias a list of 2,000 addresses expand to more
// values than the decoder visits.
func TestParseAliasBudget(t *testing.T) {
	var b strings.Builder
	b.WriteString("version: 1\norg: contoso\ngroups:\n  g0: &l [")
	for i := range 2000 {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "u%d@contoso.com", i)
	}
	b.WriteString("]\n")
	for i := 1; i < 150; i++ {
		fmt.Fprintf(&b, "  g%d: *l\n", i)
	}
	start := time.Now()
	_, err := Parse([]byte(b.String()))
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "once aliases are expanded") {
		t.Errorf("Parse = %v, want the alias budget error", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Parse took %v", d)
	}
}
