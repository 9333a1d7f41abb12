package wsman

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"io"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/masterzen/winrm"
)

// TestStreamingStdinPersistentProcess drives one long-lived command the way the cmdlet executor does: lines go in
// through separate Sends while a Receive is always outstanding, answers come back while the process keeps running, and
// only closing stdin ends it. It runs over HTTP and HTTPS.
func TestStreamingStdinPersistentProcess(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		https bool
	}{{"http", false}, {"https", true}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := newEnv(t, Options{}, tc.https)
			client := env.client(t, "alice", nil)
			shell, err := client.CreateShell()
			if err != nil {
				t.Fatalf("CreateShell: %v", errText(err))
			}
			ctx := testContext(t, 20*time.Second)
			cmd, err := shell.ExecuteWithContext(ctx, "cmd", "a", "b")
			if err != nil {
				t.Fatalf("Execute: %v", errText(err))
			}
			stderr := drain(cmd.Stderr)
			out := bufio.NewReader(cmd.Stdout)
			for _, line := range []string{"hello\n", "streaming world\n", "third line\n"} {
				if _, err := cmd.Stdin.Write([]byte(line)); err != nil {
					t.Fatalf("Stdin.Write(%q): %v", line, err)
				}
				if got, want := readLine(t, out, 10*time.Second), strings.ToUpper(line); got != want {
					t.Fatalf("read %q, want %q", got, want)
				}
				if _, proc := env.launcher.last(); proc == nil {
					t.Fatal("no process launched")
				} else if _, exited := proc.Exited(); exited {
					t.Fatal("process exited while stdin was still open")
				}
			}
			if err := cmd.Stdin.Close(); err != nil {
				t.Fatalf("Stdin.Close: %v", err)
			}
			cmd.Wait()
			if cmd.Error() != nil {
				t.Fatalf("command error: %v", cmd.Error())
			}
			if got := cmd.ExitCode(); got != 3 {
				t.Errorf("ExitCode = %d, want 3", got)
			}
			if rest, err := io.ReadAll(out); err != nil || len(rest) != 0 {
				t.Errorf("trailing stdout %q, err %v", rest, err)
			}
			if got := stderr(); len(got) != 0 {
				t.Errorf("stderr = %q, want empty", got)
			}
			l, _ := env.launcher.last()
			if l.commandLine != "cmd" || !slices.Equal(l.args, []string{"a", "b"}) || l.user != "alice" {
				t.Errorf("launch = %+v, want cmd [a b] for alice", l)
			}
			if err := cmd.Close(); err != nil {
				t.Errorf("Signal: %v", err)
			}
			if err := shell.Close(); err != nil {
				t.Errorf("Delete: %v", err)
			}
			if n := env.srv.Shells("alice"); n != 0 {
				t.Errorf("Shells(alice) = %d after Delete, want 0", n)
			}
		})
	}
}

// TestLargeOutputChunkedInOrder checks that 1 MiB of stdout (with stderr interleaved) arrives complete and in order,
// spread over several Receives that each respect the client's MaxEnvelopeSize.
func TestLargeOutputChunkedInOrder(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{}, false)
	env.launcher.setMake(bigProc)
	client := env.client(t, "alice", nil)
	shell, err := client.CreateShell()
	if err != nil {
		t.Fatalf("CreateShell: %v", errText(err))
	}
	t.Cleanup(func() { _ = shell.Close() })
	cmd, err := shell.ExecuteWithContext(testContext(t, 20*time.Second), "big")
	if err != nil {
		t.Fatalf("Execute: %v", errText(err))
	}
	stdout, stderr := drain(cmd.Stdout), drain(cmd.Stderr)
	cmd.Wait()
	if cmd.Error() != nil || cmd.ExitCode() != 0 {
		t.Fatalf("command ended with %v, exit %d", cmd.Error(), cmd.ExitCode())
	}
	if got := stdout(); !bytes.Equal(got, bigPattern()) {
		t.Fatalf("stdout: got %d bytes, want the %d-byte pattern in order", len(got), bigSize)
	}
	if got, want := string(stderr()), "progress 256\nprogress 512\nprogress 768\nprogress 1024\n"; got != want {
		t.Errorf("stderr = %q, want %q", got, want)
	}
	receives := env.rec.count(ActionReceive)
	if receives < 2 {
		t.Errorf("Receives = %d, want several for 1 MiB", receives)
	}
	if m := env.rec.maxResponse(); m > 153600 {
		t.Errorf("largest response %d bytes exceeds the client's MaxEnvelopeSize 153600", m)
	}
	t.Logf("1 MiB in %d Receives, largest response %d bytes", receives, env.rec.maxResponse())
}

// TestLongPollWithoutBusyLoop checks the Receive long-poll: a command silent for 1.5 s under OperationTimeout PT1S
// costs a couple of TimedOut round trips, not thousands of empty answers.
func TestLongPollWithoutBusyLoop(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{}, false)
	env.launcher.setMake(lateProc)
	client := env.client(t, "alice", winrm.NewParameters("PT1S", "en-US", 153600))
	start := time.Now()
	var out, errOut bytes.Buffer
	code, err := client.RunWithContext(testContext(t, 20*time.Second), "late", &out, &errOut)
	if err != nil || code != 0 {
		t.Fatalf("Run: code %d, err %v", code, errText(err))
	}
	if out.String() != "late\n" {
		t.Errorf("stdout = %q, want late", out.String())
	}
	if elapsed := time.Since(start); elapsed < 1400*time.Millisecond {
		t.Errorf("finished after %v, before the output existed", elapsed)
	}
	if n := env.rec.count(ActionReceive); n < 2 || n > 5 {
		t.Errorf("Receives = %d, want 2..5 (one timed-out poll, then the output)", n)
	}
}

