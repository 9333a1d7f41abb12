package mdm

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/timestamppb"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// ManagedDevice is Microsoft Graph's managedDevice, the fields easguard uses
// (JSON names as Graph's). Every source converts its MDM's records into this
// shape so that one Normalize decides what a record means for all of them.
type ManagedDevice struct {
	ID                string `json:"id"`
	UserPrincipalName string `json:"userPrincipalName"`
	EmailAddress      string `json:"emailAddress"`
	EASDeviceID       string `json:"easDeviceId"`
	EASActivated      bool   `json:"easActivated"`
	ComplianceState   string `json:"complianceState"`
	ManagementState   string `json:"managementState"`
	OperatingSystem   string `json:"operatingSystem"`
	OSVersion         string `json:"osVersion"`
	Model             string `json:"model"`
	Manufacturer      string `json:"manufacturer"`
	DeviceName        string `json:"deviceName"`
	AzureADDeviceID   string `json:"azureADDeviceId"`
	// LastSyncDateTime is ISO 8601 (RFC 3339); see Normalize for the forms
	// accepted.
	LastSyncDateTime string `json:"lastSyncDateTime"`
	// DeviceActionResults are the remote actions issued to the device; a
	// retire or wipe that is pending, active or done marks it retired even
	// where managementState is not served (v1.0 may lack it).
	DeviceActionResults []DeviceActionResult `json:"deviceActionResults,omitempty"`
	// Retired is not Graph's: it lets an inventory that states retirement
	// directly say so. True marks the record retired whatever its
	// managementState says; false or absent leaves managementState to decide.
	Retired *bool `json:"retired,omitempty"`
}

// DeviceActionResult is one entry of Graph's deviceActionResults.
type DeviceActionResult struct {
	ActionName  string `json:"actionName"`
	ActionState string `json:"actionState"`
}

// retireIssued reports whether the device was told to retire or wipe and
// the action was not cancelled or failed.
func retireIssued(actions []DeviceActionResult) bool {
	for _, a := range actions {
		switch strings.ToLower(a.ActionName) {
		case "retire", "wipe":
			switch strings.ToLower(a.ActionState) {
			case "pending", "active", "done":
				return true
			}
		}
	}
	return false
}

// RecordError says what is wrong with one device record. It wraps
// ErrInvalidRecord (and the parse error behind it, if any), so a caller can
// tell a record that will never be usable from a transient failure.
type RecordError struct {
	// ID is the record's MDM device id as received (empty when the record
	// has none); Error quotes it, so it cannot forge log lines.
	ID string
	// Field is the record's field at fault, by its Graph JSON name.
	Field string
	// Problem says what is wrong, in words.
	Problem string
	// Err is the underlying parse error, if any.
	Err error
}

// Error names the record and the field; the id is quoted because it is
// data from outside and may hold anything.
func (e *RecordError) Error() string {
	rec := "record without id"
	if e.ID != "" {
		rec = fmt.Sprintf("record %q", e.ID)
	}
	msg := fmt.Sprintf("%s: field %s: %s", rec, e.Field, e.Problem)
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

// Unwrap lets errors.Is find ErrInvalidRecord and the underlying error.
func (e *RecordError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrInvalidRecord}
	}
	return []error{ErrInvalidRecord, e.Err}
}

// complianceStates maps Graph's complianceState values, lower-cased.
var complianceStates = map[string]ev.ComplianceState{
	"unknown":       ev.ComplianceState_COMPLIANCE_STATE_UNKNOWN,
	"compliant":     ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT,
	"noncompliant":  ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT,
	"conflict":      ev.ComplianceState_COMPLIANCE_STATE_CONFLICT,
	"error":         ev.ComplianceState_COMPLIANCE_STATE_ERROR,
	"ingraceperiod": ev.ComplianceState_COMPLIANCE_STATE_IN_GRACE_PERIOD,
	"configmanager": ev.ComplianceState_COMPLIANCE_STATE_CONFIG_MANAGER,
}

// management is what one managementState value means for easguard.
type management struct {
	state   ev.EnrollmentState
	retired bool
}

