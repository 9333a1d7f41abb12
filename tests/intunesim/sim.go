// Package intunesim is a simulated Microsoft Entra ID token service and
// Microsoft Graph (Intune managedDevices) for easguard's tests, benchmarks
// and demo. It is what the Microsoft Authentication Library for Go (a
// confidential client with a custom authority and instance discovery
// disabled) and a plain net/http Graph client really talk to:
//
//   - one HTTPS listener (a self-signed certificate for 127.0.0.1,
//     localhost and ::1, generated at start; CertPEM is the CA bundle)
//     serves the authority and Graph, e.g. https://127.0.0.1:PORT;
//   - GET /{tenant}/v2.0/.well-known/openid-configuration,
//     GET /{tenant}/discovery/v2.0/keys and
//     POST /{tenant}/oauth2/v2.0/token (client_credentials with a client
//     secret or a certificate-signed client assertion), answering errors
//     as Entra does ({"error":"invalid_client","error_description":
//     "AADSTS7000215: …"});
//   - GET /v1.0/deviceManagement/managedDevices[/{id}] (and /beta/…) with a
//     bearer token, $select, $top, paging by @odata.nextLink, $filter
//     silently ignored (and recorded), and Graph's error bodies.
//
// The devices are derived from the same organisation package exchangesim
// generates for a SeedSpec (see Mix and Classify), plus Config.Extra
// synthetic ones for load. A plain-HTTP admin API (AdminHandler) and the
// same operations as Go methods enrol, change, retire and delete devices,
// inject faults (throttling with Retry-After, 503, 500, a malformed page,
// slow pages, a failing token endpoint; optionally only at page k of a
// listing) and read every request received, with its time.
//
// Paging is by key: the list is sorted by id and $skiptoken names the last
// id served (and the page number), so the next page starts after that id.
// A device present for the whole listing is returned exactly once; one
// enrolled meanwhile appears iff its id sorts after the cursor; a deleted
// one stops appearing; a changed one shows its state when its page was
// served.
//
// Facts come from ../../../shared/reference/exchange.md §15 and the MSAL
// Go v1.10.1 source; choices without a source say UNCONFIRMED next to them.
package intunesim

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/easguard/easguard/tests/exchangesim"
)

// Defaults of a simulator started without a tenant, application or secret.
const (
	DefaultTenant       = "6d1e7f0a-3c2b-4e58-9a41-7b5c0d2e8f13"
	DefaultClientID     = "b3f2a6c4-81d9-4e7a-a5c0-2e9d7f1b4c68"
	DefaultClientSecret = "iSim8Q~easguard.intunesim-test-secret.0001"
	// GraphAppID is Microsoft Graph's application id; a scope of
	// "<GraphAppID>/.default" names Graph as well as its URL does.
	GraphAppID = "00000003-0000-0000-c000-000000000000"
	// RoleRead and RoleReadWrite are the application permissions that
	// allow listing managed devices [D36].
	RoleRead      = "DeviceManagementManagedDevices.Read.All"
	RoleReadWrite = "DeviceManagementManagedDevices.ReadWrite.All"
)

// Config describes the simulated tenant. The zero Config is a tenant
// DefaultTenant with one application (DefaultClientID, DefaultClientSecret)
// granted RoleRead, no devices, on a free loopback port.
type Config struct {
	// Tenant is the directory (tenant) id in authority paths (default
	// DefaultTenant). Compared case-insensitively, as MSAL lower-cases
	// the authority.
	Tenant string
	// ClientID, ClientSecret: the one application registration. An
	// empty ClientSecret means DefaultClientSecret.
	ClientID     string
	ClientSecret string
	// ClientCertPEM holds the application's registered certificate(s)
	// (RSA, PEM); client assertions must be signed by one of their keys.
	// Empty: no certificate is registered and assertions are refused.
	ClientCertPEM []byte
	// Roles are the application permissions granted (default RoleRead);
	// Graph answers 403 to an application without RoleRead or RoleReadWrite.
	Roles []string
	// Resources are the resources a "<resource>/.default" scope may name;
	// default: the simulator's own root URL (https://127.0.0.1:PORT, or
	// whatever host name the request used), https://graph.microsoft.com
	// and GraphAppID.
	Resources []string

	// Addr is the HTTPS listen address (default 127.0.0.1:0).
	Addr string
	// Certificate is the server certificate; nil means a fresh self-signed
	// one for 127.0.0.1, localhost, ::1 and Addr's host.
	Certificate *tls.Certificate
	// AdminAddr is the plain-HTTP admin API's listen address; "" = none.
	AdminAddr string
	// PublicHost is the name clients reach Addr by (a container's name),
	// when it is not Addr's host: the authority URL and the self-signed
	// certificate use it. Empty: Addr's host.
	PublicHost string

	// Seed, when set, derives the devices from the organisation
	// exchangesim builds for the same SeedSpec; Domain must then be the
	// exchangesim organisation's domain (default contoso.com).
	Seed   *exchangesim.SeedSpec
	Domain string
	// Mix chooses which partnerships get which record; nil = DefaultMix.
	Mix *Mix
	// Extra adds that many synthetic devices (users intune.extraN@Domain).
	Extra int

	// PageSize is the page size without $top. UNCONFIRMED: Intune's real
	// default page size is not documented (reference §15); default 1000.
	PageSize int
	// MaxPageSize caps $top. UNCONFIRMED, default 1000.
	MaxPageSize int
	// TokenLifetime is an access token's lifetime (default 3599 s, the
	// expires_in Entra usually answers). MSAL treats a token that expires
	// within 5 minutes as expired, so a shorter lifetime makes every
	// AcquireTokenByCredential fetch a new one.
	TokenLifetime time.Duration
	// StrictV1 hides managementState from /v1.0 (it stays on /beta):
	// $select=managementState on /v1.0 is then a 400. Whether v1.0 has
	// the property is UNCONFIRMED (reference §15), so a client should be
	// tested both ways.
	StrictV1 bool
	// EASIDCase is how seeded records spell easDeviceId relative to
	// Exchange's DeviceId: "" (verbatim), "upper" or "lower". UNCONFIRMED
	// whether Intune preserves the case Exchange shows.
	EASIDCase string
	// Now is the simulator's clock (default time.Now): token expiry and
	// the times the admin operations stamp.
	Now func() time.Time
	// RecorderSize is how many requests the recorder keeps (default 100,000).
	RecorderSize int
}

