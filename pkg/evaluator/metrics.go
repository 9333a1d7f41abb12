package evaluator

import (
	"context"
	"fmt"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	ev "github.com/easguard/easguard/proto/easguard/v1"

	"github.com/easguard/easguard/pkg/telemetry"
)

// meterScope names the evaluator's instruments.
const meterScope = "github.com/easguard/easguard/pkg/evaluator"

// instruments are the evaluator's domain metrics: what it decided and
// what the guard held back, the figures an administrator alerts on (a
// sudden run of blocks, a guard that trips), which the generic messaging
// counters cannot tell apart.
type instruments struct {
	org       attribute.KeyValue
	decisions metric.Int64Counter
	held      metric.Int64Counter
}

func newInstruments(mp metric.MeterProvider, org string) (*instruments, error) {
	m := mp.Meter(meterScope)
	decisions, err := m.Int64Counter("easguard.decisions", metric.WithUnit("{decision}"),
		metric.WithDescription("Decisions made, by the access decided (allow, block, quarantine, unlist), the policy rule and whether it was a dry run."))
	if err != nil {
		return nil, fmt.Errorf("evaluator metrics: %w", err)
	}
	held, err := m.Int64Counter("easguard.guard.held", metric.WithUnit("{decision}"),
		metric.WithDescription("Revocations the blast-radius guard refused to apply."))
	if err != nil {
		return nil, fmt.Errorf("evaluator metrics: %w", err)
	}
	return &instruments{org: telemetry.MetricOrgKey.String(org), decisions: decisions, held: held}, nil
}

// Instrument records the evaluator's domain metrics on mp; without it they
// go nowhere. Call it before the evaluator handles anything.
func (e *Evaluator) Instrument(mp metric.MeterProvider) error {
	in, err := newInstruments(mp, string(e.org))
	if err != nil {
		return err
	}
	e.metrics = in
	return nil
}

// decided counts a decision made.
func (e *Evaluator) decided(ctx context.Context, d *ev.AccessDecided) {
	in := e.metrics
	in.decisions.Add(ctx, 1, metric.WithAttributes(in.org,
		attribute.String("easguard.action", strings.ToLower(shortDesired(d.GetDesired()))),
		attribute.String("easguard.rule", d.GetRule()),
		attribute.Bool("easguard.dry_run", d.GetDryRun())))
}

// guardHeld counts revocations the guard refused.
func (e *Evaluator) guardHeld(ctx context.Context, n int) {
	in := e.metrics
	in.held.Add(ctx, int64(n), metric.WithAttributes(in.org))
}
