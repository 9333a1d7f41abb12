package evaluator_test

import (
	"strings"
	"testing"

	"github.com/easguard/easguard/pkg/evaluator"
)

// The policy status and the log name every rule that trusts a value the
// phone reports, and a policy whose exemption rests on such a value alone
// without acknowledging it is refused at start.
func TestPolicyTrustWarnings(t *testing.T) {
	const logMsg = "policy rule trusts a value the phone reports"
	tests := []struct {
		name string
		body string
		want []string // one substring per warning, in order
	}{
		{"bound exemptions warn about nothing", "exemptions:\n  - {mailbox: a@contoso.com, device_id: ApplA1, reason: r}\n", nil},
		{"acknowledged exemptions and userless records", `exemptions:
  - {mailbox: a@contoso.com, device_id: ApplA1, reason: r}
  - {device_type: EASProbeDeviceType, reason: probes, trust_client_reported: true}
trust_mdm_records_without_user: true
`, []string{`exemptions[1]: (probes) trusts the client-reported device type "EASProbeDeviceType"`, "trust_mdm_records_without_user: "}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, evaluator.Config{PolicyFile: policyFile(t, tc.body)})
			st := h.policyStatus()
			if len(st.Warnings) != len(tc.want) {
				t.Fatalf("status warnings %q, want %d like %q", st.Warnings, len(tc.want), tc.want)
			}
			for i, w := range tc.want {
				if !strings.Contains(st.Warnings[i], w) {
					t.Errorf("warning %d = %q, want it to contain %q", i, st.Warnings[i], w)
				}
			}
			if n := h.logs.count(logMsg); n != len(tc.want) {
				t.Errorf("%d log lines %q, want %d", n, logMsg, len(tc.want))
			}
		})
	}
}

// An exemption by a client-reported value alone stops the evaluator at
// start unless it is acknowledged.
func TestPolicyTrustRefused(t *testing.T) {
	tests := []struct{ name, body, want string }{
		{"device id on any mailbox", "exemptions:\n  - {device_id: ApplA1, reason: r}\n", `exempts every phone that reports device_id "ApplA1" on any mailbox`},
		{"device type on any mailbox", "exemptions:\n  - {device_type: EASProbeDeviceType, reason: r}\n", "trust_client_reported: true"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(evaluator.Config{PolicyFile: policyFile(t, tc.body)})
			if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate() = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
