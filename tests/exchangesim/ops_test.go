package exchangesim_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/masterzen/winrm"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// Exchange's PowerShellMaxConcurrency: the 19th concurrent shell of one
// user is refused with Exchange's throttling error.
func TestNineteenthShellIsRefused(t *testing.T) {
	s := startSim(t, exchangesim.Config{Accounts: map[string]string{"svc-easguard": exchangesim.DefaultPassword, "other": "Other-Pass-1"}})
	ep := s.Endpoints()[0]
	client := newClient(t, s, ep, conn{})
	for i := 0; i < 18; i++ {
		sh, err := client.CreateShell()
		if err != nil {
			t.Fatalf("shell %d: %v", i+1, err)
		}
		t.Cleanup(func() { _ = sh.Close() })
	}
	_, err := client.CreateShell()
	if err == nil {
		t.Fatal("the 19th shell was created")
	}
	var fault *winrm.ExecuteCommandError
	if !errors.As(err, &fault) || !strings.Contains(fault.Body, "This user is allowed a maximum number of 18 concurrent shells, which has been exceeded") {
		t.Fatalf("19th shell error does not carry Exchange's throttling text: %v", err)
	}
	if ep.Shells(exchangesim.DefaultUser) != 18 {
		t.Fatalf("%d shells open", ep.Shells(exchangesim.DefaultUser))
	}
	// Another user is not affected.
	if _, err := newClient(t, s, ep, conn{user: "other", password: "Other-Pass-1"}).CreateShell(); err != nil {
		t.Fatalf("another user's shell: %v", err)
	}
}

// With one CAS down, another serves the same organisation.
func TestAnotherCASServesWhenOneIsDown(t *testing.T) {
	s := startSim(t, exchangesim.Config{CAS: []string{"EX01", "EX02"}})
	ex01, ex02 := s.Endpoints()[0], s.Endpoints()[1]
	w1 := startWorker(t, s, ex01, conn{})
	w1.connect(ex01)
	w1.mustInvoke("Set-ActiveSyncOrganizationSettings", roundTrip(exchange.Params{"DefaultAccessLevel": "Quarantine"}))
	if err := ex01.SetDown(true); err != nil {
		t.Fatal(err)
	}
	if _, err := tryStartWorker(t, s, ex01, conn{}); err == nil {
		t.Fatal("a worker started on a CAS that is down")
	}
	w2 := startWorker(t, s, ex02, conn{})
	w2.connect(ex02)
	objs := w2.mustInvoke("Get-ActiveSyncOrganizationSettings", nil)
	if objs[0]["DefaultAccessLevel"] != "Quarantine" {
		t.Fatalf("EX02 sees %v", objs[0]["DefaultAccessLevel"])
	}
	servers := w2.mustInvoke("Get-ExchangeServer", nil)
	if len(servers) != 2 {
		t.Fatalf("Get-ExchangeServer: %d servers", len(servers))
	}
	if err := ex01.SetDown(false); err != nil {
		t.Fatal(err)
	}
	w3 := startWorker(t, s, ex01, conn{})
	w3.connect(ex01)
}

// hostile are values that must stay data: every quote character PowerShell
// knows, backticks, subexpressions, separators, pipes, newlines, and a
// value of exactly 32 characters.
var hostile = []string{
	"it's", "\u2018single\u2019", "\u201Alow\u201B", `dq"x`, "\u201Ccurly\u201D\u201E", "`whoami`", "$(Stop-Computer)",
	"a;Remove-Mailbox", "x|Out-File y", "line\nbreak", "-Identity", "@{Add='x'}", "$env:PATH", "0123456789abcdefghij0123456789AB",
}

