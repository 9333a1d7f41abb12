// Command intunesim runs the simulated Entra ID token service and
// Microsoft Graph (Intune managedDevices) of package intunesim, for
// easguard's demo and manual testing. Its devices are derived from the
// organisation exchangesim generates with the same -seed, -mailboxes,
// -partnerships, -no-hostile, -child-domain-share and -domain, so
//
//	exchangesim -seed 1 -mailboxes 200 -partnerships 300
//	intunesim   -seed 1 -mailboxes 200 -partnerships 300 -cert-out ca.pem -env-out graph.env
//
// describe the same users and phones. On start it prints one JSON line
//
//	{"url":"https://127.0.0.1:p","authority":"https://127.0.0.1:p/<tenant>","graph":"https://127.0.0.1:p/v1.0",
//	 "admin":"http://127.0.0.1:q","tenant":…,"client_id":…,"devices":N,…,"start_seconds":…}
//
// then runs until SIGINT or SIGTERM (exit 0). The client secret is taken
// from INTUNESIM_CLIENT_SECRET or the file INTUNESIM_CLIENT_SECRET_FILE names (default intunesim.DefaultClientSecret).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/easguard/easguard/tests/exchangesim"
	"github.com/easguard/easguard/tests/intunesim"
	"github.com/easguard/easguard/tests/simcmd"
)

func main() { simcmd.Main(run) }

type started struct {
	URL           string  `json:"url"`
	Authority     string  `json:"authority"`
	Graph         string  `json:"graph"`
	TokenEndpoint string  `json:"token_endpoint"`
	Scope         string  `json:"scope"`
	Admin         string  `json:"admin,omitempty"`
	Tenant        string  `json:"tenant"`
	ClientID      string  `json:"client_id"`
	Devices       int     `json:"devices"`
	CACert        string  `json:"ca_cert,omitempty"`
	ClientCert    string  `json:"client_cert,omitempty"`
	ClientKey     string  `json:"client_key,omitempty"`
	EnvFile       string  `json:"env_file,omitempty"`
	StartSeconds  float64 `json:"start_seconds"`
}

