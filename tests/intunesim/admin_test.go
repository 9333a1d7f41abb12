package intunesim_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/tests/intunesim"
)

func TestAdminRoundTrip(t *testing.T) {
	var clk clock
	s := intunesim.StartTest(t, intunesim.Config{AdminAddr: "127.0.0.1:0", Now: clk.Now})
	admin := s.AdminURL()
	if !strings.HasPrefix(admin, "http://127.0.0.1:") {
		t.Fatalf("admin URL %q", admin)
	}
	hc := &http.Client{Timeout: 10 * time.Second}
	gc, tok := s.HTTPClient(), token(t, s)
	graph := func(id string) map[string]any {
		t.Helper()
		r := get(t, gc, s.GraphURL()+"/deviceManagement/managedDevices/"+id, tok)
		if r.status != 200 {
			t.Fatalf("Graph GET %s: %d %s", id, r.status, r.body)
		}
		return r.json(t)
	}
	post := func(path, body string) response {
		t.Helper()
		return do(t, hc, http.MethodPost, admin+path, "", strings.NewReader(body), "application/json")
	}

	// Enrol.
	r := post("/api/devices", `{"userPrincipalName":"anna@contoso.com","easDeviceId":"ApplABC123","complianceState":"noncompliant","operatingSystem":"iOS","osVersion":"17.4"}`)
	if r.status != http.StatusCreated {
		t.Fatalf("enrol: %d %s", r.status, r.body)
	}
	var d intunesim.Device
	if err := json.Unmarshal(r.body, &d); err != nil || d.ID == "" || !d.EASActivated || d.EmailAddress != "anna@contoso.com" || d.ManagementState != "managed" {
		t.Fatalf("enrolled %+v (%v)", d, err)
	}
	g := graph(d.ID)
	if g["easDeviceId"] != "ApplABC123" || g["complianceState"] != "noncompliant" || g["userPrincipalName"] != "anna@contoso.com" {
		t.Fatalf("Graph shows %v", g)
	}
	synced := g["lastSyncDateTime"].(string)

	// Compliance changes; lastSyncDateTime moves.
	clk.Advance(time.Minute)
	if r := post("/api/devices/"+d.ID+"/compliance", `{"state":"compliant"}`); r.status != 200 {
		t.Fatalf("compliance: %d %s", r.status, r.body)
	}
	g = graph(d.ID)
	if g["complianceState"] != "compliant" || g["lastSyncDateTime"] == synced {
		t.Fatalf("after compliance: %v", g)
	}
	if r := post("/api/devices/"+d.ID+"/compliance", `{"state":"sort-of"}`); r.status != 400 {
		t.Fatalf("bad state: %d", r.status)
	}

	// Retire.
	if r := post("/api/devices/"+d.ID+"/retire", ``); r.status != 200 {
		t.Fatalf("retire: %d %s", r.status, r.body)
	}
	g = graph(d.ID)
	if g["managementState"] != "retireIssued" || len(g["deviceActionResults"].([]any)) != 1 {
		t.Fatalf("after retire: %v", g)
	}

	// Patch: the EAS id shows up later (and is found by it).
	r = do(t, hc, http.MethodPatch, admin+"/api/devices/"+d.ID, "", strings.NewReader(`{"easDeviceId":"ApplXYZ789"}`), "application/json")
	if r.status != 200 || len(s.DevicesByEASID("applxyz789")) != 1 || len(s.DevicesByEASID("ApplABC123")) != 0 {
		t.Fatalf("patch: %d %s", r.status, r.body)
	}
	var listed []intunesim.Device
	if err := json.Unmarshal(get(t, hc, admin+"/api/devices?easDeviceId=APPLXYZ789", "").body, &listed); err != nil || len(listed) != 1 || listed[0].ID != d.ID {
		t.Fatalf("list by EAS id: %+v %v", listed, err)
	}
	if r := do(t, hc, http.MethodPatch, admin+"/api/devices/"+d.ID, "", strings.NewReader(`{"id":"00000000-0000-4000-8000-000000000000"}`), ""); r.status != 400 {
		t.Fatalf("id change: %d", r.status)
	}

	// Faults through the admin API.
	if r := post("/api/faults", `{"kind":"throttle","count":1,"retry_after":2}`); r.status != 200 {
		t.Fatalf("fault: %d %s", r.status, r.body)
	}
	if r := get(t, gc, s.GraphURL()+"/deviceManagement/managedDevices", tok); r.status != 429 || r.header.Get("Retry-After") != "2" {
		t.Fatalf("throttled: %d", r.status)
	}
	if r := post("/api/faults", `{"kind":"nonsense"}`); r.status != 400 {
		t.Fatalf("bad fault: %d", r.status)
	}

	// The recorded requests.
	var reqs struct {
		Counts       map[string]int     `json:"counts"`
		TokensIssued int                `json:"tokens_issued"`
		Records      []intunesim.Record `json:"records"`
	}
	if err := json.Unmarshal(get(t, hc, admin+"/api/requests?kind=graph", "").body, &reqs); err != nil {
		t.Fatal(err)
	}
	last := reqs.Records[len(reqs.Records)-1]
	if reqs.TokensIssued != 1 || reqs.Counts["graph:429"] != 1 || last.Status != 429 || last.RetryAfter != "2" || last.Method != "GET" ||
		last.Path != "/v1.0/deviceManagement/managedDevices" || last.Time.IsZero() {
		t.Fatalf("requests: %+v", reqs)
	}

	// Delete.
	if r := do(t, hc, http.MethodDelete, admin+"/api/devices/"+d.ID, "", nil, ""); r.status != http.StatusNoContent {
		t.Fatalf("delete: %d", r.status)
	}
	if r := get(t, gc, s.GraphURL()+"/deviceManagement/managedDevices/"+d.ID, tok); r.status != 404 {
		t.Fatalf("deleted device: %d", r.status)
	}
	if r := do(t, hc, http.MethodDelete, admin+"/api/devices/"+d.ID, "", nil, ""); r.status != 404 {
		t.Fatalf("delete twice: %d", r.status)
	}

	// Info, and token revocation.
	var info map[string]any
	if err := json.Unmarshal(get(t, hc, admin+"/api/info", "").body, &info); err != nil || info["tenant"] != s.Tenant() || info["graph"] != s.GraphURL() {
		t.Fatalf("info %v %v", info, err)
	}
	if r := post("/api/tokens/expire", ``); r.status != 200 {
		t.Fatalf("expire: %d", r.status)
	}
	if r := get(t, gc, s.GraphURL()+"/deviceManagement/managedDevices", tok); r.status != 401 {
		t.Fatalf("after expiry: %d", r.status)
	}
	// A misspelt property is refused rather than dropped.
	if r := post("/api/devices", `{"userPrincipalName":"c@contoso.com","easId":"X"}`); r.status != 400 {
		t.Fatalf("misspelt property: %d %s", r.status, r.body)
	}
	// A duplicate id is a conflict.
	body := `{"id":"0f0f0f0f-0000-4000-8000-000000000001","userPrincipalName":"b@contoso.com"}`
	if r := post("/api/devices", body); r.status != 201 {
		t.Fatalf("enrol with id: %d %s", r.status, r.body)
	}
	if r := post("/api/devices", body); r.status != http.StatusConflict {
		t.Fatalf("duplicate: %d", r.status)
	}
}

func TestEnv(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{})
	env := strings.Join(s.Env("sec", "/tmp/ca.pem"), "\n")
	for _, want := range []string{
		"EASGUARD_MDM_GRAPH_TENANT=" + intunesim.DefaultTenant, "EASGUARD_MDM_GRAPH_CLIENT_ID=" + intunesim.DefaultClientID,
		"EASGUARD_MDM_GRAPH_CLIENT_SECRET=sec", "EASGUARD_MDM_GRAPH_AUTHORITY=" + s.URL(), "EASGUARD_MDM_GRAPH_URL=" + s.URL() + "/v1.0",
		"EASGUARD_MDM_GRAPH_CA_BUNDLE=/tmp/ca.pem",
	} {
		if !strings.Contains(env, want+"\n") && !strings.HasSuffix(env, want) {
			t.Errorf("Env lacks %q:\n%s", want, env)
		}
	}
	if strings.Contains(strings.Join(s.Env("", ""), "\n"), "SECRET") {
		t.Error("Env without a secret still has the line")
	}
}
