package intunesim

import (
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Device is one Intune managedDevice record. The JSON names are exactly
// Graph's (reference/exchange.md §15; the v1.0 managedDevice resource
// page), so the admin API takes and returns the same shape Graph serves.
type Device struct {
	ID                     string               `json:"id"`
	UserID                 string               `json:"userId"`
	DeviceName             string               `json:"deviceName"`
	ManagedDeviceOwnerType string               `json:"managedDeviceOwnerType"` // unknown, company, personal
	DeviceActionResults    []DeviceActionResult `json:"deviceActionResults"`
	EnrolledDateTime       time.Time            `json:"enrolledDateTime"`
	LastSyncDateTime       time.Time            `json:"lastSyncDateTime"`
	OperatingSystem        string               `json:"operatingSystem"` // iOS, Android, Windows, …
	// ComplianceState is unknown, compliant, noncompliant, conflict,
	// error, inGracePeriod or configManager.
	ComplianceState string `json:"complianceState"`
	JailBroken      string `json:"jailBroken"`
	// ManagementAgent is eas, mdm, easMdm, intuneClient, ….
	ManagementAgent           string    `json:"managementAgent"`
	OSVersion                 string    `json:"osVersion"`
	EASActivated              bool      `json:"easActivated"`
	EASDeviceID               string    `json:"easDeviceId"`
	EASActivationDateTime     time.Time `json:"easActivationDateTime"`
	AzureADRegistered         bool      `json:"azureADRegistered"`
	DeviceEnrollmentType      string    `json:"deviceEnrollmentType"`
	EmailAddress              string    `json:"emailAddress"`
	AzureADDeviceID           string    `json:"azureADDeviceId"`
	DeviceRegistrationState   string    `json:"deviceRegistrationState"`
	DeviceCategoryDisplayName string    `json:"deviceCategoryDisplayName"`
	IsSupervised              bool      `json:"isSupervised"`
	// ExchangeLastSuccessfulSyncDateTime, ExchangeAccessState and
	// ExchangeAccessStateReason were fed by the retired on-premises
	// connector; the simulator reports none/none (nobody feeds them now).
	ExchangeLastSuccessfulSyncDateTime      time.Time `json:"exchangeLastSuccessfulSyncDateTime"`
	ExchangeAccessState                     string    `json:"exchangeAccessState"`
	ExchangeAccessStateReason               string    `json:"exchangeAccessStateReason"`
	IsEncrypted                             bool      `json:"isEncrypted"`
	UserPrincipalName                       string    `json:"userPrincipalName"`
	Model                                   string    `json:"model"`
	Manufacturer                            string    `json:"manufacturer"`
	IMEI                                    string    `json:"imei"`
	ComplianceGracePeriodExpirationDateTime time.Time `json:"complianceGracePeriodExpirationDateTime"`
	SerialNumber                            string    `json:"serialNumber"`
	PhoneNumber                             string    `json:"phoneNumber"`
	AndroidSecurityPatchLevel               string    `json:"androidSecurityPatchLevel"`
	UserDisplayName                         string    `json:"userDisplayName"`
	WiFiMacAddress                          string    `json:"wiFiMacAddress"`
	SubscriberCarrier                       string    `json:"subscriberCarrier"`
	MEID                                    string    `json:"meid"`
	TotalStorageSpaceInBytes                int64     `json:"totalStorageSpaceInBytes"`
	FreeStorageSpaceInBytes                 int64     `json:"freeStorageSpaceInBytes"`
	ManagedDeviceName                       string    `json:"managedDeviceName"`
	PartnerReportedThreatState              string    `json:"partnerReportedThreatState"`
	// ManagementState is managed, retireIssued, retirePending, … (the
	// managementState enum). The enum is documented; whether v1.0's
	// managedDevice carries the property is UNCONFIRMED (reference §15):
	// the simulator serves it on /beta always and on /v1.0 unless
	// Config.StrictV1 is set.
	ManagementState string `json:"managementState"`
}

// DeviceActionResult is one entry of deviceActionResults, e.g. the
// pending retire a Retire call leaves.
type DeviceActionResult struct {
	ActionName          string    `json:"actionName"`
	ActionState         string    `json:"actionState"` // none, pending, canceled, active, done, failed, notSupported
	StartDateTime       time.Time `json:"startDateTime"`
	LastUpdatedDateTime time.Time `json:"lastUpdatedDateTime"`
}

// ComplianceStates are the values of complianceState [D39].
var ComplianceStates = []string{"unknown", "compliant", "noncompliant", "conflict", "error", "inGracePeriod", "configManager"}

// ManagementStates are the values of the managementState enum [D40].
var ManagementStates = []string{"managed", "retirePending", "retireFailed", "wipePending", "wipeFailed", "unhealthy",
	"deletePending", "retireIssued", "wipeIssued", "wipeCanceled", "retireCanceled", "discovered"}

func oneOf(v string, list []string) bool {
	for _, s := range list {
		if s == v {
			return true
		}
	}
	return false
}

// neverSynced is how Graph shows a DateTimeOffset that was never set.
var neverSynced = time.Date(1, 1, 1, 0, 0, 0, 0, time.UTC)

// noGracePeriod is complianceGracePeriodExpirationDateTime of a device
// that is not in a grace period. UNCONFIRMED: observed in Intune exports,
// not documented.
var noGracePeriod = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)

