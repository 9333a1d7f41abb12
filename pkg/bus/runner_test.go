package bus_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/telemetry"
	"github.com/easguard/easguard/pkg/telemetry/telemetrytest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

func TestProvisionIsIdempotent(t *testing.T) {
	e := newEnv(t)
	ctx := natstest.Context(t)
	if err := bus.Provision(ctx, e.js, e.topo); err != nil {
		t.Fatalf("second provision: %v", err)
	}
	for _, cfg := range e.topo.StreamConfigs() {
		s, err := e.js.Stream(ctx, cfg.Name)
		if err != nil {
			t.Fatalf("stream %s: %v", cfg.Name, err)
		}
		if got := s.CachedInfo().Config.Retention; got != cfg.Retention {
			t.Errorf("%s retention = %v, want %v", cfg.Name, got, cfg.Retention)
		}
	}
	if _, err := e.js.KeyValue(ctx, bus.BucketLeases); err != nil {
		t.Fatalf("lease bucket: %v", err)
	}
}

// Provision leaves a stream whose settings already agree untouched (an
// update rewrites the store's configuration, which the server has raced
// against concurrent consumer creation) and updates one that differs.
func TestProvisionUpdatesOnlyWhatDiffers(t *testing.T) {
	e := newEnv(t)
	ctx := natstest.Context(t)
	name := e.topo.StreamConfigs()[0].Name
	before, err := e.js.Stream(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := bus.Provision(ctx, e.js, e.topo); err != nil {
		t.Fatal(err)
	}
	changed := e.topo
	changed.FactsMaxAge = e.topo.FactsMaxAge + time.Hour
	changed.DeadLetterMaxAge = e.topo.DeadLetterMaxAge + time.Hour
	if err := bus.Provision(ctx, e.js, changed); err != nil {
		t.Fatal(err)
	}
	for _, cfg := range changed.StreamConfigs() {
		s, err := e.js.Stream(ctx, cfg.Name)
		if err != nil {
			t.Fatal(err)
		}
		if got := s.CachedInfo().Config.MaxAge; got != cfg.MaxAge {
			t.Errorf("%s max age %s after a changed provision, want %s", cfg.Name, got, cfg.MaxAge)
		}
	}
	if err := bus.Provision(ctx, e.js, e.topo); err != nil {
		t.Fatal(err)
	}
	after, err := e.js.Stream(ctx, name)
	if err != nil || after.CachedInfo().Config.MaxAge != before.CachedInfo().Config.MaxAge {
		t.Fatalf("max age not restored: %v", err)
	}
}

func TestPublishDuplicateStoredOnce(t *testing.T) {
	e := newEnv(t)
	ctx := natstest.Context(t)
	subj, _ := bus.EASObserved.Subject(org, "dev1")
	out := bus.Outbound{Subject: subj, Message: observed("dev1"), MsgID: "sync-1/alice/dev1"}
	first, err := e.pub.Publish(ctx, out)
	if err != nil {
		t.Fatal(err)
	}
	second, err := e.pub.Publish(ctx, out)
	if err != nil {
		t.Fatal(err)
	}
	if first.Duplicate || !second.Duplicate || second.Sequence != first.Sequence {
		t.Fatalf("acks %+v then %+v; want the second to be a duplicate of the first", first, second)
	}
	s, _ := e.js.Stream(ctx, bus.StreamEAS)
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 1 {
		t.Fatalf("stream holds %d messages, want 1", info.State.Msgs)
	}
	// A different id is a different event.
	out.MsgID = "sync-2/alice/dev1"
	if ack, err := e.pub.Publish(ctx, out); err != nil || ack.Duplicate {
		t.Fatalf("new id: %+v, %v", ack, err)
	}
}

// A stream that does not answer yet (no leader: one is being elected, or
// the stream is still being created) is asked again, and the event goes
// out once it answers; past the caller's deadline the publish gives up
// with the error.
func TestPublishAsksAgainUntilTheStreamAnswers(t *testing.T) {
	s, _, js := natstest.Start(t)
	ctx := natstest.Context(t)
	// The publisher's own connection: its count of messages sent is the
	// count of publish attempts.
	nc, pjs := natstest.Connect(t, s)
	pub, err := bus.NewPublisher(pjs, bus.Instrumentation{})
	if err != nil {
		t.Fatal(err)
	}
	subj, _ := bus.EASObserved.Subject(org, "dev1")
	out := bus.Outbound{Subject: subj, Message: observed("dev1"), MsgID: "sync-1/alice/dev1"}

	t.Run("gives up at the caller's deadline", func(t *testing.T) {
		short, cancel := context.WithTimeout(ctx, 700*time.Millisecond)
		defer cancel()
		if ack, err := pub.Publish(short, out); err == nil || !bus.Unanswered(err) {
			t.Fatalf("publish with no stream: %+v, %v; want an unanswered error", ack, err)
		}
	})

	type result struct {
		ack *jetstream.PubAck
		err error
	}
	done := make(chan result, 1)
	before := nc.Stats().OutMsgs
	go func() {
		ack, err := pub.Publish(ctx, out)
		done <- result{ack, err}
	}()
	// nats.go asks three times over half a second on its own; more than
	// that is the publisher asking again.
	natstest.Eventually(t, 5*time.Second, "five unanswered attempts", func() bool { return nc.Stats().OutMsgs >= before+5 })
	select {
	case r := <-done:
		t.Fatalf("publish returned before the stream existed: %+v, %v", r.ack, r.err)
	default:
	}
	if err := bus.Provision(ctx, js, fastTopology()); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.err != nil || r.ack.Stream != bus.StreamEAS || r.ack.Duplicate {
			t.Fatalf("publish once the stream answers: %+v, %v", r.ack, r.err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("publish still waiting 15 s after the stream was created")
	}
}

func TestPublishRefusesMistakes(t *testing.T) {
	e := newEnv(t)
	ctx := natstest.Context(t)
	subj, _ := bus.EASObserved.Subject(org, "dev1")
	other := observed("dev1")
	other.Org = "fabrikam"
	matched, _ := bus.DeviceMatched.Subject(org, "dev1")
	tests := []struct {
		name string
		out  bus.Outbound
		want error
	}{
		{"no message id", bus.Outbound{Subject: subj, Message: observed("dev1")}, bus.ErrNoMsgID},
		{"foreign subject", bus.Outbound{Subject: "elsewhere.x", Message: observed("dev1"), MsgID: "x"}, bus.ErrBadSubject},
		{"wrong type for family", bus.Outbound{Subject: matched, Message: observed("dev1"), MsgID: "x"}, nil},
		{"org field disagrees with subject", bus.Outbound{Subject: subj, Message: other, MsgID: "x"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.pub.Publish(ctx, tt.out)
			if err == nil {
				t.Fatal("published")
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

// The acceptance test for tracing: an event published on a subject goes
// through a handler and its output arrives downstream in one trace.
func TestOneTraceAcrossHops(t *testing.T) {
	e := newEnv(t)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	inst := bus.Instrumentation{TracerProvider: tp, Propagator: telemetry.Propagator()}

	runRunner(t, e.js, bus.RunnerConfig{Service: "matcher", Org: org, Topology: e.topo, Instrumentation: inst},
		bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
			return []bus.Outbound{matchedFrom(in)}, nil
		}))
	got := make(chan *ev.DeviceMatched, 1)
	runRunner(t, e.js, bus.RunnerConfig{Service: "evaluator", Org: org, Topology: e.topo, Instrumentation: inst},
		bus.Handle("device-matched", bus.DeviceMatched, func(ctx context.Context, in *ev.DeviceMatched) ([]bus.Outbound, error) {
			got <- in
			return nil, nil
		}))

	pub, err := bus.NewPublisher(e.js, inst)
	if err != nil {
		t.Fatal(err)
	}
	subj, _ := bus.EASObserved.Subject(org, "Dev-1")
	if _, err := pub.Publish(context.Background(), bus.Outbound{Subject: subj, Message: observed("Dev-1"), MsgID: "m1"}); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if m.GetObserved().GetPartnership().GetDeviceId() != "Dev-1" {
			t.Fatalf("downstream got %v", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("output never arrived downstream")
	}

	byName := map[string]sdktrace.ReadOnlySpan{}
	natstest.Eventually(t, 5*time.Second, "four spans", func() bool {
		for _, s := range rec.Ended() {
			byName[s.Name()] = s
		}
		return len(byName) >= 4
	})
	p1 := byName["send easguard.{org}.eas.observed.{key}"]
	c1 := byName["process easguard.{org}.eas.observed.{key}"]
	p2 := byName["send easguard.{org}.device.matched.{key}"]
	c2 := byName["process easguard.{org}.device.matched.{key}"]
	for name, s := range map[string]sdktrace.ReadOnlySpan{"p1": p1, "c1": c1, "p2": p2, "c2": c2} {
		if s == nil {
			t.Fatalf("span %s missing; have %v", name, keys(byName))
		}
	}
	trace := p1.SpanContext().TraceID()
	for _, s := range []sdktrace.ReadOnlySpan{c1, p2, c2} {
		if s.SpanContext().TraceID() != trace {
			t.Errorf("%s is in trace %s, want %s", s.Name(), s.SpanContext().TraceID(), trace)
		}
	}
	wantParent := []struct{ child, parent sdktrace.ReadOnlySpan }{{c1, p1}, {p2, c1}, {c2, p2}}
	for _, w := range wantParent {
		if w.child.Parent().SpanID() != w.parent.SpanContext().SpanID() {
			t.Errorf("%s's parent is %s, want %s", w.child.Name(), w.child.Parent().SpanID(), w.parent.SpanContext().SpanID())
		}
	}
	if l := c1.Links(); len(l) != 1 || l[0].SpanContext.SpanID() != p1.SpanContext().SpanID() {
		t.Errorf("consumer span links = %v, want a link to the producer", l)
	}
	if p1.SpanKind() != traceKindProducer || c1.SpanKind() != traceKindConsumer {
		t.Errorf("kinds: %v, %v", p1.SpanKind(), c1.SpanKind())
	}
	attrs := map[string]string{}
	for _, kv := range c1.Attributes() {
		attrs[string(kv.Key)] = kv.Value.Emit()
	}
	for k, v := range map[string]string{
		"messaging.system": "nats", "messaging.destination.name": subj, "messaging.operation.type": "process",
		"messaging.consumer.group.name": "matcher-eas-observed-contoso", "messaging.nats.delivery_count": "1",
		"messaging.destination.template": "easguard.{org}.eas.observed.{key}", "exchange.org": "contoso",
	} {
		if attrs[k] != v {
			t.Errorf("consumer span %s = %q, want %q", k, attrs[k], v)
		}
	}
}

var (
	traceKindProducer = trace.SpanKindProducer
	traceKindConsumer = trace.SpanKindConsumer
)

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// deliveryLog records when each delivery of a message arrived.
type deliveryLog struct {
	mu    sync.Mutex
	times []time.Time
	count []uint64
}

func (d *deliveryLog) add(n uint64) {
	d.mu.Lock()
	d.times = append(d.times, time.Now())
	d.count = append(d.count, n)
	d.mu.Unlock()
}

func (d *deliveryLog) len() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.times)
}

func TestTransientErrorRedeliveredWithGrowingDelay(t *testing.T) {
	e := newEnv(t)
	var log deliveryLog
	var calls atomic.Int32
	retry := fastRetry()
	runRunner(t, e.js, bus.RunnerConfig{Service: "matcher", Org: org, Topology: e.topo, Retry: retry},
		bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
			log.add(0)
			if calls.Add(1) < 4 {
				return nil, errors.New("exchange is busy")
			}
			return []bus.Outbound{matchedFrom(in)}, nil
		}))
	out := collect(t, e.js, bus.StreamMatch, bus.DeviceMatched.Filter(org))
	publishObserved(t, e, "dev1", "m1")
	out.AwaitLen(t, 10*time.Second, 1)
	if n := log.len(); n != 4 {
		t.Fatalf("handler ran %d times, want 4", n)
	}
	// The server never redelivers a nak'ed message before its delay, so the
	// gaps are bounded below by the policy's delays, which grow.
	for i := 1; i < 4; i++ {
		gap := log.times[i].Sub(log.times[i-1])
		want := retry.Delay(uint64(i))
		if gap < want {
			t.Errorf("delivery %d came %s after the previous one, before the %s backoff", i+1, gap, want)
		}
		if i > 1 && retry.Delay(uint64(i)) <= retry.Delay(uint64(i-1)) {
			t.Errorf("delay for delivery %d (%s) does not grow", i+1, retry.Delay(uint64(i)))
		}
	}
	// And the output arrived once, though the handler ran four times.
	if n := len(out.All()); n != 1 {
		t.Fatalf("%d outputs, want 1", n)
	}
}

func TestRetryAfterIsHonoured(t *testing.T) {
	e := newEnv(t)
	var log deliveryLog
	runRunner(t, e.js, bus.RunnerConfig{Service: "executor", Org: org, Topology: e.topo, Retry: fastRetry()},
		bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
			log.add(0)
			if log.len() == 1 {
				return nil, bus.RetryAfter(700*time.Millisecond, errors.New("throttled by Exchange"))
			}
			return nil, nil
		}))
	publishObserved(t, e, "dev1", "m1")
	natstest.Eventually(t, 10*time.Second, "second delivery", func() bool { return log.len() >= 2 })
	if gap := log.times[1].Sub(log.times[0]); gap < 700*time.Millisecond {
		t.Fatalf("redelivered after %s, before the 700ms asked for", gap)
	}
}

