package tests

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// checkEnv is the environment that points easguard at a simulator.
func checkEnv(t *testing.T, s *exchangesim.Sim, extra ...string) []string {
	t.Helper()
	var resolve []string
	for _, ep := range s.Endpoints() {
		resolve = append(resolve, ep.FQDN+"="+ep.Addr())
	}
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, s.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	env := []string{
		"EASGUARD_EXCHANGE_SERVER=" + s.Endpoints()[0].FQDN, "EASGUARD_EXCHANGE_PORT=5986",
		"EASGUARD_EXCHANGE_USER=CONTOSO\\" + exchangesim.DefaultUser, "EASGUARD_EXCHANGE_PASSWORD=" + exchangesim.DefaultPassword,
		"EASGUARD_EXCHANGE_CA_BUNDLE=" + ca, "EASGUARD_EXCHANGE_RESOLVE=" + strings.Join(resolve, ","),
		"EASGUARD_EXCHANGE_PROXY=none", "EASGUARD_EXCHANGE_OPERATION_TIMEOUT=2s",
	}
	return baseEnv(append(env, extra...)...)
}

func startCheckSim(t *testing.T, granted []string) *exchangesim.Sim {
	t.Helper()
	return exchangesim.StartTest(t, exchangesim.Config{HTTPS: true, CAS: []string{"EX01", "EX02"}, Granted: granted,
		Seed: &exchangesim.SeedSpec{Mailboxes: 200, Partnerships: 300, Seed: 1}})
}

func TestCheckExchangeReports(t *testing.T) {
	s := startCheckSim(t, nil)
	stdout, stderr, code := runBinary(t, checkEnv(t, s), "check", "exchange")
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	easPartnerships := s.Org.ActiveSyncCount()
	for _, want := range []string{
		"EX01 (ex01.contoso.com) Version 15.2", "EX02 (ex02.contoso.com)", "ex01.contoso.com, ex02.contoso.com",
		"all 8 cmdlets easguard needs are available", "mailboxes      201", "DefaultAccessLevel Allow", "\nOK\n",
		"partnerships   " + strconv.Itoa(easPartnerships) + " ActiveSync",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("report lacks %q:\n%s", want, stdout)
		}
	}
	if s.Endpoints()[0].Shells(exchangesim.DefaultUser) != 0 {
		t.Error("the check left a shell open")
	}
}

// Exchange 2010 SP3 has no Get-MobileDevice, Get-MobileDeviceStatistics or
// Get-ClientAccessService: the check must find the organisation complete
// (the Get-ActiveSyncDevice family stands in), count its partnerships
// with Get-ActiveSyncDevice and discover both CAS.
func TestCheckExchange2010(t *testing.T) {
	s := exchangesim.StartTest(t, exchangesim.Config{HTTPS: true, CAS: []string{"EX01", "EX02"}, Version: exchangesim.Version2010,
		Seed: &exchangesim.SeedSpec{Mailboxes: 50, Partnerships: 80, Seed: 1}})
	stdout, stderr, code := runBinary(t, checkEnv(t, s), "check", "exchange")
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	eas := s.Org.ActiveSyncCount()
	for _, want := range []string{"EX01 (ex01.contoso.com) Version 14.3", "ex01.contoso.com, ex02.contoso.com",
		"cmdlets easguard needs are available", "partnerships   " + strconv.Itoa(eas) + " ActiveSync", "\nOK\n"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("report lacks %q:\n%s", want, stdout)
		}
	}
	if strings.Contains(stdout, "MISSING") {
		t.Errorf("report:\n%s", stdout)
	}
}

func TestCheckExchangeFailsWithAnAction(t *testing.T) {
	var granted []string
	for _, c := range exchange.AllowedCmdlets {
		if c != "Set-CASMailbox" {
			granted = append(granted, c)
		}
	}
	tests := []struct {
		name    string
		granted []string
		env     []string
		want    string
	}{
		{"missing role", granted, nil, "may not run Set-CASMailbox"},
		{"wrong password", nil, []string{"EASGUARD_EXCHANGE_PASSWORD=not-the-password"}, "authentication failed for CONTOSO\\svc-easguard with NTLM"},
		{"certificate not trusted", nil, []string{"EASGUARD_EXCHANGE_CA_BUNDLE="}, "is not trusted: set EASGUARD_EXCHANGE_CA_BUNDLE"},
		{"WinRM not reachable", nil, []string{"EASGUARD_EXCHANGE_RESOLVE=ex01.contoso.com=127.0.0.1:1"}, "is not reachable"},
		{"bad setting", nil, []string{"EASGUARD_EXCHANGE_AUTH=kerberos"}, "EASGUARD_EXCHANGE_AUTH: use ntlm or basic"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startCheckSim(t, tt.granted)
			_, stderr, code := runBinary(t, checkEnv(t, s, tt.env...), "check", "exchange")
			if code == 0 || !strings.Contains(stderr, tt.want) {
				t.Fatalf("exit %d, stderr %q, want %q", code, stderr, tt.want)
			}
			if strings.Contains(stderr, exchangesim.DefaultPassword) {
				t.Fatal("the password appears in the error")
			}
		})
	}
}

