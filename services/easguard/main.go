// Command easguard is the all-in-one easguard binary: it runs the platform
// and the workers of one Exchange organisation in one process, around an
// embedded NATS server unless EASGUARD_NATS_URL names a real one.
//
// Usage:
//
//	easguard [run]           run until SIGINT or SIGTERM
//	easguard check exchange  test the Exchange connection, servers and permissions
//	  [--deep]               and run every read, checking the shapes that come back
//	easguard help            this text and every environment variable
//	easguard config-doc   the environment variables as a Markdown table
//	easguard version      the version
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/easguard/easguard/pkg/collector"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/console"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/executor"
	"github.com/easguard/easguard/pkg/mailer"
	"github.com/easguard/easguard/pkg/natsembed"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/service"
)

// Config is the all-in-one binary's configuration: the settings every
// worker shares, those of the embedded NATS server, and each worker's.
type Config struct {
	config.Common
	DataDir            string        `split_words:"true" default:"./data" desc:"Directory of the embedded NATS server's JetStream store; it survives restarts. Unused with EASGUARD_NATS_URL."`
	NatsListen         string        `split_words:"true" desc:"Also accept NATS clients (the nats CLI, separate worker processes) on this host:port; embedded server only; beyond loopback only with EASGUARD_NATS_LISTEN_USER and its password. Empty: in-process only."`
	NatsMonitorListen  string        `split_words:"true" desc:"Serve the embedded NATS server's monitoring endpoints (/varz, /jsz) on this host:port, loopback only (they have no authentication). Empty: off."`
	NatsListenUser     string        `split_words:"true" desc:"User every NATS client of the embedded server must log on as (with EASGUARD_NATS_LISTEN_PASSWORD); required when EASGUARD_NATS_LISTEN is beyond loopback. Its clients connect with nats://user:password@host:port."`
	NatsListenPassword config.Secret `split_words:"true" secret:"true" desc:"Password of EASGUARD_NATS_LISTEN_USER, at least 16 characters."`
	Workers            []string      `split_words:"true" default:"collector,matcher,evaluator,executor,mailer,mdm" desc:"Comma-separated workers this process runs: collector, matcher, evaluator, executor, mailer, mdm; none for the platform only."`
	Exchange           exchange.Config
	Collector          collector.Config
	Evaluator          evaluator.Config
	Executor           executor.Config
	Mailer             mailer.Config
	MDM                pipeline.MDMConfig
	Console            console.Config
}

func (c *Config) sections() pipeline.Sections {
	return pipeline.Sections{Exchange: &c.Exchange, Collector: &c.Collector, Evaluator: &c.Evaluator, Executor: &c.Executor, Mailer: &c.Mailer, MDM: &c.MDM}
}

// Validate checks the shared settings, the embedded server's, and those of
// every worker that will run.
func (c *Config) Validate() error {
	if err := c.Common.Validate(); err != nil {
		return err
	}
	workers, err := pipeline.ParseWorkers(c.Workers)
	if err != nil {
		return config.Invalid(&c.Workers, "%v", err)
	}
	if err := pipeline.Validate(workers, c.sections()); err != nil {
		return err
	}
	for _, a := range []*string{&c.NatsListen, &c.NatsMonitorListen} {
		if *a == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(*a); err != nil {
			return config.Invalid(a, "%q is not host:port", *a)
		}
		if c.NatsURL != "" {
			return config.Invalid(a, "only applies to the embedded server, but EASGUARD_NATS_URL is set")
		}
	}
	if (c.NatsListenUser == "") != (c.NatsListenPassword == "") {
		return config.Invalid(&c.NatsListenUser, "give the user and EASGUARD_NATS_LISTEN_PASSWORD, or neither")
	}
	if c.NatsListenUser != "" && len(c.NatsListenPassword.Reveal()) < 16 {
		return config.Invalid(&c.NatsListenPassword, "must be at least 16 characters")
	}
	if c.NatsListen != "" && !natsembed.IsLoopback(c.NatsListen) && c.NatsListenUser == "" {
		return config.Invalid(&c.NatsListen, "%q accepts clients from other machines, which could read and forge every event: set EASGUARD_NATS_LISTEN_USER and EASGUARD_NATS_LISTEN_PASSWORD, or listen on loopback (127.0.0.1:4222)", c.NatsListen)
	}
	if c.NatsMonitorListen != "" && !natsembed.IsLoopback(c.NatsMonitorListen) {
		return config.Invalid(&c.NatsMonitorListen, "%q is beyond loopback, and NATS's monitoring endpoints have no authentication: listen on loopback (127.0.0.1:8222) and put an authenticating proxy in front if it must be reached", c.NatsMonitorListen)
	}
	if err := c.Console.Validate(); err != nil {
		return err
	}
	if c.NatsURL == "" && c.DataDir == "" {
		return config.Invalid(&c.DataDir, "must not be empty when the embedded server is used")
	}
	return nil
}

