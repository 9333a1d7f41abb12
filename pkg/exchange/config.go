package exchange

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/easguard/easguard/pkg/config"
)

// Config is how easguard reaches Exchange. Embed it as a named field
// (Exchange Config) so its variables are EASGUARD_EXCHANGE_*.
type Config struct {
	Server             string        `split_words:"true" desc:"Required. FQDN of the Client Access server easguard connects to first (the primary), e.g. ex01.contoso.com."`
	Port               int           `split_words:"true" desc:"WinRM port; 0 means 5986 with HTTPS and 5985 without."`
	HTTPS              bool          `split_words:"true" default:"true" desc:"Use WinRM over HTTPS (port 5986). Over HTTP (port 5985) NTLM seals every message (WinRM refuses unencrypted bodies by default); Basic needs EASGUARD_EXCHANGE_ALLOW_UNENCRYPTED."`
	Auth               string        `split_words:"true" default:"ntlm" desc:"WinRM authentication: ntlm (a domain account) or basic (a local account)."`
	AllowUnencrypted   bool          `split_words:"true" desc:"Allow Basic over HTTP, which sends the password and every message in clear: only for a lab whose WinRM has AllowUnencrypted=true."`
	User               string        `split_words:"true" desc:"Required. Service account, e.g. CONTOSO\\svc-easguard; it also opens the Exchange session."`
	Password           config.Secret `split_words:"true" secret:"true" desc:"Required. Service account password."`
	InsecureSkipVerify bool          `split_words:"true" desc:"Do not verify the server certificate. Never in production; set EASGUARD_EXCHANGE_CA_BUNDLE instead."`
	CABundle           string        `split_words:"true" desc:"PEM file of the CAs that issued the Exchange servers' certificates (default: the system's)."`
	Proxy              string        `split_words:"true" default:"environment" desc:"HTTP proxy: environment (HTTPS_PROXY/NO_PROXY), none, or a URL."`
	Resolve            string        `split_words:"true" desc:"Comma-separated fqdn=host:port overrides of name resolution, for split DNS or a lab."`
	Mode               string        `split_words:"true" default:"remote" desc:"How the worker reaches Exchange: remote, an explicit-credential session to the /PowerShell endpoint (the only mode: the Exchange snap-in cannot reach Active Directory over WinRM)."`
	PowershellURL      string        `split_words:"true" default:"http://{server}/PowerShell/" desc:"Exchange remote PowerShell URL; {server} is the CAS the worker runs on."`
	PowershellAuth     string        `split_words:"true" default:"Kerberos" desc:"Authentication of the remote session: Kerberos, Negotiate, Basic or Default."`
	Workers            int           `split_words:"true" default:"4" desc:"Persistent PowerShell workers (WinRM shells, each with one Exchange session) per process, at most 8: Exchange allows 18 sessions per user, and the session of a killed worker counts until it expires."`
	SessionBudget      int           `split_words:"true" default:"12" desc:"Exchange sessions all processes of the organisation (every collector and executor replica) may hold together, shared through NATS; at most 18, Exchange's limit per user, and best well below it: the sessions of killed workers and an administrator's own count too."`
	BurstIdle          time.Duration `split_words:"true" default:"1m" desc:"Under a backlog a process opens sessions beyond EASGUARD_EXCHANGE_WORKERS, as many as the shared session budget has free; each extra one is closed, and its slot given back, once it has been idle this long, so an idle organisation does not hold the whole budget."`
	RequestTimeout     time.Duration `split_words:"true" default:"5m" desc:"How long a request may wait for its answer, and a listing for each next page (not for the whole listing); a worker silent for longer is replaced."`
	OperationTimeout   time.Duration `split_words:"true" default:"20s" desc:"WS-Man OperationTimeout: how long one Receive long-poll waits."`
	StartTimeout       time.Duration `split_words:"true" default:"2m" desc:"How long starting a worker (shell, PowerShell, Exchange session) may take."`
	Heartbeat          time.Duration `split_words:"true" default:"1m" desc:"An idle worker is pinged this often (a call through its Exchange session), so a broken one is found before a request needs it and a live one is not closed at the session's two-minute idle timeout; less than 2m."`
	RecycleRequests    int           `split_words:"true" default:"10000" desc:"A worker is replaced after this many requests."`
	RecycleAfter       time.Duration `split_words:"true" default:"2h" desc:"A worker is replaced after this long."`
	CASFailover        bool          `split_words:"true" default:"true" desc:"Discover the organisation's other Client Access servers and fail over to them."`
	BatchSize          int           `split_words:"true" default:"100" desc:"Set-CASMailbox calls sent in one round trip."`
	ListPartitions     int           `split_words:"true" desc:"Parts a full sync's listings (partnerships, and the mailboxes that have them) are split into, read over the workers at once, each part the objects whose DeviceId (Alias) ends in one group of letters and digits, plus one part for the rest; 0 (the default) means two per worker, 1 one listing on one worker (what easguard falls back to by itself where Exchange refuses the parts' filters), at most 36."`
}

