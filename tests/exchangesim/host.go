package exchangesim

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
)

// Host is the Windows host the easguard worker runs on, and what Windows
// PowerShell 5.1 and an implicit-remoting session to Exchange do to the
// worker script there. The simulator answers the frame protocol in the
// script's place; so that it cannot be kinder than a real host, it models
// these behaviours, each from the script's own syntax tree where the script
// decides (exchange.Contract, written by .ci/pssyntax/contract.mjs) and
// from these settings where the host decides. Every setting whose real
// behaviour is UNCONFIRMED is a switch, and the tests run both ways.
type Host struct {
	// Culture is the host's culture (and the Exchange server's), e.g.
	// de-DE; empty means en-US. A session the script does not pin to a
	// culture inherits it: date literals in filters are read day first and
	// Exchange's messages come back in German.
	Culture string
	// UTCOffset is the host's time zone: local-time dates (WhenChanged,
	// WhenCreated) cross the session with this offset.
	UTCOffset time.Duration
	// LanguageMode is the host's PowerShell language mode; empty means
	// FullLanguage. ConstrainedLanguage is what AppLocker or WDAC impose.
	LanguageMode string
	// DeserializedEnums sends Exchange's enums as the numbers they are
	// after crossing an implicit-remoting session (Deserialized.System.Enum),
	// as if the script had not recognised them; the Go side must read both.
	DeserializedEnums bool
	// AltPropertyCase spells property names the other way where Exchange's
	// cmdlets and versions differ (DeviceId/DeviceID, Guid/GUID, Fqdn/FQDN).
	// UNCONFIRMED which spelling which version uses; PowerShell itself
	// treats names case-insensitively.
	AltPropertyCase bool
	// UnspecifiedDates sends Exchange's UTC dates (FirstSyncTime,
	// LastSuccessSync, ...) with DateTimeKind.Unspecified, that is without
	// a zone. UNCONFIRMED which kind Exchange's deserialised dates carry.
	UnspecifiedDates bool
	// FaultUnknownEnum is a test fault, not a behaviour of Exchange as
	// known: every DeviceAccessStateReason is sent as a value pkg/exchange's
	// enum tables do not know (FaultEnumName, or FaultEnumNumber with
	// DeserializedEnums), as a later Exchange update that added an enum
	// member would send it. It is how tests provoke a shape that easguard
	// cannot read (easguard check exchange --deep must name it).
	FaultUnknownEnum bool
	// FaultCultureDates is a test fault: Exchange's dates are sent as
	// DateTime.ToString() writes them in the host's culture
	// ("12/6/2026 9:05:00 AM"), as if the script had not converted them to
	// the round-trip format, which pkg/exchange cannot parse.
	FaultCultureDates bool
}

// The value FaultUnknownEnum sends for DeviceAccessStateReason, by name
// and as a deserialised number; neither is in pkg/exchange's table.
const (
	FaultEnumName   = "FutureReason"
	FaultEnumNumber = 99
)

func (h *Host) culture() string {
	if h == nil || h.Culture == "" {
		return "en-US"
	}
	return h.Culture
}

// dayFirst reports whether a culture writes the day before the month: every
// culture the simulator models but en-US.
func dayFirst(culture string) bool { return !strings.EqualFold(culture, "en-US") }

// german reports whether Exchange answers a session of this culture in German.
func german(culture string) bool {
	return strings.HasPrefix(strings.ToLower(culture), "de")
}

// enumValue is an Exchange enum value in an output object: its name and
// the number it becomes when deserialised.
type enumValue struct {
	name string
	num  int64
}

func (e enumValue) String() string { return e.name }

func enumOf[T ~int](v T, name string) enumValue { return enumValue{name: name, num: int64(v)} }

// enumNamed is an enum value known by name, through its numbering.
func enumNamed(names map[string]int64, name string) any {
	n, ok := names[name]
	if !ok {
		return name
	}
	return enumValue{name: name, num: n}
}

// Numberings of the enums the simulator keeps as strings; the same
// declaration orders pkg/exchange reads (UNCONFIRMED where marked there).
var (
	clientTypeNums   = map[string]int64{"EAS": 0, "MOWA": 1, "RestApi": 2, "UniversalOutlook": 3}
	policyStatusNums = map[string]int64{"Unknown": 0, "NotApplied": 1, "AppliedInFull": 2, "PartiallyApplied": 3, "ExternallyManaged": 4}
	wipeStatusNums   = map[string]int64{"DeviceOk": 0, "DeviceBlocked": 1, "DeviceWipePending": 2, "DeviceWipeSucceeded": 3}
)

// dateValue is a date in an output object, with the kind it has when the
// script converts it: local time (WhenChanged) or Exchange's UTC.
type dateValue struct {
	t     time.Time
	local bool
}

func (d dateValue) String() string { return d.t.UTC().Format(time.RFC3339Nano) }

// wireTime is one of Exchange's UTC dates; a date that is not set is null.
func wireTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return dateValue{t: t}
}

