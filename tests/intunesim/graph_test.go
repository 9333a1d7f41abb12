package intunesim_test

import (
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/easguard/easguard/tests/intunesim"
)

func TestPagingIsConsistent(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{Extra: 2500})
	c, tok := s.HTTPClient(), token(t, s)
	want := s.Devices()
	if len(want) != 2500 {
		t.Fatalf("%d devices, want 2500", len(want))
	}

	p1 := getPage(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$top=1000&$select=id,easDeviceId", tok)
	if len(p1.Value) != 1000 || !strings.HasPrefix(p1.NextLink, s.URL()+"/v1.0/deviceManagement/managedDevices?") ||
		p1.Context != s.URL()+"/v1.0/$metadata#deviceManagement/managedDevices(id,easDeviceId)" {
		t.Fatalf("first page: %d devices, next %q, context %q", len(p1.Value), p1.NextLink, p1.Context)
	}
	next, err := url.Parse(p1.NextLink)
	if err != nil {
		t.Fatal(err)
	}
	if q := next.Query(); q.Get("$top") != "1000" || q.Get("$select") != "id,easDeviceId" || q.Get("$skiptoken") == "" || !strings.Contains(next.RawQuery, "$skiptoken=") {
		t.Fatalf("nextLink %q does not carry the query options", p1.NextLink)
	}

	all, pages := listAll(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$top=1000", tok)
	if pages != 3 || len(all) != 2500 {
		t.Fatalf("%d pages, %d devices; want 3 and 2500", pages, len(all))
	}
	seen := map[string]bool{}
	for i, d := range all {
		id := d["id"].(string)
		if seen[id] || id != want[i].ID {
			t.Fatalf("device %d: %s (duplicate %v), want %s", i, id, seen[id], want[i].ID)
		}
		seen[id] = true
	}
	if recs := s.Recorder.Records("graph"); recs[len(recs)-1].Page != 3 || recs[len(recs)-1].Items != 500 {
		t.Fatalf("last page record %+v", recs[len(recs)-1])
	}

	// Without $top, the page size is Config.PageSize (1000).
	if _, pages := listAll(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$select=id", tok); pages != 3 {
		t.Fatalf("%d default pages", pages)
	}
	// $top above the maximum is capped; /beta lists the same.
	if p := getPage(t, c, s.URL()+"/beta/deviceManagement/managedDevices?$top=5000&$select=id", tok); len(p.Value) != 1000 || p.NextLink == "" {
		t.Fatalf("$top=5000: %d", len(p.Value))
	}
	// $count.
	if p := getPage(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$top=1&$count=true", tok); p.Count == nil || *p.Count != 2500 {
		t.Fatalf("$count: %v", p.Count)
	}
}

func TestPagingWhileTheListChanges(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{Extra: 2500})
	c, tok := s.HTTPClient(), token(t, s)
	before := s.Devices()
	p1 := getPage(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$top=1000", tok)

	// Meanwhile: one device enrols before the cursor, one after; one on a
	// later page is deleted, one on a later page changes state.
	first, err := s.Enrol(intunesim.Device{ID: "00000000-0000-4000-8000-000000000001", UserPrincipalName: "early@contoso.com", EASDeviceID: "EARLY"})
	if err != nil {
		t.Fatal(err)
	}
	last, err := s.Enrol(intunesim.Device{ID: "ffffffff-ffff-4fff-bfff-ffffffffffff", UserPrincipalName: "late@contoso.com", EASDeviceID: "LATE"})
	if err != nil {
		t.Fatal(err)
	}
	gone, changed := before[2200].ID, before[1500].ID
	if err := s.Delete(gone); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetCompliance(changed, "noncompliant"); err != nil {
		t.Fatal(err)
	}
	rest, _ := listAll(t, c, p1.NextLink, tok)
	all := append(p1.Value, rest...)
	count := map[string]int{}
	state := map[string]string{}
	for _, d := range all {
		count[d["id"].(string)]++
		state[d["id"].(string)] = d["complianceState"].(string)
	}
	for _, d := range before {
		switch {
		case d.ID == gone:
			if count[d.ID] != 0 {
				t.Errorf("deleted device %s listed", d.ID)
			}
		case count[d.ID] != 1:
			t.Errorf("device %s listed %d times", d.ID, count[d.ID])
		}
	}
	if count[first.ID] != 0 || count[last.ID] != 1 || state[changed] != "noncompliant" {
		t.Fatalf("enrolled before the cursor %d, after %d; changed device %q", count[first.ID], count[last.ID], state[changed])
	}
}

func TestSelect(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{Extra: 20})
	c, tok := s.HTTPClient(), token(t, s)
	p := getPage(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$select=id,easDeviceId,complianceState,managementState,userPrincipalName", tok)
	for _, d := range p.Value {
		keys := make([]string, 0, len(d))
		for k := range d {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		if !slices.Equal(keys, []string{"complianceState", "easDeviceId", "id", "managementState", "userPrincipalName"}) {
			t.Fatalf("selected keys %v", keys)
		}
	}
	// Without $select every property is there, in Graph's names.
	full := getPage(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$top=1", tok).Value[0]
	for _, k := range []string{"id", "userId", "deviceName", "managedDeviceOwnerType", "enrolledDateTime", "lastSyncDateTime", "operatingSystem",
		"complianceState", "managementAgent", "osVersion", "easActivated", "easDeviceId", "easActivationDateTime", "azureADRegistered",
		"deviceRegistrationState", "exchangeAccessState", "exchangeAccessStateReason", "emailAddress", "azureADDeviceId", "model",
		"manufacturer", "imei", "userPrincipalName", "userDisplayName", "managementState", "deviceActionResults", "activationLockBypassCode"} {
		if _, ok := full[k]; !ok {
			t.Errorf("property %s missing from %v", k, full)
		}
	}
	r := get(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$select=id,bogusProperty", tok)
	if r.status != http.StatusBadRequest || r.graphCode(t) != "BadRequest" || !strings.Contains(string(r.body), "bogusProperty") {
		t.Fatalf("unknown $select: %d %s", r.status, r.body)
	}
	if r := get(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$top=-1", tok); r.status != 400 {
		t.Fatalf("$top=-1: %d", r.status)
	}
	if r := get(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$skiptoken=xyz", tok); r.status != 400 {
		t.Fatalf("bad $skiptoken: %d", r.status)
	}
	if r := get(t, c, s.GraphURL()+"/deviceManagement/users", tok); r.status != 400 || r.graphCode(t) != "BadRequest" {
		t.Fatalf("unknown segment: %d %s", r.status, r.body)
	}

	// One device, with $select.
	d := s.Devices()[3]
	one := get(t, c, s.GraphURL()+"/deviceManagement/managedDevices/"+d.ID+"?$select=id,easDeviceId", tok)
	m := one.json(t)
	if one.status != 200 || m["id"] != d.ID || m["easDeviceId"] != d.EASDeviceID || len(m) != 3 ||
		m["@odata.context"] != s.URL()+"/v1.0/$metadata#deviceManagement/managedDevices(id,easDeviceId)/$entity" {
		t.Fatalf("GET one: %d %v", one.status, m)
	}
	if r := get(t, c, s.GraphURL()+"/deviceManagement/managedDevices/00000000-0000-4000-8000-00000000dead", tok); r.status != 404 {
		t.Fatalf("missing device: %d", r.status)
	}
}

func TestStrictV1HidesManagementState(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{Extra: 2, StrictV1: true})
	c, tok := s.HTTPClient(), token(t, s)
	if r := get(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$select=id,managementState", tok); r.status != 400 {
		t.Fatalf("v1.0 $select=managementState under StrictV1: %d", r.status)
	}
	if d := getPage(t, c, s.GraphURL()+"/deviceManagement/managedDevices", tok).Value[0]; d["managementState"] != nil {
		t.Fatalf("v1.0 shows managementState: %v", d)
	}
	if d := getPage(t, c, s.URL()+"/beta/deviceManagement/managedDevices?$select=id,managementState", tok).Value[0]; d["managementState"] != "managed" {
		t.Fatalf("beta: %v", d)
	}
}

func TestFilterIsIgnored(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{Extra: 200})
	c, tok := s.HTTPClient(), token(t, s)
	q := url.Values{"$filter": {"complianceState eq 'compliant'"}, "$select": {"id,complianceState"}}
	all, _ := listAll(t, c, s.GraphURL()+"/deviceManagement/managedDevices?"+q.Encode(), tok)
	states := map[string]int{}
	for _, d := range all {
		states[d["complianceState"].(string)]++
	}
	if len(all) != 200 || states["noncompliant"] == 0 {
		t.Fatalf("$filter applied: %d devices, states %v", len(all), states)
	}
	rec := s.Recorder.Records("graph")[0]
	if !strings.Contains(rec.Note, "$filter ignored: complianceState eq 'compliant'") || s.Recorder.Count("note") == 0 {
		t.Fatalf("record %+v", rec)
	}
}

func TestJSONEscaping(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{})
	hostile := "it's\"; $(x) `y` \\ \n\t\u2028 \x01 ü"
	d, err := s.Enrol(intunesim.Device{UserPrincipalName: "q@contoso.com", EASDeviceID: hostile, DeviceName: string([]byte{0xff, 'a'})})
	if err != nil {
		t.Fatal(err)
	}
	r := get(t, s.HTTPClient(), s.GraphURL()+"/deviceManagement/managedDevices/"+d.ID, token(t, s))
	var got intunesim.Device
	if err := json.Unmarshal(r.body, &got); err != nil || got.EASDeviceID != hostile || got.DeviceName != "\ufffda" {
		t.Fatalf("round trip: %v %q %q", err, got.EASDeviceID, got.DeviceName)
	}
	if len(s.DevicesByEASID(strings.ToUpper(hostile))) != 1 {
		t.Fatal("lookup by EAS id is not case-insensitive")
	}
}
