// Command evaluator is easguard's evaluator as its own process: it judges
// matched partnerships against the org's policy and publishes decisions.
package main

import (
	"context"
	"os"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/service"
)

// Config is the evaluator's configuration.
type Config struct {
	config.Common
	Evaluator evaluator.Config
}

func (c *Config) sections() pipeline.Sections { return pipeline.Sections{Evaluator: &c.Evaluator} }

// Validate checks the settings.
func (c *Config) Validate() error {
	if err := c.Common.Validate(); err != nil {
		return err
	}
	return pipeline.Validate([]string{pipeline.Evaluator}, c.sections())
}

func main() {
	var cfg Config
	os.Exit(service.Main("evaluator", "evaluator judges matched partnerships against the org's policy (NATS required: EASGUARD_NATS_URL).", os.Args[1:], os.Stdout, os.Stderr, &cfg,
		func(ctx context.Context) error {
			return pipeline.RunWorkers(ctx, "evaluator", cfg.Common, []string{pipeline.Evaluator}, cfg.sections())
		}))
}
