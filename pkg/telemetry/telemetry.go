// Package telemetry sets up OpenTelemetry tracing and metrics, carries W3C
// trace context through NATS headers and writes JSON logs that carry trace
// and span ids, so that one device can be followed through every worker in
// one trace and from any log line back to that trace.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
)

// Config says who is reporting and where to. Endpoint wins over the
// standard OTEL_EXPORTER_OTLP_* variables; with neither, nothing is exported
// (spans are still created, so trace ids still reach logs and headers).
type Config struct {
	ServiceName    string
	ServiceVersion string
	// InstanceID distinguishes replicas; empty uses hostname and pid.
	InstanceID string
	// Org is recorded on the resource when a worker set serves one org.
	Org string
	// Endpoint is the OTLP/HTTP base URL, e.g. http://collector:4318.
	Endpoint string
}

// Telemetry owns the providers of one process. Pass its providers to the
// components that need them rather than relying on globals, so tests can
// run side by side with their own recorders.
type Telemetry struct {
	TracerProvider *sdktrace.TracerProvider
	MeterProvider  *sdkmetric.MeterProvider
	Propagator     propagation.TextMapPropagator
	// Exporting reports whether spans and metrics leave the process.
	Exporting bool
	registry  *prometheus.Registry
}

// Propagator returns the W3C trace-context and baggage propagator easguard uses on every hop.
func Propagator() propagation.TextMapPropagator {
	return propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})
}

// otlpFromEnv reports whether the standard OpenTelemetry variables name an
// OTLP endpoint for the given signal.
func otlpFromEnv(signal string) bool {
	return os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_"+signal+"_ENDPOINT") != ""
}

// Setup builds the tracer and meter providers. Metrics are always served in
// Prometheus format through MetricsHandler, and also pushed over OTLP when
// an endpoint is configured.
func Setup(ctx context.Context, cfg Config) (*Telemetry, error) {
	if cfg.ServiceName == "" {
		return nil, errors.New("telemetry setup: service name is empty")
	}
	instance := cfg.InstanceID
	if instance == "" {
		host, _ := os.Hostname()
		instance = fmt.Sprintf("%s-%d", host, os.Getpid())
	}
	attrs := []attribute.KeyValue{
		semconv.ServiceName(cfg.ServiceName),
		semconv.ServiceInstanceID(instance),
	}
	if cfg.ServiceVersion != "" {
		attrs = append(attrs, semconv.ServiceVersion(cfg.ServiceVersion))
	}
	if cfg.Org != "" {
		attrs = append(attrs, OrgKey.String(cfg.Org))
	}
	// resource.Merge keeps OTEL_RESOURCE_ATTRIBUTES from the environment.
	res, err := resource.Merge(resource.Default(), resource.NewSchemaless(attrs...))
	if err != nil {
		return nil, fmt.Errorf("telemetry setup: resource: %w", err)
	}

	t := &Telemetry{Propagator: Propagator(), registry: prometheus.NewRegistry()}

	tpOpts := []sdktrace.TracerProviderOption{sdktrace.WithResource(res)}
	if cfg.Endpoint != "" || otlpFromEnv("TRACES") {
		var opts []otlptracehttp.Option
		if cfg.Endpoint != "" {
			u, err := signalURL(cfg.Endpoint, "/v1/traces")
			if err != nil {
				return nil, fmt.Errorf("telemetry setup: %w", err)
			}
			opts = append(opts, otlptracehttp.WithEndpointURL(u))
		}
		exp, err := otlptracehttp.New(ctx, opts...)
		if err != nil {
			return nil, fmt.Errorf("telemetry setup: trace exporter: %w", err)
		}
		tpOpts = append(tpOpts, sdktrace.WithBatcher(exp))
		t.Exporting = true
	}
	t.TracerProvider = sdktrace.NewTracerProvider(tpOpts...)

	t.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	promExp, err := otelprom.New(otelprom.WithRegisterer(t.registry))
	if err != nil {
		return nil, fmt.Errorf("telemetry setup: prometheus exporter: %w", err)
	}
	mpOpts := []sdkmetric.Option{sdkmetric.WithResource(res), sdkmetric.WithReader(promExp)}
	if cfg.Endpoint != "" || otlpFromEnv("METRICS") {
		var opts []otlpmetrichttp.Option
		if cfg.Endpoint != "" {
			u, err := signalURL(cfg.Endpoint, "/v1/metrics")
			if err != nil {
				return nil, fmt.Errorf("telemetry setup: %w", err)
			}
			opts = append(opts, otlpmetrichttp.WithEndpointURL(u))
		}
		exp, err := otlpmetrichttp.New(ctx, opts...)
		if err != nil {
			return nil, fmt.Errorf("telemetry setup: metric exporter: %w", err)
		}
		mpOpts = append(mpOpts, sdkmetric.WithReader(sdkmetric.NewPeriodicReader(exp)))
	}
	t.MeterProvider = sdkmetric.NewMeterProvider(mpOpts...)
	return t, nil
}

// signalURL joins an OTLP base URL with a signal path, as the standard
// OTEL_EXPORTER_OTLP_ENDPOINT does.
func signalURL(base, path string) (string, error) {
	u, err := url.Parse(base)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return "", fmt.Errorf("OTLP endpoint %q is not an absolute http(s) URL", base)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("OTLP endpoint %q: scheme must be http or https", base)
	}
	u.Path = strings.TrimSuffix(u.Path, "/") + path
	return u.String(), nil
}

// MetricsHandler serves every metric of the process in Prometheus text format.
func (t *Telemetry) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(t.registry, promhttp.HandlerOpts{Registry: t.registry})
}

// Shutdown flushes and stops both providers.
func (t *Telemetry) Shutdown(ctx context.Context) error {
	return errors.Join(t.TracerProvider.Shutdown(ctx), t.MeterProvider.Shutdown(ctx))
}
