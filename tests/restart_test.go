package tests

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/pipeline"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
)

// startWorker runs the given worker in its own `easguard run` process,
// joined to the stack's NATS and simulators.
func (s *stack) startWorker(t *testing.T, worker string) *process {
	t.Helper()
	p := start(t, s.processEnv(worker)...)
	p.waitReady(t)
	return p
}

// kill ends the process the hard way (SIGKILL): no drain, no goodbye.
func (p *process) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-p.exited
}

// Any one worker killed in the middle of a flow and started again: nothing
// is lost (the phone is blocked, its user mailed, then allowed once
// enrolled) and nothing is applied twice wrongly (every decision is
// applied in order, the last one wins, one mail).
func TestWorkerKilledMidFlowAndRestarted(t *testing.T) {
	for _, tt := range []struct {
		worker string
		// killAt waits for the moment the worker's input for the phone is
		// on the bus; the worker may be handling it when it dies.
		killAt func(s *stack, phone exchangesim.Phone)
	}{
		{"collector", func(s *stack, phone exchangesim.Phone) {}},
		{"matcher", func(s *stack, phone exchangesim.Phone) {
			waitEvent(s.t, s.events, "eas.observed", func(m *ev.EASPartnershipObserved) bool { return m.GetPartnership().GetDeviceId() == phone.DeviceID })
		}},
		{"evaluator", func(s *stack, phone exchangesim.Phone) {
			waitEvent(s.t, s.events, "device.matched", func(m *ev.DeviceMatched) bool {
				return m.GetObserved().GetPartnership().GetDeviceId() == phone.DeviceID
			})
		}},
		{"executor", func(s *stack, phone exchangesim.Phone) {
			// Exchange answers slowly, so the executor dies inside its
			// Set-CASMailbox call.
			if _, err := s.sim.Inject(exchangesim.Fault{Endpoint: s.sim.Endpoints()[0].Name, Kind: "slow_receive", DelayMS: 1500}); err != nil {
				s.t.Fatal(err)
			}
			waitEvent(s.t, s.events, "access.decided", decidedFor(phone.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK))
		}},
		{"mailer", func(s *stack, phone exchangesim.Phone) {
			waitEvent(s.t, s.events, "access.decided", decidedFor(phone.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK))
		}},
	} {
		t.Run(tt.worker, func(t *testing.T) {
			others := slices.DeleteFunc(slices.Clone(pipeline.All), func(w string) bool { return w == tt.worker })
			s := startStack(t, stackOptions{workers: others})
			first := s.startWorker(t, tt.worker)
			s.waitFullSync()
			phone := iPhone("alice@contoso.com", "ApplKILL"+strings.ToUpper(tt.worker[:3])+"0001")

			if r := s.phoneSync(phone); r.State != "Quarantined" {
				t.Fatalf("new phone %+v", r)
			}
			tt.killAt(s, phone)
			first.kill(t)
			if _, err := s.sim.Inject(exchangesim.Fault{Endpoint: s.sim.Endpoints()[0].Name, Kind: "clear"}); err != nil {
				t.Fatal(err)
			}
			second := s.startWorker(t, tt.worker)

			s.waitPhone(phone, "Blocked", 60*time.Second)
			waitEvent(t, s.events, "notify.sent", func(m *ev.NotificationSent) bool { return m.GetDeviceId() == phone.DeviceID })
			s.writeInventory(compliant("m-"+phone.DeviceID, "alice@contoso.com", phone.DeviceID))
			if r := s.waitPhone(phone, "Allowed", 60*time.Second); !r.GetsMail {
				t.Fatalf("enrolled phone %+v", r)
			}
			s.settle()

			// Every decision published was applied, in order; the last is
			// the allow; none was applied twice with different outcomes.
			var decisions []string
			for _, d := range find(s.events, deviceOf[*ev.AccessDecided](phone.DeviceID)) {
				if !slices.Contains(decisions, d.GetDecisionId()) {
					decisions = append(decisions, d.GetDecisionId())
				}
			}
			var applied []string
			outcome := map[string]ev.ApplyOutcome{}
			for _, a := range find(s.events, func(m *ev.AccessApplied) bool { return true }) {
				for _, it := range a.GetItems() {
					if it.GetDeviceId() != phone.DeviceID {
						continue
					}
					if o, seen := outcome[it.GetDecisionId()]; seen && o != it.GetOutcome() {
						t.Fatalf("decision %s reported %s and %s", it.GetDecisionId(), o, it.GetOutcome())
					}
					outcome[it.GetDecisionId()] = it.GetOutcome()
					if !slices.Contains(applied, it.GetDecisionId()) {
						applied = append(applied, it.GetDecisionId())
					}
				}
			}
			if len(decisions) != 2 || !slices.Equal(decisions, applied) {
				t.Fatalf("decisions %v, applied %v: want the block and the allow, each applied, in order", decisions, applied)
			}
			allowed, blocked, err := s.sim.Org.Lists("alice@contoso.com")
			if err != nil || !slices.Contains(allowed, phone.DeviceID) || slices.Contains(blocked, phone.DeviceID) {
				t.Fatalf("lists on Exchange: allowed %v, blocked %v, %v", allowed, blocked, err)
			}
			// One mail. A mailer killed between the SMTP server's 250 and
			// recording it may send it twice; the copy has the same
			// Message-ID, so mail clients show one.
			ids := map[string]int{}
			for _, m := range s.mailsTo("alice@contoso.com") {
				ids[m.MessageID]++
			}
			if len(ids) != 1 {
				t.Fatalf("mails by Message-ID %v, want one message", ids)
			}
			if dl := s.events.deadLetters(); len(dl) != 0 {
				t.Fatalf("dead letters: %v", dl)
			}
			second.stop(t)
		})
	}
}
