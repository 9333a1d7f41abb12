package exchange_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// hostCases are the Windows hosts and sessions the typed operations must
// read correctly: enums as names or as the numbers a deserialised enum
// becomes, property names in either casing, dates of every kind in any
// time zone (UNCONFIRMED behaviours, so both ways each).
var hostCases = []struct {
	name string
	host exchangesim.Host
}{
	{"as the script sends them", exchangesim.Host{}},
	{"enums as deserialised numbers", exchangesim.Host{DeserializedEnums: true}},
	{"other property casing", exchangesim.Host{AltPropertyCase: true}},
	{"unspecified dates on a host east of UTC", exchangesim.Host{UnspecifiedDates: true, UTCOffset: 2 * time.Hour}},
	{"UTC dates on a host west of UTC", exchangesim.Host{UTCOffset: -5 * time.Hour}},
	{"all of it on a de-DE host", exchangesim.Host{Culture: "de-DE", DeserializedEnums: true, AltPropertyCase: true, UnspecifiedDates: true, UTCOffset: time.Hour}},
}

func TestTypedReadsOnEveryHost(t *testing.T) {
	for _, hc := range hostCases {
		t.Run(hc.name, func(t *testing.T) {
			s := startSim(t, exchangesim.Config{CAS: []string{"EX01", "EX02"}, WorkerHost: hc.host})
			if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice"}); err != nil {
				t.Fatal(err)
			}
			if err := s.Org.SetDefaultAccessLevel("Quarantine"); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Org.Sync(exchangesim.Phone{Mailbox: "alice", DeviceID: "ApplF17LTTCGFFG8", DeviceType: "iPhone"}); err != nil {
				t.Fatal(err)
			}
			cfg := simConfig(t, s)
			p := newPool(t, cfg)
			if got := p.Servers(); len(got) != 2 {
				t.Fatalf("CAS discovery read %v", got)
			}
			c := exchange.NewClient(p, cfg)
			ctx := context.Background()
			truth, err := s.Org.Partnerships("alice")
			if err != nil || len(truth) != 1 {
				t.Fatal(truth, err)
			}
			firstSync, err := time.Parse(time.RFC3339Nano, truth[0].FirstSync)
			if err != nil {
				t.Fatal(err)
			}
			var got []exchange.Partnership
			// A cut whose day is above 12: a session left in de-DE would
			// refuse or misread the filter's date.
			since := time.Date(2026, 11, 20, 10, 0, 0, 0, time.UTC)
			if err := c.ListPartnerships(ctx, exchange.ListOptions{NewSince: since}, func(ps []exchange.Partnership) error { got = append(got, ps...); return nil }); err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 {
				t.Fatalf("listed %d partnerships", len(got))
			}
			ps := got[0]
			if ps.DeviceID != "ApplF17LTTCGFFG8" || ps.GUID == "" || ps.AccessState != "Quarantined" || ps.AccessReason != "Global" || ps.ClientType != "EAS" {
				t.Fatalf("partnership read as %+v", ps)
			}
			if !ps.FirstSyncTime.Equal(firstSync.Truncate(100*time.Nanosecond)) || ps.FirstSyncTime.Location() != time.UTC {
				t.Fatalf("FirstSyncTime %v, Exchange has %v", ps.FirstSyncTime, firstSync)
			}
			if ps.WhenChanged.IsZero() || ps.WhenChanged.Sub(firstSync).Abs() > time.Minute {
				t.Fatalf("WhenChanged %v, first sync %v", ps.WhenChanged, firstSync)
			}
			stats, err := c.DeviceStatistics(ctx, "alice")
			if err != nil || len(stats) != 1 || stats[0].DeviceID != "ApplF17LTTCGFFG8" || stats[0].Status != "DeviceOk" ||
				stats[0].PolicyStatus != "NotApplied" || stats[0].AccessState != "Quarantined" || stats[0].AccessReason != "Global" ||
				stats[0].LastSyncAttempt.Sub(firstSync).Abs() > time.Minute {
				t.Fatalf("statistics %+v %v", stats, err)
			}
			org, err := c.GetOrgSettings(ctx)
			if err != nil || org.DefaultAccessLevel != "Quarantine" {
				t.Fatalf("org settings %+v %v", org, err)
			}
			if _, changed, err := c.EnforceOrgSettings(ctx, exchange.OrgSettings{DefaultAccessLevel: "Quarantine"}, true); err != nil || len(changed) != 0 {
				t.Fatalf("an org already as wanted must not be rewritten: %v %v", changed, err)
			}
		})
	}
}

