package bus

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	"github.com/easguard/easguard/pkg/telemetry"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// ErrNotReady is returned by Runner.Ready until every consumer is bound.
var ErrNotReady = errors.New("consumers not bound")

// RetryPolicy computes the redelivery delay of a message that failed with a
// transient error from how often it has been delivered.
type RetryPolicy struct {
	Initial    time.Duration
	Max        time.Duration
	Multiplier float64
	// Jitter is the randomisation factor (0.2 = ±20%); spreading retries
	// keeps a recovering Exchange from being hit by all of them at once.
	Jitter float64
}

// DefaultRetryPolicy starts at one second and caps at five minutes.
func DefaultRetryPolicy() RetryPolicy {
	return RetryPolicy{Initial: time.Second, Max: 5 * time.Minute, Multiplier: 2, Jitter: 0.2}
}

// Delay returns the delay before delivery number delivered+1.
func (p RetryPolicy) Delay(delivered uint64) time.Duration {
	b := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(p.Initial),
		backoff.WithMaxInterval(p.Max),
		backoff.WithMultiplier(p.Multiplier),
		backoff.WithRandomizationFactor(p.Jitter),
		backoff.WithMaxElapsedTime(0),
	)
	d := b.NextBackOff()
	for i := uint64(1); i < delivered && d < p.Max; i++ {
		d = b.NextBackOff()
	}
	return d
}

// RunnerConfig configures a Runner.
type RunnerConfig struct {
	// Service names the worker; it prefixes durable consumer names and
	// becomes the key of its dead-letter subject.
	Service string
	// Org scopes every route to one organisation; empty only for
	// org-independent services such as the dead-letter mover.
	Org      Org
	Topology Topology
	Retry    RetryPolicy
	// Concurrency is the number of messages of one route handled at once
	// by this process.
	Concurrency int
	// Prefetch is how many messages each consume loop buffers. Keep it at 1
	// for slow handlers so buffered messages do not outlive AckWait.
	Prefetch int
	// DrainTimeout bounds how long shutdown waits for handlers in flight.
	DrainTimeout time.Duration
	Logger       *slog.Logger
	Instrumentation
}

// Route binds one durable consumer to one handler. Build it with Handle.
type Route struct {
	name string
	// bind resolves stream, filter and span template for the runner's org.
	bind     func(org Org) (stream, filter, template string, err error)
	decode   func(m jetstream.Msg) (any, error)
	handle   func(ctx context.Context, r *Runner, in any) ([]Outbound, error)
	err      error
	serial   bool
	prefetch int
}

// Serial makes the route handle one message at a time whatever the
// runner's Concurrency, and across every replica (its consumer's
// MaxAckPending is 1): for a handler that waits on the bus (a barrier
// that polls until the pipeline has drained), several at once would only
// multiply the polling and contend for the lock it takes, and a message
// buffered behind one that takes minutes would use up its deliveries
// waiting.
func (r Route) Serial() Route {
	r.serial = true
	return r
}

// Prefetch sets how many messages each of the route's consume loops
// buffers, in place of the runner's Prefetch: a route whose messages are
// pages of a hundred partnerships (hundreds of kilobytes each) buffers a
// couple, not a runner's worth of small events.
func (r Route) Prefetch(n int) Route {
	r.prefetch = n
	return r
}

// Handle builds a route that feeds events of one family to a typed handler.
// The handler is pure in the runner's sense: event in, events out, or an
// error. Return an error wrapped with Poison for input that can never be
// processed, RetryAfter when the delay is known, any other error to retry
// with backoff. The runner publishes the outputs and only then acknowledges
// the input, so a crash anywhere leads to a redelivery, never a loss.
func Handle[T any, PT interface {
	*T
	proto.Message
}](name string, ev Event, h func(ctx context.Context, in PT) ([]Outbound, error)) Route {
	want := string(PT(new(T)).ProtoReflect().Descriptor().FullName())
	rt := Route{
		name: name,
		bind: func(org Org) (string, string, string, error) {
			if org == "" {
				return "", "", "", fmt.Errorf("route %s: %w: event routes need an org", name, ErrBadOrg)
			}
			return ev.stream, ev.Filter(org), ev.Template(), nil
		},
		decode: func(m jetstream.Msg) (any, error) {
			if got := m.Headers().Get(HeaderType); got != want {
				return nil, fmt.Errorf("message type %q, want %q", got, want)
			}
			in := PT(new(T))
			if err := proto.Unmarshal(m.Data(), in); err != nil {
				return nil, fmt.Errorf("decode %s: %w", want, err)
			}
			if err := checkOrg(m.Subject(), in); err != nil {
				return nil, err
			}
			if v, ok := any(in).(interface{ Validate() error }); ok {
				if err := v.Validate(); err != nil {
					return nil, fmt.Errorf("invalid %s: %w", want, err)
				}
			}
			return in, nil
		},
		handle: func(ctx context.Context, _ *Runner, in any) ([]Outbound, error) {
			return h(ctx, in.(PT))
		},
	}
	if ev.msgType != want {
		rt.err = fmt.Errorf("route %s: handler takes %s but %s carries %s", name, want, ev.name, ev.msgType)
	}
	return rt
}

