package tests

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/collector"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
)

// startupPolicy blocks unknown devices and mails their users, so that a
// partnership judged before its MDM record is read shows as a block
// decision and a mail to an enrolled user.
const startupPolicy = `version: 1
org: contoso
unknown_device: block
noncompliant: block
notify: true
`

// easguard started on an organisation whose phones are all enrolled and
// compliant, with its MDM inventory read a while after the start (a large
// tenant, a slow export): the first full sync waits until the inventory is
// read and indexed, so every phone is judged once, allowed, and nobody is
// blocked or told to enrol. Without the wait (EASGUARD_COLLECTOR_MDM_WAIT=0)
// the sync reads the partnerships first and blocks every phone as unknown,
// mails its user, and allows it again when the record arrives.
func TestFirstFullSyncWaitsForTheMDMInventory(t *testing.T) {
	const phones = 24
	var inventory string
	s := startStack(t, stackOptions{
		policy: startupPolicy,
		seed:   &exchangesim.SeedSpec{Mailboxes: 8, Partnerships: phones, Seed: 5, NoHostile: true},
		mdm: func(c *pipeline.MDMConfig) {
			// Not there yet: the source reads it once it appears.
			inventory = filepath.Join(filepath.Dir(c.File), "late-inventory.json")
			c.File = inventory
		},
		collect: func(c *collector.Config) { c.MDMWait = 2 * time.Minute },
	})
	all, err := s.sim.Org.Partnerships("")
	if err != nil {
		t.Fatal(err)
	}
	var devices []managedDevice
	for i, p := range all {
		if p.ListedByActiveSync() {
			devices = append(devices, compliant(fmt.Sprintf("m-%d", i), p.UPN, p.DeviceID))
		}
	}
	if len(devices) < phones/2 {
		t.Fatalf("the seed has %d ActiveSync partnerships", len(devices))
	}
	// The collector is ready and has looked for the inventory a few times
	// without starting the sync; nothing has been judged.
	pollEvery(t, 30*time.Second, 20*time.Millisecond, "the first full sync waiting for the MDM inventory", func() bool {
		st, ok := statusOf[status.MDMWait](s, status.MDMWaitKey)
		return ok && st.Waiting && st.Checks >= 3
	})
	if got := find(s.events, func(*ev.DeviceMatched) bool { return true }); len(got) != 0 {
		t.Fatalf("%d partnerships judged before the MDM inventory was read", len(got))
	}
	written := time.Now()
	if err := writeInventoryFile(inventory, devices...); err != nil {
		t.Fatal(err)
	}
	// Each phone judged (Exchange may already allow it: no decision then).
	for _, d := range devices {
		waitEvent(t, s.events, "the matcher's verdict on "+d.EASDeviceID, func(m *ev.DeviceMatched) bool {
			return strings.EqualFold(m.GetObserved().GetPartnership().GetDeviceId(), d.EASDeviceID)
		})
	}
	s.settle()

	first := find(s.events, func(m *ev.SyncCompleted) bool { return m.GetKind() == ev.SyncKind_SYNC_KIND_FULL })
	if len(first) == 0 {
		t.Fatal("no full sync completed")
	}
	if started := first[0].GetStartedAt().AsTime(); started.Before(written) {
		t.Errorf("the first full sync started %s before the inventory was written", written.Sub(started))
	}
	if other := find(s.events, func(m *ev.AccessDecided) bool { return m.GetDesired() != ev.DesiredAccess_DESIRED_ACCESS_ALLOW }); len(other) != 0 {
		t.Errorf("%d enrolled, compliant phones were decided otherwise than allowed, e.g. %s: %s", len(other), other[0].GetPartnership().GetDeviceId(), other[0].GetReason())
	}
	for _, d := range devices {
		if mails := s.mailsTo(d.UserPrincipalName); len(mails) != 0 {
			t.Errorf("%s was mailed %d times: %q", d.UserPrincipalName, len(mails), mails[0].Subject)
		}
	}
	// Judged once by the full sync, never again because an MDM record
	// arrived after its partnership (later quick syncs read the mailboxes
	// the allow-listing changed; their verdicts are not counted).
	full := first[0].GetSyncId()
	if matched := find(s.events, func(m *ev.DeviceMatched) bool { return m.GetObserved().GetSync().GetSyncId() == full }); len(matched) != len(devices) {
		t.Errorf("the first full sync made %d verdicts of the matcher for %d partnerships, want one each", len(matched), len(devices))
	}
	if late := find(s.events, func(m *ev.DeviceMatched) bool { return m.GetTrigger() == "mdm" }); len(late) != 0 {
		t.Errorf("%d partnerships judged again because their MDM record arrived after them", len(late))
	}
}
