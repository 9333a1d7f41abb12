// Package pipeline assembles the workers of one Exchange organisation in
// one process: any subset of collector, matcher, evaluator, executor,
// mailer and the MDM sources, around a started service. The all-in-one
// binary runs them all; each worker's own binary runs one. Workers only
// talk through JetStream, so how they are split across processes changes
// nothing but scaling.
package pipeline

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/easguard/easguard/pkg/budget"
	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/collector"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/console"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/executor"
	"github.com/easguard/easguard/pkg/mailer"
	"github.com/easguard/easguard/pkg/matcher"
	"github.com/easguard/easguard/pkg/service"
)

// Worker names.
const (
	Collector = "collector"
	Matcher   = "matcher"
	Evaluator = "evaluator"
	Executor  = "executor"
	Mailer    = "mailer"
	MDM       = "mdm"
)

// All is every worker, in pipeline order.
var All = []string{Collector, Matcher, Evaluator, Executor, Mailer, MDM}

// Sections are the settings of the workers a process may run; nil
// sections belong to workers it never runs.
type Sections struct {
	Exchange  *exchange.Config
	Collector *collector.Config
	Evaluator *evaluator.Config
	Executor  *executor.Config
	Mailer    *mailer.Config
	MDM       *MDMConfig
}

// ParseWorkers checks a worker list ("none" or empty: no workers).
func ParseWorkers(list []string) ([]string, error) {
	var out []string
	for _, w := range list {
		w = strings.ToLower(strings.TrimSpace(w))
		if w == "" || w == "none" {
			continue
		}
		if !slices.Contains(All, w) {
			return nil, fmt.Errorf("unknown worker %q (known: %s)", w, strings.Join(All, ", "))
		}
		if !slices.Contains(out, w) {
			out = append(out, w)
		}
	}
	return out, nil
}

// Validate checks the sections of the workers that will run.
func Validate(workers []string, s Sections) error {
	has := func(w string) bool { return slices.Contains(workers, w) }
	if (has(Collector) || has(Executor)) && s.Exchange != nil {
		if err := s.Exchange.Validate(); err != nil {
			return err
		}
	}
	if has(Collector) && s.Collector != nil {
		if err := s.Collector.Validate(); err != nil {
			return err
		}
	}
	if has(Evaluator) && s.Evaluator != nil {
		if err := s.Evaluator.Validate(); err != nil {
			return err
		}
	}
	if has(Executor) && s.Executor != nil {
		if err := s.Executor.Validate(); err != nil {
			return err
		}
	}
	if has(Mailer) && s.Mailer != nil {
		if err := s.Mailer.Validate(); err != nil {
			return err
		}
	}
	if has(MDM) && s.MDM != nil {
		m := s.MDM
		if m.File == "" && m.WebhookAddr == "" && m.GraphTenant == "" {
			return config.Invalid(&m.File, "the mdm worker needs a source: Graph (EASGUARD_MDM_GRAPH_TENANT), an inventory file, or a webhook address (EASGUARD_MDM_WEBHOOK_ADDR)")
		}
		if m.GraphTenant != "" {
			if err := m.validateGraph(); err != nil {
				return err
			}
		}
		if m.WebhookAddr != "" && len(m.WebhookSecret.Reveal()) < 16 {
			return config.Invalid(&m.WebhookSecret, "must be at least 16 bytes when the webhook is on")
		}
		if m.MassRemovalShare <= 0 || m.MassRemovalShare > 1 {
			return config.Invalid(&m.MassRemovalShare, "must be above 0 and at most 1")
		}
	}
	return nil
}