// checkOrg refuses an event whose org field disagrees with its subject: a
// worker scoped to one org must never act on another org's data.
func checkOrg(subject string, msg proto.Message) error {
	o, ok := msg.(interface{ GetOrg() string })
	if !ok {
		return nil
	}
	org, _, err := ParseSubject(subject)
	if err != nil {
		return err
	}
	if o.GetOrg() != string(org) {
		return fmt.Errorf("event for org %q on a subject of org %q", o.GetOrg(), org)
	}
	return nil
}

// Runner runs the routes of one worker: it binds their durable consumers,
// and for every message decodes, extracts the trace context, calls the
// handler, publishes the outputs and settles the input.
type Runner struct {
	js     jetstream.JetStream
	cfg    RunnerConfig
	pub    *Publisher
	log    *slog.Logger
	tracer trace.Tracer
	routes []*boundRoute

	ready    atomic.Bool
	inflight sync.WaitGroup

	processed metric.Int64Counter
	duration  metric.Float64Histogram
	// deadLetters counts the messages this runner moved to the dead-letter
	// subject: each one is something easguard gave up on.
	deadLetters metric.Int64Counter
	// status is the status bucket, opened by the first dead letter
	// (statusBucket). Guarded by statusMu.
	statusMu sync.Mutex
	status   jetstream.KeyValue
}

type boundRoute struct {
	Route
	stream, filter, template string
	consumer                 jetstream.ConsumerConfig
}

func meter(in Instrumentation) metric.Meter {
	if in.MeterProvider == nil {
		return noop.NewMeterProvider().Meter(scope)
	}
	return in.MeterProvider.Meter(scope)
}

