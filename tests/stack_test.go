package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/collector"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/console"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/executor"
	"github.com/easguard/easguard/pkg/mailer"
	"github.com/easguard/easguard/pkg/natsembed"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/service"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
	"github.com/easguard/easguard/tests/intunesim"
	"github.com/easguard/easguard/tests/smtpsim"
)

const (
	testOrg  = "contoso"
	enrolURL = "https://portal.manage.microsoft.com/enrol?org=contoso"
	smtpUser = "easguard"
	smtpPass = "smtp-secret-1"
)

// stackOptions vary a test's easguard.
type stackOptions struct {
	policy   string                  // YAML; empty: the default policy
	seed     *exchangesim.SeedSpec   // Exchange's population
	profile  exchangesim.Profile     // Exchange's latency
	workers  []string                // default: all
	join     *stack                  // share this stack's simulators and NATS instead of starting new ones
	evaluate func(*evaluator.Config) // tweak the evaluator
	executor func(*executor.Config)  // tweak the executor
	collect  func(*collector.Config) // tweak the collector
	graph    bool                    // the MDM is Intune through Graph (intunesim), not an inventory file
	mdm      func(*pipeline.MDMConfig)
	sim      func(*exchangesim.Config) // tweak the Exchange simulator (not with join)
	exchange func(*exchange.Config)    // tweak easguard's Exchange settings
	common   func(*config.Common)      // tweak the settings every worker shares
	mail     func(*mailer.Config)      // tweak the mailer
	natsURL  string                    // an external NATS (a cluster's URLs) instead of the embedded server
	replicas int                       // EASGUARD_NATS_REPLICAS; 0: 1
	org      string                    // the organisation; empty: testOrg
	console  func(*console.Config)     // tweak the console (sign-in for a browser)
}

// The API tokens of every stack's console, one per role, as its tokens
// file lists them.
const (
	operatorToken    = "stack-operator-token-0123456789"
	viewerToken      = "stack-viewer-token-0123456789"
	deviceAdminToken = "stack-device-admin-token-0123456789"
)

// fixture is what a test's easguard talks to: the Exchange simulator, the
// SMTP server, the MDM inventory file and the policy file.
type fixture struct {
	sim       *exchangesim.Sim
	smtp      *smtpsim.Server
	dir       string
	inventory string
	smtpCA    string
	policy    string         // policy file; empty: the default policy
	intune    *intunesim.Sim // with stackOptions.graph
}

// stack is easguard running for one test: real NATS, the Exchange
// simulator over real WinRM, a real SMTP server, an MDM inventory file.
type stack struct {
	*fixture
	t        testing.TB
	org      string // the organisation this stack serves
	common   config.Common
	svc      *service.Service
	sections pipeline.Sections
	natsAddr string
	// consoleURL is the stack's console and API; operatorToken an API
	// token of its tokens file with the operator role.
	consoleURL string
	spans      *tracetest.SpanRecorder
	events     *eventLog
	cancel     context.CancelFunc
	done       chan error
}