const summary = `easguard gates Exchange ActiveSync devices by their MDM compliance.

Usage:
  easguard [run]           run the platform and workers until SIGINT or SIGTERM
  easguard check exchange  connect to Exchange and report servers, size, settings
                           and missing permissions; non-zero exit on any failure
    --deep                 also run every read easguard makes and check what comes
                           back (known enum values, parseable dates, ids, complete
                           listings); for a lab, before easguard runs for real
  easguard status|sync|devices|device|approve|discard|rejudge|wipe|remove|audit
                           the CLI, over a running easguard's console API (below)
  easguard hash-password   hash a break-glass password (stdin) or make an API token
  easguard help            print this help
  easguard config-doc      print the environment variables as Markdown tables
  easguard version         print the version

` + cliSummary + `
Every setting is an environment variable. A secret can instead be put in a
file named by the variable with _FILE appended.

`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is main without the exit, for tests: 0 success, 1 failure at run
// time, 2 bad usage or configuration.
func run(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 {
		cmd = args[0]
		args = args[1:]
	}
	if cmd == "check" {
		return runCheck(args, stdout, stderr)
	}
	if cliCommands[cmd] {
		return runCLI(cmd, args, stdout, stderr)
	}
	if cmd == "hash-password" {
		return hashPassword(args, os.Stdin, stdout, stderr)
	}
	if len(args) > 0 {
		fmt.Fprintf(stderr, "easguard %s: unexpected arguments %q\n", cmd, args)
		return 2
	}
	switch cmd {
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, summary)
		if err := config.Usage(stdout, &Config{}); err != nil {
			fmt.Fprintln(stderr, "easguard:", err)
			return 1
		}
		fmt.Fprint(stdout, "\nVariables of easguard check exchange (the Exchange connection):\n\n")
		if err := config.Usage(stdout, &CheckConfig{}); err != nil {
			fmt.Fprintln(stderr, "easguard:", err)
			return 1
		}
		return 0
	case "config-doc":
		fmt.Fprint(stdout, "#### easguard run\n\n")
		if err := config.Markdown(stdout, &Config{}); err != nil {
			fmt.Fprintln(stderr, "easguard:", err)
			return 1
		}
		fmt.Fprint(stdout, "\n#### Exchange connection (easguard check exchange)\n\n")
		if err := config.Markdown(stdout, &CheckConfig{}); err != nil {
			fmt.Fprintln(stderr, "easguard:", err)
			return 1
		}
		return 0
	case "version", "--version":
		fmt.Fprintln(stdout, "easguard", service.Version)
		return 0
	case "run":
	default:
		fmt.Fprintf(stderr, "easguard: unknown command %q; see easguard help\n", cmd)
		return 2
	}

	var cfg Config
	if err := config.Load(&cfg); err != nil {
		fmt.Fprintf(stderr, "easguard: %v\n(easguard help lists every variable)\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, cfg, stderr); err != nil {
		fmt.Fprintln(stderr, "easguard:", err)
		return 1
	}
	return 0
}

// serve starts the platform and the configured workers for the org and
// runs until ctx ends.
func serve(ctx context.Context, cfg Config, logs io.Writer) error {
	svc, err := service.Start(ctx, service.Options{
		Name: "easguard", Version: service.Version, Common: cfg.Common, LogOutput: logs,
		Embedded: &natsembed.Options{
			StoreDir: filepath.Join(cfg.DataDir, "nats"), Listen: cfg.NatsListen, MonitorListen: cfg.NatsMonitorListen,
			Username: cfg.NatsListenUser, Password: cfg.NatsListenPassword.Reveal(),
		},
	})
	if err != nil {
		return err
	}
	// One dead-letter mover per process, as in every worker binary.
	if err := pipeline.StartDeadLetterMover(svc); err != nil {
		return errors.Join(err, svc.Run(cancelled()))
	}
	workers, _ := pipeline.ParseWorkers(cfg.Workers)
	if err := pipeline.Start(ctx, svc, cfg.OrgName(), workers, cfg.sections()); err != nil {
		return errors.Join(err, svc.Run(cancelled()))
	}
	consoleURL := "off"
	if cfg.Console.Enabled() {
		if consoleURL, err = pipeline.StartConsole(ctx, svc, cfg.Console, cfg.Org); err != nil {
			return errors.Join(err, svc.Run(cancelled()))
		}
	}
	svc.Log.Info("easguard started", "version", service.Version, "workers", workers,
		"health", "http://"+svc.HTTPAddr+"/readyz", "console", consoleURL)
	return svc.Run(ctx)
}

// cancelled returns a context that is already done, to shut a started
// service down at once.
func cancelled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}
