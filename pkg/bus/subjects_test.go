package bus_test

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/easguard/easguard/pkg/bus"
	_ "github.com/easguard/easguard/proto/easguard/v1"
)

func TestParseOrg(t *testing.T) {
	tests := []struct {
		name, in string
		ok       bool
	}{
		{"plain", "contoso", true},
		{"digits and dash", "org-42_eu", true},
		{"upper case is refused, not lowered", "Contoso", false},
		{"space", "contoso ltd", false},
		{"dot would split the subject", "contoso.com", false},
		{"wildcard", "*", false},
		{"tail wildcard", ">", false},
		{"empty", "", false},
		{"leading underscore is reserved", "_system", false},
		{"too long", strings.Repeat("a", 64), false},
		{"longest", strings.Repeat("a", 63), true},
		{"unicode", "contosö", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := bus.ParseOrg(tt.in)
			if tt.ok {
				if err != nil || string(got) != tt.in {
					t.Fatalf("ParseOrg(%q) = %q, %v; want it unchanged", tt.in, got, err)
				}
				return
			}
			if !errors.Is(err, bus.ErrBadOrg) {
				t.Fatalf("ParseOrg(%q) = %q, %v; want ErrBadOrg", tt.in, got, err)
			}
			if !strings.Contains(err.Error(), tt.in) {
				t.Errorf("error %q does not quote the bad name", err)
			}
		})
	}
}

func TestKeyToken(t *testing.T) {
	hostile := []string{
		"ApplF17LTTCGFFG8", "applf17lttcgffg8", "androidc1234", "a.b", "*", ">", "a b", "a\tb", "line\nbreak",
		"$(Remove-Mailbox)", "it's", "\u2018quoted\u2019", "nul\x00byte", "`backtick`", "a;b|c", "Ünïcode", "-",
		"_leading", "MiXeD-Case-1",
	}
	seen := map[string]string{}
	for _, key := range hostile {
		t.Run(key, func(t *testing.T) {
			tok, err := bus.KeyToken(key)
			if err != nil {
				t.Fatal(err)
			}
			if strings.ContainsAny(tok, ".*> \t\r\n\x00") || tok == "" {
				t.Fatalf("token %q for %q is not a safe subject token", tok, key)
			}
			if prev, ok := seen[tok]; ok && !strings.EqualFold(prev, key) {
				t.Fatalf("keys %q and %q share token %q", prev, key, tok)
			}
			seen[tok] = key
			subj, err := bus.EASObserved.Subject(org, key)
			if err != nil {
				t.Fatal(err)
			}
			gotOrg, gotEv, err := bus.ParseSubject(subj)
			if err != nil || gotOrg != org || gotEv.Name() != "eas.observed" {
				t.Fatalf("ParseSubject(%q) = %q, %q, %v", subj, gotOrg, gotEv.Name(), err)
			}
		})
	}
	t.Run("case-insensitive like Exchange", func(t *testing.T) {
		a, _ := bus.KeyToken("ApplF17LTTCGFFG8")
		b, _ := bus.KeyToken("applf17lttcgffg8")
		if a != b {
			t.Fatalf("%q and %q differ", a, b)
		}
	})
	t.Run("empty", func(t *testing.T) {
		if _, err := bus.KeyToken(""); !errors.Is(err, bus.ErrBadKey) {
			t.Fatalf("err = %v, want ErrBadKey", err)
		}
	})
}

func TestSubjectGrammar(t *testing.T) {
	tests := []struct {
		ev       bus.Event
		key      string
		subject  string
		template string
	}{
		{bus.EASObserved, "Dev1", "easguard.contoso.eas.observed.dev1", "easguard.{org}.eas.observed.{key}"},
		{bus.AccessDecided, "Dev1", "easguard.contoso.access.decided.dev1", "easguard.{org}.access.decided.{key}"},
		{bus.SyncRequested, "", "easguard.contoso.sync.requested", "easguard.{org}.sync.requested"},
		{bus.AlertRaised, "blast-radius", "easguard.contoso.alert.blast-radius", "easguard.{org}.alert.{key}"},
	}
	for _, tt := range tests {
		t.Run(tt.subject, func(t *testing.T) {
			got, err := tt.ev.Subject(org, tt.key)
			if err != nil || got != tt.subject {
				t.Fatalf("Subject = %q, %v; want %q", got, err, tt.subject)
			}
			if tmpl := bus.TemplateOf(got); tmpl != tt.template {
				t.Fatalf("TemplateOf = %q, want %q", tmpl, tt.template)
			}
		})
	}
	if _, err := bus.SyncRequested.Subject(org, "x"); !errors.Is(err, bus.ErrBadKey) {
		t.Errorf("unkeyed family with a key: err = %v", err)
	}
	if _, err := bus.EASObserved.Subject("Bad Org", "x"); !errors.Is(err, bus.ErrBadOrg) {
		t.Errorf("bad org: err = %v", err)
	}
	for _, s := range []string{"easguard.contoso", "other.contoso.eas.observed.x", "easguard.contoso.eas.observed", "easguard.contoso.nope.x", "easguard.Bad.eas.observed.x"} {
		if _, _, err := bus.ParseSubject(s); !errors.Is(err, bus.ErrBadSubject) {
			t.Errorf("ParseSubject(%q) err = %v, want ErrBadSubject", s, err)
		}
	}
}

// Every family names a message that exists in the generated code, so a
// renamed proto message cannot silently break routing.
func TestEventMessageTypesExist(t *testing.T) {
	for _, e := range bus.Events {
		if e.MessageType() == "" {
			continue
		}
		if _, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(e.MessageType())); err != nil {
			t.Errorf("%s: %v", e.Name(), err)
		}
	}
}
