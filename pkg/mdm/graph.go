package mdm

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/AzureAD/microsoft-authentication-library-for-go/apps/confidential"
	"github.com/cenkalti/backoff/v4"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Graph defaults. The public cloud's endpoints; national clouds (US
// Government, China) set GraphOptions.Authority and GraphURL.
const (
	DefaultGraphAuthority    = "https://login.microsoftonline.com"
	DefaultGraphURL          = "https://graph.microsoft.com/v1.0"
	DefaultGraphPollInterval = 2 * time.Minute
	DefaultGraphFullResync   = 24 * time.Hour
	DefaultGraphMissingAfter = 24 * time.Hour
	// DefaultGraphMaxRetryAfter caps one wait for Retry-After: a throttled
	// poll that would wait longer fails and the next poll tries again.
	DefaultGraphMaxRetryAfter = 5 * time.Minute
	// DefaultGraphAttempts bounds the tries of one request that fails
	// transiently (network, 5xx, 429).
	DefaultGraphAttempts = 6
	// graphMaxPage bounds one page's body; Graph's pages are far smaller.
	graphMaxPage = 64 << 20
)

// GraphSelect are the managedDevice properties easguard reads: what the
// matcher joins on (easDeviceId, the user), what the policy judges
// (compliance, management state, platform, OS version) and what the
// console shows. Graph returns only these, which keeps a 50,000-device
// listing small.
var GraphSelect = []string{
	"id", "userPrincipalName", "emailAddress", "easDeviceId", "easActivated", "complianceState", "managementState",
	"operatingSystem", "osVersion", "model", "manufacturer", "deviceName", "azureADDeviceId", "lastSyncDateTime",
	"deviceActionResults",
}

// ErrGraph is wrapped by every error of a Graph read that failed, so a
// caller can tell "Graph said no" from a configuration error.
var ErrGraph = errors.New("mdm: graph read failed")

// GraphOptions configures a GraphSource.
type GraphOptions struct {
	// Tenant is the Entra ID tenant (its id or a verified domain).
	Tenant string
	// ClientID is the app registration's application id. The app needs
	// the application permission DeviceManagementManagedDevices.Read.All.
	ClientID string
	// ClientSecret, or Certificate (PEM with the certificate and its
	// private key): exactly one. A certificate is what Microsoft
	// recommends for a service.
	ClientSecret string
	Certificate  []byte
	// Authority is the identity endpoint's root (default the public
	// cloud's); the tenant is appended.
	Authority string
	// GraphURL is Graph's root with its version (default v1.0 of the
	// public cloud).
	GraphURL string
	// HTTPClient carries proxy and CA settings to both the identity
	// endpoint and Graph (default: the environment's proxy, the system's CAs).
	HTTPClient *http.Client
	// PollInterval is the time between two complete reads; a compliance
	// change reaches easguard within it (default 2m).
	PollInterval time.Duration
	// FullResync is how often every record is published again, changed
	// or not, to heal anything a lost event left wrong (default 24h).
	FullResync time.Duration
	// MissingAfter is how long a device may be absent from complete reads
	// before it is reported removed (default 24h). Graph says "retired" in
	// managementState; absence alone is weak evidence.
	MissingAfter time.Duration
	// PageSize is the $top of a listing; zero lets Graph choose.
	PageSize int
	// MaxRetryAfter caps a Retry-After wait (default 5m); Attempts bounds
	// the tries of one request (default 6).
	MaxRetryAfter time.Duration
	Attempts      int
	// MassRemovalShare: see FileOptions.
	MassRemovalShare float64
	// Logger receives failures and progress; default slog.Default().
	Logger *slog.Logger
	// MeterProvider receives the source's request counts
	// (easguard.graph.requests); nil: nowhere.
	MeterProvider metric.MeterProvider
	// TracerProvider traces every Graph request as a client span; nil:
	// nowhere.
	TracerProvider trace.TracerProvider
	// Store keeps what the source last delivered and since when each
	// missing device has been missing, beyond this process (default:
	// memory only). With a store, a device deleted in Intune while
	// easguard was down is reported removed MissingAfter after the first
	// read that misses it, and a restart does not start that clock over.
	Store InventoryStore
}