// TestOneShotRunLeavesNoShell runs the library's convenience flow (Create, Command, Receive, Signal, Delete).
func TestOneShotRunLeavesNoShell(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{}, false)
	env.launcher.setMake(helloProc)
	client := env.client(t, "alice", nil)
	var out, errOut bytes.Buffer
	code, err := client.RunWithContext(testContext(t, 10*time.Second), "cmd /c echo hi", &out, &errOut)
	if err != nil || code != 0 {
		t.Fatalf("Run: code %d, err %v", code, errText(err))
	}
	if out.String() != "hi\n" || errOut.String() != "warn\n" {
		t.Errorf("stdout %q stderr %q, want hi / warn", out.String(), errOut.String())
	}
	if n := env.srv.Shells("alice"); n != 0 {
		t.Errorf("Shells(alice) = %d, want 0", n)
	}
	acts := env.rec.actions()
	if len(acts) < 5 || acts[0] != "Create" || acts[1] != "Command" || acts[2] != "Receive" ||
		acts[len(acts)-2] != "Signal" || acts[len(acts)-1] != "Delete" {
		t.Errorf("request sequence %v, want Create Command Receive… Signal Delete", acts)
	}
	if l, p := env.launcher.last(); l.commandLine != "cmd /c echo hi" || !p.isTerminated() {
		t.Errorf("launch %+v, terminated %v", l, p != nil && p.isTerminated())
	}
	if reqs := env.rec.requests(); reqs[0].Options["WINRS_CODEPAGE"] != "65001" ||
		reqs[1].Options["WINRS_SKIP_CMD_SHELL"] != "FALSE" || reqs[1].ShellID == "" || reqs[2].CommandID == "" {
		t.Errorf("recorded requests lack options or ids: %+v", reqs[:3])
	}
}

// TestShellQuota checks MaxShellsPerUser: the Windows quota fault on the 4th shell, per-user accounting, and that
// closing a shell frees its slot.
func TestShellQuota(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{MaxShellsPerUser: 3}, false)
	alice := env.client(t, "alice", nil)
	var shells []*winrm.Shell
	for i := range 3 {
		sh, err := alice.CreateShell()
		if err != nil {
			t.Fatalf("shell %d: %v", i+1, errText(err))
		}
		shells = append(shells, sh)
	}
	_, err := alice.CreateShell()
	const quotaText = "This user is allowed a maximum number of 3 concurrent shells, which has been exceeded."
	if err == nil || !strings.Contains(errText(err), quotaText) || !strings.Contains(errText(err), "2150859174") {
		t.Fatalf("4th CreateShell: %v, want the quota fault", errText(err))
	}
	// The cmdlet executor's own transport surfaces the text in the error itself.
	if _, err := env.strictClient(t, "alice", nil).CreateShell(); err == nil || !strings.Contains(err.Error(), quotaText) {
		t.Errorf("4th CreateShell via strict transport: %v", err)
	}
	if _, err := env.client(t, "bob", nil).CreateShell(); err != nil {
		t.Errorf("bob's CreateShell: %v", errText(err))
	}
	if err := shells[0].Close(); err != nil {
		t.Fatalf("closing a shell: %v", err)
	}
	if _, err := alice.CreateShell(); err != nil {
		t.Errorf("CreateShell after closing one: %v", errText(err))
	}
	if a, b := env.srv.Shells("alice"), env.srv.Shells("bob"); a != 3 || b != 1 {
		t.Errorf("Shells = alice %d bob %d, want 3 and 1", a, b)
	}
}