func TestRetryPolicyDelay(t *testing.T) {
	p := bus.RetryPolicy{Initial: time.Second, Max: 10 * time.Second, Multiplier: 2}
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 10 * time.Second, 10 * time.Second}
	for i, w := range want {
		if got := p.Delay(uint64(i + 1)); got != w {
			t.Errorf("Delay(%d) = %s, want %s", i+1, got, w)
		}
	}
	j := bus.DefaultRetryPolicy()
	for n := uint64(1); n < 20; n++ {
		d := j.Delay(n)
		if d <= 0 || d > time.Duration(float64(j.Max)*(1+j.Jitter)) {
			t.Errorf("jittered Delay(%d) = %s out of range", n, d)
		}
	}
}

// rawPublish puts arbitrary bytes and headers on a subject, as a broken or
// hostile publisher would.
func rawPublish(t testing.TB, js jetstream.JetStream, subject string, data []byte, h nats.Header) {
	t.Helper()
	if h == nil {
		h = nats.Header{}
	}
	h.Set(jetstream.MsgIDHeader, fmt.Sprintf("raw-%d", time.Now().UnixNano()))
	if _, err := js.PublishMsg(context.Background(), &nats.Msg{Subject: subject, Data: data, Header: h}); err != nil {
		t.Fatal(err)
	}
}

