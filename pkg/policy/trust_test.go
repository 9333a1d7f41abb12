package policy

import (
	"strings"
	"testing"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// A device exemption names its mailbox: the device id it names is admitted
// on that mailbox only, because any phone can report any device id.
func TestDeviceExemptionBindsToMailbox(t *testing.T) {
	p := mustParse(t, `version: 1
org: contoso
exemptions:
  - {mailbox: Alice@contoso.com, device_id: ApplALICE0000001, reason: "alice's iPhone, INC-1"}
  - {mailbox: probes@contoso.com, device_type: EASProbeDeviceType, reason: "probe mailbox"}
`)
	tests := []struct {
		name string
		in   Input
		rule string
	}{
		{"the device on its mailbox", input(device("applalice0000001", "iPhone", "iOS 17")), RuleExemptionDeviceID},
		{"the device on its mailbox by UPN", input(mailbox("a.smith@contoso.com", "alice@CONTOSO.com"), device("ApplALICE0000001", "iPhone", "iOS 17")), RuleExemptionDeviceID},
		{"the same id on another mailbox", input(mailbox("bob@contoso.com", "bob@contoso.com"), device("ApplALICE0000001", "iPhone", "iOS 17")), RuleUnknownDevice},
		{"another device of the mailbox", input(device("ApplOTHER0000001", "iPhone", "iOS 17")), RuleUnknownDevice},
		{"the device type on its mailbox", input(mailbox("probes@contoso.com", ""), device("P1", "EASProbeDeviceType", "")), RuleExemptionDeviceType},
		{"the device type on another mailbox", input(device("P1", "EASProbeDeviceType", "")), RuleUnknownDevice},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if v := p.Evaluate(tc.in); v.Rule != tc.rule {
				t.Fatalf("rule %q, want %q (%s)", v.Rule, tc.rule, v.Reason)
			}
		})
	}
}

// Warnings name every rule that trusts what the phone reports; a policy
// that binds its device exemptions to mailboxes has none.
func TestWarningsNameClientReportedRules(t *testing.T) {
	const head = "version: 1\norg: contoso\n"
	tests := []struct {
		name string
		yaml string
		want []string // "path: substring"
	}{
		{"default policy", head, nil},
		{"the example", readExample(t), nil},
		{"mailbox and device id bound", head + "exemptions:\n  - {mailbox: a@contoso.com, device_id: X1, reason: r}\n  - {mailbox: b@contoso.com, reason: r}\n", nil},
		{"acknowledged device id and type", head + "exemptions:\n  - {mailbox: a@contoso.com, reason: r}\n  - {device_id: X1, reason: lab, trust_client_reported: true}\n  - {device_type: EASProbeDeviceType, reason: probes, trust_client_reported: true}\n",
			[]string{`exemptions[1]: (lab) trusts the client-reported device id "X1" on every mailbox`, `exemptions[2]: (probes) trusts the client-reported device type "EASProbeDeviceType"`}},
		{"device type bound to a mailbox", head + "exemptions:\n  - {mailbox: probes@contoso.com, device_type: EASProbeDeviceType, reason: probes}\n",
			[]string{`exemptions[0]: (probes) trusts the client-reported device type "EASProbeDeviceType": any phone of probes@contoso.com`}},
		{"platform block harsher than unknown device", head + "allowed_platforms: [ios]\nunknown_device: quarantine\n",
			[]string{"allowed_platforms: a device without an MDM platform is judged by its client-reported device type and OS"}},
		{"platform block as harsh as unknown device", head + "allowed_platforms: [ios]\n", nil},
		{"MDM records without user trusted", head + "trust_mdm_records_without_user: true\n",
			[]string{"trust_mdm_records_without_user: an MDM record that names no user"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := mustParse(t, tc.yaml).Warnings()
			if len(got) != len(tc.want) {
				t.Fatalf("warnings %q, want %d: %q", got, len(tc.want), tc.want)
			}
			for i, w := range tc.want {
				if s := got[i].String(); !strings.Contains(s, w) {
					t.Errorf("warning %d = %q, want it to contain %q", i, s, w)
				}
			}
		})
	}
}

// An MDM record that names no user counts only when the policy trusts
// such records; otherwise the device is unknown and the reason says why.
func TestRecordWithoutUser(t *testing.T) {
	userless := func(in *Input) {
		compliantMDM(in)
		in.NoMatch = ev.NoMatchReason_NO_MATCH_REASON_RECORD_WITHOUT_USER
	}
	tests := []struct {
		name   string
		yaml   string
		rule   string
		reason string
	}{
		{"not trusted by default", "version: 1\norg: contoso\n", RuleUnknownDevice, "names no user"},
		{"not trusted when off", "version: 1\norg: contoso\ntrust_mdm_records_without_user: false\n", RuleUnknownDevice, "trust_mdm_records_without_user"},
		{"trusted when on", "version: 1\norg: contoso\ntrust_mdm_records_without_user: true\n", RuleCompliant, "enrolled and compliant"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v := mustParse(t, tc.yaml).Evaluate(input(userless))
			if v.Rule != tc.rule || !strings.Contains(v.Reason, tc.reason) {
				t.Fatalf("rule %q reason %q, want %q containing %q", v.Rule, v.Reason, tc.rule, tc.reason)
			}
		})
	}
}
