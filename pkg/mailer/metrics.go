package mailer

import (
	"context"
	"errors"
	"fmt"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/easguard/easguard/pkg/notify"

	"github.com/easguard/easguard/pkg/telemetry"
)

// meterScope names the mailer's instruments.
const meterScope = "github.com/easguard/easguard/pkg/mailer"

// instruments are the mailer's domain metrics: the mails it sent and the
// sends that failed, by why (a user who is never told how to enrol calls
// the helpdesk; an administrator wants to hear of it first).
type instruments struct {
	org   attribute.KeyValue
	mails metric.Int64Counter
}

func newInstruments(mp metric.MeterProvider, org string) (*instruments, error) {
	mails, err := mp.Meter(meterScope).Int64Counter("easguard.mails", metric.WithUnit("{mail}"),
		metric.WithDescription("Notification mails by outcome: sent, or failed (error.type: permanent, auth, transient; a failed send is retried)."))
	if err != nil {
		return nil, fmt.Errorf("mailer metrics: %w", err)
	}
	return &instruments{org: telemetry.MetricOrgKey.String(org), mails: mails}, nil
}

// Instrument records the mailer's domain metrics on mp; without it they
// go nowhere. Call it before the mailer handles anything.
func (m *Mailer) Instrument(mp metric.MeterProvider) error {
	in, err := newInstruments(mp, string(m.org))
	if err != nil {
		return err
	}
	m.metrics = in
	return nil
}

// sent counts a send: err nil for a mail that went out.
func (in *instruments) sent(ctx context.Context, err error) {
	if err == nil {
		in.mails.Add(ctx, 1, metric.WithAttributes(in.org, attribute.String("easguard.outcome", "sent")))
		return
	}
	class := "transient"
	switch {
	case errors.Is(err, notify.ErrPermanent):
		class = "permanent"
	case errors.Is(err, notify.ErrAuth):
		class = "auth"
	}
	in.mails.Add(ctx, 1, metric.WithAttributes(in.org, attribute.String("easguard.outcome", "failed"), attribute.String("error.type", class)))
}
