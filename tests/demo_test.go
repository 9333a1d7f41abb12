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

	"github.com/easguard/easguard/pkg/natsembed/natstest"
)

// The demo works, with either MDM: deploy/demo.sh --check starts the
// simulators and easguard from freshly built binaries, on free ports and in
// a fresh data directory, walks a phone from quarantined to allowed, and
// stops everything again. By default the MDM is Intune, simulated by
// intunesim and read through Microsoft Graph; DEMO_MDM=file uses an
// inventory file instead.
func TestDemo(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Fatalf("the demo needs bash: %v", err)
	}
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+string(filepath.Separator),
		"github.com/easguard/easguard/services/easguard", "github.com/easguard/easguard/tests/cmd/exchangesim",
		"github.com/easguard/easguard/tests/cmd/intunesim", "github.com/easguard/easguard/tests/cmd/smtpsim",
		"github.com/easguard/easguard/tests/cmd/demowalk")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	// What every walk prints, whatever the MDM.
	common := []string{
		`Quarantined \(Global\)`,
		`access\.decided +BLOCK by rule unknown_device`,
		`enrol: .*https://portal\.manage\.microsoft\.com/enrol\?org=contoso`,
		`HTTP 403, Blocked \(Individual\)`,
		`access\.decided +ALLOW by rule compliant`,
		`HTTP 200, Allowed \(Individual\): the phone gets mail`,
		`time to allow: [0-9.]+s`,
		`the walk passed`,
	}
	for _, tc := range []struct {
		name string
		mdm  string // DEMO_MDM; "" = the default
		want []string
		logs []string // files the data directory must hold
	}{
		{
			name: "graph",
			want: []string{
				`intunesim +https://127\.0\.0\.1:[0-9]+/v1\.0 \(Graph\)`,
				// The first Graph read knew the seeded organisation's phones.
				`mdm\.graph: graph:[-0-9a-f]+, ok at [0-9:]+, [1-9][0-9]{2} devices; easguard has published [1-9][0-9]{2} mdm\.changed events`,
				`POST http://127\.0\.0\.1:[0-9]+/api/devices → 201: Intune device [-0-9a-f]+, demo\.user@contoso\.com`,
				`mdm\.changed +[-0-9a-f]+ from graph:[-0-9a-f]+: compliant, enrolled`,
				`by rule compliant: .*the MDM \(graph:`,
				`from the enrolment in Intune to the phone getting mail`,
				`intunesim smtpsim easguard stopped`,
			},
			logs: []string{"easguard.log", "intunesim.log", "intune.env"},
		},
		{
			name: "file",
			mdm:  "file",
			want: []string{
				`mdm\.file: file:.*inventory\.json, ok`,
				`wrote .*inventory\.json \(2 records\)`,
				`mdm\.changed +intune-ApplDEMO[0-9A-F]+ from file:.*: compliant, enrolled`,
				`from the inventory write to the phone getting mail`,
			},
			logs: []string{"easguard.log", "inventory.json"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addrs := map[string]string{
				"EASGUARD_HTTP_ADDR": natstest.FreeAddr(t), "EASGUARD_CONSOLE_ADDR": natstest.FreeAddr(t), "EASGUARD_NATS_LISTEN": natstest.FreeAddr(t), "EASGUARD_NATS_MONITOR_LISTEN": natstest.FreeAddr(t),
				"DEMO_INTUNESIM_ADDR": natstest.FreeAddr(t), "DEMO_INTUNESIM_ADMIN": natstest.FreeAddr(t),
			}
			data := filepath.Join(t.TempDir(), "demo")
			// Only these variables: none of the developer's EASGUARD_ or DEMO_ settings.
			env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "BIN_DIR=" + bin, "EASGUARD_DATA_DIR=" + data}
			for k, v := range addrs {
				env = append(env, k+"="+v)
			}
			if tc.mdm != "" {
				env = append(env, "DEMO_MDM="+tc.mdm)
			}
			out := runDemo(t, bash, env)
			for _, want := range append(append([]string(nil), common...), tc.want...) {
				if !regexp.MustCompile(want).MatchString(out) {
					t.Errorf("the demo's output has no line matching %q", want)
				}
			}
			if strings.Contains(out, "ALERT") {
				t.Errorf("the demo raised an alert")
			}
			if tc.mdm == "file" && strings.Contains(out, "intunesim") {
				t.Errorf("DEMO_MDM=file started intunesim")
			}
			// Everything the demo started has stopped.
			for k, a := range addrs {
				if c, err := net.DialTimeout("tcp", a, time.Second); err == nil {
					c.Close()
					t.Errorf("%s (%s) still accepts connections after the demo ended", a, k)
				}
			}
			for _, f := range tc.logs {
				if _, err := os.Stat(filepath.Join(data, f)); err != nil {
					t.Errorf("the demo's data directory has no %s: %v", f, err)
				}
			}
		})
	}
}

// runDemo runs deploy/demo.sh --check with env and returns its output; the
// test fails unless it exits 0.
func runDemo(t *testing.T, bash string, env []string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bash, filepath.Join("..", "deploy", "demo.sh"), "--check")
	cmd.Env = env
	// On timeout the script and its children get SIGTERM, so that its
	// trap stops the servers it started.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
	t.Logf("deploy/demo.sh --check took %s:\n%s", time.Since(start).Round(time.Millisecond), out.String())
	if err != nil {
		t.Fatalf("deploy/demo.sh --check: %v (ctx: %v)", err, ctx.Err())
	}
	return out.String()
}
