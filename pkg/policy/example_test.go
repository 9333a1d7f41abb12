package policy_test

import (
	"fmt"
	"time"

	"github.com/easguard/easguard/pkg/policy"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func ExamplePolicy_Evaluate() {
	p, err := policy.Parse([]byte(`
version: 1
org: contoso
scope:
  exclude: {groups: [service-accounts]}
groups:
  service-accounts: [svc-*@contoso.com]
default_access_level: quarantine
unknown_device: quarantine
grace_period: 1d
`))
	if err != nil {
		fmt.Println(err)
		return
	}
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	v := p.Evaluate(policy.Input{
		Org:     "contoso",
		Mailbox: &ev.Mailbox{PrimarySmtpAddress: "alice@contoso.com"},
		Partnership: &ev.EASPartnership{
			DeviceId:      "ApplF17LTTCGFFG8",
			DeviceType:    "iPhone",
			FirstSyncTime: timestamppb.New(now.Add(-3 * time.Hour)),
		},
		NoMatch: ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD,
		Now:     now,
	})
	fmt.Println(v.Desired, v.Rule, v.RecheckAt.Format(time.RFC3339))
	fmt.Println(v.Reason)
	// Output:
	// DESIRED_ACCESS_ALLOW grace_period 2026-06-02T09:00:00Z
	// Device ApplF17LTTCGFFG8 (iPhone) of alice@contoso.com is allowed until 2026-06-02T09:00:00Z, the end of its 1d grace period since its first sync, although no MDM record has its EAS device id.
}

func ExampleParse_error() {
	_, err := policy.Parse([]byte("version: 1\norg: contoso\nscope:\n  include: {domains: [contoso.com, contoso]}\nunknown_device: deny\n"))
	fmt.Println(err)
	// Output:
	// invalid policy: scope.include.domains[1]: "contoso" is not a domain name (line 4); unknown_device: "deny" is not block or quarantine (line 5)
}
