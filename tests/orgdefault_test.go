package tests

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/collector"
	"github.com/easguard/easguard/pkg/executor"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
)

// Only full syncs observe partnerships, so that a test decides when
// easguard first sees the phones it synced.
func fullSyncsOnly(c *collector.Config) { c.QuickInterval, c.FullInterval = time.Hour, 2*time.Hour }

// loosenDefault is an administrator setting the organisation's default back
// to Allow: every phone that syncs from then on gets mail by the default
// until easguard tightens it again.
func (s *stack) loosenDefault() {
	s.t.Helper()
	if err := s.sim.Org.SetDefaultAccessLevel("Allow"); err != nil {
		s.t.Fatal(err)
	}
}

// cmdletOrder returns the positions in the simulator's cmdlet record of
// the changes of DefaultAccessLevel, and of the Set-CASMailbox calls that
// named each device id.
func (s *stack) cmdletOrder(deviceIDs ...string) (defaults []int, byDevice map[string][]int) {
	byDevice = map[string][]int{}
	for i, r := range s.sim.Recorder.Records("cmdlet") {
		switch {
		case !r.OK:
		case r.Cmdlet == "Set-ActiveSyncOrganizationSettings" && strings.Contains(string(r.Params), "DefaultAccessLevel"):
			defaults = append(defaults, i)
		case r.Cmdlet == "Set-CASMailbox":
			for _, id := range deviceIDs {
				if strings.Contains(strings.ToLower(string(r.Params)), strings.ToLower(id)) {
					byDevice[id] = append(byDevice[id], i)
				}
			}
		}
	}
	return defaults, byDevice
}

// With everyone in scope, easguard tightens Exchange's default only once
// every device the policy allows is on its allow list: a full sync that
// first sees four enrolled phones and one unknown, all with mail by the
// default, makes the plan wait for the four allow-list entries (the
// executor gathers decisions for 3 s), and only then changes the default.
// The enrolled phones never lose mail; the unknown one does, counted.
func TestDefaultTightenedAfterAllowListing(t *testing.T) {
	s := startStack(t, stackOptions{collect: fullSyncsOnly, executor: func(c *executor.Config) { c.Window = 3 * time.Second }})
	s.waitFullSync()
	if plan := s.waitDefaultPlan(); plan.State != status.PlanReleased || plan.From != "Allow" || plan.To != "Quarantine" || plan.Revoked != 0 {
		t.Fatalf("first full sync of an empty organisation: %+v", plan)
	}
	s.loosenDefault()

	var phones []exchangesim.Phone
	var devices []managedDevice
	for i, mb := range []string{"alice", "bob", "carol", "alice"} {
		p := iPhone(mb+"@contoso.com", fmt.Sprintf("ApplDEFAULT%04d", i))
		phones = append(phones, p)
		devices = append(devices, compliant("m-"+p.DeviceID, p.Mailbox, p.DeviceID))
	}
	unknown := androidPhone("bob@contoso.com", "AndrDEFAULT0099")
	s.writeInventory(devices...)
	for _, d := range devices {
		waitEvent(t, s.events, "MDM record of "+d.EASDeviceID, func(m *ev.MDMDeviceChanged) bool { return m.GetDevice().GetEasDeviceId() == d.EASDeviceID })
	}
	for _, p := range append(slices.Clone(phones), unknown) {
		if r := s.phoneSync(p); r.State != "Allowed" || r.Reason != "Global" {
			t.Fatalf("with the default loosened %s syncs %+v", p.DeviceID, r)
		}
	}

	plan := s.fullSync()
	if plan.State != status.PlanReleased || plan.From != "Allow" || plan.To != "Quarantine" || plan.Partnerships != 5 || plan.Revoked != 1 ||
		len(plan.Sample) != 1 || !strings.Contains(plan.Sample[0], unknown.DeviceID) {
		t.Fatalf("plan: %+v", plan)
	}
	if applied, _ := statusOf[status.DefaultApplied](s, status.DefaultAppliedKey); applied.Outcome != status.DefaultChanged || applied.DecisionID != plan.DecisionID {
		t.Fatalf("executor's record of the change: %+v", applied)
	}
	ids := []string{unknown.DeviceID}
	for _, p := range phones {
		ids = append(ids, p.DeviceID)
	}
	defaults, byDevice := s.cmdletOrder(ids...)
	if len(defaults) != 2 {
		t.Fatalf("%d changes of DefaultAccessLevel, want 2 (one per full sync)", len(defaults))
	}
	for _, p := range phones {
		if len(byDevice[p.DeviceID]) == 0 || byDevice[p.DeviceID][0] > defaults[1] {
			t.Fatalf("%s was allow-listed at %v, after the default was tightened at %d", p.DeviceID, byDevice[p.DeviceID], defaults[1])
		}
		if r := s.phoneSync(p); r.State != "Allowed" || r.Reason != "Individual" || !r.GetsMail {
			t.Fatalf("enrolled %s after the tightening: %+v", p.DeviceID, r)
		}
	}
	if r := s.phoneSync(unknown); r.GetsMail {
		t.Fatalf("the unknown phone still gets mail: %+v", r)
	}
	if r := s.phoneSync(iPhone("carol@contoso.com", "ApplDEFAULTNEW1")); r.State != "Quarantined" || r.Reason != "Global" {
		t.Fatalf("a new phone after the tightening: %+v", r)
	}
}

