package exchange_test

import (
	"context"
	"encoding/json"
	"errors"
	"sort"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/easguard/easguard/pkg/config/configtest"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// oddDeviceIDs end (and begin) in every kind of character a partitioned
// listing must place: digits, letters of either case, and characters
// outside its groups (punctuation, non-ASCII, the Kelvin sign that
// lower-cases to k), on top of the seed's hostile ids (quotes of every
// kind, $(...), ';', '|').
var oddDeviceIDs = []string{"0starts-with-a-digit", "9ENDS9", "lowerenda", "UPPERENDA", "MixedEndz", "MIXEDENDZ", "ends-with-dash-",
	"ends.with.dot.", "endsé", "endsß", "ends\u212A", "ends in space ", "ÉSTARTS", "x", "Y", "7"}

// oddAliases are mailbox aliases that end outside the groups or in
// either case; each mailbox gets a partnership, so Get-Recipient lists it.
var oddAliases = []string{"ends-dash-", "o'brien'", "ends~", "EndsUpperQ", "endslowerq", "0digit", "ends`tick`"}

// partitionedSim is a seeded organisation (hostile ids included) with the
// odd ids and aliases added, of the given release, with -like case
// sensitive or not (UNCONFIRMED).
func partitionedSim(t *testing.T, version exchangesim.Version, caseSensitive bool) *exchangesim.Sim {
	t.Helper()
	s := startSim(t, exchangesim.Config{Version: version, Seed: &exchangesim.SeedSpec{Mailboxes: 300, Partnerships: 1200, Seed: 5}})
	s.Org.SetCaseSensitiveLike(caseSensitive)
	boxes := s.Org.Mailboxes()
	for i, id := range oddDeviceIDs {
		if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: boxes[i].PrimarySMTP, DeviceID: id, DeviceType: "iPhone"}); err != nil {
			t.Fatalf("partnership %q: %v", id, err)
		}
	}
	for _, a := range oddAliases {
		if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: a}); err != nil {
			t.Fatalf("mailbox %q: %v", a, err)
		}
		if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: a, DeviceID: "Appl" + strings.ToUpper(a), DeviceType: "iPhone"}); err != nil {
			t.Fatalf("partnership of %q: %v", a, err)
		}
	}
	return s
}

// clientOf returns a client on a pool of its own with workers sessions,
// listing in parts parts (exchange.Config.ListPartitions).
func clientOf(t *testing.T, s *exchangesim.Sim, workers, parts int) *exchange.Client {
	t.Helper()
	cfg := simConfig(t, s)
	cfg.Workers = workers
	cfg.ListPartitions = parts
	c := exchange.NewClient(newPool(t, cfg), cfg)
	c.PageSize = 50
	return c
}

// listAll returns the GUIDs of a full partnership listing, and the
// partnerships by GUID; a GUID listed twice fails the test.
func listAll(t *testing.T, c *exchange.Client) ([]string, map[string]exchange.Partnership) {
	t.Helper()
	byGUID := map[string]exchange.Partnership{}
	var guids []string
	if err := c.ListPartnerships(context.Background(), exchange.ListOptions{}, func(ps []exchange.Partnership) error {
		for _, p := range ps {
			if _, dup := byGUID[p.GUID]; dup {
				t.Errorf("%s (%q) listed twice", p.Identity, p.DeviceID)
			}
			byGUID[p.GUID] = p
			guids = append(guids, p.GUID)
		}
		return nil
	}); err != nil {
		t.Fatalf("listing: %v", err)
	}
	sort.Strings(guids)
	return guids, byGUID
}

// recipientsOf returns the sorted identities of ListRecipients, failing
// the test on one listed twice.
func recipientsOf(t *testing.T, c *exchange.Client) []string {
	t.Helper()
	seen := map[string]bool{}
	var out []string
	if err := c.ListRecipients(context.Background(), func(rs []exchange.Recipient) error {
		for _, r := range rs {
			if seen[r.Identity] {
				t.Errorf("recipient %s listed twice", r.Identity)
			}
			seen[r.Identity] = true
			out = append(out, r.Identity)
		}
		return nil
	}); err != nil {
		t.Fatalf("recipients: %v", err)
	}
	sort.Strings(out)
	return out
}

// filtersOf returns the -Filter of every call of cmdlet the simulator
// recorded.
func filtersOf(t *testing.T, s *exchangesim.Sim, cmdlet string) []string {
	t.Helper()
	var out []string
	for _, r := range s.Recorder.Records("cmdlet") {
		if r.Cmdlet != cmdlet {
			continue
		}
		var p struct{ Filter string }
		if err := json.Unmarshal(r.Params, &p); err != nil {
			t.Fatalf("params of %s: %v", cmdlet, err)
		}
		out = append(out, p.Filter)
	}
	return out
}

