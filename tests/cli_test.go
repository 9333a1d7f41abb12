package tests

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/executor"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// TestCLI drives a running easguard through the CLI over the console's
// API, each command with the token of the role it needs: status, a full
// sync, devices, a device's history, the approval of a held mass
// revocation (which blocks the devices on Exchange), a remote wipe (which
// the phone receives at its next sync), the audit export; and a viewer's
// or operator's token refused what its role may not do.
func TestCLI(t *testing.T) {
	bin := easguardBinary(t)
	s := startStack(t, stackOptions{
		evaluate: func(c *evaluator.Config) { c.BlastRadius, c.BlastMinimum = 0.5, 3 },
		executor: func(c *executor.Config) { c.AllowWipe = true },
	})
	cli := func(token string, args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "EASGUARD_URL=" + s.consoleURL, "EASGUARD_TOKEN=" + token}
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			t.Fatalf("easguard %v: %v", args, err)
		}
		return string(out), cmd.ProcessState.ExitCode()
	}
	expect := func(out string, code, wantCode int, wants ...string) {
		t.Helper()
		if code != wantCode {
			t.Fatalf("exit %d, want %d:\n%s", code, wantCode, out)
		}
		for _, w := range wants {
			if !strings.Contains(out, w) {
				t.Fatalf("want %q in:\n%s", w, out)
			}
		}
	}
	demo := iPhone("alice@contoso.com", "ApplCLIDEMO0001")
	s.waitFullSync()
	s.phoneSync(demo)
	s.waitPhone(demo, "Blocked", 30*time.Second)

	out, code := cli(viewerToken, "status")
	expect(out, code, 0, "organisation", "contoso", "full sync", "guard", "partnerships")
	out, code = cli(viewerToken, "sync", "full")
	expect(out, code, 1, "needs the operator role")
	out, code = cli(operatorToken, "sync", "full")
	expect(out, code, 0, "full sync requested manual-")
	// The list shows Exchange's state as the collector last saw it: the
	// block once a sync has seen it applied.
	pollEvery(t, 30*time.Second, 100*time.Millisecond, "the CLI's device list to show the phone blocked", func() bool {
		out, _ = cli(viewerToken, "devices", "-q", "applclidemo")
		return strings.Contains(out, demo.DeviceID) && strings.Contains(out, "Blocked")
	})
	expect(out, 0, 0, "alice@contoso.com", "Blocked", "unknown_device", "page 1 of 1, 1 partnerships")
	out, code = cli(viewerToken, "device", demo.DeviceID)
	expect(out, code, 0, "Decided Block by rule unknown_device", "Set-CASMailbox", "ActiveSyncBlockedDeviceIDs", "Mail \"")

	phones, _ := s.massRevocation("ApplCLIMASS0")
	var guard status.Guard
	pollEvery(t, 60*time.Second, 100*time.Millisecond, "the guard to hold the mass revocation", func() bool {
		var ok bool
		guard, ok = statusOf[status.Guard](s, status.GuardKey)
		return ok && guard.State == status.GuardTripped
	})
	out, code = cli(operatorToken, "status")
	expect(out, code, 0, "tripped "+guard.Key)
	out, code = cli(operatorToken, "approve", guard.Key, "-reason", "the three phones were stolen")
	expect(out, code, 1, "add -yes to confirm")
	out, code = cli(operatorToken, "approve", guard.Key, "-reason", "the three phones were stolen", "-yes")
	expect(out, code, 0, "approved")
	for _, p := range phones[:3] {
		s.waitPhone(p, "Blocked", 60*time.Second)
	}

	out, code = cli(operatorToken, "wipe", demo.DeviceID, "-reason", "lost on a train", "-yes")
	expect(out, code, 1, "needs the device-admin role")
	out, code = cli(deviceAdminToken, "wipe", demo.DeviceID, "-reason", "lost on a train", "-yes")
	expect(out, code, 0, "wipe of "+demo.DeviceID+" requested")
	waitEvent(t, s.events, "the wipe done", func(m *ev.AuditEvent) bool {
		return m.GetAction() == "device-wipe" && m.GetTarget() == demo.DeviceID && m.GetOutcome() == "done" && m.GetActor() == "token:helpdesk"
	})
	if r := s.phoneSync(demo); !r.Wiped {
		t.Errorf("the phone's next sync after the wipe: %+v", r)
	}

	out, code = cli(viewerToken, "audit", "-format", "csv")
	expect(out, code, 0, "at,action,actor,source,target,outcome,detail,audit_id", "guard-approve,token:stack", "device-wipe,token:helpdesk", "sync,token:viewer")
}
