package tests

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/collector"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/mailer"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
	"github.com/easguard/easguard/tests/hooksim"
	"github.com/easguard/easguard/tests/intunesim"
)

func androidPhone(mailbox, id string) exchangesim.Phone {
	return exchangesim.Phone{Mailbox: mailbox, DeviceID: id, DeviceType: "Android", DeviceModel: "Pixel 8", DeviceOS: "Android 14",
		UserAgent: "Android-Mail/2024.01", FriendlyName: "Pixel"}
}

func decidedFor(id string, desired ev.DesiredAccess) func(*ev.AccessDecided) bool {
	return func(m *ev.AccessDecided) bool {
		return strings.EqualFold(m.GetPartnership().GetDeviceId(), id) && m.GetDesired() == desired
	}
}

// allowedPhones enrols phones as compliant, lets them sync, and waits until
// easguard has allowed each of them, seen Exchange confirm it, and gone
// idle: a test that changes the MDM next starts from a settled pipeline,
// not one whose confirming observation is still on its way (it would
// judge the device once more and count twice what the test counts once).
func (s *stack) allowedPhones(devices []managedDevice, phones ...exchangesim.Phone) {
	s.t.Helper()
	s.writeInventory(devices...)
	for _, d := range devices {
		id := d.EASDeviceID
		waitEvent(s.t, s.events, "mdm.changed "+id, func(m *ev.MDMDeviceChanged) bool { return m.GetDevice().GetEasDeviceId() == id })
	}
	for _, p := range phones {
		s.phoneSync(p)
	}
	for _, p := range phones {
		s.waitPhone(p, "Allowed", 30*time.Second)
	}
	for _, p := range phones {
		id := p.DeviceID
		waitEvent(s.t, s.events, "easguard seeing "+id+" allowed", func(m *ev.EASPartnershipObserved) bool {
			return strings.EqualFold(m.GetPartnership().GetDeviceId(), id) && m.GetPartnership().GetDeviceAccessState() == ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED
		})
	}
	s.settle()
}

// A phone that was allowed loses mail when the MDM reports it
// non-compliant, and another when the MDM retires it; each user is told
// why, once.
func TestRevokedWhenNoncompliantOrRetired(t *testing.T) {
	s := startStack(t, stackOptions{})
	s.waitFullSync()
	a, b := iPhone("alice@contoso.com", "ApplREVOKE00001"), androidPhone("bob@contoso.com", "androidc0ffee01")
	devA, devB := compliant("m-a", "alice@contoso.com", a.DeviceID), compliant("m-b", "bob@contoso.com", b.DeviceID)
	devB.OperatingSystem, devB.OSVersion, devB.Model = "Android", "14", "Pixel 8"
	s.allowedPhones([]managedDevice{devA, devB}, a, b)
	if n := len(s.smtp.Messages()); n != 0 {
		t.Fatalf("%d mails for compliant phones", n)
	}

	devA.ComplianceState = "noncompliant"
	devB.ManagementState = "retireIssued"
	s.writeInventory(devA, devB)
	da := waitEvent(t, s.events, "block of the non-compliant phone", decidedFor(a.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK))
	db := waitEvent(t, s.events, "block of the retired phone", decidedFor(b.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK))
	if da.GetRule() != "noncompliant" || da.GetNotifyReason() != "noncompliant" {
		t.Fatalf("non-compliant decision %v", da)
	}
	if db.GetNoMatchReason() != ev.NoMatchReason_NO_MATCH_REASON_RETIRED || db.GetNotifyReason() != "retired" {
		t.Fatalf("retired decision %v", db)
	}
	if r := s.waitPhone(a, "Blocked", 30*time.Second); r.GetsMail || r.Reason != "Individual" {
		t.Fatalf("non-compliant phone %+v", r)
	}
	if r := s.waitPhone(b, "Blocked", 30*time.Second); r.GetsMail {
		t.Fatalf("retired phone %+v", r)
	}
	ma := waitEvent(t, s.events, "notify.sent alice", func(m *ev.NotificationSent) bool { return m.GetDeviceId() == a.DeviceID })
	mb := waitEvent(t, s.events, "notify.sent bob", func(m *ev.NotificationSent) bool { return m.GetDeviceId() == b.DeviceID })
	if ma.GetTemplate() != "blocked/noncompliant" || mb.GetTemplate() != "blocked/retired" {
		t.Fatalf("templates %q and %q", ma.GetTemplate(), mb.GetTemplate())
	}
	s.settle()
	if am, bm := s.mailsTo("alice@contoso.com"), s.mailsTo("bob@contoso.com"); len(am) != 1 || len(bm) != 1 || am[0].Subject == bm[0].Subject {
		t.Fatalf("want one mail each, with different subjects: alice %d, bob %d", len(am), len(bm))
	}

	// Fixed in the MDM: mail flows again.
	devA.ComplianceState = "compliant"
	s.writeInventory(devA, devB)
	s.waitPhone(a, "Allowed", 30*time.Second)
}

