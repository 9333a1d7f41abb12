package exchange

import (
	"encoding/json"
	"strconv"
	"strings"
	"time"
)

// Get returns a property by name. PowerShell property names are
// case-insensitive and their casing differs between cmdlets and versions
// (Get-MobileDevice's DeviceId, Get-MobileDeviceStatistics' DeviceID), so
// an exact match is tried first and then any casing.
func (o Object) Get(name string) (any, bool) {
	if v, ok := o[name]; ok {
		return v, true
	}
	for k, v := range o {
		if strings.EqualFold(k, name) {
			return v, true
		}
	}
	return nil, false
}

func str(o Object, k string) string {
	v, _ := o.Get(k)
	s, _ := v.(string)
	return s
}

func boolean(o Object, k string) bool {
	v, _ := o.Get(k)
	b, _ := v.(bool)
	return b
}

func strs(o Object, k string) []string {
	v, _ := o.Get(k)
	list, _ := v.([]any)
	out := make([]string, 0, len(list))
	for _, v := range list {
		if s, ok := v.(string); ok {
			out = append(out, s)
		}
	}
	return out
}

// when reads a date as the worker sends it, in .NET's round-trip format:
// with Z (UTC), with an offset (local time of the Windows host), or with
// neither (DateTimeKind.Unspecified). Exchange keeps its dates in UTC, and
// an unspecified one is read as UTC: converting it as local time would
// shift it by the host's offset. The zero time means "not set" (null).
func when(o Object, k string) time.Time {
	s := str(o, k)
	if s == "" {
		return time.Time{}
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t.UTC()
	}
	if t, err := time.Parse("2006-01-02T15:04:05.999999999", s); err == nil {
		return t // no zone: UTC
	}
	return time.Time{}
}

// whenUTC prefers the UTC twin of a date property (WhenChangedUTC for
// WhenChanged) where the object has one.
func whenUTC(o Object, k string) time.Time {
	if t := when(o, k+"UTC"); !t.IsZero() {
		return t
	}
	return when(o, k)
}

// enumTable is an Exchange enum: its numeric values' names, and each
// name under itself, for the exact spelling most values arrive in.
type enumTable struct {
	names map[int64]string
	exact map[string]string
}

func newEnumTable(names map[int64]string) enumTable {
	t := enumTable{names: names, exact: make(map[string]string, len(names))}
	for _, n := range names {
		t.exact[n] = n
	}
	return t
}

// name returns the canonical name of an enum value as the worker sent it:
// a name (any casing) or, when a value crossed the remote session as a
// deserialised enum and reached Go as a number, its number. ok is false
// for a value the table does not know; the raw text is returned then.
func (t enumTable) name(v any) (string, bool) {
	switch x := v.(type) {
	case string:
		if n, ok := t.exact[x]; ok {
			return n, true
		}
		for _, n := range t.names {
			if strings.EqualFold(n, x) {
				return n, true
			}
		}
		if n, err := strconv.ParseInt(x, 10, 64); err == nil {
			if name, ok := t.names[n]; ok {
				return name, true
			}
		}
		return x, false
	case json.Number:
		if n, err := x.Int64(); err == nil {
			if name, ok := t.names[n]; ok {
				return name, true
			}
		}
		return x.String(), false
	case float64:
		if name, ok := t.names[int64(x)]; ok {
			return name, true
		}
	}
	return "", false
}

// enum reads an enum property through its table.
func enum(o Object, k string, t enumTable) string {
	v, _ := o.Get(k)
	n, _ := t.name(v)
	return n
}

// Exchange's enums as they cross the remote session. The numbers are the
// enums' declaration order in Exchange's code (reference/exchange.md §1.5,
// §2, §7); where no source gives them they are marked UNCONFIRMED, and a
// number the table does not know reads as the number itself, never as a
// wrong name.
var (
	// DeviceAccessState [B6][C1].
	enumAccessState = newEnumTable(map[int64]string{0: "Unknown", 1: "Allowed", 2: "Blocked", 3: "Quarantined", 4: "DeviceDiscovery"})
	// DeviceAccessStateReason [C5].
	enumAccessReason = newEnumTable(map[int64]string{0: "Unknown", 1: "Global", 2: "Individual", 3: "DeviceRule", 4: "Upgrade", 5: "Policy",
		6: "UserAgentsChanges", 7: "RecentCommands", 8: "Watsons", 9: "OutOfBudgets", 10: "SyncCommands",
		11: "EnableNotificationEmail", 12: "CommandFrequency", 51: "ExternallyManaged", 52: "ExternalCompliance", 53: "ExternalEnrollment"})
	// DeviceAccessLevel (DefaultAccessLevel, rules' AccessLevel).
	// UNCONFIRMED numbers: declaration order Allow, Block, Quarantine.
	enumAccessLevel = newEnumTable(map[int64]string{0: "Allow", 1: "Block", 2: "Quarantine"})
	// MobileClientType (ClientType). UNCONFIRMED numbers: EAS is the
	// default and MOWA exists [C1][C2]; the order is assumed.
	enumClientType = newEnumTable(map[int64]string{0: "EAS", 1: "MOWA", 2: "RestApi", 3: "UniversalOutlook"})
	// DevicePolicyApplicationStatus [C6].
	enumPolicyStatus = newEnumTable(map[int64]string{0: "Unknown", 1: "NotApplied", 2: "AppliedInFull", 3: "PartiallyApplied", 4: "ExternallyManaged"})
	// DeviceRemoteWipeStatus [C8].
	enumWipeStatus = newEnumTable(map[int64]string{0: "DeviceOk", 1: "DeviceBlocked", 2: "DeviceWipePending", 3: "DeviceWipeSucceeded"})
)
