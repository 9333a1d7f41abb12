// Command collector is easguard's collector as its own process: it reads
// the ActiveSync partnerships of one Exchange organisation and publishes
// them, holding the org's collector lease (replicas stand by).
package main

import (
	"context"
	"os"

	"github.com/easguard/easguard/pkg/collector"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/service"
)

// Config is the collector's configuration.
type Config struct {
	config.Common
	Exchange  exchange.Config
	Collector collector.Config
}

func (c *Config) sections() pipeline.Sections {
	return pipeline.Sections{Exchange: &c.Exchange, Collector: &c.Collector}
}

// Validate checks the settings.
func (c *Config) Validate() error {
	if err := c.Common.Validate(); err != nil {
		return err
	}
	return pipeline.Validate([]string{pipeline.Collector}, c.sections())
}

func main() {
	var cfg Config
	os.Exit(service.Main("collector", "collector reads ActiveSync partnerships from Exchange and publishes eas.observed (NATS required: EASGUARD_NATS_URL).", os.Args[1:], os.Stdout, os.Stderr, &cfg,
		func(ctx context.Context) error {
			return pipeline.RunWorkers(ctx, "collector", cfg.Common, []string{pipeline.Collector}, cfg.sections())
		}))
}
