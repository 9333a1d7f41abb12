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

// Remote sessions are counted per user apart from WinRM shells: bye (and
// the end of input) removes one, a killed process leaves it until the idle
// timeout the script asked for, and Exchange refuses a session beyond
// PowerShellMaxConcurrency.
func TestRemoteSessionsAreCountedApartFromShells(t *testing.T) {
	// 0.01: the script's two-minute idle timeout passes in 1.2 s.
	s := startSim(t, exchangesim.Config{MaxSessionsPerUser: 2, SessionTimeScale: 0.01})
	ep := s.Endpoints()[0]
	user := exchangesim.DefaultUser

	a := startWorker(t, s, ep, conn{})
	a.connect(ep)
	b := startWorker(t, s, ep, conn{})
	b.connect(ep)
	if n := s.RemoteSessions(user); n != 2 {
		t.Fatalf("two connected workers hold %d sessions", n)
	}
	c := startWorker(t, s, ep, conn{})
	_, r := c.request(exchange.Request{Op: "connect", Mode: "remote", URI: "http://" + ep.FQDN + "/PowerShell/", Auth: "Kerberos",
		User: user, Password: exchangesim.DefaultPassword})
	if r.OK || len(r.Errors) == 0 || !strings.Contains(r.Errors[0].Message, "maximum of 2 concurrent shells") {
		t.Fatalf("a third session must be refused: %+v", r)
	}
	if _, r := a.request(exchange.Request{Op: "bye"}); !r.OK {
		t.Fatalf("bye: %+v", r)
	}
	if n := s.RemoteSessions(user); n != 1 {
		t.Fatalf("after bye %d sessions, want 1", n)
	}
	// Killing b's process (its shell dropped) leaves its session behind...
	ep.DropShells()
	for _, w := range []*worker{a, b, c} {
		w.cancel() // their shells are gone: stop the clients' receive loops
	}
	if n := s.RemoteSessions(user); n != 1 {
		t.Fatalf("the killed worker's session must stay until its idle timeout; %d sessions", n)
	}
	// ...until the idle timeout.
	deadline := time.Now().Add(10 * time.Second)
	for s.RemoteSessions(user) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the leaked session never expired")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// An app-pool recycle breaks every remote session on the CAS: the next call
// fails and the session turns Broken; from then on the script reports
// SessionBroken without calling, and so does its heartbeat.
func TestRecycleBreaksRemoteSessions(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	ep := s.Endpoints()[0]
	w := startWorker(t, s, ep, conn{})
	defer w.close()
	w.connect(ep)
	w.mustInvoke("Get-ActiveSyncOrganizationSettings", nil)
	if _, r := w.request(exchange.Request{Op: "ping"}); !r.OK {
		t.Fatalf("ping of a healthy session: %+v", r)
	}
	if n := ep.Recycle(); n != 1 {
		t.Fatalf("recycle broke %d sessions", n)
	}
	calls := s.Recorder.Count("cmdlet:Get-ActiveSyncOrganizationSettings")
	_, r := w.invoke("Get-ActiveSyncOrganizationSettings", nil)
	if r.OK || len(r.Errors) != 2 || r.Errors[0].Reason != "PSRemotingTransportException" || r.Errors[1].Reason != "SessionBroken" {
		t.Fatalf("the first call after a recycle: %+v", r.Errors)
	}
	_, r = w.invoke("Get-ActiveSyncOrganizationSettings", nil)
	if r.OK || len(r.Errors) != 1 || r.Errors[0].Reason != "SessionBroken" {
		t.Fatalf("a call on a Broken session: %+v", r.Errors)
	}
	if _, r := w.request(exchange.Request{Op: "ping"}); r.OK || r.Errors[0].Reason != "SessionBroken" {
		t.Fatalf("ping of a broken session: %+v", r)
	}
	if got := s.Recorder.Count("cmdlet:Get-ActiveSyncOrganizationSettings"); got != calls+2 {
		t.Fatalf("recorded %d calls, want %d (the script does not call on a Broken session)", got, calls+2)
	}
}
