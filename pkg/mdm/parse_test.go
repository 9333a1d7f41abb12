package mdm

import (
	"errors"
	"strings"
	"testing"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

func TestParseInventory(t *testing.T) {
	bom := string(utf8BOM)
	tests := []struct {
		name    string
		format  string
		data    string
		wantIDs []string
		wantIs  error  // nil: must parse
		wantIn  string // substring of the error
	}{
		{name: "JSON array", format: FormatJSON,
			data:    `[{"id":"a","easDeviceId":"E1"},{"id":"b"}]`,
			wantIDs: []string{"a", "b"}},
		{name: "Graph envelope with OData annotations", format: FormatJSON,
			data:    bom + `{"@odata.context":"https://graph.microsoft.com/v1.0/$metadata#deviceManagement/managedDevices","value":[{"id":"a","imei":"1","complianceState":"compliant"}]}`,
			wantIDs: []string{"a"}},
		{name: "Graph envelope with a next link after the devices", format: FormatJSON,
			data:    `{"value":[{"id":"a"},{"id":"b"}],"@odata.nextLink":{"note":["not","a","string"]}}`,
			wantIDs: []string{"a", "b"}},
		{name: "empty array", format: FormatJSON, data: " [ ] \n", wantIDs: []string{}},
		{name: "BOM then whitespace only", format: FormatJSON, data: bom + " \r\n", wantIs: ErrInvalidInventory, wantIn: "empty"},
		{name: "value null", format: FormatJSON, data: `{"value":null}`, wantIs: ErrInvalidInventory, wantIn: `"value"`},
		{name: "value not an array", format: FormatJSON, data: `{"value":{"id":"a"}}`, wantIs: ErrInvalidInventory, wantIn: "not an array"},
		{name: "two value arrays", format: FormatJSON, data: `{"value":[{"id":"a"}],"value":[{"id":"b"}]}`, wantIs: ErrInvalidInventory, wantIn: "two"},
		{name: "truncated envelope", format: FormatJSON, data: `{"value":[{"id":"a"}]`, wantIs: ErrInvalidInventory},
		{name: "device of the wrong type", format: FormatJSON, data: `[{"id":"a"},{"id":7}]`, wantIs: ErrInvalidInventory, wantIn: "device 1"},
		{name: "empty value", format: FormatJSON, data: `{"value":[]}`, wantIDs: []string{}},
		{name: "empty file", format: FormatJSON, data: " \n", wantIs: ErrInvalidInventory, wantIn: "empty"},
		{name: "truncated JSON", format: FormatJSON, data: `[{"id":"a"},{"id":"b"`, wantIs: ErrInvalidInventory},
		{name: "object without value", format: FormatJSON, data: `{"devices":[]}`, wantIs: ErrInvalidInventory, wantIn: `"value"`},
		{name: "null", format: FormatJSON, data: `null`, wantIs: ErrInvalidInventory},
		{name: "data after the array", format: FormatJSON, data: `[{"id":"a"}] [{"id":"b"}]`, wantIs: ErrInvalidInventory},
		{name: "JSON record without id", format: FormatJSON, data: `[{"id":"a"},{"easDeviceId":"E"}]`, wantIs: ErrInvalidRecord, wantIn: "device 1"},
		{name: "duplicate id", format: FormatJSON, data: `[{"id":"a"},{"id":"a"}]`, wantIs: ErrInvalidInventory, wantIn: `"a"`},
		{name: "CSV with unknown column, header case and BOM", format: FormatCSV,
			data:    bom + "ID,EASDEVICEID,Serial Number,complianceState,retired\r\na,E1,SN1,compliant,\r\nb,E2,SN2,noncompliant,TRUE\r\n",
			wantIDs: []string{"a", "b"}},
		{name: "CSV header only", format: FormatCSV, data: "id,easDeviceId\n", wantIDs: []string{}},
		{name: "CSV empty file", format: FormatCSV, data: "", wantIs: ErrInvalidInventory, wantIn: "no header"},
		{name: "CSV without id column", format: FormatCSV, data: "easDeviceId,complianceState\nE1,compliant\n", wantIs: ErrInvalidInventory, wantIn: "id is missing"},
		{name: "CSV duplicate column", format: FormatCSV, data: "id,easDeviceId,EasDeviceId\na,E1,E2\n", wantIs: ErrInvalidInventory},
		{name: "CSV short row", format: FormatCSV, data: "id,easDeviceId\na,E1\nb\n", wantIs: ErrInvalidInventory},
		{name: "CSV bad boolean", format: FormatCSV, data: "id,easActivated\na,maybe\n", wantIs: ErrInvalidRecord, wantIn: "line 2"},
		{name: "CSV bad date", format: FormatCSV, data: "id,lastSyncDateTime\na,2025-01-01T00:00:00Z\nb,31/12/2024\n", wantIs: ErrInvalidRecord, wantIn: `line 3: record "b": field lastSyncDateTime`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			inv, err := parseInventory("file:x", tt.format, strings.NewReader(tt.data))
			if tt.wantIs != nil {
				if err == nil {
					t.Fatalf("parsed %v, want an error", inv.order)
				}
				if !errors.Is(err, tt.wantIs) {
					t.Errorf("error %v does not wrap %v", err, tt.wantIs)
				}
				if !strings.Contains(err.Error(), tt.wantIn) {
					t.Errorf("error %q does not contain %q", err, tt.wantIn)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(inv.order, ",") != strings.Join(tt.wantIDs, ",") {
				t.Errorf("ids %v, want %v", inv.order, tt.wantIDs)
			}
		})
	}
}

func TestParseCSVFields(t *testing.T) {
	data := "id,userPrincipalName,easDeviceId,easActivated,complianceState,managementState,operatingSystem,retired\n" +
		`"x,1",Jane@Contoso.com," ApplE1 ",yes,inGracePeriod,managed,AndroidForWork,1` + "\n"
	inv, err := parseInventory("file:x", FormatCSV, strings.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	d := inv.byID["x,1"]
	if d == nil {
		t.Fatalf("no record x,1 in %v", inv.order)
	}
	if d.GetUserPrincipalName() != "Jane@Contoso.com" || d.GetEasDeviceId() != "ApplE1" || !d.GetEasActivated() ||
		d.GetComplianceState() != ev.ComplianceState_COMPLIANCE_STATE_IN_GRACE_PERIOD ||
		d.GetPlatform() != ev.Platform_PLATFORM_ANDROID || !d.GetRetired() {
		t.Errorf("CSV record parsed as %v", d)
	}
}