func typed(name string) nats.Header {
	h := nats.Header{}
	h.Set(bus.HeaderType, name)
	return h
}

func TestPoisonGoesToDeadLetterAndLeavesTheSource(t *testing.T) {
	valid, _ := proto.Marshal(observed("dev1"))
	invalid := observed("dev1")
	invalid.Partnership.DeviceId = ""
	invalidBytes, _ := proto.Marshal(invalid)
	tooLong := observed("dev1")
	tooLong.Partnership.DeviceId = "0123456789012345678901234567890123"
	tooLongBytes, _ := proto.Marshal(tooLong)
	otherOrg := observed("dev1")
	otherOrg.Org = "fabrikam"
	otherOrgBytes, _ := proto.Marshal(otherOrg)
	const obsType = "easguard.v1.EASPartnershipObserved"

	tests := []struct {
		name   string
		data   []byte
		header nats.Header
		reason string
	}{
		{"undecodable body", []byte{0xff, 0xff, 0xff}, typed(obsType), "decode easguard.v1.EASPartnershipObserved"},
		{"missing type header", valid, nil, `message type ""`},
		{"wrong type header", valid, typed("easguard.v1.Alert"), `message type "easguard.v1.Alert"`},
		{"invalid event", invalidBytes, typed(obsType), "partnership.device_id is empty"},
		{"device id over 32 characters", tooLongBytes, typed(obsType), "longer than 32"},
		{"event of another org", otherOrgBytes, typed(obsType), `org "fabrikam"`},
		{"handler says poison", valid, typed(obsType), "mailbox is out of scope"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			var calls atomic.Int32
			metrics := telemetrytest.NewMetrics(t)
			runRunner(t, e.js, bus.RunnerConfig{Service: "matcher", Org: org, Topology: e.topo, Retry: fastRetry(), Instrumentation: bus.Instrumentation{MeterProvider: metrics.Provider}},
				bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
					calls.Add(1)
					return nil, bus.Poison(errors.New("mailbox is out of scope"))
				}))
			dlq := collect(t, e.js, bus.StreamDLQ, bus.DeadLetter.Filter(org))
			alerts := natstest.Receive[ev.Alert](t, e.js, bus.StreamAlerts, bus.AlertRaised.Filter(org))
			subj, _ := bus.EASObserved.Subject(org, "dev1")
			rawPublish(t, e.js, subj, tt.data, tt.header)

			m := dlq.AwaitLen(t, 10*time.Second, 1)[0]
			h := m.Headers()
			if got := h.Get(bus.HeaderDLQReason); !contains(got, tt.reason) {
				t.Errorf("reason %q does not mention %q", got, tt.reason)
			}
			want := map[string]string{
				bus.HeaderDLQSubject: subj, bus.HeaderDLQStream: bus.StreamEAS, bus.HeaderDLQStreamSeq: "1",
				bus.HeaderDLQDeliveries: "1", bus.HeaderDLQConsumer: "matcher-eas-observed-contoso",
			}
			for k, v := range want {
				if h.Get(k) != v {
					t.Errorf("header %s = %q, want %q", k, h.Get(k), v)
				}
			}
			if string(m.Data()) != string(tt.data) {
				t.Errorf("dead letter body differs from the original")
			}
			if m.Subject() != "easguard.contoso.dlq.matcher" {
				t.Errorf("dead letter on %s", m.Subject())
			}
			// Gone from the source: nothing pending or awaiting ack, and no
			// second delivery.
			waitConsumerSettled(t, e.js, bus.StreamEAS, "matcher-eas-observed-contoso")
			if n := calls.Load(); n > 1 {
				t.Errorf("handler ran %d times for a poison message", n)
			}
			// Counted where an administrator alerts on it.
			natstest.Eventually(t, 5*time.Second, "the dead letter counted", func() bool {
				return metrics.Value(t, "easguard.dead_letters", map[string]string{"easguard.org": "contoso", "easguard.stage": "matcher"}) == 1
			})
			// And alerted, with the reason.
			a := alerts.Await(t, 10*time.Second, "the dead letter's alert", func(a *ev.Alert) bool { return true })
			if a.GetKind() != ev.AlertKind_ALERT_KIND_DEAD_LETTER || a.GetDetail()["stage"] != "matcher" || !contains(a.GetDetail()["reason"], tt.reason) ||
				a.GetDetail()["subject"] != subj {
				t.Errorf("alert %v", a)
			}
		})
	}
}

