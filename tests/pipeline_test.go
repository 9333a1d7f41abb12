package tests

import (
	"go.opentelemetry.io/otel/trace"

	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
	"github.com/easguard/easguard/tests/intunesim"
)

func deviceOf[T interface{ GetPartnership() *ev.EASPartnership }](id string) func(T) bool {
	return func(m T) bool { return m.GetPartnership().GetDeviceId() == id }
}

func appliedFor(id string, desired ev.DesiredAccess) func(*ev.AccessApplied) bool {
	return func(m *ev.AccessApplied) bool {
		for _, it := range m.GetItems() {
			if it.GetDeviceId() == id && it.GetDesired() == desired && it.GetOutcome() == ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
				return true
			}
		}
		return false
	}
}

// The seed flow: a new phone syncs and Exchange quarantines it; easguard
// keeps it blocked and mails its user once how to enrol; the MDM marks it
// enrolled and compliant; the phone's next sync gets mail. Every step is
// an event on its own subject, and the device's journey is one trace.
func TestSeedFlow(t *testing.T) {
	t.Run("inventory file", func(t *testing.T) {
		seedFlow(t, stackOptions{}, func(s *stack, phone exchangesim.Phone) {
			s.writeInventory(compliant("intune-0001", "alice@contoso.com", phone.DeviceID))
		})
	})
	t.Run("Intune through Graph", func(t *testing.T) {
		seedFlow(t, stackOptions{graph: true}, func(s *stack, phone exchangesim.Phone) {
			if _, err := s.intune.Enrol(intunesim.Device{UserPrincipalName: "alice@contoso.com", EmailAddress: "alice@contoso.com",
				EASDeviceID: phone.DeviceID, EASActivated: true, ComplianceState: "compliant", ManagementState: "managed",
				OperatingSystem: "iOS", OSVersion: "17.4", Model: "iPhone 15", Manufacturer: "Apple"}); err != nil {
				t.Fatal(err)
			}
		})
	})
}