// The contract the simulator models the session from: the script pins the
// culture of its thread and of the remote session to en-US, opens the
// session with a two-minute idle timeout, and checks the session before
// calls and at every heartbeat.
func TestScriptPinsCultureAndChecksItsSession(t *testing.T) {
	c := exchange.Contract()
	if c.SessionCulture() != "en-US" || c.SessionOption["UICulture"] != "en-US" || c.ThreadCulture != "en-US" {
		t.Fatalf("culture not pinned: session %v, thread %q", c.SessionOption, c.ThreadCulture)
	}
	if ms := c.SessionIdleTimeoutMS(); ms < 60_000 || ms > 5*60_000 {
		t.Fatalf("remote session idle timeout %d ms; want about two minutes", ms)
	}
	for _, op := range []string{"invoke", "batch"} {
		if !c.OpReaches(op, "Get-SessionProblem") {
			t.Fatalf("%s does not check the session (reaches %v)", op, c.Ops[op])
		}
	}
	if !c.OpReaches("ping", "Test-ExchangeSession") {
		t.Fatalf("ping does not check the session (reaches %v)", c.Ops["ping"])
	}
	if w := strings.ToLower(c.InvokeCommon["WarningAction"]); w == "silentlycontinue" || w == "ignore" {
		t.Fatalf("-WarningAction %s drops warnings on the server over implicit remoting", w)
	}
}

// Exchange's "only the first 1000 items" warning must reach easguard over a
// remote session and turn the listing into an incomplete one.
func TestTruncatedListingIsIncomplete(t *testing.T) {
	s := startSim(t, exchangesim.Config{Seed: &exchangesim.SeedSpec{Mailboxes: 700, Partnerships: 1200, Seed: 5, NoHostile: true}})
	cfg := simConfig(t, s)
	c := exchange.NewClient(newPool(t, cfg), cfg)
	ctx := context.Background()
	n, err := c.Count(ctx, "Get-MobileDevice", exchange.Params{"ActiveSync": true})
	if !errors.Is(err, exchange.ErrIncomplete) {
		t.Fatalf("a listing cut at the default ResultSize counted %d with error %v; want ErrIncomplete", n, err)
	}
	n, err = c.Count(ctx, "Get-MobileDevice", exchange.Params{"ActiveSync": true, "ResultSize": "Unlimited"})
	if err != nil || n < 1100 {
		t.Fatalf("complete listing: %d %v", n, err)
	}
}

// A PowerShell host in Constrained Language Mode (AppLocker, WDAC) cannot
// run the worker; easguard says so instead of reporting a crash.
func TestConstrainedLanguageHostIsNamed(t *testing.T) {
	s := startSim(t, exchangesim.Config{WorkerHost: exchangesim.Host{LanguageMode: "ConstrainedLanguage"}})
	cfg := simConfig(t, s)
	_, err := exchange.NewPool(context.Background(), cfg, quiet())
	if !errors.Is(err, exchange.ErrInvalid) || !strings.Contains(err.Error(), "ConstrainedLanguage") || !strings.Contains(err.Error(), "FullLanguage") {
		t.Fatalf("want an invalid-setup error naming the language mode, got %v", err)
	}
}

// The snap-in cannot reach Active Directory from a WinRM shell (double
// hop): the mode is refused at start with the variable named.
func TestSnapinModeIsRefused(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	for _, kv := range s.Env(exchangesim.DefaultUser, exchangesim.DefaultPassword, "") {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	t.Setenv("EASGUARD_EXCHANGE_MODE", "snapin")
	var spec exchangeSpec
	err := config.Load(&spec)
	if err == nil || !strings.Contains(err.Error(), "EASGUARD_EXCHANGE_MODE") || !strings.Contains(err.Error(), "Active Directory") {
		t.Fatalf("snapin must be refused naming EASGUARD_EXCHANGE_MODE: %v", err)
	}
}