// A dead letter alerts the administrators once per stage and quarter of an
// hour, not once per message; a dead-lettered alert raises none, since its
// delivery is what failed.
func TestDeadLettersAlertOncePerStageAndNeverForAlerts(t *testing.T) {
	e := newEnv(t)
	runRunner(t, e.js, bus.RunnerConfig{Service: "matcher", Org: org, Topology: e.topo, Retry: fastRetry()},
		bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
			return nil, bus.Poison(errors.New("refused"))
		}))
	runRunner(t, e.js, bus.RunnerConfig{Service: "mailer", Org: org, Topology: e.topo, Retry: fastRetry()},
		bus.Handle("alert-raised", bus.AlertRaised, func(ctx context.Context, in *ev.Alert) ([]bus.Outbound, error) {
			if in.GetKind() == ev.AlertKind_ALERT_KIND_DRIFT {
				return nil, bus.Poison(errors.New("webhook answered 404"))
			}
			return nil, nil
		}))
	dlq := collect(t, e.js, bus.StreamDLQ, bus.DeadLetter.Filter(org))
	alerts := natstest.Receive[ev.Alert](t, e.js, bus.StreamAlerts, bus.AlertRaised.Filter(org))
	for _, dev := range []string{"dev1", "dev2", "dev3"} {
		subj, _ := bus.EASObserved.Subject(org, dev)
		data, _ := proto.Marshal(observed(dev))
		rawPublish(t, e.js, subj, data, typed("easguard.v1.EASPartnershipObserved"))
	}
	drift, err := bus.AlertOutbound(org, ev.AlertKind_ALERT_KIND_DRIFT, ev.AlertSeverity_ALERT_SEVERITY_WARNING, "drift:1", "a manual edit", nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.pub.Publish(natstest.Context(t), drift); err != nil {
		t.Fatal(err)
	}
	dlq.AwaitLen(t, 10*time.Second, 4)
	natstest.Eventually(t, 10*time.Second, "the dead-letter alert", func() bool { return alerts.Len() >= 2 })
	waitConsumerSettled(t, e.js, bus.StreamAlerts, "mailer-alert-raised-contoso")
	var kinds []string
	for _, a := range alerts.All() {
		kinds = append(kinds, a.GetKind().String())
	}
	// The drift alert itself, and one dead-letter alert for the matcher's
	// three dead letters; none for the mailer's dead-lettered drift alert.
	if len(kinds) != 2 || kinds[0] == kinds[1] {
		t.Fatalf("alerts %v", kinds)
	}
}