// A full listing read in parts over several sessions returns exactly the
// partnerships (and recipients) of the one listing, each once, whatever
// their ids hold and whether Exchange's -like minds case (UNCONFIRMED),
// on Exchange 2019 (Get-MobileDevice) and 2010 (Get-ActiveSyncDevice).
func TestPartitionedListingMatchesOneListing(t *testing.T) {
	for _, version := range []exchangesim.Version{exchangesim.Version2019, exchangesim.Version2010} {
		for _, caseSensitive := range []bool{false, true} {
			name := string(version) + "/like ignores case"
			if caseSensitive {
				name = string(version) + "/like minds case"
			}
			t.Run(name, func(t *testing.T) {
				s := partitionedSim(t, version, caseSensitive)
				list := "Get-MobileDevice"
				if version == exchangesim.Version2010 {
					list = "Get-ActiveSyncDevice"
				}
				one := clientOf(t, s, 1, 0)
				s.Recorder.Reset()
				want, _ := listAll(t, one)
				if f := filtersOf(t, s, list); len(f) != 1 || f[0] != "" {
					t.Fatalf("one session listed with filters %q, want one unfiltered listing", f)
				}
				if len(want) != s.Org.ActiveSyncCount() {
					t.Fatalf("the one listing has %d partnerships, the organisation %d", len(want), s.Org.ActiveSyncCount())
				}
				wantRecipients := recipientsOf(t, one)

				parted := clientOf(t, s, 4, 0)
				s.Recorder.Reset()
				got, byGUID := listAll(t, parted)
				filters := filtersOf(t, s, list)
				if len(filters) != 2*4+1 {
					t.Fatalf("4 sessions listed in %d parts, want %d: %q", len(filters), 2*4+1, filters)
				}
				// The parts split the work: none holds a quarter of it (a
				// ninth each if even), in either case of the ids.
				for _, r := range s.Recorder.Records("cmdlet") {
					if r.Cmdlet == list && r.Objects > len(want)/4 {
						t.Errorf("one part of %d listed %d of the %d partnerships: %s", len(filters), r.Objects, len(want), r.Params)
					}
				}
				if strings.Join(got, ",") != strings.Join(want, ",") {
					t.Fatalf("the parts listed %d partnerships, the one listing %d; missing or extra: %v", len(got), len(want), diff(want, got))
				}
				ids := map[string]bool{}
				for _, p := range byGUID {
					ids[p.DeviceID] = true
				}
				for _, id := range oddDeviceIDs {
					if !ids[id] {
						t.Errorf("device id %q not listed", id)
					}
				}
				if gotRecipients := recipientsOf(t, parted); strings.Join(gotRecipients, "\n") != strings.Join(wantRecipients, "\n") {
					t.Fatalf("the parts listed %d recipients, the one listing %d; missing or extra: %v", len(gotRecipients), len(wantRecipients),
						diff(wantRecipients, gotRecipients))
				}
				if f := filtersOf(t, s, "Get-Recipient"); len(f) != 2*4+1 {
					t.Fatalf("recipients listed in %d parts, want %d", len(f), 2*4+1)
				}
			})
		}
	}
}

// diff returns what is in one sorted list and not the other.
func diff(a, b []string) []string {
	in := map[string]int{}
	for _, x := range a {
		in[x]++
	}
	for _, x := range b {
		in[x]--
	}
	var out []string
	for x, n := range in {
		if n != 0 {
			out = append(out, x)
		}
	}
	sort.Strings(out)
	if len(out) > 10 {
		out = append(out[:10], "…")
	}
	return out
}