func (d *Device) clone() Device {
	c := *d
	c.DeviceActionResults = append([]DeviceActionResult(nil), d.DeviceActionResults...)
	if c.DeviceActionResults == nil {
		c.DeviceActionResults = []DeviceActionResult{}
	}
	return c
}

// property is one managedDevice property as Graph serialises it.
type property struct {
	name string
	// beta marks a property /v1.0 hides when Config.StrictV1 is set.
	beta   bool
	append func(b []byte, d *Device) []byte
}

func strProp(name string, get func(d *Device) string) property {
	return property{name: name, append: func(b []byte, d *Device) []byte { return appendJSONString(b, get(d)) }}
}

func boolProp(name string, get func(d *Device) bool) property {
	return property{name: name, append: func(b []byte, d *Device) []byte { return strconv.AppendBool(b, get(d)) }}
}

func timeProp(name string, get func(d *Device) time.Time) property {
	return property{name: name, append: func(b []byte, d *Device) []byte { return appendTime(b, get(d)) }}
}

func int64Prop(name string, get func(d *Device) int64) property {
	return property{name: name, append: func(b []byte, d *Device) []byte { return strconv.AppendInt(b, get(d), 10) }}
}

func nullProp(name string) property {
	return property{name: name, append: func(b []byte, _ *Device) []byte { return append(b, "null"...) }}
}