// Sim is a running simulated tenant.
type Sim struct {
	// CertPEM is the server certificate clients should trust (a CA bundle).
	CertPEM  []byte
	Recorder *Recorder

	cfg              Config
	defaultResources bool
	userSeed         uint64 // seed of the userId of a user (the SeedSpec's)
	mix              Mix
	clientCerts      []*x509.Certificate
	signKey          *ecdsa.PrivateKey
	keyID            string

	url      string
	srv      *http.Server
	admin    *http.Server
	adminURL string

	mu       sync.RWMutex
	sorted   []*Device            // by ID
	byID     map[string]*Device   // lower-case ID
	byEAS    map[string][]*Device // lower-case easDeviceId
	tokens   map[string]*token
	tokenCnt atomic.Int64

	faultMu sync.Mutex
	faults  []*activeFault
}

// Start builds the tenant and its devices and starts the listeners.
func Start(cfg Config) (*Sim, error) {
	if cfg.Tenant == "" {
		cfg.Tenant = DefaultTenant
	}
	if cfg.ClientID == "" {
		cfg.ClientID = DefaultClientID
	}
	if cfg.ClientSecret == "" {
		cfg.ClientSecret = DefaultClientSecret
	}
	if cfg.Roles == nil {
		cfg.Roles = []string{RoleRead}
	}
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.Domain == "" {
		cfg.Domain = "contoso.com"
	}
	if cfg.PageSize <= 0 {
		cfg.PageSize = 1000
	}
	if cfg.MaxPageSize <= 0 {
		cfg.MaxPageSize = 1000
	}
	if cfg.TokenLifetime <= 0 {
		cfg.TokenLifetime = 3599 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.RecorderSize <= 0 {
		cfg.RecorderSize = 100_000
	}
	switch cfg.EASIDCase {
	case "", "upper", "lower":
	default:
		return nil, fmt.Errorf("intunesim: EASIDCase must be \"\", upper or lower, not %q", cfg.EASIDCase)
	}
	if cfg.Extra < 0 {
		return nil, errors.New("intunesim: Extra must not be negative")
	}
	s := &Sim{cfg: cfg, mix: DefaultMix(), Recorder: NewRecorder(cfg.RecorderSize), byID: map[string]*Device{},
		byEAS: map[string][]*Device{}, tokens: map[string]*token{}}
	if cfg.Mix != nil {
		s.mix = *cfg.Mix
	}
	if err := s.mix.validate(); err != nil {
		return nil, err
	}
	var err error
	if len(cfg.ClientCertPEM) > 0 {
		if s.clientCerts, err = parseClientCerts(cfg.ClientCertPEM); err != nil {
			return nil, err
		}
	}
	if s.signKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		return nil, fmt.Errorf("intunesim: token signing key: %w", err)
	}
	s.keyID = thumbprintOfKey(&s.signKey.PublicKey)
	if err := s.populate(); err != nil {
		return nil, err
	}

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("intunesim listen %s: %w", cfg.Addr, err)
	}
	tlsCert := cfg.Certificate
	if tlsCert != nil {
		s.CertPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: tlsCert.Certificate[0]})
	} else {
		host, _, _ := net.SplitHostPort(ln.Addr().String())
		tlsCert, s.CertPEM, err = selfSigned("localhost", "127.0.0.1", "::1", host, cfg.PublicHost)
		if err != nil {
			ln.Close()
			return nil, err
		}
	}
	s.url = "https://" + ln.Addr().String()
	if cfg.PublicHost != "" {
		_, port, _ := net.SplitHostPort(ln.Addr().String())
		s.url = "https://" + net.JoinHostPort(cfg.PublicHost, port)
	}
	if s.cfg.Resources == nil {
		s.cfg.Resources = []string{s.url, "https://graph.microsoft.com", GraphAppID}
		s.defaultResources = true
	}
	s.srv = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{*tlsCert}, MinVersion: tls.VersionTLS12}}
	go func() { _ = s.srv.ServeTLS(ln, "", "") }()

	if cfg.AdminAddr != "" {
		aln, err := net.Listen("tcp", cfg.AdminAddr)
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("intunesim admin listen: %w", err)
		}
		s.admin = &http.Server{Handler: s.AdminHandler(), ReadHeaderTimeout: 5 * time.Second}
		s.adminURL = "http://" + aln.Addr().String()
		go func() { _ = s.admin.Serve(aln) }()
	}
	return s, nil
}