// NewRunner checks the routes and prepares their consumers; nothing touches
// the server until Run.
func NewRunner(js jetstream.JetStream, cfg RunnerConfig, routes ...Route) (*Runner, error) {
	if cfg.Service == "" {
		return nil, errors.New("new runner: service name is empty")
	}
	if cfg.Topology.Consumer.AckWait == 0 {
		cfg.Topology = DefaultTopology()
	}
	if cfg.Retry.Initial == 0 {
		cfg.Retry = DefaultRetryPolicy()
	}
	if cfg.Concurrency < 1 {
		cfg.Concurrency = 1
	}
	if cfg.Prefetch < 1 {
		cfg.Prefetch = 16
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	pub, err := NewPublisher(js, cfg.Instrumentation)
	if err != nil {
		return nil, fmt.Errorf("new runner %s: %w", cfg.Service, err)
	}
	m := meter(cfg.Instrumentation)
	processed, err := m.Int64Counter("messaging.client.consumed.messages", metric.WithDescription("Messages handled, by outcome."), metric.WithUnit("{message}"))
	if err != nil {
		return nil, fmt.Errorf("new runner %s: %w", cfg.Service, err)
	}
	duration, err := m.Float64Histogram("messaging.process.duration", metric.WithDescription("Time to handle a message, publish its outputs and settle it."), metric.WithUnit("s"))
	if err != nil {
		return nil, fmt.Errorf("new runner %s: %w", cfg.Service, err)
	}
	deadLetters, err := m.Int64Counter("easguard.dead_letters", metric.WithUnit("{message}"),
		metric.WithDescription("Messages moved to the dead-letter subject (easguard.<org>.dlq.<stage>), by organisation and stage: a poison message, or one that ran out of deliveries."))
	if err != nil {
		return nil, fmt.Errorf("new runner %s: %w", cfg.Service, err)
	}
	r := &Runner{
		js: js, cfg: cfg, pub: pub, deadLetters: deadLetters,
		log:       cfg.Logger.With("worker", cfg.Service),
		tracer:    cfg.tracer(),
		processed: processed, duration: duration,
	}
	seen := map[string]bool{}
	for _, rt := range routes {
		if rt.err != nil {
			return nil, fmt.Errorf("new runner %s: %w", cfg.Service, rt.err)
		}
		if seen[rt.name] {
			return nil, fmt.Errorf("new runner %s: route %s added twice", cfg.Service, rt.name)
		}
		seen[rt.name] = true
		stream, filter, template, err := rt.bind(cfg.Org)
		if err != nil {
			return nil, fmt.Errorf("new runner %s: %w", cfg.Service, err)
		}
		consumer := cfg.Topology.ConsumerConfig(cfg.Service, rt.name, filter, cfg.Org)
		if rt.serial {
			// The server hands out the next message only when the one in
			// hand is settled, so nothing waits in a buffer, unheartbeated,
			// behind a handler that takes minutes: such a message would be
			// redelivered every AckWait until MaxDeliver dead-lettered it.
			consumer.MaxAckPending = 1
		}
		r.routes = append(r.routes, &boundRoute{
			Route: rt, stream: stream, filter: filter, template: template, consumer: consumer,
		})
	}
	if len(r.routes) == 0 {
		return nil, fmt.Errorf("new runner %s: no routes", cfg.Service)
	}
	return r, nil
}

// Publisher returns the runner's publisher, for workers that also publish
// outside a handler (a collector's schedule, an MDM poll).
func (r *Runner) Publisher() *Publisher { return r.pub }

// Ready returns nil once every consumer is bound and consuming; a health
// server's /readyz uses it.
func (r *Runner) Ready() error {
	if !r.ready.Load() {
		return fmt.Errorf("%s: %w", r.cfg.Service, ErrNotReady)
	}
	return nil
}

// Run binds the consumers and handles messages until ctx is cancelled, then
// drains: it stops pulling, lets handlers in flight finish (within
// DrainTimeout), and settles what they return.
func (r *Runner) Run(ctx context.Context) error {
	// Handlers get a context that outlives ctx, so a shutdown does not
	// abort work half-way; it is cancelled only when the drain times out.
	hctx, cancelHandlers := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelHandlers()

	var ccs []jetstream.ConsumeContext
	stopAll := func() {
		for _, cc := range ccs {
			cc.Stop()
		}
	}
	for _, rt := range r.routes {
		cons, err := r.js.CreateOrUpdateConsumer(ctx, rt.stream, rt.consumer)
		if err != nil {
			stopAll()
			return fmt.Errorf("run %s: bind consumer %s on %s: %w", r.cfg.Service, rt.consumer.Durable, rt.stream, err)
		}
		n := r.cfg.Concurrency
		if rt.serial {
			n = 1
		}
		prefetch := r.cfg.Prefetch
		if rt.prefetch > 0 {
			prefetch = rt.prefetch
		}
		for i := 0; i < n; i++ {
			cc, err := cons.Consume(func(m jetstream.Msg) { r.process(hctx, rt, m) },
				jetstream.PullMaxMessages(prefetch),
				jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
					if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) {
						r.ready.Store(false)
						r.log.Error("consumer lost", "consumer", rt.consumer.Durable, "error", err)
						return
					}
					r.log.Warn("consume", "consumer", rt.consumer.Durable, "error", err)
				}))
			if err != nil {
				stopAll()
				return fmt.Errorf("run %s: consume %s: %w", r.cfg.Service, rt.consumer.Durable, err)
			}
			ccs = append(ccs, cc)
		}
		r.log.Info("consumer bound", "consumer", rt.consumer.Durable, "stream", rt.stream, "filter", rt.filter)
	}
	r.ready.Store(true)
	<-ctx.Done()
	r.ready.Store(false)

	for _, cc := range ccs {
		cc.Drain()
	}
	done := make(chan struct{})
	go func() {
		for _, cc := range ccs {
			<-cc.Closed()
		}
		r.inflight.Wait()
		close(done)
	}()
	select {
	case <-done:
		r.log.Info("drained")
	case <-time.After(r.cfg.DrainTimeout):
		r.log.Warn("drain timed out; cancelling handlers, their messages will be redelivered", "timeout", r.cfg.DrainTimeout)
		cancelHandlers()
		stopAll()
		<-done
	}
	return nil
}