// A mailbox the policy leaves out is never touched: no decision, no
// Set-CASMailbox, no mail; a mailbox in scope next to it is handled.
func TestOutOfScopeMailboxIsNeverTouched(t *testing.T) {
	s := startStack(t, stackOptions{policy: `
version: 1
org: contoso
scope:
  exclude: {mailboxes: [bob@contoso.com]}
`})
	s.waitFullSync()
	alice, bob := iPhone("alice@contoso.com", "ApplSCOPE000001"), iPhone("bob@contoso.com", "ApplSCOPE000002")
	s.phoneSync(alice)
	s.phoneSync(bob)
	s.waitPhone(alice, "Blocked", 30*time.Second)
	waitEvent(t, s.events, "bob's partnership observed", func(m *ev.EASPartnershipObserved) bool { return m.GetPartnership().GetDeviceId() == bob.DeviceID })
	s.settle()
	if d := find(s.events, deviceOf[*ev.AccessDecided](bob.DeviceID)); len(d) != 0 {
		t.Fatalf("decisions for an out-of-scope mailbox: %v", d)
	}
	if n := s.setCASMailboxCalls(bob.DeviceID); n != 0 {
		t.Fatalf("%d Set-CASMailbox calls for an out-of-scope device", n)
	}
	if m := s.mailsTo("bob@contoso.com"); len(m) != 0 {
		t.Fatalf("mail to an out-of-scope user: %v", m[0].Subject)
	}
	if allowed, blocked, err := s.sim.Org.Lists("bob@contoso.com"); err != nil || len(allowed)+len(blocked) != 0 {
		t.Fatalf("bob's lists %v %v %v", allowed, blocked, err)
	}
	// Exchange applies a changed DefaultAccessLevel to every partnership no
	// list entry or rule covers, at its next sync: a pilot must never
	// tighten it, after the first full sync or any later one.
	for i := range 3 {
		if r := s.phoneSync(bob); r.State != "Allowed" || r.Reason != "Global" || !r.GetsMail {
			t.Fatalf("after full sync %d bob's phone lost mail: %+v", i+1, r)
		}
		plan := s.fullSync()
		if plan.State != status.PlanLeftAlone || plan.From != "Allow" || !strings.Contains(plan.Detail, "pilot") {
			t.Fatalf("plan of the default for a pilot: %+v", plan)
		}
	}
	if n := s.sim.Recorder.Count("cmdlet:Set-ActiveSyncOrganizationSettings"); n != 0 {
		t.Fatalf("%d changes of the organisation settings for a pilot", n)
	}
	if r := s.phoneSync(bob); r.State != "Allowed" || !r.GetsMail {
		t.Fatalf("bob's phone lost mail: %+v", r)
	}
}