func newFixture(t testing.TB, o stackOptions) *fixture {
	t.Helper()
	if o.seed == nil {
		o.seed = &exchangesim.SeedSpec{Mailboxes: 5, Partnerships: 0, Seed: 1, NoHostile: true}
	}
	scfg := exchangesim.Config{Seed: o.seed, Profile: o.profile}
	if o.sim != nil {
		o.sim(&scfg)
	}
	sim := exchangesim.StartTest(t, scfg)
	for _, mb := range []exchangesim.MailboxSpec{{Alias: "alice", DisplayName: "Alice Adams"}, {Alias: "bob", DisplayName: "Bob Brown"}, {Alias: "carol", DisplayName: "Carol Clark"}} {
		if _, err := sim.Org.AddMailbox(mb); err != nil {
			t.Fatal(err)
		}
	}
	mail := smtpsim.StartTest(t, smtpsim.Config{Users: map[string]string{smtpUser: smtpPass}, RequireTLS: true})
	f := &fixture{sim: sim, smtp: mail, dir: t.TempDir()}
	f.smtpCA = filepath.Join(f.dir, "smtp-ca.pem")
	if err := os.WriteFile(f.smtpCA, mail.CertPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	f.inventory = filepath.Join(f.dir, "inventory.json")
	if err := os.WriteFile(f.inventory, []byte("[]"), 0o600); err != nil {
		t.Fatal(err)
	}
	if o.graph {
		f.intune = intunesim.StartTest(t, intunesim.Config{})
	}
	if o.policy != "" {
		f.policy = filepath.Join(f.dir, "policy.yaml")
		if err := os.WriteFile(f.policy, []byte(o.policy), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// Test settings: short intervals and windows, so flows take seconds.
const (
	testLeaseTTL = 2 * time.Second
	testAckWait  = 2 * time.Second
)

func startStack(t testing.TB, o stackOptions) *stack {
	t.Helper()
	var f *fixture
	if o.join != nil {
		f = o.join.fixture
	} else {
		f = newFixture(t, o)
	}
	ecfg := evaluator.Config{BlastRadius: 0.1, BlastMinimum: 3, MDMWindow: 300 * time.Millisecond, PolicyFile: f.policy, ReplicationGrace: 15 * time.Minute}
	if o.evaluate != nil {
		o.evaluate(&ecfg)
	}
	mcfg := pipeline.MDMConfig{File: f.inventory, FileFormat: "json", MassRemovalShare: 0.5}
	if f.intune != nil {
		mcfg = pipeline.MDMConfig{MassRemovalShare: 0.5, GraphTenant: f.intune.Tenant(), GraphClientID: f.intune.ClientID(),
			GraphClientSecret: config.Secret(f.intune.ClientSecret()), GraphAuthority: f.intune.URL(), GraphURL: f.intune.GraphURL(),
			GraphCABundle: f.intune.CAFile(t), GraphProxy: "none", GraphPollInterval: time.Second, GraphFullResync: time.Hour, GraphMissingAfter: time.Hour}
	}
	if o.mdm != nil {
		o.mdm(&mcfg)
	}
	// The first full sync waits for the MDM inventory as it does by
	// default, within a bound that keeps a test without an inventory
	// source short.
	cc := collector.Config{QuickInterval: time.Second, FullInterval: time.Hour, QuickOverlap: time.Minute, EnforceSettings: true, MDMWait: 20 * time.Second}
	if o.collect != nil {
		o.collect(&cc)
	}
	xc := executor.Config{Window: 20 * time.Millisecond, MaxBatch: 500, Parallel: 32}
	if o.executor != nil {
		o.executor(&xc)
	}
	host, port := splitAddr(t, f.smtp.Addr())
	xcfg := f.sim.ExchangeConfig(t)
	if o.exchange != nil {
		o.exchange(&xcfg)
	}
	s := &stack{fixture: f, t: t, spans: tracetest.NewSpanRecorder(), events: &eventLog{}}
	common := config.Common{Org: testOrg, HTTPAddr: "127.0.0.1:0", LogLevel: "error", LeaseTTL: testLeaseTTL, AckWait: testAckWait,
		Retention: time.Hour, NatsReplicas: max(o.replicas, 1), ShutdownTimeout: 10 * time.Second, Concurrency: 4}
	if o.org != "" {
		common.Org = o.org
	}
	if o.common != nil {
		o.common(&common)
	}
	s.org, s.common = common.Org, common
	s.sections = pipeline.Sections{
		Exchange:  &xcfg,
		Collector: &cc,
		Evaluator: &ecfg,
		Executor:  &xc,
		Mailer: &mailer.Config{SmtpHost: host, SmtpPort: port, SmtpSecurity: "starttls", SmtpUser: smtpUser, SmtpPassword: config.Secret(smtpPass),
			SmtpCABundle: f.smtpCA, From: "IT Service <it@contoso.com>", EnrolURL: enrolURL, Helpdesk: "helpdesk@contoso.com, +49 30 1234", Company: "Contoso", Locale: "en", Period: 24 * time.Hour},
		MDM: &mcfg,
	}
	if o.mail != nil {
		o.mail(s.sections.Mailer)
	}
	workers := o.workers
	if workers == nil {
		workers = pipeline.All
	}
	if err := pipeline.Validate(workers, s.sections); err != nil {
		t.Fatal(err)
	}
	// EASGUARD_TEST_LOG=debug (or info, …) shows the stack's logs.
	var logs io.Writer = io.Discard
	if lvl := os.Getenv("EASGUARD_TEST_LOG"); lvl != "" {
		logs, common.LogLevel = os.Stderr, lvl
	}
	opts := service.Options{Name: "e2e", Common: common, LogOutput: logs, SpanProcessor: s.spans}
	switch {
	case o.natsURL != "":
		opts.Common.NatsURL = o.natsURL
	case o.join != nil:
		opts.Common.NatsURL = o.join.natsAddr
	default:
		opts.Embedded = &natsembed.Options{StoreDir: filepath.Join(t.TempDir(), "nats"), Listen: "127.0.0.1:0"}
	}
	ctx, cancel := context.WithCancel(context.Background())
	svc, err := service.Start(ctx, opts)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	s.svc, s.cancel, s.done = svc, cancel, make(chan error, 1)
	s.natsAddr = opts.Common.NatsURL
	if svc.Embedded != nil {
		s.natsAddr = svc.Embedded.ClientURL()
	}
	if err := pipeline.Start(ctx, svc, bus.Org(s.org), workers, s.sections); err != nil {
		cancel()
		_ = svc.Run(ctx)
		t.Fatal(err)
	}
	// The console, as an administrator reaches easguard: syncs and status
	// go through its API with an operator's token.
	tokens := filepath.Join(t.TempDir(), "console-tokens")
	if err := os.WriteFile(tokens, []byte("stack operator "+console.HashToken(operatorToken)+"\nviewer viewer "+console.HashToken(viewerToken)+
		"\nhelpdesk device-admin "+console.HashToken(deviceAdminToken)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ccfg := console.Config{Addr: "127.0.0.1:0", TokensFile: tokens, SessionTTL: time.Hour}
	if o.console != nil {
		o.console(&ccfg)
	}
	if err := ccfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if s.consoleURL, err = pipeline.StartConsole(ctx, svc, ccfg, s.org); err != nil {
		cancel()
		_ = svc.Run(ctx)
		t.Fatal(err)
	}
	sub, err := svc.NC.Subscribe("easguard."+s.org+".>", s.events.add)
	if err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- svc.Run(ctx) }()
	t.Cleanup(func() {
		_ = sub.Unsubscribe()
		s.stop()
		if t.Failed() {
			t.Log(s.events.dump())
		}
	})
	return s
}

// processEnv is the environment of a separate `easguard run` process that
// runs the given workers against this stack's NATS and simulators, with
// the settings of the in-process workers.
func (s *stack) processEnv(workers string) []string {
	x, c, e, ex, m := s.sections.Exchange, s.sections.Collector, s.sections.Evaluator, s.sections.Executor, s.sections.Mailer
	env := append([]string{
		"EASGUARD_ORG=" + s.org, "EASGUARD_NATS_URL=" + s.natsAddr, "EASGUARD_WORKERS=" + workers, "EASGUARD_LOG_LEVEL=info",
		fmt.Sprint("EASGUARD_NATS_REPLICAS=", s.svc.Topology().Replicas),
		"EASGUARD_LEASE_TTL=" + testLeaseTTL.String(), "EASGUARD_ACK_WAIT=" + testAckWait.String(), "EASGUARD_SHUTDOWN_TIMEOUT=10s",
		// The stack's retention: with the default, the process's start
		// would update every event stream the stack made, racing the
		// consumers being created (a race inside nats-server's file
		// store that -race reports in this test process).
		"EASGUARD_RETENTION=" + s.common.Retention.String(),
		fmt.Sprint("EASGUARD_EXCHANGE_WORKERS=", x.Workers), "EASGUARD_EXCHANGE_OPERATION_TIMEOUT=" + x.OperationTimeout.String(),
		"EASGUARD_COLLECTOR_QUICK_INTERVAL=" + c.QuickInterval.String(), "EASGUARD_COLLECTOR_FULL_INTERVAL=" + c.FullInterval.String(),
		"EASGUARD_COLLECTOR_QUICK_OVERLAP=" + c.QuickOverlap.String(), "EASGUARD_COLLECTOR_MDM_WAIT=" + c.MDMWait.String(),
		fmt.Sprint("EASGUARD_CONCURRENCY=", s.common.Concurrency),
		fmt.Sprint("EASGUARD_EVALUATOR_BLAST_RADIUS=", e.BlastRadius), fmt.Sprint("EASGUARD_EVALUATOR_BLAST_MINIMUM=", e.BlastMinimum),
		"EASGUARD_EVALUATOR_MDM_WINDOW=" + e.MDMWindow.String(), "EASGUARD_EVALUATOR_REPLICATION_GRACE=" + e.ReplicationGrace.String(), "EASGUARD_EVALUATOR_POLICY_FILE=" + e.PolicyFile, fmt.Sprint("EASGUARD_EVALUATOR_DRY_RUN=", e.DryRun),
		"EASGUARD_EXECUTOR_WINDOW=" + ex.Window.String(), fmt.Sprint("EASGUARD_EXECUTOR_MAX_BATCH=", ex.MaxBatch), fmt.Sprint("EASGUARD_EXECUTOR_PARALLEL=", ex.Parallel),
		"EASGUARD_MAILER_SMTP_HOST=" + m.SmtpHost, fmt.Sprint("EASGUARD_MAILER_SMTP_PORT=", m.SmtpPort), "EASGUARD_MAILER_SMTP_SECURITY=" + m.SmtpSecurity,
		"EASGUARD_MAILER_SMTP_USER=" + m.SmtpUser, "EASGUARD_MAILER_SMTP_PASSWORD=" + m.SmtpPassword.Reveal(), "EASGUARD_MAILER_SMTP_CA_BUNDLE=" + m.SmtpCABundle,
		"EASGUARD_MAILER_FROM=" + m.From, "EASGUARD_MAILER_ENROL_URL=" + m.EnrolURL, "EASGUARD_MAILER_HELPDESK=" + m.Helpdesk,
		"EASGUARD_MAILER_COMPANY=" + m.Company, "EASGUARD_MAILER_LOCALE=" + m.Locale, "EASGUARD_MAILER_PERIOD=" + m.Period.String(),
		"EASGUARD_MAILER_ALERT_WEBHOOK_URL=" + m.AlertWebhookURL, "EASGUARD_MAILER_ALERT_MAIL_TO=" + m.AlertMailTo,
		"EASGUARD_MAILER_ALERT_WEBHOOK_AUTHORIZATION=" + m.AlertWebhookAuthorization.Reveal(),
		"EASGUARD_MDM_FILE=" + s.inventory,
	}, s.sim.Env(x.User, x.Password.Reveal(), x.CABundle)...)
	return env
}

// stop shuts the stack down in order and waits for it.
func (s *stack) stop() {
	if s.cancel == nil {
		return
	}
	s.cancel()
	s.cancel = nil
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		s.t.Error("the stack did not stop within 30s")
	}
}

func splitAddr(t testing.TB, addr string) (string, int) {
	t.Helper()
	i := strings.LastIndexByte(addr, ':')
	var port int
	if _, err := fmt.Sscanf(addr[i+1:], "%d", &port); err != nil {
		t.Fatal(err)
	}
	return addr[:i], port
}

// status reads the org's status document.
func (s *stack) status() map[string]json.RawMessage {
	s.t.Helper()
	req, _ := http.NewRequest(http.MethodGet, s.consoleURL+"/api/v1/orgs/"+s.org+"/status", nil)
	req.Header.Set("Authorization", "Bearer "+operatorToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		s.t.Fatalf("GET status: %d", resp.StatusCode)
	}
	var out struct {
		Status map[string]json.RawMessage `json:"status"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		s.t.Fatal(err)
	}
	return out.Status
}

// statusOf reads the record /status shows under key (a pkg/status key) as
// its type; false while /status has none.
func statusOf[T any](s *stack, key string) (T, bool) {
	s.t.Helper()
	return statusIn[T](s.t, s.status(), key)
}

// statusIn decodes the record under key of a /status document read once,
// for a check of several records as of one moment. A record that does not
// decode fails the test: it is a break of the pkg/status contract.
func statusIn[T any](tb testing.TB, doc map[string]json.RawMessage, key string) (T, bool) {
	tb.Helper()
	var v T
	raw, ok := doc[key]
	if !ok {
		return v, false
	}
	if err := json.Unmarshal(raw, &v); err != nil {
		tb.Fatalf("/status %s: %v", key, err)
	}
	return v, true
}

// waitFullSync waits for a successful full sync and for what easguard
// does about the organisation's default after it: planned, and applied
// when the plan released a change.
func (s *stack) waitFullSync() {
	s.t.Helper()
	natstest.Eventually(s.t, 60*time.Second, "the first full sync", func() bool { _, ok := s.status()[status.SyncOKKey("full")]; return ok })
	s.waitDefaultPlan()
}

// fullSync asks for a full sync, waits for it, and for the plan of the
// organisation's default made from it; it returns the plan.
func (s *stack) fullSync() status.DefaultPlan {
	s.t.Helper()
	full := func(m *ev.SyncCompleted) bool { return m.GetKind() == ev.SyncKind_SYNC_KIND_FULL && m.GetSuccess() }
	n := len(find(s.events, full))
	s.requestSync("full")
	s.waitSyncs("full", n+1)
	done := find(s.events, full)
	id := done[len(done)-1].GetSyncId()
	natstest.Eventually(s.t, 30*time.Second, "status of full sync "+id, func() bool {
		st, _ := statusOf[status.Sync](s, status.SyncOKKey("full"))
		return st.SyncID == id
	})
	return s.waitDefaultPlan()
}

// waitDefaultPlan waits until the organisation's default is planned from
// the latest successful full sync and, if the plan released a change,
// the executor has applied it; it returns the plan.
func (s *stack) waitDefaultPlan() status.DefaultPlan {
	s.t.Helper()
	var plan status.DefaultPlan
	natstest.Eventually(s.t, 60*time.Second, "the organisation's default planned and applied", func() bool {
		st := s.status()
		full, ok := statusIn[status.Sync](s.t, st, status.SyncOKKey("full"))
		if !ok {
			return false
		}
		if full.DefaultAccessLevel == "" {
			return true // organisation settings left alone: nothing planned
		}
		if plan, ok = statusIn[status.DefaultPlan](s.t, st, status.DefaultPlanKey); !ok || plan.SyncID != full.SyncID {
			return false
		}
		switch plan.State {
		case status.PlanWaiting:
			return false
		case status.PlanReleased:
			applied, _ := statusIn[status.DefaultApplied](s.t, st, status.DefaultAppliedKey)
			return applied.DecisionID == plan.DecisionID
		}
		return true
	})
	return plan
}

// requestSync asks the collector for a sync through the console's API, as
// an operator would; while one of the kind the console asked for still
// runs, it asks again until the console takes it.
func (s *stack) requestSync(kind string) {
	s.t.Helper()
	pollEvery(s.t, 60*time.Second, 50*time.Millisecond, "the console to take a "+kind+" sync", func() bool {
		req, _ := http.NewRequest(http.MethodPost, s.consoleURL+"/api/v1/orgs/"+s.org+"/sync", strings.NewReader("kind="+kind))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Authorization", "Bearer "+operatorToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			s.t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusOK:
			return true
		case http.StatusConflict:
			return false
		}
		s.t.Fatalf("POST sync: %d %s", resp.StatusCode, b)
		return false
	})
}

// managedDevice is one record of the MDM inventory file.
type managedDevice struct {
	ID                string `json:"id"`
	UserPrincipalName string `json:"userPrincipalName"`
	EASDeviceID       string `json:"easDeviceId,omitempty"`
	ComplianceState   string `json:"complianceState"`
	ManagementState   string `json:"managementState"`
	OperatingSystem   string `json:"operatingSystem"`
	OSVersion         string `json:"osVersion"`
	Model             string `json:"model"`
	LastSyncDateTime  string `json:"lastSyncDateTime"`
}

// writeInventory replaces the MDM inventory file, as an export job would.
func (s *stack) writeInventory(devices ...managedDevice) {
	s.t.Helper()
	if err := s.tryWriteInventory(devices...); err != nil {
		s.t.Fatal(err)
	}
}

// tryWriteInventory is writeInventory for goroutines other than the test's.
func (s *stack) tryWriteInventory(devices ...managedDevice) error {
	return writeInventoryFile(s.inventory, devices...)
}

// writeInventoryFile replaces an MDM inventory file at once (written
// aside, then renamed), so that the file source never reads half of it.
func writeInventoryFile(path string, devices ...managedDevice) error {
	out := make([]managedDevice, len(devices)) // "[]", not "null", when empty
	copy(out, devices)
	for i := range out {
		if out[i].LastSyncDateTime == "" {
			out[i].LastSyncDateTime = time.Now().UTC().Format(time.RFC3339)
		}
	}
	b, err := json.Marshal(out)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func compliant(id, upn, easID string) managedDevice {
	return managedDevice{ID: id, UserPrincipalName: upn, EASDeviceID: easID, ComplianceState: "compliant", ManagementState: "managed",
		OperatingSystem: "iOS", OSVersion: "17.4", Model: "iPhone 15"}
}

func iPhone(mailbox, id string) exchangesim.Phone {
	return exchangesim.Phone{Mailbox: mailbox, DeviceID: id, DeviceType: "iPhone", DeviceModel: "iPhone15C2", DeviceOS: "iOS 17.4 21E219",
		UserAgent: "Apple-iPhone15C2/2104.219", FriendlyName: "Alice's iPhone"}
}

func (s *stack) phoneSync(p exchangesim.Phone) exchangesim.SyncResult {
	s.t.Helper()
	r, err := s.sim.Org.Sync(p)
	if err != nil {
		s.t.Fatalf("phone %s: %v", p.DeviceID, err)
	}
	return r
}

// waitPhone polls the phone's syncs until its state is want.
func (s *stack) waitPhone(p exchangesim.Phone, want string, timeout time.Duration) exchangesim.SyncResult {
	s.t.Helper()
	var last exchangesim.SyncResult
	natstest.Eventually(s.t, timeout, "phone "+p.DeviceID+" "+want, func() bool {
		last = s.phoneSync(p)
		return last.State == want
	})
	return last
}

// event is one message seen on the org's subjects.
type event struct {
	Subject string
	Msg     proto.Message
	Header  nats.Header
}

// eventLog records every event of the org, decoded by its type header,
// a page of confirmations as the events it carries.
type eventLog struct {
	mu  sync.Mutex
	all []event
	dlq []string // subjects of dead letters (not protobuf events)
}

func (l *eventLog) add(m *nats.Msg) {
	if strings.Contains(m.Subject, ".dlq.") {
		l.mu.Lock()
		l.dlq = append(l.dlq, m.Subject+": "+m.Header.Get(bus.HeaderDLQReason))
		l.mu.Unlock()
		return
	}
	name := m.Header.Get(bus.HeaderType)
	mt, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(name))
	if err != nil {
		return
	}
	msg := mt.New().Interface()
	if proto.Unmarshal(m.Data, msg) != nil {
		return
	}
	// A page stands for the observations or verdicts it carries: tests
	// look for a partnership's, whichever way it travelled.
	msgs := []proto.Message{msg}
	switch p := msg.(type) {
	case *ev.EASPartnershipsConfirmed:
		msgs = msgs[:0]
		for _, o := range p.Observations() {
			msgs = append(msgs, o)
		}
	case *ev.DevicesMatched:
		msgs = msgs[:0]
		for _, v := range p.GetMatches() {
			msgs = append(msgs, v)
		}
	}
	l.mu.Lock()
	for _, msg := range msgs {
		l.all = append(l.all, event{Subject: m.Subject, Msg: msg, Header: m.Header})
	}
	l.mu.Unlock()
}

// dump lists the events seen, one short line each, for a failed test's
// log; the repetitive unchanged observations and their matches are left out.
func (l *eventLog) dump() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	b.WriteString("events:\n")
	short := func(e fmt.Stringer) string {
		s := e.String()
		if i := strings.LastIndexByte(s, '_'); i >= 0 {
			return s[i+1:]
		}
		return s
	}
	// A run of successful quick syncs with nothing between them is one
	// line: a test that waited for something that never came would
	// otherwise end its log with a screen of them and push the failure
	// itself out of what CI shows.
	quiet, quietFrom := 0, ""
	flush := func() {
		if quiet > 0 {
			fmt.Fprintf(&b, "  sync.completed: %d quick syncs ok, from %s\n", quiet, quietFrom)
			quiet = 0
		}
	}
	for _, e := range l.all {
		if m, ok := e.Msg.(*ev.SyncCompleted); ok && m.GetKind() == ev.SyncKind_SYNC_KIND_QUICK && m.GetSuccess() && len(m.GetErrors()) == 0 {
			if quiet == 0 {
				quietFrom = m.GetSyncId()
			}
			quiet++
			continue
		}
		flush()
		var line string
		switch m := e.Msg.(type) {
		case *ev.EASPartnershipObserved:
			if m.GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED {
				continue
			}
			p := m.GetPartnership()
			line = fmt.Sprintf("%s %s %s/%s", short(m.GetChange()), p.GetDeviceId(), short(p.GetDeviceAccessState()), short(p.GetDeviceAccessStateReason()))
		case *ev.DeviceMatched:
			if m.GetObserved().GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED && m.GetTrigger() == "eas" {
				continue
			}
			line = fmt.Sprintf("%s by %s: mdm=%s %s nomatch=%s", m.GetObserved().GetPartnership().GetDeviceId(), m.GetTrigger(), m.GetMdm().GetMdmDeviceId(),
				short(m.GetMdm().GetComplianceState()), short(m.GetNoMatchReason()))
		case *ev.AccessDecided:
			line = fmt.Sprintf("%s %s rule=%s dry=%v notify=%v %q", m.GetPartnership().GetDeviceId(), short(m.GetDesired()), m.GetRule(), m.GetDryRun(), m.GetNotifyUser(), m.GetReason())
		case *ev.AccessApplied:
			for _, it := range m.GetItems() {
				line += fmt.Sprintf("%s %s %s %s; ", it.GetDeviceId(), short(it.GetDesired()), short(it.GetOutcome()), it.GetError())
			}
		case *ev.NotificationSent:
			line = fmt.Sprintf("%s to %s %s", m.GetDeviceId(), m.GetRecipient(), m.GetTemplate())
		case *ev.MDMDeviceChanged:
			d := m.GetDevice()
			line = fmt.Sprintf("%s eas=%s %s retired=%v removed=%v", d.GetMdmDeviceId(), d.GetEasDeviceId(), short(d.GetComplianceState()), d.GetRetired(), m.GetRemoved())
		case *ev.Alert:
			line = fmt.Sprintf("%s %s", short(m.GetKind()), m.GetSummary())
		case *ev.SyncCompleted:
			line = fmt.Sprintf("%s %s ok=%v %v", short(m.GetKind()), m.GetSyncId(), m.GetSuccess(), m.GetErrors())
		default:
			line = prototext.MarshalOptions{}.Format(e.Msg)
		}
		fmt.Fprintf(&b, "  %s: %s\n", strings.TrimPrefix(e.Subject, "easguard."+testOrg+"."), line)
	}
	flush()
	return b.String()
}

// deadLetters lists the dead letters seen, with their reasons.
func (l *eventLog) deadLetters() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.dlq)
}

// find returns the events of one family that match.
func find[T proto.Message](l *eventLog, match func(T) bool) []T {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []T
	for _, e := range l.all {
		if m, ok := e.Msg.(T); ok && (match == nil || match(m)) {
			out = append(out, m)
		}
	}
	return out
}

// waitEvent waits for an event of one family that matches.
func waitEvent[T proto.Message](t testing.TB, l *eventLog, what string, match func(T) bool) T {
	t.Helper()
	var found T
	natstest.Eventually(t, 60*time.Second, what, func() bool {
		if all := find(l, match); len(all) > 0 {
			found = all[len(all)-1]
			return true
		}
		return false
	})
	return found
}

func forDevice[T interface {
	proto.Message
	GetOrg() string
}](id string, get func(T) string) func(T) bool {
	return func(m T) bool { return strings.EqualFold(get(m), id) }
}

var _ = bytes.NewReader
var _ = sdktrace.NewTracerProvider

// settle waits until easguard is idle: every durable consumer of every
// stream has acknowledged all it was given, the evaluator holds nothing
// for the blast-radius guard, and no stream grew while it looked, twice in
// a row. A test asserts that something did not happen only after it.
func (s *stack) settle() {
	s.t.Helper()
	waitIdle(s.t, s.svc.JS, 60*time.Second, 10*time.Millisecond)
}

// waitIdle is settle for any easguard reached through js (an easguard in
// its own process, say), looking every so often until timeout.
func waitIdle(t testing.TB, js jetstream.JetStream, timeout, every time.Duration) {
	t.Helper()
	ctx := t.Context()
	staged, err := js.KeyValue(ctx, bus.BucketStaged)
	if err != nil {
		t.Fatal(err)
	}
	snapshot := func() (string, bool) {
		var b strings.Builder
		names := js.StreamNames(ctx)
		for name := range names.Name() {
			st, err := js.Stream(ctx, name)
			if err != nil {
				return "", false
			}
			fmt.Fprintf(&b, "%s:%d ", name, st.CachedInfo().State.LastSeq)
			cons := st.ListConsumers(ctx)
			for ci := range cons.Info() {
				if ci.Config.Durable == "" {
					continue
				}
				if ok, err := bus.Drained(ctx, st, ci); err != nil || !ok {
					return "", false
				}
			}
			if cons.Err() != nil {
				return "", false
			}
		}
		if names.Err() != nil {
			return "", false
		}
		keys, err := staged.ListKeys(ctx)
		if err != nil {
			return "", false
		}
		for range keys.Keys() {
			return "", false
		}
		return b.String(), true
	}
	var last string
	pollEvery(t, timeout, every, "easguard idle", func() bool {
		snap, idle := snapshot()
		if !idle {
			last = ""
			return false
		}
		if snap == last {
			return true
		}
		last = snap
		return false
	})
}

// pollEvery is natstest.Eventually at a slower pace, for conditions that
// cost a look at many records or streams: polled every 10 ms they would
// take the cores from the process being measured.
func pollEvery(tb testing.TB, timeout, every time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(every)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		<-tick.C
	}
}

// setCASMailboxCalls counts the Set-CASMailbox calls that reached Exchange
// and named the device id.
func (s *stack) setCASMailboxCalls(deviceID string) int {
	n := 0
	for _, r := range s.sim.Recorder.Records("cmdlet") {
		if r.Cmdlet == "Set-CASMailbox" && r.OK && strings.Contains(strings.ToLower(string(r.Params)), strings.ToLower(deviceID)) {
			n++
		}
	}
	return n
}

// mailsTo returns the mails the SMTP server received for one address.
func (s *stack) mailsTo(addr string) []smtpsim.Message {
	var out []smtpsim.Message
	for _, m := range s.smtp.Messages() {
		for _, to := range m.To {
			if strings.EqualFold(to, addr) {
				out = append(out, m)
			}
		}
	}
	return out
}

// waitSyncs waits until n syncs of a kind ("quick", "full") have completed
// since the stack started.
func (s *stack) waitSyncs(kind string, n int) {
	s.t.Helper()
	want := ev.SyncKind_SYNC_KIND_QUICK
	if kind == "full" {
		want = ev.SyncKind_SYNC_KIND_FULL
	}
	natstest.Eventually(s.t, 60*time.Second, fmt.Sprintf("%d %s syncs", n, kind), func() bool {
		return len(find(s.events, func(m *ev.SyncCompleted) bool { return m.GetKind() == want && m.GetSuccess() })) >= n
	})
}

// bareClient is an exchange.Client of the test's own, over a pool of its
// own with cfg, outside any easguard; close ends its sessions, which the
// simulator counts against the service account's budget.
func bareClient(tb testing.TB, cfg exchange.Config) (c *exchange.Client, close func()) {
	tb.Helper()
	pool, err := exchange.NewPool(tb.Context(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		tb.Fatal(err)
	}
	return exchange.NewClient(pool, cfg), func() { pool.Close(context.Background()) }
}