// TestFaults checks the refusals: each must be the Windows-shaped answer, never a lenient success.
func TestFaults(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{}, false)
	alice := env.client(t, "alice", nil)
	sh, err := alice.CreateShell()
	if err != nil {
		t.Fatalf("CreateShell: %v", errText(err))
	}
	cmd, err := sh.ExecuteWithContext(testContext(t, 10*time.Second), "cmd")
	if err != nil {
		t.Fatalf("Execute: %v", errText(err))
	}
	stdout, stderr := drain(cmd.Stdout), drain(cmd.Stderr)
	t.Cleanup(func() {
		_ = cmd.Stdin.Close()
		cmd.Wait()
		stdout()
		stderr()
	})
	shellID := env.srv.ShellIDs("alice")[0]
	waitFor(t, 5*time.Second, "the client's first Receive", func() bool { return env.rec.count(ActionReceive) > 0 })
	var commandID string
	for _, r := range env.rec.requests() {
		if r.Action == ActionReceive {
			commandID = r.CommandID
		}
	}

	t.Run("unknown shell via client", func(t *testing.T) {
		_, err := alice.NewShell("bogus").Execute("cmd")
		if err == nil || !strings.Contains(errText(err), "2150858843") ||
			!strings.Contains(errText(err), "ShellId bogus failed because the shell was not found") {
			t.Fatalf("Execute on a bogus shell: %v", errText(err))
		}
	})

	tests := []struct {
		name       string
		user       string
		body       string
		status     int
		action     string
		code       string
		subcode    string
		wsmanCode  string
		messageHas string
	}{
		{
			name: "unsupported action", user: "alice", body: envelopeFor("http://example.com/MadeUp", shellID, ""),
			status: 500, action: actionWSManFault, code: "s:Sender", subcode: "a:ActionNotSupported",
			wsmanCode: "2150858771", messageHas: "does not support the action",
		},
		{
			name: "malformed XML", user: "alice", body: `<env:Envelope xmlns:env="` + NamespaceSOAP + `"><env:Header>`,
			status: 500, action: actionWSManFault, code: "s:Sender", subcode: "a:InvalidMessageInformationHeader",
			wsmanCode: "2150858819", messageHas: "because the XML is invalid",
		},
		{
			name: "trailing garbage", user: "alice", body: envelopeFor(ActionDelete, shellID, "") + "<x/>",
			status: 500, subcode: "a:InvalidMessageInformationHeader", wsmanCode: "2150858819",
		},
		{
			name: "unknown shell", user: "alice", body: envelopeFor(ActionDelete, "NOPE", ""),
			status: 500, action: actionWSManFault, code: "s:Sender", subcode: "w:InvalidSelectors",
			wsmanCode: "2150858843", messageHas: "ShellId NOPE failed because the shell was not found on the server.",
		},
		{
			name: "other user's shell", user: "mallory", body: envelopeFor(ActionDelete, shellID, ""),
			status: 500, subcode: "w:InvalidSelectors", wsmanCode: "2150858843",
		},
		{
			name: "unknown command", user: "alice",
			body: envelopeFor(ActionReceive, shellID,
				`<rsp:Receive><rsp:DesiredStream CommandId="NOPE">stdout stderr</rsp:DesiredStream></rsp:Receive>`),
			status: 500, subcode: "w:InvalidSelectors", wsmanCode: "2150858843",
		},
		{
			name: "missing selector", user: "alice", body: envelopeFor(ActionCommand, "", ""),
			status: 500, subcode: "w:InvalidSelectors", messageHas: "requires the following selector: ShellId",
		},
		{
			name: "wrong resource URI", user: "alice",
			body: strings.Replace(envelopeFor(ActionCreate, "", ""), ResourceURICmd,
				"http://schemas.microsoft.com/powershell/Microsoft.Exchange", 1),
			status: 500, action: actionAddressingFault, code: "s:Sender", subcode: "a:DestinationUnreachable",
			wsmanCode: "2150858752",
		},
		{
			name: "missing action", user: "alice",
			body: regexp.MustCompile(`<a:Action[^>]*>[^<]*</a:Action>`).
				ReplaceAllString(envelopeFor(ActionCreate, "", ""), ""),
			status: 500, subcode: "a:MessageInformationHeaderRequired", wsmanCode: "2150858769",
		},
		{
			name: "envelope size below 8192", user: "alice",
			body:   strings.Replace(envelopeFor(ActionCreate, "", ""), ">153600<", ">4096<", 1),
			status: 500, subcode: "w:EncodingLimit", wsmanCode: "2150858878",
		},
		{
			name: "bad OperationTimeout", user: "alice",
			body:   strings.Replace(envelopeFor(ActionCreate, "", ""), ">PT1S<", ">soon<", 1),
			status: 500, subcode: "a:InvalidMessageInformationHeader", wsmanCode: "2150858881",
		},
		{
			name: "unknown mustUnderstand header", user: "alice",
			body: strings.Replace(envelopeFor(ActionCreate, "", ""), "<env:Header>",
				`<env:Header><z:Extra xmlns:z="urn:x" env:mustUnderstand="true">1</z:Extra>`, 1),
			status: 500, code: "s:MustUnderstand", wsmanCode: "2150858768",
		},
		{
			name: "SOAP 1.1 envelope", user: "alice",
			body:   `<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Header/><s:Body/></s:Envelope>`,
			status: 500, code: "s:VersionMismatch", wsmanCode: "2150858765",
		},
		{
			name: "anonymous request", user: "", body: envelopeFor(ActionCreate, "", ""),
			status: 500, code: "s:Receiver", subcode: "w:InternalError", messageHas: "no authenticated user",
		},
		{
			name: "signal with unknown code", user: "alice",
			body: envelopeFor(ActionSignal, shellID, `<rsp:Signal CommandId="`+commandID+`"><rsp:Code>`+
				`http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/bogus</rsp:Code></rsp:Signal>`),
			status: 500, code: "s:Sender", subcode: "w:InvalidParameter", wsmanCode: "87",
		},
		{
			name: "empty command line", user: "alice",
			body:   envelopeFor(ActionCommand, shellID, `<rsp:CommandLine><rsp:Command></rsp:Command></rsp:CommandLine>`),
			status: 500, code: "s:Sender", subcode: "w:InvalidParameter", wsmanCode: "87",
		},
		{
			name: "launcher failure", user: "alice",
			body: envelopeFor(ActionCommand, shellID,
				`<rsp:CommandLine><rsp:Command><![CDATA[fail-to-start]]></rsp:Command></rsp:CommandLine>`),
			status: 500, code: "s:Receiver", subcode: "w:InternalError", messageHas: "file not found",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp := env.soapPost(t, tc.user, tc.body)
			if resp.status != tc.status {
				t.Fatalf("status %d, want %d\n%s", resp.status, tc.status, resp.body)
			}
			if ct := resp.header.Get("Content-Type"); ct != "application/soap+xml;charset=UTF-8" {
				t.Errorf("Content-Type %q", ct)
			}
			p := parseResponse(t, resp.body)
			check := func(what, got, want string) {
				t.Helper()
				if want != "" && got != want {
					t.Errorf("%s = %q, want %q\n%s", what, got, want, resp.body)
				}
			}
			check("Action", p.Action, tc.action)
			check("Code", p.FaultCode, tc.code)
			check("Subcode", p.FaultSubcode, tc.subcode)
			check("WSManFault Code", p.WSManCode, tc.wsmanCode)
			if tc.messageHas != "" && !strings.Contains(p.WSManMessage, tc.messageHas) {
				t.Errorf("message %q does not contain %q", p.WSManMessage, tc.messageHas)
			}
			if p.FaultReason == "" || p.WSManMachine != "127.0.0.1" {
				t.Errorf("reason %q machine %q, want a reason and the Host the client used", p.FaultReason, p.WSManMachine)
			}
			if strings.Contains(resp.body, testPassword) || strings.Contains(resp.body, "Basic ") {
				t.Error("fault echoes the Authorization header")
			}
		})
	}

	t.Run("http level", func(t *testing.T) {
		for _, tc := range []struct {
			name, method, path, contentType string
			want                            int
		}{
			{"GET", http.MethodGet, "/wsman", "", http.StatusMethodNotAllowed},
			{"wrong path", http.MethodPost, "/other", "application/soap+xml;charset=UTF-8", http.StatusNotFound},
			{"wrong content type", http.MethodPost, "/wsman", "text/xml", http.StatusUnsupportedMediaType},
		} {
			t.Run(tc.name, func(t *testing.T) {
				req, err := http.NewRequest(tc.method, env.ts.URL+tc.path, strings.NewReader(envelopeFor(ActionCreate, "", "")))
				if err != nil {
					t.Fatal(err)
				}
				req.SetBasicAuth("alice", testPassword)
				if tc.contentType != "" {
					req.Header.Set("Content-Type", tc.contentType)
				}
				resp, err := env.ts.Client().Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != tc.want || resp.Header.Get("Server") != "Microsoft-HTTPAPI/2.0" {
					t.Errorf("status %d server %q, want %d from Microsoft-HTTPAPI/2.0", resp.StatusCode,
						resp.Header.Get("Server"), tc.want)
				}
			})
		}
	})
}