// roleScriptGrants reads the cmdlets deploy/exchange/New-EasguardRole.ps1
// grants on Exchange 2013 and later: the first name of every quoted entry
// between its "# BEGIN easguard cmdlets" and "# END easguard cmdlets"
// lines (an entry is "Cmdlet" or "Cmdlet|Exchange 2010 alternative").
func roleScriptGrants(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("../deploy/exchange/New-EasguardRole.ps1")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?s)\n# BEGIN easguard cmdlets\n(.*?)\n# END easguard cmdlets\n`).FindSubmatch(b)
	if m == nil {
		t.Fatal("the role script has no BEGIN/END easguard cmdlets block")
	}
	var out []string
	for _, q := range regexp.MustCompile(`'([^']*)'`).FindAllSubmatch(m[1], -1) {
		out = append(out, strings.Split(string(q[1]), "|")[0])
	}
	return out
}

// The check passes with exactly the role the shipped script creates, says
// that remote wipe and partnership removal are optional and not granted,
// and names what an enabled feature lacks when a cmdlet is taken away;
// org-settings enforcement is required only while it is enabled.
func TestCheckExchangeWithTheScriptsRole(t *testing.T) {
	role := roleScriptGrants(t)
	without := func(c string) []string {
		if !slices.Contains(role, c) {
			t.Fatalf("the role script does not grant %s", c)
		}
		return slices.DeleteFunc(slices.Clone(role), func(x string) bool { return x == c })
	}
	tests := []struct {
		name    string
		granted []string
		env     []string
		code    int
		stdout  []string
		stderr  string
	}{
		{"the script's role", role, nil, 0, []string{
			"org settings (enabled, EASGUARD_COLLECTOR_ENFORCE_SETTINGS): ok",
			"remote wipe (optional, nothing enables it yet): not granted (only needed when enabled): Clear-ActiveSyncDevice",
			"partnership removal (optional, nothing enables it yet): not granted (only needed when enabled): Remove-ActiveSyncDevice",
			"all 8 cmdlets easguard needs are available", "\nOK\n"}, ""},
		{"without Set-ActiveSyncOrganizationSettings", without("Set-ActiveSyncOrganizationSettings"), nil, 1,
			[]string{"org settings (enabled, EASGUARD_COLLECTOR_ENFORCE_SETTINGS): MISSING Set-ActiveSyncOrganizationSettings", "FAIL"},
			"may not run Set-ActiveSyncOrganizationSettings; give it the role group deploy/exchange/New-EasguardRole.ps1 creates"},
		{"settings not enforced", without("Set-ActiveSyncOrganizationSettings"), []string{"EASGUARD_COLLECTOR_ENFORCE_SETTINGS=false"}, 0,
			[]string{"org settings (optional, EASGUARD_COLLECTOR_ENFORCE_SETTINGS): not granted (only needed when enabled): Set-ActiveSyncOrganizationSettings",
				"all 7 cmdlets easguard needs are available", "\nOK\n"}, ""},
		{"without Set-ADServerSettings", without("Set-ADServerSettings"), nil, 1, []string{"FAIL"}, "may not run Set-ADServerSettings"},
		{"without Get-MobileDevice", without("Get-MobileDevice"), nil, 1,
			[]string{"core (enabled, reads, allow and block lists): MISSING Get-MobileDevice (or Get-ActiveSyncDevice)"},
			"may not run Get-MobileDevice (or Get-ActiveSyncDevice)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startCheckSim(t, tt.granted)
			stdout, stderr, code := runBinary(t, checkEnv(t, s, tt.env...), "check", "exchange")
			if code != tt.code || !strings.Contains(stderr, tt.stderr) {
				t.Fatalf("exit %d (want %d), stderr %q, want %q\nstdout:\n%s", code, tt.code, stderr, tt.stderr, stdout)
			}
			for _, want := range tt.stdout {
				if !strings.Contains(stdout, want) {
					t.Errorf("report lacks %q:\n%s", want, stdout)
				}
			}
		})
	}
}

