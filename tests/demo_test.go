package tests

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The demo works: deploy/demo.sh --check starts the simulators and
// easguard from freshly built binaries, on free ports and in a fresh data
// directory, walks a phone from quarantined to allowed, and stops
// everything again.
func TestDemo(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Fatalf("the demo needs bash: %v", err)
	}
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+string(filepath.Separator),
		"github.com/easguard/easguard/services/easguard", "github.com/easguard/easguard/tests/cmd/exchangesim",
		"github.com/easguard/easguard/tests/cmd/smtpsim", "github.com/easguard/easguard/tests/cmd/demowalk")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	httpAddr, natsAddr, monitorAddr := freeAddr(t), freeAddr(t), freeAddr(t)
	data := filepath.Join(t.TempDir(), "demo")

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bash, filepath.Join("..", "deploy", "demo.sh"), "--check")
	// Only these variables: none of the developer's EASGUARD_ settings.
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "BIN_DIR=" + bin, "EASGUARD_DATA_DIR=" + data,
		"EASGUARD_HTTP_ADDR=" + httpAddr, "EASGUARD_NATS_LISTEN=" + natsAddr, "EASGUARD_NATS_MONITOR_LISTEN=" + monitorAddr}
	// On timeout the script and its children get SIGTERM, so that its
	// trap stops the servers it started.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err = cmd.Run()
	t.Logf("deploy/demo.sh --check took %s:\n%s", time.Since(start).Round(time.Millisecond), out.String())
	if err != nil {
		t.Fatalf("deploy/demo.sh --check: %v (ctx: %v)", err, ctx.Err())
	}
	for _, want := range []string{
		`Quarantined \(Global\)`,
		`access\.decided +BLOCK by rule unknown_device`,
		`enrol: .*https://portal\.manage\.microsoft\.com/enrol\?org=contoso`,
		`HTTP 403, Blocked \(Individual\)`,
		`mdm\.changed .*compliant`,
		`access\.decided +ALLOW by rule compliant`,
		`HTTP 200, Allowed \(Individual\): the phone gets mail`,
		`time to allow: [0-9.]+s`,
		`the walk passed`,
	} {
		if !regexp.MustCompile(want).MatchString(out.String()) {
			t.Errorf("the demo's output has no line matching %q", want)
		}
	}
	if strings.Contains(out.String(), "ALERT") {
		t.Errorf("the demo raised an alert")
	}
	// Everything the demo started has stopped.
	for _, a := range []string{httpAddr, natsAddr, monitorAddr} {
		if c, err := net.DialTimeout("tcp", a, time.Second); err == nil {
			c.Close()
			t.Errorf("%s still accepts connections after the demo ended", a)
		}
	}
	if _, err := os.Stat(filepath.Join(data, "easguard.log")); err != nil {
		t.Errorf("the demo's data directory has no easguard log: %v", err)
	}
}