// outcome labels for metrics and spans.
type deliveryKey struct{}

// Delivery returns which delivery of its input a handler is running for:
// 1 the first time, more after retries and crashes (0 outside a handler).
// Handlers report it, for example as the attempts an outcome took.
func Delivery(ctx context.Context) uint64 {
	n, _ := ctx.Value(deliveryKey{}).(uint64)
	return n
}

const (
	outcomeAck        = "ack"
	outcomeRetry      = "retry"
	outcomeDeadLetter = "dead_letter"
)

func (r *Runner) process(ctx context.Context, rt *boundRoute, m jetstream.Msg) {
	r.inflight.Add(1)
	defer r.inflight.Done()
	start := time.Now()
	md, err := m.Metadata()
	if err != nil {
		// Not a JetStream delivery; nothing to settle against.
		r.log.Error("delivery without metadata", "consumer", rt.consumer.Durable, "error", err)
		return
	}
	ctx = telemetry.Extract(ctx, r.cfg.propagator(), m.Headers())
	ctx, span := telemetry.StartProcess(ctx, r.tracer, telemetry.ProcessSpan{
		Subject: m.Subject(), Template: rt.template, Consumer: rt.consumer.Durable,
		MsgID: m.Headers().Get(jetstream.MsgIDHeader), Stream: md.Stream,
		StreamSeq: md.Sequence.Stream, Delivered: md.NumDelivered, Size: len(m.Data()),
	})
	defer span.End()
	if r.cfg.Org != "" {
		span.SetAttributes(telemetry.OrgKey.String(string(r.cfg.Org)))
	}

	ctx = context.WithValue(ctx, deliveryKey{}, md.NumDelivered)
	stop := r.heartbeat(m, rt.consumer.AckWait)
	outcome, err := r.handle(ctx, rt, m, md)
	stop()

	span.SetAttributes(attribute.String("easguard.outcome", outcome))
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, outcome)
		span.SetAttributes(semconv.ErrorTypeKey.String(outcome))
		r.log.WarnContext(ctx, "message not processed", "consumer", rt.consumer.Durable, "subject", m.Subject(),
			"stream_seq", md.Sequence.Stream, "delivered", md.NumDelivered, "outcome", outcome, "error", err)
	}
	attrs := metric.WithAttributes(telemetry.SystemNATS, semconv.MessagingDestinationTemplate(rt.template),
		semconv.MessagingConsumerGroupName(rt.consumer.Durable), attribute.String("easguard.outcome", outcome))
	r.processed.Add(ctx, 1, attrs)
	r.duration.Record(ctx, time.Since(start).Seconds(), attrs)
}

