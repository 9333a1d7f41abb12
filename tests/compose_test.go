//go:build compose

package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The container set of deploy/compose works: on a compose project of its
// own (host ports of its own, volumes of its own), the three NATS nodes form
// a cluster, the console gets ready, and each organisation's demo phone
// goes through the seed flow (quarantined, blocked, mailed through Mailpit,
// enrolled in Intune, allowed) through the containers, with bin/demowalk
// against the published ports. `docker compose down -v` at the end leaves
// nothing running. Needs Docker with Compose and the images of
// `make images`; `make compose-test` runs it (build tag compose, so that
// `make test` needs nothing but Go).
func TestCompose(t *testing.T) {
	start := time.Now()
	t.Cleanup(func() { t.Logf("TestCompose took %s", time.Since(start).Round(time.Second)) })
	c := newComposeProject(t)

	up := time.Now()
	c.run(t, 10*time.Minute, "up", "-d")
	c.waitNATSCluster(t, 3*time.Minute)
	c.waitReady(t, "console", 3*time.Minute)
	c.waitAllRunning(t)
	t.Logf("compose up and ready in %s", time.Since(up).Round(time.Second))

	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+string(filepath.Separator), "github.com/easguard/easguard/tests/cmd/demowalk")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build demowalk: %v\n%s", err, out)
	}
	for _, org := range []string{"contoso", "fabrikam"} {
		t.Run(org, func(t *testing.T) {
			walk := time.Now()
			out := c.walk(t, filepath.Join(bin, "demowalk"), org)
			t.Logf("%s's walk took %s:\n%s", org, time.Since(walk).Round(time.Second), out)
			for _, want := range []string{
				"access.decided", "BLOCK by rule unknown_device", "mail in mailpit",
				"https://portal.manage.microsoft.com/enrol?org=" + org,
				"ALLOW by rule compliant", "Allowed (Individual): the phone gets mail",
			} {
				if !strings.Contains(out, want) {
					t.Errorf("%s's walk did not print %q", org, want)
				}
			}
			c.waitTrace(t, out)
		})
	}
}

// composeProject is one compose project of deploy/compose/docker-compose.yml.
type composeProject struct {
	command []string // docker compose, or docker-compose
	file    string
	name    string
	env     []string
	secrets string
}

// newComposeProject names a project of its own, makes its secrets, and
// takes it down with its volumes at cleanup (after printing the end of its
// logs when the test failed).
func newComposeProject(t testing.TB) *composeProject {
	t.Helper()
	if _, err := exec.LookPath("docker"); err != nil {
		t.Fatalf("the compose test needs Docker: %v", err)
	}
	c := &composeProject{name: fmt.Sprintf("easguardtest%d%d", os.Getpid(), time.Now().UnixNano()%1e6)}
	if exec.Command("docker", "compose", "version").Run() == nil {
		c.command = []string{"docker", "compose"}
	} else if _, err := exec.LookPath("docker-compose"); err == nil {
		c.command = []string{"docker-compose"}
	} else {
		t.Fatal("the compose test needs docker compose or docker-compose")
	}
	for _, image := range []string{"easguard", "exchangesim", "intunesim", "nats-server", "jaeger", "mailpit"} {
		if out, err := exec.Command("docker", "image", "inspect", "-f", "{{.Id}}", "easguard/"+image+":latest").CombinedOutput(); err != nil {
			t.Fatalf("image easguard/%s:latest is missing (run make images): %v\n%s", image, err, out)
		}
	}
	file, err := filepath.Abs(filepath.Join("..", "deploy", "compose", "docker-compose.yml"))
	if err != nil {
		t.Fatal(err)
	}
	c.file = file
	// The test's own secrets, made with a freshly built easguard.
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+string(filepath.Separator), "github.com/easguard/easguard/services/easguard")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build easguard: %v\n%s", err, out)
	}
	c.secrets = filepath.Join(t.TempDir(), "secrets")
	secrets := exec.Command("bash", filepath.Join(filepath.Dir(file), "secrets.sh"), c.secrets)
	secrets.Env = append(os.Environ(), "BIN_DIR="+bin)
	if out, err := secrets.CombinedOutput(); err != nil {
		t.Fatalf("secrets.sh: %v\n%s", err, out)
	}
	// Every published port empty: Docker picks free host ports, so that
	// the test runs next to a `make compose-up` or another test.
	c.env = append(os.Environ(), "EASGUARD_SECRETS_DIR="+c.secrets)
	for _, v := range []string{"NATS_PORT", "NATS_MONITOR_PORT", "JAEGER_UI_PORT", "MAILPIT_PORT", "CONSOLE_PORT",
		"CONSOLE_HEALTH_PORT", "EXCHANGE_CONTOSO_PORT", "INTUNE_CONTOSO_PORT", "EXCHANGE_FABRIKAM_PORT", "INTUNE_FABRIKAM_PORT"} {
		c.env = append(c.env, v+"=")
	}
	t.Cleanup(func() {
		down := time.Now()
		c.run(t, 5*time.Minute, "down", "-v", "--remove-orphans", "--timeout", "15")
		if out, _ := exec.Command("docker", "ps", "-aq", "--filter", "label=com.docker.compose.project="+c.name).Output(); len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("containers of %s left after down: %s", c.name, out)
		}
		if out, _ := exec.Command("docker", "volume", "ls", "-q", "--filter", "label=com.docker.compose.project="+c.name).Output(); len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("volumes of %s left after down -v: %s", c.name, out)
		}
		t.Logf("compose down -v took %s", time.Since(down).Round(time.Second))
	})
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := c.output(t, 2*time.Minute, "logs", "--no-color", "--tail", "40")
			t.Logf("the end of every container's log:\n%s", out)
		}
	})
	return c
}

