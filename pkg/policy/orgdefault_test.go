package policy

import (
	"strings"
	"testing"
)

// The organisation's default is tightened on its own only when easguard
// manages everyone; a pilot leaves it alone unless the file says so, and a
// quarantine action is refused where the default would not quarantine.
func TestOrgDefault(t *testing.T) {
	const pilot = "scope:\n  include: {mailboxes: [alice@contoso.com]}\n"
	for _, tc := range []struct {
		name, body string
		level      string
		explicit   bool
		everyone   bool
		problem    string // part of the validation error; empty: valid
	}{
		{name: "everyone, nothing said: quarantine", body: "", level: "Quarantine", everyone: true},
		{name: "pilot, nothing said: left alone", body: pilot, level: ""},
		{name: "exclude alone is a pilot too", body: "scope:\n  exclude: {mailboxes: [bob@contoso.com]}\n", level: ""},
		{name: "pilot, explicit quarantine", body: pilot + "default_access_level: quarantine\n", level: "Quarantine", explicit: true},
		{name: "everyone, explicit unchanged", body: "default_access_level: unchanged\n", level: "", explicit: true, everyone: true},
		{name: "everyone, explicit block, case-insensitive", body: "default_access_level: Block\n", level: "Block", explicit: true, everyone: true},
		{name: "explicit allow", body: "default_access_level: allow\n", level: "Allow", explicit: true, everyone: true},
		{name: "unknown value", body: "default_access_level: deny\n", problem: `default_access_level: "deny" is not quarantine, block, allow or unchanged`},
		{name: "quarantine action in a pilot", body: pilot + "unknown_device: quarantine\n", problem: "unknown_device: quarantine needs the organisation's DefaultAccessLevel to be Quarantine"},
		{name: "quarantine action with default block", body: "default_access_level: block\nnoncompliant: quarantine\n", problem: "noncompliant: quarantine needs"},
		{name: "quarantine action with default left alone", body: "default_access_level: unchanged\nplatform_not_allowed: quarantine\n", problem: "platform_not_allowed: quarantine needs"},
		{name: "quarantine action in a pilot that says quarantine", body: pilot + "default_access_level: quarantine\nunknown_device: quarantine\n", level: "Quarantine", explicit: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Parse([]byte("version: 1\norg: contoso\n" + tc.body))
			if tc.problem != "" {
				if err == nil || !strings.Contains(err.Error(), tc.problem) {
					t.Fatalf("error %v, want one containing %q", err, tc.problem)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			level, explicit := p.OrgDefault()
			if level != tc.level || explicit != tc.explicit || p.ScopeIsEveryone() != tc.everyone {
				t.Fatalf("OrgDefault %q explicit %v everyone %v, want %q %v %v", level, explicit, p.ScopeIsEveryone(), tc.level, tc.explicit, tc.everyone)
			}
		})
	}
}

// Saying what the default is changes the policy's version; saying nothing
// keeps the version every earlier policy had.
func TestOrgDefaultVersion(t *testing.T) {
	parse := func(body string) string {
		t.Helper()
		p, err := Parse([]byte("version: 1\norg: contoso\n" + body))
		if err != nil {
			t.Fatal(err)
		}
		return p.Version()
	}
	if parse("") == parse("default_access_level: unchanged\n") {
		t.Fatal("default_access_level does not change the version")
	}
	if parse("default_access_level: QUARANTINE\n") != parse("default_access_level: quarantine\n") {
		t.Fatal("the case of default_access_level changes the version")
	}
	if got, want := Default("contoso").Version(), parse(""); got != want {
		t.Fatalf("the default policy's version %s differs from an empty file's %s", got, want)
	}
}
