package exchangesim_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/masterzen/winrm"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// allCmdletCalls exercises every allow-listed cmdlet once with valid
// parameters, in an order where each call's prerequisites exist.
func allCmdletCalls(alice, deviceIdentity string) []exchange.Call {
	return []exchange.Call{
		{Cmdlet: "Set-ADServerSettings", Params: exchange.Params{"ViewEntireForest": true}},
		{Cmdlet: "Get-Command", Params: exchange.Params{"Name": []string{"Get-MobileDevice", "Set-CASMailbox"}}},
		{Cmdlet: "Get-ExchangeServer"},
		{Cmdlet: "Get-ClientAccessService"},
		{Cmdlet: "Get-ActiveSyncOrganizationSettings"},
		{Cmdlet: "Set-ActiveSyncOrganizationSettings", Params: exchange.Params{"DefaultAccessLevel": "Quarantine", "AdminMailRecipients": exchange.MultiValued{Add: []string{"helpdesk@contoso.com"}}, "UserMailInsert": "Enrol at https://portal.manage.microsoft.com"}},
		{Cmdlet: "Get-Recipient", Params: exchange.Params{"Identity": alice}},
		{Cmdlet: "Get-CASMailbox", Params: exchange.Params{"Identity": alice}},
		{Cmdlet: "Set-CASMailbox", Params: exchange.Params{"Identity": alice, "ActiveSyncAllowedDeviceIDs": exchange.MultiValued{Add: []string{"ApplABCDEF123456"}}}},
		{Cmdlet: "Get-MobileDevice", Params: exchange.Params{"Mailbox": alice, "ActiveSync": true}},
		{Cmdlet: "Get-ActiveSyncDevice", Params: exchange.Params{"Mailbox": alice}},
		{Cmdlet: "Get-MobileDeviceStatistics", Params: exchange.Params{"Mailbox": alice}},
		{Cmdlet: "Get-ActiveSyncDeviceStatistics", Params: exchange.Params{"Identity": deviceIdentity}},
		{Cmdlet: "Get-ActiveSyncDeviceClass"},
		{Cmdlet: "New-ActiveSyncMailboxPolicy", Params: exchange.Params{"Name": "Strict", "AllowNonProvisionableDevices": false}},
		{Cmdlet: "Set-ActiveSyncMailboxPolicy", Params: exchange.Params{"Identity": "Strict", "DevicePasswordEnabled": true}},
		{Cmdlet: "Get-ActiveSyncMailboxPolicy"},
		{Cmdlet: "Remove-ActiveSyncMailboxPolicy", Params: exchange.Params{"Identity": "Strict", "Confirm": false}},
		{Cmdlet: "New-ActiveSyncDeviceAccessRule", Params: exchange.Params{"QueryString": "ContosoPhone", "Characteristic": "DeviceModel", "AccessLevel": "Quarantine"}},
		{Cmdlet: "Set-ActiveSyncDeviceAccessRule", Params: exchange.Params{"Identity": "ContosoPhone (DeviceModel)", "AccessLevel": "Block"}},
		{Cmdlet: "Get-ActiveSyncDeviceAccessRule"},
		{Cmdlet: "Remove-ActiveSyncDeviceAccessRule", Params: exchange.Params{"Identity": "ContosoPhone (DeviceModel)", "Confirm": false}},
		{Cmdlet: "Clear-ActiveSyncDevice", Params: exchange.Params{"Identity": deviceIdentity, "Confirm": false}},
		{Cmdlet: "Remove-ActiveSyncDevice", Params: exchange.Params{"Identity": deviceIdentity, "Confirm": false}},
	}
}

func TestEveryCmdletRoundTripsOverWinRM(t *testing.T) {
	covered := map[string]bool{}
	for _, c := range allCmdletCalls("", "") {
		covered[c.Cmdlet] = true
	}
	for _, c := range exchange.AllowedCmdlets {
		if !covered[c] {
			t.Fatalf("allow-listed cmdlet %s is not exercised", c)
		}
	}
	for _, auth := range []string{"Basic", "NTLM"} {
		for _, https := range []bool{false, true} {
			name := fmt.Sprintf("%s/https=%v", auth, https)
			t.Run(name, func(t *testing.T) {
				s := startSim(t, exchangesim.Config{HTTPS: https, Basic: auth == "Basic", NTLM: auth == "NTLM"})
				ep := s.Endpoints()[0]
				if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice", DisplayName: "Alice Adams"}); err != nil {
					t.Fatal(err)
				}
				if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: "alice@contoso.com", DeviceID: "ApplABCDEF123456", DeviceType: "iPhone", DeviceModel: "iPhone14C3"}); err != nil {
					t.Fatal(err)
				}
				w := startWorker(t, s, ep, conn{ntlm: auth == "NTLM"})
				w.connect(ep)
				for _, call := range allCmdletCalls("alice@contoso.com", `alice@contoso.com\ExchangeActiveSyncDevices\iPhone§ApplABCDEF123456`) {
					_, r := w.invoke(call.Cmdlet, roundTrip(call.Params))
					if !r.OK {
						t.Errorf("%s: %+v", call.Cmdlet, r.Errors)
					}
				}
				if n := s.Recorder.Count("cmdlet"); n != len(allCmdletCalls("", "")) {
					t.Errorf("recorder saw %d cmdlet calls", n)
				}
			})
		}
	}
}

func TestWrongPasswordIs401(t *testing.T) {
	for _, auth := range []string{"Basic", "NTLM"} {
		t.Run(auth, func(t *testing.T) {
			s := startSim(t, exchangesim.Config{Basic: auth == "Basic", NTLM: auth == "NTLM"})
			client := newClient(t, s, s.Endpoints()[0], conn{ntlm: auth == "NTLM", user: exchangesim.DefaultUser, password: "wrong"})
			_, err := client.CreateShell()
			if err == nil || !strings.Contains(err.Error(), "401") {
				t.Fatalf("err = %v, want a 401", err)
			}
		})
	}
}

// The simulator runs only the shipped bootstrap, and the bootstrap runs
// only the shipped worker script.
func TestOnlyTheShippedBootstrapRuns(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	client := newClient(t, s, s.Endpoints()[0], conn{})
	tests := []struct {
		name, command string
		code          int
		stderr        string
	}{
		{"other program", "ipconfig /all", 1, "'ipconfig' is not recognized as an internal or external command"},
		{"powershell with -Command", "powershell.exe -NoProfile -Command Get-Mailbox", 1, "not started with the easguard worker bootstrap"},
		{"another encoded script", winrm.Powershell("Get-Mailbox | Remove-Mailbox"), 1, "runs only the easguard worker bootstrap"},
		{"bad encoding", "powershell.exe -EncodedCommand !!!", 1, "not properly encoded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stderr, code, err := client.RunWithContextWithString(t.Context(), tt.command, "")
			if err != nil {
				t.Fatal(err)
			}
			if code != tt.code || !strings.Contains(stderr, tt.stderr) {
				t.Fatalf("exit %d, stderr %q", code, stderr)
			}
		})
	}
	t.Run("tampered worker script", func(t *testing.T) {
		tampered := strings.Replace(string(exchange.ScriptLine()), "A", "B", 1)
		stdout, _, code, err := client.RunWithContextWithString(t.Context(), exchange.CommandLine(), tampered)
		if err != nil {
			t.Fatal(err)
		}
		if code != exchange.ExitScriptMismatch || !strings.HasPrefix(stdout, exchange.FatalSentinel) {
			t.Fatalf("exit %d, stdout %q", code, stdout)
		}
	})
}
