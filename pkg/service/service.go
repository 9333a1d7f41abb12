// Package service is the life cycle every easguard binary shares: logs,
// telemetry, the NATS connection (embedded or remote), the topology, the
// health endpoint, the runners, and an orderly shutdown. Workers supply
// routes; this package supplies everything around them, once.
package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/KimMachineGun/automemlimit/memlimit"
	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/health"
	"github.com/easguard/easguard/pkg/natsembed"
	"github.com/easguard/easguard/pkg/telemetry"
)

// Options configure Start.
type Options struct {
	// Name is the service name in logs, traces and NATS connection names.
	Name    string
	Version string
	Common  config.Common
	// Embedded, when set and Common.NatsURL is empty, starts an in-process
	// NATS server with these options instead of dialling one.
	Embedded *natsembed.Options
	// LogOutput receives the JSON logs; nil means stderr.
	LogOutput io.Writer
	// SpanProcessor, when set, also receives every span (tests record
	// them to check that a device's journey is one trace).
	SpanProcessor sdktrace.SpanProcessor
}

// Service is a started process: connected, provisioned, serving health.
type Service struct {
	Log      *slog.Logger
	Tel      *telemetry.Telemetry
	NC       *nats.Conn
	JS       jetstream.JetStream
	Health   *health.Server
	Embedded *natsembed.Server
	// HTTPAddr is the bound address of the health endpoint.
	HTTPAddr string

	opts     Options
	topology bus.Topology
	serve    func(ctx context.Context) error
	pub      *bus.Publisher

	mu    sync.Mutex
	tasks []task
	// failure is the first task failure: /readyz reports it while the
	// process stops, and Run returns it.
	failure error
}

type task struct {
	name string
	run  func(ctx context.Context) error
}

// Start brings a process up to the point where it can run workers. On error
// everything already started is stopped again.
func Start(ctx context.Context, o Options) (_ *Service, err error) {
	level, err := telemetry.ParseLevel(o.Common.LogLevel)
	if err != nil {
		return nil, err
	}
	out := o.LogOutput
	if out == nil {
		out = os.Stderr
	}
	s := &Service{opts: o, topology: o.Common.Topology()}
	s.Log = telemetry.NewLogger(out, level, o.Name).With("org", o.Common.Org)
	setMemoryLimit(o.Common.MemoryLimitRatio, s.Log)
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()

	s.Tel, err = telemetry.Setup(ctx, telemetry.Config{
		ServiceName: o.Name, ServiceVersion: o.Version, InstanceID: o.Common.InstanceID,
		Org: o.Common.Org, Endpoint: o.Common.OtelEndpoint,
	})
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { _ = s.Tel.Shutdown(context.Background()) })
	if o.SpanProcessor != nil {
		s.Tel.TracerProvider.RegisterSpanProcessor(o.SpanProcessor)
	}

	if o.Common.NatsURL == "" && o.Embedded != nil {
		eo := *o.Embedded
		if err := os.MkdirAll(eo.StoreDir, 0o750); err != nil {
			return nil, fmt.Errorf("embedded nats store %s: %w", eo.StoreDir, err)
		}
		if abs, err := filepath.Abs(eo.StoreDir); err == nil {
			eo.StoreDir = abs
		}
		s.Embedded, err = natsembed.Start(eo)
		if err != nil {
			return nil, err
		}
		undo = append(undo, s.Embedded.Shutdown)
		s.NC, err = s.Embedded.Connect(o.Name, bus.SyncQueueLen())
		if err != nil {
			return nil, err
		}
		s.Log.Info("embedded nats started", "store", eo.StoreDir, "client_url", s.Embedded.ClientURL(), "monitor_url", s.Embedded.MonitorURL())
	} else {
		if o.Common.NatsURL == "" {
			return nil, errors.New("EASGUARD_NATS_URL is empty and this binary has no embedded server")
		}
		s.NC, err = bus.Connect(bus.ConnectOptions{
			URL: o.Common.NatsURL, Name: o.Name + "/" + o.Common.Org, User: o.Common.NatsUser,
			Password: o.Common.NatsPassword.Reveal(), Token: o.Common.NatsToken.Reveal(),
			CredsFile: o.Common.NatsCredsFile, Logger: s.Log,
		})
		if err != nil {
			return nil, err
		}
		s.Log.Info("connected to nats", "server", s.NC.ConnectedUrlRedacted())
	}
	undo = append(undo, s.NC.Close)
	s.JS, err = jetstream.New(s.NC)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	// A cluster that is still forming (every container started at once)
	// may take a while to answer: provisioning tries again within the
	// same budget as binding the consumers, then the process exits with
	// the reason.
	pctx, cancel := context.WithTimeout(ctx, max(o.Common.BindTimeout, 30*time.Second))
	defer cancel()
	if err := bus.Provision(pctx, s.JS, s.topology); err != nil {
		return nil, fmt.Errorf("%w (within EASGUARD_BIND_TIMEOUT)", err)
	}

	s.pub, err = bus.NewPublisher(s.JS, s.instrumentation())
	if err != nil {
		return nil, err
	}
	s.Health = health.New(s.Tel.MetricsHandler())
	s.Health.AddReadiness("nats", func() error {
		if !s.NC.IsConnected() {
			return fmt.Errorf("not connected (%s)", s.NC.Status())
		}
		return nil
	})
	s.Health.AddReadiness("process", func() error {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.failure != nil {
			return fmt.Errorf("stopping: %w", s.failure)
		}
		return nil
	})
	addr, serve, err := s.Health.Listen(o.Common.HTTPAddr)
	if err != nil {
		return nil, err
	}
	s.HTTPAddr = addr.String()
	s.serve = serve
	if o.Common.DebugAddr != "" {
		addr, serveDebug, err := health.ListenHandler(o.Common.DebugAddr, health.Profiler())
		if err != nil {
			return nil, fmt.Errorf("profiler: %w", err)
		}
		s.Log.Info("profiler listening", "addr", addr.String())
		s.Go("profiler", serveDebug)
	}
	return s, nil
}

