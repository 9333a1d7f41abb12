//go:build compose

package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
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
	c.checkMemoryLimit(t, "contoso-matcher", 512<<20)

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

	// One NATS container killed halfway through a wave of 100 new phones
	// (the one that leads the most streams and buckets), started again
	// once the wave is done on the other two.
	t.Run("wave with a NATS node killed", func(t *testing.T) {
		w := c.newWave(t, "contoso", "wave", 100)
		var victim string
		var killedAt time.Time
		began := time.Now()
		prog := w.run(t, 100*time.Millisecond, 5*time.Minute, func(i int) {
			if i != len(w.devices)/2 {
				return
			}
			victim = c.busiestNATS(t)
			killedAt = time.Now()
			c.run(t, time.Minute, "kill", victim)
			t.Logf("killed %s %s into the wave, %d of %d devices done", victim, killedAt.Sub(began).Round(time.Millisecond), w.done(i), len(w.devices))
		})
		t.Logf("%s wave done in %s; after the kill the pipeline first moved after %s, and its longest stall was %s",
			w.tag, time.Since(began).Round(time.Second), prog.stall(killedAt).Round(time.Millisecond), prog.longestStall(killedAt, time.Now()).Round(time.Millisecond))
		c.logWarnings(t, killedAt, "contoso-collector", "contoso-mdm", "contoso-matcher", "contoso-evaluator",
			"contoso-executor-1", "contoso-executor-2", "contoso-mailer")
		w.check(t)
		c.run(t, 2*time.Minute, "start", victim)
		c.waitHealthy(t, victim, 3*time.Minute)
	})

	// Each worker container of fabrikam restarted in turn (stopped with
	// its grace period, started, waited for until healthy) while a wave of
	// new phones flows, one a second.
	t.Run("rolling restarts", func(t *testing.T) {
		w := c.newWave(t, "fabrikam", "roll", 100)
		workers := []string{"fabrikam-collector", "fabrikam-mdm", "fabrikam-matcher", "fabrikam-evaluator",
			"fabrikam-executor-1", "fabrikam-executor-2", "fabrikam-mailer"}
		began := time.Now()
		// The restarts run beside the wave; what they report comes back
		// over the channel (a goroutine may not log once the test ended).
		type report struct {
			lines []string
			err   error
		}
		restarted := make(chan report, 1)
		w.run(t, time.Second, 5*time.Minute, func(i int) {
			if i != 5 {
				return
			}
			go func() {
				var r report
				defer func() { restarted <- r }()
				for _, svc := range workers {
					at := time.Now()
					if out, err := c.output(t, 2*time.Minute, "restart", "-t", "30", svc); err != nil {
						r.err = fmt.Errorf("%v\n%s", err, out)
						return
					}
					if r.err = c.healthy(t, svc, 3*time.Minute); r.err != nil {
						return
					}
					r.lines = append(r.lines, fmt.Sprintf("restarted %s: healthy again after %s", svc, time.Since(at).Round(time.Millisecond)))
				}
			}()
		})
		r := <-restarted
		for _, l := range r.lines {
			t.Log(l)
		}
		if r.err != nil {
			t.Fatal(r.err)
		}
		t.Logf("%s wave done in %s", w.tag, time.Since(began).Round(time.Second))
		w.check(t)
	})
	c.waitAllRunning(t)
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
	if err := pollErr(within, 500*time.Millisecond, try); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// pollErr calls try every interval until it succeeds or within passes,
