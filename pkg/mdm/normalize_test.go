package mdm

import (
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

func TestNormalizeComplianceState(t *testing.T) {
	tests := []struct {
		in   string
		want ev.ComplianceState
	}{
		{"unknown", ev.ComplianceState_COMPLIANCE_STATE_UNKNOWN},
		{"compliant", ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT},
		{"Compliant", ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT},
		{"noncompliant", ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT},
		{"nonCompliant", ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT},
		{"conflict", ev.ComplianceState_COMPLIANCE_STATE_CONFLICT},
		{"error", ev.ComplianceState_COMPLIANCE_STATE_ERROR},
		{"inGracePeriod", ev.ComplianceState_COMPLIANCE_STATE_IN_GRACE_PERIOD},
		{"INGRACEPERIOD", ev.ComplianceState_COMPLIANCE_STATE_IN_GRACE_PERIOD},
		{"configManager", ev.ComplianceState_COMPLIANCE_STATE_CONFIG_MANAGER},
		{" compliant ", ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT},
		{"", ev.ComplianceState_COMPLIANCE_STATE_UNSPECIFIED},
		{"unknownFutureValue", ev.ComplianceState_COMPLIANCE_STATE_UNKNOWN},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			m := device(1)
			m.ComplianceState = tt.in
			d, err := Normalize("intune", m)
			if err != nil {
				t.Fatal(err)
			}
			if d.GetComplianceState() != tt.want {
				t.Errorf("complianceState %q → %v, want %v", tt.in, d.GetComplianceState(), tt.want)
			}
		})
	}
}

