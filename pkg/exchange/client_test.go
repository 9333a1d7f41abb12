package exchange_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// The acceptance at full size: list all 20,000 partnerships of a
// 10,000-mailbox organisation, then allow 5,000 devices and block 5,000
// others in one batch, and read the end state back from the simulator.
func TestListAllAndApplyTenThousand(t *testing.T) {
	s := startSim(t, exchangesim.Config{Seed: &exchangesim.SeedSpec{Mailboxes: 10000, Partnerships: 20000, Seed: 3, NoHostile: true}})
	cfg := simConfig(t, s)
	p := newPool(t, cfg)
	c := exchange.NewClient(p, cfg)
	ctx := context.Background()

	var listed []exchange.Partnership
	if err := c.ListPartnerships(ctx, exchange.ListOptions{}, func(ps []exchange.Partnership) error {
		listed = append(listed, ps...)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	all, err := s.Org.Partnerships("")
	if err != nil {
		t.Fatal(err)
	}
	want := s.Org.ActiveSyncCount()
	if len(listed) != want || want < 19500 {
		t.Fatalf("listed %d partnerships, the organisation has %d ActiveSync partnerships", len(listed), want)
	}

	var changes []exchange.Change
	expect := map[string]string{} // mailbox\x00id → allowed|blocked
	for i, p := range listed[:10000] {
		ch := exchange.Change{Mailbox: p.Mailbox, DeviceID: p.DeviceID, Access: exchange.AccessAllow}
		if i%2 == 1 {
			ch.Access = exchange.AccessBlock
		}
		changes = append(changes, ch)
	}
	for _, ch := range changes {
		expect[strings.ToLower(ch.Mailbox)+"\x00"+strings.ToLower(ch.DeviceID)] = ch.Access.String()
	}
	start := time.Now()
	res, err := c.ApplyAccess(ctx, changes)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if r.Err != nil {
			t.Fatalf("%s/%s: %v", r.Mailbox, r.DeviceID, r.Err)
		}
	}
	t.Logf("applied %d changes in %s, %d round trips", len(changes), time.Since(start), p.RoundTrips())
	// Read the end state back from the simulator itself.
	after, err := s.Org.Partnerships("")
	if err != nil {
		t.Fatal(err)
	}
	byIdentity := map[string]exchangesim.Partnership{}
	for _, p := range after {
		byIdentity[p.Identity] = p
	}
	allowed, blocked := 0, 0
	for _, lp := range listed[:10000] {
		sp := byIdentity[lp.Identity]
		w := expect[strings.ToLower(lp.Mailbox)+"\x00"+strings.ToLower(lp.DeviceID)]
		switch {
		case w == "allow" && sp.Allowed && !sp.Blocked && sp.State == "Allowed" && sp.Reason == "Individual":
			allowed++
		case w == "block" && sp.Blocked && !sp.Allowed && sp.State == "Blocked" && sp.Reason == "Individual":
			blocked++
		default:
			t.Fatalf("%s wanted %s, simulator has %+v", lp.Identity, w, sp)
		}
	}
	if allowed != 5000 || blocked != 5000 {
		t.Fatalf("allowed %d, blocked %d", allowed, blocked)
	}
	// Nothing else changed: partnerships not in the batch keep their lists
	// (unless they share an id with one that was changed in the same mailbox).
	beforeByIdentity := map[string]exchangesim.Partnership{}
	for _, b := range all {
		beforeByIdentity[b.Identity] = b
	}
	for _, lp := range listed[10000:] {
		sp, b := byIdentity[lp.Identity], beforeByIdentity[lp.Identity]
		if (b.Allowed != sp.Allowed || b.Blocked != sp.Blocked) && expect[strings.ToLower(lp.Mailbox)+"\x00"+strings.ToLower(lp.DeviceID)] == "" {
			t.Fatalf("%s changed without being asked", lp.Identity)
		}
	}
}

func TestApplyAccessSemantics(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	for _, a := range []string{"alice", "bob"} {
		if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: a}); err != nil {
			t.Fatal(err)
		}
	}
	cfg := simConfig(t, s)
	p := newPool(t, cfg)
	c := exchange.NewClient(p, cfg)
	ctx := context.Background()
	s.Recorder.Reset()
	res, err := c.ApplyAccess(ctx, []exchange.Change{
		{Mailbox: "alice@contoso.com", DeviceID: "Dev1", Access: exchange.AccessBlock},
		{Mailbox: "alice@contoso.com", DeviceID: "Dev2", Access: exchange.AccessAllow},
		{Mailbox: "ALICE@contoso.com", DeviceID: "dev1", Access: exchange.AccessAllow}, // supersedes the first
		{Mailbox: "bob@contoso.com", DeviceID: "B1", Access: exchange.AccessBlock},
		{Mailbox: "nobody@contoso.com", DeviceID: "N1", Access: exchange.AccessAllow},
		{Mailbox: "bob@contoso.com", DeviceID: strings.Repeat("x", 33), Access: exchange.AccessAllow},
		{Mailbox: "bob@contoso.com", DeviceID: "bad\x00nul", Access: exchange.AccessAllow},
		{Mailbox: "", DeviceID: "E1", Access: exchange.AccessAllow},
	})
	if err != nil {
		t.Fatal(err)
	}
	wantErr := []error{exchange.ErrSuperseded, nil, nil, nil, exchange.ErrNotFound, exchange.ErrInvalid, exchange.ErrInvalid, exchange.ErrInvalid}
	for i, r := range res {
		if (wantErr[i] == nil) != (r.Err == nil) || (wantErr[i] != nil && !errors.Is(r.Err, wantErr[i])) {
			t.Errorf("change %d: err %v, want %v", i, r.Err, wantErr[i])
		}
	}
	// One Get-CASMailbox per mailbox, then one Set-CASMailbox per mailbox
	// that exists, each step in one round trip.
	if n := s.Recorder.Count("cmdlet:Get-CASMailbox"); n != 3 {
		t.Errorf("%d Get-CASMailbox calls, want 3 (alice, bob, nobody)", n)
	}
	if n := s.Recorder.Count("cmdlet:Set-CASMailbox"); n != 2 {
		t.Errorf("%d Set-CASMailbox calls, want 2 (alice, bob)", n)
	}
	allowed, blocked, _ := s.Org.Lists("alice")
	if fmt.Sprint(allowed) != "[dev1 Dev2]" || len(blocked) != 0 {
		t.Fatalf("alice: allowed %v blocked %v", allowed, blocked)
	}
	// Moving an id between lists names both lists, and unlisting clears both.
	res, _ = c.ApplyAccess(ctx, []exchange.Change{{Mailbox: "alice", DeviceID: "DEV2", Access: exchange.AccessBlock}})
	if res[0].Err != nil {
		t.Fatal(res[0].Err)
	}
	allowed, blocked, _ = s.Org.Lists("alice")
	if fmt.Sprint(allowed) != "[dev1]" || fmt.Sprint(blocked) != "[DEV2]" {
		t.Fatalf("after moving: allowed %v blocked %v", allowed, blocked)
	}
	res, _ = c.ApplyAccess(ctx, []exchange.Change{{Mailbox: "alice", DeviceID: "dev2", Access: exchange.AccessUnlist}, {Mailbox: "alice", DeviceID: "Dev1", Access: exchange.AccessUnlist}})
	allowed, blocked, _ = s.Org.Lists("alice")
	if len(allowed)+len(blocked) != 0 || res[0].Err != nil {
		t.Fatalf("after unlisting: allowed %v blocked %v (%v)", allowed, blocked, res[0].Err)
	}
	// Applying the same batch twice converges.
	batch := []exchange.Change{{Mailbox: "bob", DeviceID: "B2", Access: exchange.AccessAllow}}
	for i := 0; i < 2; i++ {
		if res, err := c.ApplyAccess(ctx, batch); err != nil || res[0].Err != nil {
			t.Fatalf("round %d: %v %v", i, err, res[0].Err)
		}
	}
	allowed, _, _ = s.Org.Lists("bob")
	if fmt.Sprint(allowed) != "[B2]" {
		t.Fatalf("bob allowed %v", allowed)
	}
}

