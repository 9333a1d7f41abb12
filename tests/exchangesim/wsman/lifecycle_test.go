package wsman

import (
	"bytes"
	"context"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestCloseTerminatesEverythingWithoutLeaks checks Close: running processes are terminated, shells forgotten, later
// requests refused with 503 like a stopped service, and none of the server's goroutines outlive it. go.uber.org/goleak
// is not a dependency of this module, so the check inspects goroutine stacks for this package's functions.
func TestCloseTerminatesEverythingWithoutLeaks(t *testing.T) {
	// Not parallel: the stack inspection below must not see other tests' servers.
	env := newEnv(t, Options{IdleTimeout: time.Minute}, false)
	client := env.client(t, "alice", nil)

	// A finished streaming command, a big one and a command left running with buffered stdin.
	var out, errOut bytes.Buffer
	env.launcher.setMake(bigProc)
	if code, err := client.RunWithContext(testContext(t, 20*time.Second), "big", &out, &errOut); err != nil || code != 0 {
		t.Fatalf("Run: %d %v", code, errText(err))
	}
	env.launcher.setMake(silentProc)
	shell, err := client.CreateShell()
	if err != nil {
		t.Fatalf("CreateShell: %v", errText(err))
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd, err := shell.ExecuteWithContext(ctx, "silent")
	if err != nil {
		t.Fatalf("Execute: %v", errText(err))
	}
	stdout, stderr := drain(cmd.Stdout), drain(cmd.Stderr)
	if _, err := cmd.Stdin.Write([]byte("pending input\n")); err != nil {
		t.Fatalf("Write: %v", err)
	}
	waitFor(t, 5*time.Second, "a Receive in progress", func() bool { return env.rec.count(ActionReceive) >= 2 })

	env.srv.Close()
	for i, p := range env.launcher.allProcs() {
		if !p.isTerminated() {
			t.Errorf("process %d not terminated by Close", i)
		}
	}
	if n := env.srv.Shells("alice"); n != 0 {
		t.Errorf("Shells(alice) = %d after Close", n)
	}
	// The client's outstanding Receive was answered; its next request meets the closed service and ends the loop.
	cmd.Wait()
	stdout()
	stderr()
	if cmd.Error() == nil || !strings.Contains(cmd.Error().Error(), "503") {
		t.Errorf("command error after Close = %v, want the 503", cmd.Error())
	}
	resp := env.soapPost(t, "alice", envelopeFor(ActionCreate, "", ""))
	if resp.status != http.StatusServiceUnavailable {
		t.Errorf("Create after Close: %d", resp.status)
	}
	env.srv.Close() // idempotent

	waitFor(t, 5*time.Second, "the server's goroutines to exit", func() bool {
		leaked := serverGoroutines()
		if len(leaked) > 0 {
			t.Logf("still running:\n%s", strings.Join(leaked, "\n\n"))
		}
		return len(leaked) == 0
	})
}

// serverGoroutines returns the stacks of goroutines running this package's non-test code.
func serverGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var found []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		for _, fn := range []string{"wsman.(*Server).", "wsman.(*command).", "wsman.(*OutputQueue)."} {
			if strings.Contains(g, fn) && !strings.Contains(g, "wsman.Test") {
				found = append(found, g)
				break
			}
		}
	}
	return found
}

// TestReceiveAbortsWhenClientGoesAway checks that a long-poll ends as soon as its HTTP request is cancelled instead of
// holding a goroutine until the operation timeout.
func TestReceiveAbortsWhenClientGoesAway(t *testing.T) {
	// Not parallel: it looks for the server's receive goroutine among all goroutines.
	env := newEnv(t, Options{MaxOperationTimeout: 30 * time.Second}, false)
	env.launcher.setMake(silentProc)
	resp := env.soapPost(t, "alice", envelopeFor(ActionCreate, "", ""))
	shellID := parseResponse(t, resp.body).ShellIDs[0]
	resp = env.soapPost(t, "alice", envelopeFor(ActionCommand, shellID,
		`<rsp:CommandLine><rsp:Command>x</rsp:Command></rsp:CommandLine>`))
	commandID := parseResponse(t, resp.body).CommandID
	body := strings.Replace(envelopeFor(ActionReceive, shellID,
		`<rsp:Receive><rsp:DesiredStream CommandId="`+commandID+`">stdout stderr</rsp:DesiredStream></rsp:Receive>`),
		">PT1S<", ">PT30S<", 1)

	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, env.url(), strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/soap+xml;charset=UTF-8")
	req.SetBasicAuth("alice", testPassword)
	done := make(chan error, 1)
	go func() {
		resp, err := env.ts.Client().Do(req)
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()
	inReceive := func() bool {
		for _, g := range serverGoroutines() {
			if strings.Contains(g, "wsman.(*Server).receive") {
				return true
			}
		}
		return false
	}
	waitFor(t, 5*time.Second, "the Receive to start waiting", inReceive)
	start := time.Now()
	cancel()
	if err := <-done; err == nil {
		t.Error("cancelled request returned a response")
	}
	waitFor(t, 5*time.Second, "the Receive to give up", func() bool { return !inReceive() })
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("Receive lingered %v after the client left", elapsed)
	}
}