// seedFlow walks one phone through the seed flow; enrol makes the MDM
// report it enrolled and compliant.
func seedFlow(t *testing.T, o stackOptions, enrol func(*stack, exchangesim.Phone)) {
	s := startStack(t, o)
	s.waitFullSync()
	phone := iPhone("alice@contoso.com", "ApplSEED0000001")

	first := s.phoneSync(phone)
	if !first.Created || first.State != "Quarantined" || first.GetsMail {
		t.Fatalf("new phone: %+v (Exchange should quarantine it: easguard enforces DefaultAccessLevel Quarantine)", first)
	}
	observed := waitEvent(t, s.events, "eas.observed", func(m *ev.EASPartnershipObserved) bool {
		return m.GetPartnership().GetDeviceId() == phone.DeviceID && m.GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_NEW
	})
	if observed.GetPartnership().GetMailbox().GetPrimarySmtpAddress() != "alice@contoso.com" {
		t.Fatalf("observed mailbox %v", observed.GetPartnership().GetMailbox())
	}
	matched := waitEvent(t, s.events, "device.matched (no match)", func(m *ev.DeviceMatched) bool {
		return m.GetObserved().GetPartnership().GetDeviceId() == phone.DeviceID && m.GetMdm() == nil
	})
	if matched.GetNoMatchReason() != ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD {
		t.Fatalf("no-match reason %s", matched.GetNoMatchReason())
	}
	decided := waitEvent(t, s.events, "access.decided block", func(m *ev.AccessDecided) bool {
		return m.GetPartnership().GetDeviceId() == phone.DeviceID && m.GetDesired() == ev.DesiredAccess_DESIRED_ACCESS_BLOCK
	})
	if !decided.GetNotifyUser() || decided.GetRule() != "unknown_device" {
		t.Fatalf("decision %+v", decided)
	}
	waitEvent(t, s.events, "access.applied block", appliedFor(phone.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK))
	if r := s.phoneSync(phone); r.State != "Blocked" || r.Reason != "Individual" || r.GetsMail {
		t.Fatalf("after easguard blocked it: %+v", r)
	}
	sent := waitEvent(t, s.events, "notify.sent", func(m *ev.NotificationSent) bool { return m.GetDeviceId() == phone.DeviceID })
	mails, err := s.smtp.WaitFor(t.Context(), 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(mails) != 1 || mails[0].To[0] != "alice@contoso.com" || !strings.Contains(mails[0].Text, enrolURL) || !strings.Contains(mails[0].HTML, "portal.manage.microsoft.com") ||
		mails[0].MessageID != sent.GetMessageId() {
		t.Fatalf("mails %+v, notify.sent %v", mails, sent)
	}

	// The user enrols; the MDM now reports the phone as compliant.
	enrol(s, phone)
	waitEvent(t, s.events, "mdm.changed", func(m *ev.MDMDeviceChanged) bool { return m.GetDevice().GetEasDeviceId() == phone.DeviceID })
	waitEvent(t, s.events, "device.matched (compliant)", func(m *ev.DeviceMatched) bool {
		return m.GetObserved().GetPartnership().GetDeviceId() == phone.DeviceID && m.GetMdm() != nil
	})
	waitEvent(t, s.events, "access.decided allow", func(m *ev.AccessDecided) bool {
		return m.GetPartnership().GetDeviceId() == phone.DeviceID && m.GetDesired() == ev.DesiredAccess_DESIRED_ACCESS_ALLOW
	})
	waitEvent(t, s.events, "access.applied allow", appliedFor(phone.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_ALLOW))
	if r := s.phoneSync(phone); r.State != "Allowed" || !r.GetsMail {
		t.Fatalf("after enrolment: %+v", r)
	}
	if n := len(s.smtp.Messages()); n != 1 {
		t.Fatalf("%d mails, want exactly one", n)
	}
	journey := assertOneJourney(t, s, phone.DeviceID)
	assertClientSpans(t, s, journey, o.graph)
	assertDomainMetrics(t, s, o.graph)
}

// assertDomainMetrics checks that /metrics tells the seed flow's story in
// easguard's own terms: a block and an allow by their rules, the mail, a
// successful full sync and the partnerships it read by state, and
// Exchange's time for the Set-CASMailbox calls.
func assertDomainMetrics(t *testing.T, s *stack, graph bool) {
	t.Helper()
	fams := s.scrape()
	org := map[string]string{"easguard_org": "contoso"}
	with := func(kv ...string) map[string]string {
		m := map[string]string{"easguard_org": "contoso"}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	checks := []struct {
		name    string
		labels  map[string]string
		atLeast float64
	}{
		{"easguard_decisions_total", with("easguard_action", "block", "easguard_rule", "unknown_device", "easguard_dry_run", "false"), 1},
		{"easguard_decisions_total", with("easguard_action", "allow"), 1},
		{"easguard_mails_total", with("easguard_outcome", "sent"), 1},
		{"easguard_sync_duration_seconds", with("easguard_sync_kind", "full", "easguard_outcome", "success"), 1},
		{"easguard_sync_last_success_seconds", with("easguard_sync_kind", "full"), 1.7e9},
		{"easguard_exchange_request_duration_seconds", with("easguard_exchange_cmdlet", "Set-CASMailbox"), 2},
	}
	if graph {
		checks = append(checks, struct {
			name    string
			labels  map[string]string
			atLeast float64
		}{"easguard_graph_requests_total", map[string]string{"easguard_outcome": "ok"}, 1})
	}
	for _, c := range checks {
		if got := metricValue(fams, c.name, c.labels); got < c.atLeast {
			t.Errorf("%s%v = %v, want at least %v (easguard metrics: %s)", c.name, c.labels, got, c.atLeast, metricNames(fams, "easguard_"))
		}
	}
	// The partnerships by state are the last full sync's: one asked for
	// now finds the phone allowed, and each partnership it observed in
	// exactly one state.
	s.requestSync("full")
	s.waitSyncs("full", 2)
	fams = s.scrape()
	full := find(s.events, func(m *ev.SyncCompleted) bool { return m.GetKind() == ev.SyncKind_SYNC_KIND_FULL && m.GetSuccess() })
	total := 0.0
	for _, st := range []string{"Allowed", "Blocked", "Quarantined", "DeviceDiscovery", "Unknown"} {
		total += metricValue(fams, "easguard_partnerships", with("easguard_exchange_state", st))
	}
	if want := float64(full[len(full)-1].GetCounts().GetObserved()); total != want || want == 0 {
		t.Errorf("easguard_partnerships by state sums to %v, want the %v partnerships the last full sync observed", total, want)
	}
	if n := metricValue(fams, "easguard_partnerships", with("easguard_exchange_state", "Allowed")); n != 1 {
		t.Errorf("easguard_partnerships Allowed = %v, want the seed phone", n)
	}
	if n := metricValue(fams, "easguard_dead_letters_total", org); n != 0 {
		t.Errorf("%v dead letters in the seed flow", n)
	}
}

// assertOneJourney checks that every step of the device's journey is in
// one trace: the trace its first observation started.
func assertOneJourney(t *testing.T, s *stack, deviceID string) string {
	t.Helper()
	families := []string{"eas.observed", "device.matched", "access.decided", "access.applied", "notify.sent"}
	seen := map[string]int{}
	var journey string
	natstest.Eventually(t, 10*time.Second, "spans of every step in one trace", func() bool {
		type send struct {
			family, trace string
			start         time.Time
		}
		var sends []send
		for _, sp := range s.spans.Ended() {
			if !strings.HasPrefix(sp.Name(), "send ") {
				continue
			}
			var subject string
			for _, a := range sp.Attributes() {
				if a.Key == "messaging.destination.name" {
					subject = a.Value.AsString()
				}
			}
			if !strings.HasSuffix(subject, "."+strings.ToLower(deviceID)) {
				continue
			}
			for _, f := range families {
				if strings.Contains(subject, "."+f+".") {
					sends = append(sends, send{f, sp.SpanContext().TraceID().String(), sp.StartTime()})
				}
			}
		}
		journey = ""
		var first time.Time
		for _, x := range sends {
			if x.family == "eas.observed" && (journey == "" || x.start.Before(first)) {
				journey, first = x.trace, x.start
			}
		}
		for _, f := range families {
			seen[f] = 0
		}
		for _, x := range sends {
			if x.trace == journey {
				seen[x.family]++
			}
		}
		return journey != "" && seen["device.matched"] >= 2 && seen["access.decided"] >= 2 && seen["access.applied"] >= 2 && seen["notify.sent"] >= 1
	})
	t.Logf("journey trace %s: %v", journey, seen)
	return journey
}

// assertClientSpans checks that the calls leaving easguard are client
// spans in the device's journey: the mail to the phone's user, and the
// cmdlets that changed its access on Exchange, with the server that ran
// them (the executor sends them in a batch with other devices' changes,
// but each request is traced in its first device's trace). With Graph, the
// read of Intune that found the phone's record is a client span of a poll
// trace that the journey links to: one read lists every device, so it
// cannot be a part of one phone's trace.
func assertClientSpans(t *testing.T, s *stack, journey string, graph bool) {
	t.Helper()
	var got []string
	natstest.Eventually(t, 10*time.Second, "client spans of the calls that leave easguard", func() bool {
		got = got[:0]
		ended := s.spans.Ended()
		linked := map[string]bool{} // traces the journey links to
		for _, sp := range ended {
			if sp.SpanContext().TraceID().String() != journey {
				continue
			}
			for _, l := range sp.Links() {
				linked[l.SpanContext.TraceID().String()] = true
			}
		}
		cmdlet, smtp, graphRead := false, false, false
		for _, sp := range ended {
			if sp.SpanKind() != trace.SpanKindClient {
				continue
			}
			attrs := map[string]string{}
			for _, a := range sp.Attributes() {
				attrs[string(a.Key)] = a.Value.Emit()
			}
			got = append(got, sp.Name()+" "+attrs["server.address"])
			tid := sp.SpanContext().TraceID().String()
			inJourney := tid == journey
			switch {
			case sp.Name() == "exchange Set-CASMailbox":
				cmdlet = cmdlet || inJourney && attrs["server.address"] != "" && attrs["easguard.exchange.cmdlet"] == "Set-CASMailbox"
			case sp.Name() == "smtp send":
				smtp = smtp || inJourney && attrs["server.address"] != "" && attrs["easguard.mail.message_id"] != ""
			case strings.HasPrefix(sp.Name(), "GET graph"):
				graphRead = graphRead || linked[tid] && attrs["http.response.status_code"] == "200"
			}
		}
		return cmdlet && smtp && (graphRead || !graph)
	})
	t.Logf("client spans: %d, e.g. %v", len(got), got[:min(len(got), 5)])
}
