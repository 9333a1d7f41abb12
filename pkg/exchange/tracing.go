package exchange

import (
	"context"
	"slices"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// WithTracing has every request the pool sends to Exchange traced as a
// client span (the cmdlet, the Client Access server that ran it), in the
// trace of the device journey that caused it: a trace then shows which
// server took how long for which device, not only the bus hops.
func WithTracing(tp trace.TracerProvider) PoolOption {
	return func(p *Pool) { p.tracer = tp.Tracer("github.com/easguard/easguard/pkg/exchange") }
}

var noTracer = noop.NewTracerProvider().Tracer("")

// startSpan starts the client span of one attempt of req on server. A
// request whose calls carry causes (Change.Cause) is a child of the first
// cause, linked to the others and to ctx's own span, so that a batch of
// several devices' changes shows in each device's trace: as the request
// itself in the first one's, as a link in the others'.
func (p *Pool) startSpan(ctx context.Context, req Request, server string) (context.Context, trace.Span) {
	cmdlet := requestCmdlet(req)
	var opts []trace.SpanStartOption
	if p.tracer == noTracer {
		// Untraced: no causes to gather for every request.
		return p.tracer.Start(ctx, "exchange "+cmdlet)
	}
	if causes := requestCauses(req); len(causes) > 0 {
		links := make([]trace.Link, 0, len(causes))
		for _, c := range causes[1:] {
			links = append(links, trace.Link{SpanContext: c})
		}
		if cur := trace.SpanContextFromContext(ctx); cur.IsValid() && !cur.Equal(causes[0]) {
			links = append(links, trace.Link{SpanContext: cur})
		}
		ctx = trace.ContextWithSpanContext(ctx, causes[0])
		opts = append(opts, trace.WithLinks(links...))
	}
	return p.tracer.Start(ctx, "exchange "+cmdlet, append(opts, trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(
		attribute.String("easguard.exchange.cmdlet", cmdlet), attribute.String("easguard.exchange.op", req.Op),
		attribute.Int("easguard.exchange.calls", max(len(req.Calls), 1)), attribute.String("server.address", server),
		attribute.String("rpc.system", "winrm")))...)
}

// requestCauses is the distinct valid causes of req's calls, in order.
func requestCauses(req Request) []trace.SpanContext {
	var out []trace.SpanContext
	add := func(c Call) {
		for _, sc := range c.causes {
			if sc.IsValid() && !slices.ContainsFunc(out, sc.Equal) {
				out = append(out, sc)
			}
		}
	}
	if req.Call != nil {
		add(*req.Call)
	}
	for _, c := range req.Calls {
		add(c)
	}
	return out
}

// endSpan ends an attempt's span with how it went: the request's failure,
// or the cmdlets Exchange refused.
func endSpan(span trace.Span, req Request, r Response, err error) {
	var refused []string
	switch {
	case err != nil:
	case len(req.Calls) > 0:
		for i, res := range r.Results {
			if len(res.Errors) > 0 && i < len(req.Calls) {
				refused = append(refused, req.Calls[i].Cmdlet)
			}
		}
	case req.Call != nil && len(r.Errors) > 0:
		refused = append(refused, req.Call.Cmdlet)
	}
	if err == nil && len(refused) > 0 {
		err = ResultError(strings.Join(refused, ", "), firstErrors(req, r))
	}
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

func firstErrors(req Request, r Response) []Error {
	if req.Call != nil {
		return r.Errors
	}
	for _, res := range r.Results {
		if len(res.Errors) > 0 {
			return res.Errors
		}
	}
	return nil
}
