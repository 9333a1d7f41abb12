// Command smtpsim runs the simulated SMTP relay of package smtpsim for
// easguard's demo and manual testing: a real ESMTP server with STARTTLS
// (self-signed certificate) and AUTH PLAIN/LOGIN that keeps the mails it
// accepts and shows them over HTTP. On start it prints one JSON line,
//
//	{"smtp":"127.0.0.1:p","api":"http://127.0.0.1:q","ca_cert":"<path>"}
//
// (ca_cert only with -cert-out), then runs until SIGINT or SIGTERM. Open the
// api URL in a browser to read the mails.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"os"

	"github.com/easguard/easguard/tests/simcmd"
	"github.com/easguard/easguard/tests/smtpsim"
)

func main() { simcmd.Main(run) }

type started struct {
	SMTP   string `json:"smtp"`
	API    string `json:"api"`
	CACert string `json:"ca_cert,omitempty"`
}

// run is main without the process: it returns the exit code once ctx ends,
// so a test can drive it in-process.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("smtpsim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:0", "SMTP listen address")
	api := fs.String("api", "127.0.0.1:0", `HTTP API listen address ("" = no API)`)
	user := fs.String("user", "", "require AUTH with this username (default: open relay, any credentials accepted)")
	password := fs.String("password", "", "password for -user (prefer SMTPSIM_PASSWORD: flags are visible to other local users)")
	requireTLS := fs.Bool("require-tls", false, "refuse MAIL before STARTTLS (530)")
	implicitTLS := fs.Bool("implicit-tls", false, "serve TLS from the first byte (SMTPS) instead of STARTTLS")
	noTLS := fs.Bool("no-tls", false, "offer no STARTTLS at all")
	certOut := fs.String("cert-out", "", "write the server certificate (PEM) clients should trust to this file")
	domain := fs.String("domain", "smtp.test", "name the server greets with")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "smtpsim runs a simulated SMTP relay that keeps and shows the mails it receives.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "smtpsim: unexpected arguments %q\n", fs.Args())
		return 2
	}
	pw := *password
	if pw == "" {
		pw = os.Getenv("SMTPSIM_PASSWORD")
	}
	cfg := smtpsim.Config{
		Addr: *addr, APIAddr: *api, RequireTLS: *requireTLS, ImplicitTLS: *implicitTLS, DisableTLS: *noTLS,
		Domain: *domain, ErrorLog: log.New(stderr, "smtpsim: ", log.LstdFlags),
	}
	switch {
	case *user != "" && pw == "":
		fmt.Fprintln(stderr, "smtpsim: -user needs a password: set SMTPSIM_PASSWORD or -password")
		return 2
	case *user == "" && *password != "":
		fmt.Fprintln(stderr, "smtpsim: -password needs -user")
		return 2
	case *user != "":
		cfg.Users = map[string]string{*user: pw}
	}
	if *noTLS && *certOut != "" {
		fmt.Fprintln(stderr, "smtpsim: -cert-out needs TLS, but -no-tls is set")
		return 2
	}
	s, err := smtpsim.Start(cfg)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer s.Close()
	out := started{SMTP: s.Addr(), API: s.APIURL()}
	if *certOut != "" {
		if err := os.WriteFile(*certOut, s.CertPEM(), 0o644); err != nil {
			fmt.Fprintln(stderr, "smtpsim: -cert-out:", err)
			return 1
		}
		out.CACert = *certOut
	}
	line, err := json.Marshal(out)
	if err != nil {
		fmt.Fprintln(stderr, "smtpsim:", err)
		return 1
	}
	fmt.Fprintln(stdout, string(line))
	<-ctx.Done()
	if err := s.Close(); err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	return 0
}