func contains(s, sub string) bool {
	return len(sub) == 0 || (len(s) >= len(sub) && indexOf(s, sub) >= 0)
}

func indexOf(s, sub string) int {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return i
		}
	}
	return -1
}

func waitConsumerSettled(t testing.TB, js jetstream.JetStream, stream, consumer string) {
	t.Helper()
	ctx := natstest.Context(t)
	natstest.Eventually(t, 5*time.Second, "consumer settled", func() bool {
		c, err := js.Consumer(ctx, stream, consumer)
		if err != nil {
			t.Fatal(err)
		}
		info, err := c.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return info.NumPending == 0 && info.NumAckPending == 0 && info.NumRedelivered == 0
	})
}

func TestPoisonCommandLeavesWorkQueue(t *testing.T) {
	e := newEnv(t)
	runRunner(t, e.js, bus.RunnerConfig{Service: "collector", Org: org, Topology: e.topo},
		bus.Handle("sync-requested", bus.SyncRequested, func(ctx context.Context, in *ev.SyncRequested) ([]bus.Outbound, error) {
			return nil, nil
		}))
	dlq := collect(t, e.js, bus.StreamDLQ, bus.DeadLetter.Filter(org))
	subj, _ := bus.SyncRequested.Subject(org, "")
	rawPublish(t, e.js, subj, []byte("not protobuf \xff\xff"), typed("easguard.v1.SyncRequested"))
	dlq.AwaitLen(t, 10*time.Second, 1)
	ctx := natstest.Context(t)
	s, _ := e.js.Stream(ctx, bus.StreamSyncRequests)
	natstest.Eventually(t, 5*time.Second, "work queue empty", func() bool {
		info, err := s.Info(ctx)
		return err == nil && info.State.Msgs == 0
	})
}