func TestHostileValuesStayData(t *testing.T) {
	s, w := orgWithAlice(t)
	t.Run("device ids in the lists, byte for byte", func(t *testing.T) {
		w.mustInvoke("Set-CASMailbox", roundTrip(exchange.Params{"Identity": alice, "ActiveSyncBlockedDeviceIDs": exchange.MultiValued{Add: hostile}}))
		_, b := lists(t, w)
		if len(b) != len(hostile) {
			t.Fatalf("blocked list %q", b)
		}
		for i, v := range hostile {
			if b[i] != v {
				t.Errorf("stored %q as %q", v, b[i])
			}
		}
	})
	t.Run("limits are refused as Exchange refuses them", func(t *testing.T) {
		for _, bad := range []struct{ value, reason string }{
			{strings.Repeat("x", 33), "DataValidationException"},
			{"nul\x00byte", "DataValidationException"},
		} {
			_, r := w.invoke("Set-CASMailbox", roundTrip(exchange.Params{"Identity": alice, "ActiveSyncAllowedDeviceIDs": exchange.MultiValued{Add: []string{bad.value}}}))
			if r.OK || r.Errors[0].Reason != bad.reason {
				t.Errorf("%q: %+v", bad.value, r)
			}
		}
		_, r := w.invoke("Set-CASMailbox", roundTrip(exchange.Params{"Identity": alice, "ActiveSyncAllowedDeviceIDs": exchange.MultiValued{Add: []string{strings.Repeat("y", 33)}}}))
		if r.OK || !strings.Contains(r.Errors[0].Message, "The maximum length is 32 and the length of the value provided is 33") {
			t.Errorf("33 characters: %+v", r.Errors)
		}
	})
	t.Run("a phone's hostile device id comes back exactly", func(t *testing.T) {
		for _, id := range hostile {
			if strings.ContainsAny(id, "\n") {
				// A phone cannot put a control character in its DeviceId.
				if _, err := s.Org.Sync(iphone(id)); err == nil {
					t.Errorf("phone with %q synced", id)
				}
				continue
			}
			res := phoneSync(t, s, iphone(id))
			if res.State != "Blocked" || res.Reason != "Individual" {
				t.Errorf("phone %q: %+v", id, res)
			}
		}
		if _, err := s.Org.Sync(iphone(strings.Repeat("z", 33))); err == nil {
			t.Error("a 33-character DeviceId synced")
		}
		objs := w.mustInvoke("Get-MobileDevice", exchange.Params{"Mailbox": alice, "ResultSize": "Unlimited"})
		got := map[string]bool{}
		for _, o := range objs {
			got[o["DeviceId"].(string)] = true
			// Its identity works as an identity.
			stats := w.mustInvoke("Get-MobileDeviceStatistics", exchange.Params{"Identity": o["Identity"]})
			if len(stats) != 1 || stats[0]["DeviceID"] != o["DeviceId"] {
				t.Errorf("statistics by identity %q: %v", o["Identity"], stats)
			}
		}
		for _, id := range hostile {
			if !strings.Contains(id, "\n") && !got[id] {
				t.Errorf("device %q missing from Get-MobileDevice", id)
			}
		}
	})
	t.Run("filters quote by doubling", func(t *testing.T) {
		objs := w.mustInvoke("Get-MobileDevice", exchange.Params{"Filter": "DeviceId -eq 'it''s'"})
		if len(objs) != 1 || objs[0]["DeviceId"] != "it's" {
			t.Fatalf("filter: %v", objs)
		}
		_, r := w.invoke("Get-MobileDevice", exchange.Params{"Filter": "DeviceId -eq $(Stop-Computer)"})
		if r.OK || r.Errors[0].Reason != "ParameterBindingException" {
			t.Fatalf("a subexpression in a filter: %+v", r)
		}
	})
	t.Run("a hostile identity is not found, quoted back exactly", func(t *testing.T) {
		id := "alice'; Remove-Mailbox -Identity * -Confirm:$false; '"
		_, r := w.invoke("Get-CASMailbox", exchange.Params{"Identity": id})
		if r.OK || r.Errors[0].Reason != "ManagementObjectNotFoundException" || !strings.Contains(r.Errors[0].Message, "'"+id+"'") {
			t.Fatalf("%+v", r.Errors)
		}
	})
}

