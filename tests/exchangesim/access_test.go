package exchangesim_test

import (
	"testing"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

const alice = "alice@contoso.com"

// orgWithAlice starts a simulator with one mailbox and a connected worker.
func orgWithAlice(t *testing.T) (*exchangesim.Sim, *worker) {
	t.Helper()
	s := startSim(t, exchangesim.Config{})
	if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice", DisplayName: "Alice Adams"}); err != nil {
		t.Fatal(err)
	}
	w := startWorker(t, s, s.Endpoints()[0], conn{})
	w.connect(s.Endpoints()[0])
	return s, w
}

func iphone(id string) exchangesim.Phone {
	return exchangesim.Phone{Mailbox: alice, DeviceID: id, DeviceType: "iPhone", DeviceModel: "iPhone14C3",
		DeviceOS: "iOS 17.1 21B80", UserAgent: "Apple-iPhone14C3/2101.80"}
}

func phoneSync(t *testing.T, s *exchangesim.Sim, p exchangesim.Phone) exchangesim.SyncResult {
	t.Helper()
	r, err := s.Org.Sync(p)
	if err != nil {
		t.Fatalf("sync %s: %v", p.DeviceID, err)
	}
	return r
}

func call(cmdlet string, params exchange.Params) exchange.Call {
	return exchange.Call{Cmdlet: cmdlet, Params: params}
}

func rule(query, char, level string) exchange.Call {
	return call("New-ActiveSyncDeviceAccessRule", exchange.Params{"QueryString": query, "Characteristic": char, "AccessLevel": level})
}

func defaultLevel(level string) exchange.Call {
	return call("Set-ActiveSyncOrganizationSettings", exchange.Params{"DefaultAccessLevel": level})
}

func allow(id string) exchange.Call {
	return call("Set-CASMailbox", exchange.Params{"Identity": alice, "ActiveSyncAllowedDeviceIDs": exchange.MultiValued{Add: []string{id}}})
}

func block(id string) exchange.Call {
	return call("Set-CASMailbox", exchange.Params{"Identity": alice, "ActiveSyncBlockedDeviceIDs": exchange.MultiValued{Add: []string{id}}})
}