// TestOversizedRequest checks the MaxEnvelopeSize limit on request bodies, with and without Content-Length, in both
// refusal styles, and what the real client makes of it.
func TestOversizedRequest(t *testing.T) {
	t.Parallel()
	const limit = 16384
	big := envelopeFor(ActionSend, "X", `<rsp:Send><rsp:Stream Name="stdin" CommandId="Y">`+
		strings.Repeat("QUFB", limit/4)+`</rsp:Stream></rsp:Send>`)

	t.Run("windows 413", func(t *testing.T) {
		t.Parallel()
		env := newEnv(t, Options{MaxEnvelopeSize: limit}, false)
		for _, cl := range []int64{int64(len(big)), -1} {
			resp := env.postRaw(t, "alice", "application/soap+xml;charset=UTF-8", strings.NewReader(big), cl)
			if resp.status != http.StatusRequestEntityTooLarge || resp.body != "" {
				t.Errorf("content-length %d: status %d body %q, want a bare 413", cl, resp.status, resp.body)
			}
		}
		// The library surfaces the 413 as a failed Stdin.Write.
		sh, err := env.client(t, "alice", nil).CreateShell()
		if err != nil {
			t.Fatalf("CreateShell: %v", errText(err))
		}
		cmd, err := sh.ExecuteWithContext(testContext(t, 10*time.Second), "cmd")
		if err != nil {
			t.Fatalf("Execute: %v", errText(err))
		}
		stdout, stderr := drain(cmd.Stdout), drain(cmd.Stderr)
		if _, err := cmd.Stdin.Write(bytes.Repeat([]byte("x"), limit)); err == nil {
			t.Error("a Send larger than MaxEnvelopeSize succeeded")
		}
		if err := cmd.Stdin.Close(); err != nil {
			t.Fatalf("Stdin.Close: %v", err)
		}
		cmd.Wait()
		stdout()
		stderr()
		if _, p := env.launcher.last(); p.stdinString() != "" {
			t.Errorf("process received %d bytes of the refused Send", len(p.stdinString()))
		}
	})

	t.Run("soap fault", func(t *testing.T) {
		t.Parallel()
		env := newEnv(t, Options{MaxEnvelopeSize: limit, EnvelopeLimitFault: true}, false)
		for _, cl := range []int64{int64(len(big)), -1} {
			resp := env.postRaw(t, "alice", "application/soap+xml;charset=UTF-8", strings.NewReader(big), cl)
			p := parseResponse(t, resp.body)
			if resp.status != 500 || p.FaultSubcode != "w:EncodingLimit" || p.WSManCode != "2150858805" {
				t.Errorf("content-length %d: status %d subcode %q code %q", cl, resp.status, p.FaultSubcode, p.WSManCode)
			}
		}
	})
}