func TestListingsResultSizeFilterAndPages(t *testing.T) {
	s := startSim(t, exchangesim.Config{Seed: &exchangesim.SeedSpec{Mailboxes: 600, Partnerships: 1200, Seed: 7}})
	ep := s.Endpoints()[0]
	w := startWorker(t, s, ep, conn{})
	w.connect(ep)
	objs, r := w.invoke("Get-MobileDevice", exchange.Params{"ActiveSync": true})
	if !r.OK || len(objs) != 1000 || len(r.Warnings) != 1 || !strings.Contains(r.Warnings[0], "only the first 1000 items are returned") {
		t.Fatalf("default ResultSize: %d objects, warnings %q", len(objs), r.Warnings)
	}
	pages, final := w.request(exchange.Request{Op: "invoke", Page: 250, Call: &exchange.Call{Cmdlet: "Get-MobileDevice", Params: exchange.Params{"ResultSize": "Unlimited"}, Select: []string{"DeviceId", "DeviceAccessState", "Identity"}}})
	total := len(final.Objects)
	for _, p := range pages {
		total += len(p.Objects)
		if len(p.Objects) != 250 || len(p.Objects[0]) != 3 {
			t.Fatalf("page of %d objects with %d properties", len(p.Objects), len(p.Objects[0]))
		}
	}
	if !final.OK || total != final.Count || total != 1200 || len(final.Warnings) != 0 || len(pages) != 4 {
		t.Fatalf("Unlimited: %d objects in %d pages, count %d, warnings %v", total, len(pages), final.Count, final.Warnings)
	}
	monitored, _ := w.invoke("Get-MobileDevice", exchange.Params{"ResultSize": "Unlimited", "Monitoring": true})
	if len(monitored) != 1201 {
		t.Errorf("with -Monitoring: %d", len(monitored))
	}
	iphones, _ := w.invoke("Get-MobileDevice", exchange.Params{"ResultSize": "Unlimited", "Filter": "DeviceType -eq 'iPhone' -and DeviceAccessState -ne 'Blocked'"})
	for _, o := range iphones {
		if o["DeviceType"] != "iPhone" || o["DeviceAccessState"] == "Blocked" {
			t.Fatalf("filter let through %v", o)
		}
	}
	if len(iphones) == 0 {
		t.Fatal("no iPhones in the seed")
	}
	_, r = w.invoke("Get-MobileDevice", exchange.Params{"Filter": "WhenChanged -gt '2020-01-01'"})
	if r.OK || !strings.Contains(r.Errors[0].Message, "is not a recognized filterable property") {
		t.Fatalf("unfilterable property: %+v", r)
	}
	few, _ := w.invoke("Get-CASMailbox", exchange.Params{"ResultSize": 5})
	if len(few) != 5 {
		t.Fatalf("ResultSize 5: %d", len(few))
	}
	child, _ := w.invoke("Get-Recipient", exchange.Params{"ResultSize": "Unlimited"})
	if len(child) != 601 {
		t.Fatalf("recipients: %d", len(child))
	}
}

