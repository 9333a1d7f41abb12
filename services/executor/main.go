// Command executor is easguard's executor as its own process: it applies
// access decisions on Exchange and publishes access.applied.
package main

import (
	"context"
	"os"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/executor"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/service"
)

// Config is the executor's configuration.
type Config struct {
	config.Common
	Exchange exchange.Config
	Executor executor.Config
}

func (c *Config) sections() pipeline.Sections {
	return pipeline.Sections{Exchange: &c.Exchange, Executor: &c.Executor}
}

// Validate checks the settings.
func (c *Config) Validate() error {
	if err := c.Common.Validate(); err != nil {
		return err
	}
	return pipeline.Validate([]string{pipeline.Executor}, c.sections())
}

func main() {
	var cfg Config
	os.Exit(service.Main("executor", "executor applies access decisions on Exchange (NATS required: EASGUARD_NATS_URL).", os.Args[1:], os.Stdout, os.Stderr, &cfg,
		func(ctx context.Context) error {
			return pipeline.RunWorkers(ctx, "executor", cfg.Common, []string{pipeline.Executor}, cfg.sections())
		}))
}