// TestParseByNamespace sends requests with other prefixes and default namespaces; only the URIs matter.
func TestParseByNamespace(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{}, false)
	header := func(action, shellID string) string {
		sel := ""
		if shellID != "" {
			sel = `<wsman:SelectorSet><wsman:Selector Name="ShellId">` + shellID + `</wsman:Selector></wsman:SelectorSet>`
		}
		return `<soap:Header>
  <wsa:To>` + env.url() + `</wsa:To>
  <wsa:MessageID>
     uuid:AAAAAAAA-0000-4000-8000-000000000001
  </wsa:MessageID>
  <wsa:Action soap:mustUnderstand="true">` + action + `</wsa:Action>
  <wsman:ResourceURI soap:mustUnderstand="true">` + ResourceURICmd + `</wsman:ResourceURI>
  <wsman:OperationTimeout>PT5S</wsman:OperationTimeout>` + sel + `
</soap:Header>`
	}
	wrap := func(h, body string) string {
		return `<?xml version="1.0" encoding="utf-8"?>
<!-- written by hand -->
<soap:Envelope xmlns:soap="` + NamespaceSOAP + `" xmlns:wsa="` + NamespaceAddressing + `" xmlns:wsman="` +
			NamespaceWSMan + `">` + h + `<soap:Body>` + body + `</soap:Body></soap:Envelope>`
	}
	resp := env.soapPost(t, "alice", wrap(header(ActionCreate, ""),
		`<Shell xmlns="`+NamespaceShell+`"><InputStreams>stdin</InputStreams>`+
			`<OutputStreams>stdout stderr</OutputStreams></Shell>`))
	p := parseResponse(t, resp.body)
	if resp.status != 200 || len(p.ShellIDs) != 1 || p.Selector != p.ShellIDs[0] {
		t.Fatalf("Create: status %d, ShellIds %v, selector %q\n%s", resp.status, p.ShellIDs, p.Selector, resp.body)
	}
	if p.RelatesTo != "uuid:AAAAAAAA-0000-4000-8000-000000000001" {
		t.Errorf("RelatesTo = %q", p.RelatesTo)
	}
	shellID := p.ShellIDs[0]

	resp = env.soapPost(t, "alice", wrap(header(ActionCommand, shellID),
		`<CommandLine xmlns="`+NamespaceShell+`"><Command><![CDATA[echo & "quoted" <x>]]></Command>`+
			`<Arguments>first arg</Arguments><Arguments><![CDATA[a&b]]></Arguments></CommandLine>`))
	p = parseResponse(t, resp.body)
	if resp.status != 200 || p.CommandID == "" {
		t.Fatalf("Command: status %d\n%s", resp.status, resp.body)
	}
	commandID := p.CommandID
	if l, _ := env.launcher.last(); l.commandLine != `echo & "quoted" <x>` ||
		!slices.Equal(l.args, []string{"first arg", "a&b"}) {
		t.Errorf("launch = %+v", l)
	}

	data := base64.StdEncoding.EncodeToString([]byte("ping\n"))
	resp = env.soapPost(t, "alice", wrap(header(ActionSend, shellID),
		`<sh:Send xmlns:sh="`+NamespaceShell+`"><sh:Stream Name="stdin" CommandId="`+commandID+`">
		`+data[:4]+"\n"+data[4:]+`</sh:Stream><sh:Stream Name="stdin" CommandId="`+commandID+`" End="true"/></sh:Send>`))
	if resp.status != 200 || parseResponse(t, resp.body).Action != actionSendResponse {
		t.Fatalf("Send: status %d\n%s", resp.status, resp.body)
	}

	var stdout strings.Builder
	for range 5 {
		resp = env.soapPost(t, "alice", wrap(header(ActionReceive, shellID),
			`<Receive xmlns="`+NamespaceShell+`"><DesiredStream CommandId="`+commandID+
				`">stdout stderr</DesiredStream></Receive>`))
		p = parseResponse(t, resp.body)
		if resp.status != 200 {
			t.Fatalf("Receive: status %d\n%s", resp.status, resp.body)
		}
		for _, s := range p.Streams {
			b, err := base64.StdEncoding.DecodeString(s.Data)
			if err != nil {
				t.Fatalf("stream data %q: %v", s.Data, err)
			}
			stdout.Write(b)
		}
		if p.State == CommandStateDone {
			break
		}
	}
	if p.State != CommandStateDone || p.ExitCode != "3" || stdout.String() != "PING\n" {
		t.Errorf("state %q exit %q stdout %q, want Done 3 PING", p.State, p.ExitCode, stdout.String())
	}
}