// A dry run decides and records, and changes nothing on Exchange: not the
// device lists, not the organisation settings; nobody is mailed.
func TestDryRunChangesNothing(t *testing.T) {
	s := startStack(t, stackOptions{policy: `
version: 1
org: contoso
dry_run: true
`})
	s.waitFullSync()
	phone := iPhone("alice@contoso.com", "ApplDRYRUN00001")
	if r := s.phoneSync(phone); r.State != "Allowed" || r.Reason != "Global" {
		t.Fatalf("Exchange's own default must still be Allow (not enforced in a dry run): %+v", r)
	}
	d := waitEvent(t, s.events, "dry-run decision", decidedFor(phone.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK))
	if !d.GetDryRun() {
		t.Fatalf("decision not marked dry run: %v", d)
	}
	applied := waitEvent(t, s.events, "dry-run outcome", func(m *ev.AccessApplied) bool {
		return len(m.GetItems()) == 1 && m.GetItems()[0].GetDeviceId() == phone.DeviceID
	})
	if o := applied.GetItems()[0].GetOutcome(); o != ev.ApplyOutcome_APPLY_OUTCOME_SKIPPED_DRY_RUN || len(applied.GetCmdlets()) != 1 {
		t.Fatalf("outcome %s, cmdlets %v: a dry run records the cmdlet it would have run", o, applied.GetCmdlets())
	}
	s.settle()
	if n := s.sim.Recorder.Count("cmdlet:Set-CASMailbox") + s.sim.Recorder.Count("cmdlet:Set-ActiveSyncOrganizationSettings"); n != 0 {
		t.Fatalf("%d changes reached Exchange in a dry run", n)
	}
	if n := len(s.smtp.Messages()); n != 0 {
		t.Fatalf("%d mails in a dry run", n)
	}
	if r := s.phoneSync(phone); r.State != "Allowed" {
		t.Fatalf("after the dry run: %+v", r)
	}
	// The plan of the default says what a live run would do: tighten it
	// from Allow to Quarantine, taking mail from the unknown phone.
	plan := s.fullSync()
	if plan.State != status.PlanDryRun || plan.From != "Allow" || plan.To != "Quarantine" || plan.Revoked != 1 || plan.Allowed != 1 ||
		len(plan.Sample) != 1 || !strings.Contains(plan.Sample[0], phone.DeviceID) ||
		!strings.Contains(plan.Detail, "dry run: would change DefaultAccessLevel from Allow to Quarantine") || strings.Contains(plan.Detail, "guard would hold") {
		t.Fatalf("status must say what the dry run would have changed: %+v", plan)
	}
	if n := s.sim.Recorder.Count("cmdlet:Set-ActiveSyncOrganizationSettings"); n != 0 {
		t.Fatalf("%d changes of the organisation settings in a dry run", n)
	}
}

// An MDM export that suddenly lists no devices blocks nobody: the source
// withholds the removals, raises an alert, and status says why.
func TestEmptyInventoryBlocksNothing(t *testing.T) {
	s := startStack(t, stackOptions{})
	s.waitFullSync()
	phones := []exchangesim.Phone{iPhone("alice@contoso.com", "ApplEMPTY000001"), iPhone("bob@contoso.com", "ApplEMPTY000002"), iPhone("carol@contoso.com", "ApplEMPTY000003")}
	var devices []managedDevice
	for i, p := range phones {
		devices = append(devices, compliant("m-"+p.DeviceID, []string{"alice", "bob", "carol"}[i]+"@contoso.com", p.DeviceID))
	}
	s.allowedPhones(devices, phones...)

	s.writeInventory() // the export job wrote an empty file
	alert := waitEvent(t, s.events, "inventory-empty alert", func(m *ev.Alert) bool {
		return m.GetKind() == ev.AlertKind_ALERT_KIND_MDM_INVENTORY_EMPTY && m.GetDetail()["known"] == "3"
	})
	if !strings.Contains(alert.GetSummary(), "lists no devices") || alert.GetDetail()["would_remove"] != "3" {
		t.Fatalf("alert %v", alert)
	}
	s.requestSync("full")
	s.settle()
	for _, p := range phones {
		if r := s.phoneSync(p); r.State != "Allowed" {
			t.Fatalf("%s lost mail after an empty export: %+v", p.DeviceID, r)
		}
		if d := find(s.events, decidedFor(p.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK)); len(d) != 0 {
			t.Fatalf("block decided for %s: %v", p.DeviceID, d[0])
		}
	}
	if st, _ := statusOf[status.MDMSource](s, status.MDMSourceKey("file")); st.State != status.MDMAlert || st.Alert != "ALERT_KIND_MDM_INVENTORY_EMPTY" || !strings.Contains(st.Summary, "lists no devices") {
		t.Fatalf("status of the MDM source: %+v", st)
	}
}