func TestMaxDeliverMovesToDeadLetter(t *testing.T) {
	e := newEnv(t)
	var calls atomic.Int32
	runRunner(t, e.js, bus.RunnerConfig{Service: "executor", Org: org, Topology: e.topo, Retry: bus.RetryPolicy{Initial: 20 * time.Millisecond, Max: 50 * time.Millisecond, Multiplier: 2}},
		bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
			calls.Add(1)
			return nil, errors.New("exchange refuses the connection")
		}))
	dlq := collect(t, e.js, bus.StreamDLQ, bus.DeadLetter.Filter(org))
	publishObserved(t, e, "dev1", "m1")
	m := dlq.AwaitLen(t, 10*time.Second, 1)[0]
	if got := calls.Load(); got != int32(e.topo.Consumer.MaxDeliver) {
		t.Errorf("handler ran %d times, want MaxDeliver=%d", got, e.topo.Consumer.MaxDeliver)
	}
	if d := m.Headers().Get(bus.HeaderDLQDeliveries); d != strconv.Itoa(e.topo.Consumer.MaxDeliver) {
		t.Errorf("deliveries header %q", d)
	}
	if r := m.Headers().Get(bus.HeaderDLQReason); !contains(r, "exchange refuses the connection") || !contains(r, "gave up after 4 deliveries") {
		t.Errorf("reason %q", r)
	}
	waitConsumerSettled(t, e.js, bus.StreamEAS, "executor-eas-observed-contoso")
}

// A worker that dies holding a message on its last delivery never settles
// it; the server's max-deliveries advisory tells the mover, which moves the
// message to the dead-letter subject.
func TestMaxDeliveriesAdvisoryMovesUnsettledMessage(t *testing.T) {
	for _, tt := range []struct {
		name   string
		ev     bus.Event
		stream string
		wq     bool
	}{
		{"limits stream", bus.EASObserved, bus.StreamEAS, false},
		{"work-queue stream", bus.SyncRequested, bus.StreamSyncRequests, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			ctx := natstest.Context(t)
			runRunner(t, e.js, bus.RunnerConfig{Service: "deadletter", Topology: e.topo}, bus.DeadLetterMover())
			dlq := collect(t, e.js, bus.StreamDLQ, bus.DeadLetter.Filter(org))

			cfg := e.topo.ConsumerConfig("crashy", "input", tt.ev.Filter(org), org)
			cfg.AckWait = 200 * time.Millisecond
			cfg.MaxDeliver = 2
			cons, err := e.js.CreateOrUpdateConsumer(ctx, tt.stream, cfg)
			if err != nil {
				t.Fatal(err)
			}
			var msg []byte
			var subj string
			if tt.wq {
				subj, _ = bus.SyncRequested.Subject(org, "")
				req := &ev.SyncRequested{Org: string(org), SyncId: "s1", Kind: ev.SyncKind_SYNC_KIND_FULL, RequestedBy: "test"}
				msg, _ = proto.Marshal(req)
				if _, err := e.pub.Publish(ctx, bus.Outbound{Subject: subj, Message: req, MsgID: "s1"}); err != nil {
					t.Fatal(err)
				}
			} else {
				subj, _ = bus.EASObserved.Subject(org, "dev1")
				publishObserved(t, e, "dev1", "m1")
			}
			// Take every delivery and never settle it, like a worker that
			// crashes mid-handler each time. Keep pulling, as a live
			// consumer does: the server notices the exhausted message when
			// it next looks for something to deliver.
			var deliveries atomic.Int32
			pullCtx, stopPulling := context.WithCancel(ctx)
			pulled := make(chan struct{})
			go func() {
				defer close(pulled)
				for pullCtx.Err() == nil {
					batch, err := cons.Fetch(1, jetstream.FetchMaxWait(100*time.Millisecond))
					if err != nil {
						continue
					}
					for range batch.Messages() {
						deliveries.Add(1)
					}
				}
			}()
			m := dlq.AwaitLen(t, 10*time.Second, 1)[0]
			stopPulling()
			<-pulled
			if n := deliveries.Load(); n != 2 {
				t.Errorf("%d deliveries, want MaxDeliver=2", n)
			}
			h := m.Headers()
			if h.Get(bus.HeaderDLQConsumer) != cfg.Durable || h.Get(bus.HeaderDLQSubject) != subj || h.Get(bus.HeaderDLQDeliveries) != "2" {
				t.Errorf("dead letter headers %v", h)
			}
			if !contains(h.Get(bus.HeaderDLQReason), "max deliveries") {
				t.Errorf("reason %q", h.Get(bus.HeaderDLQReason))
			}
			if m.Subject() != "easguard.contoso.dlq.crashy" {
				t.Errorf("subject %s", m.Subject())
			}
			if len(msg) > 0 && string(m.Data()) != string(msg) {
				t.Errorf("body changed")
			}
			s, _ := e.js.Stream(ctx, tt.stream)
			info, err := s.Info(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if want := map[bool]uint64{true: 0, false: 1}[tt.wq]; info.State.Msgs != want {
				t.Errorf("source stream holds %d messages, want %d (work queues drop the moved message, facts keep it)", info.State.Msgs, want)
			}
		})
	}
}

