package telemetry_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/easguard/easguard/pkg/telemetry"
)

func TestHeaderCarrierKeepsLowerCaseTraceparent(t *testing.T) {
	tp := sdktrace.NewTracerProvider()
	ctx, span := tp.Tracer("t").Start(context.Background(), "x")
	defer span.End()
	h := nats.Header{}
	telemetry.Inject(ctx, telemetry.Propagator(), h)
	if _, ok := h["traceparent"]; !ok {
		t.Fatalf("headers %v lack lower-case traceparent", h)
	}
	got := trace.SpanContextFromContext(telemetry.Extract(context.Background(), telemetry.Propagator(), h))
	if got.TraceID() != span.SpanContext().TraceID() || got.SpanID() != span.SpanContext().SpanID() || !got.IsRemote() {
		t.Fatalf("extracted %v, want %v", got, span.SpanContext())
	}
	if sc := trace.SpanContextFromContext(telemetry.Extract(context.Background(), telemetry.Propagator(), nil)); sc.IsValid() {
		t.Fatal("nil headers produced a span context")
	}
}

func TestLogsCarryTraceIDs(t *testing.T) {
	var buf bytes.Buffer
	log := telemetry.NewLogger(&buf, slog.LevelDebug, "matcher")
	tp := sdktrace.NewTracerProvider()
	ctx, span := tp.Tracer("t").Start(context.Background(), "x")
	log.With("org", "contoso").InfoContext(ctx, "matched", "device", "dev1")
	span.End()
	var rec map[string]any
	if err := json.Unmarshal(buf.Bytes(), &rec); err != nil {
		t.Fatalf("not JSON: %q", buf.String())
	}
	if rec["trace_id"] != span.SpanContext().TraceID().String() || rec["span_id"] != span.SpanContext().SpanID().String() {
		t.Fatalf("record %v lacks the span's ids", rec)
	}
	if rec["service"] != "matcher" || rec["org"] != "contoso" {
		t.Fatalf("record %v", rec)
	}
}

// otlpSink is a stand-in OTLP/HTTP receiver that records request paths.
type otlpSink struct {
	mu    sync.Mutex
	paths []string
}

func (s *otlpSink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	if len(body) > 0 {
		s.mu.Lock()
		s.paths = append(s.paths, r.URL.Path)
		s.mu.Unlock()
	}
	w.Header().Set("Content-Type", "application/x-protobuf")
	w.WriteHeader(http.StatusOK)
}

func (s *otlpSink) got(path string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.paths {
		if p == path {
			return true
		}
	}
	return false
}

func TestExportsOverOTLPWhenConfigured(t *testing.T) {
	tests := []struct {
		name string
		env  func(url string) (telemetry.Config, map[string]string)
	}{
		{"EASGUARD_OTEL_ENDPOINT", func(u string) (telemetry.Config, map[string]string) {
			return telemetry.Config{ServiceName: "matcher", Endpoint: u}, nil
		}},
		{"OTEL_EXPORTER_OTLP_ENDPOINT", func(u string) (telemetry.Config, map[string]string) {
			return telemetry.Config{ServiceName: "matcher"}, map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": u}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sink := &otlpSink{}
			srv := httptest.NewServer(sink)
			t.Cleanup(srv.Close)
			cfg, env := tt.env(srv.URL)
			for k, v := range env {
				t.Setenv(k, v)
			}
			tel, err := telemetry.Setup(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if !tel.Exporting {
				t.Fatal("not exporting")
			}
			_, span := tel.TracerProvider.Tracer("t").Start(context.Background(), "x")
			span.End()
			c, _ := tel.MeterProvider.Meter("t").Int64Counter("easguard.test")
			c.Add(context.Background(), 1)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := tel.Shutdown(ctx); err != nil {
				t.Fatal(err)
			}
			if !sink.got("/v1/traces") || !sink.got("/v1/metrics") {
				t.Fatalf("receiver got %v, want traces and metrics", sink.paths)
			}
		})
	}
}

func TestNoEndpointNoExport(t *testing.T) {
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
	tel, err := telemetry.Setup(context.Background(), telemetry.Config{ServiceName: "matcher"})
	if err != nil {
		t.Fatal(err)
	}
	defer tel.Shutdown(context.Background())
	if tel.Exporting {
		t.Fatal("exporting without an endpoint")
	}
	if _, err := telemetry.Setup(context.Background(), telemetry.Config{ServiceName: "x", Endpoint: "collector:4318"}); err == nil {
		t.Fatal("accepted an endpoint without a scheme")
	}
}

func TestMetricsInPrometheusFormat(t *testing.T) {
	tel, err := telemetry.Setup(context.Background(), telemetry.Config{ServiceName: "matcher", Org: "contoso"})
	if err != nil {
		t.Fatal(err)
	}
	defer tel.Shutdown(context.Background())
	c, _ := tel.MeterProvider.Meter("t").Int64Counter("easguard.decisions")
	c.Add(context.Background(), 3)
	rec := httptest.NewRecorder()
	tel.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body := rec.Body.String()
	for _, want := range []string{"easguard_decisions_total", "go_goroutines", `service_name="matcher"`} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}