// MaxWorkers caps the workers of one process well below Exchange's 18
// remote sessions per user (PowerShellMaxConcurrency): sessions left behind
// by killed workers and an administrator's own session need room too.
const MaxWorkers = 8

// MaxSessionBudget is Exchange's default limit of concurrent remote
// PowerShell sessions per user (PowerShellMaxConcurrency), which the
// shared session budget of an organisation must not exceed.
const MaxSessionBudget = 18

// DefaultSessionBudget is the shared session budget when none is set: well
// below MaxSessionBudget, leaving room for sessions of killed workers
// that have not expired yet and for an administrator's own.
const DefaultSessionBudget = 12

// Sessions returns the organisation's session budget, the default when
// SessionBudget is 0.
func (c *Config) Sessions() int {
	if c.SessionBudget == 0 {
		return DefaultSessionBudget
	}
	return c.SessionBudget
}

// DefaultBurstIdle is BurstIdle when none is set (a Config built in code).
const DefaultBurstIdle = time.Minute

// burstIdle returns how long a session beyond Workers may idle.
func (c *Config) burstIdle() time.Duration {
	if c.BurstIdle == 0 {
		return DefaultBurstIdle
	}
	return c.BurstIdle
}

// SessionIdleTimeout is the idle timeout worker.ps1 opens its Exchange
// session with (New-PSSessionOption -IdleTimeout): a session left behind
// by a killed worker expires after it.
var SessionIdleTimeout = time.Duration(Contract().SessionIdleTimeoutMS()) * time.Millisecond

// options are the validated, derived settings.
type options struct {
	cfg       Config
	primary   target
	transport transportConfig
	connect   connectSettings
}

// Validate checks the settings.
func (c *Config) Validate() error {
	if c.Server == "" {
		return config.Invalid(&c.Server, "is required: the FQDN of a Client Access server")
	}
	if c.User == "" {
		return config.Invalid(&c.User, "is required: the service account easguard connects as")
	}
	if c.Password == "" {
		return config.Invalid(&c.Password, "is required (or set it through a file named by the variable with _FILE appended)")
	}
	if strings.ContainsAny(c.Server, "/: ") {
		return config.Invalid(&c.Server, "%q is not a host name (give the FQDN only, no scheme or port)", c.Server)
	}
	if c.Port < 0 || c.Port > 65535 {
		return config.Invalid(&c.Port, "%d is not a port", c.Port)
	}
	switch strings.ToLower(c.Auth) {
	case "ntlm", "basic":
	default:
		return config.Invalid(&c.Auth, "use ntlm or basic, not %q", c.Auth)
	}
	if strings.EqualFold(c.Auth, "basic") && !c.HTTPS && !c.AllowUnencrypted {
		return config.Invalid(&c.Auth, "basic over HTTP sends the password and every message in clear, and WinRM refuses it unless AllowUnencrypted=true: "+
			"use HTTPS (EASGUARD_EXCHANGE_HTTPS=true) or ntlm (sealed over HTTP), or, only for a lab whose WinRM has AllowUnencrypted=true, set EASGUARD_EXCHANGE_ALLOW_UNENCRYPTED=true")
	}
	switch c.Mode {
	case "remote":
	case "snapin":
		// Over WinRS the logon is a network logon without reusable
		// credentials, so the snap-in's own calls to Active Directory (a
		// second hop) fail; the remote session opens with the password.
		return config.Invalid(&c.Mode, "snapin cannot work: loaded in a WinRM shell, the Exchange snap-in cannot reach Active Directory (a second hop with no credentials to pass on); use remote")
	default:
		return config.Invalid(&c.Mode, "use remote, not %q", c.Mode)
	}
	if c.ListPartitions < 0 || c.ListPartitions > MaxListPartitions {
		return config.Invalid(&c.ListPartitions, "must be 0 to %d, got %d: 0 splits a full listing in two parts per worker, 1 reads it as one listing", MaxListPartitions, c.ListPartitions)
	}
	if c.SessionBudget < 0 || c.SessionBudget > MaxSessionBudget {
		return config.Invalid(&c.SessionBudget, "must be 1 to %d (0: %d), got %d: Exchange allows %d remote sessions per user, for all processes together", MaxSessionBudget, DefaultSessionBudget, c.SessionBudget, MaxSessionBudget)
	}
	if c.Workers < 1 || c.Workers > MaxWorkers {
		return config.Invalid(&c.Workers, "must be 1 to %d, got %d: Exchange allows 18 remote sessions per user, and the session of a worker killed mid-request counts against them until its idle timeout", MaxWorkers, c.Workers)
	}
	if c.BurstIdle < 0 {
		return config.Invalid(&c.BurstIdle, "must be positive (0: %s), got %s", DefaultBurstIdle, c.BurstIdle)
	}
	for _, d := range []*time.Duration{&c.RequestTimeout, &c.OperationTimeout, &c.StartTimeout, &c.Heartbeat, &c.RecycleAfter} {
		if *d <= 0 {
			return config.Invalid(d, "must be positive, got %s", *d)
		}
	}
	if c.Heartbeat >= SessionIdleTimeout {
		return config.Invalid(&c.Heartbeat, "must be shorter than %s, the idle timeout of the workers' Exchange sessions (a heartbeat is what keeps an idle worker's session open), got %s", SessionIdleTimeout, c.Heartbeat)
	}
	if c.OperationTimeout < time.Second || c.OperationTimeout > 60*time.Second {
		return config.Invalid(&c.OperationTimeout, "must be between 1s and 60s (Windows caps it at 60s), got %s", c.OperationTimeout)
	}
	if c.RecycleRequests < 1 {
		return config.Invalid(&c.RecycleRequests, "must be positive")
	}
	if c.BatchSize < 1 || c.BatchSize > 1000 {
		return config.Invalid(&c.BatchSize, "must be 1 to 1000, got %d", c.BatchSize)
	}
	if _, err := c.proxyFunc(); err != nil {
		return config.Invalid(&c.Proxy, "%v", err)
	}
	if _, err := parseResolve(c.Resolve); err != nil {
		return config.Invalid(&c.Resolve, "%v", err)
	}
	if c.CABundle != "" {
		if _, err := c.tlsConfig(); err != nil {
			return config.Invalid(&c.CABundle, "%v", err)
		}
	}
	if !strings.Contains(c.PowershellURL, "://") {
		return config.Invalid(&c.PowershellURL, "%q is not a URL", c.PowershellURL)
	}
	return nil
}