func TestNormalizeManagementState(t *testing.T) {
	yes, no := true, false
	tests := []struct {
		in          string
		retiredFlag *bool
		want        ev.EnrollmentState
		wantRetired bool
	}{
		{"managed", nil, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
		{"Managed", nil, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
		{"retirePending", nil, ev.EnrollmentState_ENROLLMENT_STATE_RETIRE_PENDING, true},
		{"retireFailed", nil, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
		{"wipePending", nil, ev.EnrollmentState_ENROLLMENT_STATE_WIPE_PENDING, true},
		{"wipeFailed", nil, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
		{"unhealthy", nil, ev.EnrollmentState_ENROLLMENT_STATE_UNHEALTHY, false},
		{"deletePending", nil, ev.EnrollmentState_ENROLLMENT_STATE_NOT_ENROLLED, false},
		{"retireIssued", nil, ev.EnrollmentState_ENROLLMENT_STATE_RETIRED, true},
		{"RETIREISSUED", nil, ev.EnrollmentState_ENROLLMENT_STATE_RETIRED, true},
		{"wipeIssued", nil, ev.EnrollmentState_ENROLLMENT_STATE_WIPED, true},
		{"wipeCanceled", nil, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
		{"retireCanceled", nil, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
		{"discovered", nil, ev.EnrollmentState_ENROLLMENT_STATE_NOT_ENROLLED, false},
		{"", nil, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
		{"", &no, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, false},
		{"", &yes, ev.EnrollmentState_ENROLLMENT_STATE_RETIRED, true},
		{"managed", &yes, ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, true},
		{"wipeIssued", &no, ev.EnrollmentState_ENROLLMENT_STATE_WIPED, true},
		{"somethingNew", nil, ev.EnrollmentState_ENROLLMENT_STATE_UNSPECIFIED, false},
	}
	for _, tt := range tests {
		name := tt.in
		if tt.retiredFlag != nil {
			name += map[bool]string{true: "+retired", false: "+notRetired"}[*tt.retiredFlag]
		}
		t.Run(name, func(t *testing.T) {
			m := device(1)
			m.ManagementState = tt.in
			m.Retired = tt.retiredFlag
			d, err := Normalize("intune", m)
			if err != nil {
				t.Fatal(err)
			}
			if d.GetEnrollmentState() != tt.want || d.GetRetired() != tt.wantRetired {
				t.Errorf("managementState %q → %v retired=%v, want %v retired=%v",
					tt.in, d.GetEnrollmentState(), d.GetRetired(), tt.want, tt.wantRetired)
			}
			if d.GetManagementState() != tt.in {
				t.Errorf("management_state = %q, want Graph's word %q kept", d.GetManagementState(), tt.in)
			}
		})
	}
}

func TestNormalizePlatform(t *testing.T) {
	tests := []struct {
		in   string
		want ev.Platform
	}{
		{"iOS", ev.Platform_PLATFORM_IOS},
		{"IOS", ev.Platform_PLATFORM_IOS},
		{"iPadOS", ev.Platform_PLATFORM_IPADOS},
		{"Android", ev.Platform_PLATFORM_ANDROID},
		{"AndroidForWork", ev.Platform_PLATFORM_ANDROID},
		{"AndroidEnterprise", ev.Platform_PLATFORM_ANDROID},
		{"Windows", ev.Platform_PLATFORM_WINDOWS},
		{"WindowsMobile", ev.Platform_PLATFORM_WINDOWS},
		{"macOS", ev.Platform_PLATFORM_MACOS},
		{"Mac OS X", ev.Platform_PLATFORM_MACOS},
		{"Linux", ev.Platform_PLATFORM_OTHER},
		{"ChromeOS", ev.Platform_PLATFORM_OTHER},
		{"", ev.Platform_PLATFORM_UNSPECIFIED},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			m := device(1)
			m.OperatingSystem = tt.in
			d, err := Normalize("intune", m)
			if err != nil {
				t.Fatal(err)
			}
			if d.GetPlatform() != tt.want {
				t.Errorf("operatingSystem %q → %v, want %v", tt.in, d.GetPlatform(), tt.want)
			}
		})
	}
}

func TestNormalizeFields(t *testing.T) {
	m := ManagedDevice{
		ID:                "  id with spaces; Remove-Mailbox -Identity x '$(evil)' ",
		UserPrincipalName: " Jane.Doe@Contoso.com",
		EmailAddress:      "jane@contoso.com",
		EASDeviceID:       "\tApplF17XK0001ABCD \r\n",
		EASActivated:      true,
		ComplianceState:   "compliant",
		ManagementState:   "managed",
		OperatingSystem:   "iOS",
		OSVersion:         "17.4.1",
		Model:             "iPhone 15",
		Manufacturer:      "Apple",
		DeviceName:        "Jane’s iPhone",
		AzureADDeviceID:   "aad-1",
		LastSyncDateTime:  "2025-01-02T03:04:05.1234567Z",
	}
	got, err := Normalize("intune", m)
	if err != nil {
		t.Fatal(err)
	}
	want := &ev.MDMDevice{
		Source:            "intune",
		MdmDeviceId:       m.ID,
		UserPrincipalName: m.UserPrincipalName,
		EasDeviceId:       "ApplF17XK0001ABCD",
		EnrollmentState:   ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED,
		ManagementState:   "managed",
		ComplianceState:   ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT,
		Platform:          ev.Platform_PLATFORM_IOS,
		OsVersion:         "17.4.1",
		Model:             "iPhone 15",
		LastCheckIn:       timestamppb.New(time.Date(2025, 1, 2, 3, 4, 5, 123456700, time.UTC)),
		DeviceName:        "Jane’s iPhone",
		Manufacturer:      "Apple",
		EmailAddress:      "jane@contoso.com",
		AzureAdDeviceId:   "aad-1",
		EasActivated:      true,
	}
	if !proto.Equal(got, want) {
		t.Errorf("Normalize:\n got %v\nwant %v", got, want)
	}
	// The record must also be what the matcher's validation accepts.
	if err := (&ev.MDMDeviceChanged{Org: "o", Device: got, ObservedAt: timestamppb.Now()}).Validate(); err != nil {
		t.Errorf("normalised record fails MDMDeviceChanged validation: %v", err)
	}
}

func TestNormalizeLastSync(t *testing.T) {
	tests := []struct {
		in   string
		want *timestamppb.Timestamp
	}{
		{"2025-01-02T03:04:05Z", timestamppb.New(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC))},
		{"2025-01-02T04:04:05+01:00", timestamppb.New(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC))},
		{"2025-01-02T03:04:05.5Z", timestamppb.New(time.Date(2025, 1, 2, 3, 4, 5, 500000000, time.UTC))},
		{"2025-01-02T03:04:05", timestamppb.New(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC))},
		{"2025-01-02 03:04:05.0000000", timestamppb.New(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC))},
		{"0001-01-01T00:00:00Z", nil},
		{"", nil},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			m := device(1)
			m.LastSyncDateTime = tt.in
			d, err := Normalize("intune", m)
			if err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(d.GetLastCheckIn(), tt.want) {
				t.Errorf("lastSyncDateTime %q → %v, want %v", tt.in, d.GetLastCheckIn(), tt.want)
			}
		})
	}
}

