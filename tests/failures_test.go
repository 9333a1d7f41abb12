package tests

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
	"github.com/easguard/easguard/tests/simcmd"
)

var (
	workerBinMu sync.Mutex
	workerBins  = map[string]string{}
)

// workerBinary builds one worker's own binary (services/<name>) once per
// test run.
func workerBinary(t *testing.T, name string) string {
	t.Helper()
	workerBinMu.Lock()
	defer workerBinMu.Unlock()
	if p, ok := workerBins[name]; ok {
		return p
	}
	dir, err := os.MkdirTemp("", "easguard-"+name+"-")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if out, err := exec.Command("go", "build", "-o", p, "github.com/easguard/easguard/services/"+name).CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", name, err, out)
	}
	workerBins[name] = p
	return p
}

// startBinary runs `bin run` with env, a health address and a data
// directory of its own; it is killed at cleanup, its logs shown if the
// test failed.
func startBinary(t testing.TB, bin string, env ...string) *process {
	t.Helper()
	addr := natstest.FreeAddr(t)
	cmd := exec.Command(bin, "run")
	cmd.Env = baseEnv(append([]string{"EASGUARD_HTTP_ADDR=" + addr, "EASGUARD_DATA_DIR=" + t.TempDir()}, env...)...)
	p := &process{cmd: cmd, stderr: &simcmd.LockedBuffer{}, exited: make(chan struct{}), http: "http://" + addr}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Logf("%s logs:\n%s", filepath.Base(bin), p.stderr.String())
		}
	})
	return p
}