// The evaluation order of reference/exchange.md §6: blocked list, allowed
// list, device discovery while rules exist, rules (UserAgent, DeviceOS,
// DeviceModel, DeviceType, first match), DefaultAccessLevel; and Policy for
// a device that cannot enforce its mailbox policy.
func TestAccessEvaluation(t *testing.T) {
	tests := []struct {
		name   string
		setup  []exchange.Call
		phone  func(exchangesim.Phone) exchangesim.Phone
		state  string
		reason string
		rule   string
	}{
		{name: "default Allow", state: "Allowed", reason: "Global"},
		{name: "default Quarantine", setup: []exchange.Call{defaultLevel("Quarantine")}, state: "Quarantined", reason: "Global"},
		{name: "default Block", setup: []exchange.Call{defaultLevel("Block")}, state: "Blocked", reason: "Global"},
		{name: "allowed list beats the default", setup: []exchange.Call{defaultLevel("Quarantine"), allow("Dev1")}, state: "Allowed", reason: "Individual"},
		{name: "blocked list beats the default", setup: []exchange.Call{block("Dev1")}, state: "Blocked", reason: "Individual"},
		{name: "ids compare case-insensitively", setup: []exchange.Call{defaultLevel("Block"), allow("DEV1")}, state: "Allowed", reason: "Individual"},
		{name: "allowed list beats a block rule", setup: []exchange.Call{rule("iPhone14C3", "DeviceModel", "Block"), allow("Dev1")}, state: "Allowed", reason: "Individual"},
		{name: "blocked list beats an allow rule", setup: []exchange.Call{rule("iPhone", "DeviceType", "Allow"), block("Dev1")}, state: "Blocked", reason: "Individual"},
		{name: "model rule", setup: []exchange.Call{rule("iPhone14C3", "DeviceModel", "Block")}, state: "Blocked", reason: "DeviceRule", rule: "iPhone14C3 (DeviceModel)"},
		{name: "rule beats the default", setup: []exchange.Call{defaultLevel("Block"), rule("iPhone", "DeviceType", "Allow")}, state: "Allowed", reason: "DeviceRule", rule: "iPhone (DeviceType)"},
		{name: "user agent before device type", setup: []exchange.Call{rule("iPhone", "DeviceType", "Allow"), rule("Apple-iPhone14C3/2101.80", "UserAgent", "Quarantine")},
			state: "Quarantined", reason: "DeviceRule", rule: "Apple-iPhone14C3/2101.80 (UserAgent)"},
		{name: "OS before model, whatever the creation order", setup: []exchange.Call{rule("iPhone14C3", "DeviceModel", "Block"), rule("iOS 17.1 21B80", "DeviceOS", "Allow")},
			state: "Allowed", reason: "DeviceRule", rule: "iOS 17.1 21B80 (DeviceOS)"},
		{name: "rules match exactly, no wildcards", setup: []exchange.Call{defaultLevel("Quarantine"), rule("iPhone14", "DeviceModel", "Block")}, state: "Quarantined", reason: "Global"},
		{name: "device not provisionable", phone: func(p exchangesim.Phone) exchangesim.Phone { p.NotProvisionable = true; return p }, state: "Blocked", reason: "Policy"},
		{name: "policy allows non-provisionable devices", setup: []exchange.Call{call("Set-ActiveSyncMailboxPolicy", exchange.Params{"Identity": "Default", "AllowNonProvisionableDevices": true})},
			phone: func(p exchangesim.Phone) exchangesim.Phone { p.NotProvisionable = true; return p }, state: "Allowed", reason: "Global"},
		{name: "discovery while rules exist", setup: []exchange.Call{rule("Nokia", "DeviceType", "Block")},
			phone: func(p exchangesim.Phone) exchangesim.Phone { p.NoDeviceInfo = true; return p }, state: "DeviceDiscovery", reason: "DeviceRule"},
		{name: "discovery under a quarantine default", setup: []exchange.Call{defaultLevel("Quarantine")},
			phone: func(p exchangesim.Phone) exchangesim.Phone { p.NoDeviceInfo = true; return p }, state: "DeviceDiscovery", reason: "Global"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, w := orgWithAlice(t)
			for _, c := range tt.setup {
				w.mustInvoke(c.Cmdlet, roundTrip(c.Params))
			}
			p := iphone("Dev1")
			if tt.phone != nil {
				p = tt.phone(p)
			}
			res := phoneSync(t, s, p)
			if res.State != tt.state || res.Reason != tt.reason || res.Rule != tt.rule {
				t.Fatalf("phone got %s/%s rule %q, want %s/%s rule %q", res.State, res.Reason, res.Rule, tt.state, tt.reason, tt.rule)
			}
			if res.GetsMail != (tt.state == "Allowed") {
				t.Errorf("gets mail %v in state %s", res.GetsMail, tt.state)
			}
			// Exchange reports the same on the partnership object.
			objs := w.mustInvoke("Get-MobileDevice", exchange.Params{"Mailbox": alice})
			if len(objs) != 1 || objs[0]["DeviceAccessState"] != tt.state || objs[0]["DeviceAccessStateReason"] != tt.reason {
				t.Fatalf("Get-MobileDevice: %v", objs)
			}
			if tt.rule != "" && objs[0]["DeviceAccessControlRule"] != tt.rule {
				t.Errorf("DeviceAccessControlRule = %v", objs[0]["DeviceAccessControlRule"])
			}
		})
	}
}

func lists(t *testing.T, w *worker) (allowed, blocked []any) {
	t.Helper()
	objs := w.mustInvoke("Get-CASMailbox", exchange.Params{"Identity": alice})
	if len(objs) != 1 {
		t.Fatalf("Get-CASMailbox returned %d objects", len(objs))
	}
	a, _ := objs[0]["ActiveSyncAllowedDeviceIDs"].([]any)
	b, _ := objs[0]["ActiveSyncBlockedDeviceIDs"].([]any)
	return a, b
}

func deviceState(t *testing.T, w *worker) (string, string) {
	t.Helper()
	objs := w.mustInvoke("Get-MobileDevice", exchange.Params{"Mailbox": alice})
	if len(objs) != 1 {
		t.Fatalf("Get-MobileDevice returned %d objects", len(objs))
	}
	return objs[0]["DeviceAccessState"].(string), objs[0]["DeviceAccessStateReason"].(string)
}