// PowerShell's binder: case-insensitive names, unambiguous prefixes,
// typed values, and its errors otherwise.
func TestParameterBinding(t *testing.T) {
	_, w := orgWithAlice(t)
	tests := []struct {
		name   string
		cmdlet string
		params exchange.Params
		reason string
		fqid   string
	}{
		{"prefix and case", "get-casmailbox", exchange.Params{"ident": alice}, "", ""},
		{"unknown parameter", "Set-CASMailbox", exchange.Params{"Identity": alice, "ActiveSyncAllowedDevices": "x"}, "ParameterBindingException", "NamedParameterNotFound,Set-CASMailbox"},
		{"ambiguous prefix", "Set-CASMailbox", exchange.Params{"Identity": alice, "ActiveSync": true}, "ParameterBindingException", "AmbiguousParameter,Set-CASMailbox"},
		{"missing mandatory", "Set-CASMailbox", exchange.Params{"ActiveSyncEnabled": true}, "ParameterBindingException", "MissingMandatoryParameter,Set-CASMailbox"},
		{"null identity", "Set-CASMailbox", exchange.Params{"Identity": nil}, "ParameterBindingValidationException", "ParameterArgumentValidationError,Set-CASMailbox"},
		{"bad enum", "Set-ActiveSyncOrganizationSettings", exchange.Params{"DefaultAccessLevel": "Maybe"}, "ParameterBindingArgumentTransformationException", "ParameterArgumentTransformationError,Set-ActiveSyncOrganizationSettings"},
		{"string for a switch", "Get-MobileDevice", exchange.Params{"ActiveSync": "yes"}, "ParameterBindingArgumentTransformationException", ""},
		{"two parameter sets", "Get-MobileDevice", exchange.Params{"Identity": "x", "Mailbox": alice}, "ParameterBindingException", "AmbiguousParameterSet,Get-MobileDevice"},
		{"confirmation in a non-interactive host", "Remove-ActiveSyncDevice", exchange.Params{"Identity": "x"}, "PSInvalidOperationException", ""},
		{"a common parameter the worker sets itself", "Get-CASMailbox", exchange.Params{"ErrorAction": "Stop"}, "ParameterBindingException", "ParameterAlreadyBound,Get-CASMailbox"},
		{"not on the allow-list", "Remove-Mailbox", exchange.Params{"Identity": alice}, "ProtocolError", "ProtocolError"},
		{"a hash table with other keys", "Set-CASMailbox", exchange.Params{"Identity": alice, "ActiveSyncAllowedDeviceIDs": map[string]any{"Add": "x", "Replace": "y"}}, "ProtocolError", ""},
		{"a parameter name that is not a name", "Get-CASMailbox", exchange.Params{"Identity;x": alice}, "ProtocolError", ""},
		{"user mail insert over 256 characters", "Set-ActiveSyncOrganizationSettings", exchange.Params{"UserMailInsert": strings.Repeat("é", 257)}, "DataValidationException", ""},
		{"admin recipient that is no address", "Set-ActiveSyncOrganizationSettings", exchange.Params{"AdminMailRecipients": []string{"helpdesk"}}, "ParameterBindingArgumentTransformationException", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, r := w.invoke(tt.cmdlet, roundTrip(tt.params))
			if tt.reason == "" {
				if !r.OK {
					t.Fatalf("%+v", r.Errors)
				}
				return
			}
			if r.OK || len(r.Errors) != 1 || r.Errors[0].Reason != tt.reason || (tt.fqid != "" && r.Errors[0].FQID != tt.fqid) {
				t.Fatalf("errors %+v, want reason %s fqid %s", r.Errors, tt.reason, tt.fqid)
			}
			if !utf8.ValidString(r.Errors[0].Message) || r.Errors[0].Message == "" {
				t.Fatalf("message %q", r.Errors[0].Message)
			}
		})
	}
}

// Get-Command reports only what the role grants, so a permission check can
// fail realistically, and a cmdlet the role lacks does not exist.
func TestRoleLimitsCmdlets(t *testing.T) {
	var granted []string
	for _, c := range exchange.AllowedCmdlets {
		if c != "Set-CASMailbox" && c != "Get-Command" {
			granted = append(granted, c)
		}
	}
	s := startSim(t, exchangesim.Config{Granted: granted})
	ep := s.Endpoints()[0]
	w := startWorker(t, s, ep, conn{})
	info := w.connect(ep)
	for _, c := range info.Objects[0]["cmdlets"].([]any) {
		if c == "Set-CASMailbox" {
			t.Fatal("connect reports Set-CASMailbox as available")
		}
	}
	objs, r := w.invoke("Get-Command", exchange.Params{"Name": []string{"Get-MobileDevice", "Set-CASMailbox"}})
	if len(objs) != 1 || objs[0]["Name"] != "Get-MobileDevice" || len(r.Errors) != 1 || r.Errors[0].Reason != "CommandNotFoundException" || !strings.Contains(r.Errors[0].Message, "'Set-CASMailbox'") {
		t.Fatalf("Get-Command: %v %+v", objs, r.Errors)
	}
	_, r = w.invoke("Set-CASMailbox", exchange.Params{"Identity": "x"})
	if r.OK || r.Errors[0].Reason != "CommandNotFoundException" {
		t.Fatalf("calling an ungranted cmdlet: %+v", r)
	}
}

