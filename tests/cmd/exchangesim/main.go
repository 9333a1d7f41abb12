// Command exchangesim runs a simulated on-premises Exchange organisation:
// WS-Man endpoints for its Client Access servers that the real WinRM
// client accepts, a seeded organisation, and an admin API to sync phones,
// inject faults and read what reached "Exchange". On start it prints one
// JSON line with its URLs, then runs until SIGINT or SIGTERM.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/easguard/easguard/tests/exchangesim"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

type endpoint struct {
	Name string `json:"name"`
	FQDN string `json:"fqdn"`
	URL  string `json:"url"`
}

type started struct {
	WSMan        []endpoint `json:"wsman"`
	Admin        string     `json:"admin"`
	User         string     `json:"user"`
	Org          string     `json:"org"`
	Domain       string     `json:"domain"`
	Mailboxes    int        `json:"mailboxes"`
	Partnerships int        `json:"partnerships"`
	CACert       string     `json:"ca_cert,omitempty"`
	StartSeconds float64    `json:"start_seconds"`
}

func run(args []string) int {
	start := time.Now()
	fs := flag.NewFlagSet("exchangesim", flag.ContinueOnError)
	mailboxes := fs.Int("mailboxes", 100, "mailboxes to seed")
	partnerships := fs.Int("partnerships", 200, "partnerships to seed")
	seed := fs.Uint64("seed", 1, "seed of the generated organisation")
	noHostile := fs.Bool("no-hostile", false, "leave hostile values (quotes, $(...), ...) out of the seed")
	childShare := fs.Float64("child-domain-share", 0.1, "share of mailboxes in a child domain")
	cas := fs.String("cas", "EX01,EX02", "comma-separated Client Access server names, primary first")
	https := fs.Bool("https", false, "serve WS-Man over HTTPS with a self-signed certificate")
	certOut := fs.String("cert-out", "", "write the certificate clients should trust to this file (with -https)")
	auth := fs.String("auth", "basic,ntlm", "authentication schemes: basic, ntlm or both")
	allowUnencrypted := fs.Bool("allow-unencrypted", false, "over HTTP accept unencrypted bodies (Basic, NTLM without sealing), like WinRM with AllowUnencrypted=true; by default only NTLM-sealed bodies are accepted")
	user := fs.String("user", exchangesim.DefaultUser, "service account name")
	host := fs.String("host", "127.0.0.1", "address the WS-Man endpoints listen on")
	port := fs.Int("port", 0, "WS-Man port of the first CAS, the next CAS's is one more (0: free ports)")
	publicHost := fs.String("public-host", "", "name clients reach the endpoints by (e.g. a container's name), for -env-out and the certificate")
	admin := fs.String("admin", "127.0.0.1:0", "admin API listen address")
	profile := fs.String("profile", "default", "latency profile: default (realistic), slow (a large organisation through a remote session) or none")
	org := fs.String("org", "Contoso", "Exchange organisation name")
	domain := fs.String("domain", "contoso.com", "forest root domain")
	replication := fs.Duration("replication-delay", 0, "how long a change written through one CAS takes to be seen through the others (Active Directory replication; about 15s within a site)")
	version := fs.String("version", "2019", "Exchange release the organisation runs: 2010 (SP3), 2013, 2016 or 2019")
	defaultAccess := fs.String("default-access", "Allow", "DefaultAccessLevel: Allow, Block or Quarantine")
	hostCulture := fs.String("host-culture", "", "culture of the Windows host the worker runs on, e.g. de-DE (default en-US)")
	hostOffset := fs.Duration("host-utc-offset", 0, "time zone of the Windows host, e.g. 1h")
	languageMode := fs.String("language-mode", "", "PowerShell language mode of the host: FullLanguage (default) or ConstrainedLanguage")
	deserializedEnums := fs.Bool("deserialized-enums", false, "send Exchange's enums as the numbers a remote session deserialises them to")
	altCase := fs.Bool("alt-property-case", false, "spell property names the other way (DeviceID, GUID, FQDN)")
	unspecifiedDates := fs.Bool("unspecified-dates", false, "send Exchange's UTC dates without a zone (DateTimeKind.Unspecified)")
	maxSessions := fs.Int("max-sessions", 18, "remote PowerShell sessions per user (PowerShellMaxConcurrency); -1: unlimited")
	envOut := fs.String("env-out", "", "write the EASGUARD_EXCHANGE_* settings that reach this simulator to this file (mode 0600; it holds the password)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "exchangesim runs a simulated Exchange organisation. The service account's password is taken from EXCHANGESIM_PASSWORD or the file EXCHANGESIM_PASSWORD_FILE names (default: the simulator's documented test password).")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	password := os.Getenv("EXCHANGESIM_PASSWORD")
	if f := os.Getenv("EXCHANGESIM_PASSWORD_FILE"); password == "" && f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			fmt.Fprintln(os.Stderr, "exchangesim: EXCHANGESIM_PASSWORD_FILE:", err)
			return 2
		}
		password = strings.TrimRight(string(b), "\r\n")
	}
	if password == "" {
		password = exchangesim.DefaultPassword
	}
	cfg := exchangesim.Config{
		OrgName: *org, Domain: *domain, HTTPS: *https, Host: *host, Port: *port, PublicHost: *publicHost, AdminAddr: *admin, AllowUnencrypted: *allowUnencrypted,
		Accounts: map[string]string{*user: password}, MaxSessionsPerUser: *maxSessions,
		WorkerHost: exchangesim.Host{Culture: *hostCulture, UTCOffset: *hostOffset, LanguageMode: *languageMode,
			DeserializedEnums: *deserializedEnums, AltPropertyCase: *altCase, UnspecifiedDates: *unspecifiedDates},
		Seed: &exchangesim.SeedSpec{Mailboxes: *mailboxes, Partnerships: *partnerships, Seed: *seed, NoHostile: *noHostile, ChildDomainShare: *childShare},
	}
	v, err := exchangesim.ParseVersion(*version)
	if err != nil {
		fmt.Fprintln(os.Stderr, "exchangesim: -version:", err)
		return 2
	}
	cfg.Version = v
	cfg.ReplicationDelay = *replication
	for _, n := range strings.Split(*cas, ",") {
		if n = strings.TrimSpace(n); n != "" {
			cfg.CAS = append(cfg.CAS, n)
		}
	}
	for _, a := range strings.Split(*auth, ",") {
		switch strings.ToLower(strings.TrimSpace(a)) {
		case "basic":
			cfg.Basic = true
		case "ntlm":
			cfg.NTLM = true
		default:
			fmt.Fprintf(os.Stderr, "exchangesim: -auth: unknown scheme %q (use basic, ntlm)\n", a)
			return 2
		}
	}
	p, err := exchangesim.ProfileByName(*profile)
	if err != nil {
		fmt.Fprintf(os.Stderr, "exchangesim: -profile: %v\n", err)
		return 2
	}
	cfg.Profile = p
	s, err := exchangesim.Start(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "exchangesim:", err)
		return 1
	}
	defer s.Close()
	if err := s.Org.SetDefaultAccessLevel(*defaultAccess); err != nil {
		fmt.Fprintln(os.Stderr, "exchangesim: -default-access:", err)
		return 2
	}
	out := started{Admin: s.AdminURL(), User: *user, Org: *org, Domain: *domain, Mailboxes: len(s.Org.Mailboxes()), Partnerships: s.Org.DeviceCount()}
	for _, e := range s.Endpoints() {
		out.WSMan = append(out.WSMan, endpoint{e.Name, e.FQDN, e.URL()})
	}
	if *https && *certOut != "" {
		if err := os.WriteFile(*certOut, s.CertPEM, 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "exchangesim: -cert-out:", err)
			return 1
		}
		out.CACert = *certOut
	}
	if *envOut != "" {
		if err := writeEnv(*envOut, s, *user, password, out.CACert); err != nil {
			fmt.Fprintln(os.Stderr, "exchangesim: -env-out:", err)
			return 1
		}
	}
	out.StartSeconds = time.Since(start).Seconds()
	line, _ := json.Marshal(out)
	fmt.Println(string(line))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	return 0
}

// writeEnv writes the settings easguard needs to reach this simulator.
func writeEnv(path string, s *exchangesim.Sim, user, password string, caFile string) error {
	lines := s.Env(user, password, caFile)
	return os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600)
}