func (c *Config) proxyFunc() (func(*http.Request) (*url.URL, error), error) {
	switch c.Proxy {
	case "", "environment":
		return http.ProxyFromEnvironment, nil
	case "none":
		return nil, nil
	}
	u, err := url.Parse(c.Proxy)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("%q is not environment, none or an http(s) proxy URL", c.Proxy)
	}
	return http.ProxyURL(u), nil
}

func parseResolve(s string) (map[string]string, error) {
	out := map[string]string{}
	for _, e := range strings.Split(s, ",") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		name, addr, ok := strings.Cut(e, "=")
		if _, _, err := net.SplitHostPort(addr); !ok || name == "" || err != nil {
			return nil, fmt.Errorf("entry %q is not fqdn=host:port", e)
		}
		out[strings.ToLower(name)] = addr
	}
	return out, nil
}

func (c *Config) tlsConfig() (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: c.InsecureSkipVerify} //nolint:gosec // explicit, documented opt-out
	if c.CABundle != "" {
		pem, err := os.ReadFile(c.CABundle)
		if err != nil {
			return nil, fmt.Errorf("read CA bundle: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s holds no PEM certificate", c.CABundle)
		}
		tc.RootCAs = pool
	}
	return tc, nil
}

func (c *Config) port() int {
	if c.Port != 0 {
		return c.Port
	}
	if c.HTTPS {
		return 5986
	}
	return 5985
}

// options validates and derives everything a pool needs.
func (c Config) options() (*options, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	tc, err := c.tlsConfig()
	if err != nil {
		return nil, err
	}
	proxy, _ := c.proxyFunc()
	resolve, _ := parseResolve(c.Resolve)
	return &options{
		cfg:     c,
		primary: target{fqdn: strings.ToLower(c.Server), port: c.port()},
		transport: transportConfig{
			https: c.HTTPS, ntlm: strings.EqualFold(c.Auth, "ntlm"), user: c.User, pass: c.Password.Reveal(),
			tls: tc, proxy: proxy, resolve: resolve, opTimeout: c.OperationTimeout,
		},
		connect: connectSettings{mode: c.Mode, psURL: c.PowershellURL, psAuth: c.PowershellAuth, user: c.User, password: c.Password.Reveal(), skipCA: c.InsecureSkipVerify},
	}, nil
}

// ResolveString formats overrides for Config.Resolve.
func ResolveString(m map[string]string) string {
	var parts []string
	for k, v := range m {
		parts = append(parts, k+"="+v)
	}
	return strings.Join(parts, ",")
}
