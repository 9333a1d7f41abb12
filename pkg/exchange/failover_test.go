package exchange_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// The primary CAS goes down in the middle of a batch: the batch completes
// on the other CAS with every change applied as asked, and the pool goes
// back to the primary once it is up again.
func TestFailoverMidBatchAndBack(t *testing.T) {
	profile := exchangesim.TestProfile()
	profile.CmdletWrite = 2 * time.Millisecond // long enough for the batch to be caught mid-way
	s := startSim(t, exchangesim.Config{CAS: []string{"EX01", "EX02"}, Profile: profile,
		Seed: &exchangesim.SeedSpec{Mailboxes: 600, Partnerships: 0, Seed: 5, NoHostile: true}})
	cfg := simConfig(t, s)
	cfg.BatchSize = 10
	p := newPool(t, cfg)
	c := exchange.NewClient(p, cfg)
	var changes []exchange.Change
	for i, m := range s.Org.Mailboxes() {
		if m.Monitoring {
			continue
		}
		acc := exchange.AccessAllow
		if i%3 == 0 {
			acc = exchange.AccessBlock
		}
		changes = append(changes, exchange.Change{Mailbox: m.PrimarySMTP, DeviceID: fmt.Sprintf("Dev%04d", i), Access: acc})
	}
	ex01, ex02 := s.Endpoint("EX01"), s.Endpoint("EX02")
	done := make(chan struct{})
	var res []exchange.ChangeResult
	var applyErr error
	go func() {
		defer close(done)
		res, applyErr = c.ApplyAccess(context.Background(), changes)
	}()
	eventually(t, 30*time.Second, "the batch to be under way on EX01", func() bool {
		n := 0
		for _, r := range s.Recorder.Records("cmdlet") {
			if r.Cmdlet == "Set-CASMailbox" && r.Endpoint == "EX01" {
				n++
			}
		}
		return n >= 60
	})
	if err := ex01.SetDown(true); err != nil {
		t.Fatal(err)
	}
	<-done
	if applyErr != nil {
		t.Fatal(applyErr)
	}
	for _, r := range res {
		if r.Err != nil {
			t.Fatalf("%s/%s: %v", r.Mailbox, r.DeviceID, r.Err)
		}
	}
	onEX02 := 0
	for _, r := range s.Recorder.Records("cmdlet") {
		if r.Cmdlet == "Set-CASMailbox" && r.Endpoint == "EX02" {
			onEX02++
		}
	}
	if onEX02 == 0 {
		t.Fatal("no change was applied on EX02")
	}
	for _, ch := range changes {
		allowed, blocked, err := s.Org.Lists(ch.Mailbox)
		if err != nil {
			t.Fatal(err)
		}
		want := []string{ch.DeviceID}
		ok := fmt.Sprint(allowed) == fmt.Sprint(want) && len(blocked) == 0
		if ch.Access == exchange.AccessBlock {
			ok = fmt.Sprint(blocked) == fmt.Sprint(want) && len(allowed) == 0
		}
		if !ok {
			t.Fatalf("%s: allowed %v blocked %v, wanted %s", ch.Mailbox, allowed, blocked, ch.Access)
		}
	}
	if p.Current() != ex02.FQDN {
		t.Fatalf("pool is on %s while EX01 is down", p.Current())
	}
	if err := ex01.SetDown(false); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "the pool back on the primary", func() bool { return p.Current() == ex01.FQDN })
	// New work runs on the primary again.
	s.Recorder.Reset()
	res, err := c.ApplyAccess(context.Background(), []exchange.Change{{Mailbox: changes[0].Mailbox, DeviceID: "AfterRecovery", Access: exchange.AccessAllow}})
	if err != nil || res[0].Err != nil {
		t.Fatal(err, res[0].Err)
	}
	for _, r := range s.Recorder.Records("cmdlet") {
		if r.Endpoint != "EX01" {
			t.Fatalf("after recovery a call ran on %s", r.Endpoint)
		}
	}
}

func TestFailoverCanBeTurnedOff(t *testing.T) {
	s := startSim(t, exchangesim.Config{CAS: []string{"EX01", "EX02"}})
	cfg := simConfig(t, s)
	cfg.CASFailover = false
	p := newPool(t, cfg)
	if got := p.Servers(); len(got) != 1 {
		t.Fatalf("servers %v with failover off", got)
	}
}

