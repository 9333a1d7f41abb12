// Command mailer is easguard's mailer as its own process: it tells the
// users of blocked or quarantined devices how to enrol them.
package main

import (
	"context"
	"os"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/mailer"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/service"
)

// Config is the mailer's configuration.
type Config struct {
	config.Common
	Mailer mailer.Config
}

func (c *Config) sections() pipeline.Sections { return pipeline.Sections{Mailer: &c.Mailer} }

// Validate checks the settings.
func (c *Config) Validate() error {
	if err := c.Common.Validate(); err != nil {
		return err
	}
	return pipeline.Validate([]string{pipeline.Mailer}, c.sections())
}

func main() {
	var cfg Config
	os.Exit(service.Main("mailer", "mailer tells users of blocked or quarantined devices how to enrol them (NATS required: EASGUARD_NATS_URL).", os.Args[1:], os.Stdout, os.Stderr, &cfg,
		func(ctx context.Context) error {
			return pipeline.RunWorkers(ctx, "mailer", cfg.Common, []string{pipeline.Mailer}, cfg.sections())
		}))
}