// Topology returns the topology the service provisioned.
func (s *Service) Topology() bus.Topology { return s.topology }

func (s *Service) instrumentation() bus.Instrumentation {
	return bus.Instrumentation{TracerProvider: s.Tel.TracerProvider, MeterProvider: s.Tel.MeterProvider, Propagator: s.Tel.Propagator}
}

// RunnerConfig returns a runner configuration wired to this service's
// logs, telemetry and topology, handling EASGUARD_CONCURRENCY messages at
// once; a worker whose messages must be handled one at a time (the
// collector's sync requests) sets Concurrency back to 1.
func (s *Service) RunnerConfig(service string, org bus.Org) bus.RunnerConfig {
	return bus.RunnerConfig{
		Service: service, Org: org, Topology: s.topology,
		Concurrency:     s.opts.Common.Concurrency,
		DrainTimeout:    s.opts.Common.ShutdownTimeout,
		Logger:          s.Log,
		Instrumentation: s.instrumentation(),
	}
}

// Publisher returns a publisher for events produced outside a handler
// (a schedule, an MDM source, a status action).
func (s *Service) Publisher() *bus.Publisher { return s.pub }

// InstanceID names this replica in leases.
func (s *Service) InstanceID() string {
	if s.opts.Common.InstanceID != "" {
		return s.opts.Common.InstanceID
	}
	host, _ := os.Hostname()
	return fmt.Sprintf("%s-%d", host, os.Getpid())
}

// AddRunner builds a runner, registers its readiness and schedules it.
// A runner that cannot bind its consumers makes the process fail
// readiness with the reason and, after EASGUARD_BIND_TIMEOUT, stop with
// it: a worker never silently goes missing.
func (s *Service) AddRunner(cfg bus.RunnerConfig, routes ...bus.Route) (*bus.Runner, error) {
	r, err := bus.NewRunner(s.JS, cfg, routes...)
	if err != nil {
		return nil, fmt.Errorf("runner %s: %w", cfg.Service, err)
	}
	name := "runner " + cfg.Service
	b := s.Binding(name, r)
	s.Go(name, func(ctx context.Context) error { return b.Run(ctx) })
	return r, nil
}

// ErrBindTimeout is returned when a runner could not bind its consumers
// within the bind timeout.
var ErrBindTimeout = errors.New("consumers not bound within EASGUARD_BIND_TIMEOUT")

// Binding runs one runner and tells readiness why it is not bound. It is
// separate from AddRunner for runners that run only part of the time
// (the collector's, while it holds its lease).
type Binding struct {
	svc    *Service
	runner *bus.Runner

	mu   sync.Mutex
	last error
}

// Binding returns the binding that runs r and, unless name is empty (the
// caller checks readiness itself), registers its readiness under name; the
// readiness says why binding failed, not only that it did.
func (s *Service) Binding(name string, r *bus.Runner) *Binding {
	b := &Binding{svc: s, runner: r}
	if name != "" {
		s.Health.AddReadiness(name, b.Ready)
	}
	return b
}

