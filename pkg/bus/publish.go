package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	"github.com/easguard/easguard/pkg/telemetry"
)

// Header names easguard sets on its messages.
const (
	// HeaderType names the protobuf message in the body, e.g.
	// easguard.v1.EASPartnershipObserved; a consumer refuses any other.
	HeaderType = "Easguard-Type"
	// HeaderContentType is "application/protobuf" for every easguard event.
	HeaderContentType = "Content-Type"
	contentTypeProto  = "application/protobuf"
)

// ErrNoMsgID is returned when a message is published without a Nats-Msg-Id.
var ErrNoMsgID = errors.New("publish without message id")

// Outbound is one message a handler wants published.
type Outbound struct {
	Subject string
	Message proto.Message
	// MsgID becomes the Nats-Msg-Id. It must be derived from what caused the
	// message, so that a retry after a crash publishes the same id and the
	// stream stores the message once. The runner derives one for handler
	// outputs that leave it empty.
	MsgID string
	// Parent, when valid, makes the message part of that trace instead of
	// the current one, which becomes a link: a device's whole journey stays
	// one trace even when a later step is set off by something else (an
	// MDM change, a later sync).
	Parent trace.SpanContext
}

// Instrumentation carries the providers components report to. Nil fields
// mean "do not report", which is what unit tests that do not look want.
type Instrumentation struct {
	TracerProvider trace.TracerProvider
	MeterProvider  metric.MeterProvider
	Propagator     propagation.TextMapPropagator
}

func (in Instrumentation) tracer() trace.Tracer {
	if in.TracerProvider == nil {
		return trace.NewNoopTracerProvider().Tracer(scope)
	}
	return in.TracerProvider.Tracer(scope)
}

func (in Instrumentation) propagator() propagation.TextMapPropagator {
	if in.Propagator == nil {
		return telemetry.Propagator()
	}
	return in.Propagator
}

const scope = "github.com/easguard/easguard/pkg/bus"

// Publisher publishes easguard events with a deterministic Nats-Msg-Id, a
// producer span and the trace context in the headers.
type Publisher struct {
	js       jetstream.JetStream
	tracer   trace.Tracer
	prop     propagation.TextMapPropagator
	sent     metric.Int64Counter
	duration metric.Float64Histogram
}

// NewPublisher returns a publisher on js.
func NewPublisher(js jetstream.JetStream, in Instrumentation) (*Publisher, error) {
	m := meter(in)
	sent, err := m.Int64Counter("messaging.client.sent.messages", metric.WithDescription("Messages published."), metric.WithUnit("{message}"))
	if err != nil {
		return nil, fmt.Errorf("new publisher: %w", err)
	}
	dur, err := m.Float64Histogram("messaging.client.operation.duration", metric.WithDescription("Time to publish and get the stream's acknowledgement."), metric.WithUnit("s"))
	if err != nil {
		return nil, fmt.Errorf("new publisher: %w", err)
	}
	return &Publisher{js: js, tracer: in.tracer(), prop: in.propagator(), sent: sent, duration: dur}, nil
}

// Publish encodes and publishes one event and waits for the stream's
// acknowledgement. A duplicate inside the stream's window is not an error:
// the returned PubAck has Duplicate set.
func (p *Publisher) Publish(ctx context.Context, out Outbound) (*jetstream.PubAck, error) {
	_, ev, err := ParseSubject(out.Subject)
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	if out.Message == nil {
		return nil, fmt.Errorf("publish %s: nil message", out.Subject)
	}
	name := string(out.Message.ProtoReflect().Descriptor().FullName())
	if ev.msgType != "" && name != ev.msgType {
		return nil, fmt.Errorf("publish %s: %s does not belong on %s subjects (want %s)", out.Subject, name, ev.name, ev.msgType)
	}
	if err := checkOrg(out.Subject, out.Message); err != nil {
		return nil, fmt.Errorf("publish %s: %w", out.Subject, err)
	}
	data, err := proto.Marshal(out.Message)
	if err != nil {
		return nil, fmt.Errorf("publish %s: encode %s: %w", out.Subject, name, err)
	}
	h := nats.Header{}
	h.Set(HeaderType, name)
	h.Set(HeaderContentType, contentTypeProto)
	var links []trace.Link
	if out.Parent.IsValid() {
		if cur := trace.SpanContextFromContext(ctx); cur.IsValid() && cur.TraceID() != out.Parent.TraceID() {
			links = append(links, trace.Link{SpanContext: cur})
		}
		ctx = trace.ContextWithRemoteSpanContext(ctx, out.Parent)
	}
	return p.publish(ctx, out.Subject, ev.Template(), out.MsgID, data, h, links...)
}

// publish sends bytes with headers; h is modified.
func (p *Publisher) publish(ctx context.Context, subject, template, msgID string, data []byte, h nats.Header, links ...trace.Link) (*jetstream.PubAck, error) {
	if msgID == "" {
		return nil, fmt.Errorf("publish %s: %w", subject, ErrNoMsgID)
	}
	ctx, span := telemetry.StartPublish(ctx, p.tracer, telemetry.PublishSpan{Subject: subject, Template: template, MsgID: msgID, Size: len(data), Links: links})
	defer span.End()
	telemetry.Inject(ctx, p.prop, h)
	start := time.Now()
	// Asked again while the stream does not answer: the message id makes
	// the stream keep one copy of an attempt that was stored although its
	// acknowledgement was lost (the PubAck then says Duplicate).
	m := &nats.Msg{Subject: subject, Data: data, Header: h}
	var ack *jetstream.PubAck
	err := AskAgain(ctx, func() error {
		var err error
		ack, err = p.js.PublishMsg(ctx, m, jetstream.WithMsgID(msgID))
		return err
	})
	attrs := metric.WithAttributes(telemetry.SystemNATS, semconv.MessagingDestinationTemplate(template), semconv.MessagingOperationName("publish"), attribute.Bool("error", err != nil))
	p.duration.Record(ctx, time.Since(start).Seconds(), attrs)
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, "publish failed")
		span.SetAttributes(semconv.ErrorTypeKey.String(fmt.Sprintf("%T", err)))
		return nil, fmt.Errorf("publish %s: %w", subject, err)
	}
	p.sent.Add(ctx, 1, attrs)
	span.SetAttributes(telemetry.StreamKey.String(ack.Stream), telemetry.StreamSequenceKey.Int64(int64(ack.Sequence)), attribute.Bool("messaging.nats.duplicate", ack.Duplicate))
	return ack, nil
}