// massRevocation allows four phones (ids prefix1…4; alice has two), then
// makes the MDM say three of them are no longer compliant at once: 3 of 4,
// over a guard of 50%.
func (s *stack) massRevocation(prefix string) ([]exchangesim.Phone, []managedDevice) {
	s.t.Helper()
	s.waitFullSync()
	var phones []exchangesim.Phone
	var devices []managedDevice
	for i, u := range []string{"alice", "bob", "carol", "alice"} {
		p := iPhone(u+"@contoso.com", prefix+string(rune('1'+i)))
		phones = append(phones, p)
		devices = append(devices, compliant("m-"+p.DeviceID, u+"@contoso.com", p.DeviceID))
	}
	s.allowedPhones(devices, phones...)
	for i := range devices[:3] {
		devices[i].ComplianceState = "noncompliant" // 3 of 4 at once: 75% > 50%
	}
	s.writeInventory(devices...)
	return phones, devices
}

// When one pass would take mail from more than the set share of the
// allowed devices, the blast-radius guard applies none of it, alerts, and
// status says why.
func TestBlastRadiusGuardHoldsMassRevocation(t *testing.T) {
	hook := hooksim.Start(t)
	s := startStack(t, stackOptions{evaluate: func(c *evaluator.Config) { c.BlastRadius, c.BlastMinimum = 0.5, 3 },
		mail: func(c *mailer.Config) { c.AlertWebhookURL, c.AlertMailTo = hook.URL, "it-ops@contoso.com" }})
	phones, devices := s.massRevocation("ApplBLAST00000")
	alert := waitEvent(t, s.events, "blast-radius alert", func(m *ev.Alert) bool { return m.GetKind() == ev.AlertKind_ALERT_KIND_BLAST_RADIUS })
	if alert.GetDetail()["revocations"] != "3" || alert.GetDetail()["allowed"] != "4" {
		t.Fatalf("alert %v", alert)
	}
	// The administrators hear of it: the webhook in Alertmanager's shape,
	// and a mail.
	pollEvery(t, 20*time.Second, 20*time.Millisecond, "the alert at the webhook and in the administrators' mailbox", func() bool {
		mailed := false
		for _, m := range s.smtp.Messages() {
			mailed = mailed || slices.Contains(m.To, "it-ops@contoso.com") && strings.Contains(m.Subject, "CRITICAL")
		}
		return mailed && strings.Contains(string(bytes.Join(hook.Received(), nil)), "EasguardBlastRadius")
	})
	var posted struct {
		Alerts []struct {
			Labels      map[string]string
			Annotations map[string]string
			Fingerprint string
		}
	}
	found := false
	for _, body := range hook.Received() {
		if err := json.Unmarshal(body, &posted); err != nil || len(posted.Alerts) != 1 {
			t.Fatalf("webhook got %s: %v", body, err)
		}
		if a := posted.Alerts[0]; a.Labels["alertname"] == "EasguardBlastRadius" {
			found = true
			if a.Labels["easguard_org"] != "contoso" || a.Annotations["revocations"] != "3" || a.Fingerprint != alert.GetAlertId() {
				t.Errorf("webhook alert %+v, raised %v", a, alert)
			}
		}
	}
	if !found {
		t.Errorf("the webhook got no EasguardBlastRadius in %d posts", len(hook.Received()))
	}
	s.settle()
	for _, p := range phones {
		if r := s.phoneSync(p); r.State != "Allowed" {
			t.Fatalf("%s lost mail although the guard tripped: %+v", p.DeviceID, r)
		}
	}
	if guard, _ := statusOf[status.Guard](s, status.GuardKey); guard.State != status.GuardTripped || !strings.Contains(guard.Detail, "3 of 4") {
		t.Fatalf("guard status %+v", guard)
	}
	fams := s.scrape()
	if n := metricValue(fams, "easguard_guard_held_total", map[string]string{"easguard_org": "contoso"}); n != 3 {
		t.Errorf("easguard_guard_held_total = %v, want the 3 revocations held", n)
	}
	if n := metricValue(fams, "easguard_decisions_total", map[string]string{"easguard_org": "contoso", "easguard_action": "block", "easguard_rule": "noncompliant"}); n != 3 {
		t.Errorf("easguard_decisions_total for noncompliant blocks = %v, want 3", n)
	}
	// The next passes find the same revocations: still held, no new alert.
	s.requestSync("full")
	s.waitSyncs("full", 2)
	s.settle()
	if n := len(find(s.events, func(m *ev.Alert) bool { return m.GetKind() == ev.AlertKind_ALERT_KIND_BLAST_RADIUS })); n != 1 {
		t.Fatalf("%d blast-radius alerts for one held set of revocations", n)
	}
	// One device at a time is within the limit and goes through.
	devices[0].ComplianceState, devices[1].ComplianceState, devices[2].ComplianceState = "noncompliant", "compliant", "compliant"
	s.writeInventory(devices...)
	s.waitPhone(phones[0], "Blocked", 30*time.Second)
}