// Start builds the workers and schedules them on the service; the
// service's Run runs them.
func Start(ctx context.Context, svc *service.Service, org bus.Org, workers []string, s Sections) error {
	has := func(w string) bool { return slices.Contains(workers, w) }
	var client *exchange.Client
	var pool *exchange.Pool
	if has(Collector) || has(Executor) {
		slots, err := sessionBudget(ctx, svc, org, s.Exchange.Sessions())
		if err != nil {
			return err
		}
		pool, err = exchange.NewPool(ctx, *s.Exchange, svc.Log, exchange.WithSessionSlots(slots), exchange.WithMetrics(svc.Tel.MeterProvider, string(org)), exchange.WithTracing(svc.Tel.TracerProvider))
		if err != nil {
			slots.Close()
			return fmt.Errorf("exchange: %w", err)
		}
		svc.Go("exchange pool", func(ctx context.Context) error {
			<-ctx.Done()
			pool.Close(context.Background())
			slots.Close()
			return nil
		})
		client = exchange.NewClient(pool, *s.Exchange)
	}
	if has(Matcher) {
		m, err := matcher.New(ctx, svc.JS, org)
		if err != nil {
			return err
		}
		if _, err := svc.AddRunner(svc.RunnerConfig(Matcher, org), m.Routes()...); err != nil {
			return err
		}
	}
	if has(Evaluator) {
		e, err := evaluator.New(ctx, svc.JS, org, *s.Evaluator, svc.Log)
		if err != nil {
			return err
		}
		if err := e.Instrument(svc.Tel.MeterProvider); err != nil {
			return err
		}
		r, err := svc.AddRunner(svc.RunnerConfig(Evaluator, org), e.Routes()...)
		if err != nil {
			return err
		}
		e.SetPublisher(r.Publisher())
		// Every replica judges verdicts; the guard loop runs in the one
		// that holds the org's evaluator lease.
		e.SetInstance(svc.InstanceID())
		svc.Go("evaluator guard", e.Run)
	}
	if has(Executor) {
		x, err := executor.New(ctx, svc.JS, org, *s.Executor, client, pool.Current, s.Exchange.User, svc.Log)
		if err != nil {
			return err
		}
		rc := svc.RunnerConfig(Executor, org)
		// Decisions wait together for their batch: many handlers at once,
		// each with one message, so none outlives its AckWait in a buffer.
		rc.Concurrency, rc.Prefetch = s.Executor.Parallel, 1
		r, err := svc.AddRunner(rc, x.Routes()...)
		if err != nil {
			return err
		}
		x.SetPublisher(r.Publisher())
		// The liveness lease other replicas check before they wait for
		// this one's claims.
		svc.Go("executor liveness", x.Run)
	}
	if has(Mailer) {
		mc := s.Mailer
		sender, err := mc.NewSender()
		if err != nil {
			return fmt.Errorf("mailer: %w", err)
		}
		sender.Trace(svc.Tel.TracerProvider)
		m, err := mailer.New(ctx, svc.JS, org, *mc, sender, svc.Log)
		if err != nil {
			return err
		}
		if err := m.Instrument(svc.Tel.MeterProvider); err != nil {
			return err
		}
		r, err := svc.AddRunner(svc.RunnerConfig(Mailer, org), m.Routes()...)
		if err != nil {
			return err
		}
		m.SetPublisher(r.Publisher())
	}
	if has(Collector) {
		if err := startCollector(ctx, svc, org, *s.Collector, client, pool); err != nil {
			return err
		}
	}
	if has(MDM) {
		if err := startMDM(ctx, svc, org, *s.MDM); err != nil {
			return err
		}
	}
	return nil
}

// sessionBudget opens this process's share of the organisation's Exchange
// session budget: slots leased in the lease bucket, so that a crashed
// process's sessions return to the others within the lease TTL.
func sessionBudget(ctx context.Context, svc *service.Service, org bus.Org, total int) (*budget.Slots, error) {
	kv, err := svc.JS.KeyValue(ctx, bus.BucketLeases)
	if err != nil {
		return nil, fmt.Errorf("exchange session budget: %w", err)
	}
	slots, err := budget.New(ctx, kv, "exchange-session", org, total, svc.InstanceID(), svc.Log)
	if err != nil {
		return nil, fmt.Errorf("exchange session budget: %w", err)
	}
	return slots, nil
}