func TestNormalizeErrors(t *testing.T) {
	tests := []struct {
		name      string
		source    string
		edit      func(*ManagedDevice)
		wantField string
		wantIn    string // substring of the message naming the record
		wantIs    error
	}{
		{"missing id", "intune", func(m *ManagedDevice) { m.ID = "" }, "id", "record without id", ErrInvalidRecord},
		{"blank id", "intune", func(m *ManagedDevice) { m.ID = "  " }, "id", `record "  ": field id: missing`, ErrInvalidRecord},
		{"invalid date", "intune", func(m *ManagedDevice) { m.ID = "dev-7"; m.LastSyncDateTime = "yesterday" }, "lastSyncDateTime", `record "dev-7"`, ErrInvalidRecord},
		{"impossible date", "intune", func(m *ManagedDevice) { m.ID = "dev-7"; m.LastSyncDateTime = "2025-02-30T00:00:00Z" }, "lastSyncDateTime", `record "dev-7"`, ErrInvalidRecord},
		{"EAS id of 33 characters", "intune", func(m *ManagedDevice) { m.ID = "dev-8"; m.EASDeviceID = strings.Repeat("A", 33) }, "easDeviceId", `record "dev-8"`, ErrInvalidRecord},
		{"UPN not UTF-8", "intune", func(m *ManagedDevice) { m.ID = "dev-9"; m.UserPrincipalName = "bad\xffupn" }, "userPrincipalName", `record "dev-9"`, ErrInvalidRecord},
		{"no source", "", func(*ManagedDevice) {}, "", "source", ErrConfig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := device(1)
			tt.edit(&m)
			d, err := Normalize(tt.source, m)
			if err == nil {
				t.Fatalf("Normalize accepted the record: %v", d)
			}
			if !errors.Is(err, tt.wantIs) {
				t.Errorf("error %v does not wrap %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.wantIn) {
				t.Errorf("error %q does not name %q", err, tt.wantIn)
			}
			if tt.wantField == "" {
				return
			}
			var re *RecordError
			if !errors.As(err, &re) || re.Field != tt.wantField {
				t.Errorf("error %v: want a RecordError for field %s", err, tt.wantField)
			}
		})
	}
}

func TestNormalizeEASIDLimit(t *testing.T) {
	tests := []struct {
		name string
		eas  string
		ok   bool
	}{
		{"32 ASCII", strings.Repeat("A", 32), true},
		{"32 ASCII with blanks around", "  " + strings.Repeat("A", 32) + "  ", true},
		{"32 multi-byte characters", strings.Repeat("é", 32), true},
		{"33 ASCII", strings.Repeat("A", 33), false},
		{"empty", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := device(1)
			m.EASDeviceID = tt.eas
			_, err := Normalize("intune", m)
			if (err == nil) != tt.ok {
				t.Errorf("Normalize(easDeviceId %q) error = %v, want ok=%v", tt.eas, err, tt.ok)
			}
		})
	}
}
