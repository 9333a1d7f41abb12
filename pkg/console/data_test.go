package console_test

import (
	"bufio"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/console"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// hostileID is a device id a phone could send: it must stay data in
// subjects, keys, pages and exports.
const hostileID = `=cmd|'/c calc'!A1"><script>x</script>.*>`

func partnership(user, id, model string, state ev.DeviceAccessState) *ev.EASPartnership {
	return &ev.EASPartnership{Mailbox: &ev.Mailbox{Identity: user, PrimarySmtpAddress: user, UserPrincipalName: user},
		DeviceId: id, DeviceType: "iPhone", DeviceModel: model, DeviceAccessState: state, Guid: "guid-" + strings.ToLower(strings.NewReplacer(".", "", "*", "", ">", "").Replace(id))}
}

// record stores the evaluator's record of a partnership as the evaluator would.
func (f *fixture) record(t testing.TB, p *ev.EASPartnership, desired ev.DesiredAccess, rule string, mdm *ev.MDMDevice, held bool) {
	t.Helper()
	kv, err := f.js.KeyValue(t.Context(), bus.BucketDecisions)
	if err != nil {
		t.Fatal(err)
	}
	m := &ev.DeviceMatched{Org: org, Observed: &ev.EASPartnershipObserved{Org: org, Partnership: p}, Mdm: mdm}
	if mdm != nil {
		m.Method = ev.MatchMethod_MATCH_METHOD_EAS_DEVICE_ID_AND_USER
	} else {
		m.NoMatchReason, m.Detail = ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD, "no MDM record has this EAS device id"
	}
	rec := &ev.DecisionRecord{Desired: desired, Rule: rule, DecidedAt: timestamppb.Now(), LastMatched: m, Held: held,
		Traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
	key, err := bus.StateKey(org, p.GetDeviceId(), ev.PartnershipID(p))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := proto.Marshal(rec)
	if _, err := kv.Put(t.Context(), key, b); err != nil {
		t.Fatal(err)
	}
}

func compliantRecord(user, id string) *ev.MDMDevice {
	return &ev.MDMDevice{Source: "file", MdmDeviceId: "mdm-" + id, UserPrincipalName: user, EasDeviceId: id,
		EnrollmentState: ev.EnrollmentState_ENROLLMENT_STATE_ENROLLED, ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT, Platform: ev.Platform_PLATFORM_IOS}
}

// TestDevicesSearchFilterAndPage lists partnerships from the decision
// records: search, state filter, pages, and a hostile device id kept as
// data on the page.
func TestDevicesSearchFilterAndPage(t *testing.T) {
	f := start(t, nil)
	for i := range 120 {
		user := fmt.Sprintf("user%03d@contoso.com", i)
		id := fmt.Sprintf("ApplDEV%05d", i)
		if i%3 == 0 {
			f.record(t, partnership(user, id, "iPhone15,2", ev.DeviceAccessState_DEVICE_ACCESS_STATE_BLOCKED), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, "unknown_device", nil, false)
		} else {
			f.record(t, partnership(user, id, "iPhone16,1", ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED), ev.DesiredAccess_DESIRED_ACCESS_ALLOW, "compliant", compliantRecord(user, id), false)
		}
	}
	f.record(t, partnership("mallory@contoso.com", hostileID, "Evil", ev.DeviceAccessState_DEVICE_ACCESS_STATE_QUARANTINED), ev.DesiredAccess_DESIRED_ACCESS_BLOCK, "unknown_device", nil, true)
	var page console.DevicesView
	natstest.Eventually(t, 10*time.Second, "121 partnerships indexed", func() bool {
		f.api(t, "GET", "/orgs/"+org+"/devices", "viewer", nil, &page)
		return page.Total == 121
	})
	if page.Counts["Blocked"] != 40 || page.Counts["Allowed"] != 80 || page.Counts["Quarantined"] != 1 || len(page.Devices) != 50 || page.Pages != 3 {
		t.Errorf("first page: counts %v, %d devices, %d pages", page.Counts, len(page.Devices), page.Pages)
	}
	cases := []struct {
		query url.Values
		total int
		first string
	}{
		{url.Values{"q": {"USER007"}}, 1, "ApplDEV00007"},
		{url.Values{"q": {"iphone15"}}, 40, "ApplDEV00000"},
		{url.Values{"state": {"Blocked"}, "page": {"2"}, "size": {"10"}}, 40, "ApplDEV00030"},
		{url.Values{"state": {"held"}}, 1, hostileID},
		{url.Values{"state": {"unmatched"}, "q": {"mallory"}}, 1, hostileID},
		{url.Values{"q": {"<script>"}}, 1, hostileID},
	}
	for _, tc := range cases {
		t.Run(tc.query.Encode(), func(t *testing.T) {
			var p console.DevicesView
			f.api(t, "GET", "/orgs/"+org+"/devices?"+tc.query.Encode(), "viewer", nil, &p)
			if p.Total != tc.total || len(p.Devices) == 0 || p.Devices[0].DeviceID != tc.first {
				t.Errorf("total %d, first %v", p.Total, p.Devices)
			}
		})
	}
	c := browser(t)
	f.signIn(t, c, "vera", "easguard-viewers")
	_, html := get(t, c, f.url+"/orgs/"+org+"/devices?q=mallory")
	if strings.Contains(html, "<script>x</script>") || !strings.Contains(html, "&lt;script&gt;x&lt;/script&gt;") {
		t.Errorf("the hostile device id is not escaped on the page:\n%s", html)
	}
}

// TestDeviceHistory shows a device's journey in order, the cmdlet as it
// was sent, the operator's actions on it, and the link to its trace.
func TestDeviceHistory(t *testing.T) {
	f := start(t, nil)
	p := partnership("alice@contoso.com", hostileID, "iPhone16,1", ev.DeviceAccessState_DEVICE_ACCESS_STATE_QUARANTINED)
	f.record(t, p, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, "unknown_device", nil, false)
	at := time.Now()
	publish := func(family bus.Event, msg proto.Message) {
		t.Helper()
		subject, err := family.Subject(org, hostileID)
		if err != nil {
			t.Fatal(err)
		}
		at = at.Add(time.Millisecond)
		if _, err := f.pub.Publish(t.Context(), bus.Outbound{Subject: subject, MsgID: fmt.Sprint(family.Name(), at.UnixNano()), Message: msg}); err != nil {
			t.Fatal(err)
		}
	}
	publish(bus.EASObserved, &ev.EASPartnershipObserved{Org: org, Partnership: p, Change: ev.ObservationChange_OBSERVATION_CHANGE_NEW, Sync: &ev.SyncRef{SyncId: "q1", Kind: ev.SyncKind_SYNC_KIND_QUICK}, ObservedAt: timestamppb.Now()})
	publish(bus.DeviceMatched, &ev.DeviceMatched{Org: org, Observed: &ev.EASPartnershipObserved{Org: org, Partnership: p}, NoMatchReason: ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD, Detail: "no MDM record", Trigger: "eas"})
	publish(bus.AccessDecided, &ev.AccessDecided{Org: org, DecisionId: "d1", Partnership: p, Desired: ev.DesiredAccess_DESIRED_ACCESS_BLOCK, Rule: "unknown_device", Reason: "not enrolled", PolicyVersion: "v1", DecidedAt: timestamppb.Now()})
	publish(bus.AccessApplied, &ev.AccessApplied{Org: org, CasServer: "cas1.contoso.com", Actor: "svc-easguard", Cmdlets: []*ev.CmdletInvocation{{Name: "Set-CASMailbox",
		Parameters: []*ev.CmdletParameter{{Name: "Identity", Values: []string{"alice@contoso.com"}}, {Name: "ActiveSyncBlockedDeviceIDs", Values: []string{hostileID}, Operation: "Add"}}, Duration: durationpb.New(40 * time.Millisecond)}},
		Items: []*ev.AppliedItem{{DeviceId: hostileID, Desired: ev.DesiredAccess_DESIRED_ACCESS_BLOCK, Outcome: ev.ApplyOutcome_APPLY_OUTCOME_APPLIED}}})
	publish(bus.NotifySent, &ev.NotificationSent{Org: org, Recipient: "alice@contoso.com", Template: "not_enrolled", Locale: "en", MessageId: "<m1@easguard>", DeviceId: hostileID})
	a, err := bus.AuditOutbound(org, "device-rejudge", "olga", "192.0.2.1", hostileID, "done: 1 partnerships", nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.pub.Publish(t.Context(), a); err != nil {
		t.Fatal(err)
	}
	var d console.DeviceView
	natstest.Eventually(t, 10*time.Second, "the device indexed", func() bool {
		return f.api(t, "GET", "/orgs/"+org+"/devices/"+url.PathEscape(hostileID), "viewer", nil, &d) == 200 && len(d.Partnerships) == 1
	})
	var kinds []string
	for _, s := range d.History {
		kinds = append(kinds, s.Kind)
	}
	if got := strings.Join(kinds, ","); got != "observed,matched,decided,applied,mail,operator" {
		t.Fatalf("history %s: %+v", got, d.History)
	}
	applied := d.History[3]
	if want := `Set-CASMailbox -Identity 'alice@contoso.com' -ActiveSyncBlockedDeviceIDs @{Add='` + strings.ReplaceAll(hostileID, "'", "''") + `'}`; len(applied.Details) == 0 || applied.Details[0] != want {
		t.Errorf("cmdlet as sent: %q, want %q", applied.Details, want)
	}
	if !strings.Contains(d.History[5].Summary, "device-rejudge by olga") {
		t.Errorf("operator action: %+v", d.History[5])
	}
	c := browser(t)
	f.signIn(t, c, "vera", "easguard-viewers")
	_, html := get(t, c, f.url+"/orgs/"+org+"/devices/"+url.PathEscape(hostileID))
	if !strings.Contains(html, "http://jaeger.test/trace/0af7651916cd43dd8448eb211c80319c") || strings.Contains(html, "<script>x") {
		t.Errorf("device page: trace link missing or device id not escaped:\n%s", html)
	}
	if code := f.api(t, "GET", "/orgs/"+org+"/devices/ApplNOSUCHDEVICE", "viewer", nil, nil); code != http.StatusNotFound {
		t.Errorf("unknown device: %d", code)
	}
}

// TestSyncOneOfAKindAtATime asks for syncs: the request reaches the
// collector's subject with who asked, a second of the same kind waits
// for the first's report, and every attempt is audited and exportable.
func TestSyncOneOfAKindAtATime(t *testing.T) {
	f := start(t, nil)
	// The requests' stream is a work queue the collector consumes: the
	// test listens on the subject, as any NATS client may.
	requests, err := f.nc.SubscribeSync("easguard." + org + ".sync.requested")
	if err != nil {
		t.Fatal(err)
	}
	var first console.Outcome
	if code := f.api(t, "POST", "/orgs/"+org+"/sync", "operator", url.Values{"kind": {"full"}, "reason": {"new CAS"}}, &first); code != 200 || first.ID == "" {
		t.Fatalf("first full sync: %d %+v", code, first)
	}
	msg, err := requests.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var got ev.SyncRequested
	if err := proto.Unmarshal(msg.Data, &got); err != nil {
		t.Fatal(err)
	}
	if got.GetSyncId() != first.ID || got.GetKind() != ev.SyncKind_SYNC_KIND_FULL || got.GetRequestedBy() != "token:ci-operator" || got.GetReason() != "new CAS" {
		t.Errorf("request on the bus: %v", &got)
	}
	var refusal map[string]string
	if code := f.api(t, "POST", "/orgs/"+org+"/sync", "operator", url.Values{"kind": {"full"}}, &refusal); code != http.StatusConflict || !strings.Contains(refusal["error"], "still running") {
		t.Errorf("second full sync while the first runs: %d %v", code, refusal)
	}
	if code := f.api(t, "POST", "/orgs/"+org+"/sync", "operator", url.Values{"kind": {"quick"}}, nil); code != 200 {
		t.Errorf("a quick sync beside the full one: %d", code)
	}
	// The collector reports the first: the next may go.
	kv, _ := f.js.KeyValue(t.Context(), bus.BucketStatus)
	if err := status.Put(t.Context(), kv, org, status.SyncLastKey("full"), status.Sync{SyncID: first.ID, Kind: "full", Success: true, StartedAt: time.Now(), FinishedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if code := f.api(t, "POST", "/orgs/"+org+"/sync", "operator", url.Values{"kind": {"full"}}, nil); code != 200 {
		t.Errorf("full sync after the first finished: %d", code)
	}
	if code := f.api(t, "POST", "/orgs/"+org+"/sync", "operator", url.Values{"kind": {"hourly"}}, nil); code != http.StatusBadRequest {
		t.Errorf("unknown kind: %d", code)
	}

	t.Run("audit as JSON lines", func(t *testing.T) {
		var entries []map[string]any
		natstest.Eventually(t, 10*time.Second, "four sync audits", func() bool {
			entries = nil
			b := f.raw(t, "/orgs/"+org+"/audit", "viewer")
			sc := bufio.NewScanner(strings.NewReader(b))
			for sc.Scan() {
				var e map[string]any
				if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
					t.Fatalf("line %q: %v", sc.Text(), err)
				}
				entries = append(entries, e)
			}
			return len(entries) == 4
		})
		if entries[1]["outcome"] != "refused: "+first.ID+" is still running" || entries[0]["actor"] != "token:ci-operator" || entries[0]["target"] != "full" {
			t.Errorf("audit entries %v", entries)
		}
	})
	t.Run("audit as CSV", func(t *testing.T) {
		a, _ := bus.AuditOutbound(org, "device-wipe", "olga", "192.0.2.1", hostileID, "refused: not enabled", nil, time.Now())
		if _, err := f.pub.Publish(t.Context(), a); err != nil {
			t.Fatal(err)
		}
		var rows [][]string
		natstest.Eventually(t, 10*time.Second, "five audits in CSV", func() bool {
			var err error
			rows, err = csv.NewReader(strings.NewReader(f.raw(t, "/orgs/"+org+"/audit?format=csv", "viewer"))).ReadAll()
			return err == nil && len(rows) == 6
		})
		if rows[0][0] != "at" || rows[5][1] != "device-wipe" || rows[5][4] != "'"+hostileID {
			t.Errorf("CSV: the header or the hostile target (kept as text, not a formula): %q", rows)
		}
	})
}

// TestDeadLetterReplayAndDiscard replays a dead letter to where it came
// from and discards another only once confirmed; both are audited.
func TestDeadLetterReplayAndDiscard(t *testing.T) {
	f := start(t, nil)
	orig := "easguard." + org + ".eas.observed.appldlq0001"
	for i := range 2 {
		b, _ := proto.Marshal(&ev.EASPartnershipObserved{Org: org, Partnership: partnership("a@contoso.com", "ApplDLQ0001", "x", 0)})
		m := &nats.Msg{Subject: "easguard." + org + ".dlq.matcher", Data: b, Header: nats.Header{}}
		m.Header.Set(bus.HeaderType, "easguard.v1.EASPartnershipObserved")
		m.Header.Set(bus.HeaderDLQSubject, orig)
		m.Header.Set(bus.HeaderDLQReason, fmt.Sprintf("poison %d", i))
		if _, err := f.js.PublishMsg(t.Context(), m); err != nil {
			t.Fatal(err)
		}
	}
	var dls []console.DeadLetter
	if f.api(t, "GET", "/orgs/"+org+"/deadletters", "viewer", nil, &dls); len(dls) != 2 || dls[0].Subject != orig || dls[0].Reason != "poison 1" {
		t.Fatalf("dead letters %+v", dls)
	}
	replayed := natstest.Receive[ev.EASPartnershipObserved](t, f.js, bus.StreamEAS, orig)
	if code := f.api(t, "POST", fmt.Sprintf("/orgs/%s/deadletters/%d/replay", org, dls[1].Seq), "operator", url.Values{}, nil); code != 200 {
		t.Fatalf("replay: %d", code)
	}
	replayed.AwaitLen(t, 10*time.Second, 1)
	path := fmt.Sprintf("/orgs/%s/deadletters/%d/discard", org, dls[0].Seq)
	if code := f.api(t, "POST", path, "operator", url.Values{}, nil); code != http.StatusPreconditionRequired {
		t.Errorf("discard without confirmation: %d", code)
	}
	if code := f.api(t, "POST", path, "viewer", url.Values{"confirm": {"yes"}}, nil); code != http.StatusForbidden {
		t.Errorf("discard as a viewer: %d", code)
	}
	if code := f.api(t, "POST", path, "operator", url.Values{"confirm": {"yes"}}, nil); code != 200 {
		t.Errorf("discard: %d", code)
	}
	if f.api(t, "GET", "/orgs/"+org+"/deadletters", "viewer", nil, &dls); len(dls) != 0 {
		t.Errorf("left: %+v", dls)
	}
	audit := f.raw(t, "/orgs/"+org+"/audit", "viewer")
	if !strings.Contains(audit, `"action":"deadletter-replay"`) || !strings.Contains(audit, `"action":"deadletter-discard"`) {
		t.Errorf("audit: %s", audit)
	}
}

// TestPolicyPreview judges the partnerships with a candidate policy in
// dry run: counts and the partnerships it would decide otherwise; a
// broken policy is shown with its problem, nothing changes either way.
func TestPolicyPreview(t *testing.T) {
	f := start(t, nil)
	for i := range 10 {
		user := fmt.Sprintf("user%d@contoso.com", i)
		id := fmt.Sprintf("ApplPRE%04d", i)
		var mdm *ev.MDMDevice
		if i < 7 {
			mdm = compliantRecord(user, id)
		}
		f.record(t, partnership(user, id, "iPhone", ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED), ev.DesiredAccess_DESIRED_ACCESS_ALLOW, "compliant", mdm, false)
	}
	decisions := natstest.Receive[ev.AccessDecided](t, f.js, bus.StreamDecisions, "easguard."+org+".access.decided.>")
	var p console.Preview
	code := f.api(t, "POST", "/orgs/"+org+"/policy/preview", "operator", url.Values{"policy": {"version: 1\norg: contoso\n"}}, &p)
	if code != 200 || p.Partnerships != 10 || p.Counts["Allow"] != 7 || len(p.Changes) != 3 || p.Changes[0].Now != "Allow" {
		t.Fatalf("preview: %d %+v", code, p)
	}
	if code := f.api(t, "POST", "/orgs/"+org+"/policy/preview", "operator", url.Values{"policy": {"version: 1\norg: contoso\nunknown_key: 1\n"}}, nil); code != http.StatusUnprocessableEntity {
		t.Errorf("broken policy: %d", code)
	}
	if decisions.Len() != 0 {
		t.Errorf("a preview published decisions: %v", decisions.All())
	}
}