// check exchange --deep runs every read easguard makes and passes when Go
// reads what comes back, however the host sends enums, property names and
// dates, on Exchange 2010 too; it fails naming the read and the problem
// when the simulator sends a value easguard cannot read (test faults) or a
// partnership's mailbox is missing from the recipients listed.
func TestCheckExchangeDeep(t *testing.T) {
	reads := func(list, stats string) []string {
		return []string{"Servers (Get-ExchangeServer): 2 objects, ok", "ListPartnerships (" + list + ")", "ListRecipients (Get-Recipient)",
			"ListMailboxes (Get-CASMailbox)", "GetOrgSettings (Get-ActiveSyncOrganizationSettings): 1 objects, ok",
			"GetRecipient (Get-Recipient -Identity), 20 mailboxes: 20 objects, ok", "CASMailbox (Get-CASMailbox -Identity), 20 mailboxes: 20 objects, ok",
			"DeviceStatistics (" + stats + "), 20 mailboxes", "all 8 reads came back complete and readable", "\nOK\n"}
	}
	tests := []struct {
		name    string
		version exchangesim.Version // zero: the simulator's default
		host    exchangesim.Host
		granted []string // nil: every cmdlet
		setup   func(t *testing.T, s *exchangesim.Sim)
		code    int
		stdout  []string
		stderr  string
	}{
		{name: "default", stdout: reads("Get-MobileDevice", "Get-MobileDeviceStatistics")},
		{name: "deserialised enums, other casing, unspecified dates", host: exchangesim.Host{DeserializedEnums: true, AltPropertyCase: true, UnspecifiedDates: true},
			stdout: reads("Get-MobileDevice", "Get-MobileDeviceStatistics")},
		{name: "Exchange 2010", version: exchangesim.Version2010, host: exchangesim.Host{DeserializedEnums: true},
			stdout: reads("Get-ActiveSyncDevice", "Get-ActiveSyncDeviceStatistics")},
		{name: "the script's role", granted: roleScriptGrants(t), stdout: []string{
			"DeviceStatistics (Get-MobileDeviceStatistics), 20 mailboxes: skipped, the account may not run Get-MobileDeviceStatistics",
			"ListPartnerships (Get-MobileDevice): 90 objects, ok", "all 7 reads came back complete and readable", "\nOK\n"}},
		{name: "unknown enum name", host: exchangesim.Host{FaultUnknownEnum: true}, code: 1,
			stdout: []string{"DeviceAccessStateReason not a known value", `"` + exchangesim.FaultEnumName + `" on "contoso.com/`, "FAIL"},
			stderr: "does not read this organisation correctly: ListPartnerships (Get-MobileDevice); DeviceStatistics (Get-MobileDeviceStatistics), 20 mailboxes"},
		{name: "unknown enum number", host: exchangesim.Host{FaultUnknownEnum: true, DeserializedEnums: true}, code: 1,
			stdout: []string{"DeviceAccessStateReason not a known value: ", `"` + strconv.Itoa(exchangesim.FaultEnumNumber) + `" on`, "FAIL"},
			stderr: "does not read this organisation correctly: ListPartnerships"},
		{name: "dates in the culture's format", host: exchangesim.Host{FaultCultureDates: true}, code: 1,
			stdout: []string{"FirstSyncTime does not parse", "LastSuccessSync does not parse", "FAIL"},
			stderr: "does not read this organisation correctly: ListPartnerships"},
		// HasActiveSyncDevicePartnership is a stored flag that can be stale
		// [D7]: Get-Recipient's filter then leaves out a mailbox that has
		// partnerships, and the matcher could not name their user.
		{name: "stale partnership flag", setup: func(t *testing.T, s *exchangesim.Sim) {
			ps, _ := s.Org.Partnerships("")
			for _, p := range ps {
				if p.ListedByActiveSync() {
					if err := s.Org.SetStalePartnershipFlag(p.PrimarySMTP, true); err != nil {
						t.Fatal(err)
					}
					return
				}
			}
			t.Fatal("no ActiveSync partnership")
		}, code: 1, stdout: []string{"mailbox not among the recipients listed: 1×", "FAIL"},
			stderr: "does not read this organisation correctly: ListPartnerships (Get-MobileDevice)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := exchangesim.StartTest(t, exchangesim.Config{HTTPS: true, CAS: []string{"EX01", "EX02"}, WorkerHost: tt.host, Version: tt.version, Granted: tt.granted,
				Seed: &exchangesim.SeedSpec{Mailboxes: 60, Partnerships: 90, Seed: 1}})
			if tt.setup != nil {
				tt.setup(t, s)
			}
			stdout, stderr, code := runBinary(t, checkEnv(t, s), "check", "exchange", "--deep")
			if code != tt.code || !strings.Contains(stderr, tt.stderr) {
				t.Fatalf("exit %d (want %d), stderr %q, want %q\nstdout:\n%s", code, tt.code, stderr, tt.stderr, stdout)
			}
			for _, want := range tt.stdout {
				if !strings.Contains(stdout, want) {
					t.Errorf("report lacks %q:\n%s", want, stdout)
				}
			}
		})
	}
}