// TestResponseShape pins the wire format details the client and other WS-Man clients depend on.
func TestResponseShape(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{}, false)
	resp := env.soapPost(t, "alice", envelopeFor(ActionCreate, "", ""))
	if resp.status != 200 {
		t.Fatalf("status %d\n%s", resp.status, resp.body)
	}
	if got := resp.header.Get("Content-Type"); got != "application/soap+xml;charset=UTF-8" {
		t.Errorf("Content-Type = %q", got)
	}
	if got := resp.header.Get("Server"); got != "Microsoft-HTTPAPI/2.0" {
		t.Errorf("Server = %q", got)
	}
	guid := `[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}`
	for _, re := range []string{
		`^<s:Envelope xml:lang="en-US" xmlns:s="` + NamespaceSOAP + `" xmlns:a="` + NamespaceAddressing + `"`,
		`<s:Header><a:Action>` + regexp.QuoteMeta(actionCreateResponse) + `</a:Action><a:MessageID>uuid:` + guid +
			`</a:MessageID><a:To>` + regexp.QuoteMeta(anonymousRole) + `</a:To>` +
			`<a:RelatesTo>uuid:11111111-2222-4333-8444-555555555555</a:RelatesTo></s:Header>`,
		`<x:ResourceCreated><a:Address>http://127\.0\.0\.1:\d+/wsman</a:Address><a:ReferenceParameters>` +
			`<w:ResourceURI>` + regexp.QuoteMeta(ResourceURICmd) + `</w:ResourceURI><w:SelectorSet>` +
			`<w:Selector Name="ShellId">(` + guid + `)</w:Selector></w:SelectorSet></a:ReferenceParameters></x:ResourceCreated>`,
		`<rsp:Shell xmlns:rsp="` + NamespaceShell + `"><rsp:ShellId>` + guid + `</rsp:ShellId><rsp:ResourceUri>` +
			regexp.QuoteMeta(ResourceURICmd) + `</rsp:ResourceUri><rsp:Owner>alice</rsp:Owner>` +
			`<rsp:ClientIP>127\.0\.0\.1</rsp:ClientIP><rsp:IdleTimeOut>PT7200\.000S</rsp:IdleTimeOut>` +
			`<rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams>`,
	} {
		if !regexp.MustCompile(re).MatchString(resp.body) {
			t.Errorf("response does not match %s\n%s", re, resp.body)
		}
	}
	shellID := parseResponse(t, resp.body).ShellIDs[0]

	// An idle Receive must wait for the operation timeout and then answer the TimedOut fault, never an empty success.
	env.launcher.setMake(silentProc)
	resp = env.soapPost(t, "alice", envelopeFor(ActionCommand, shellID,
		`<rsp:CommandLine><rsp:Command>x</rsp:Command></rsp:CommandLine>`))
	commandID := parseResponse(t, resp.body).CommandID
	start := time.Now()
	resp = env.soapPost(t, "alice", envelopeFor(ActionReceive, shellID,
		`<rsp:Receive><rsp:DesiredStream CommandId="`+commandID+`">stdout stderr</rsp:DesiredStream></rsp:Receive>`))
	p := parseResponse(t, resp.body)
	if elapsed := time.Since(start); elapsed < 900*time.Millisecond {
		t.Errorf("idle Receive answered after %v, before its PT1S OperationTimeout", elapsed)
	}
	if resp.status != 500 || p.Action != actionWSManFault || p.FaultCode != "s:Receiver" ||
		p.FaultSubcode != "w:TimedOut" || p.WSManCode != "2150858793" || !strings.Contains(p.FaultReason, "OperationTimeout") {
		t.Errorf("idle Receive: status %d %+v", resp.status, p)
	}
	if !strings.Contains(resp.body, `<s:Reason><s:Text xml:lang="en-US">The WS-Management service cannot complete the `+
		`operation within the time specified in OperationTimeout. </s:Text></s:Reason><s:Detail><f:WSManFault xmlns:f="`+
		NamespaceFault+`" Code="2150858793" Machine="127.0.0.1"><f:Message>`) {
		t.Errorf("fault layout differs from Windows:\n%s", resp.body)
	}

	// The final Receive carries End streams and Done with a bare exit code.
	resp = env.soapPost(t, "alice", envelopeFor(ActionSend, shellID,
		`<rsp:Send><rsp:Stream Name="stdin" CommandId="`+commandID+`" End="true"/></rsp:Send>`))
	if resp.status != 200 {
		t.Fatalf("Send: %d\n%s", resp.status, resp.body)
	}
	resp = env.soapPost(t, "alice", envelopeFor(ActionReceive, shellID,
		`<rsp:Receive><rsp:DesiredStream CommandId="`+commandID+`">stdout stderr</rsp:DesiredStream></rsp:Receive>`))
	want := `<s:Body><rsp:ReceiveResponse>` +
		`<rsp:Stream Name="stdout" CommandId="` + commandID + `" End="true"></rsp:Stream>` +
		`<rsp:Stream Name="stderr" CommandId="` + commandID + `" End="true"></rsp:Stream><rsp:CommandState CommandId="` +
		commandID + `" State="` + CommandStateDone + `"><rsp:ExitCode>0</rsp:ExitCode></rsp:CommandState>` +
		`</rsp:ReceiveResponse></s:Body>`
	if resp.status != 200 || !strings.Contains(resp.body, want) {
		t.Errorf("final Receive:\n%s\nwant body %s", resp.body, want)
	}
	// Sending after End is a broken pipe, not a silent success.
	resp = env.soapPost(t, "alice", envelopeFor(ActionSend, shellID,
		`<rsp:Send><rsp:Stream Name="stdin" CommandId="`+commandID+`">eA==</rsp:Stream></rsp:Send>`))
	if p := parseResponse(t, resp.body); resp.status != 500 || p.WSManCode != "2147942509" {
		t.Errorf("Send after End: status %d code %q", resp.status, p.WSManCode)
	}
}

// TestReceiveRespectsEnvelopeWithTinyWrites interleaves thousands of one-byte writes on both streams and checks that
// every response still fits a minimal 8192-byte envelope and nothing is lost or reordered per stream.
func TestReceiveRespectsEnvelopeWithTinyWrites(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{}, false)
	const n = 1500
	env.launcher.setMake(func(context.Context) *fakeProc {
		p := newFakeProc()
		for i := range n {
			_, _ = p.Stdout().Write([]byte{byte('a' + i%26)})
			_, _ = p.Stderr().Write([]byte{byte('A' + i%26)})
		}
		p.Exit(0)
		return p
	})
	client := env.client(t, "alice", winrm.NewParameters("PT5S", "en-US", 8192))
	var out, errOut bytes.Buffer
	if code, err := client.RunWithContext(testContext(t, 20*time.Second), "tiny", &out, &errOut); err != nil || code != 0 {
		t.Fatalf("Run: %d %v", code, errText(err))
	}
	var wantOut, wantErr strings.Builder
	for i := range n {
		wantOut.WriteByte(byte('a' + i%26))
		wantErr.WriteByte(byte('A' + i%26))
	}
	if out.String() != wantOut.String() || errOut.String() != wantErr.String() {
		t.Errorf("got %d/%d bytes, streams differ from what was written", out.Len(), errOut.Len())
	}
	if m := env.rec.maxResponse(); m > 8192 {
		t.Errorf("largest response %d bytes exceeds MaxEnvelopeSize 8192", m)
	}
}

