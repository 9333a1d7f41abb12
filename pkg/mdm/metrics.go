package mdm

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
)

// meterScope names the MDM sources' instruments.
const meterScope = "github.com/easguard/easguard/pkg/mdm"

// graphInstruments count the Graph source's requests by outcome: Graph
// throttles per tenant, and a tenant whose budget other apps spend shows
// it here before compliance changes start arriving late.
type graphInstruments struct {
	tenant   attribute.KeyValue
	requests metric.Int64Counter
}

func newGraphInstruments(mp metric.MeterProvider, tenant string) (*graphInstruments, error) {
	if mp == nil {
		mp = noop.NewMeterProvider()
	}
	requests, err := mp.Meter(meterScope).Int64Counter("easguard.graph.requests", metric.WithUnit("{request}"),
		metric.WithDescription("Microsoft Graph requests by outcome: ok, throttled (429 or 503, retried after Retry-After), refused (another 4xx), failed (5xx, network, malformed)."))
	if err != nil {
		return nil, fmt.Errorf("graph metrics: %w", err)
	}
	return &graphInstruments{tenant: attribute.String("easguard.graph.tenant", tenant), requests: requests}, nil
}

// record counts one request that ended with err (nil: a page read).
func (in *graphInstruments) record(ctx context.Context, err error) {
	outcome := "ok"
	var se *statusError
	switch {
	case err == nil:
	case errors.As(err, &se) && (se.status == http.StatusTooManyRequests || se.status == http.StatusServiceUnavailable):
		outcome = "throttled"
	case errors.As(err, &se) && se.status < 500:
		outcome = "refused"
	default:
		outcome = "failed"
	}
	in.requests.Add(ctx, 1, metric.WithAttributes(in.tenant, attribute.String("easguard.outcome", outcome)))
}