// worker.ps1 runs Set-ADServerSettings right after importing the session,
// with $ErrorActionPreference Stop: a role without it fails the connect
// with PowerShell's command-not-found error.
func TestConnectNeedsSetADServerSettings(t *testing.T) {
	s := startSim(t, exchangesim.Config{Granted: []string{"Get-MobileDevice", "Get-CASMailbox"}})
	ep := s.Endpoints()[0]
	w := startWorker(t, s, ep, conn{})
	_, r := w.request(exchange.Request{Op: "connect", Mode: "remote", URI: "https://" + ep.FQDN + "/PowerShell/", Auth: "Kerberos", User: exchangesim.DefaultUser, Password: exchangesim.DefaultPassword})
	if r.OK || r.Errors[0].Reason != "CommandNotFoundException" || !strings.Contains(r.Errors[0].Message, "'Set-ADServerSettings'") {
		t.Fatalf("connect without Set-ADServerSettings: %+v", r)
	}
	s.Org.Grant([]string{"Get-MobileDevice", "Get-CASMailbox", "Set-ADServerSettings"})
	if r := w.connect(ep); !r.OK {
		t.Fatalf("connect with Set-ADServerSettings: %+v", r.Errors)
	}
}

func TestConnectFailsLikeNewPSSession(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	ep := s.Endpoints()[0]
	w := startWorker(t, s, ep, conn{})
	_, r := w.request(exchange.Request{Op: "connect", Mode: "remote", URI: "https://" + ep.FQDN + "/PowerShell/", Auth: "Kerberos", User: exchangesim.DefaultUser, Password: "wrong"})
	if r.OK || !strings.Contains(r.Errors[0].FQID, "PSSessionOpenFailed") || !strings.Contains(r.Errors[0].Message, "Access is denied") {
		t.Fatalf("wrong password: %+v", r.Errors)
	}
	_, r = w.request(exchange.Request{Op: "connect", Mode: "remote", URI: "https://nowhere.contoso.com/PowerShell/", Auth: "Kerberos", User: exchangesim.DefaultUser, Password: exchangesim.DefaultPassword})
	if r.OK || !strings.Contains(r.Errors[0].FQID, "PSSessionOpenFailed") {
		t.Fatalf("unknown host: %+v", r.Errors)
	}
	// Before connecting, no Exchange cmdlet exists.
	_, r = w.invoke("Get-MobileDevice", nil)
	if r.OK || r.Errors[0].Reason != "CommandNotFoundException" {
		t.Fatalf("before connect: %+v", r)
	}
	_, r = w.request(exchange.Request{Op: "ping"})
	if !r.OK {
		t.Fatal("ping")
	}
}

