package exchange_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// clock is a test clock the simulator's organisation reads.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// A change written through one CAS is seen through another only once
// Active Directory has replicated it: until then the other CAS shows the
// old lists and the old access state (with its old WhenChanged), while the
// CAS that wrote it, and phones (served by the first CAS), see it at once.
// WhenChanged through EX02 is the time the change arrived there
// (whenChanged is not replicated), or, with the UNCONFIRMED switch, the
// originating domain controller's.
func TestReplicationBetweenCAS(t *testing.T) {
	for _, origin := range []bool{false, true} {
		t.Run(map[bool]string{false: "local WhenChanged", true: "originating WhenChanged"}[origin], func(t *testing.T) {
			replicationBetweenCAS(t, origin)
		})
	}
}

func replicationBetweenCAS(t *testing.T, originWhenChanged bool) {
	clk := &clock{now: time.Now()}
	const delay = 15 * time.Second
	s := startSim(t, exchangesim.Config{CAS: []string{"EX01", "EX02"}, ReplicationDelay: delay, Now: clk.Now, OriginWhenChanged: originWhenChanged})
	if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice"}); err != nil {
		t.Fatal(err)
	}
	phone := exchangesim.Phone{Mailbox: "alice", DeviceID: "ApplREPL0001", DeviceType: "iPhone"}
	if r, err := s.Org.Sync(phone); err != nil || r.State != "Allowed" {
		t.Fatalf("first sync %+v %v", r, err)
	}
	clk.Advance(time.Minute)
	ctx := context.Background()
	client := func(cas string) *exchange.Client {
		cfg := simConfig(t, s)
		cfg.Server, cfg.CASFailover = s.Endpoint(cas).FQDN, false
		return exchange.NewClient(newPool(t, cfg), cfg)
	}
	ex1, ex2 := client("EX01"), client("EX02")
	list := func(c *exchange.Client) exchange.Partnership {
		t.Helper()
		var ps []exchange.Partnership
		if err := c.ListPartnerships(ctx, exchange.ListOptions{}, func(p []exchange.Partnership) error { ps = append(ps, p...); return nil }); err != nil || len(ps) != 1 {
			t.Fatalf("listing %+v %v", ps, err)
		}
		return ps[0]
	}
	before := list(ex2)

	applied := clk.Now()
	res, err := ex1.ApplyAccess(ctx, []exchange.Change{{Mailbox: "alice@contoso.com", DeviceID: phone.DeviceID, Access: exchange.AccessBlock}})
	if err != nil || res[0].Err != nil {
		t.Fatalf("block through EX01: %v %+v", err, res)
	}
	if p := list(ex1); p.AccessState != "Blocked" || p.AccessReason != "Individual" || p.WhenChanged.Sub(applied).Abs() > time.Microsecond {
		t.Fatalf("EX01 right after its own write: %+v", p)
	}
	if m, err := ex1.CASMailbox(ctx, "alice"); err != nil || !slices.Equal(m.Blocked, []string{phone.DeviceID}) {
		t.Fatalf("EX01 lists %+v %v", m, err)
	}
	clk.Advance(delay - time.Second)
	if p := list(ex2); p.AccessState != "Allowed" || p.AccessReason != "Global" || !p.WhenChanged.Equal(before.WhenChanged) {
		t.Fatalf("EX02 before replication shows %+v, want the old Allowed/Global of %s", p, before.WhenChanged)
	}
	if m, err := ex2.CASMailbox(ctx, "alice"); err != nil || len(m.Blocked) != 0 {
		t.Fatalf("EX02 lists before replication %+v %v", m, err)
	}
	if r, err := s.Org.Sync(phone); err != nil || r.State != "Blocked" {
		t.Fatalf("the phone, through EX01, must be blocked at once: %+v %v", r, err)
	}
	clk.Advance(time.Second)
	stamp := applied.Add(delay)
	if originWhenChanged {
		stamp = applied
	}
	if p := list(ex2); p.AccessState != "Blocked" || p.AccessReason != "Individual" || p.WhenChanged.Sub(stamp).Abs() > time.Microsecond {
		t.Fatalf("EX02 after replication shows %+v, want Blocked/Individual changed at %s", p, stamp)
	}
	if m, err := ex2.CASMailbox(ctx, "alice"); err != nil || !slices.Equal(m.Blocked, []string{phone.DeviceID}) {
		t.Fatalf("EX02 lists after replication %+v %v", m, err)
	}
}