// readyz returns the status and body of the process's /readyz.
func (p *process) readyz() (int, string) {
	resp, err := http.Get(p.http + "/readyz")
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// A worker running as its own binary (here the executor's) dead-letters a
// message that reached its consumer's MaxDeliver without being settled:
// the in-process stack runs no dead-letter mover, so only the worker
// process can have moved it.
func TestSplitWorkerBinaryDeadLettersMaxDelivered(t *testing.T) {
	s := startStack(t, stackOptions{workers: []string{}})
	p := startBinary(t, workerBinary(t, "executor"), s.processEnv("executor")...)
	p.waitReady(t)

	// A consumer that gets a message twice and never settles it, as a
	// worker that crashes on it every time does.
	ctx := natstest.Context(t)
	js, err := jetstream.New(s.svc.NC)
	if err != nil {
		t.Fatal(err)
	}
	subject, err := bus.SyncCompleted.Subject(testOrg, "")
	if err != nil {
		t.Fatal(err)
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, bus.StreamSync, jetstream.ConsumerConfig{
		Durable: "probe-crashing", FilterSubject: subject, AckPolicy: jetstream.AckExplicitPolicy,
		AckWait: time.Second, MaxDeliver: 2, DeliverPolicy: jetstream.DeliverNewPolicy,
	})
	if err != nil {
		t.Fatal(err)
	}
	ack, err := js.PublishMsg(ctx, &nats.Msg{Subject: subject, Data: []byte("a message no worker can settle"), Header: nats.Header{jetstream.MsgIDHeader: []string{"probe-maxdeliver"}}})
	if err != nil {
		t.Fatal(err)
	}
	for delivery := 1; delivery <= 2; delivery++ {
		natstest.Eventually(t, 10*time.Second, fmt.Sprintf("delivery %d", delivery), func() bool {
			batch, err := cons.Fetch(1, jetstream.FetchMaxWait(500*time.Millisecond))
			if err != nil {
				return false
			}
			for m := range batch.Messages() {
				if md, err := m.Metadata(); err == nil && md.Sequence.Stream == ack.Sequence {
					return true // and never acknowledged
				}
			}
			return false
		})
	}
	var dead string
	natstest.Eventually(t, 20*time.Second, "the dead letter of the max-delivered message", func() bool {
		// The consumer keeps asking, as a restarted worker does; the
		// server notices the exhausted message when it would deliver it.
		if batch, err := cons.Fetch(1, jetstream.FetchMaxWait(200*time.Millisecond)); err == nil {
			for m := range batch.Messages() {
				t.Errorf("delivered again after MaxDeliver: %s", m.Subject())
			}
		}
		for _, d := range s.events.deadLetters() {
			if strings.Contains(d, "reached max deliveries (2) on consumer probe-crashing") {
				dead = d
				return true
			}
		}
		return false
	})
	t.Logf("moved by the executor binary: %s", dead)
	if n := len(s.events.deadLetters()); n != 1 {
		t.Errorf("%d dead letters, want 1: %v", n, s.events.deadLetters())
	}
}

// A worker whose consumer cannot bind says why on /readyz while it keeps
// trying, then exits non-zero with the reason: it never runs on, green,
// without doing its work.
func TestWorkerThatCannotBindFailsReadinessAndExits(t *testing.T) {
	for _, tt := range []struct {
		name    string
		workers string
		// conflict creates what keeps the worker's consumer from binding.
		conflict func(ctx context.Context, js jetstream.JetStream) error
		reason   string // in /readyz and in the exit message
	}{
		{"executor consumer with a conflicting configuration", "executor", func(ctx context.Context, js jetstream.JetStream) error {
			// Same durable name, but no acknowledgements: the ack policy
			// of a consumer cannot be changed.
			_, err := js.CreateConsumer(ctx, bus.StreamDecisions, jetstream.ConsumerConfig{
				Durable: "executor-access-decided-" + testOrg, FilterSubject: bus.AccessDecided.Filter(testOrg), AckPolicy: jetstream.AckNonePolicy,
			})
			return err
		}, "bind consumer executor-access-decided-" + testOrg},
		{"dead-letter mover's work queue taken by another consumer", "matcher", func(ctx context.Context, js jetstream.JetStream) error {
			// A work-queue stream refuses a second consumer over the same
			// subjects.
			_, err := js.CreateConsumer(ctx, bus.StreamAdvisories, jetstream.ConsumerConfig{
				Durable: "someone-else", FilterSubject: "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>", AckPolicy: jetstream.AckExplicitPolicy,
			})
			return err
		}, "bind consumer deadletter-max-deliveries"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := startStack(t, stackOptions{workers: []string{}})
			js, err := jetstream.New(s.svc.NC)
			if err != nil {
				t.Fatal(err)
			}
			if err := tt.conflict(natstest.Context(t), js); err != nil {
				t.Fatal(err)
			}
			const bindTimeout = 4 * time.Second
			started := time.Now()
			p := start(t, append(s.processEnv(tt.workers), "EASGUARD_BIND_TIMEOUT="+bindTimeout.String())...)
			var body string
			natstest.Eventually(t, 20*time.Second, "/readyz failing with the reason", func() bool {
				code, b := p.readyz()
				body = b
				return code == http.StatusServiceUnavailable && strings.Contains(b, tt.reason)
			})
			t.Logf("/readyz: %s", strings.TrimSpace(body))
			select {
			case <-p.exited:
			case <-time.After(bindTimeout + 20*time.Second):
				t.Fatalf("still running %s after start, bind timeout %s", time.Since(started), bindTimeout)
			}
			took := time.Since(started)
			var exit *exec.ExitError
			if !errors.As(p.err, &exit) || exit.ExitCode() != 1 {
				t.Fatalf("exit %v, want code 1", p.err)
			}
			logs := p.stderr.String()
			last := logs[strings.LastIndex(strings.TrimRight(logs, "\n"), "\n")+1:]
			if !strings.HasPrefix(last, "easguard: ") || !strings.Contains(last, tt.reason) || !strings.Contains(last, "EASGUARD_BIND_TIMEOUT") {
				t.Errorf("last line %q does not give the reason %q", last, tt.reason)
			}
			t.Logf("exited with code 1 after %s: %s", took.Round(100*time.Millisecond), strings.TrimSpace(last))
		})
	}
}

