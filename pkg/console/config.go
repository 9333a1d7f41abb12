package console

import (
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
)

// Config is the console's and the API's configuration (EASGUARD_CONSOLE_*).
// The console is off unless Addr is set; once on, nobody reaches it without
// signing in, so at least one way to sign in must be configured.
type Config struct {
	Addr        string   `split_words:"true" desc:"Listen address of the web console and /api/v1 (e.g. 127.0.0.1:8443); empty: no console. Beyond loopback it needs TLS (EASGUARD_CONSOLE_TLS_CERT_FILE) or EASGUARD_CONSOLE_BEHIND_PROXY."`
	PublicURL   string   `split_words:"true" desc:"The URL users reach the console at (https://easguard.contoso.com), for the OpenID Connect redirect and the Origin check. Empty: http(s)://EASGUARD_CONSOLE_ADDR."`
	TLSCertFile string   `split_words:"true" desc:"PEM certificate (chain) the console serves HTTPS with; with EASGUARD_CONSOLE_TLS_KEY_FILE."`
	TLSKeyFile  string   `split_words:"true" desc:"PEM private key of EASGUARD_CONSOLE_TLS_CERT_FILE."`
	BehindProxy bool     `split_words:"true" desc:"A reverse proxy in front terminates TLS: the console listens in plain HTTP but marks its cookies Secure and takes the client's address from X-Forwarded-For."`
	Orgs        []string `split_words:"true" desc:"Organisations the console shows and acts on, comma-separated (one cluster can serve several). Empty: EASGUARD_ORG."`

	OIDCIssuer           string        `split_words:"true" desc:"OpenID Connect issuer URL (Entra ID: https://login.microsoftonline.com/<tenant>/v2.0). Empty: no single sign-on."`
	OIDCClientID         string        `split_words:"true" desc:"The console's client (application) id at the issuer."`
	OIDCClientSecret     config.Secret `split_words:"true" secret:"true" desc:"The console's client secret at the issuer (a confidential client; the code flow also uses PKCE)."`
	OIDCScopes           []string      `split_words:"true" default:"openid,profile,email" desc:"Scopes the console asks for; add groups for a provider that sends the groups claim only when asked."`
	OIDCRolesClaim       string        `split_words:"true" default:"roles" desc:"ID token claim holding the user's app roles or groups: roles (Entra app roles) or groups."`
	OIDCViewerRoles      []string      `split_words:"true" default:"Easguard.Viewer" desc:"Claim values (app role values or group ids) that make a user a viewer: they read everything and change nothing."`
	OIDCOperatorRoles    []string      `split_words:"true" default:"Easguard.Operator" desc:"Claim values that make a user an operator: syncs, guard approvals, judging again, dead letters, policy previews."`
	OIDCDeviceAdminRoles []string      `split_words:"true" default:"Easguard.DeviceAdmin" desc:"Claim values that make a user a device administrator: an operator who may also remove partnerships and wipe devices (where the organisation's executor allows it)."`

	LocalUsersFile string        `split_words:"true" desc:"Break-glass sign-in for labs and outages of the identity provider: a file of lines 'name role bcrypt-hash' (role viewer, operator or device-admin; easguard hash-password makes the hash)."`
	TokensFile     string        `split_words:"true" desc:"API tokens for automation: a file of lines 'name role sha256-hex-of-token' (easguard hash-password --token makes one). Sent as Authorization: Bearer <token>."`
	SessionTTL     time.Duration `split_words:"true" default:"8h" desc:"How long a console sign-in lasts (at most 24h); sessions live in JetStream, so every replica of the console knows them and signing out ends them everywhere."`
	TraceURL       string        `split_words:"true" desc:"Link from a device's history to its trace: a URL with {trace_id}, e.g. http://jaeger:16686/trace/{trace_id}. Empty: no link."`
}

// DefaultSessionTTL is SessionTTL's default.
const DefaultSessionTTL = 8 * time.Hour

// sessionBucketTTL bounds SessionTTL: the session bucket forgets every key
// after it, whatever a session says.
const sessionBucketTTL = 24 * time.Hour