// List semantics of Set-CASMailbox (reference/exchange.md §3.4).
func TestListSemantics(t *testing.T) {
	t.Run("allowing removes from the blocked list and re-stamps at once", func(t *testing.T) {
		s, w := orgWithAlice(t)
		phoneSync(t, s, iphone("Dev1"))
		w.mustInvoke("Set-CASMailbox", roundTrip(block("Dev1").Params))
		if st, r := deviceState(t, w); st != "Blocked" || r != "Individual" {
			t.Fatalf("after block: %s/%s", st, r)
		}
		w.mustInvoke("Set-CASMailbox", roundTrip(allow("dev1").Params))
		a, b := lists(t, w)
		if len(a) != 1 || a[0] != "dev1" || len(b) != 0 {
			t.Fatalf("lists allowed %v blocked %v", a, b)
		}
		if st, r := deviceState(t, w); st != "Allowed" || r != "Individual" {
			t.Fatalf("after allow: %s/%s", st, r)
		}
	})
	t.Run("blocking removes from the allowed list", func(t *testing.T) {
		_, w := orgWithAlice(t)
		w.mustInvoke("Set-CASMailbox", roundTrip(allow("Dev1").Params))
		w.mustInvoke("Set-CASMailbox", roundTrip(block("DEV1").Params))
		a, b := lists(t, w)
		if len(a) != 0 || len(b) != 1 || b[0] != "DEV1" {
			t.Fatalf("lists allowed %v blocked %v", a, b)
		}
	})
	t.Run("the same id in both lists in one call is an error and changes nothing", func(t *testing.T) {
		_, w := orgWithAlice(t)
		_, r := w.invoke("Set-CASMailbox", roundTrip(exchange.Params{"Identity": alice,
			"ActiveSyncAllowedDeviceIDs": exchange.MultiValued{Add: []string{"Dev1"}}, "ActiveSyncBlockedDeviceIDs": exchange.MultiValued{Add: []string{"dev1"}}}))
		if r.OK || len(r.Errors) != 1 || r.Errors[0].Reason != "ArgumentException" {
			t.Fatalf("result %+v", r)
		}
		if a, b := lists(t, w); len(a) != 0 || len(b) != 0 {
			t.Fatalf("lists changed: %v %v", a, b)
		}
	})
	t.Run("both lists in one call without overlap", func(t *testing.T) {
		_, w := orgWithAlice(t)
		w.mustInvoke("Set-CASMailbox", roundTrip(exchange.Params{"Identity": alice,
			"ActiveSyncAllowedDeviceIDs": exchange.MultiValued{Add: []string{"A1", "A2"}}, "ActiveSyncBlockedDeviceIDs": exchange.MultiValued{Add: []string{"B1"}}}))
		if a, b := lists(t, w); len(a) != 2 || len(b) != 1 {
			t.Fatalf("lists %v %v", a, b)
		}
	})
	t.Run("removing an individually allowed id resets the device to Unknown", func(t *testing.T) {
		s, w := orgWithAlice(t)
		w.mustInvoke("Set-CASMailbox", roundTrip(allow("Dev1").Params))
		phoneSync(t, s, iphone("Dev1"))
		w.mustInvoke("Set-CASMailbox", roundTrip(exchange.Params{"Identity": alice, "ActiveSyncAllowedDeviceIDs": exchange.MultiValued{Remove: []string{"DEV1"}}}))
		if st, r := deviceState(t, w); st != "Unknown" || r != "Unknown" {
			t.Fatalf("after removal: %s/%s", st, r)
		}
	})
	t.Run("replacing and clearing a whole list", func(t *testing.T) {
		_, w := orgWithAlice(t)
		w.mustInvoke("Set-CASMailbox", roundTrip(exchange.Params{"Identity": alice, "ActiveSyncAllowedDeviceIDs": []string{"X1", "X2", "x1"}}))
		if a, _ := lists(t, w); len(a) != 2 {
			t.Fatalf("replace: %v", a)
		}
		w.mustInvoke("Set-CASMailbox", roundTrip(exchange.Params{"Identity": alice, "ActiveSyncAllowedDeviceIDs": nil}))
		if a, _ := lists(t, w); len(a) != 0 {
			t.Fatalf("clear: %v", a)
		}
	})
}

// The seed scenario's Exchange half: a new phone is quarantined, and once
// its id is allowed its very next sync gets mail.
func TestQuarantinedPhoneGetsMailOnNextSyncAfterAllow(t *testing.T) {
	s, w := orgWithAlice(t)
	w.mustInvoke("Set-ActiveSyncOrganizationSettings", roundTrip(exchange.Params{"DefaultAccessLevel": "Quarantine", "AdminMailRecipients": []string{"helpdesk@contoso.com"}}))
	first := phoneSync(t, s, iphone("ApplNEW0000001"))
	if !first.Created || first.State != "Quarantined" || first.GetsMail {
		t.Fatalf("first sync %+v", first)
	}
	notices, _ := s.Org.Notices(alice)
	if len(notices) != 2 || !notices[1].Admin {
		t.Fatalf("Exchange's own notices: %+v (want the user's and the admin's)", notices)
	}
	if again := phoneSync(t, s, iphone("ApplNEW0000001")); again.State != "Quarantined" || again.Created {
		t.Fatalf("second sync %+v", again)
	}
	w.mustInvoke("Set-CASMailbox", roundTrip(allow("ApplNEW0000001").Params))
	next := phoneSync(t, s, iphone("ApplNEW0000001"))
	if next.State != "Allowed" || next.Reason != "Individual" || !next.GetsMail || next.HTTPStatus != 200 {
		t.Fatalf("sync after allow %+v", next)
	}
}
