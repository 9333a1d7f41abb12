// Package telemetrytest reads what code under test records on its meters,
// through the OpenTelemetry SDK's manual reader: a test checks a metric
// as a scrape would see it, not a counter reached into. Benchmarks read
// the process's own CPU time here too (ProcessCPU).
package telemetrytest

import (
	"context"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// Metrics is a meter provider whose readings a test can take.
type Metrics struct {
	// Provider is what the code under test records on.
	Provider *sdkmetric.MeterProvider
	reader   *sdkmetric.ManualReader
}

// NewMetrics starts a meter provider that is shut down with the test.
func NewMetrics(tb testing.TB) *Metrics {
	tb.Helper()
	r := sdkmetric.NewManualReader()
	m := &Metrics{Provider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(r)), reader: r}
	tb.Cleanup(func() { _ = m.Provider.Shutdown(context.Background()) })
	return m
}

// Value sums the named instrument's data points whose attributes include
// every one of want: a counter's or gauge's value, a histogram's count.
// An instrument that recorded nothing reads 0.
func (m *Metrics) Value(tb testing.TB, name string, want map[string]string) float64 {
	tb.Helper()
	var rm metricdata.ResourceMetrics
	if err := m.reader.Collect(context.Background(), &rm); err != nil {
		tb.Fatalf("collect metrics: %v", err)
	}
	match := func(set attribute.Set) bool {
		for k, v := range want {
			got, ok := set.Value(attribute.Key(k))
			if !ok || got.Emit() != v {
				return false
			}
		}
		return true
	}
	sum := 0.0
	for _, sm := range rm.ScopeMetrics {
		for _, md := range sm.Metrics {
			if md.Name != name {
				continue
			}
			switch d := md.Data.(type) {
			case metricdata.Sum[int64]:
				sum += points(d.DataPoints, match)
			case metricdata.Sum[float64]:
				sum += points(d.DataPoints, match)
			case metricdata.Gauge[int64]:
				sum += points(d.DataPoints, match)
			case metricdata.Gauge[float64]:
				sum += points(d.DataPoints, match)
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					if match(p.Attributes) {
						sum += float64(p.Count)
					}
				}
			}
		}
	}
	return sum
}

// points sums the values of the data points match accepts.
func points[N int64 | float64](dps []metricdata.DataPoint[N], match func(attribute.Set) bool) float64 {
	sum := 0.0
	for _, p := range dps {
		if match(p.Attributes) {
			sum += float64(p.Value)
		}
	}
	return sum
}