// and returns try's last error then; for a goroutine, which may not fail
// the test itself.
func pollErr(within, every time.Duration, try func() error) error {
	deadline := time.Now().Add(within)
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		err := try()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %s: %w", within, err)
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

// waitAllRunning fails unless every container of the project is running
// and none has exited by itself (Docker's restart count is 0).
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
		f := strings.Fields(line)
		switch {
		case len(f) != 3 || f[1] != "running":
			t.Errorf("container not running: %s", line)
		case f[2] != "0":
			// The test's own restarts and kills do not count: only the
			// restart policy's, when a process exited by itself.
			t.Errorf("container exited by itself and was restarted by Docker: %s", line)
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

// jaegerTrace is a trace as Jaeger's query API (/api/traces/<id>) gives it.
type jaegerTrace struct {
	Spans []struct {
		TraceID       string `json:"traceID"`
		SpanID        string `json:"spanID"`
		OperationName string `json:"operationName"`
		References    []struct {
			RefType string `json:"refType"`
			TraceID string `json:"traceID"`
		} `json:"references"`
		Tags      jaegerTags `json:"tags"`
		ProcessID string     `json:"processID"`
	} `json:"spans"`
	Processes map[string]struct {
		ServiceName string     `json:"serviceName"`
		Tags        jaegerTags `json:"tags"`
	} `json:"processes"`
}

// fetchTrace reads one trace from Jaeger's query API.
func (c *composeProject) fetchTrace(t testing.TB, id string) (*jaegerTrace, error) {
	t.Helper()
	u, err := c.tryURL(t, "jaeger", 16686)
	if err != nil {
		return nil, err
	}
	u += "/api/traces/" + id
	code, body, err := get(u)
	if err != nil || code != http.StatusOK {
		return nil, fmt.Errorf("%s: %d %.200s %v", u, code, body, err)
	}
	var doc struct {
		Data []jaegerTrace `json:"data"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, err
	}
	if len(doc.Data) == 0 || len(doc.Data[0].Spans) == 0 {
		return nil, fmt.Errorf("%s: no spans yet", u)
	}
	return &doc.Data[0], nil
}

// jaegerTags are a span's or a process's tags.
type jaegerTags []struct {
	Key   string `json:"key"`
	Value any    `json:"value"`
}

// get is the tag's value as text ("" when absent).
func (tags jaegerTags) get(key string) string {
	for _, tg := range tags {
		if tg.Key == key {
			return fmt.Sprint(tg.Value)
		}
	}
	return ""
}

// waitTrace waits until Jaeger holds the trace of the phone's journey that
// the walk printed, with spans of at least five containers (each process
// has its service.instance.id) and the client spans of the calls that left
// easguard for this phone: the Set-CASMailbox that changed its access, with
// the Client Access server and the cmdlet, and the SMTP send of its mail.
// The Graph read that found its Intune record is in the poll's trace, which
// the journey links to (a Jaeger reference to another trace): one read
// lists every device, so it belongs to no one phone's trace.
func (c *composeProject) waitTrace(t testing.TB, walk string) {
	t.Helper()
	m := regexp.MustCompile(`journey is trace ([0-9a-f]{32})`).FindStringSubmatch(walk)
	if m == nil {
		t.Fatal("the walk printed no trace id")
	}
	journey := m[1]
	var spans int
	services := map[string]int{}
	var clients []string
	poll(t, 2*time.Minute, "trace "+journey+" in Jaeger with five containers and the client spans", func() error {
		tr, err := c.fetchTrace(t, journey)
		if err != nil {
			return err
		}
		spans = len(tr.Spans)
		clear(services)
		clients = clients[:0]
		cmdlet, smtp := false, false
		linked := map[string]bool{}
		for _, sp := range tr.Spans {
			p := tr.Processes[sp.ProcessID]
			services[p.ServiceName+"@"+p.Tags.get("service.instance.id")]++
			for _, r := range sp.References {
				if r.TraceID != journey {
					linked[r.TraceID] = true
				}
			}
			if sp.Tags.get("span.kind") != "client" {
				continue
			}
			clients = append(clients, sp.OperationName+" "+sp.Tags.get("server.address"))
			switch sp.OperationName {
			case "exchange Set-CASMailbox":
				cmdlet = cmdlet || sp.Tags.get("server.address") != "" && sp.Tags.get("easguard.exchange.cmdlet") == "Set-CASMailbox"
			case "smtp send":
				smtp = smtp || sp.Tags.get("server.address") != ""
			}
		}
		if len(services) < 5 {
			return fmt.Errorf("spans of %d containers, want at least 5: %v", len(services), services)
		}
		if !cmdlet || !smtp {
			return fmt.Errorf("client spans Set-CASMailbox %v, smtp send %v: %v", cmdlet, smtp, clients)
		}
		for id := range linked {
			lt, err := c.fetchTrace(t, id)
			if err != nil {
				continue
			}
			for _, sp := range lt.Spans {
				if strings.HasPrefix(sp.OperationName, "GET graph") && sp.Tags.get("span.kind") == "client" &&
					sp.Tags.get("http.response.status_code") == "200" {
					clients = append(clients, sp.OperationName+" (linked trace "+id+")")
					return nil
				}
			}
		}
		return fmt.Errorf("no Graph read in the %d traces the journey links to", len(linked))
	})
	t.Logf("Jaeger has trace %s: %d spans from %d containers (service@instance: spans) %v; client spans %v",
		journey, spans, len(services), services, clients)
}

// composeDevice is one phone of a wave: a new mailbox in the pilot's scope
// and its phone, enrolled in Intune and compliant or never enrolled.
type composeDevice struct {
	mailbox, deviceID string
	enrolled          bool
}

// composeWave is a wave of new phones of one organisation, sent through
// the simulators' admin APIs as the phones and Intune would.
type composeWave struct {
	c                *composeProject
	org, tag         string
	exchange, intune string
	devices          []composeDevice
}

// newWave makes n phones, nine in ten of them enrolled; tag keeps the
// device ids and mailboxes of one wave apart from another's.
func (c *composeProject) newWave(t testing.TB, org, tag string, n int) *composeWave {
	t.Helper()
	w := &composeWave{c: c, org: org, tag: tag, exchange: c.url(t, "exchange-"+org, 8080), intune: c.url(t, "intune-"+org, 9091)}
	for i := range n {
		w.devices = append(w.devices, composeDevice{
			mailbox:  fmt.Sprintf("demo.%s%04d@%s.com", tag, i, org),
			deviceID: fmt.Sprintf("Appl%s%04d", strings.ToUpper(tag), i),
			enrolled: i%10 != 9,
		})
	}
	return w
}

// post sends v as JSON and fails unless the answer has the status want.
func post(u string, v any, want int) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Post(u, "application/json", bytes.NewReader(b))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		return fmt.Errorf("POST %s: %d %s", u, resp.StatusCode, body)
	}
	return nil
}

// send brings device i into being: its mailbox, its phone's first sync
// (Exchange quarantines it) and, when enrolled, its Intune record, made
// before or after the phone syncs by turns, so that partnerships and
// records reach the matchers in either order.
func (w *composeWave) send(i int) error {
	d := w.devices[i]
	alias, domain, _ := strings.Cut(d.mailbox, "@")
	if err := post(w.exchange+"/api/mailboxes", map[string]string{"Alias": alias, "Domain": domain, "DisplayName": alias}, http.StatusCreated); err != nil {
		return err
	}
	enrol := func() error {
		return post(w.intune+"/api/devices", map[string]any{"userPrincipalName": d.mailbox, "emailAddress": d.mailbox,
			"easDeviceId": d.deviceID, "easActivated": true, "complianceState": "compliant", "managementState": "managed",
			"operatingSystem": "iOS", "osVersion": "17.4", "model": "iPhone 15", "manufacturer": "Apple"}, http.StatusCreated)
	}
	if d.enrolled && i%2 == 0 {
		if err := enrol(); err != nil {
			return err
		}
	}
	if err := post(w.exchange+"/api/phones/sync", map[string]string{"mailbox": d.mailbox, "device_id": d.deviceID,
		"device_type": "iPhone", "device_model": "iPhone15,2", "device_os": "iOS 17.4 21E219", "user_agent": "Apple-iPhone15C2/2104.219",
		"friendly_name": "iPhone " + d.deviceID}, http.StatusOK); err != nil {
		return err
	}
	if d.enrolled && i%2 == 1 {
		return enrol()
	}
	return nil
}

// lists reads one mailbox's allowed and blocked device ids from Exchange.
func (w *composeWave) lists(mailbox string) (allowed, blocked []string, err error) {
	code, body, err := get(w.exchange + "/api/mailboxes/lists?mailbox=" + url.QueryEscape(mailbox))
	if err != nil || code != http.StatusOK {
		return nil, nil, fmt.Errorf("lists of %s: %d %s %v", mailbox, code, body, err)
	}
	var l struct{ Allowed, Blocked []string }
	err = json.Unmarshal(body, &l)
	return l.Allowed, l.Blocked, err
}

// done counts the devices of the first n that Exchange holds as the policy
// says: enrolled and compliant on the allowed list only, unknown on the
// blocked list only.
func (w *composeWave) done(n int) int {
	count := 0
	for _, d := range w.devices[:n] {
		allowed, blocked, err := w.lists(d.mailbox)
		if err != nil {
			continue
		}
		inA, inB := containsFold(allowed, d.deviceID), containsFold(blocked, d.deviceID)
		if d.enrolled && inA && !inB || !d.enrolled && inB && !inA {
			count++
		}
	}
	return count
}

// check fails the test unless every device reached Exchange as the policy
// says, exactly once: from the simulator's record of the Set-CASMailbox
// calls it took, an enrolled phone got one allow (or one block, when its
// partnership was judged before its record arrived, then one allow) and an
// unknown phone one block; and Mailpit holds one mail for each unknown
// phone's user and at most one for an enrolled one's. The simulator
// records a cmdlet after its latency, and the mail follows the applied
// block, so both are read until they hold or 30 seconds pass.
func (w *composeWave) check(t testing.TB) {
	t.Helper()
	var problems []string
	blockedFirst := 0
	_ = pollErr(30*time.Second, time.Second, func() error {
		problems, blockedFirst = w.problems(t)
		if len(problems) > 0 {
			return errors.New("not yet")
		}
		return nil
	})
	if len(problems) > 0 {
		for _, p := range problems {
			t.Error(p)
		}
		w.lateOrLost(t, problems)
		return
	}
	t.Logf("%s wave: %d devices, each applied once as the policy says (%d enrolled ones blocked before their record arrived, then allowed)",
		w.tag, len(w.devices), blockedFirst)
}

// lateOrLost follows the problems check failed on for two more minutes
// and logs which of them went away, and when: a mail that comes late
// (a redelivery's backoff after a NATS election) and one that never comes
// are different faults. The test has failed already; this only says which.
func (w *composeWave) lateOrLost(t testing.TB, failed []string) {
	t.Helper()
	device := func(p string) string { id, _, _ := strings.Cut(p, " "); return id }
	open := map[string]bool{}
	for _, p := range failed {
		open[device(p)] = true
	}
	start := time.Now()
	_ = pollErr(2*time.Minute, time.Second, func() error {
		now, _ := w.problems(t)
		still := map[string]bool{}
		for _, p := range now {
			still[device(p)] = true
		}
		for id := range open {
			if !still[id] {
				t.Logf("%s: as the policy says %s after check gave up (late, not lost)", id, time.Since(start).Round(time.Second))
				delete(open, id)
			}
		}
		if len(open) > 0 {
			return errors.New("not yet")
		}
		return nil
	})
	for id := range open {
		t.Logf("%s: still not as the policy says two minutes after check gave up (lost)", id)
	}
}

// problems is what check finds wrong now.
func (w *composeWave) problems(t testing.TB) (problems []string, blockedFirst int) {
	t.Helper()
	code, body, err := get(w.exchange + "/api/requests?kind=cmdlet")
	if err != nil || code != http.StatusOK {
		t.Fatalf("the simulator's record: %d %v", code, err)
	}
	var rec struct {
		Records []struct {
			Cmdlet string          `json:"cmdlet"`
			Params json.RawMessage `json:"params"`
			OK     bool            `json:"ok"`
		} `json:"records"`
	}
	if err := json.Unmarshal(body, &rec); err != nil {
		t.Fatal(err)
	}
	applied := map[string][]string{}
	for _, r := range rec.Records {
		if r.Cmdlet != "Set-CASMailbox" || !r.OK {
			continue
		}
		var params map[string]struct{ Add []string }
		_ = json.Unmarshal(r.Params, &params) // Identity is no list: left empty
		for key, effect := range map[string]string{"ActiveSyncAllowedDeviceIDs": "allow", "ActiveSyncBlockedDeviceIDs": "block"} {
			for _, id := range params[key].Add {
				applied[strings.ToLower(id)] = append(applied[strings.ToLower(id)], effect)
			}
		}
	}
	mails := w.c.mailsTo(t)
	for _, d := range w.devices {
		got := applied[strings.ToLower(d.deviceID)]
		ok := d.enrolled && (slices.Equal(got, []string{"allow"}) || slices.Equal(got, []string{"block", "allow"})) ||
			!d.enrolled && slices.Equal(got, []string{"block"})
		if !ok {
			problems = append(problems, fmt.Sprintf("%s (enrolled %v): Set-CASMailbox applied %v", d.deviceID, d.enrolled, got))
		}
		if len(got) == 2 {
			blockedFirst++
		}
		if n := mails[strings.ToLower(d.mailbox)]; !d.enrolled && n != 1 || d.enrolled && n > 1 {
			problems = append(problems, fmt.Sprintf("%s (enrolled %v): %d mails to %s", d.deviceID, d.enrolled, n, d.mailbox))
		}
	}
	return problems, blockedFirst
}

// mailsTo counts Mailpit's messages by recipient (lower case).
func (c *composeProject) mailsTo(t testing.TB) map[string]int {
	t.Helper()
	u := c.url(t, "mailpit", 8025) + "/api/v1/messages?limit=5000"
	code, body, err := get(u)
	if err != nil || code != http.StatusOK {
		t.Fatalf("%s: %d %v", u, code, err)
	}
	var list struct {
		Total    int `json:"total"`
		Messages []struct {
			To []struct{ Address string } `json:"To"`
		} `json:"messages"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		t.Fatal(err)
	}
	if list.Total > len(list.Messages) {
		t.Fatalf("Mailpit holds %d messages, read %d", list.Total, len(list.Messages))
	}
	out := map[string]int{}
	for _, m := range list.Messages {
		for _, to := range m.To {
			out[strings.ToLower(to.Address)]++
		}
	}
	return out
}

// run sends the wave, one phone every pace, calling during with each
// device's index before it is sent (a fault at a chosen point), waits
// within until every device is as the policy says, and returns the
// progress sampled every second.
func (w *composeWave) run(t testing.TB, pace, within time.Duration, during func(i int)) *progress {
	t.Helper()
	sent := 0
	var mu sync.Mutex
	prog := startProgress(t, time.Second, func() int {
		mu.Lock()
		n := sent
		mu.Unlock()
		return w.done(n)
	})
	tick := time.NewTicker(pace)
	defer tick.Stop()
	for i := range w.devices {
		during(i)
		if err := w.send(i); err != nil {
			t.Fatalf("%s wave, device %d: %v", w.tag, i, err)
		}
		mu.Lock()
		sent++
		mu.Unlock()
		<-tick.C
	}
	poll(t, within, fmt.Sprintf("every device of the %s wave as the policy says", w.tag), func() error {
		if n := w.done(len(w.devices)); n != len(w.devices) {
			return fmt.Errorf("%d of %d done", n, len(w.devices))
		}
		return nil
	})
	prog.stop()
	return prog
}

// busiestNATS is the NATS node that leads the most of easguard's streams
// and buckets: stopping it makes the most groups elect a new leader.
func (c *composeProject) busiestNATS(t testing.TB) string {
	t.Helper()
	u := c.url(t, "nats-1", 8222) + "/jsz?accounts=true&streams=true"
	code, body, err := get(u)
	if err != nil || code != http.StatusOK {
		t.Fatalf("%s: %d %v", u, code, err)
	}
	var jsz struct {
		Accounts []struct {
			Streams []struct {
				Name    string `json:"name"`
				Cluster struct {
					Leader string `json:"leader"`
				} `json:"cluster"`
			} `json:"stream_detail"`
		} `json:"account_details"`
	}
	if err := json.Unmarshal(body, &jsz); err != nil {
		t.Fatal(err)
	}
	led := map[string]int{}
	for _, a := range jsz.Accounts {
		for _, s := range a.Streams {
			led[s.Cluster.Leader]++
		}
	}
	best := "nats-1"
	for _, n := range []string{"nats-2", "nats-3"} {
		if led[n] > led[best] {
			best = n
		}
	}
	t.Logf("stream and bucket leaders: %v", led)
	return best
}

// waitHealthy waits until the service's container reports healthy (its
// compose health check: easguard's /readyz, NATS's /healthz).
func (c *composeProject) waitHealthy(t testing.TB, service string, within time.Duration) {
	t.Helper()
	if err := c.healthy(t, service, within); err != nil {
		t.Fatal(err)
	}
}

// healthy is waitHealthy for a goroutine: it returns what went wrong.
func (c *composeProject) healthy(t testing.TB, service string, within time.Duration) error {
	err := pollErr(within, 500*time.Millisecond, func() error {
		out, err := c.output(t, time.Minute, "ps", "-q", service)
		if err != nil || strings.TrimSpace(out) == "" {
			return fmt.Errorf("%s: %v %s", service, err, out)
		}
		state, err := exec.Command("docker", "inspect", "-f", "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}", strings.TrimSpace(out)).CombinedOutput()
		if err != nil {
			return fmt.Errorf("docker inspect %s: %v %s", service, err, state)
		}
		if s := strings.TrimSpace(string(state)); s != "running healthy" {
			return fmt.Errorf("%s is %s", service, s)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%s healthy: %w", service, err)
	}
	return nil
}

// checkMemoryLimit fails unless the service's easguard logged, at start,
// the soft memory limit it took from its container's cgroup: 90% of the
// compose file's mem_limit (EASGUARD_MEMORY_LIMIT_RATIO's default).
func (c *composeProject) checkMemoryLimit(t testing.TB, service string, memLimit int64) {
	t.Helper()
	out, err := c.output(t, time.Minute, "logs", "--no-color", service)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	want := int64(float64(memLimit) * 0.9)
	for _, line := range strings.Split(out, "\n") {
		_, js, ok := strings.Cut(line, "| ")
		if !ok || !strings.Contains(js, `"go memory limit"`) {
			continue
		}
		var rec struct {
			Limit int64 `json:"gomemlimit_bytes"`
		}
		if err := json.Unmarshal([]byte(js), &rec); err != nil {
			t.Fatalf("%s's memory limit line %q: %v", service, js, err)
		}
		if rec.Limit != want {
			t.Fatalf("%s set GOMEMLIMIT to %d bytes, want 90%% of its %d-byte cgroup limit, %d", service, rec.Limit, memLimit, want)
		}
		t.Logf("%s: GOMEMLIMIT %d bytes from its container's %d-byte limit", service, rec.Limit, memLimit)
		return
	}
	t.Fatalf("%s logged no memory limit from its cgroup:\n%s", service, out)
}

// variablePart is what differs between two warnings of one kind: a
// device id of a wave, a UUID, an encoded key, a number.
var variablePart = regexp.MustCompile(`(?i)appl[a-z]*[0-9]+|[0-9a-f]{8}-[0-9a-f-]{27}|_[a-z0-9]{20,}|[0-9]+`)

// logWarnings logs what the services warned of since a moment, counted by
// service, message and error, so that a stall after a fault can be read
// from the test's output (CI keeps no container logs).
func (c *composeProject) logWarnings(t testing.TB, since time.Time, services ...string) {
	t.Helper()
	out, err := c.output(t, time.Minute, append([]string{"logs", "--no-color"}, services...)...)
	if err != nil {
		t.Logf("logs: %v", err)
		return
	}
	counts := map[string]int{}
	for _, line := range strings.Split(out, "\n") {
		prefix, js, ok := strings.Cut(line, "| ")
		if !ok {
			continue
		}
		var rec struct {
			Time  time.Time `json:"time"`
			Level string    `json:"level"`
			Msg   string    `json:"msg"`
			Error string    `json:"error"`
		}
		if json.Unmarshal([]byte(js), &rec) != nil || rec.Time.Before(since) || rec.Level != "WARN" && rec.Level != "ERROR" {
			continue
		}
		// One kind per message, whatever device, key or id it names.
		what := variablePart.ReplaceAllString(fmt.Sprintf("%s: %.160s", rec.Msg, rec.Error), "…")
		counts[fmt.Sprintf("%s %s %s", strings.TrimSpace(prefix), rec.Level, what)]++
	}
	keys := slices.Sorted(maps.Keys(counts))
	var b strings.Builder
	for i, k := range keys {
		if i == 40 {
			fmt.Fprintf(&b, "\n  … and %d kinds more", len(keys)-i)
			break
		}
		fmt.Fprintf(&b, "\n  %4d× %s", counts[k], k)
	}
	t.Logf("warnings and errors since %s (%d kinds):%s", since.Format(time.TimeOnly), len(keys), b.String())
}