// run is main without the process: it returns the exit code once ctx
// ends, so a test can drive it in-process.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	begin := time.Now()
	fs := flag.NewFlagSet("intunesim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:0", "HTTPS listen address (authority and Graph)")
	admin := fs.String("admin", "127.0.0.1:0", `admin API listen address ("" = no admin API)`)
	publicHost := fs.String("public-host", "", "name clients reach -addr by (e.g. a container's name): the authority URL and the certificate use it")
	tenant := fs.String("tenant", intunesim.DefaultTenant, "tenant (directory) id")
	clientID := fs.String("client-id", intunesim.DefaultClientID, "application (client) id")
	certIn := fs.String("client-cert-in", "", "PEM file with the application certificate(s) client assertions may be signed with")
	certOut := fs.String("client-cert-out", "", "generate an application certificate, accept it, and write it (PEM) to this file")
	keyOut := fs.String("client-key-out", "", "where -client-cert-out writes the private key (PEM, mode 0600; default <client-cert-out>.key)")
	seed := fs.Uint64("seed", 1, "seed of the organisation (as exchangesim's -seed)")
	mailboxes := fs.Int("mailboxes", 100, "mailboxes of the organisation (as exchangesim's; 0 = no organisation)")
	partnerships := fs.Int("partnerships", 200, "partnerships of the organisation (as exchangesim's)")
	noHostile := fs.Bool("no-hostile", false, "as exchangesim's -no-hostile")
	childShare := fs.Float64("child-domain-share", 0.1, "as exchangesim's -child-domain-share")
	domain := fs.String("domain", "contoso.com", "forest root domain (as exchangesim's -domain)")
	mixFlag := fs.String("mix", "", "shares of partnerships with an MDM record, e.g. compliant=0.7,noncompliant=0.1,retired=0.03,no_eas_id=0.02 (the default)")
	extra := fs.Int("extra", 0, "synthetic devices to add (users intune.extraN@domain)")
	pageSize := fs.Int("page-size", 1000, "page size without $top")
	maxPageSize := fs.Int("max-page-size", 1000, "largest page $top may ask for")
	lifetime := fs.Duration("token-lifetime", 3599*time.Second, "access token lifetime")
	strictV1 := fs.Bool("strict-v1", false, "hide managementState from /v1.0 (it stays on /beta)")
	easCase := fs.String("eas-id-case", "", `spelling of easDeviceId: "" (as Exchange's DeviceId), upper or lower`)
	caOut := fs.String("cert-out", "", "write the server certificate (PEM) clients should trust to this file")
	envOut := fs.String("env-out", "", "write the EASGUARD_MDM_GRAPH_* settings to this file (mode 0600; needs -cert-out)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "intunesim runs a simulated Entra ID token service and Microsoft Graph (Intune managed devices). The client secret is taken from INTUNESIM_CLIENT_SECRET or the file INTUNESIM_CLIENT_SECRET_FILE names (default: the simulator's documented test secret).")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	usage := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "intunesim: "+format+"\n", a...)
		return 2
	}
	if fs.NArg() > 0 {
		return usage("unexpected arguments %q", fs.Args())
	}
	if *certIn != "" && *certOut != "" {
		return usage("-client-cert-in and -client-cert-out exclude each other")
	}
	if *keyOut != "" && *certOut == "" {
		return usage("-client-key-out needs -client-cert-out")
	}
	if *envOut != "" && *caOut == "" {
		return usage("-env-out needs -cert-out (easguard must trust the simulator's certificate)")
	}
	// The files are named absolutely in the start line and the env file,
	// which are read from other working directories.
	for _, p := range []*string{certOut, keyOut, caOut, envOut} {
		if *p != "" {
			abs, err := filepath.Abs(*p)
			if err != nil {
				return usage("%v", err)
			}
			*p = abs
		}
	}
	secret := os.Getenv("INTUNESIM_CLIENT_SECRET")
	if f := os.Getenv("INTUNESIM_CLIENT_SECRET_FILE"); secret == "" && f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return usage("INTUNESIM_CLIENT_SECRET_FILE: %v", err)
		}
		secret = strings.TrimRight(string(b), "\r\n")
	}
	if secret == "" {
		secret = intunesim.DefaultClientSecret
	}
	cfg := intunesim.Config{
		Tenant: *tenant, ClientID: *clientID, ClientSecret: secret, Addr: *addr, AdminAddr: *admin, PublicHost: *publicHost, Domain: *domain,
		Extra: *extra, PageSize: *pageSize, MaxPageSize: *maxPageSize, TokenLifetime: *lifetime, StrictV1: *strictV1, EASIDCase: *easCase,
	}
	if *mailboxes > 0 {
		cfg.Seed = &exchangesim.SeedSpec{Mailboxes: *mailboxes, Partnerships: *partnerships, Seed: *seed, NoHostile: *noHostile, ChildDomainShare: *childShare}
	}
	if *mixFlag != "" {
		m, err := parseMix(*mixFlag)
		if err != nil {
			return usage("-mix: %v", err)
		}
		cfg.Mix = &m
	}
	out := started{}
	if *certIn != "" {
		pemBytes, err := os.ReadFile(*certIn)
		if err != nil {
			return usage("-client-cert-in: %v", err)
		}
		cfg.ClientCertPEM = pemBytes
	}
	if *certOut != "" {
		certPEM, keyPEM, err := intunesim.GenerateClientCert("easguard-intunesim")
		if err != nil {
			fmt.Fprintln(stderr, "intunesim:", err)
			return 1
		}
		if *keyOut == "" {
			*keyOut = *certOut + ".key"
		}
		if err := os.WriteFile(*certOut, certPEM, 0o644); err != nil {
			fmt.Fprintln(stderr, "intunesim: -client-cert-out:", err)
			return 1
		}
		if err := os.WriteFile(*keyOut, keyPEM, 0o600); err != nil {
			fmt.Fprintln(stderr, "intunesim: -client-key-out:", err)
			return 1
		}
		cfg.ClientCertPEM = certPEM
		out.ClientCert, out.ClientKey = *certOut, *keyOut
	}
	s, err := intunesim.Start(cfg)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer s.Close()
	out.URL, out.Authority, out.Graph, out.TokenEndpoint, out.Scope = s.URL(), s.Authority(), s.GraphURL(), s.TokenURL(), s.Scope()
	out.Admin, out.Tenant, out.ClientID, out.Devices = s.AdminURL(), s.Tenant(), s.ClientID(), s.DeviceCount()
	if *caOut != "" {
		if err := os.WriteFile(*caOut, s.CertPEM, 0o644); err != nil {
			fmt.Fprintln(stderr, "intunesim: -cert-out:", err)
			return 1
		}
		out.CACert = *caOut
	}
	if *envOut != "" {
		lines := s.Env(secret, out.CACert)
		if err := os.WriteFile(*envOut, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
			fmt.Fprintln(stderr, "intunesim: -env-out:", err)
			return 1
		}
		out.EnvFile = *envOut
	}
	out.StartSeconds = time.Since(begin).Seconds()
	line, err := json.Marshal(out)
	if err != nil {
		fmt.Fprintln(stderr, "intunesim:", err)
		return 1
	}
	fmt.Fprintln(stdout, string(line))
	<-ctx.Done()
	return 0
}

// parseMix reads "compliant=0.7,noncompliant=0.1,…"; unnamed shares are 0.
func parseMix(v string) (intunesim.Mix, error) {
	var m intunesim.Mix
	for _, part := range strings.Split(v, ",") {
		name, val, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return m, fmt.Errorf("%q is not name=share", part)
		}
		f, err := strconv.ParseFloat(val, 64)
		if err != nil {
			return m, fmt.Errorf("%q: %v", part, err)
		}
		switch name {
		case "compliant":
			m.Compliant = f
		case "noncompliant":
			m.Noncompliant = f
		case "retired":
			m.Retired = f
		case "no_eas_id":
			m.NoEASID = f
		default:
			return m, fmt.Errorf("unknown share %q (compliant, noncompliant, retired, no_eas_id)", name)
		}
	}
	return m, nil
}