// A manual edit on Exchange that contradicts the policy is put right by
// the next full sync and recorded as drift.
func TestManualEditIsCorrectedAsDrift(t *testing.T) {
	// Scheduled quick syncs are an hour apart: only the syncs this test
	// asks for see Exchange.
	s := startStack(t, stackOptions{collect: func(c *collector.Config) { c.QuickInterval = time.Hour }})
	s.waitFullSync()
	phone := iPhone("alice@contoso.com", "ApplDRIFT000001")
	s.phoneSync(phone)
	s.requestSync("quick")
	s.waitPhone(phone, "Blocked", 30*time.Second)
	s.settle()

	// An administrator allows the phone by hand, in the Exchange shell.
	x := s.sections.Exchange
	shot, err := exchange.NewOneShot(*x)
	if err != nil {
		t.Fatal(err)
	}
	res, err := exchange.NewClient(shot, *x).ApplyAccess(t.Context(), []exchange.Change{{Mailbox: "alice@contoso.com", DeviceID: phone.DeviceID, Access: exchange.AccessAllow}})
	if err != nil || res[0].Err != nil {
		t.Fatalf("manual allow: %v %v", err, res)
	}
	if r := s.phoneSync(phone); r.State != "Allowed" {
		t.Fatalf("the manual edit did not take: %+v", r)
	}

	s.requestSync("full")
	alert := waitEvent(t, s.events, "drift alert", func(m *ev.Alert) bool { return m.GetKind() == ev.AlertKind_ALERT_KIND_DRIFT })
	if alert.GetDetail()["device_id"] != phone.DeviceID || alert.GetDetail()["exchange_state"] != "ALLOWED" || alert.GetDetail()["desired"] != "BLOCK" {
		t.Fatalf("alert %v", alert)
	}
	d := waitEvent(t, s.events, "corrective decision", func(m *ev.AccessDecided) bool {
		return m.GetPartnership().GetDeviceId() == phone.DeviceID && strings.HasPrefix(m.GetReason(), "drift:")
	})
	if c := waitEvent(t, s.events, "the sync the correction came from", func(m *ev.SyncCompleted) bool { return m.GetSyncId() == d.GetSyncId() }); c.GetKind() != ev.SyncKind_SYNC_KIND_FULL {
		t.Fatalf("the correction came from a %s sync, not the full sync", c.GetKind())
	}
	waitEvent(t, s.events, "correction applied", func(m *ev.AccessApplied) bool {
		return len(m.GetItems()) == 1 && m.GetItems()[0].GetDecisionId() == d.GetDecisionId() && m.GetItems()[0].GetOutcome() == ev.ApplyOutcome_APPLY_OUTCOME_APPLIED
	})
	if r := s.phoneSync(phone); r.State != "Blocked" {
		t.Fatalf("after the full sync: %+v", r)
	}
	// The next full sync finds Exchange agreeing: no second alert.
	s.settle()
	s.requestSync("full")
	s.waitSyncs("full", 2)
	s.settle()
	if n := len(find(s.events, func(m *ev.Alert) bool { return m.GetKind() == ev.AlertKind_ALERT_KIND_DRIFT })); n != 1 {
		t.Fatalf("%d drift alerts for one manual edit", n)
	}
	if n := len(s.mailsTo("alice@contoso.com")); n != 1 {
		t.Fatalf("%d mails: the correction must not mail the user again within the period", n)
	}
}