// output runs a compose command of the project and returns its output.
func (c *composeProject) output(t testing.TB, timeout time.Duration, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	all := append(append(append([]string{}, c.command[1:]...), "-f", c.file, "-p", c.name), args...)
	cmd := exec.CommandContext(ctx, c.command[0], all...)
	cmd.Env = c.env
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w", strings.Join(c.command, " "), strings.Join(args, " "), err)
	}
	return string(out), nil
}

// run runs a compose command of the project and fails the test if it fails.
func (c *composeProject) run(t testing.TB, timeout time.Duration, args ...string) {
	t.Helper()
	if out, err := c.output(t, timeout, args...); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
}

// url is http://host:port of a service's published container port. A
// container that restarted may have another host port: ask again after one.
func (c *composeProject) url(t testing.TB, service string, port int) string {
	t.Helper()
	u, err := c.tryURL(t, service, port)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func (c *composeProject) tryURL(t testing.TB, service string, port int) (string, error) {
	t.Helper()
	out, err := c.output(t, time.Minute, "port", service, fmt.Sprint(port))
	if err != nil {
		return "", fmt.Errorf("%v\n%s", err, out)
	}
	addr := strings.TrimSpace(out)
	if i := strings.LastIndexByte(addr, '\n'); i >= 0 {
		addr = addr[i+1:]
	}
	if addr == "" || strings.HasSuffix(addr, ":0") {
		return "", fmt.Errorf("%s's port %d is not published: %q", service, port, out)
	}
	return "http://" + addr, nil
}

// poll calls try until it succeeds or the deadline passes, then fails the
// test with try's last error.
func poll(t testing.TB, within time.Duration, what string, try func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		err := try()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, within, err)
		}
		<-tick.C
	}
}

// get is GET u's status and body.
func get(u string) (int, []byte, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(u)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, body, err
}

// waitNATSCluster waits until nats-1 is healthy with JetStream and routed
// to the two other nodes.
func (c *composeProject) waitNATSCluster(t testing.TB, within time.Duration) {
	t.Helper()
	poll(t, within, "the NATS cluster", func() error {
		monitor, err := c.tryURL(t, "nats-1", 8222)
		if err != nil {
			return err
		}
		code, body, err := get(monitor + "/healthz?js-enabled-only=true")
		if err != nil || code != http.StatusOK {
			return fmt.Errorf("nats-1 /healthz: %d %s %v", code, body, err)
		}
		code, body, err = get(monitor + "/routez")
		if err != nil || code != http.StatusOK {
			return fmt.Errorf("nats-1 /routez: %d %v", code, err)
		}
		var routez struct {
			Routes []struct {
				RemoteName string `json:"remote_name"`
			} `json:"routes"`
		}
		if err := json.Unmarshal(body, &routez); err != nil {
			return err
		}
		peers := map[string]bool{}
		for _, r := range routez.Routes {
			peers[r.RemoteName] = true
		}
		if !peers["nats-2"] || !peers["nats-3"] {
			return fmt.Errorf("nats-1 is routed to %v, not to nats-2 and nats-3", peers)
		}
		return nil
	})
}

