package exchange

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"

	"github.com/easguard/easguard/pkg/telemetry"
)

// meterScope names the Exchange client's instruments.
const meterScope = "github.com/easguard/easguard/pkg/exchange"

// instruments are the pool's domain metrics: how long Exchange takes per
// request, and the cmdlets that failed by class, so that an alert can tell
// "the service account lost its role" (permission) from "the CAS is
// down" (unreachable) from "Exchange is throttling us" (throttled).
type instruments struct {
	org      attribute.KeyValue
	duration metric.Float64Histogram
	errors   metric.Int64Counter
}

func newInstruments(mp metric.MeterProvider, org string) (*instruments, error) {
	m := mp.Meter(meterScope)
	duration, err := m.Float64Histogram("easguard.exchange.request.duration", metric.WithUnit("s"),
		metric.WithDescription("Time Exchange took to answer a request on a session (one cmdlet, or a batch of them), by its first cmdlet; a listing until its last page."),
		metric.WithExplicitBucketBoundaries(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
	if err != nil {
		return nil, fmt.Errorf("exchange metrics: %w", err)
	}
	errs, err := m.Int64Counter("easguard.exchange.errors", metric.WithUnit("{error}"),
		metric.WithDescription("Cmdlets that failed, or requests that did not reach Exchange, by cmdlet and class (unreachable, throttled, auth, permission, tls, not_found, invalid, session_broken, transient, other)."))
	if err != nil {
		return nil, fmt.Errorf("exchange metrics: %w", err)
	}
	return &instruments{org: telemetry.MetricOrgKey.String(org), duration: duration, errors: errs}, nil
}

// WithMetrics records the pool's domain metrics on mp, labelled with the
// organisation; without it they go nowhere.
func WithMetrics(mp metric.MeterProvider, org string) PoolOption {
	return func(p *Pool) {
		in, err := newInstruments(mp, org)
		if err != nil {
			p.log.Warn("Exchange metrics unavailable", "error", err)
			return
		}
		p.metrics = in
	}
}

func noInstruments() *instruments {
	in, _ := newInstruments(noop.NewMeterProvider(), "")
	return in
}

// requestCmdlet names a request in metrics: its cmdlet, a batch's first,
// or the worker operation (ping, connect).
func requestCmdlet(req Request) string {
	switch {
	case req.Call != nil:
		return req.Call.Cmdlet
	case len(req.Calls) > 0:
		return req.Calls[0].Cmdlet
	}
	return req.Op
}

// record counts one request: its time on a session, the transport error
// that ended it, or the errors Exchange reported for its cmdlets.
func (in *instruments) record(ctx context.Context, req Request, took time.Duration, r Response, err error) {
	cmdlet := attribute.String("easguard.exchange.cmdlet", requestCmdlet(req))
	in.duration.Record(ctx, took.Seconds(), metric.WithAttributes(in.org, cmdlet))
	fail := func(name string, e error) {
		in.errors.Add(ctx, 1, metric.WithAttributes(in.org, attribute.String("easguard.exchange.cmdlet", name), attribute.String("error.type", errorClass(e))))
	}
	switch {
	case err != nil:
		fail(requestCmdlet(req), err)
	case len(req.Calls) > 0:
		for i, res := range r.Results {
			if len(res.Errors) > 0 && i < len(req.Calls) {
				fail(req.Calls[i].Cmdlet, ResultError(req.Calls[i].Cmdlet, res.Errors))
			}
		}
	case req.Call != nil && len(r.Errors) > 0:
		fail(req.Call.Cmdlet, ResultError(req.Call.Cmdlet, r.Errors))
	}
}

// errorClass is an error's class for metrics and alerts.
func errorClass(err error) string {
	for _, c := range []struct {
		err  error
		name string
	}{
		{ErrSessionBroken, "session_broken"}, {ErrUnreachable, "unreachable"}, {ErrThrottled, "throttled"},
		{ErrAuth, "auth"}, {ErrPermission, "permission"}, {ErrTLS, "tls"}, {ErrNotFound, "not_found"},
		{ErrInvalid, "invalid"}, {ErrIncomplete, "incomplete"}, {ErrTransient, "transient"}, {ErrWorkerDead, "transient"},
	} {
		if errors.Is(err, c.err) {
			return c.name
		}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return "transient"
	}
	return "other"
}
