package exchange_test

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/easguard/easguard/pkg/exchange"
)

// CheckShapes accepts what the typed reads read correctly (names in any
// casing, known numbers, dates with or without a zone, nulls) and names
// every value they would misread: an unknown enum name or number, a date
// that does not parse, a value of the wrong type, an empty id; one line
// per property and problem, however many objects have it.
func TestCheckShapes(t *testing.T) {
	good := exchange.Object{"Identity": "contoso.com/Users/Alice/ExchangeActiveSyncDevices/iPhone§A1", "Guid": "g1", "DeviceID": "A1",
		"DeviceAccessState": "allowed", "DeviceAccessStateReason": json.Number("2"), "Status": nil,
		"LastSuccessSync": "2026-12-06T00:18:45.0000000", "LastSyncAttemptTime": "2026-12-06T00:18:45.0000000Z", "DeviceWipeAckTime": ""}
	with := func(k string, v any) exchange.Object {
		o := exchange.Object{}
		for kk, vv := range good {
			o[kk] = vv
		}
		o[k] = v
		return o
	}
	tests := []struct {
		name string
		kind string
		obj  exchange.Object
		want string // "" for no problem
	}{
		{"readable", "statistics", good, ""},
		{"unknown enum name", "statistics", with("DeviceAccessState", "Suspended"), `DeviceAccessState not a known value: 2×, e.g. "Suspended"`},
		{"unknown enum number", "statistics", with("DeviceAccessStateReason", json.Number("77")), `DeviceAccessStateReason not a known value: 2×, e.g. "77"`},
		{"enum as a number in text", "statistics", with("DevicePolicyApplicationStatus", "2"), ""},
		{"date in a culture's format", "statistics", with("LastSuccessSync", "06.12.2026 00:18:45"), `LastSuccessSync does not parse: 2×, e.g. "06.12.2026 00:18:45"`},
		{"date of the wrong type", "statistics", with("DeviceWipeRequestTime", json.Number("1765000000")), "DeviceWipeRequestTime not a date"},
		{"empty id", "statistics", with("DeviceID", ""), "DeviceID empty"},
		{"missing id", "recipient", exchange.Object{"Identity": "contoso.com/Users/Alice"}, "Guid empty"},
		{"unknown kind", "phone", good, "kind phone"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := exchange.CheckShapes(tt.kind, []exchange.Object{tt.obj, tt.obj})
			switch {
			case tt.want == "" && len(got) > 0:
				t.Fatalf("problems %q, want none", got)
			case tt.want != "" && (len(got) != 1 || !strings.Contains(got[0], tt.want)):
				t.Fatalf("problems %q, want one with %q", got, tt.want)
			}
		})
	}
}