// Graph failing (500s, then a malformed page midway through the listing)
// while phones are allowed: nothing is reported missing or changed, nobody
// is blocked, an alert says why and status shows it; when Graph is back
// nothing has changed either.
func TestGraphOutageBlocksNothing(t *testing.T) {
	s := startStack(t, stackOptions{graph: true})
	s.waitFullSync()
	phones := []exchangesim.Phone{iPhone("alice@contoso.com", "ApplGRAPH000001"), iPhone("bob@contoso.com", "ApplGRAPH000002")}
	for i, p := range phones {
		upn := []string{"alice@contoso.com", "bob@contoso.com"}[i]
		if _, err := s.intune.Enrol(intunesim.Device{UserPrincipalName: upn, EASDeviceID: p.DeviceID, EASActivated: true,
			ComplianceState: "compliant", ManagementState: "managed", OperatingSystem: "iOS", OSVersion: "17.4"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range phones {
		s.phoneSync(p)
	}
	for _, p := range phones {
		s.waitPhone(p, "Allowed", 30*time.Second)
	}
	s.settle()
	changes := len(find(s.events, func(m *ev.MDMDeviceChanged) bool { return true }))

	for _, fault := range []intunesim.Fault{{Kind: "error", Status: 500}, {Kind: "malformed", AtPage: 1}} {
		if err := s.intune.Inject(fault); err != nil {
			t.Fatal(err)
		}
		faulted := func() int {
			n := 0
			for _, r := range s.intune.Recorder.Records("graph") {
				if r.Fault == fault.Kind {
					n++
				}
			}
			return n
		}
		natstest.Eventually(t, 60*time.Second, "failed Graph reads ("+fault.Kind+") and status saying so", func() bool {
			if faulted() < 3 {
				return false
			}
			st, _ := statusOf[status.MDMSource](s, status.MDMSourceKey("graph"))
			return st.State == status.MDMAlert && st.Alert == "ALERT_KIND_MDM_UNREACHABLE"
		})
		s.intune.ClearFaults()
		// The next outage must be seen on its own: wait for a good read.
		natstest.Eventually(t, 60*time.Second, "Graph read again", func() bool {
			st, _ := statusOf[status.MDMSource](s, status.MDMSourceKey("graph"))
			return st.State == status.MDMOK
		})
	}
	alert := waitEvent(t, s.events, "MDM unreachable alert", func(m *ev.Alert) bool { return m.GetKind() == ev.AlertKind_ALERT_KIND_MDM_UNREACHABLE })
	if !strings.Contains(alert.GetSummary(), "previous inventory kept") {
		t.Fatalf("alert %v", alert)
	}
	// Graph is back: status says so, and the next complete read finds
	// nothing changed.
	natstest.Eventually(t, 30*time.Second, "status of the Graph source back to ok", func() bool {
		st, _ := statusOf[status.MDMSource](s, status.MDMSourceKey("graph"))
		return st.State == status.MDMOK && st.Devices != nil && *st.Devices == 2
	})
	s.requestSync("full")
	s.settle()
	if n := len(find(s.events, func(m *ev.MDMDeviceChanged) bool { return true })); n != changes {
		t.Fatalf("%d MDM changes published during and after the outage", n-changes)
	}
	for _, p := range phones {
		if r := s.phoneSync(p); r.State != "Allowed" {
			t.Fatalf("%s lost mail during a Graph outage: %+v", p.DeviceID, r)
		}
		if d := find(s.events, decidedFor(p.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK)); len(d) != 0 {
			t.Fatalf("block decided for %s: %v", p.DeviceID, d[0])
		}
	}
}

// An administrator approves the mass revocation the guard holds: the same
// revocations, judged again with the next pass, go through; another set
// cannot be approved by a key that is not held.
func TestApprovedMassRevocationGoesThrough(t *testing.T) {
	s := startStack(t, stackOptions{evaluate: func(c *evaluator.Config) { c.BlastRadius, c.BlastMinimum = 0.5, 3 }})
	phones, _ := s.massRevocation("ApplAPPROVE0")
	waitEvent(t, s.events, "blast-radius alert", func(m *ev.Alert) bool { return m.GetKind() == ev.AlertKind_ALERT_KIND_BLAST_RADIUS })
	s.settle()
	guard, _ := statusOf[status.Guard](s, status.GuardKey)
	if guard.State != status.GuardTripped || guard.Key == "" {
		t.Fatalf("guard %+v", guard)
	}
	kv, err := s.svc.JS.KeyValue(t.Context(), bus.BucketStatus)
	if err != nil {
		t.Fatal(err)
	}
	if err := evaluator.ApproveGuard(t.Context(), kv, s.svc.Publisher(), "contoso", "0123456789abcdef01234567", "alice@contoso.com", "192.0.2.7", "", time.Now()); !errors.Is(err, evaluator.ErrNothingHeld) {
		t.Fatalf("approving a set that is not held: %v", err)
	}
	if err := evaluator.ApproveGuard(t.Context(), kv, s.svc.Publisher(), "contoso", guard.Key, "alice@contoso.com", "192.0.2.7", "the three phones were stolen", time.Now()); err != nil {
		t.Fatal(err)
	}
	// Judged again with the next pass: released.
	s.requestSync("full")
	for _, p := range phones[:3] {
		s.waitPhone(p, "Blocked", 30*time.Second)
	}
	s.settle()
	if r := s.phoneSync(phones[3]); r.State != "Allowed" {
		t.Fatalf("%s, still compliant, lost mail: %+v", phones[3].DeviceID, r)
	}
	if after, _ := statusOf[status.Guard](s, status.GuardKey); after.State != status.GuardApproved || !strings.Contains(after.Detail, "alice@contoso.com") {
		t.Fatalf("guard after the approval: %+v", after)
	}
	// Both attempts are in the audit trail: who, from where, what, how it
	// ended; and so is the sync asked for over HTTP.
	audits := find(s.events, func(m *ev.AuditEvent) bool { return m.GetAction() == "guard-approve" })
	if len(audits) != 2 || !strings.HasPrefix(audits[0].GetOutcome(), "refused") || audits[1].GetOutcome() != "approved" ||
		audits[1].GetActor() != "alice@contoso.com" || audits[1].GetSource() != "192.0.2.7" || audits[1].GetTarget() != guard.Key ||
		audits[1].GetDetail()["reason"] != "the three phones were stolen" {
		t.Errorf("guard-approve audit %v", audits)
	}
	if syncs := find(s.events, func(m *ev.AuditEvent) bool { return m.GetAction() == "sync" && m.GetTarget() == "full" }); len(syncs) == 0 ||
		!strings.HasPrefix(syncs[0].GetOutcome(), "requested manual-") {
		t.Errorf("sync audit %v", syncs)
	}
}

// An administrator discards the mass revocation the guard holds: the
// devices keep their mail, and later passes hold exactly that set again
// without a new alert; the discard is in the audit trail.
func TestDiscardedSetIsHeldWithoutAlert(t *testing.T) {
	s := startStack(t, stackOptions{evaluate: func(c *evaluator.Config) { c.BlastRadius, c.BlastMinimum = 0.5, 3 }})
	phones, _ := s.massRevocation("ApplDISCARD0")
	blast := func(m *ev.Alert) bool { return m.GetKind() == ev.AlertKind_ALERT_KIND_BLAST_RADIUS }
	waitEvent(t, s.events, "blast-radius alert", blast)
	var guard status.Guard
	pollEvery(t, 30*time.Second, 50*time.Millisecond, "the guard tripped", func() bool {
		var ok bool
		guard, ok = statusOf[status.Guard](s, status.GuardKey)
		return ok && guard.State == status.GuardTripped
	})
	req, _ := http.NewRequest(http.MethodPost, s.consoleURL+"/api/v1/orgs/"+s.org+"/guard/discard",
		strings.NewReader(url.Values{"key": {guard.Key}, "reason": {"the MDM export was cut short"}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Authorization", "Bearer "+operatorToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("discard: %d", resp.StatusCode)
	}
	// Two more passes over the same set: held, quietly.
	for range 2 {
		s.fullSync()
	}
	s.settle()
	if g, _ := statusOf[status.Guard](s, status.GuardKey); g.State != status.GuardDiscarded || g.Key != guard.Key || !strings.Contains(g.Detail, "token:stack") {
		t.Fatalf("guard after the discard and two passes: %+v", g)
	}
	if n := len(find(s.events, blast)); n != 1 {
		t.Errorf("%d blast-radius alerts; the discarded set must not alert again", n)
	}
	for _, p := range phones {
		if r := s.phoneSync(p); r.State != "Allowed" {
			t.Errorf("%s lost mail after the discard: %+v", p.DeviceID, r)
		}
	}
	if a := find(s.events, func(m *ev.AuditEvent) bool { return m.GetAction() == "guard-discard" }); len(a) != 1 || a[0].GetOutcome() != "discarded" || a[0].GetActor() != "token:stack" {
		t.Errorf("guard-discard audit %v", a)
	}
}

// A collector that stops is noticed: the evaluator's leaseholder raises
// sync-overdue once no quick sync has ended for three quick intervals,
// and clears it when a collector syncs again.
func TestStoppedCollectorRaisesSyncOverdue(t *testing.T) {
	noCollector := []string{pipeline.Matcher, pipeline.Evaluator, pipeline.Executor, pipeline.Mailer, pipeline.MDM}
	s := startStack(t, stackOptions{workers: noCollector})
	c := startStack(t, stackOptions{join: s, workers: []string{pipeline.Collector}})
	s.waitFullSync()
	overdue := func(m *ev.Alert) bool {
		return m.GetKind() == ev.AlertKind_ALERT_KIND_SYNC_OVERDUE && m.GetDetail()["kind"] == "quick"
	}
	if n := len(find(s.events, overdue)); n != 0 {
		t.Fatalf("sync-overdue while the collector runs: %v", find(s.events, overdue))
	}
	c.stop()
	alert := waitEvent(t, s.events, "sync-overdue alert", overdue)
	if !strings.Contains(alert.GetSummary(), "is the collector running?") {
		t.Errorf("alert %v", alert)
	}
	if _, ok := statusOf[string](s, bus.AlertedKeyPrefix+"sync-overdue.quick"); !ok {
		t.Fatal("the overdue sync is not recorded as alerted")
	}
	startStack(t, stackOptions{join: s, workers: []string{pipeline.Collector}})
	pollEvery(t, 30*time.Second, 50*time.Millisecond, "the overdue alert cleared by a new collector's sync", func() bool {
		_, ok := statusOf[string](s, bus.AlertedKeyPrefix+"sync-overdue.quick")
		return !ok
	})
}
