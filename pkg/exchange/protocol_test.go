package exchange_test

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/easguard/easguard/pkg/exchange"
)

// cmd.exe refuses command lines over 8191 characters; WinRS runs the
// bootstrap through it.
func TestCommandLineFitsCmdExe(t *testing.T) {
	cl := exchange.CommandLine()
	if len(cl) > 8191 {
		t.Fatalf("command line has %d characters", len(cl))
	}
	if !strings.Contains(exchange.Bootstrap(), exchange.WorkerScriptSHA256()) || strings.Contains(exchange.Bootstrap(), "@@") {
		t.Fatal("bootstrap does not embed the script's hash")
	}
}

// Every cmdlet on the Go side's list is on the script's allow-list, and
// the other way round.
func TestAllowListMatchesScript(t *testing.T) {
	script := string(exchange.WorkerScript())
	start := strings.Index(script, "foreach ($name in @(")
	end := strings.Index(script[start:], ")) {")
	if start < 0 || end < 0 {
		t.Fatal("allow-list not found in worker.ps1")
	}
	block := script[start : start+end]
	for _, c := range exchange.AllowedCmdlets {
		if !strings.Contains(block, "'"+c+"'") {
			t.Errorf("%s is not on the script's allow-list", c)
		}
	}
	if n := strings.Count(block, "'"); n != 2*len(exchange.AllowedCmdlets) {
		t.Errorf("the script lists %d cmdlets, Go %d", n/2, len(exchange.AllowedCmdlets))
	}
}

func TestFrameRoundTrip(t *testing.T) {
	req := exchange.Request{ID: 7, Op: "invoke", Call: &exchange.Call{Cmdlet: "Set-CASMailbox", Params: exchange.Params{
		"Identity": "o'brien@contoso.com", "ActiveSyncAllowedDeviceIDs": exchange.MultiValued{Add: []string{"$(x)", "a\u2019b"}}, "Confirm": false,
	}}}
	line, err := exchange.EncodeRequest(req)
	if err != nil {
		t.Fatal(err)
	}
	if strings.ContainsAny(strings.TrimSuffix(string(line), "\n"), "\n\r'\"$") {
		t.Fatalf("request line is not plain base64: %q", line)
	}
	got, err := exchange.DecodeRequest(line)
	if err != nil || got.V != exchange.ProtocolVersion || got.Call.Params["Identity"] != "o'brien@contoso.com" {
		t.Fatalf("%+v %v", got, err)
	}
	add := got.Call.Params["ActiveSyncAllowedDeviceIDs"].(map[string]any)["Add"].([]any)
	if add[0] != "$(x)" || add[1] != "a\u2019b" {
		t.Fatalf("values changed: %q", add)
	}
	frame, err := exchange.EncodeFrame(map[string]any{"id": 7, "done": true, "ok": true, "count": 1, "objects": []any{map[string]any{"DeviceId": "x"}}, "errors": []any{}, "warnings": []any{}})
	if err != nil {
		t.Fatal(err)
	}
	r, ok, err := exchange.DecodeFrame(string(frame))
	if !ok || err != nil || r.ID != 7 || !r.Done || r.Objects[0]["DeviceId"] != "x" {
		t.Fatalf("%+v %v %v", r, ok, err)
	}
	if _, ok, _ := exchange.DecodeFrame("Welcome to the host\r\n"); ok {
		t.Fatal("a line without the sentinel was taken for a frame")
	}
	if _, ok, err := exchange.DecodeFrame(exchange.FrameSentinel + "!!!"); !ok || err == nil {
		t.Fatal("a broken frame was accepted")
	}
	var e exchange.Error
	if err := json.Unmarshal([]byte(`{"message":"m","category":"NotSpecified","reason":"ManagementObjectNotFoundException","fqid":"f","target":null}`), &e); err != nil || e.Target != nil {
		t.Fatal(err)
	}
}