// A consumer closed mid-flight (the process died while its handler held a
// message): a new instance gets the unacked message, nothing is lost.
func TestCrashMidFlightRedeliversToNewInstance(t *testing.T) {
	s := natstest.Server(t)
	_, js := natstest.Connect(t, s)
	topo := fastTopology()
	ctx := natstest.Context(t)
	if err := bus.Provision(ctx, js, topo); err != nil {
		t.Fatal(err)
	}
	// Instance A on its own connection, so it can die alone.
	ncA, err := s.Connect("instance-a")
	if err != nil {
		t.Fatal(err)
	}
	jsA, _ := jetstream.New(ncA)
	holding := make(chan struct{})
	release := make(chan struct{})
	defer close(release)
	rA, err := bus.NewRunner(jsA, bus.RunnerConfig{Service: "matcher", Org: org, Topology: topo, Logger: quietLogger(), DrainTimeout: 100 * time.Millisecond},
		bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
			close(holding)
			<-release
			return []bus.Outbound{matchedFrom(in)}, nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	aCtx, aCancel := context.WithCancel(ctx)
	defer aCancel()
	go func() { _ = rA.Run(aCtx) }()
	natstest.Eventually(t, 5*time.Second, "A ready", func() bool { return rA.Ready() == nil })

	e := &env{js: js, topo: topo}
	e.pub, _ = bus.NewPublisher(js, bus.Instrumentation{})
	out := collect(t, js, bus.StreamMatch, bus.DeviceMatched.Filter(org))
	publishObserved(t, e, "dev1", "m1")
	<-holding
	ncA.Close() // A dies holding the message: no ack, no heartbeats

	var seen atomic.Int32
	runRunner(t, js, bus.RunnerConfig{Service: "matcher", Org: org, Topology: topo},
		bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
			seen.Add(1)
			return []bus.Outbound{matchedFrom(in)}, nil
		}))
	got := out.AwaitLen(t, 10*time.Second, 1)
	if m := decode[ev.DeviceMatched](t, got[0]); m.GetObserved().GetPartnership().GetDeviceId() != "dev1" {
		t.Fatalf("output %v", m)
	}
	if seen.Load() != 1 {
		t.Fatalf("instance B handled %d messages, want 1", seen.Load())
	}
	waitConsumerSettled(t, js, bus.StreamEAS, "matcher-eas-observed-contoso")
}

// A graceful stop lets the handler in flight finish, publishes its output
// and acks its input before Run returns.
func TestDrainFinishesInFlightWork(t *testing.T) {
	e := newEnv(t)
	holding := make(chan struct{})
	release := make(chan struct{})
	r, err := bus.NewRunner(e.js, bus.RunnerConfig{Service: "matcher", Org: org, Topology: e.topo, Logger: quietLogger()},
		bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
			close(holding)
			<-release
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return []bus.Outbound{matchedFrom(in)}, nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	natstest.Eventually(t, 5*time.Second, "ready", func() bool { return r.Ready() == nil })
	out := collect(t, e.js, bus.StreamMatch, bus.DeviceMatched.Filter(org))
	publishObserved(t, e, "dev1", "m1")
	<-holding
	cancel()
	select {
	case <-done:
		t.Fatal("Run returned while a handler was still running")
	default:
	}
	natstest.Eventually(t, 5*time.Second, "not ready while draining", func() bool { return r.Ready() != nil })
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	out.AwaitLen(t, 10*time.Second, 1)
	waitConsumerSettled(t, e.js, bus.StreamEAS, "matcher-eas-observed-contoso")
}

// A handler that runs for several AckWaits keeps its message: the runner's
// progress heartbeats stop the server from redelivering it.
func TestLongHandlerIsNotRedelivered(t *testing.T) {
	e := newEnv(t)
	var log deliveryLog
	release := make(chan struct{})
	runRunner(t, e.js, bus.RunnerConfig{Service: "executor", Org: org, Topology: e.topo, Concurrency: 2},
		bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
			log.add(0)
			<-release
			return nil, nil
		}))
	publishObserved(t, e, "dev1", "m1")
	natstest.Eventually(t, 5*time.Second, "first delivery", func() bool { return log.len() == 1 })
	// Wait until three AckWaits have passed since the delivery, by the
	// server's own view of the consumer, then check nothing was redelivered.
	ctx := natstest.Context(t)
	c, _ := e.js.Consumer(ctx, bus.StreamEAS, "executor-eas-observed-contoso")
	start := time.Now()
	natstest.Eventually(t, 10*time.Second, "three ack waits", func() bool {
		return time.Since(start) > 3*e.topo.Consumer.AckWait
	})
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	close(release)
	if log.len() != 1 || info.NumRedelivered != 0 || info.NumAckPending != 1 {
		t.Fatalf("deliveries %d, redelivered %d, ack pending %d; want 1, 0, 1", log.len(), info.NumRedelivered, info.NumAckPending)
	}
	waitConsumerSettled(t, e.js, bus.StreamEAS, "executor-eas-observed-contoso")
}