// TestDropShellMidCommand injects the loss of a shell while a command runs: the next Send and the outstanding
// Receive get the "shell not found" fault and nothing of the shell remains.
func TestDropShellMidCommand(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{}, false)
	env.launcher.setMake(silentProc)
	client := env.strictClient(t, "alice", winrm.NewParameters("PT5S", "en-US", 153600))
	shell, err := client.CreateShell()
	if err != nil {
		t.Fatalf("CreateShell: %v", err)
	}
	cmd, err := shell.ExecuteWithContext(testContext(t, 10*time.Second), "silent")
	if err != nil {
		t.Fatalf("Execute: %v", err)
	}
	stdout, stderr := drain(cmd.Stdout), drain(cmd.Stderr)
	if _, err := cmd.Stdin.Write([]byte("before\n")); err != nil {
		t.Fatalf("Write before drop: %v", err)
	}
	_, proc := env.launcher.last()
	// Send only buffers; wait until the process has actually read the line so the drop happens mid-command.
	waitFor(t, 5*time.Second, "stdin delivery", func() bool { return proc.stdinString() == "before\n" })
	waitFor(t, 5*time.Second, "the first Receive", func() bool { return env.rec.count(ActionReceive) >= 1 })
	ids := env.srv.ShellIDs("alice")
	if len(ids) != 1 {
		t.Fatalf("ShellIDs = %v", ids)
	}
	env.srv.DropShell(ids[0])

	if _, err := cmd.Stdin.Write([]byte("after\n")); err == nil {
		t.Error("Send to a dropped shell succeeded")
	}
	cmd.Wait()
	if err := cmd.Error(); err == nil || !strings.Contains(err.Error(), "2150858843") ||
		!strings.Contains(err.Error(), "the shell was not found on the server") {
		t.Errorf("command error = %v, want the shell-not-found fault", err)
	}
	stdout()
	stderr()
	if n := env.srv.Shells("alice"); n != 0 {
		t.Errorf("Shells(alice) = %d, want 0", n)
	}
	if !proc.isTerminated() || proc.stdinString() != "before\n" {
		t.Errorf("terminated %v, stdin %q", proc.isTerminated(), proc.stdinString())
	}
	if err := shell.Close(); err == nil || !strings.Contains(err.Error(), "2150858843") {
		t.Errorf("Delete of a dropped shell: %v", err)
	}
}

// TestBeforeReceiveHook checks both uses of the hook: delaying Receives (slow server) and answering with a fault.
func TestBeforeReceiveHook(t *testing.T) {
	t.Parallel()
	t.Run("delay", func(t *testing.T) {
		t.Parallel()
		var mu sync.Mutex
		var delayed int
		env := newEnv(t, Options{Hooks: Hooks{BeforeReceive: func(ctx context.Context, _, _ string) *Fault {
			mu.Lock()
			delayed++
			mu.Unlock()
			select {
			case <-time.After(300 * time.Millisecond):
			case <-ctx.Done():
			}
			return nil
		}}}, false)
		env.launcher.setMake(helloProc)
		start := time.Now()
		var out, errOut bytes.Buffer
		client := env.client(t, "alice", nil)
		if code, err := client.RunWithContext(testContext(t, 10*time.Second), "x", &out, &errOut); err != nil || code != 0 {
			t.Fatalf("Run: %d %v", code, errText(err))
		}
		if elapsed := time.Since(start); elapsed < 300*time.Millisecond {
			t.Errorf("Run took %v, the 300ms Receive delay was not observed", elapsed)
		}
		mu.Lock()
		defer mu.Unlock()
		if delayed == 0 || out.String() != "hi\n" {
			t.Errorf("hook ran %d times, stdout %q", delayed, out.String())
		}
	})
	t.Run("fault", func(t *testing.T) {
		t.Parallel()
		injected := InternalErrorFault(2147943418,
			"Illegal operation attempted on a registry key that has been marked for deletion.")
		env := newEnv(t, Options{Hooks: Hooks{BeforeReceive: func(context.Context, string, string) *Fault {
			return &injected
		}}}, false)
		env.launcher.setMake(silentProc)
		client := env.strictClient(t, "alice", nil)
		shell, err := client.CreateShell()
		if err != nil {
			t.Fatalf("CreateShell: %v", err)
		}
		cmd, err := shell.ExecuteWithContext(testContext(t, 10*time.Second), "x")
		if err != nil {
			t.Fatalf("Execute: %v", err)
		}
		stdout, stderr := drain(cmd.Stdout), drain(cmd.Stderr)
		cmd.Wait()
		stdout()
		stderr()
		if err := cmd.Error(); err == nil || !strings.Contains(err.Error(), `Code="2147943418"`) ||
			!strings.Contains(err.Error(), "marked for deletion") || !strings.Contains(err.Error(), "http 500") {
			t.Errorf("command error = %v, want the injected fault", err)
		}
		_ = shell.Close()
	})
	t.Run("before action", func(t *testing.T) {
		t.Parallel()
		env := newEnv(t, Options{Hooks: Hooks{BeforeAction: func(r Request) *Fault {
			if r.Action == ActionCommand {
				f := ShellNotFoundFault(r.ShellID)
				return &f
			}
			return nil
		}}}, false)
		sh, err := env.client(t, "alice", nil).CreateShell()
		if err != nil {
			t.Fatalf("CreateShell: %v", errText(err))
		}
		if _, err := sh.Execute("cmd"); err == nil || !strings.Contains(errText(err), "2150858843") {
			t.Errorf("Execute = %v, want the injected fault", errText(err))
		}
		if l, _ := env.launcher.last(); l.commandLine != "" {
			t.Errorf("launcher ran %q despite the fault", l.commandLine)
		}
	})
}