// startCollector campaigns for the org's collector lease; the holder binds
// the manual-sync consumer and runs the schedule, standbys wait.
func startCollector(ctx context.Context, svc *service.Service, org bus.Org, cfg collector.Config, client *exchange.Client, pool *exchange.Pool) error {
	c, err := collector.New(ctx, svc.JS, org, cfg, client, svc.Publisher(), pool.Current, svc.Log)
	if err != nil {
		return err
	}
	if err := c.Instrument(svc.Tel.MeterProvider); err != nil {
		return err
	}
	kv, err := svc.JS.KeyValue(ctx, bus.BucketLeases)
	if err != nil {
		return fmt.Errorf("collector: %w", err)
	}
	lease, err := bus.NewLease(ctx, kv, "collector", org, svc.InstanceID(), svc.Log)
	if err != nil {
		return err
	}
	// The runner exists only while the lease is held, but it is built
	// here: a route that cannot be built stops the process at start.
	r, err := bus.NewRunner(svc.JS, svc.RunnerConfig(Collector, org), c.Route())
	if err != nil {
		return fmt.Errorf("collector: %w", err)
	}
	binding := svc.Binding("", r)
	svc.Health.AddReadiness("collector", func() error {
		if !lease.Held() {
			return nil // a standby has nothing bound, and that is right
		}
		return binding.Ready()
	})
	svc.Go("collector", func(ctx context.Context) error {
		// A leader whose consumer cannot bind stops the process (and so
		// frees the lease for a standby) instead of holding the duty
		// without doing it.
		ctx, cancel := context.WithCancelCause(ctx)
		defer cancel(nil)
		err := lease.Run(ctx, func(lctx context.Context) {
			// Another replica may have held the lease, and written what
			// the collector knows, since this one last did.
			c.Forget()
			lctx, stop := context.WithCancel(lctx)
			defer stop()
			done := make(chan struct{})
			go func() {
				defer close(done)
				if err := binding.Run(lctx); err != nil {
					cancel(err)
					stop()
				}
			}()
			_ = c.Schedule(lctx)
			<-done
		})
		if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
			return fmt.Errorf("collector: %w", cause)
		}
		return err
	})
	return nil
}

// StartDeadLetterMover schedules the dead-letter mover on the service.
// Every binary runs one, whatever its workers: a message that reaches
// MaxDeliver while its worker crashed or hung is never settled by that
// worker, and only the mover turns it into a dead letter. All movers share
// one durable consumer on the advisories work-queue stream, so each
// advisory is handled by one of them; a redelivered advisory publishes the
// same dead-letter id, which the DLQ stream drops as a duplicate.
func StartDeadLetterMover(svc *service.Service) error {
	if _, err := svc.AddRunner(svc.RunnerConfig("deadletter", ""), bus.DeadLetterMover().Serial()); err != nil {
		return fmt.Errorf("dead-letter mover: %w", err)
	}
	return nil
}

// RunWorkers is the life of a worker binary: start the service (NATS
// from EASGUARD_NATS_URL), the dead-letter mover and the workers, and run
// until ctx ends or a part fails (then the error says which and why).
func RunWorkers(ctx context.Context, name string, common config.Common, workers []string, s Sections) error {
	svc, err := service.Start(ctx, service.Options{Name: name, Version: service.Version, Common: common})
	if err != nil {
		return err
	}
	if err := StartDeadLetterMover(svc); err != nil {
		return errors.Join(err, svc.Run(cancelled()))
	}
	if err := Start(ctx, svc, common.OrgName(), workers, s); err != nil {
		return errors.Join(err, svc.Run(cancelled()))
	}
	return svc.Run(ctx)
}

func cancelled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// StartConsole serves the console and its API (cfg.Addr) from this
// process, for cfg's organisations (defaultOrg when it names none), and
// returns the URL users reach it at. The console reads what the workers
// keep in JetStream, so any process of the cluster can serve it.
func StartConsole(ctx context.Context, svc *service.Service, cfg console.Config, defaultOrg string) (string, error) {
	ln, err := console.Listen(cfg)
	if err != nil {
		return "", err
	}
	srv, err := console.New(ctx, cfg, defaultOrg, ln.Addr().String(), svc.JS, svc.Publisher(), svc.Log)
	if err != nil {
		ln.Close()
		return "", err
	}
	svc.Go("console index", srv.Run)
	svc.Go("console", func(ctx context.Context) error { return srv.Serve(ctx, ln) })
	return srv.URL(), nil
}
