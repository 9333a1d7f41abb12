package exchange_test

import (
	"context"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// The changes of a batch are traced in the trace of the decision that
// asked for each: the requests for a mailbox whose change has a cause are
// children of that cause (in its device's trace), and a request that
// carries several devices' changes is linked to the causes beyond its
// first, so every device's trace reaches the Set-CASMailbox that changed
// it. A change without a cause is traced as before, in the caller's trace.
func TestChangesAreTracedInTheirDevicesTraces(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	for _, a := range []string{"alice", "bob", "carol"} {
		if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: a}); err != nil {
			t.Fatal(err)
		}
	}
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	tr := tp.Tracer("test")
	cfg := simConfig(t, s)
	pool, err := exchange.NewPool(context.Background(), cfg, quiet(), exchange.WithTracing(tp))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close(context.Background()) })
	c := exchange.NewClient(pool, cfg)

	// Three device journeys and a batch context of their own.
	cause := map[string]trace.SpanContext{}
	for _, dev := range []string{"DevA1", "DevA2", "DevB1"} {
		_, sp := tr.Start(context.Background(), "decision "+dev)
		cause[dev] = sp.SpanContext()
		sp.End()
	}
	batch, batchSpan := tr.Start(context.Background(), "batch")
	defer batchSpan.End()
	res, err := c.ApplyAccess(batch, []exchange.Change{
		{Mailbox: "alice", DeviceID: "DevA1", Access: exchange.AccessAllow, Cause: cause["DevA1"]},
		{Mailbox: "alice", DeviceID: "DevA2", Access: exchange.AccessBlock, Cause: cause["DevA2"]},
		{Mailbox: "bob", DeviceID: "DevB1", Access: exchange.AccessAllow, Cause: cause["DevB1"]},
		{Mailbox: "carol", DeviceID: "DevC1", Access: exchange.AccessAllow},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if r.Err != nil {
			t.Fatalf("%s: %v", r.DeviceID, r.Err)
		}
	}

	type seen struct{ own, linked bool }
	writes := map[string]*seen{} // by cause trace: a Set-CASMailbox in it, or linked to it
	for dev := range cause {
		writes[cause[dev].TraceID().String()] = &seen{}
	}
	var uncaused int
	for _, sp := range rec.Ended() {
		if sp.Name() != "exchange Set-CASMailbox" {
			continue
		}
		if sp.SpanKind() != trace.SpanKindClient {
			t.Errorf("%s is a %s span, want client", sp.Name(), sp.SpanKind())
		}
		tid := sp.SpanContext().TraceID().String()
		if w, ok := writes[tid]; ok {
			w.own = true
			if sp.Parent().SpanID() != cause[devOf(cause, tid)].SpanID() {
				t.Errorf("Set-CASMailbox in %s's trace is not a child of its decision", devOf(cause, tid))
			}
		} else if tid == batchSpan.SpanContext().TraceID().String() {
			uncaused++
		}
		for _, l := range sp.Links() {
			if w, ok := writes[l.SpanContext.TraceID().String()]; ok {
				w.linked = true
			}
		}
	}
	// alice's one Set-CASMailbox carries DevA1 and DevA2: a child of
	// DevA1's decision, linked to DevA2's. bob's is DevB1's. carol's
	// change had no cause: it stays in the caller's trace.
	for dev, want := range map[string]seen{"DevA1": {own: true}, "DevA2": {linked: true}, "DevB1": {own: true}} {
		if got := *writes[cause[dev].TraceID().String()]; got != want {
			t.Errorf("%s's trace: Set-CASMailbox in it %v, linked %v; want %v, %v", dev, got.own, got.linked, want.own, want.linked)
		}
	}
	if uncaused != 1 {
		t.Errorf("%d Set-CASMailbox spans in the caller's trace, want carol's one", uncaused)
	}
}

// devOf is the device whose cause is in trace tid.
func devOf(cause map[string]trace.SpanContext, tid string) string {
	for dev, sc := range cause {
		if sc.TraceID().String() == tid {
			return dev
		}
	}
	return ""
}
