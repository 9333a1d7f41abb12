package tests

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/tests/simcmd"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// easguardBinary builds services/easguard once per test run.
func easguardBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "easguard-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "easguard")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/easguard/easguard/services/easguard").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// baseEnv is a minimal environment without any EASGUARD_ variable of the
// developer's shell.
func baseEnv(extra ...string) []string {
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	return append(env, extra...)
}

func runBinary(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(easguardBinary(t), args...)
	cmd.Env = env
	cmd.Dir = t.TempDir()
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return o.String(), e.String(), ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return o.String(), e.String(), 0
}

func TestBinaryRefusesBadConfigNamingTheVariable(t *testing.T) {
	tests := []struct {
		name string
		env  []string
		want string
	}{
		{"missing org", nil, "EASGUARD_ORG is required"},
		{"org with a space", []string{"EASGUARD_ORG=contoso ltd"}, "EASGUARD_ORG: invalid organisation name"},
		{"bad duration", []string{"EASGUARD_ORG=contoso", "EASGUARD_SHUTDOWN_TIMEOUT=later"}, "EASGUARD_SHUTDOWN_TIMEOUT"},
		{"listen with remote nats", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=none", "EASGUARD_NATS_URL=nats://127.0.0.1:1", "EASGUARD_NATS_LISTEN=127.0.0.1:4222"}, "EASGUARD_NATS_LISTEN"},
		{"unknown worker", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=collector,reporter"}, "EASGUARD_WORKERS"},
		{"collector without exchange", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=collector"}, "EASGUARD_EXCHANGE_SERVER"},
		{"mailer without smtp host", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=mailer"}, "EASGUARD_MAILER_SMTP_HOST"},
		{"mdm without a source", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=mdm"}, "EASGUARD_MDM_FILE"},
		{"blast radius above one", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=evaluator", "EASGUARD_EVALUATOR_BLAST_RADIUS=1.5"}, "EASGUARD_EVALUATOR_BLAST_RADIUS"},
		{"policy file missing", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=evaluator", "EASGUARD_EVALUATOR_POLICY_FILE=/nonexistent/policy.yaml"}, "EASGUARD_EVALUATOR_POLICY_FILE"},
		{"memory limit ratio above one", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=none", "EASGUARD_MEMORY_LIMIT_RATIO=1.5"}, "EASGUARD_MEMORY_LIMIT_RATIO: must be between 0 (off) and 1"},
		{"memory limit ratio not a number", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=none", "EASGUARD_MEMORY_LIMIT_RATIO=most"}, "EASGUARD_MEMORY_LIMIT_RATIO"},
		{"ack wait too short", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=none", "EASGUARD_ACK_WAIT=10ms"}, "EASGUARD_ACK_WAIT"},
		{"nats beyond loopback without a password", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=none", "EASGUARD_NATS_LISTEN=0.0.0.0:4222"}, "EASGUARD_NATS_LISTEN: \"0.0.0.0:4222\" accepts clients from other machines"},
		{"nats on every interface without a password", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=none", "EASGUARD_NATS_LISTEN=:4222"}, "EASGUARD_NATS_LISTEN"},
		{"nats password too short", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=none", "EASGUARD_NATS_LISTEN=0.0.0.0:4222", "EASGUARD_NATS_LISTEN_USER=easguard", "EASGUARD_NATS_LISTEN_PASSWORD=short"}, "EASGUARD_NATS_LISTEN_PASSWORD"},
		{"nats monitor beyond loopback", []string{"EASGUARD_ORG=contoso", "EASGUARD_WORKERS=none", "EASGUARD_NATS_MONITOR_LISTEN=0.0.0.0:8222"}, "EASGUARD_NATS_MONITOR_LISTEN"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stderr, code := runBinary(t, baseEnv(tt.env...))
			if code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
			if !strings.Contains(stderr, tt.want) {
				t.Errorf("stderr %q does not say %q", stderr, tt.want)
			}
		})
	}
}

func TestHelpListsEveryVariable(t *testing.T) {
	stdout, _, code := runBinary(t, baseEnv(), "--help")
	if code != 0 {
		t.Fatalf("exit code %d", code)
	}
	vars, err := config.Vars(&config.Common{})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"EASGUARD_DATA_DIR", "EASGUARD_NATS_LISTEN", "EASGUARD_NATS_MONITOR_LISTEN"}
	for _, v := range vars {
		want = append(want, v.Key)
	}
	for _, k := range want {
		if !strings.Contains(stdout, k+" ") {
			t.Errorf("--help does not list %s", k)
		}
	}
	if _, _, code := runBinary(t, baseEnv(), "bogus"); code != 2 {
		t.Errorf("unknown command exit %d, want 2", code)
	}
}

// The README's configuration table is generated from the config structs;
// this keeps it from going stale.
func TestREADMEConfigTableIsCurrent(t *testing.T) {
	doc, _, code := runBinary(t, baseEnv(), "config-doc")
	if code != 0 {
		t.Fatalf("config-doc exit %d", code)
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	const begin, end = "<!-- config:begin -->\n", "<!-- config:end -->"
	s := string(readme)
	i, j := strings.Index(s, begin), strings.Index(s, end)
	if i < 0 || j < i {
		t.Fatal("README.md lacks the config:begin/config:end markers")
	}
	if got := s[i+len(begin) : j]; got != doc {
		t.Fatalf("README configuration table is stale; run make docs\n--- README\n%s\n--- config-doc\n%s", got, doc)
	}
}

// process is a started easguard binary.
type process struct {
	cmd    *exec.Cmd
	stderr *simcmd.LockedBuffer
	exited chan struct{} // closed when the process has exited; err is then set
	err    error
	http   string
}

// start runs the all-in-one binary with env (see startBinary).
func start(t testing.TB, env ...string) *process {
	t.Helper()
	return startBinary(t, easguardBinary(t), env...)
}

func (p *process) waitReady(t testing.TB) {
	t.Helper()
	natstest.Eventually(t, 30*time.Second, "/readyz 200", func() bool {
		select {
		case <-p.exited:
			t.Fatalf("easguard exited: %v\n%s", p.err, p.stderr.String())
		default:
		}
		resp, err := http.Get(p.http + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}

func (p *process) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
		if p.err != nil {
			t.Fatalf("easguard exited with %v after SIGTERM\n%s", p.err, p.stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("easguard did not stop within 30s of SIGTERM")
	}
}

func TestBinaryRunsWithEmbeddedNATS(t *testing.T) {
	p := start(t, "EASGUARD_ORG=contoso", "EASGUARD_WORKERS=none")
	p.waitReady(t)
	for _, path := range []string{"/healthz", "/metrics"} {
		resp, err := http.Get(p.http + path)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %v %v", path, err, resp)
		}
		resp.Body.Close()
	}
	p.stop(t)
	if !strings.Contains(p.stderr.String(), `"msg":"stopped"`) {
		t.Errorf("no orderly stop in the logs:\n%s", p.stderr.String())
	}
}

// runAuthServer starts a NATS server that requires a user and password,
// reachable over TCP like a production server.
func runAuthServer(t *testing.T, user, password string) string {
	t.Helper()
	ns, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true, StoreDir: t.TempDir(),
		NoLog: true, NoSigs: true, Username: user, Password: password,
	})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats not ready")
	}
	t.Cleanup(ns.Shutdown)
	return "nats://" + ns.Addr().String()
}

func TestBinaryUsesRemoteNATSAndKeepsTheSecret(t *testing.T) {
	const password = "Pa55-w0rd-never-logged"
	url := runAuthServer(t, "easguard", password)

	t.Run("password from file", func(t *testing.T) {
		pw := filepath.Join(t.TempDir(), "nats-password")
		if err := os.WriteFile(pw, []byte(password+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		p := start(t, "EASGUARD_ORG=contoso", "EASGUARD_WORKERS=none", "EASGUARD_NATS_URL="+url, "EASGUARD_NATS_USER=easguard", "EASGUARD_NATS_PASSWORD_FILE="+pw, "EASGUARD_LOG_LEVEL=debug")
		p.waitReady(t)
		// The binary provisioned the topology on the remote server.
		nc, err := nats.Connect(url, nats.UserInfo("easguard", password))
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		js, _ := jetstream.New(nc)
		if _, err := js.Stream(context.Background(), bus.StreamEAS); err != nil {
			t.Fatalf("stream not provisioned: %v", err)
		}
		p.stop(t)
		if strings.Contains(p.stderr.String(), password) {
			t.Fatal("the NATS password appears in the logs")
		}
	})
	t.Run("wrong password", func(t *testing.T) {
		_, stderr, code := runBinary(t, baseEnv("EASGUARD_ORG=contoso", "EASGUARD_WORKERS=none", "EASGUARD_NATS_URL="+url, "EASGUARD_NATS_USER=easguard", "EASGUARD_NATS_PASSWORD=wrong-"+password))
		if code != 1 {
			t.Errorf("exit %d, want 1", code)
		}
		if !strings.Contains(stderr, "Authorization Violation") && !strings.Contains(stderr, "authorization") {
			t.Errorf("stderr does not say authorisation failed: %q", stderr)
		}
		if strings.Contains(stderr, password) {
			t.Fatal("the password appears in the error")
		}
	})
}

// The README's subject and stream table names every stream and family the
// code provisions.
func TestREADMEListsEveryStream(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, cfg := range bus.DefaultTopology().StreamConfigs() {
		if !strings.Contains(string(readme), "`"+cfg.Name+"`") {
			t.Errorf("README does not list stream %s", cfg.Name)
		}
	}
	for _, e := range bus.Events {
		if !strings.Contains(string(readme), "."+e.Name()) {
			t.Errorf("README does not list subject family %s", e.Name())
		}
	}
}
