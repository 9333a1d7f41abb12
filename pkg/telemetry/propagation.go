package telemetry

import (
	"context"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// HeaderCarrier adapts NATS headers to OpenTelemetry propagation. It keeps
// keys exactly as the propagator writes them (lower-case "traceparent"),
// unlike propagation.HeaderCarrier, which canonicalises to "Traceparent"
// that other NATS clients do not look for.
type HeaderCarrier nats.Header

var _ propagation.TextMapCarrier = HeaderCarrier{}

// Get returns the first value of a header.
func (c HeaderCarrier) Get(key string) string { return nats.Header(c).Get(key) }

// Set replaces a header.
func (c HeaderCarrier) Set(key, value string) { nats.Header(c).Set(key, value) }

// Keys lists the header names.
func (c HeaderCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}

// Inject writes the trace context of ctx into h, which must not be nil.
func Inject(ctx context.Context, p propagation.TextMapPropagator, h nats.Header) {
	p.Inject(ctx, HeaderCarrier(h))
}

// Extract returns ctx with the trace context found in h, if any.
func Extract(ctx context.Context, p propagation.TextMapPropagator, h nats.Header) context.Context {
	if h == nil {
		return ctx
	}
	return p.Extract(ctx, HeaderCarrier(h))
}

// Traceparent returns the W3C traceparent of ctx's span, or "", for
// storing a trace to join later.
func Traceparent(ctx context.Context) string {
	c := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(ctx, c)
	return c["traceparent"]
}

// ParseTraceparent turns a stored traceparent back into a span context
// (invalid when tp is empty or malformed).
func ParseTraceparent(tp string) trace.SpanContext {
	if tp == "" {
		return trace.SpanContext{}
	}
	return trace.SpanContextFromContext(propagation.TraceContext{}.Extract(context.Background(), propagation.MapCarrier{"traceparent": tp}))
}
