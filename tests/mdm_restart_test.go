package tests

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
	"github.com/easguard/easguard/tests/intunesim"
)

// mdmMissingAfter is how long a device may be missing from Graph's
// listing before the source reports it removed, short for the test.
const mdmMissingAfter = 3 * time.Second

// startMDMProcess runs the mdm worker in its own `easguard run` process:
// the inventory file source, or with an Intune simulator the Graph source
// (and no file source).
func (s *stack) startMDMProcess(t *testing.T) *process {
	t.Helper()
	env := s.processEnv(pipeline.MDM)
	if s.intune != nil {
		// The last value of a variable wins: no file source.
		env = append(env, "EASGUARD_MDM_FILE=", "EASGUARD_MDM_GRAPH_PROXY=none", "EASGUARD_MDM_GRAPH_POLL_INTERVAL=1s",
			"EASGUARD_MDM_GRAPH_FULL_RESYNC=1h", "EASGUARD_MDM_GRAPH_MISSING_AFTER="+mdmMissingAfter.String())
		env = append(env, s.intune.Env(s.intune.ClientSecret(), s.intune.CAFile(t))...)
	}
	p := start(t, env...)
	p.waitReady(t)
	return p
}

// A device removed from the MDM while the MDM source is stopped: after the
// source starts again it reports the device removed, and the phone loses
// mail as the policy says for a device the MDM does not know (blocked,
// its user told); the other phone keeps mail. An inventory export that
// comes out empty while the source is stopped removes nothing and
// alerts. Before the source kept its state in JetStream, the restarted
// source compared with nothing and the phone kept mail for good.
func TestMDMRemovalWhileSourceStopped(t *testing.T) {
	const aliceMDM, bobMDM = "m-ApplRESTART0001", "m-ApplRESTART0002"
	for _, tt := range []struct {
		name  string
		graph bool
		// remove changes the MDM while the source is stopped.
		remove func(s *stack, ids map[string]string)
		// removed: alice's device is reported removed and loses mail;
		// otherwise an empty-inventory alert and nobody loses mail.
		removed bool
	}{
		{"intune: device deleted while stopped", true, func(s *stack, ids map[string]string) {
			if err := s.intune.Delete(ids[aliceMDM]); err != nil {
				s.t.Fatal(err)
			}
		}, true},
		{"file: device dropped while stopped", false, func(s *stack, ids map[string]string) {
			s.writeInventory(compliant(bobMDM, "bob@contoso.com", "ApplRESTART0002"))
		}, true},
		{"file: export empty while stopped", false, func(s *stack, ids map[string]string) {
			s.writeInventory()
		}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			others := slices.DeleteFunc(slices.Clone(pipeline.All), func(w string) bool { return w == pipeline.MDM })
			s := startStack(t, stackOptions{workers: others, graph: tt.graph})
			alice, bob := iPhone("alice@contoso.com", "ApplRESTART0001"), iPhone("bob@contoso.com", "ApplRESTART0002")
			bob.FriendlyName = "Bob's iPhone"
			statusKey := status.MDMSourceKey("file")
			// ids maps the test's names of the MDM records to the MDM's ids.
			ids := map[string]string{aliceMDM: aliceMDM, bobMDM: bobMDM}
			if tt.graph {
				statusKey = status.MDMSourceKey("graph")
				for name, p := range map[string]exchangesim.Phone{aliceMDM: alice, bobMDM: bob} {
					d, err := s.intune.Enrol(intunesim.Device{UserPrincipalName: p.Mailbox, EASDeviceID: p.DeviceID, EASActivated: true,
						ComplianceState: "compliant", ManagementState: "managed", OperatingSystem: "iOS", OSVersion: "17.4"})
					if err != nil {
						t.Fatal(err)
					}
					ids[name] = d.ID
				}
			} else {
				s.writeInventory(compliant(aliceMDM, "alice@contoso.com", alice.DeviceID), compliant(bobMDM, "bob@contoso.com", bob.DeviceID))
			}
			source := s.startMDMProcess(t)
			s.waitFullSync()
			for _, p := range []exchangesim.Phone{alice, bob} {
				s.phoneSync(p)
			}
			for _, p := range []exchangesim.Phone{alice, bob} {
				s.waitPhone(p, "Allowed", 60*time.Second)
			}
			// The source has read both devices and stored what it delivered.
			natstest.Eventually(t, 30*time.Second, "the MDM source read both devices", func() bool {
				st, _ := statusOf[status.MDMSource](s, statusKey)
				return st.State == status.MDMOK && st.Devices != nil && *st.Devices == 2
			})
			source.stop(t)

			tt.remove(s, ids)
			restarted := time.Now()
			source = s.startMDMProcess(t)

			removedAlice := func(m *ev.MDMDeviceChanged) bool {
				return m.GetRemoved() && m.GetDevice().GetMdmDeviceId() == ids[aliceMDM]
			}
			if tt.removed {
				waitEvent(t, s.events, "alice's device reported removed", removedAlice)
				t.Logf("%s: removal reported %s after the source started again", tt.name, time.Since(restarted).Round(time.Millisecond))
				d := waitEvent(t, s.events, "block of alice's phone", decidedFor(alice.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK))
				if r := s.waitPhone(alice, "Blocked", 60*time.Second); r.GetsMail {
					t.Fatalf("alice's phone after its MDM record went: %+v", r)
				}
				t.Logf("%s: alice's phone blocked %s after the restart, by rule %s", tt.name, time.Since(restarted).Round(time.Millisecond), d.GetRule())
				waitEvent(t, s.events, "alice told", func(m *ev.NotificationSent) bool { return strings.EqualFold(m.GetDeviceId(), alice.DeviceID) })
			} else {
				waitEvent(t, s.events, "empty inventory alert", func(m *ev.Alert) bool {
					return m.GetKind() == ev.AlertKind_ALERT_KIND_MDM_INVENTORY_EMPTY
				})
				natstest.Eventually(t, 30*time.Second, "status saying so", func() bool {
					st, _ := statusOf[status.MDMSource](s, statusKey)
					return st.State == status.MDMAlert && st.Alert == "ALERT_KIND_MDM_INVENTORY_EMPTY"
				})
			}
			s.settle()
			if n := len(find(s.events, func(m *ev.MDMDeviceChanged) bool { return m.GetRemoved() })); tt.removed && n != 1 || !tt.removed && n != 0 {
				t.Fatalf("%d removals reported:\n%s", n, s.events.dump())
			}
			keep := []exchangesim.Phone{bob}
			if !tt.removed {
				keep = append(keep, alice)
			}
			for _, p := range keep {
				if r := s.phoneSync(p); r.State != "Allowed" || !r.GetsMail {
					t.Fatalf("%s lost mail: %+v", p.DeviceID, r)
				}
				if d := find(s.events, decidedFor(p.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK)); len(d) != 0 {
					t.Fatalf("block decided for %s: %v", p.DeviceID, d[0])
				}
			}
			if dl := s.events.deadLetters(); len(dl) != 0 {
				t.Fatalf("dead letters: %v", dl)
			}
			source.stop(t)
		})
	}
}