// TestIdleShellsAreReaped checks IdleTimeout: an unused shell disappears, a shell with a Receive in progress does not.
func TestIdleShellsAreReaped(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{IdleTimeout: 200 * time.Millisecond}, false)
	env.launcher.setMake(silentProc)
	client := env.client(t, "alice", winrm.NewParameters("PT0.5S", "en-US", 153600))
	if _, err := client.CreateShell(); err != nil {
		t.Fatalf("CreateShell: %v", errText(err))
	}
	waitFor(t, 5*time.Second, "the idle shell to be reaped", func() bool { return env.srv.Shells("alice") == 0 })

	// A command whose client keeps long-polling (0.5s polls, longer than the idle timeout) must survive.
	shell, err := client.CreateShell()
	if err != nil {
		t.Fatalf("CreateShell: %v", errText(err))
	}
	cmd, err := shell.ExecuteWithContext(testContext(t, 10*time.Second), "silent")
	if err != nil {
		t.Fatalf("Execute: %v", errText(err))
	}
	stdout, stderr := drain(cmd.Stdout), drain(cmd.Stderr)
	waitFor(t, 5*time.Second, "two timed-out polls", func() bool { return env.rec.count(ActionReceive) >= 3 })
	if env.srv.Shells("alice") != 1 {
		t.Fatal("a shell with a Receive in progress was reaped")
	}
	if err := cmd.Stdin.Close(); err != nil {
		t.Fatalf("Stdin.Close: %v", err)
	}
	cmd.Wait()
	stdout()
	stderr()
	if cmd.ExitCode() != 0 || cmd.Error() != nil {
		t.Errorf("exit %d err %v", cmd.ExitCode(), cmd.Error())
	}
}

// TestConcurrentClients runs one-shot commands from several users at once, for the race detector.
func TestConcurrentClients(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{MaxShellsPerUser: 18}, false)
	env.launcher.setMake(helloProc)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 16 {
		user := []string{"alice", "bob", "carol", "dave"}[i%4]
		client := env.client(t, user, nil)
		wg.Go(func() {
			for range 3 {
				var out, errOut bytes.Buffer
				code, err := client.RunWithContext(context.Background(), "x", &out, &errOut)
				if err == nil && (code != 0 || out.String() != "hi\n") {
					err = io.ErrUnexpectedEOF
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("run: %v", errText(err))
	}
	for _, u := range []string{"alice", "bob", "carol", "dave"} {
		if n := env.srv.Shells(u); n != 0 {
			t.Errorf("Shells(%s) = %d", u, n)
		}
	}
}

// TestSignalCodes checks that every WinRS signal code terminates the process and forgets the command, so a later
// Receive for it gets the "not found" fault.
func TestSignalCodes(t *testing.T) {
	t.Parallel()
	env := newEnv(t, Options{}, false)
	env.launcher.setMake(silentProc)
	resp := env.soapPost(t, "alice", envelopeFor(ActionCreate, "", ""))
	shellID := parseResponse(t, resp.body).ShellIDs[0]
	for _, code := range []string{SignalTerminate, SignalCtrlC, SignalCtrlBreak} {
		t.Run(code[strings.LastIndex(code, "/")+1:], func(t *testing.T) {
			resp := env.soapPost(t, "alice", envelopeFor(ActionCommand, shellID,
				`<rsp:CommandLine><rsp:Command>x</rsp:Command></rsp:CommandLine>`))
			commandID := parseResponse(t, resp.body).CommandID
			_, proc := env.launcher.last()
			resp = env.soapPost(t, "alice", envelopeFor(ActionSignal, shellID,
				`<rsp:Signal CommandId="`+commandID+`"><rsp:Code>`+code+`</rsp:Code></rsp:Signal>`))
			if p := parseResponse(t, resp.body); resp.status != 200 || p.Action != actionSignalResponse ||
				!strings.Contains(resp.body, "<rsp:SignalResponse/>") {
				t.Fatalf("Signal: %d\n%s", resp.status, resp.body)
			}
			if !proc.isTerminated() {
				t.Error("process not terminated")
			}
			resp = env.soapPost(t, "alice", envelopeFor(ActionReceive, shellID,
				`<rsp:Receive><rsp:DesiredStream CommandId="`+commandID+`">stdout stderr</rsp:DesiredStream></rsp:Receive>`))
			if p := parseResponse(t, resp.body); resp.status != 500 || p.WSManCode != "2150858843" {
				t.Errorf("Receive after Signal: %d %q", resp.status, p.WSManCode)
			}
		})
	}
	if n := env.srv.Shells("alice"); n != 1 {
		t.Errorf("Shells = %d; a Signal must not delete the shell", n)
	}
}