// GraphSource reads Intune's managed devices from Microsoft Graph: a
// complete, paged read of /deviceManagement/managedDevices every poll
// interval, of which only the records that changed become events. A read
// that fails or stops midway publishes nothing and keeps the previous
// view: an outage must never look like every device leaving management.
type GraphSource struct {
	opts   GraphOptions
	tracer trace.Tracer
	// selects is the $select in use: GraphSelect, or without the
	// properties this Graph refused (managementState is documented on
	// beta; whether v1.0 serves it is unconfirmed).
	selects []string
	// cred is kept to start a fresh identity client when Graph refuses
	// a cached token.
	cred    confidential.Credential
	token   *confidential.Client
	client  *http.Client
	scope   string
	running atomic.Bool
	now     func() time.Time
	sleep   func(ctx context.Context, d time.Duration) error
	metrics *graphInstruments
}

// NewGraphSource checks the options and prepares the identity client; it
// does not talk to the network (the first poll does).
func NewGraphSource(opts GraphOptions) (*GraphSource, error) {
	if opts.Tenant == "" || opts.ClientID == "" {
		return nil, fmt.Errorf("graph source: %w: tenant and client id are required", ErrConfig)
	}
	if (opts.ClientSecret == "") == (len(opts.Certificate) == 0) {
		return nil, fmt.Errorf("graph source: %w: give a client secret or a certificate, exactly one", ErrConfig)
	}
	if opts.Authority == "" {
		opts.Authority = DefaultGraphAuthority
	}
	if opts.GraphURL == "" {
		opts.GraphURL = DefaultGraphURL
	}
	for _, u := range []string{opts.Authority, opts.GraphURL} {
		p, err := url.Parse(u)
		if err != nil || p.Scheme != "https" || p.Host == "" {
			return nil, fmt.Errorf("graph source: %w: %q is not an https URL", ErrConfig, u)
		}
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = DefaultGraphPollInterval
	}
	if opts.FullResync <= 0 {
		opts.FullResync = DefaultGraphFullResync
	}
	if opts.MissingAfter <= 0 {
		opts.MissingAfter = DefaultGraphMissingAfter
	}
	if opts.MaxRetryAfter <= 0 {
		opts.MaxRetryAfter = DefaultGraphMaxRetryAfter
	}
	if opts.Attempts <= 0 {
		opts.Attempts = DefaultGraphAttempts
	}
	if opts.HTTPClient == nil {
		opts.HTTPClient = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	}
	g := &GraphSource{opts: opts, selects: slices.Clone(GraphSelect), client: opts.HTTPClient, now: time.Now, sleep: sleepCtx}
	var err error
	g.tracer = noop.NewTracerProvider().Tracer("")
	if opts.TracerProvider != nil {
		g.tracer = opts.TracerProvider.Tracer("github.com/easguard/easguard/pkg/mdm")
	}
	if g.metrics, err = newGraphInstruments(opts.MeterProvider, opts.Tenant); err != nil {
		return nil, err
	}
	root, err := url.Parse(opts.GraphURL)
	if err != nil {
		return nil, fmt.Errorf("graph source: %w: %w", ErrConfig, err)
	}
	g.scope = root.Scheme + "://" + root.Host + "/.default"
	if opts.ClientSecret != "" {
		g.cred, err = confidential.NewCredFromSecret(opts.ClientSecret)
	} else {
		certs, key, perr := confidential.CertFromPEM(opts.Certificate, "")
		if perr != nil {
			return nil, fmt.Errorf("graph source: %w: client certificate: %w", ErrConfig, perr)
		}
		g.cred, err = confidential.NewCredFromCert(certs, key)
	}
	if err != nil {
		return nil, fmt.Errorf("graph source: %w: %w", ErrConfig, err)
	}
	if err := g.newTokenClient(g.cred); err != nil {
		return nil, err
	}
	return g, nil
}