// localTime is a date Exchange reports in the server's local time
// (WhenChanged, WhenCreated; their ...UTC twins are wireTime).
func localTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return dateValue{t: t, local: true}
}

// altCase maps property names to the other spelling (AltPropertyCase).
var altCase = map[string]string{
	"DeviceId": "DeviceID", "DeviceID": "DeviceId", "Guid": "GUID", "Fqdn": "FQDN", "DeviceImei": "DeviceIMEI",
	"DeviceOS": "DeviceOs", "WhenChangedUTC": "WhenChangedUtc", "PrimarySmtpAddress": "PrimarySMTPAddress",
	"DeviceUserAgent": "DeviceUseragent", "FirstSyncTime": "FirstSynctime",
}

// wire turns an output object into what the worker script sends for it:
// enums as names (or numbers, DeserializedEnums), dates in .NET's
// round-trip format with their kind (Z, the host's offset, or no zone),
// property names as the host spells them.
func (h *Host) wire(o exchange.Object) exchange.Object {
	out := make(exchange.Object, len(o))
	for k, v := range o {
		if h != nil && h.AltPropertyCase {
			if alt, ok := altCase[k]; ok {
				k = alt
			}
		}
		out[k] = h.wireValue(v)
		if h != nil && h.FaultUnknownEnum && strings.EqualFold(k, "DeviceAccessStateReason") {
			out[k] = FaultEnumName
			if h.DeserializedEnums {
				out[k] = int64(FaultEnumNumber)
			}
		}
	}
	return out
}

func (h *Host) wireValue(v any) any {
	switch x := v.(type) {
	case enumValue:
		if h != nil && h.DeserializedEnums {
			return x.num
		}
		return x.name
	case dateValue:
		switch {
		case h != nil && h.FaultCultureDates:
			return x.t.UTC().Format("1/2/2006 3:04:05 PM")
		case x.local:
			var off time.Duration
			if h != nil {
				off = h.UTCOffset
			}
			return x.t.In(time.FixedZone("host", int(off.Seconds()))).Format("2006-01-02T15:04:05.0000000-07:00")
		case h != nil && h.UnspecifiedDates:
			return x.t.UTC().Format("2006-01-02T15:04:05.0000000")
		}
		return x.t.UTC().Format("2006-01-02T15:04:05.0000000Z")
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = h.wireValue(e)
		}
		return out
	}
	return v
}

// strictModeMissing reports the first field the script reads unguarded
// (exchange.Contract().Reads) that a request line lacks: under
// Set-StrictMode -Version 2.0 reading it is a terminating error. It checks
// the request and the calls it carries.
func strictModeMissing(line string) (kind, field string) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(line))
	if err != nil {
		return "", ""
	}
	var req map[string]any
	if json.Unmarshal(raw, &req) != nil {
		return "", ""
	}
	reads := exchange.Contract().Reads
	has := func(o map[string]any, f string) bool { _, ok := o[f]; return ok }
	for _, f := range reads["request"] {
		if !has(req, f) {
			return "request", f
		}
	}
	var calls []map[string]any
	if c, ok := req["call"].(map[string]any); ok {
		calls = append(calls, c)
	}
	if list, ok := req["calls"].([]any); ok {
		for _, c := range list {
			if m, ok := c.(map[string]any); ok {
				calls = append(calls, m)
			}
		}
	}
	for _, c := range calls {
		for _, f := range reads["call"] {
			if !has(c, f) {
				return "call", f
			}
		}
	}
	return "", ""
}

// propertyNotFound is Windows PowerShell's strict-mode error for reading a
// property an object lacks.
func propertyNotFound(field string) exchange.Error {
	return newError(fmt.Sprintf("The property '%s' cannot be found on this object. Verify that the property exists.", field),
		"NotSpecified", "PropertyNotFoundException", "PropertyNotFoundStrict", "")
}

// warningsReachScript reports whether a cmdlet's warnings come back to the
// script: over an implicit-remoting session the proxy passes -WarningAction
// to the server, so SilentlyContinue (or Ignore) drops them there, before
// the local -WarningVariable can see them.
func warningsReachScript(mode string) bool {
	if mode != "remote" {
		return true
	}
	switch strings.ToLower(exchange.Contract().InvokeCommon["WarningAction"]) {
	case "silentlycontinue", "ignore":
		return false
	}
	return true
}

// languageModeRefusal is what the bootstrap writes on a host that is not in
// FullLanguage when it checks the mode first (its Write-Output line), and
// what PowerShell itself reports otherwise: the bootstrap's first New-Object
// of a non-core type is blocked.
func languageModeRefusal(mode string) (stdout, stderr string, code int) {
	if exchange.Contract().BootstrapChecksLanguageMode {
		return exchange.FatalSentinel + "language mode: PowerShell on this host runs in " + mode +
			" mode (AppLocker or WDAC); the easguard worker needs FullLanguage for the service account\r\n", "", exchange.ExitLanguageMode
	}
	return "", clixmlError("New-Object : Cannot create type. Only core types are supported in this language mode."), 1
}