// populate builds the seeded and extra devices.
func (s *Sim) populate() error {
	now := s.cfg.Now().UTC()
	var list []*Device
	seed := uint64(1)
	if s.cfg.Seed != nil {
		seed = s.cfg.Seed.Seed
		var err error
		if list, err = seedDevices(*s.cfg.Seed, s.cfg.Domain, s.mix, now); err != nil {
			return fmt.Errorf("intunesim seed: %w", err)
		}
	}
	s.userSeed = seed
	if s.cfg.Extra > 0 {
		list = append(list, extraDevices(s.cfg.Extra, seed, s.cfg.Domain, s.mix, now)...)
	}
	for _, d := range list {
		switch s.cfg.EASIDCase {
		case "upper":
			d.EASDeviceID = strings.ToUpper(d.EASDeviceID)
		case "lower":
			d.EASDeviceID = strings.ToLower(d.EASDeviceID)
		}
	}
	slices.SortFunc(list, func(a, b *Device) int { return strings.Compare(a.ID, b.ID) })
	list = slices.CompactFunc(list, func(a, b *Device) bool { return a.ID == b.ID })
	s.sorted = list
	for _, d := range list {
		s.byID[d.ID] = d
		if d.EASDeviceID != "" {
			k := strings.ToLower(d.EASDeviceID)
			s.byEAS[k] = append(s.byEAS[k], d)
		}
	}
	return nil
}

// URL is the listener's base URL, https://127.0.0.1:PORT: the authority
// host (MSAL's authority is URL()+"/"+tenant) and Graph's root.
func (s *Sim) URL() string { return s.url }

// Authority is the authority URL for MSAL: URL()/{tenant}.
func (s *Sim) Authority() string { return s.url + "/" + s.cfg.Tenant }

// GraphURL is Graph's v1.0 base URL, URL()/v1.0.
func (s *Sim) GraphURL() string { return s.url + "/v1.0" }

// Scope is the client-credentials scope for this Graph: URL()/.default.
func (s *Sim) Scope() string { return s.url + "/.default" }

// TokenURL is the v2.0 token endpoint.
func (s *Sim) TokenURL() string { return s.url + "/" + s.cfg.Tenant + "/oauth2/v2.0/token" }

// AdminURL is the admin API's base URL ("" without one).
func (s *Sim) AdminURL() string { return s.adminURL }

// Tenant is the tenant id.
func (s *Sim) Tenant() string { return s.cfg.Tenant }

// ClientID is the application's client id.
func (s *Sim) ClientID() string { return s.cfg.ClientID }

// ClientSecret is the application's client secret.
func (s *Sim) ClientSecret() string { return s.cfg.ClientSecret }

// HTTPClient returns a client that trusts exactly CertPEM.
func (s *Sim) HTTPClient() *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(s.CertPEM)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return &http.Client{Transport: tr, Timeout: time.Minute}
}

// Env returns the EASGUARD_MDM_GRAPH_* settings that reach this simulator,
// as NAME=value lines for a separate easguard process. caFile is the PEM
// file of CertPEM; an empty secret or caFile leaves its line out.
func (s *Sim) Env(secret, caFile string) []string {
	lines := []string{
		"EASGUARD_MDM_GRAPH_TENANT=" + s.cfg.Tenant,
		"EASGUARD_MDM_GRAPH_CLIENT_ID=" + s.cfg.ClientID,
	}
	if secret != "" {
		lines = append(lines, "EASGUARD_MDM_GRAPH_CLIENT_SECRET="+secret)
	}
	lines = append(lines, "EASGUARD_MDM_GRAPH_AUTHORITY="+s.url, "EASGUARD_MDM_GRAPH_URL="+s.GraphURL())
	if caFile != "" {
		lines = append(lines, "EASGUARD_MDM_GRAPH_CA_BUNDLE="+caFile)
	}
	return lines
}

// Close stops both listeners.
func (s *Sim) Close() {
	if s.srv != nil {
		_ = s.srv.Close()
	}
	if s.admin != nil {
		_ = s.admin.Close()
	}
}

func (s *Sim) now() time.Time { return s.cfg.Now().UTC() }