// Enabled reports whether the console is to be served.
func (c *Config) Enabled() bool { return c.Addr != "" }

// Validate checks the settings; a console that nobody could sign in to, or
// that would send sessions in clear text across a network, does not start.
func (c *Config) Validate() error {
	if !c.Enabled() {
		return nil
	}
	if _, _, err := net.SplitHostPort(c.Addr); err != nil {
		return config.Invalid(&c.Addr, "%q is not host:port", c.Addr)
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		return config.Invalid(&c.TLSCertFile, "give the certificate and EASGUARD_CONSOLE_TLS_KEY_FILE, or neither")
	}
	if c.TLSCertFile != "" && c.BehindProxy {
		return config.Invalid(&c.BehindProxy, "the console serves TLS itself (EASGUARD_CONSOLE_TLS_CERT_FILE); a proxy that terminates TLS needs neither set")
	}
	if c.TLSCertFile == "" && !c.BehindProxy && !isLoopback(c.Addr) {
		return config.Invalid(&c.Addr, "%q accepts connections from other machines in plain HTTP, which would carry sign-ins and sessions in clear text: set EASGUARD_CONSOLE_TLS_CERT_FILE and _KEY_FILE, or EASGUARD_CONSOLE_BEHIND_PROXY=true behind a TLS proxy, or listen on loopback", c.Addr)
	}
	if c.PublicURL != "" {
		u, err := url.Parse(c.PublicURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return config.Invalid(&c.PublicURL, "%q is not an http(s) URL", c.PublicURL)
		}
	}
	for _, o := range c.Orgs {
		if _, err := bus.ParseOrg(o); err != nil {
			return config.Invalid(&c.Orgs, "%v", err)
		}
	}
	if c.OIDCIssuer == "" && c.LocalUsersFile == "" && c.TokensFile == "" {
		return config.Invalid(&c.Addr, "the console has no way to sign in: set EASGUARD_CONSOLE_OIDC_ISSUER, EASGUARD_CONSOLE_LOCAL_USERS_FILE or EASGUARD_CONSOLE_TOKENS_FILE")
	}
	if c.OIDCIssuer != "" {
		if u, err := url.Parse(c.OIDCIssuer); err != nil || u.Scheme == "" || u.Host == "" {
			return config.Invalid(&c.OIDCIssuer, "%q is not a URL", c.OIDCIssuer)
		}
		if c.OIDCClientID == "" {
			return config.Invalid(&c.OIDCClientID, "is required with EASGUARD_CONSOLE_OIDC_ISSUER")
		}
		if c.OIDCRolesClaim == "" {
			return config.Invalid(&c.OIDCRolesClaim, "must name the claim that carries roles or groups")
		}
	}
	if c.SessionTTL < time.Minute || c.SessionTTL > sessionBucketTTL {
		return config.Invalid(&c.SessionTTL, "must be between 1m and 24h, got %s", c.SessionTTL)
	}
	if c.TraceURL != "" && !strings.Contains(c.TraceURL, "{trace_id}") {
		return config.Invalid(&c.TraceURL, "must contain {trace_id}")
	}
	if c.LocalUsersFile != "" {
		if _, err := loadLocalUsers(c.LocalUsersFile); err != nil {
			return config.Invalid(&c.LocalUsersFile, "%v", err)
		}
	}
	if c.TokensFile != "" {
		if _, err := loadTokens(c.TokensFile); err != nil {
			return config.Invalid(&c.TokensFile, "%v", err)
		}
	}
	return nil
}

func (c *Config) orgNames(defaultOrg string) []string {
	if len(c.Orgs) == 0 {
		return []string{defaultOrg}
	}
	return c.Orgs
}

// publicURL is where browsers reach the console.
func (c *Config) publicURL(bound string) string {
	if c.PublicURL != "" {
		return strings.TrimRight(c.PublicURL, "/")
	}
	scheme := "http"
	if c.TLSCertFile != "" || c.BehindProxy {
		scheme = "https"
	}
	return fmt.Sprintf("%s://%s", scheme, bound)
}

func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
