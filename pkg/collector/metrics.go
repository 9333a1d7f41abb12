package collector

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/easguard/easguard/pkg/telemetry"
)

// meterScope names the collector's instruments.
const meterScope = "github.com/easguard/easguard/pkg/collector"

// accessStates are Exchange's access states of a partnership
// (DeviceAccessState), each a series of easguard.partnerships even when no
// partnership is in it, so that a state that empties reads 0, not the
// count it had when last seen.
var accessStates = []string{"Allowed", "Blocked", "Quarantined", "DeviceDiscovery", "Unknown"}

// instruments are the collector's domain metrics: how long syncs take and
// when each kind last succeeded (an overdue sync is an alert), and the
// partnerships by their access state on Exchange as the last full sync
// found them.
type instruments struct {
	org          attribute.KeyValue
	duration     metric.Float64Histogram
	lastSuccess  metric.Float64Gauge
	partnerships metric.Int64Gauge
}

func newInstruments(mp metric.MeterProvider, org string) (*instruments, error) {
	m := mp.Meter(meterScope)
	duration, err := m.Float64Histogram("easguard.sync.duration", metric.WithUnit("s"),
		metric.WithDescription("Time a sync took, by kind (quick, full) and outcome (success, failure)."),
		metric.WithExplicitBucketBoundaries(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
	if err != nil {
		return nil, fmt.Errorf("collector metrics: %w", err)
	}
	last, err := m.Float64Gauge("easguard.sync.last_success", metric.WithUnit("s"),
		metric.WithDescription("When a sync of each kind last succeeded, in seconds since 1970 (UTC): alert when it is older than the kind's interval allows."))
	if err != nil {
		return nil, fmt.Errorf("collector metrics: %w", err)
	}
	parts, err := m.Int64Gauge("easguard.partnerships", metric.WithUnit("{partnership}"),
		metric.WithDescription("ActiveSync partnerships by their access state on Exchange (DeviceAccessState), as the last full sync read them."))
	if err != nil {
		return nil, fmt.Errorf("collector metrics: %w", err)
	}
	return &instruments{org: telemetry.MetricOrgKey.String(org), duration: duration, lastSuccess: last, partnerships: parts}, nil
}

// Instrument records the collector's domain metrics on mp; without it they
// go nowhere. Call it before the first sync.
func (c *Collector) Instrument(mp metric.MeterProvider) error {
	in, err := newInstruments(mp, string(c.org))
	if err != nil {
		return err
	}
	c.metrics = in
	return nil
}

// synced records a finished sync; states are the partnerships a full
// sync read by access state (nil for a quick sync or a failed one).
func (in *instruments) synced(ctx context.Context, kind string, ok bool, took time.Duration, finished time.Time, states *stateCounts) {
	outcome := "failure"
	if ok {
		outcome = "success"
	}
	k := attribute.String("easguard.sync.kind", kind)
	in.duration.Record(ctx, took.Seconds(), metric.WithAttributes(in.org, k, attribute.String("easguard.outcome", outcome)))
	if !ok {
		return
	}
	in.lastSuccess.Record(ctx, float64(finished.UnixNano())/1e9, metric.WithAttributes(in.org, k))
	if states == nil {
		return
	}
	for _, s := range accessStates {
		in.partnerships.Record(ctx, states.get(s), metric.WithAttributes(in.org, attribute.String("easguard.exchange_state", s)))
	}
}

// stateCounts counts the partnerships of a full sync by access state; the
// listing's pages may be handled at once.
type stateCounts struct {
	mu sync.Mutex
	n  map[string]int64
}

func (s *stateCounts) add(state string) {
	known := false
	for _, a := range accessStates {
		known = known || a == state
	}
	if !known {
		state = "Unknown"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.n == nil {
		s.n = map[string]int64{}
	}
	s.n[state]++
}

func (s *stateCounts) get(state string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n[state]
}
