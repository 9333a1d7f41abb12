package evaluator_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// ApproveGuard approves only the set the guard, as the status records it,
// holds; it records the approval where the evaluator reads it, audits
// every attempt, and tells a broken guard record from a set not held.
func TestApproveGuard(t *testing.T) {
	t.Parallel()
	ctx, kv, pub, audits := guardBench(t)
	now := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
	for i, tc := range []struct {
		name  string
		guard func(t *testing.T) // what the status holds before
		key   string
		want  error // nil: approved
	}{
		{"no guard recorded", func(t *testing.T) {}, "k1", evaluator.ErrNothingHeld},
		{"guard ok", putGuard(kv, status.Guard{State: status.GuardOK}), "k1", evaluator.ErrNothingHeld},
		{"another set held", putGuard(kv, status.Guard{State: status.GuardTripped, Key: "k2"}), "k1", evaluator.ErrNothingHeld},
		{"corrupt guard", func(t *testing.T) {
			if _, err := kv.Put(ctx, string(org)+"."+status.GuardKey, []byte("{")); err != nil {
				t.Fatal(err)
			}
		}, "k1", status.ErrCorrupt},
		{"the set held", putGuard(kv, status.Guard{State: status.GuardTripped, Key: "k1"}), "k1", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := status.Delete(ctx, kv, org, status.GuardKey); err != nil {
				t.Fatal(err)
			}
			tc.guard(t)
			// Each attempt at its own time: the audit's message id is made
			// from it, and the stream drops a repeat as a duplicate.
			at := now.Add(time.Duration(i) * time.Minute)
			err := evaluator.ApproveGuard(ctx, kv, pub, org, tc.key, "alice@contoso.com", "192.0.2.7", "stolen", at)
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("approve: %v, want %v", err, tc.want)
			}
			a, ok, gerr := status.Get[status.GuardApproval](ctx, kv, org, status.GuardApprovalKey)
			if gerr != nil || ok != (tc.want == nil) {
				t.Fatalf("approval recorded %v (%+v, %v), want %v", ok, a, gerr, tc.want == nil)
			}
			if ok && (a.Key != tc.key || a.By != "alice@contoso.com" || a.Reason != "stolen" || !a.At.Equal(at)) {
				t.Fatalf("approval %+v", a)
			}
			got := audits.AwaitLen(t, 10*time.Second, i+1)[i]
			if refused := strings.HasPrefix(got.GetOutcome(), "refused"); refused != (tc.want != nil) || got.GetTarget() != tc.key {
				t.Fatalf("audit %v", got)
			}
		})
	}
}

// putGuard records g as the guard's status.
func putGuard(kv jetstream.KeyValue, g status.Guard) func(t *testing.T) {
	return func(t *testing.T) {
		t.Helper()
		if err := status.Put(natstest.Context(t), kv, org, status.GuardKey, g); err != nil {
			t.Fatal(err)
		}
	}
}

// DiscardGuard turns only the held set into a discarded one, withdraws
// its approval, audits every attempt; the evaluator then holds the same
// set quietly (see TestDiscardedSetIsHeldWithoutAlert in tests/).
func TestDiscardGuard(t *testing.T) {
	t.Parallel()
	ctx, kv, pub, audits := guardBench(t)
	now := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
	for i, tc := range []struct {
		name  string
		guard func(t *testing.T)
		key   string
		want  error
	}{
		{"no guard recorded", func(t *testing.T) {}, "k1", evaluator.ErrNothingHeld},
		{"another set held", putGuard(kv, status.Guard{State: status.GuardTripped, Key: "k2"}), "k1", evaluator.ErrNothingHeld},
		{"already discarded", putGuard(kv, status.Guard{State: status.GuardDiscarded, Key: "k1"}), "k1", evaluator.ErrNothingHeld},
		{"corrupt guard", func(t *testing.T) {
			if _, err := kv.Put(ctx, string(org)+"."+status.GuardKey, []byte("{")); err != nil {
				t.Fatal(err)
			}
		}, "k1", status.ErrCorrupt},
		{"the set held", putGuard(kv, status.Guard{State: status.GuardTripped, Key: "k1", Detail: "3 of 4"}), "k1", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := status.Delete(ctx, kv, org, status.GuardKey); err != nil {
				t.Fatal(err)
			}
			if err := status.Put(ctx, kv, org, status.GuardApprovalKey, status.GuardApproval{Key: tc.key}); err != nil {
				t.Fatal(err)
			}
			tc.guard(t)
			at := now.Add(time.Duration(i) * time.Minute)
			err := evaluator.DiscardGuard(ctx, kv, pub, org, tc.key, "bob@contoso.com", "192.0.2.8", "false alarm", at)
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("discard: %v, want %v", err, tc.want)
			}
			g, _, _ := status.Get[status.Guard](ctx, kv, org, status.GuardKey)
			_, approved, _ := status.Get[status.GuardApproval](ctx, kv, org, status.GuardApprovalKey)
			if tc.want == nil && (g.State != status.GuardDiscarded || !strings.Contains(g.Detail, "bob@contoso.com") || !strings.Contains(g.Detail, "3 of 4") || approved) {
				t.Fatalf("after the discard: guard %+v, approval left %v", g, approved)
			}
			got := audits.AwaitLen(t, 10*time.Second, i+1)[i]
			if refused := strings.HasPrefix(got.GetOutcome(), "refused"); refused != (tc.want != nil) || got.GetAction() != "guard-discard" {
				t.Fatalf("audit %v", got)
			}
		})
	}
}

// guardBench is a real JetStream server with easguard's streams and
// buckets: the status bucket, a publisher, and the audit events published.
func guardBench(t *testing.T) (context.Context, jetstream.KeyValue, *bus.Publisher, *natstest.Received[*ev.AuditEvent]) {
	t.Helper()
	_, _, js := natstest.Start(t)
	ctx := natstest.Context(t)
	if err := bus.Provision(ctx, js, bus.DefaultTopology()); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, bus.BucketStatus)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := bus.NewPublisher(js, bus.Instrumentation{})
	if err != nil {
		t.Fatal(err)
	}
	return ctx, kv, pub, natstest.Receive[ev.AuditEvent](t, js, bus.StreamAudit, bus.AuditRecorded.Filter(org))
}