// managementStates maps Graph's managementState values, lower-cased.
//
// A retire or wipe that was issued or is pending marks the record retired:
// the administrator has decided the device leaves management, and a device
// being wiped must not keep getting mail while the command is on its way.
// A failed or cancelled retire or wipe leaves the device managed (it still
// is), with management_state telling the story. deletePending and
// discovered mean the device is not (or no longer) under management.
var managementStates = map[string]management{
	"managed":        {ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
	"retirepending":  {ev.EnrollmentState_ENROLLMENT_STATE_RETIRE_PENDING, true},
	"retirefailed":   {ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
	"wipepending":    {ev.EnrollmentState_ENROLLMENT_STATE_WIPE_PENDING, true},
	"wipefailed":     {ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
	"unhealthy":      {ev.EnrollmentState_ENROLLMENT_STATE_UNHEALTHY, false},
	"deletepending":  {ev.EnrollmentState_ENROLLMENT_STATE_NOT_ENROLLED, false},
	"retireissued":   {ev.EnrollmentState_ENROLLMENT_STATE_RETIRED, true},
	"wipeissued":     {ev.EnrollmentState_ENROLLMENT_STATE_WIPED, true},
	"wipecanceled":   {ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
	"retirecanceled": {ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
	"discovered":     {ev.EnrollmentState_ENROLLMENT_STATE_NOT_ENROLLED, false},
}

// zoneless are the ISO 8601 forms without an offset that exports produce;
// they are read as UTC, which is what Intune's exports mean.
var zoneless = []string{"2006-01-02T15:04:05", "2006-01-02 15:04:05"}

// Normalize turns one record in Graph's managedDevice shape into easguard's
// MDMDevice, so that every source, whatever its MDM, means the same thing
// by the same field.
//
// Mapping:
//   - complianceState, case-insensitive, to ComplianceState; empty is
//     UNSPECIFIED (not reported) and a value Graph may add later (such as
//     "unknownFutureValue") is UNKNOWN, so the policy treats it as not
//     compliant rather than the record failing.
//   - managementState, case-insensitive, to EnrollmentState and the retired
//     flag: managed, retireFailed, wipeFailed, retireCanceled and
//     wipeCanceled → ENROLLED (the device is still managed); retirePending
//     → RETIRE_PENDING and wipePending → WIPE_PENDING, both retired;
//     retireIssued → RETIRED and wipeIssued → WIPED, both retired;
//     unhealthy → UNHEALTHY; deletePending and discovered → NOT_ENROLLED.
//     Empty means ENROLLED: a managedDevices record exists only for a
//     device Intune manages, and Graph v1.0 does not always return the
//     property (reference §15 marks its presence UNCONFIRMED). A value not
//     in Graph's enumeration gives UNSPECIFIED, so the policy does not
//     count a state it cannot read as enrolled. The value itself is kept
//     in management_state for display.
//   - Retired=true marks the record retired; with no managementState it is
//     also ENROLLMENT_STATE_RETIRED.
//   - operatingSystem, case-insensitive, to Platform: iOS, iPadOS,
//     Android* (AndroidForWork, AndroidEnterprise, ...), Windows* and
//     macOS (also "Mac OS X", "OS X", "macMDM"); empty is UNSPECIFIED,
//     anything else OTHER.
//   - easDeviceId is trimmed of surrounding white space; every other
//     string, including id and userPrincipalName, is kept byte for byte.
//   - lastSyncDateTime is RFC 3339 (fractional seconds of any length), or
//     the same without an offset meaning UTC; empty and Graph's "never"
//     value 0001-01-01T00:00:00Z leave last_check_in unset.
//
// It returns a *RecordError (wrapping ErrInvalidRecord) for a record without
// an id, with an unparsable lastSyncDateTime, with an easDeviceId longer than
// Exchange's 32 characters, or with a string that is not valid UTF-8 (which
// protobuf cannot carry).
func Normalize(source string, m ManagedDevice) (*ev.MDMDevice, error) {
	if source == "" {
		return nil, fmt.Errorf("normalize: %w: source name is empty", ErrConfig)
	}
	fail := func(field, problem string, err error) (*ev.MDMDevice, error) {
		return nil, &RecordError{ID: m.ID, Field: field, Problem: problem, Err: err}
	}
	if strings.TrimSpace(m.ID) == "" {
		return fail("id", "missing", nil)
	}
	for _, f := range []struct{ name, value string }{
		{"id", m.ID}, {"userPrincipalName", m.UserPrincipalName}, {"emailAddress", m.EmailAddress},
		{"easDeviceId", m.EASDeviceID}, {"complianceState", m.ComplianceState},
		{"managementState", m.ManagementState}, {"operatingSystem", m.OperatingSystem},
		{"osVersion", m.OSVersion}, {"model", m.Model}, {"manufacturer", m.Manufacturer},
		{"deviceName", m.DeviceName}, {"azureADDeviceId", m.AzureADDeviceID},
		{"lastSyncDateTime", m.LastSyncDateTime},
	} {
		if !utf8.ValidString(f.value) {
			return fail(f.name, "not valid UTF-8", nil)
		}
	}
	eas := strings.TrimSpace(m.EASDeviceID)
	if n := utf8.RuneCountInString(eas); n > ev.MaxDeviceIDLen {
		return fail("easDeviceId", fmt.Sprintf("%d characters, Exchange allows at most %d", n, ev.MaxDeviceIDLen), nil)
	}
	lastSync, err := parseSyncTime(m.LastSyncDateTime)
	if err != nil {
		return fail("lastSyncDateTime", "not an ISO 8601 date and time", err)
	}

	d := &ev.MDMDevice{
		Source:            source,
		MdmDeviceId:       m.ID,
		UserPrincipalName: m.UserPrincipalName,
		EasDeviceId:       eas,
		ManagementState:   m.ManagementState,
		ComplianceState:   complianceState(m.ComplianceState),
		Platform:          platform(m.OperatingSystem),
		OsVersion:         m.OSVersion,
		Model:             m.Model,
		LastCheckIn:       lastSync,
		DeviceName:        m.DeviceName,
		Manufacturer:      m.Manufacturer,
		EmailAddress:      m.EmailAddress,
		AzureAdDeviceId:   m.AzureADDeviceID,
		EasActivated:      m.EASActivated,
	}
	d.EnrollmentState, d.Retired = enrollment(m.ManagementState, m.Retired != nil && *m.Retired || retireIssued(m.DeviceActionResults))
	return d, nil
}

func complianceState(s string) ev.ComplianceState {
	s = strings.ToLower(strings.TrimSpace(s))
	if s == "" {
		return ev.ComplianceState_COMPLIANCE_STATE_UNSPECIFIED
	}
	if c, ok := complianceStates[s]; ok {
		return c
	}
	return ev.ComplianceState_COMPLIANCE_STATE_UNKNOWN
}

func enrollment(managementState string, retiredFlag bool) (ev.EnrollmentState, bool) {
	s := strings.ToLower(strings.TrimSpace(managementState))
	if s == "" {
		if retiredFlag {
			return ev.EnrollmentState_ENROLLMENT_STATE_RETIRED, true
		}
		return ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false
	}
	m, ok := managementStates[s]
	if !ok {
		return ev.EnrollmentState_ENROLLMENT_STATE_UNSPECIFIED, retiredFlag
	}
	return m.state, m.retired || retiredFlag
}

func platform(operatingSystem string) ev.Platform {
	s := strings.ToLower(strings.TrimSpace(operatingSystem))
	switch {
	case s == "":
		return ev.Platform_PLATFORM_UNSPECIFIED
	case s == "ios":
		return ev.Platform_PLATFORM_IOS
	case s == "ipados":
		return ev.Platform_PLATFORM_IPADOS
	case strings.HasPrefix(s, "android"):
		return ev.Platform_PLATFORM_ANDROID
	case strings.HasPrefix(s, "windows"):
		return ev.Platform_PLATFORM_WINDOWS
	case s == "macos", s == "mac os x", s == "os x", s == "osx", s == "macmdm":
		return ev.Platform_PLATFORM_MACOS
	default:
		return ev.Platform_PLATFORM_OTHER
	}
}

// parseSyncTime parses Graph's lastSyncDateTime; nil means never or unknown.
func parseSyncTime(s string) (*timestamppb.Timestamp, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		for _, layout := range zoneless {
			if u, zerr := time.ParseInLocation(layout, s, time.UTC); zerr == nil {
				t, err = u, nil
				break
			}
		}
	}
	if err != nil {
		return nil, err
	}
	if t.IsZero() || t.Year() <= 1 {
		// Graph reports a device that never synced as 0001-01-01T00:00:00Z.
		return nil, nil
	}
	ts := timestamppb.New(t)
	if err := ts.CheckValid(); err != nil {
		return nil, errors.Join(errors.New("out of range"), err)
	}
	return ts, nil
}
