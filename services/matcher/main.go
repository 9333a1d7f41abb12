// Command matcher is easguard's matcher as its own process: it joins
// ActiveSync partnerships with MDM records and publishes device.matched.
package main

import (
	"context"
	"os"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/pkg/service"
)

// Config is the matcher's configuration.
type Config struct {
	config.Common
}

func main() {
	var cfg Config
	os.Exit(service.Main("matcher", "matcher joins ActiveSync partnerships with MDM records (NATS required: EASGUARD_NATS_URL).", os.Args[1:], os.Stdout, os.Stderr, &cfg,
		func(ctx context.Context) error {
			return pipeline.RunWorkers(ctx, "matcher", cfg.Common, []string{pipeline.Matcher}, pipeline.Sections{})
		}))
}
