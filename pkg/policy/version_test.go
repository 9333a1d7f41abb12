package policy

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

func readExample(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "contoso.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestVersionIgnoresForm(t *testing.T) {
	example := readExample(t)
	want := mustParse(t, example).Version()
	if !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(want) {
		t.Fatalf("Version() = %q, want 16 hex digits", want)
	}
	tests := []struct {
		name string
		yaml string
	}{
		{"comments removed", regexp.MustCompile(`(?m)\s*#.*$`).ReplaceAllString(example, "")},
		{"blank lines and trailing spaces", strings.ReplaceAll(example, "\n", "  \n\n")},
		{"Windows line ends", strings.ReplaceAll(example, "\n", "\r\n")},
		{"block style, other key order, other quoting, other case, other list order", `
notify: true
trust_mdm_records_without_user: false
exemptions:
  - reason: CFO iPhone, INC-4711
    until: 2026-12-31T01:00:00+01:00
    device_id: ApplF17LTTCGFFG8
    mailbox: CFO@Contoso.com
    trust_client_reported: false
  - mailbox: HelpDesk@Contoso.com
    reason: shared helpdesk phone
groups:
  service-accounts:
    - svc-*@contoso.com
  all-staff:
    - '*@CONTOSO.com'
allowed_platforms: [android, ipados, ios, ios]
scope:
  exclude:
    groups: [service-accounts]
    mailboxes: [HealthMailbox*@contoso.com, CEO@contoso.com]
  include:
    groups: [all-staff]
    domains: [contoso.com, CONTOSO.COM]
org: "contoso"
version: 1
`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := mustParse(t, tc.yaml).Version(); got != want {
				t.Errorf("Version() = %s, want %s", got, want)
			}
		})
	}
}

func TestVersionChangesWithPolicy(t *testing.T) {
	example := readExample(t)
	base := mustParse(t, example)
	seen := map[string]string{base.Version(): "unchanged"}
	tests := []struct {
		name   string
		change func(*Policy)
	}{
		{"dry run", func(p *Policy) { p.DryRun = true }},
		{"org", func(p *Policy) { p.Org = "fabrikam" }},
		{"include domain", func(p *Policy) { p.Scope.Include.Domains = append(p.Scope.Include.Domains, "fabrikam.com") }},
		{"include moved to exclude", func(p *Policy) {
			p.Scope.Exclude.Domains, p.Scope.Include.Domains = p.Scope.Include.Domains, nil
		}},
		{"exclude mailbox", func(p *Policy) { p.Scope.Exclude.Mailboxes = nil }},
		{"group member", func(p *Policy) { p.Groups["service-accounts"] = []string{"svc-*@fabrikam.com"} }},
		{"group renamed", func(p *Policy) {
			p.Groups["staff"] = p.Groups["all-staff"]
			delete(p.Groups, "all-staff")
			p.Scope.Include.Groups = []string{"staff"}
		}},
		{"unknown device", func(p *Policy) { p.UnknownDevice = ActionQuarantine }},
		{"noncompliant", func(p *Policy) { p.Noncompliant = ActionQuarantine }},
		{"platform not allowed", func(p *Policy) { p.PlatformNotAllowed = ActionQuarantine }},
		{"allowed platforms", func(p *Policy) { p.AllowedPlatforms = append(p.AllowedPlatforms, ev.Platform_PLATFORM_WINDOWS) }},
		{"grace", func(p *Policy) { p.GracePeriod = time.Hour }},
		{"exemption reason", func(p *Policy) { p.Exemptions[0].Reason = "CEO iPhone, INC-4712" }},
		{"exemption until", func(p *Policy) { p.Exemptions[0].Until = p.Exemptions[0].Until.Add(time.Second) }},
		{"exemption without until", func(p *Policy) { p.Exemptions[0].Until = time.Time{} }},
		{"exemption removed", func(p *Policy) { p.Exemptions = p.Exemptions[1:] }},
		{"exemption order", func(p *Policy) { p.Exemptions[0], p.Exemptions[1] = p.Exemptions[1], p.Exemptions[0] }},
		{"notify", func(p *Policy) { p.Notify = false }},
		{"exemption unbound from its mailbox", func(p *Policy) {
			p.Exemptions[0].Mailbox, p.Exemptions[0].TrustClientReported = "", true
		}},
		{"exemption trusts client-reported", func(p *Policy) { p.Exemptions[1].TrustClientReported = true }},
		{"trust MDM records without user", func(p *Policy) { p.TrustMDMRecordsWithoutUser = true }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := mustParse(t, example)
			tc.change(p)
			v := p.Version()
			if prev, dup := seen[v]; dup {
				t.Errorf("Version() = %s, the same as for %q", v, prev)
			}
			seen[v] = tc.name
		})
	}
}

func TestVersionIsPure(t *testing.T) {
	p := mustParse(t, readExample(t))
	// Disturb the normal form, as hand-editing the fields might.
	p.Scope.Include.Domains = []string{"CONTOSO.com"}
	p.AllowedPlatforms = []ev.Platform{ev.Platform_PLATFORM_ANDROID, ev.Platform_PLATFORM_IOS, ev.Platform_PLATFORM_IPADOS}
	before := p.clone()
	v := p.Version()
	if !reflect.DeepEqual(p, before) {
		t.Errorf("Version changed the policy:\n got %+v\nwant %+v", p, before)
	}
	if want := mustParse(t, readExample(t)).Version(); v != want {
		t.Errorf("Version of the hand-edited equivalent = %s, want %s", v, want)
	}
}

func TestVersionOfDefault(t *testing.T) {
	if got, want := Default("contoso").Version(), mustParse(t, "version: 1\norg: contoso\n").Version(); got != want {
		t.Errorf("Default version %s differs from the minimal file's %s", got, want)
	}
	if Default("contoso").Version() == Default("fabrikam").Version() {
		t.Errorf("the version does not depend on the org")
	}
	if (*Policy)(nil).Version() != "" {
		t.Errorf("nil policy has a version")
	}
}