// Ready is nil once the runner is bound, else the last bind failure.
func (b *Binding) Ready() error {
	err := b.runner.Ready()
	if err == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.last != nil {
		return b.last
	}
	return err
}

// Run runs the runner until ctx ends. A bind failure (a stream not there
// yet while a cluster elects its leaders, a consumer of the same name with
// a conflicting configuration) is retried with backoff until the bind
// timeout; then Run returns the failure, which stops the process.
func (b *Binding) Run(ctx context.Context) error {
	timeout := b.svc.opts.Common.BindTimeout
	if timeout <= 0 {
		timeout = time.Minute
	}
	deadline := time.Now().Add(timeout)
	bo := backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond), backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(0))
	for {
		err := b.runner.Run(ctx)
		if err == nil || ctx.Err() != nil {
			return nil
		}
		b.mu.Lock()
		b.last = err
		b.mu.Unlock()
		if !time.Now().Before(deadline) {
			return fmt.Errorf("%w (%s): %w", ErrBindTimeout, timeout, err)
		}
		d := min(bo.NextBackOff(), time.Until(deadline))
		b.svc.Log.Error("cannot bind consumers; retrying", "error", err, "retry_in", d, "gives_up_in", time.Until(deadline).Round(time.Millisecond))
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return nil
		}
	}
}

// Go schedules a long-running task; Run starts it. A task that returns an
// error before shutdown stops the whole process, so a broken part is never
// silently missing.
func (s *Service) Go(name string, run func(ctx context.Context) error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tasks = append(s.tasks, task{name: name, run: run})
}

// Run runs the health endpoint and every task until ctx is cancelled or a
// task fails, then stops them, drains the NATS connection, stops the
// embedded server and flushes telemetry, in that order.
func (s *Service) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.mu.Lock()
	tasks := append([]task{{name: "health", run: s.serve}}, s.tasks...)
	s.mu.Unlock()

	errc := make(chan error, len(tasks))
	var wg sync.WaitGroup
	for _, t := range tasks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := t.run(ctx)
			if err != nil && ctx.Err() == nil {
				err = fmt.Errorf("%s: %w", t.name, err)
				s.Log.Error("task failed; stopping", "task", t.name, "error", err)
				s.mu.Lock()
				if s.failure == nil {
					s.failure = err
				}
				s.mu.Unlock()
				errc <- err
				cancel()
			}
		}()
	}
	s.Log.Info("running", "http", "http://"+s.HTTPAddr, "tasks", len(tasks), "gc", GarbageCollector())
	<-ctx.Done()
	s.Log.Info("stopping")
	wg.Wait()
	close(errc)
	runErr := <-errc

	shutdown, scancel := context.WithTimeout(context.Background(), s.opts.Common.ShutdownTimeout)
	defer scancel()
	closed := make(chan struct{})
	s.NC.SetClosedHandler(func(*nats.Conn) { close(closed) })
	if err := s.NC.Drain(); err != nil {
		s.Log.Warn("nats drain", "error", err)
	} else {
		select {
		case <-closed:
		case <-shutdown.Done():
			s.Log.Warn("nats drain timed out")
		}
	}
	s.NC.Close()
	if s.Embedded != nil {
		s.Embedded.Shutdown()
	}
	if err := s.Tel.Shutdown(shutdown); err != nil {
		s.Log.Warn("telemetry shutdown", "error", err)
	}
	s.Log.Info("stopped")
	return runErr
}

// setMemoryLimit gives Go a soft memory limit of ratio of the container's
// memory limit (automemlimit reads the cgroup, v1 or v2, as Prometheus
// does with --auto-gomemlimit): without one, the heap may grow to twice
// what is live before the collector runs, and the kernel kills a worker
// that a tighter collection would have kept under its limit. A GOMEMLIMIT
// or AUTOMEMLIMIT in the environment wins; no cgroup limit changes
// nothing. Failing to read the cgroup is logged, not fatal: the process
// runs as it would have without the setting.
func setMemoryLimit(ratio float64, log *slog.Logger) {
	if ratio == 0 {
		return
	}
	limit, err := memlimit.Set(memlimit.WithRatio(ratio), memlimit.WithProvider(memlimit.FromCgroup))
	switch {
	case errors.Is(err, memlimit.ErrNoCgroup) || errors.Is(err, memlimit.ErrCgroupsNotSupported):
		log.Debug("no cgroup to take a memory limit from", "error", err)
	case err != nil:
		log.Warn("no memory limit set from the cgroup", "error", err)
	case limit < math.MaxInt64:
		log.Info("go memory limit", "gomemlimit_bytes", limit, "ratio", ratio)
	}
}
