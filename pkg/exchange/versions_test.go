package exchange_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// The typed reads against each supported release: Exchange 2010 SP3 has
// no Get-MobileDevice, Get-MobileDeviceStatistics or
// Get-ClientAccessService, so the client must list partnerships and their
// statistics with the Get-ActiveSyncDevice family (without -ActiveSync,
// which those cmdlets do not have), discover the CAS through
// Get-ExchangeServer, and not report the missing cmdlets as a missing
// permission. The pool and the one-shot runner both choose the same way.
func TestTypedReadsPerVersion(t *testing.T) {
	tests := []struct {
		name                   string
		version                exchangesim.Version
		keep2013               bool // UNCONFIRMED: 2010 objects with the 2013 properties
		list, stats, versionIs string
		clientType             string
	}{
		{"2010", exchangesim.Version2010, false, "Get-ActiveSyncDevice", "Get-ActiveSyncDeviceStatistics", "Version 14.3", ""},
		{"2010 with the 2013 properties", exchangesim.Version2010, true, "Get-ActiveSyncDevice", "Get-ActiveSyncDeviceStatistics", "Version 14.3", "EAS"},
		{"2013", exchangesim.Version2013, false, "Get-MobileDevice", "Get-MobileDeviceStatistics", "Version 15.0", "EAS"},
		{"2016", exchangesim.Version2016, false, "Get-MobileDevice", "Get-MobileDeviceStatistics", "Version 15.1", "EAS"},
		{"2019", exchangesim.Version2019, false, "Get-MobileDevice", "Get-MobileDeviceStatistics", "Version 15.2", "EAS"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startSim(t, exchangesim.Config{CAS: []string{"EX01", "EX02"}, Version: tt.version, Keep2013Properties: tt.keep2013})
			if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice"}); err != nil {
				t.Fatal(err)
			}
			for _, id := range []string{"ApplOLD", "ApplNEW"} {
				if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: "alice", DeviceID: id, DeviceType: "iPhone"}); err != nil {
					t.Fatal(err)
				}
			}
			cfg := simConfig(t, s)
			p := newPool(t, cfg)
			c := exchange.NewClient(p, cfg)
			ctx := context.Background()

			if got := p.Servers(); len(got) != 2 || got[0] != "ex01.contoso.com" || got[1] != "ex02.contoso.com" {
				t.Fatalf("discovered %v", got)
			}
			servers, err := c.Servers(ctx)
			if err != nil || len(servers) != 2 || !strings.HasPrefix(servers[0].Version, tt.versionIs) {
				t.Fatalf("servers %+v %v", servers, err)
			}
			var listed []exchange.Partnership
			if err := c.ListPartnerships(ctx, exchange.ListOptions{}, func(ps []exchange.Partnership) error { listed = append(listed, ps...); return nil }); err != nil {
				t.Fatal(err)
			}
			if len(listed) != 2 || listed[0].DeviceID != "ApplOLD" || listed[0].AccessState != "Allowed" || listed[0].Mailbox != "contoso.com/Users/alice" ||
				listed[0].ClientType != tt.clientType || listed[0].ActiveSyncVersion == "" || listed[0].WhenChanged.IsZero() {
				t.Fatalf("listed %+v", listed)
			}
			var fresh []exchange.Partnership
			if err := c.ListPartnerships(ctx, exchange.ListOptions{NewSince: time.Now().Add(-time.Minute), Mailbox: "alice@contoso.com"},
				func(ps []exchange.Partnership) error { fresh = append(fresh, ps...); return nil }); err != nil || len(fresh) != 2 {
				t.Fatalf("per-mailbox quick listing %+v %v", fresh, err)
			}
			stats, err := c.DeviceStatistics(ctx, "alice@contoso.com")
			if err != nil || len(stats) != 2 || stats[0].LastSuccessSync.IsZero() || stats[0].Status != "DeviceOk" {
				t.Fatalf("statistics %+v %v", stats, err)
			}
			if n, err := c.CountPartnerships(ctx); err != nil || n != 2 {
				t.Fatalf("count %d %v", n, err)
			}
			missing, err := c.MissingCmdlets(ctx)
			if err != nil || len(missing) != 0 {
				t.Fatalf("missing %v %v", missing, err)
			}
			for _, want := range []string{tt.list, tt.stats} {
				if s.Recorder.Count("cmdlet:"+want) == 0 {
					t.Errorf("%s was never called", want)
				}
			}
			for _, r := range s.Recorder.Records("cmdlet") {
				if !r.OK && r.Cmdlet != "Get-ClientAccessService" && r.Cmdlet != "Get-Command" {
					t.Errorf("%s failed: %s", r.Cmdlet, r.Params)
				}
				if r.Cmdlet == tt.list || r.Cmdlet == tt.stats {
					var params map[string]any
					_ = json.Unmarshal(r.Params, &params)
					if _, has := params["ActiveSync"]; has != (tt.list == "Get-MobileDevice") {
						t.Errorf("%s called with -ActiveSync=%v: %s", r.Cmdlet, has, r.Params)
					}
				}
			}

			// The one-shot runner has no connect answer to read: it asks.
			o, err := exchange.NewOneShot(cfg)
			if err != nil {
				t.Fatal(err)
			}
			listed = nil
			if err := exchange.NewClient(o, cfg).ListPartnerships(ctx, exchange.ListOptions{}, func(ps []exchange.Partnership) error { listed = append(listed, ps...); return nil }); err != nil || len(listed) != 2 {
				t.Fatalf("one-shot listing %+v %v", listed, err)
			}
		})
	}
}

// An account whose role lacks both families of a cmdlet is still told so.
func TestMissingCmdletsNamesAbsentAlternatives(t *testing.T) {
	var granted []string
	for _, c := range exchange.AllowedCmdlets {
		if c != "Get-ActiveSyncDevice" {
			granted = append(granted, c)
		}
	}
	s := startSim(t, exchangesim.Config{Version: exchangesim.Version2010, Granted: granted})
	cfg := simConfig(t, s)
	c := exchange.NewClient(newPool(t, cfg), cfg)
	missing, err := c.MissingCmdlets(context.Background())
	if err != nil || strings.Join(missing, ",") != "Get-MobileDevice" {
		t.Fatalf("missing %v %v", missing, err)
	}
}
