// Command mdmsource runs easguard's MDM sources as their own process: an
// inventory file and a signed webhook, publishing mdm.changed.
package main

import (
	"context"
	"os"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/service"
)

// Config is the MDM sources' configuration.
type Config struct {
	config.Common
	MDM pipeline.MDMConfig
}

func (c *Config) sections() pipeline.Sections { return pipeline.Sections{MDM: &c.MDM} }

// Validate checks the settings.
func (c *Config) Validate() error {
	if err := c.Common.Validate(); err != nil {
		return err
	}
	return pipeline.Validate([]string{pipeline.MDM}, c.sections())
}

func main() {
	var cfg Config
	os.Exit(service.Main("mdmsource", "mdmsource publishes MDM device changes from an inventory file or a webhook (NATS required: EASGUARD_NATS_URL).", os.Args[1:], os.Stdout, os.Stderr, &cfg,
		func(ctx context.Context) error {
			return pipeline.RunWorkers(ctx, "mdmsource", cfg.Common, []string{pipeline.MDM}, cfg.sections())
		}))
}
