package exchange_test

import (
	"context"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// A listing with ChangedSince returns the partnerships first synced since
// and every partnership of the mailboxes changed since, exactly cut (the
// filter's day of slack never widens the result), without the monitoring
// probes, whether it reads the changed mailboxes one by one or, above the
// limit, lists every partnership once.
func TestListChangedPartnerships(t *testing.T) {
	cases := []struct {
		name    string
		limit   int
		cmdlets int // Get-MobileDevice and Get-CASMailbox calls
	}{
		{"mailbox by mailbox", 0, 2 + 3},
		{"one listing above the limit", 2, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := startSim(t, exchangesim.Config{Seed: &exchangesim.SeedSpec{Mailboxes: 30, Partnerships: 60, Seed: 9, NoHostile: true}})
			// The organisation's clock, moved on by hand between edits.
			var ahead atomic.Int64
			s.Org.Now = func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
			cfg := simConfig(t, s)
			c := exchange.NewClient(newPool(t, cfg), cfg)
			c.MailboxReadLimit = tc.limit
			ctx := context.Background()
			all, err := s.Org.Partnerships("")
			if err != nil {
				t.Fatal(err)
			}
			byMailbox := map[string][]exchangesim.Partnership{}
			for _, p := range all {
				if p.ListedByActiveSync() {
					byMailbox[p.Mailbox] = append(byMailbox[p.Mailbox], p)
				}
			}
			var withPhones []string
			for _, m := range s.Org.Mailboxes() {
				if len(byMailbox[m.Alias]) > 0 && !m.Monitoring {
					withPhones = append(withPhones, m.Alias)
				}
			}
			if len(withPhones) < 4 {
				t.Fatalf("%d mailboxes with phones", len(withPhones))
			}
			block := func(alias, id string) {
				t.Helper()
				if _, _, err := s.Org.AdminInvoke(exchange.Call{Cmdlet: "Set-CASMailbox", Params: exchange.Params{
					"Identity": alias, "ActiveSyncBlockedDeviceIDs": exchange.MultiValued{Add: []string{id}}}}); err != nil {
					t.Fatal(err)
				}
			}
			// Changed before the cut: within the filter's slack, not listed.
			block(withPhones[0], "Before0001")
			since := s.Org.Now().Add(time.Second)
			ahead.Add(int64(time.Minute))
			block(withPhones[1], "After0001")
			block(withPhones[2], byMailbox[withPhones[2]][0].DeviceID)
			block("HealthMailbox0a1b2c", "EASProbeDevice1")
			if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: withPhones[3], DeviceID: "NewPhone0001", DeviceType: "iPhone", DeviceModel: "iPhone15,2",
				DeviceOS: "iOS 17.4 21E219", UserAgent: "Apple-iPhone15C2/2104.183", ActiveSyncVersion: "16.1"}); err != nil {
				t.Fatal(err)
			}
			var want []string
			for _, m := range withPhones[1:3] {
				for _, p := range byMailbox[m] {
					want = append(want, p.Identity)
				}
			}
			now, err := s.Org.Partnerships(withPhones[3])
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range now {
				if p.DeviceID == "NewPhone0001" {
					want = append(want, p.Identity)
				}
			}

			s.Recorder.Reset()
			var got []string
			if err := c.ListPartnerships(ctx, exchange.ListOptions{NewSince: since, ChangedSince: since}, func(ps []exchange.Partnership) error {
				for _, p := range ps {
					got = append(got, p.Identity)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			slices.Sort(got)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Fatalf("listed %q\nwant %q", got, want)
			}
			if n := s.Recorder.Count("cmdlet:Get-MobileDevice") + s.Recorder.Count("cmdlet:Get-CASMailbox"); n != tc.cmdlets {
				t.Fatalf("%d listing cmdlets, want %d", n, tc.cmdlets)
			}
		})
	}
}
