package exchangesim_test

import (
	"encoding/base64"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// rawRequest sends a request line built by hand (not by EncodeRequest, which
// always writes the envelope) and returns the next frame.
func (w *worker) rawRequest(js string) exchange.Response {
	w.t.Helper()
	if _, err := w.cmd.Stdin.Write([]byte(base64.StdEncoding.EncodeToString([]byte(js)) + "\n")); err != nil {
		w.t.Fatalf("send: %v", err)
	}
	select {
	case r, ok := <-w.frames:
		if !ok {
			w.t.Fatal("worker ended")
		}
		return r
	case <-time.After(30 * time.Second):
		w.t.Fatal("no answer within 30s")
	}
	return exchange.Response{}
}

// Under Set-StrictMode -Version 2.0 the script's unguarded read of a field
// a request lacks is a terminating error; the simulator takes the list of
// such reads from the script's syntax tree (exchange.Contract) and refuses
// the same requests, while fields the script reads through Get-WireField
// may be left out.
func TestStrictModeRefusesWhatTheScriptReadsUnguarded(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	ep := s.Endpoints()[0]
	w := startWorker(t, s, ep, conn{})
	defer w.close()
	for _, tc := range []struct {
		name, js   string
		ok         bool
		id         int64
		wantReason string
		wantText   string
	}{
		{name: "connect without the optional fields the Go side omits when false", ok: true, id: 1,
			js: `{"v":1,"id":1,"op":"connect","mode":"remote","uri":"http://` + ep.FQDN + `/PowerShell/","auth":"Kerberos","user":"` + exchangesim.DefaultUser + `","password":"` + exchangesim.DefaultPassword + `"}`},
		{name: "an invoke without params or select", ok: true, id: 2, js: `{"v":1,"id":2,"op":"invoke","call":{"cmdlet":"Get-ActiveSyncOrganizationSettings"}}`},
		{name: "a call without its cmdlet", id: 3, wantReason: "PropertyNotFoundException", wantText: "The property 'cmdlet' cannot be found on this object",
			js: `{"v":1,"id":3,"op":"invoke","call":{"params":{}}}`},
		{name: "a batch call without its cmdlet", id: 4, wantReason: "PropertyNotFoundException", wantText: "'cmdlet'",
			js: `{"v":1,"id":4,"op":"batch","calls":[{"cmdlet":"Get-ActiveSyncOrganizationSettings"},{"params":{}}]}`},
		{name: "no id", id: 0, wantReason: "ProtocolError", wantText: "The property 'id' cannot be found",
			js: `{"v":1,"op":"ping"}`},
		{name: "no op", id: 6, wantReason: "PropertyNotFoundException", wantText: "The property 'op' cannot be found",
			js: `{"v":1,"id":6}`},
		{name: "connect without a password", id: 7, wantReason: "RuntimeException", wantText: "request field 'password' is required",
			js: `{"v":1,"id":7,"op":"connect","mode":"remote","uri":"http://` + ep.FQDN + `/PowerShell/","auth":"Kerberos","user":"x"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := w.rawRequest(tc.js)
			if r.ID != tc.id || !r.Done || r.OK != tc.ok {
				t.Fatalf("frame %+v, want id %d ok %v", r, tc.id, tc.ok)
			}
			if tc.ok {
				return
			}
			if len(r.Errors) == 0 || r.Errors[0].Reason != tc.wantReason || !strings.Contains(r.Errors[0].Message, tc.wantText) {
				t.Fatalf("errors %+v, want %s with %q", r.Errors, tc.wantReason, tc.wantText)
			}
		})
	}
}

// Every field the script reads unguarded is one the Go side always sends.
func TestContractReadsAreAlwaysSent(t *testing.T) {
	c := exchange.Contract()
	for _, kind := range []string{"request", "call"} {
		sent := exchange.AlwaysSent(kind)
		if len(c.Reads[kind]) == 0 {
			t.Fatalf("the contract lists no unguarded %s reads (the script reads at least the envelope): %+v", kind, c.Reads)
		}
		for _, f := range c.Reads[kind] {
			found := false
			for _, s := range sent {
				found = found || s == f
			}
			if !found {
				t.Errorf("worker.ps1 reads %s.%s unguarded, but the Go side omits it when empty (always sent: %v)", kind, f, sent)
			}
		}
	}
}