// GraphHTTPClient builds the HTTP client of a Graph source: proxy
// "environment" (HTTPS_PROXY/NO_PROXY), "none" or a URL, and an optional
// PEM bundle of extra CAs (a lab's, or a TLS-inspecting proxy's).
func GraphHTTPClient(proxy, caFile string, timeout time.Duration) (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	switch proxy {
	case "", "environment":
		tr.Proxy = http.ProxyFromEnvironment
	case "none":
		tr.Proxy = nil
	default:
		u, err := url.Parse(proxy)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("graph proxy %q: %w: not a URL", proxy, ErrConfig)
		}
		tr.Proxy = http.ProxyURL(u)
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("graph CA bundle: %w: %w", ErrConfig, err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("graph CA bundle %s: %w: no certificate in it", caFile, ErrConfig)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return &http.Client{Transport: tr, Timeout: timeout}, nil
}

func (g *GraphSource) newTokenClient(cred confidential.Credential) error {
	authority := strings.TrimRight(g.opts.Authority, "/") + "/" + url.PathEscape(g.opts.Tenant)
	c, err := confidential.New(authority, g.opts.ClientID, cred,
		confidential.WithHTTPClient(g.client),
		// The authority is given, not discovered: national clouds and
		// labs have their own, and discovery would call the public cloud.
		confidential.WithInstanceDiscovery(false))
	if err != nil {
		return fmt.Errorf("graph source: %w: %w", ErrConfig, err)
	}
	g.token = &c
	return nil
}

// Name identifies the source: "graph:<tenant>".
func (g *GraphSource) Name() string { return "graph:" + g.opts.Tenant }

// Run polls Graph until ctx ends. The first poll publishes every record
// (with a Store: every record that differs from what the store holds);
// later polls publish what changed; every FullResync all records again.
func (g *GraphSource) Run(ctx context.Context, sink Sink) error {
	if sink == nil {
		return fmt.Errorf("run %s: %w: nil sink", g.Name(), ErrConfig)
	}
	if !g.running.CompareAndSwap(false, true) {
		return fmt.Errorf("run %s: %w", g.Name(), ErrAlreadyRunning)
	}
	defer g.running.Store(false)
	log := logger(g.opts.Logger).With("source", g.Name())
	rec := newReconciler(fmt.Sprintf("Graph tenant %q", g.opts.Tenant), g.Name(), g.opts.MassRemovalShare, sink, log)
	rec.missingAfter, rec.now, rec.store = g.opts.MissingAfter, g.now, g.opts.Store
	var lastResync time.Time
	for {
		start := g.now()
		if stop := g.poll(ctx, rec, start, &lastResync); stop {
			return nil
		}
		if err := g.sleep(ctx, g.opts.PollInterval); err != nil {
			return nil
		}
	}
}

// poll reads Graph once and hands what changed to the reconciler, in a
// trace of its own ("graph poll"): its Graph requests and the MDM records
// it publishes share it, and a device's journey links to it when such a
// record reaches the matcher (one read serves every device it lists, so it
// is a link from each phone's trace, not a part of one). stop is true when
// ctx ended.
func (g *GraphSource) poll(ctx context.Context, rec *reconciler, start time.Time, lastResync *time.Time) (stop bool) {
	log := logger(g.opts.Logger).With("source", g.Name())
	ctx, span := g.tracer.Start(ctx, "graph poll", trace.WithAttributes(attribute.String("easguard.mdm.source", g.Name())))
	defer span.End()
	devices, err := g.Read(ctx)
	switch {
	case ctx.Err() != nil:
		return true
	case err != nil:
		span.RecordError(err)
		span.SetStatus(codes.Error, "graph read failed")
		rec.failed(ctx, err)
		return false
	}
	span.SetAttributes(attribute.Int("easguard.mdm.devices", len(devices)))
	inv, err := newInventory(devices)
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, "graph listing refused")
		rec.failed(ctx, err)
		return false
	}
	resync := !lastResync.IsZero() && start.Sub(*lastResync) >= g.opts.FullResync
	if err := rec.apply(ctx, inv, resync); err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, "mdm changes not delivered")
		log.WarnContext(ctx, "mdm changes not delivered; offered again with the next poll", "error", err)
		return false
	}
	if resync || lastResync.IsZero() {
		*lastResync = start
	}
	log.InfoContext(ctx, "graph poll", "devices", len(devices), "duration", g.now().Sub(start), "resync", resync)
	return false
}

