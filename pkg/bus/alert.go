package bus

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/types/known/timestamppb"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// AlertToken is an alert kind as the last token of its subject:
// ALERT_KIND_BLAST_RADIUS → blast-radius.
func AlertToken(kind ev.AlertKind) string {
	return strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(kind.String(), "ALERT_KIND_")), "_", "-")
}

// AlertOutbound builds an alert on easguard.<org>.alert.<kind>. Its id is
// its message id, so a raise repeated after a crash is stored once.
func AlertOutbound(org Org, kind ev.AlertKind, sev ev.AlertSeverity, id, summary string, detail map[string]string, at time.Time) (Outbound, error) {
	subject, err := AlertRaised.Subject(org, AlertToken(kind))
	if err != nil {
		return Outbound{}, err
	}
	return Outbound{Subject: subject, MsgID: "alert:" + id, Message: &ev.Alert{
		Org: string(org), AlertId: id, Kind: kind, Severity: sev, Summary: summary, Detail: detail, RaisedAt: timestamppb.New(at),
	}}, nil
}

// AlertedKeyPrefix starts, after "<org>.", the status bucket's keys of
// AlertDue's throttle: <org>.alerted.<what> holds when the condition what
// was last alerted, as RFC 3339 text. It is exported so that the status
// contract (pkg/status), which cannot be imported here, reads the same keys
// this package writes.
const AlertedKeyPrefix = "alerted."

// AlertDue reports whether a condition that goes on (syncs that keep
// failing, a mail server that keeps refusing) should be alerted again: not
// within every of the last alert about it, which the status bucket
// remembers under <org>.alerted.<what> for all replicas. It records the
// alert it allows, so of several processes at once one is told yes.
func AlertDue(ctx context.Context, status jetstream.KeyValue, org Org, what string, every time.Duration, now time.Time) (bool, error) {
	key := string(org) + "." + AlertedKeyPrefix + what
	stamp := []byte(now.UTC().Format(time.RFC3339Nano))
	e, err := status.Get(ctx, key)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		if _, err := status.Create(ctx, key, stamp); err != nil {
			if errors.Is(err, jetstream.ErrKeyExists) {
				return false, nil // another process alerts
			}
			return false, fmt.Errorf("alert %s: %w", what, err)
		}
		return true, nil
	case err != nil:
		return false, fmt.Errorf("alert %s: %w", what, err)
	}
	last, perr := time.Parse(time.RFC3339Nano, string(e.Value()))
	if perr == nil && now.Sub(last) < every {
		return false, nil
	}
	if _, err := status.Update(ctx, key, stamp, e.Revision()); err != nil {
		if IsConflict(err) {
			return false, nil
		}
		return false, fmt.Errorf("alert %s: %w", what, err)
	}
	return true, nil
}

// AlertResolved forgets the last alert about what, so that the next time
// the condition starts it is alerted at once.
func AlertResolved(ctx context.Context, status jetstream.KeyValue, org Org, what string) {
	_ = status.Delete(ctx, string(org)+"."+AlertedKeyPrefix+what)
}

// Alert is an alert to raise; AlertOutbound builds it on a subject.
type Alert struct {
	Kind     ev.AlertKind
	Severity ev.AlertSeverity
	// ID is the alert's id and, prefixed, its message id.
	ID, Summary string
	Detail      map[string]string
}

// RaiseDue raises a for a condition that goes on (syncs that keep failing,
// an account Exchange keeps refusing, a stage that keeps dead-lettering):
// at once when it starts, then at most once every every, across all
// processes of the organisation (AlertDue under what in status).
func RaiseDue(ctx context.Context, pub *Publisher, status jetstream.KeyValue, org Org, what string, every time.Duration, now time.Time, a Alert) error {
	due, err := AlertDue(ctx, status, org, what, every, now)
	if err != nil || !due {
		return err
	}
	out, err := AlertOutbound(org, a.Kind, a.Severity, a.ID, a.Summary, a.Detail, now)
	if err != nil {
		return err
	}
	if _, err := pub.Publish(ctx, out); err != nil {
		return fmt.Errorf("alert %s: %w", what, err)
	}
	return nil
}
