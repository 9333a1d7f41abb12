package telemetry

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
)

// Attribute keys easguard adds to the messaging semantic conventions.
// messaging.system has no registered value for NATS yet
// (semantic-conventions #2266), so "nats" is used, as nats.net does.
const (
	OrgKey            = attribute.Key("exchange.org")
	StreamKey         = attribute.Key("messaging.nats.stream")
	StreamSequenceKey = attribute.Key("messaging.nats.stream_sequence")
	DeliveryCountKey  = attribute.Key("messaging.nats.delivery_count")
)

// SystemNATS is the messaging.system attribute of every easguard span.
var SystemNATS = semconv.MessagingSystemKey.String("nats")

// MetricOrgKey labels every domain metric with its Exchange organisation
// (easguard_org in Prometheus), so one dashboard and one set of alert
// rules serve every organisation on a cluster.
const MetricOrgKey = attribute.Key("easguard.org")

// PublishSpan describes a message about to be published.
type PublishSpan struct {
	Subject  string
	Template string
	MsgID    string
	Size     int
	// Links are contexts the message also follows from.
	Links []trace.Link
}

// StartPublish starts a producer span named "send <template>". Its context
// is the one to inject into the message headers.
func StartPublish(ctx context.Context, tr trace.Tracer, p PublishSpan) (context.Context, trace.Span) {
	return tr.Start(ctx, "send "+p.Template,
		trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithLinks(p.Links...),
		trace.WithAttributes(
			SystemNATS,
			semconv.MessagingOperationTypeSend,
			semconv.MessagingOperationName("publish"),
			semconv.MessagingDestinationName(p.Subject),
			semconv.MessagingDestinationTemplate(p.Template),
			semconv.MessagingMessageID(p.MsgID),
			semconv.MessagingMessageBodySize(p.Size),
		))
}

// ProcessSpan describes a delivered message about to be handled.
type ProcessSpan struct {
	Subject   string
	Template  string
	Consumer  string
	MsgID     string
	Stream    string
	StreamSeq uint64
	Delivered uint64
	Size      int
}

// StartProcess starts a consumer span named "process <template>". The
// messaging conventions ask for a link to the producer's context; with one
// message per run it is also made the parent, so a device's whole journey
// reads as one trace. ctx must carry the extracted producer context.
func StartProcess(ctx context.Context, tr trace.Tracer, p ProcessSpan) (context.Context, trace.Span) {
	opts := []trace.SpanStartOption{
		trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(
			SystemNATS,
			semconv.MessagingOperationTypeProcess,
			semconv.MessagingOperationName("process"),
			semconv.MessagingDestinationName(p.Subject),
			semconv.MessagingDestinationTemplate(p.Template),
			semconv.MessagingConsumerGroupName(p.Consumer),
			semconv.MessagingMessageID(p.MsgID),
			semconv.MessagingMessageBodySize(p.Size),
			StreamKey.String(p.Stream),
			StreamSequenceKey.Int64(int64(p.StreamSeq)),
			DeliveryCountKey.Int64(int64(p.Delivered)),
		),
	}
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		opts = append(opts, trace.WithLinks(trace.Link{SpanContext: sc}))
	}
	return tr.Start(ctx, "process "+p.Template, opts...)
}