// graphPage is one page of a Graph collection.
type graphPage struct {
	Value    []ManagedDevice `json:"value"`
	NextLink string          `json:"@odata.nextLink"`
}

// Read makes one complete read of the managed devices, following
// @odata.nextLink to the end, and normalises them. Any failure fails the
// whole read: a partial listing is never returned.
func (g *GraphSource) Read(ctx context.Context) ([]*ev.MDMDevice, error) {
	devices, err := g.read(ctx)
	var se *statusError
	if errors.As(err, &se) && se.status == http.StatusBadRequest && slices.Contains(g.selects, "managementState") &&
		strings.Contains(strings.ToLower(se.msg), "managementstate") {
		// This Graph does not know the property: read without it. A
		// retire is then seen when the device leaves the listing.
		logger(g.opts.Logger).WarnContext(ctx, "Graph refused $select=managementState; reading without it (use the beta endpoint to see retire states at once)",
			"source", g.Name(), "graph", g.opts.GraphURL, "error", err)
		g.selects = slices.DeleteFunc(g.selects, func(p string) bool { return p == "managementState" })
		return g.read(ctx)
	}
	return devices, err
}

func (g *GraphSource) read(ctx context.Context) ([]*ev.MDMDevice, error) {
	q := url.Values{"$select": {strings.Join(g.selects, ",")}}
	if g.opts.PageSize > 0 {
		q.Set("$top", strconv.Itoa(g.opts.PageSize))
	}
	// $filter is not sent: Graph ignores most filters on managedDevices
	// silently, so filtering is done here.
	next := strings.TrimRight(g.opts.GraphURL, "/") + "/deviceManagement/managedDevices?" + q.Encode()
	var out []*ev.MDMDevice
	for page := 1; next != ""; page++ {
		var p graphPage
		if err := g.get(ctx, next, &p); err != nil {
			return nil, fmt.Errorf("%w: page %d of managedDevices: %w", ErrGraph, page, err)
		}
		for i := range p.Value {
			d, err := Normalize(g.Name(), p.Value[i])
			if err != nil {
				// One record easguard cannot use does not stop the others;
				// it counts as missing, which MissingAfter covers.
				logger(g.opts.Logger).WarnContext(ctx, "graph record skipped", "source", g.Name(), "page", page, "error", err)
				continue
			}
			out = append(out, d)
		}
		next = p.NextLink
	}
	return out, nil
}

// statusError is an HTTP answer that is not 200.
type statusError struct {
	status     int
	code, msg  string
	retryAfter time.Duration
}

func (e *statusError) Error() string {
	s := fmt.Sprintf("HTTP %d", e.status)
	if e.code != "" {
		s += " " + e.code
	}
	if e.msg != "" {
		s += ": " + e.msg
	}
	switch e.status {
	case http.StatusUnauthorized:
		s += " (the app's token was refused)"
	case http.StatusForbidden:
		s += " (the app registration needs the application permission DeviceManagementManagedDevices.Read.All, admin-consented)"
	}
	return s
}