// Errors are classified so callers can act: retry, back off, report the
// item, or stop and tell an administrator.
func TestErrorClassification(t *testing.T) {
	t.Run("wrong password", func(t *testing.T) {
		s := startSim(t, exchangesim.Config{})
		cfg := simConfig(t, s)
		cfg.Password = config.Secret("wrong")
		_, err := exchange.NewPool(context.Background(), cfg, quiet())
		if !errors.Is(err, exchange.ErrAuth) || !exchange.IsFatal(err) || strings.Contains(err.Error(), "wrong") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("certificate not trusted", func(t *testing.T) {
		s := startSim(t, exchangesim.Config{HTTPS: true})
		cfg := simConfig(t, s)
		cfg.CABundle = ""
		_, err := exchange.NewPool(context.Background(), cfg, quiet())
		if !errors.Is(err, exchange.ErrTLS) {
			t.Fatalf("err = %v", err)
		}
		cfg.InsecureSkipVerify = true
		p := newPool(t, cfg)
		_ = p
	})
	t.Run("WinRM not reachable", func(t *testing.T) {
		s := startSim(t, exchangesim.Config{})
		cfg := simConfig(t, s)
		addr := s.Endpoints()[0].Addr()
		if err := s.Endpoints()[0].SetDown(true); err != nil {
			t.Fatal(err)
		}
		cfg.Resolve = "ex01.contoso.com=" + addr
		_, err := exchange.NewPool(context.Background(), cfg, quiet())
		if !errors.Is(err, exchange.ErrUnreachable) || !exchange.IsTransient(err) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("throttled with Exchange's back-off", func(t *testing.T) {
		prof := exchangesim.TestProfile()
		prof.MaxCmdlets, prof.CmdletPeriod = 3, time.Minute
		s := startSim(t, exchangesim.Config{Profile: prof})
		cfg := simConfig(t, s)
		cfg.CASFailover = false
		p := newPool(t, cfg)
		c := exchange.NewClient(p, cfg)
		var err error
		for i := 0; i < 5 && err == nil; i++ {
			_, _, err = c.Invoke(context.Background(), exchange.Call{Cmdlet: "Get-ExchangeServer"})
		}
		d, ok := exchange.RetryAfterOf(err)
		if !errors.Is(err, exchange.ErrThrottled) || !ok || d < 50*time.Second || d > 60*time.Second {
			t.Fatalf("err = %v, retry after %s", err, d)
		}
	})
	t.Run("missing role", func(t *testing.T) {
		var granted []string
		for _, c := range exchange.AllowedCmdlets {
			if c != "Clear-ActiveSyncDevice" {
				granted = append(granted, c)
			}
		}
		s := startSim(t, exchangesim.Config{Granted: granted})
		cfg := simConfig(t, s)
		c := exchange.NewClient(newPool(t, cfg), cfg)
		// Remote wipe is optional: missing only when asked for.
		missing, err := c.MissingCmdlets(context.Background())
		if err != nil || len(missing) != 0 {
			t.Fatalf("missing %v %v", missing, err)
		}
		missing, err = c.MissingCmdlets(context.Background(), exchange.FeatureRemoteWipe)
		if err != nil || fmt.Sprint(missing) != "[Clear-ActiveSyncDevice]" {
			t.Fatalf("missing %v %v", missing, err)
		}
		err = c.WipePartnership(context.Background(), "x", nil)
		if !errors.Is(err, exchange.ErrPermission) {
			t.Fatalf("err = %v", err)
		}
	})
}

// A worker whose shell is dropped is replaced, idle workers are recycled,
// and closing the pool leaves no shell behind.
func TestWorkerLifecycle(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	cfg := simConfig(t, s)
	cfg.RecycleRequests = 3
	cfg.Workers = 2
	p, err := exchange.NewPool(context.Background(), cfg, quiet())
	if err != nil {
		t.Fatal(err)
	}
	c := exchange.NewClient(p, cfg)
	ep := s.Endpoints()[0]
	call := func() {
		t.Helper()
		if _, _, err := c.Invoke(context.Background(), exchange.Call{Cmdlet: "Get-ActiveSyncOrganizationSettings"}); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 10; i++ {
		call()
	}
	if n := s.Recorder.Count("wsman:Create"); n < 3 {
		t.Fatalf("%d shells created for 10 requests with recycling every 3", n)
	}
	eventually(t, 10*time.Second, "recycled shells deleted", func() bool { return ep.Shells(exchangesim.DefaultUser) <= 2 })
	if n := ep.DropShells(); n == 0 {
		t.Fatal("no shell to drop")
	}
	call() // a fresh worker takes over
	p.Close(context.Background())
	eventually(t, 10*time.Second, "every shell closed", func() bool { return ep.Shells(exchangesim.DefaultUser) == 0 })
}

// The one-shot mode runs each request in its own shell: the baseline, and
// a diagnostic path that shares nothing.
func TestOneShot(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice"}); err != nil {
		t.Fatal(err)
	}
	cfg := simConfig(t, s)
	o, err := exchange.NewOneShot(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := exchange.NewClient(o, cfg)
	for i := 0; i < 3; i++ {
		res, err := c.ApplyAccess(context.Background(), []exchange.Change{{Mailbox: "alice", DeviceID: fmt.Sprint("D", i), Access: exchange.AccessAllow}})
		if err != nil || res[0].Err != nil {
			t.Fatal(err, res[0].Err)
		}
	}
	if allowed, _, _ := s.Org.Lists("alice"); len(allowed) != 3 {
		t.Fatalf("allowed %v", allowed)
	}
	// Each change is two requests (its mailbox's lists are read, then
	// written), each in its own shell.
	if n := s.Recorder.Count("wsman:Create"); n != 6 {
		t.Fatalf("%d shells for 6 one-shot requests", n)
	}
	if rt := o.RoundTrips(); rt < 15 {
		t.Fatalf("%d round trips for 3 one-shot requests", rt)
	}
	if ep := s.Endpoints()[0]; ep.Shells(exchangesim.DefaultUser) != 0 {
		t.Fatal("one-shot left a shell")
	}
}