// waitReady waits for a service's /readyz on its published port 9090.
func (c *composeProject) waitReady(t testing.TB, service string, within time.Duration) {
	t.Helper()
	poll(t, within, service+" ready", func() error {
		u, err := c.tryURL(t, service, 9090)
		if err != nil {
			return err
		}
		u += "/readyz"
		code, body, err := get(u)
		if err != nil || code != http.StatusOK {
			return fmt.Errorf("%s: %d %s %v", u, code, body, err)
		}
		return nil
	})
}

// waitAllRunning fails unless every container of the project is running.
func (c *composeProject) waitAllRunning(t testing.TB) {
	t.Helper()
	out, err := c.output(t, time.Minute, "ps", "-q")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	ids := strings.Fields(out)
	if len(ids) == 0 {
		t.Fatal("compose ps: no containers")
	}
	inspect := exec.Command("docker", append([]string{"inspect", "-f", "{{.Name}} {{.State.Status}} {{.RestartCount}}"}, ids...)...)
	states, err := inspect.CombinedOutput()
	if err != nil {
		t.Fatalf("docker inspect: %v\n%s", err, states)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(states)), "\n") {
		if f := strings.Fields(line); len(f) != 3 || f[1] != "running" {
			t.Errorf("container not running: %s", line)
		}
	}
	t.Logf("%d containers (name, state, restarts):\n%s", len(ids), states)
}

// walk runs demowalk for org's demo phone against the published ports and
// returns what it printed.
func (c *composeProject) walk(t testing.TB, demowalk, org string) string {
	t.Helper()
	token, err := os.ReadFile(filepath.Join(c.secrets, "console-token"))
	if err != nil {
		t.Fatal(err)
	}
	nats := strings.Replace(c.url(t, "nats-1", 4222), "http://", "nats://", 1)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, demowalk, "-org", org, "-nats", nats,
		"-easguard", c.url(t, "console", 8443), "-token", strings.TrimSpace(string(token)),
		"-exchange", c.url(t, "exchange-"+org, 8080), "-intune", c.url(t, "intune-"+org, 9091),
		"-mailpit", c.url(t, "mailpit", 8025), "-mailbox", "demo.user@"+org+".com",
		"-enrol-url", "https://portal.manage.microsoft.com/enrol?org="+org,
		"-step-timeout", "90s", "-full-sync-timeout", "4m")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demowalk for %s: %v\n%s", org, err, out)
	}
	return string(out)
}

// waitTrace waits until Jaeger holds the trace of the phone's journey that
// the walk printed, and logs which services' spans it has.
func (c *composeProject) waitTrace(t testing.TB, walk string) {
	t.Helper()
	m := regexp.MustCompile(`journey is trace ([0-9a-f]{32})`).FindStringSubmatch(walk)
	if m == nil {
		t.Fatal("the walk printed no trace id")
	}
	u := c.url(t, "jaeger", 16686) + "/api/traces/" + m[1]
	var spans int
	services := map[string]int{}
	poll(t, 2*time.Minute, "trace "+m[1]+" in Jaeger", func() error {
		code, body, err := get(u)
		if err != nil || code != http.StatusOK {
			return fmt.Errorf("%s: %d %.200s %v", u, code, body, err)
		}
		var doc struct {
			Data []struct {
				Spans []struct {
					ProcessID string `json:"processID"`
				} `json:"spans"`
				Processes map[string]struct {
					ServiceName string `json:"serviceName"`
					Tags        []struct {
						Key   string `json:"key"`
						Value any    `json:"value"`
					} `json:"tags"`
				} `json:"processes"`
			} `json:"data"`
		}
		if err := json.Unmarshal(body, &doc); err != nil {
			return err
		}
		if len(doc.Data) == 0 || len(doc.Data[0].Spans) == 0 {
			return fmt.Errorf("%s: no spans yet", u)
		}
		spans = len(doc.Data[0].Spans)
		clear(services)
		for _, sp := range doc.Data[0].Spans {
			p := doc.Data[0].Processes[sp.ProcessID]
			name := p.ServiceName
			for _, tag := range p.Tags {
				if tag.Key == "service.instance.id" {
					name += "@" + fmt.Sprint(tag.Value)
				}
			}
			services[name]++
		}
		return nil
	})
	t.Logf("Jaeger has trace %s: %d spans, by service@instance (container-pid): %v", m[1], spans, services)
}