// heartbeat tells the server the message is still being worked on, so a
// long handler does not get its message redelivered to another instance.
func (r *Runner) heartbeat(m jetstream.Msg, ackWait time.Duration) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(ackWait / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if err := m.InProgress(); err != nil {
					r.log.Warn("progress heartbeat", "subject", m.Subject(), "error", err)
				}
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

// handle runs decode → handler → publish → settle and returns the outcome.
func (r *Runner) handle(ctx context.Context, rt *boundRoute, m jetstream.Msg, md *jetstream.MsgMetadata) (string, error) {
	in, err := rt.decode(m)
	if err != nil {
		return r.deadLetter(ctx, rt, m, md, Poison(err))
	}
	outs, err := r.call(ctx, rt, in)
	if err == nil {
		for i, out := range outs {
			if out.MsgID == "" {
				out.MsgID = r.outputID(rt, m, md, i, out.Subject)
			}
			if _, err := r.pub.Publish(ctx, out); err != nil {
				// Outputs already published are stored once more only if the
				// duplicate window has passed; they carry the same ids.
				return r.retry(ctx, rt, m, md, fmt.Errorf("publish output %d: %w", i, err))
			}
		}
		if err := m.DoubleAck(ctx); err != nil {
			// The outputs are out; a redelivery re-publishes them under the
			// same ids, which the stream drops as duplicates.
			return outcomeAck, fmt.Errorf("ack: %w", err)
		}
		return outcomeAck, nil
	}
	if errors.Is(err, ErrPoison) {
		return r.deadLetter(ctx, rt, m, md, err)
	}
	return r.retry(ctx, rt, m, md, err)
}

// call runs the handler, turning a panic into a transient error so that one
// bad message cannot take the worker down; MaxDeliver bounds the retries.
func (r *Runner) call(ctx context.Context, rt *boundRoute, in any) (outs []Outbound, err error) {
	defer func() {
		if p := recover(); p != nil {
			r.log.ErrorContext(ctx, "handler panic", "route", rt.name, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			err = fmt.Errorf("handler %s panicked: %v", rt.name, p)
		}
	}()
	return rt.handle(ctx, r, in)
}

// outputID derives the Nats-Msg-Id of a handler output from its input, so a
// redelivered input yields outputs the stream recognises as duplicates.
func (r *Runner) outputID(rt *boundRoute, m jetstream.Msg, md *jetstream.MsgMetadata, i int, subject string) string {
	src := m.Headers().Get(jetstream.MsgIDHeader)
	if src == "" {
		src = md.Stream + ":" + strconv.FormatUint(md.Sequence.Stream, 10)
	}
	sum := sha256.Sum256([]byte(r.cfg.Service + "\x00" + rt.name + "\x00" + src + "\x00" + strconv.Itoa(i) + "\x00" + subject))
	return hex.EncodeToString(sum[:16])
}

// retry naks with a delay that grows with the delivery count, or
// dead-letters the message if this was its last allowed delivery.
func (r *Runner) retry(ctx context.Context, rt *boundRoute, m jetstream.Msg, md *jetstream.MsgMetadata, cause error) (string, error) {
	if max := rt.consumer.MaxDeliver; max > 0 && md.NumDelivered >= uint64(max) {
		return r.deadLetter(ctx, rt, m, md, fmt.Errorf("gave up after %d deliveries: %w", md.NumDelivered, cause))
	}
	d, ok := retryDelay(cause)
	if !ok {
		d = r.cfg.Retry.Delay(md.NumDelivered)
	}
	trace.SpanFromContext(ctx).SetAttributes(attribute.Int64("easguard.retry_delay_ms", d.Milliseconds()))
	if err := m.NakWithDelay(d); err != nil {
		return outcomeRetry, fmt.Errorf("%w (and nak failed: %v; the server redelivers after AckWait)", cause, err)
	}
	return outcomeRetry, cause
}

// deadLetter publishes the message to the dead-letter subject with the
// reason, then terminates it. If the dead-letter publish fails the message
// is retried instead: it is never dropped.
func (r *Runner) deadLetter(ctx context.Context, rt *boundRoute, m jetstream.Msg, md *jetstream.MsgMetadata, cause error) (string, error) {
	org := r.cfg.Org
	if org == "" {
		if o, _, err := ParseSubject(m.Subject()); err == nil {
			org = o
		} else {
			org = SystemOrg
		}
	}
	err := r.publishDeadLetter(ctx, deadLetterInfo{
		org: org, stage: r.cfg.Service, subject: m.Subject(), stream: md.Stream,
		streamSeq: md.Sequence.Stream, deliveries: md.NumDelivered, consumer: rt.consumer.Durable,
		reason: cause.Error(), data: m.Data(), header: m.Headers(),
	})
	if err != nil {
		if nerr := m.NakWithDelay(r.cfg.Retry.Delay(md.NumDelivered)); nerr != nil {
			r.log.Error("nak after failed dead-letter", "error", nerr)
		}
		return outcomeRetry, fmt.Errorf("dead-letter (%v): %w", cause, err)
	}
	if err := m.TermWithReason(truncate(cause.Error(), 256)); err != nil {
		return outcomeDeadLetter, fmt.Errorf("%w (dead-lettered; term failed: %v)", cause, err)
	}
	return outcomeDeadLetter, cause
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// Header names on dead letters.
const (
	HeaderDLQReason     = "Easguard-Dlq-Reason"
	HeaderDLQSubject    = "Easguard-Dlq-Subject"
	HeaderDLQStream     = "Easguard-Dlq-Stream"
	HeaderDLQStreamSeq  = "Easguard-Dlq-Stream-Seq"
	HeaderDLQDeliveries = "Easguard-Dlq-Deliveries"
	HeaderDLQConsumer   = "Easguard-Dlq-Consumer"
)

type deadLetterInfo struct {
	org                   Org
	stage                 string
	subject, stream       string
	streamSeq, deliveries uint64
	consumer, reason      string
	data                  []byte
	header                nats.Header
}

// publishDeadLetter sends the original body with its original headers plus
// the reason. Its message id is fixed per stream message and consumer, so the
// runner's own last-attempt path and the max-deliveries mover never store
// the same dead letter twice.
func (r *Runner) publishDeadLetter(ctx context.Context, d deadLetterInfo) error {
	subject, err := DeadLetter.Subject(d.org, d.stage)
	if err != nil {
		return fmt.Errorf("dead-letter subject for %s: %w", d.subject, err)
	}
	h := nats.Header{}
	for k, v := range d.header {
		if k == jetstream.MsgIDHeader || k == "traceparent" || k == "tracestate" {
			continue
		}
		h[k] = append([]string(nil), v...)
	}
	h.Set(HeaderDLQReason, truncate(d.reason, 1024))
	h.Set(HeaderDLQSubject, d.subject)
	h.Set(HeaderDLQStream, d.stream)
	h.Set(HeaderDLQStreamSeq, strconv.FormatUint(d.streamSeq, 10))
	h.Set(HeaderDLQDeliveries, strconv.FormatUint(d.deliveries, 10))
	h.Set(HeaderDLQConsumer, d.consumer)
	id := "dlq:" + d.stream + ":" + strconv.FormatUint(d.streamSeq, 10) + ":" + d.consumer
	if _, err = r.pub.publish(ctx, subject, DeadLetter.Template(), id, d.data, h); err != nil {
		return err
	}
	r.deadLetters.Add(ctx, 1, metric.WithAttributes(telemetry.MetricOrgKey.String(string(d.org)), attribute.String("easguard.stage", d.stage)))
	r.alertDeadLetter(ctx, d, id)
	return nil
}

// deadLetterAlertEvery is how often one stage's dead letters are alerted:
// a wave that dead-letters a thousand messages is one alert, not a
// thousand mails to the administrators.
const deadLetterAlertEvery = 15 * time.Minute

// alertDeadLetter raises an alert for a dead letter, at most once per
// stage every deadLetterAlertEvery. A dead-lettered alert raises none: its
// delivery is what failed, and an alert about it would go the same way.
func (r *Runner) alertDeadLetter(ctx context.Context, d deadLetterInfo, id string) {
	if _, e, err := ParseSubject(d.subject); err == nil && e.name == AlertRaised.name {
		return
	}
	status, err := r.statusBucket(ctx)
	if err == nil {
		err = RaiseDue(ctx, r.pub, status, d.org, "dlq."+d.stage, deadLetterAlertEvery, time.Now(), Alert{Kind: ev.AlertKind_ALERT_KIND_DEAD_LETTER,
			Severity: ev.AlertSeverity_ALERT_SEVERITY_WARNING, ID: id,
			Summary: fmt.Sprintf("the %s gave up on a message from %s: %s", d.stage, d.subject, truncate(d.reason, 300)),
			Detail: map[string]string{"stage": d.stage, "subject": d.subject, "stream": d.stream, "stream_seq": strconv.FormatUint(d.streamSeq, 10),
				"consumer": d.consumer, "deliveries": strconv.FormatUint(d.deliveries, 10), "reason": truncate(d.reason, 1024)}})
	}
	if err != nil {
		r.log.WarnContext(ctx, "dead letter not alerted", "stage", d.stage, "subject", d.subject, "error", err)
	}
}

// statusBucket opens the status bucket once, for the dead-letter alerts'
// throttle; a failed open is tried again with the next dead letter.
func (r *Runner) statusBucket(ctx context.Context) (jetstream.KeyValue, error) {
	r.statusMu.Lock()
	defer r.statusMu.Unlock()
	if r.status == nil {
		kv, err := r.js.KeyValue(ctx, BucketStatus)
		if err != nil {
			return nil, err
		}
		r.status = kv
	}
	return r.status, nil
}