func TestAdminAPI(t *testing.T) {
	s := startSim(t, exchangesim.Config{AdminAddr: "127.0.0.1:0", CAS: []string{"EX01", "EX02"}})
	post := func(path string, body any) *http.Response {
		t.Helper()
		b, _ := json.Marshal(body)
		resp, err := http.Post(s.AdminURL()+path, "application/json", bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	if resp := post("/api/mailboxes", exchangesim.MailboxSpec{Alias: "bob", DisplayName: "Bob Brown"}); resp.StatusCode != 201 {
		t.Fatalf("create mailbox: %d", resp.StatusCode)
	}
	resp := post("/api/phones/sync", exchangesim.Phone{Mailbox: "bob@contoso.com", DeviceID: "androidc1", DeviceType: "Android"})
	var res exchangesim.SyncResult
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil || !res.Created || res.State != "Allowed" {
		t.Fatalf("sync: %v %+v", err, res)
	}
	if resp := post("/api/phones/sync", exchangesim.Phone{Mailbox: "bob@contoso.com", DeviceID: strings.Repeat("x", 33), DeviceType: "Android"}); resp.StatusCode != 400 {
		t.Fatalf("33-character id: %d", resp.StatusCode)
	}
	get, err := http.Get(s.AdminURL() + "/api/partnerships?mailbox=bob")
	if err != nil {
		t.Fatal(err)
	}
	defer get.Body.Close()
	var ps []exchangesim.Partnership
	if err := json.NewDecoder(get.Body).Decode(&ps); err != nil || len(ps) != 1 || ps[0].DeviceID != "androidc1" {
		t.Fatalf("partnerships: %v %+v", err, ps)
	}
	if resp := post("/api/faults", exchangesim.Fault{Endpoint: "EX01", Kind: "down"}); resp.StatusCode != 200 || !s.Endpoint("EX01").Down() {
		t.Fatalf("fault down: %d", resp.StatusCode)
	}
	if resp := post("/api/faults", exchangesim.Fault{Endpoint: "EX01", Kind: "clear"}); resp.StatusCode != 200 || s.Endpoint("EX01").Down() {
		t.Fatalf("fault clear: %d", resp.StatusCode)
	}
	if resp := post("/api/faults", exchangesim.Fault{Endpoint: "EX09", Kind: "down"}); resp.StatusCode != 404 {
		t.Fatalf("unknown endpoint: %d", resp.StatusCode)
	}
	w := startWorker(t, s, s.Endpoints()[1], conn{})
	w.connect(s.Endpoints()[1])
	reqs, err := http.Get(s.AdminURL() + "/api/requests?kind=wsman")
	if err != nil {
		t.Fatal(err)
	}
	defer reqs.Body.Close()
	var rec struct {
		Counts  map[string]int       `json:"counts"`
		Records []exchangesim.Record `json:"records"`
	}
	if err := json.NewDecoder(reqs.Body).Decode(&rec); err != nil || rec.Counts["wsman:Create"] != 1 || len(rec.Records) == 0 {
		t.Fatalf("requests: %v %+v", err, rec.Counts)
	}
}

func TestInjectedAuthRefusal(t *testing.T) {
	s := startSim(t, exchangesim.Config{CAS: []string{"EX01", "EX02"}})
	if _, err := s.Inject(exchangesim.Fault{Endpoint: "ex01.contoso.com", Kind: "refuse_auth"}); err != nil {
		t.Fatal(err)
	}
	if _, err := newClient(t, s, s.Endpoint("EX01"), conn{}).CreateShell(); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("refused CAS: %v", err)
	}
	if _, err := newClient(t, s, s.Endpoint("EX02"), conn{}).CreateShell(); err != nil {
		t.Fatalf("the other CAS: %v", err)
	}
	if _, err := s.Inject(exchangesim.Fault{Endpoint: "EX01", Kind: "clear"}); err != nil {
		t.Fatal(err)
	}
	if _, err := newClient(t, s, s.Endpoint("EX01"), conn{}).CreateShell(); err != nil {
		t.Fatalf("after clearing: %v", err)
	}
}

func TestSeedIsReproducible(t *testing.T) {
	mk := func() []exchangesim.Partnership {
		o := exchangesim.NewOrg("Contoso", "contoso.com")
		fixed := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
		o.Now = func() time.Time { return fixed }
		if err := exchangesim.Seed(o, exchangesim.SeedSpec{Mailboxes: 300, Partnerships: 900, Seed: 42, ChildDomainShare: 0.1}); err != nil {
			t.Fatal(err)
		}
		ps, err := o.Partnerships("")
		if err != nil {
			t.Fatal(err)
		}
		return ps
	}
	a, b := mk(), mk()
	if len(a) != 901 || len(a) != len(b) {
		t.Fatalf("%d and %d partnerships", len(a), len(b))
	}
	states := map[string]int{}
	hostileSeen := false
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("partnership %d differs: %+v vs %+v", i, a[i], b[i])
		}
		states[a[i].State+"/"+a[i].Reason]++
		if strings.ContainsAny(a[i].DeviceID, "'$`;|\u2018\u201C") {
			hostileSeen = true
		}
	}
	if states["Allowed/Global"] == 0 || states["Blocked/Individual"] == 0 || states["Allowed/Individual"] == 0 {
		t.Errorf("state mix %v", states)
	}
	if !hostileSeen {
		t.Error("no hostile device id in the seed")
	}
}

