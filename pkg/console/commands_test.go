package console_test

import (
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/easguard/easguard/pkg/console"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// TestDeviceCommands asks for a wipe, a removal and a new judgement: each
// needs its role, a wipe or removal a reason and a confirmation, and the
// command reaches its worker's subject naming the partnership and who
// asked; a double click is one command.
func TestDeviceCommands(t *testing.T) {
	f := start(t, nil)
	p := partnership("alice@contoso.com", "ApplWIPE0001", "iPhone", ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED)
	f.record(t, p, ev.DesiredAccess_DESIRED_ACCESS_ALLOW, "compliant", compliantRecord("alice@contoso.com", "ApplWIPE0001"), false)
	natstest.Eventually(t, 10*time.Second, "the device indexed", func() bool {
		return f.api(t, "GET", "/orgs/"+org+"/devices/ApplWIPE0001", "viewer", nil, nil) == 200
	})
	commands, err := f.nc.SubscribeSync("easguard." + org + ".device.>")
	if err != nil {
		t.Fatal(err)
	}
	path := func(action string) string { return "/orgs/" + org + "/devices/ApplWIPE0001/" + action }
	cases := []struct {
		name, action, role string
		form               url.Values
		want               int
	}{
		{"wipe as operator", "wipe", "operator", url.Values{"reason": {"stolen"}, "confirm": {"yes"}}, http.StatusForbidden},
		{"wipe without reason", "wipe", "device-admin", url.Values{"confirm": {"yes"}}, http.StatusBadRequest},
		{"wipe unconfirmed", "wipe", "device-admin", url.Values{"reason": {"stolen"}}, http.StatusPreconditionRequired},
		{"wipe of another partnership", "wipe", "device-admin", url.Values{"reason": {"stolen"}, "confirm": {"yes"}, "partnership": {"guid-other"}}, http.StatusNotFound},
		{"wipe", "wipe", "device-admin", url.Values{"reason": {"stolen"}, "confirm": {"yes"}}, http.StatusOK},
		{"rejudge as viewer", "rejudge", "viewer", url.Values{}, http.StatusForbidden},
		{"rejudge", "rejudge", "operator", url.Values{}, http.StatusOK},
		{"remove", "remove", "device-admin", url.Values{"reason": {"left the company"}, "confirm": {"yes"}}, http.StatusOK},
	}
	var wiped time.Time
	for _, tc := range cases {
		if tc.name == "wipe" {
			wiped = time.Now()
		}
		t.Run(tc.name, func(t *testing.T) {
			var out map[string]any
			if code := f.api(t, "POST", path(tc.action), tc.role, tc.form, &out); code != tc.want {
				t.Fatalf("%d %v, want %d", code, out, tc.want)
			}
		})
	}
	var got []string
	for range 3 {
		m, err := commands.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var c ev.DeviceCommand
		if err := proto.Unmarshal(m.Data, &c); err != nil {
			t.Fatal(err)
		}
		if c.GetDeviceId() != "ApplWIPE0001" || c.GetRequestedBy() == "" {
			t.Errorf("command %v", &c)
		}
		got = append(got, c.GetAction()+" "+c.GetPartnershipId()+" by "+c.GetRequestedBy())
	}
	want := "wipe guid-applwipe0001 by token:ci-device-admin,rejudge  by token:ci-operator,remove guid-applwipe0001 by token:ci-device-admin"
	if strings.Join(got, ",") != want {
		t.Errorf("commands\n%s\nwant\n%s", strings.Join(got, ","), want)
	}
	// The same command within its repeat window is the same command (the
	// window is a minute of the clock: a second that crossed into the
	// next minute is a new command, by design).
	var again console.Outcome
	code := f.api(t, "POST", path("wipe"), "device-admin", url.Values{"reason": {"stolen"}, "confirm": {"yes"}}, &again)
	sameWindow := wiped.Truncate(time.Minute).Equal(time.Now().Truncate(time.Minute))
	if code != 200 || sameWindow && !strings.Contains(again.Done, "already asked for") {
		t.Errorf("a double click: %d %+v", code, again)
	}
}