func TestTypedReads(t *testing.T) {
	s := startSim(t, exchangesim.Config{CAS: []string{"EX01", "EX02"}})
	if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice"}); err != nil {
		t.Fatal(err)
	}
	cfg := simConfig(t, s)
	p := newPool(t, cfg)
	c := exchange.NewClient(p, cfg)
	ctx := context.Background()
	for _, id := range []string{"ApplOLD", "ApplNEW"} {
		if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: "alice", DeviceID: id, DeviceType: "iPhone"}); err != nil {
			t.Fatal(err)
		}
	}
	servers, err := c.Servers(ctx)
	if err != nil || len(servers) != 2 || servers[0].FQDN != "ex01.contoso.com" || !strings.HasPrefix(servers[0].Version, "Version 15.2") {
		t.Fatalf("servers %+v %v", servers, err)
	}
	if got := p.Servers(); len(got) != 2 || got[0] != "ex01.contoso.com" || got[1] != "ex02.contoso.com" {
		t.Fatalf("discovered %v", got)
	}
	stats, err := c.DeviceStatistics(ctx, "alice@contoso.com")
	if err != nil || len(stats) != 2 || stats[0].LastSuccessSync.IsZero() || stats[0].Status != "DeviceOk" {
		t.Fatalf("statistics %+v %v", stats, err)
	}
	if _, err := c.DeviceStatistics(ctx, ""); !errors.Is(err, exchange.ErrInvalid) {
		t.Fatalf("an empty mailbox must be refused (Exchange would return every device): %v", err)
	}
	var boxes []exchange.Mailbox
	if err := c.ListMailboxes(ctx, func(m []exchange.Mailbox) error { boxes = append(boxes, m...); return nil }); err != nil || len(boxes) != 1 {
		t.Fatalf("mailboxes with partnerships %+v %v", boxes, err)
	}
	want := exchange.OrgSettings{DefaultAccessLevel: "Quarantine", AdminMailRecipients: []string{"helpdesk@contoso.com"}, UserMailInsert: "Enrol in Intune."}
	sets := s.Recorder.Count("cmdlet:Set-ActiveSyncOrganizationSettings")
	_, changed, err := c.EnforceOrgSettings(ctx, want, false)
	if err != nil || len(changed) != 3 || s.Recorder.Count("cmdlet:Set-ActiveSyncOrganizationSettings") != sets {
		t.Fatalf("a dry run must name the three settings and change nothing: %v %v", changed, err)
	}
	_, changed, err = c.EnforceOrgSettings(ctx, want, true)
	if err != nil || len(changed) != 3 {
		t.Fatalf("enforce: %v %v", changed, err)
	}
	_, changed, err = c.EnforceOrgSettings(ctx, exchange.OrgSettings{DefaultAccessLevel: "quarantine", AdminMailRecipients: []string{"HELPDESK@contoso.com"}, UserMailInsert: "Enrol in Intune."}, true)
	if err != nil || len(changed) != 0 {
		t.Fatalf("second enforce changed %v %v", changed, err)
	}
	// Settings easguard was not given are the administrator's: left alone.
	_, changed, err = c.EnforceOrgSettings(ctx, exchange.OrgSettings{DefaultAccessLevel: "Quarantine"}, true)
	if err != nil || len(changed) != 0 {
		t.Fatalf("unset settings must be left alone: %v %v", changed, err)
	}
	if got, err := c.GetOrgSettings(ctx); err != nil || len(got.AdminMailRecipients) != 1 || got.UserMailInsert != "Enrol in Intune." {
		t.Fatalf("settings after a partial enforce: %+v %v", got, err)
	}
	// The default changes only from the level the plan was made against.
	for _, tc := range []struct{ from, to, found, after string }{
		{"Allow", "Block", "Quarantine", "Quarantine"},           // stale plan: left alone
		{"Quarantine", "Allow", "Quarantine", "Allow"},           // changed
		{"allow", "Quarantine", "Allow", "Quarantine"},           // case-insensitive
		{"Quarantine", "Quarantine", "Quarantine", "Quarantine"}, // nothing to do
	} {
		sets := s.Recorder.Count("cmdlet:Set-ActiveSyncOrganizationSettings")
		found, err := c.SetDefaultAccessLevel(ctx, tc.from, tc.to)
		got, gerr := c.GetOrgSettings(ctx)
		if err != nil || gerr != nil || found != tc.found || got.DefaultAccessLevel != tc.after {
			t.Fatalf("SetDefaultAccessLevel(%s, %s): found %q (%v), now %q (%v); want found %q, now %q", tc.from, tc.to, found, err, got.DefaultAccessLevel, gerr, tc.found, tc.after)
		}
		if wrote := s.Recorder.Count("cmdlet:Set-ActiveSyncOrganizationSettings") - sets; (tc.found != tc.after) != (wrote == 1) {
			t.Fatalf("SetDefaultAccessLevel(%s, %s) ran Set-ActiveSyncOrganizationSettings %d times", tc.from, tc.to, wrote)
		}
	}
	// Quick sync: only what is new since a time.
	cut := time.Now()
	if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: "alice", DeviceID: "ApplNEWEST", DeviceType: "iPhone"}); err != nil {
		t.Fatal(err)
	}
	var fresh []exchange.Partnership
	if err := c.ListPartnerships(ctx, exchange.ListOptions{NewSince: cut}, func(ps []exchange.Partnership) error { fresh = append(fresh, ps...); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(fresh) != 1 || fresh[0].DeviceID != "ApplNEWEST" || fresh[0].AccessState != "Quarantined" || fresh[0].Mailbox != "contoso.com/Users/alice" {
		t.Fatalf("new since: %+v", fresh)
	}
	missing, err := c.MissingCmdlets(ctx)
	if err != nil || len(missing) != 0 {
		t.Fatalf("missing %v %v", missing, err)
	}
	if err := c.WipePartnership(ctx, fresh[0].Identity, nil); err != nil {
		t.Fatal(err)
	}
	if r, _ := s.Org.Sync(exchangesim.Phone{Mailbox: "alice", DeviceID: "ApplNEWEST", DeviceType: "iPhone"}); !r.Wiped {
		t.Fatalf("wipe not delivered: %+v", r)
	}
	if err := c.RemovePartnership(ctx, fresh[0].Identity); err != nil {
		t.Fatal(err)
	}
	if err := c.RemovePartnership(ctx, fresh[0].Identity); !errors.Is(err, exchange.ErrNotFound) {
		t.Fatalf("removing twice: %v", err)
	}
	_ = json.Marshal
}

func TestQuoteFilterValue(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice"}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"it's", "a''b", "$(x) `y`", "dq\"x"} {
		if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: "alice", DeviceID: id, DeviceType: "iPhone"}); err != nil {
			t.Fatal(err)
		}
	}
	cfg := simConfig(t, s)
	c := exchange.NewClient(newPool(t, cfg), cfg)
	for _, id := range []string{"it's", "a''b", "$(x) `y`", "dq\"x"} {
		q, err := exchange.QuoteFilterValue(id)
		if err != nil {
			t.Fatal(err)
		}
		objs, _, err := c.Invoke(context.Background(), exchange.Call{Cmdlet: "Get-MobileDevice", Params: exchange.Params{"Filter": "DeviceId -eq " + q}})
		if err != nil || len(objs) != 1 || objs[0]["DeviceId"] != id {
			t.Fatalf("filter for %q (%s): %v %v", id, q, objs, err)
		}
	}
	for _, bad := range []string{"\u2019x", "a\nb", "\xff"} {
		if _, err := exchange.QuoteFilterValue(bad); !errors.Is(err, exchange.ErrInvalid) {
			t.Errorf("%q accepted", bad)
		}
	}
}