// get fetches one URL into v: 429 and 503 wait exactly Retry-After, other
// transient failures back off exponentially, a refused token is renewed
// once; anything else fails at once.
func (g *GraphSource) get(ctx context.Context, target string, v any) error {
	bo := backoff.NewExponentialBackOff(backoff.WithInitialInterval(500*time.Millisecond), backoff.WithMaxInterval(30*time.Second), backoff.WithMaxElapsedTime(0))
	renewed := false
	var last error
	for attempt := 1; attempt <= g.opts.Attempts; attempt++ {
		err := g.getOnce(ctx, target, v)
		if err == nil {
			return nil
		}
		last = err
		var se *statusError
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.As(err, &se) && se.status == http.StatusUnauthorized && !renewed:
			renewed = true
			if rerr := g.renewToken(); rerr != nil {
				return rerr
			}
			continue
		case errors.As(err, &se) && (se.status == http.StatusTooManyRequests || se.status == http.StatusServiceUnavailable) && se.retryAfter > 0:
			if se.retryAfter > g.opts.MaxRetryAfter {
				return fmt.Errorf("%w; Retry-After %s is longer than the %s easguard waits", err, se.retryAfter, g.opts.MaxRetryAfter)
			}
			if serr := g.sleep(ctx, se.retryAfter); serr != nil {
				return serr
			}
			continue
		case errors.As(err, &se) && se.status < 500 && se.status != http.StatusTooManyRequests && se.status != http.StatusRequestTimeout:
			return err // a 4xx will not fix itself
		case errors.Is(err, errMalformed):
			return err
		}
		if attempt < g.opts.Attempts {
			if serr := g.sleep(ctx, bo.NextBackOff()); serr != nil {
				return serr
			}
		}
	}
	return fmt.Errorf("gave up after %d attempts: %w", g.opts.Attempts, last)
}

// errMalformed marks a body that is not the JSON Graph promises.
var errMalformed = errors.New("malformed response")

func (g *GraphSource) getOnce(ctx context.Context, target string, v any) (err error) {
	tok, err := g.token.AcquireTokenByCredential(ctx, []string{g.scope})
	if err != nil {
		return fmt.Errorf("token from %s for tenant %s: %w", g.opts.Authority, g.opts.Tenant, err)
	}
	defer func() {
		if ctx.Err() == nil {
			g.metrics.record(ctx, err)
		}
	}()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+tok.AccessToken)
	req.Header.Set("Accept", "application/json")
	ctx, span := g.tracer.Start(ctx, "GET graph managedDevices", trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(
		attribute.String("http.request.method", http.MethodGet), attribute.String("server.address", req.URL.Hostname()), attribute.String("url.path", req.URL.Path)))
	defer func() {
		if err != nil {
			span.RecordError(err)
			span.SetStatus(codes.Error, err.Error())
		}
		span.End()
	}()
	resp, err := g.client.Do(req.WithContext(ctx))
	if err != nil {
		return err
	}
	span.SetAttributes(attribute.Int("http.response.status_code", resp.StatusCode))
	defer resp.Body.Close()
	body := io.LimitReader(resp.Body, graphMaxPage)
	if resp.StatusCode != http.StatusOK {
		se := &statusError{status: resp.StatusCode, retryAfter: parseRetryAfter(resp.Header.Get("Retry-After"), g.now())}
		var ge struct {
			Error struct{ Code, Message string } `json:"error"`
		}
		if raw, _ := io.ReadAll(io.LimitReader(body, 64<<10)); json.Unmarshal(raw, &ge) == nil {
			se.code, se.msg = ge.Error.Code, ge.Error.Message
		}
		return se
	}
	if err := json.NewDecoder(body).Decode(v); err != nil {
		return fmt.Errorf("%w: %w", errMalformed, err)
	}
	return nil
}

// renewToken drops the cached token by starting a fresh identity client
// with the same credential.
func (g *GraphSource) renewToken() error {
	return g.newTokenClient(g.cred)
}

// parseRetryAfter reads Retry-After as seconds or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(v); err == nil && n >= 0 {
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