// A user is told of a block only once Exchange holds it: the mail goes
// out after the executor's access.applied (Exchange answers slowly here,
// so a mail sent on the decision would come first), and a block the
// executor can never apply, which ends dead-lettered, sends no mail.
func TestMailFollowsTheAppliedBlock(t *testing.T) {
	// Three deliveries, so a decision that cannot be applied is
	// dead-lettered within seconds.
	s := startStack(t, stackOptions{common: func(c *config.Common) { c.MaxDeliver = 3 }})
	s.waitFullSync()

	t.Run("applied", func(t *testing.T) {
		phone := iPhone("alice@contoso.com", "ApplAPPLIED00001")
		if _, err := s.sim.Inject(exchangesim.Fault{Endpoint: s.sim.Endpoints()[0].Name, Kind: "slow_receive", DelayMS: 1500}); err != nil {
			t.Fatal(err)
		}
		s.phoneSync(phone)
		d := waitEvent(t, s.events, "the block decided", decidedFor(phone.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK))
		var mailSeen time.Time
		natstest.Eventually(t, 60*time.Second, "the mail", func() bool {
			if len(s.mailsTo("alice@contoso.com")) > 0 {
				mailSeen = time.Now()
				return true
			}
			return false
		})
		if _, err := s.sim.Inject(exchangesim.Fault{Endpoint: s.sim.Endpoints()[0].Name, Kind: "clear"}); err != nil {
			t.Fatal(err)
		}
		applied := waitEvent(t, s.events, "access.applied of the block", func(a *ev.AccessApplied) bool {
			return len(a.GetItems()) > 0 && a.GetItems()[0].GetDecisionId() == d.GetDecisionId()
		})
		at := applied.GetAppliedAt().AsTime()
		t.Logf("decided %s, applied %s later, mail seen %s after that",
			d.GetDecidedAt().AsTime().Format(time.RFC3339Nano), at.Sub(d.GetDecidedAt().AsTime()).Round(time.Millisecond), mailSeen.Sub(at).Round(time.Millisecond))
		if mailSeen.Before(at) {
			t.Errorf("the mail arrived %s before the block was applied", at.Sub(mailSeen))
		}
		if o := applied.GetItems()[0].GetOutcome(); o != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
			t.Errorf("outcome %s", o)
		}
		if r := s.waitPhone(phone, "Blocked", 30*time.Second); r.GetsMail {
			t.Errorf("phone %+v", r)
		}
	})

	t.Run("dead-lettered", func(t *testing.T) {
		// The role loses Set-CASMailbox (an administrator trimmed it):
		// every apply fails until the executor dead-letters the decision.
		var reads []string
		for _, c := range exchange.AllowedCmdlets {
			if !strings.EqualFold(c, "Set-CASMailbox") {
				reads = append(reads, c)
			}
		}
		s.sim.Org.Grant(reads)
		t.Cleanup(func() { s.sim.Org.Grant(nil) })
		phone := iPhone("bob@contoso.com", "ApplDEADLETTER01")
		s.phoneSync(phone)
		d := waitEvent(t, s.events, "the block decided", decidedFor(phone.DeviceID, ev.DesiredAccess_DESIRED_ACCESS_BLOCK))
		natstest.Eventually(t, 60*time.Second, "the executor's dead letter", func() bool {
			for _, dl := range s.events.deadLetters() {
				if strings.Contains(dl, ".dlq.executor") {
					return true
				}
			}
			return false
		})
		if r := s.phoneSync(phone); r.State == "Blocked" {
			t.Fatalf("the phone is blocked although Set-CASMailbox was refused: %+v", r)
		}
		s.settle()
		if a := find(s.events, func(a *ev.AccessApplied) bool { return slices0(a.GetDecisionIds()) == d.GetDecisionId() }); len(a) != 0 {
			t.Errorf("access.applied for a dead-lettered decision: %v", a)
		}
		if m := s.mailsTo("bob@contoso.com"); len(m) != 0 {
			t.Errorf("%d mails for a block that never happened: %q", len(m), m[0].Subject)
		}
		if n := find(s.events, func(m *ev.NotificationSent) bool { return m.GetDeviceId() == phone.DeviceID }); len(n) != 0 {
			t.Errorf("notify.sent for a block that never happened: %v", n)
		}
		t.Logf("dead letters: %v", s.events.deadLetters())
	})
}

func slices0(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}