func TestNewRunnerRefusesMisconfiguredRoutes(t *testing.T) {
	e := newEnv(t)
	h := func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) { return nil, nil }
	tests := []struct {
		name   string
		cfg    bus.RunnerConfig
		routes []bus.Route
	}{
		{"handler type does not match family", bus.RunnerConfig{Service: "x", Org: org}, []bus.Route{bus.Handle("r", bus.DeviceMatched, h)}},
		{"no org", bus.RunnerConfig{Service: "x"}, []bus.Route{bus.Handle("r", bus.EASObserved, h)}},
		{"same route twice", bus.RunnerConfig{Service: "x", Org: org}, []bus.Route{bus.Handle("r", bus.EASObserved, h), bus.Handle("r", bus.EASObserved, h)}},
		{"no routes", bus.RunnerConfig{Service: "x", Org: org}, nil},
		{"no service", bus.RunnerConfig{Org: org}, []bus.Route{bus.Handle("r", bus.EASObserved, h)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := bus.NewRunner(e.js, tt.cfg, tt.routes...); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

func TestHandlerPanicIsRetriedNotFatal(t *testing.T) {
	e := newEnv(t)
	var calls atomic.Int32
	runRunner(t, e.js, bus.RunnerConfig{Service: "matcher", Org: org, Topology: e.topo, Retry: fastRetry()},
		bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
			if calls.Add(1) == 1 {
				var m map[string]int
				m["boom"] = 1
			}
			return []bus.Outbound{matchedFrom(in)}, nil
		}))
	out := collect(t, e.js, bus.StreamMatch, bus.DeviceMatched.Filter(org))
	publishObserved(t, e, "dev1", "m1")
	out.AwaitLen(t, 10*time.Second, 1)
	if calls.Load() != 2 {
		t.Fatalf("calls = %d, want 2", calls.Load())
	}
}

// Messages queued behind a serial route's slow handler are not redelivered
// while they wait, in this replica's buffer or another's: a barrier that
// waits minutes for the pipeline to drain must not spend the deliveries
// of the sync reports behind it (the cluster test dead-lettered one that
// way). Across two replicas the route handles one message at a time.
func TestSerialRouteQueueIsNotRedelivered(t *testing.T) {
	e := newEnv(t)
	var mu sync.Mutex
	delivered := map[string][]uint64{}
	running, most := 0, 0
	release := make(chan struct{})
	route := bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
		id := in.GetPartnership().GetDeviceId()
		mu.Lock()
		running++
		most = max(most, running)
		delivered[id] = append(delivered[id], bus.Delivery(ctx))
		mu.Unlock()
		<-release
		mu.Lock()
		running--
		mu.Unlock()
		return nil, nil
	}).Serial()
	t.Cleanup(func() {
		if t.Failed() {
			mu.Lock()
			defer mu.Unlock()
			t.Logf("deliveries by device %v; at most %d handlers at once", delivered, most)
		}
	})
	for range 2 {
		runRunner(t, e.js, bus.RunnerConfig{Service: "evaluator", Org: org, Topology: e.topo, Concurrency: 4}, route)
	}
	for _, id := range []string{"dev1", "dev2", "dev3"} {
		publishObserved(t, e, id, "m-"+id)
	}
	handled := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(delivered)
	}
	natstest.Eventually(t, 5*time.Second, "first delivery", func() bool { return handled() >= 1 })
	// Hold the first one for more deliveries' worth of AckWaits than the
	// consumer allows, then let everything through.
	start := time.Now()
	natstest.Eventually(t, 20*time.Second, "MaxDeliver ack waits", func() bool {
		return time.Since(start) > time.Duration(e.topo.Consumer.MaxDeliver+1)*e.topo.Consumer.AckWait
	})
	close(release)
	natstest.Eventually(t, 10*time.Second, "all three handled", func() bool { return handled() == 3 })
	mu.Lock()
	defer mu.Unlock()
	for _, id := range []string{"dev1", "dev2", "dev3"} {
		if got := delivered[id]; !slices.Equal(got, []uint64{1}) {
			t.Errorf("%s: deliveries %v, want [1]", id, got)
		}
	}
	if most != 1 {
		t.Errorf("%d handlers at once across the replicas, want 1", most)
	}
}
