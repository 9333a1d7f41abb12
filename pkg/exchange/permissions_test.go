package exchange_test

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// roleScript is the shipped script that creates easguard's role group.
const roleScript = "../../deploy/exchange/New-EasguardRole.ps1"

// roleScriptCmdlets reads the script's cmdlet list: every single-quoted
// string between the "# BEGIN easguard cmdlets" and "# END easguard
// cmdlets" lines, each "Cmdlet" or "Cmdlet|Alternative" (the script says
// so next to the list).
func roleScriptCmdlets(t testing.TB) [][]string {
	t.Helper()
	b, err := os.ReadFile(roleScript)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?s)\n# BEGIN easguard cmdlets\n(.*?)\n# END easguard cmdlets\n`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("%s has no BEGIN/END easguard cmdlets block", roleScript)
	}
	var out [][]string
	for _, q := range regexp.MustCompile(`'([^']*)'`).FindAllSubmatch(m[1], -1) {
		out = append(out, strings.Split(string(q[1]), "|"))
	}
	if len(out) == 0 {
		t.Fatalf("%s lists no cmdlets", roleScript)
	}
	return out
}

// The role the script creates grants exactly what the features enabled by
// default run, each with its Exchange 2010 alternative: no remote wipe,
// no partnership removal, nothing the pipeline never calls.
func TestRoleScriptGrantsDefaultFeatures(t *testing.T) {
	var primary []string
	for _, names := range roleScriptCmdlets(t) {
		primary = append(primary, names[0])
		if got, want := names[1:], exchange.CmdletAlternatives(names[0]); !slices.Equal(got, want) {
			t.Errorf("%s: the script's alternatives %v, Go's %v", names[0], got, want)
		}
	}
	want := exchange.RequiredCmdlets(exchange.DefaultFeatures()...)
	slices.Sort(primary)
	slices.Sort(want)
	if !slices.Equal(primary, want) {
		t.Fatalf("the script grants %v, the default features need %v", primary, want)
	}
	for _, f := range []exchange.Feature{exchange.FeatureRemoteWipe, exchange.FeaturePartnershipRemoval} {
		for _, c := range exchange.FeatureCmdlets(f) {
			if slices.Contains(primary, c) {
				t.Errorf("the script grants %s (%s), which nothing enables", c, f)
			}
		}
	}
}

// An account holding exactly the cmdlets the script grants (the names the
// organisation's version has) runs everything the default features do,
// and check's question names each cmdlet when it is taken away.
func TestRoleScriptCmdletsSuffice(t *testing.T) {
	for _, tt := range []struct {
		name    string
		version exchangesim.Version
	}{{"2019", exchangesim.Version2019}, {"2010", exchangesim.Version2010}} {
		t.Run(tt.name, func(t *testing.T) {
			// The script grants the first name of an entry the
			// organisation has: Exchange 2010 lacks the Get-MobileDevice
			// family.
			var granted, primary []string
			for _, names := range roleScriptCmdlets(t) {
				n := names[0]
				if tt.version == exchangesim.Version2010 && len(names) > 1 {
					n = names[1]
				}
				granted = append(granted, n)
				primary = append(primary, names[0])
			}
			s := startSim(t, exchangesim.Config{Version: tt.version, Granted: granted})
			if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice", DisplayName: "Alice Adams"}); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: "alice", DeviceID: "ApplROLE1", DeviceType: "iPhone"}); err != nil {
				t.Fatal(err)
			}
			cfg := simConfig(t, s)
			c := exchange.NewClient(newPool(t, cfg), cfg)
			ctx := context.Background()

			byFeature, err := c.MissingByFeature(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if len(byFeature[exchange.FeatureCore])+len(byFeature[exchange.FeatureOrgSettings]) != 0 {
				t.Fatalf("missing with the script's role: %v", byFeature)
			}
			if fmt.Sprint(byFeature[exchange.FeatureRemoteWipe], byFeature[exchange.FeaturePartnershipRemoval]) != "[Clear-ActiveSyncDevice] [Remove-ActiveSyncDevice]" {
				t.Fatalf("the optional features must be reported as not granted: %v", byFeature)
			}

			// What the default features run works with this role.
			var listed []exchange.Partnership
			if err := c.ListPartnerships(ctx, exchange.ListOptions{}, func(ps []exchange.Partnership) error { listed = append(listed, ps...); return nil }); err != nil || len(listed) == 0 {
				t.Fatalf("list partnerships %d %v", len(listed), err)
			}
			if err := c.ListRecipients(ctx, func([]exchange.Recipient) error { return nil }); err != nil {
				t.Fatalf("list recipients: %v", err)
			}
			if _, err := c.GetRecipient(ctx, listed[0].Mailbox); err != nil {
				t.Fatalf("get recipient: %v", err)
			}
			res, err := c.ApplyAccess(ctx, []exchange.Change{{Mailbox: "alice@contoso.com", DeviceID: "ApplROLE1", Access: exchange.AccessAllow}})
			if err != nil || len(res) != 1 || res[0].Err != nil {
				t.Fatalf("apply access %+v %v", res, err)
			}
			if _, _, err := c.EnforceOrgSettings(ctx, exchange.OrgSettings{DefaultAccessLevel: "Quarantine", UserMailInsert: "Enrol in Intune."}, true); err != nil {
				t.Fatalf("enforce org settings: %v", err)
			}
			if _, err := c.Servers(ctx); err != nil {
				t.Fatalf("servers: %v", err)
			}
			if _, err := c.CountPartnerships(ctx); err != nil {
				t.Fatalf("count partnerships: %v", err)
			}
			if _, err := c.Count(ctx, "Get-CASMailbox", exchange.Params{"ResultSize": "Unlimited"}); err != nil {
				t.Fatalf("count mailboxes: %v", err)
			}
			for _, r := range s.Recorder.Records("cmdlet") {
				// CAS discovery tries Get-ClientAccessService first and
				// falls back to Get-ExchangeServer; Get-Command reports
				// the names the session lacks as errors.
				if !r.OK && r.Cmdlet != "Get-ClientAccessService" && r.Cmdlet != "Get-Command" {
					t.Errorf("%s failed with the script's role: %s", r.Cmdlet, r.Params)
				}
			}

			// Each cmdlet taken away is named.
			for i := range granted {
				t.Run("without "+granted[i], func(t *testing.T) {
					s.Org.Grant(slices.Concat(granted[:i], granted[i+1:]))
					t.Cleanup(func() { s.Org.Grant(granted) })
					missing, err := c.MissingCmdlets(ctx, exchange.DefaultFeatures()...)
					if err != nil || fmt.Sprint(missing) != fmt.Sprint([]string{primary[i]}) {
						t.Fatalf("missing %v %v, want [%s]", missing, err, primary[i])
					}
				})
			}
		})
	}
}