// properties are managedDevice's properties in the order of the v1.0
// resource page. The ones the simulator does not model are served as
// null, as Graph serves unset ones.
var properties = []property{
	strProp("id", func(d *Device) string { return d.ID }),
	strProp("userId", func(d *Device) string { return d.UserID }),
	strProp("deviceName", func(d *Device) string { return d.DeviceName }),
	strProp("managedDeviceOwnerType", func(d *Device) string { return d.ManagedDeviceOwnerType }),
	{name: "deviceActionResults", append: appendActionResults},
	timeProp("enrolledDateTime", func(d *Device) time.Time { return d.EnrolledDateTime }),
	timeProp("lastSyncDateTime", func(d *Device) time.Time { return d.LastSyncDateTime }),
	strProp("operatingSystem", func(d *Device) string { return d.OperatingSystem }),
	strProp("complianceState", func(d *Device) string { return d.ComplianceState }),
	strProp("jailBroken", func(d *Device) string { return d.JailBroken }),
	strProp("managementAgent", func(d *Device) string { return d.ManagementAgent }),
	strProp("osVersion", func(d *Device) string { return d.OSVersion }),
	boolProp("easActivated", func(d *Device) bool { return d.EASActivated }),
	strProp("easDeviceId", func(d *Device) string { return d.EASDeviceID }),
	timeProp("easActivationDateTime", func(d *Device) time.Time { return d.EASActivationDateTime }),
	boolProp("azureADRegistered", func(d *Device) bool { return d.AzureADRegistered }),
	strProp("deviceEnrollmentType", func(d *Device) string { return d.DeviceEnrollmentType }),
	nullProp("activationLockBypassCode"),
	strProp("emailAddress", func(d *Device) string { return d.EmailAddress }),
	strProp("azureADDeviceId", func(d *Device) string { return d.AzureADDeviceID }),
	strProp("deviceRegistrationState", func(d *Device) string { return d.DeviceRegistrationState }),
	strProp("deviceCategoryDisplayName", func(d *Device) string { return d.DeviceCategoryDisplayName }),
	boolProp("isSupervised", func(d *Device) bool { return d.IsSupervised }),
	timeProp("exchangeLastSuccessfulSyncDateTime", func(d *Device) time.Time { return d.ExchangeLastSuccessfulSyncDateTime }),
	strProp("exchangeAccessState", func(d *Device) string { return d.ExchangeAccessState }),
	strProp("exchangeAccessStateReason", func(d *Device) string { return d.ExchangeAccessStateReason }),
	nullProp("remoteAssistanceSessionUrl"),
	nullProp("remoteAssistanceSessionErrorDetails"),
	boolProp("isEncrypted", func(d *Device) bool { return d.IsEncrypted }),
	strProp("userPrincipalName", func(d *Device) string { return d.UserPrincipalName }),
	strProp("model", func(d *Device) string { return d.Model }),
	strProp("manufacturer", func(d *Device) string { return d.Manufacturer }),
	strProp("imei", func(d *Device) string { return d.IMEI }),
	timeProp("complianceGracePeriodExpirationDateTime", func(d *Device) time.Time { return d.ComplianceGracePeriodExpirationDateTime }),
	strProp("serialNumber", func(d *Device) string { return d.SerialNumber }),
	strProp("phoneNumber", func(d *Device) string { return d.PhoneNumber }),
	strProp("androidSecurityPatchLevel", func(d *Device) string { return d.AndroidSecurityPatchLevel }),
	strProp("userDisplayName", func(d *Device) string { return d.UserDisplayName }),
	nullProp("configurationManagerClientEnabledFeatures"),
	strProp("wiFiMacAddress", func(d *Device) string { return d.WiFiMacAddress }),
	nullProp("deviceHealthAttestationState"),
	strProp("subscriberCarrier", func(d *Device) string { return d.SubscriberCarrier }),
	strProp("meid", func(d *Device) string { return d.MEID }),
	int64Prop("totalStorageSpaceInBytes", func(d *Device) int64 { return d.TotalStorageSpaceInBytes }),
	int64Prop("freeStorageSpaceInBytes", func(d *Device) int64 { return d.FreeStorageSpaceInBytes }),
	strProp("managedDeviceName", func(d *Device) string { return d.ManagedDeviceName }),
	strProp("partnerReportedThreatState", func(d *Device) string { return d.PartnerReportedThreatState }),
	{name: "managementState", beta: true, append: func(b []byte, d *Device) []byte { return appendJSONString(b, d.ManagementState) }},
}

// propertyIndex maps lower-cased property names to their index.
var propertyIndex = func() map[string]int {
	m := make(map[string]int, len(properties))
	for i, p := range properties {
		m[strings.ToLower(p.name)] = i
	}
	return m
}()

func appendActionResults(b []byte, d *Device) []byte {
	b = append(b, '[')
	for i, a := range d.DeviceActionResults {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"actionName":`...)
		b = appendJSONString(b, a.ActionName)
		b = append(b, `,"actionState":`...)
		b = appendJSONString(b, a.ActionState)
		b = append(b, `,"startDateTime":`...)
		b = appendTime(b, a.StartDateTime)
		b = append(b, `,"lastUpdatedDateTime":`...)
		b = appendTime(b, a.LastUpdatedDateTime)
		b = append(b, '}')
	}
	return append(b, ']')
}

// appendDevice serialises the selected properties (indexes into
// properties, in order) of d as one JSON object.
func appendDevice(b []byte, d *Device, sel []int) []byte {
	b = append(b, '{')
	for i, p := range sel {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, '"')
		b = append(b, properties[p].name...)
		b = append(b, '"', ':')
		b = properties[p].append(b, d)
	}
	return append(b, '}')
}

// appendTime writes a DateTimeOffset in UTC; a zero time is Graph's
// 0001-01-01T00:00:00Z.
func appendTime(b []byte, t time.Time) []byte {
	if t.IsZero() {
		t = neverSynced
	}
	b = append(b, '"')
	b = t.UTC().AppendFormat(b, time.RFC3339Nano)
	return append(b, '"')
}

const hexDigits = "0123456789abcdef"

// appendJSONString writes s as a JSON string, escaped as encoding/json
// would (without HTML escaping); invalid UTF-8 becomes U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
