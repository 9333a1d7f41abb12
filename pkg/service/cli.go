package service

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/easguard/easguard/pkg/config"
)

// Version is set at build time with -ldflags "-X github.com/easguard/easguard/pkg/service.Version=…".
var Version = "dev"

// Main is the command line of a worker binary: `help` (or -h, --help)
// prints the summary and every variable of spec; `version` prints the
// version; no argument (or `run`) loads spec from the environment and runs
// until SIGINT or SIGTERM. It returns the exit code: 0, 1 for a failure
// at run time, 2 for bad usage or configuration.
func Main(name, summary string, args []string, stdout, stderr io.Writer, spec any, run func(ctx context.Context) error) int {
	cmd := "run"
	if len(args) > 0 {
		cmd = args[0]
	}
	if len(args) > 1 {
		fmt.Fprintf(stderr, "%s: unexpected arguments %q\n", name, args[1:])
		return 2
	}
	switch cmd {
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, summary)
		fmt.Fprintln(stdout)
		if err := config.Usage(stdout, spec); err != nil {
			fmt.Fprintln(stderr, name+":", err)
			return 1
		}
		return 0
	case "version", "--version":
		fmt.Fprintln(stdout, name, Version)
		return 0
	case "run":
	default:
		fmt.Fprintf(stderr, "%s: unknown command %q; see %s help\n", name, cmd, name)
		return 2
	}
	if err := config.Load(spec); err != nil {
		fmt.Fprintf(stderr, "%s: %v\n(%s help lists every variable)\n", name, err, name)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(stderr, name+":", err)
		return 1
	}
	return 0
}
