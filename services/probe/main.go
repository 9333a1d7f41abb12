// Command probe is the health check of easguard's container images. They
// are built FROM scratch and hold no shell and no curl, so Compose's and
// Docker's HEALTHCHECK run this instead: it asks each URL it is given and
// succeeds only when every one answers 2xx within the timeout.
//
//	probe [-timeout 3s] URL...
//
// It exits 0 when all are healthy, 1 (with the first failure on stderr)
// otherwise, and 2 on a usage error, as a health-check command must.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	fs.SetOutput(stderr)
	timeout := fs.Duration("timeout", 3*time.Second, "how long each URL may take to answer")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() == 0 {
		fmt.Fprintln(stderr, "usage: probe [-timeout 3s] URL...")
		return 2
	}
	for _, u := range fs.Args() {
		if err := check(u, *timeout); err != nil {
			fmt.Fprintf(stderr, "probe: %v\n", err)
			return 1
		}
	}
	return 0
}

// check asks u once. A health endpoint that redirects is not healthy: the
// probe reports what it was pointed at, not where that leads.
func check(u string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("%s: %w", u, err)
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("GET %s: %s: %s", u, resp.Status, body)
	}
	return nil
}