// A tightening that would take mail from more than the guard's share is
// held and alerted like any mass revocation, once per set of phones: with
// everyone in scope (unknown phones, whose blocks the guard holds too) and
// with a pilot whose policy asks for the tighter default explicitly (the
// phones of the mailboxes it leaves out). The phones keep their mail.
func TestDefaultTighteningHeldByTheGuard(t *testing.T) {
	for _, tc := range []struct {
		name, policy string
		explicit     bool
	}{
		{name: "everyone in scope", policy: ""},
		{name: "pilot that asks for it", explicit: true, policy: `
version: 1
org: contoso
default_access_level: quarantine
scope:
  include: {mailboxes: [dave@contoso.com]}
`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startStack(t, stackOptions{policy: tc.policy, collect: fullSyncsOnly})
			s.waitFullSync()
			s.loosenDefault()
			var phones []exchangesim.Phone
			for i := range 6 {
				p := iPhone([]string{"alice", "bob", "carol"}[i%3]+"@contoso.com", fmt.Sprintf("ApplHELD%07d", i))
				phones = append(phones, p)
				s.phoneSync(p)
			}
			var plan status.DefaultPlan
			for i := range 2 {
				plan = s.fullSync()
				if plan.State != status.PlanHeld || plan.Explicit != tc.explicit || plan.Revoked != 6 || plan.Allowed != 6 || plan.Key == "" ||
					!strings.Contains(plan.Detail, "takes mail from 6 of the 6") {
					t.Fatalf("full sync %d: plan %+v", i+1, plan)
				}
			}
			alerts := find(s.events, func(m *ev.Alert) bool {
				return m.GetKind() == ev.AlertKind_ALERT_KIND_BLAST_RADIUS && m.GetDetail()["batch"] == "default"
			})
			if len(alerts) != 1 || alerts[0].GetDetail()["revocations"] != "6" || !strings.Contains(alerts[0].GetDetail()["sample"], phones[0].DeviceID) {
				t.Fatalf("want one alert for the held tightening, got %v", alerts)
			}
			if level := s.sim.Org.DefaultAccessLevel(); level != "Allow" {
				t.Fatalf("DefaultAccessLevel %s, want Allow", level)
			}
			for _, p := range phones {
				if r := s.phoneSync(p); !r.GetsMail {
					t.Fatalf("%s lost mail although the guard held the tightening: %+v", p.DeviceID, r)
				}
			}
		})
	}
}

// A change of the default made outside easguard between the full sync and
// the executor is not overruled: the plan was judged against the level
// the full sync read, so the executor changes only that level.
func TestStaleDefaultPlanIsNotApplied(t *testing.T) {
	s := startStack(t, stackOptions{collect: fullSyncsOnly, workers: []string{pipeline.Collector, pipeline.Matcher, pipeline.Evaluator, pipeline.Mailer, pipeline.MDM}})
	// No executor yet: the plan is released, not applied.
	natstest.Eventually(t, 30*time.Second, "the plan released", func() bool {
		plan, _ := statusOf[status.DefaultPlan](s, status.DefaultPlanKey)
		return plan.State == status.PlanReleased
	})
	if err := s.sim.Org.SetDefaultAccessLevel("Block"); err != nil {
		t.Fatal(err)
	}
	s.startWorker(t, "executor")
	var applied status.DefaultApplied
	natstest.Eventually(t, 60*time.Second, "the executor's verdict on the stale plan", func() bool {
		applied, _ = statusOf[status.DefaultApplied](s, status.DefaultAppliedKey)
		return applied.DecisionID != ""
	})
	if applied.Outcome != status.DefaultStale || applied.Found != "Block" {
		t.Fatalf("stale plan: %+v", applied)
	}
	if level := s.sim.Org.DefaultAccessLevel(); level != "Block" {
		t.Fatalf("DefaultAccessLevel %s, want the administrator's Block", level)
	}
}
