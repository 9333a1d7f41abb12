package policy

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// FuzzParse checks that Parse never panics and that whatever it accepts is
// valid, hashes deterministically and can be evaluated; whatever it refuses
// is an *Error wrapping ErrInvalid with at least one problem.
// Run it with: go test ./pkg/policy -run '^$' -fuzz FuzzParse -fuzztime 1m
func FuzzParse(f *testing.F) {
	example, err := os.ReadFile(filepath.Join("testdata", "contoso.yaml"))
	if err != nil {
		f.Fatal(err)
	}
	const head = "version: 1\norg: contoso\n"
	for _, seed := range []string{
		string(example),
		fixture,
		head,
		"",
		"~",
		"- a",
		head + "---\n" + head,
		head + "scope: {include: {domains: [contoso, ~, [x]]}}\n",
		head + "exemptions:\n  - {device_id: a, until: 2026-12-31}\n  -\n  - [x]\n",
		head + "groups: &g {a: *g}\nscope: {include: {groups: [a, b]}}\n",
		head + "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n",
		head + "scope:\n  <<: {include: {}}\n",
		head + "grace_period: 99999999999999d\n",
		head + "version: 0x1\n",
		head + "? [a]\n: b\n",
		"version: !!int 1\norg: !custom contoso\n",
		"\xff\xfe",
		head + "allowed_platforms: [IOS, other]\nunknown_device: !!str quarantine\n",
	} {
		f.Add([]byte(seed))
	}
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse(data)
		if err != nil {
			var pe *Error
			if !errors.Is(err, ErrInvalid) || !errors.As(err, &pe) || len(pe.Problems) == 0 {
				t.Fatalf("Parse error %v (%T) is not an *Error with problems wrapping ErrInvalid", err, err)
			}
			if p != nil {
				t.Fatalf("Parse returned a policy with an error")
			}
			return
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("Parse accepted a policy that Validate refuses: %v", err)
		}
		v := p.Version()
		if len(v) != 16 {
			t.Fatalf("Version() = %q", v)
		}
		again, err := Parse(data)
		if err != nil || again.Version() != v {
			t.Fatalf("Parse is not deterministic: %v, %q vs %q", err, again.Version(), v)
		}
		in := input(func(in *Input) { in.Org = p.Org; in.Now = now })
		verdict := p.Evaluate(in)
		if verdict.Rule == "" || verdict.Reason == "" || verdict.Rule == RuleInvalidInput {
			t.Fatalf("Evaluate of a parsed policy gave %+v", verdict)
		}
		if verdict.InScope == (verdict.Rule == RuleOutOfScope) || strings.TrimSpace(verdict.Reason) != verdict.Reason {
			t.Fatalf("inconsistent verdict %+v", verdict)
		}
	})
}