// Any part failing fails the whole listing, whether it is a group or the
// remainder, and the error says which part: a listing missing a part must
// never look complete (the collector would report its partnerships gone).
func TestPartitionedListingFailsWithAnyPart(t *testing.T) {
	tests := []struct {
		name   string
		cmdlet string
		part   func(filter string) bool
		list   func(*exchange.Client) error
	}{
		{"a group of partnerships", "Get-MobileDevice", func(f string) bool {
			return strings.Contains(f, "DeviceId -like '*0'") && !strings.HasPrefix(f, "-not")
		},
			func(c *exchange.Client) error {
				return c.ListPartnerships(context.Background(), exchange.ListOptions{}, func([]exchange.Partnership) error { return nil })
			}},
		{"the remainder of partnerships", "Get-MobileDevice", func(f string) bool { return strings.HasPrefix(f, "-not") },
			func(c *exchange.Client) error {
				return c.ListPartnerships(context.Background(), exchange.ListOptions{}, func([]exchange.Partnership) error { return nil })
			}},
		{"a group of recipients", "Get-Recipient", func(f string) bool { return strings.Contains(f, "Alias -like '*z'") && !strings.Contains(f, "-not") },
			func(c *exchange.Client) error {
				return c.ListRecipients(context.Background(), func([]exchange.Recipient) error { return nil })
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := partitionedSim(t, exchangesim.Version2019, false)
			var hit atomic.Int32
			s.Org.SetCallFault(func(c exchange.Call) *exchange.Error {
				f, _ := c.Params["Filter"].(string)
				if !strings.EqualFold(c.Cmdlet, tt.cmdlet) || !tt.part(f) {
					return nil
				}
				hit.Add(1)
				return &exchange.Error{Message: "Active Directory operation failed on DC01.contoso.com.", Category: "NotSpecified",
					Reason: "ADTransientException", FQID: "ADTransient"}
			})
			err := tt.list(clientOf(t, s, 3, 0))
			if err == nil {
				t.Fatal("the listing succeeded with a part failing")
			}
			if n := hit.Load(); n != 1 {
				t.Fatalf("the fault hit %d parts, want 1", n)
			}
			if !strings.Contains(err.Error(), "part ") || !strings.Contains(err.Error(), "Active Directory operation failed") {
				t.Fatalf("the error does not say which part failed and why: %v", err)
			}
			if errors.Is(err, context.Canceled) {
				t.Fatalf("the error is another part's cancellation, not the failure: %v", err)
			}
		})
	}
}

// Whether Exchange takes a -like with a leading wildcard ('*a') on
// DeviceId and Alias is UNCONFIRMED. Where it refuses the parts' filters,
// a full listing is read as one instead (complete, only slower), and the
// client stops trying parts; where it takes them, the parts are read
// (TestPartitionedListingMatchesOneListing).
func TestPartitionedListingWhereLeadingWildcardsAreRefused(t *testing.T) {
	s := partitionedSim(t, exchangesim.Version2019, false)
	want, _ := listAll(t, clientOf(t, s, 1, 0))
	wantRecipients := recipientsOf(t, clientOf(t, s, 1, 0))
	s.Org.SetRefuseLeadingWildcard(true)
	c := clientOf(t, s, 3, 0)
	for _, pass := range []string{"first", "second"} {
		s.Recorder.Reset()
		got, _ := listAll(t, c)
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Fatalf("%s listing: %d partnerships, the one listing %d; missing or extra: %v", pass, len(got), len(want), diff(want, got))
		}
		filters := filtersOf(t, s, "Get-MobileDevice")
		if unfiltered := filters[len(filters)-1]; unfiltered != "" {
			t.Fatalf("%s listing ended with a filtered listing %q", pass, unfiltered)
		}
		// The first tries parts (the first refusal ends the others), the
		// second goes straight to the one listing.
		if (pass == "first") != (len(filters) > 1) {
			t.Fatalf("%s listing: %d Get-MobileDevice calls: %q", pass, len(filters), filters)
		}
	}
	if got := recipientsOf(t, c); strings.Join(got, "\n") != strings.Join(wantRecipients, "\n") {
		t.Fatalf("recipients: %d, the one listing %d", len(got), len(wantRecipients))
	}
}

// EASGUARD_EXCHANGE_LIST_PARTITIONS takes 0 (two parts per worker) to 36
// (one per last character); anything else is refused by name.
func TestConfigListPartitions(t *testing.T) {
	env := func(v string) map[string]string {
		return map[string]string{"EASGUARD_EXCHANGE_SERVER": "ex01.contoso.com", "EASGUARD_EXCHANGE_USER": `CONTOSO\svc-easguard`,
			"EASGUARD_EXCHANGE_PASSWORD": "secret", "EASGUARD_EXCHANGE_LIST_PARTITIONS": v}
	}
	configtest.Check[exchangeSpec](t, []configtest.Case{
		{Name: "derived", Env: env("0"), Want: ""},
		{Name: "one listing", Env: env("1"), Want: ""},
		{Name: "one part per character", Env: env("36"), Want: ""},
		{Name: "more parts than characters", Env: env("37"), Want: "EASGUARD_EXCHANGE_LIST_PARTITIONS"},
		{Name: "negative", Env: env("-1"), Want: "EASGUARD_EXCHANGE_LIST_PARTITIONS"},
	})
}