// Every identity form Exchange resolves finds the same mailbox or device.
func TestIdentityForms(t *testing.T) {
	s, w := orgWithAlice(t)
	phoneSync(t, s, iphone("ApplID0001"))
	mb := w.mustInvoke("Get-CASMailbox", exchange.Params{"Identity": alice})[0]
	rec := w.mustInvoke("Get-Recipient", exchange.Params{"Identity": alice})[0]
	for _, id := range []string{"alice", "Alice Adams", alice, "ALICE@CONTOSO.COM", rec["UserPrincipalName"].(string), mb["Guid"].(string),
		mb["DistinguishedName"].(string), mb["Identity"].(string), `CONTOSO\alice`, mb["LegacyExchangeDN"].(string)} {
		objs, r := w.invoke("Get-CASMailbox", exchange.Params{"Identity": id})
		if !r.OK || len(objs) != 1 || objs[0]["Guid"] != mb["Guid"] {
			t.Errorf("mailbox identity %q: %+v", id, r.Errors)
		}
	}
	dev := w.mustInvoke("Get-MobileDevice", exchange.Params{"Mailbox": "alice"})[0]
	for _, id := range []string{dev["Guid"].(string), dev["DistinguishedName"].(string), dev["Identity"].(string),
		`alice\ExchangeActiveSyncDevices\iPhone§ApplID0001`, `alice@contoso.com\ExchangeActiveSyncDevices\iphone§applid0001`} {
		objs, r := w.invoke("Get-MobileDevice", exchange.Params{"Identity": id})
		if !r.OK || len(objs) != 1 || objs[0]["Guid"] != dev["Guid"] {
			t.Errorf("device identity %q: %+v", id, r.Errors)
		}
	}
	if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice2", DisplayName: "Alice Adams"}); err != nil {
		t.Fatal(err)
	}
	_, r := w.invoke("Get-CASMailbox", exchange.Params{"Identity": "Alice Adams"})
	if r.OK || r.Errors[0].Reason != "ManagementObjectAmbiguousException" {
		t.Fatalf("ambiguous name: %+v", r)
	}
}

// Without Set-ADServerSettings -ViewEntireForest $true a session sees only
// the forest root domain; the worker sets it when it connects.
func TestForestScope(t *testing.T) {
	s, w := orgWithAlice(t)
	s.Org.AddDomain("emea.contoso.com")
	if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "bernd", Domain: "emea.contoso.com"}); err != nil {
		t.Fatal(err)
	}
	w.mustInvoke("Get-CASMailbox", exchange.Params{"Identity": "bernd@emea.contoso.com"})
	w.mustInvoke("Set-ADServerSettings", exchange.Params{"ViewEntireForest": false})
	_, r := w.invoke("Get-CASMailbox", exchange.Params{"Identity": "bernd@emea.contoso.com"})
	if r.OK || r.Errors[0].Reason != "ManagementObjectNotFoundException" {
		t.Fatalf("child domain visible without ViewEntireForest: %+v", r)
	}
	all, _ := w.invoke("Get-Recipient", exchange.Params{"ResultSize": "Unlimited"})
	if len(all) != 1 {
		t.Fatalf("root-domain scope lists %d recipients", len(all))
	}
}
