package pipeline

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/health"
	"github.com/easguard/easguard/pkg/mdm"
	"github.com/easguard/easguard/pkg/service"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// MDMConfig configures the MDM sources.
type MDMConfig struct {
	File             string        `split_words:"true" desc:"MDM inventory file (JSON: an array or Graph's {\"value\":[…]} of managedDevice objects; CSV with managedDevice field names as header), re-read when it changes (file events, and a poll every 30 s for shares without them: a poll of unchanged content hashes the file and parses nothing)."`
	FileFormat       string        `split_words:"true" default:"auto" desc:"Format of the inventory file: auto (by extension), json or csv."`
	MassRemovalShare float64       `split_words:"true" default:"0.5" desc:"An inventory read that would remove more than this share of the known devices removes none and raises an alert (an MDM export that came out empty must not block everyone)."`
	WebhookAddr      string        `split_words:"true" desc:"Listen address of the MDM webhook (POST /mdm/webhook, HMAC-signed); empty: no webhook."`
	WebhookSecret    config.Secret `split_words:"true" secret:"true" desc:"Shared secret of the MDM webhook's HMAC-SHA256 signatures (at least 16 bytes)."`

	GraphTenant       string        `split_words:"true" desc:"Intune through Microsoft Graph: the Entra ID tenant (id or domain); empty: no Graph source."`
	GraphClientID     string        `split_words:"true" desc:"Application (client) id of the app registration; it needs the application permission DeviceManagementManagedDevices.Read.All, admin-consented."`
	GraphClientSecret config.Secret `split_words:"true" secret:"true" desc:"Client secret of the app registration (or EASGUARD_MDM_GRAPH_CERTIFICATE)."`
	GraphCertificate  string        `split_words:"true" desc:"PEM file with the app's certificate and its private key (unencrypted), instead of a client secret."`
	GraphAuthority    string        `split_words:"true" default:"https://login.microsoftonline.com" desc:"Identity endpoint (national clouds: https://login.microsoftonline.us, https://login.chinacloudapi.cn)."`
	GraphURL          string        `split_words:"true" default:"https://graph.microsoft.com/v1.0" desc:"Microsoft Graph root with version (national clouds: https://graph.microsoft.us/v1.0, https://microsoftgraph.chinacloudapi.cn/v1.0)."`
	GraphCABundle     string        `split_words:"true" desc:"PEM file of extra CAs for the identity endpoint and Graph (a TLS-inspecting proxy's); default: the system's."`
	GraphProxy        string        `split_words:"true" default:"environment" desc:"HTTP proxy to Graph: environment (HTTPS_PROXY/NO_PROXY), none, or a URL."`
	GraphPollInterval time.Duration `split_words:"true" default:"2m" desc:"Time between two complete reads of the managed devices; a compliance change reaches easguard within it."`
	GraphFullResync   time.Duration `split_words:"true" default:"24h" desc:"How often every device record is published again, changed or not."`
	GraphMissingAfter time.Duration `split_words:"true" default:"24h" desc:"How long a device may be absent from complete Graph reads before easguard treats it as gone (Graph's own retire state counts at once)."`
	GraphPageSize     int           `split_words:"true" desc:"Page size ($top) of a listing; 0: Graph's default."`
}

func (m *MDMConfig) validateGraph() error {
	if m.GraphClientID == "" {
		return config.Invalid(&m.GraphClientID, "is required with EASGUARD_MDM_GRAPH_TENANT")
	}
	if (m.GraphClientSecret == "") == (m.GraphCertificate == "") {
		return config.Invalid(&m.GraphClientSecret, "give a client secret or EASGUARD_MDM_GRAPH_CERTIFICATE, exactly one")
	}
	if m.GraphCertificate != "" {
		if _, err := os.Stat(m.GraphCertificate); err != nil {
			return config.Invalid(&m.GraphCertificate, "%v", err)
		}
	}
	for _, f := range []*string{&m.GraphAuthority, &m.GraphURL} {
		if u, err := url.Parse(*f); err != nil || u.Scheme != "https" || u.Host == "" {
			return config.Invalid(f, "%q is not an https URL", *f)
		}
	}
	if _, err := mdm.GraphHTTPClient(m.GraphProxy, "", time.Minute); err != nil {
		return config.Invalid(&m.GraphProxy, "%v", err)
	}
	if _, err := mdm.GraphHTTPClient("none", m.GraphCABundle, time.Minute); err != nil {
		return config.Invalid(&m.GraphCABundle, "%v", err)
	}
	if m.GraphPollInterval < time.Second {
		return config.Invalid(&m.GraphPollInterval, "must be at least 1s (and a minute or more for a large tenant: Graph throttles per tenant)")
	}
	if m.GraphFullResync < m.GraphPollInterval {
		return config.Invalid(&m.GraphFullResync, "must not be shorter than the poll interval")
	}
	if m.GraphMissingAfter < m.GraphPollInterval {
		return config.Invalid(&m.GraphMissingAfter, "must not be shorter than the poll interval")
	}
	if m.GraphPageSize < 0 || m.GraphPageSize > 1000 {
		return config.Invalid(&m.GraphPageSize, "must be between 0 and 1000")
	}
	return nil
}

// graphSource builds the Graph source the settings describe.
func (m *MDMConfig) graphSource(log *slog.Logger, mp metric.MeterProvider, tp trace.TracerProvider, store mdm.InventoryStore) (*mdm.GraphSource, error) {
	client, err := mdm.GraphHTTPClient(m.GraphProxy, m.GraphCABundle, 2*time.Minute)
	if err != nil {
		return nil, err
	}
	opts := mdm.GraphOptions{
		Tenant: m.GraphTenant, ClientID: m.GraphClientID, ClientSecret: m.GraphClientSecret.Reveal(),
		Authority: m.GraphAuthority, GraphURL: m.GraphURL, HTTPClient: client, PollInterval: m.GraphPollInterval,
		FullResync: m.GraphFullResync, MissingAfter: m.GraphMissingAfter, PageSize: m.GraphPageSize,
		MassRemovalShare: m.MassRemovalShare, Logger: log, MeterProvider: mp, TracerProvider: tp, Store: store,
	}
	if m.GraphCertificate != "" {
		if opts.Certificate, err = os.ReadFile(m.GraphCertificate); err != nil {
			return nil, fmt.Errorf("graph certificate: %w", err)
		}
	}
	return mdm.NewGraphSource(opts)
}

// busSink publishes what MDM sources observe, and records each source's
// state under status key mdm.<kind> (file, webhook).
type busSink struct {
	svc    *service.Service
	org    bus.Org
	source string
	kind   string
}

func (b *busSink) Changed(ctx context.Context, changes []mdm.Change) error {
	now := timestamppb.Now()
	for _, ch := range changes {
		d := ch.Device
		key := d.GetEasDeviceId()
		if key == "" {
			key = d.GetMdmDeviceId()
		}
		subject, err := bus.MDMChanged.Subject(b.org, key)
		if err != nil {
			return err
		}
		// The id names this report of this change: the same record seen
		// again later (compliant, non-compliant, compliant again) is a
		// new report and must not be dropped as a duplicate.
		raw, _ := proto.Marshal(d)
		sum := sha256.Sum256(append(append(raw, []byte(ch.PreviousEASDeviceID+"|"+now.AsTime().Format(time.RFC3339Nano))...), map[bool]byte{true: 1, false: 0}[ch.Removed]))
		id := "mdm:" + hex.EncodeToString(sum[:12])
		if _, err := b.svc.Publisher().Publish(ctx, bus.Outbound{Subject: subject, MsgID: id, Message: &ev.MDMDeviceChanged{
			Org: string(b.org), Device: d, ObservedAt: now, ChangeId: id, PreviousEasDeviceId: ch.PreviousEASDeviceID, Removed: ch.Removed,
		}}); err != nil {
			return err
		}
	}
	n := len(changes)
	b.status(ctx, status.MDMSource{Source: b.source, State: status.MDMOK, At: time.Now(), LastChanges: &n})
	return nil
}

// ReadOK records a complete read: the source works (again).
func (b *busSink) ReadOK(ctx context.Context, devices int) {
	b.status(ctx, status.MDMSource{Source: b.source, State: status.MDMOK, At: time.Now(), Devices: &devices})
}

func (b *busSink) Alert(ctx context.Context, kind ev.AlertKind, summary string, detail map[string]string) error {
	sum := sha256.Sum256([]byte(b.source + kind.String() + summary))
	id := hex.EncodeToString(sum[:12])
	b.status(ctx, status.MDMSource{Source: b.source, State: status.MDMAlert, At: time.Now(), Alert: kind.String(), Summary: summary, Detail: detail})
	out, err := bus.AlertOutbound(b.org, kind, ev.AlertSeverity_ALERT_SEVERITY_CRITICAL, id, summary, detail, time.Now())
	if err != nil {
		return err
	}
	_, err = b.svc.Publisher().Publish(ctx, out)
	return err
}

// status records what the source reported under its kind's key. A record
// that fails is logged, not returned: the source's work went on, and
// only what an administrator reads of it is missing.
func (b *busSink) status(ctx context.Context, v status.MDMSource) {
	kv, err := b.svc.JS.KeyValue(ctx, bus.BucketStatus)
	if err == nil {
		err = status.Put(ctx, kv, b.org, status.MDMSourceKey(b.kind), v)
	}
	if err != nil {
		b.svc.Log.Warn("MDM source status not recorded", "source", b.source, "error", err)
	}
}

// startMDM starts the configured MDM sources. The inventory sources (Graph,
// the file) run as per-org singletons under a lease each, so that N
// replicas are one Graph poller on the tenant's throttling budget and one
// publisher of the file's changes, with a standby taking over within the
// lease TTL; what they delivered lives in KV (bus.BucketMDMSources), so
// the replica that takes over, or the same one after a restart, reports
// what was removed meanwhile. The webhook stays active on every replica,
// its replay store in KV (bus.BucketMDMReplay) shared by all of them.
func startMDM(ctx context.Context, svc *service.Service, org bus.Org, cfg MDMConfig) error {
	var store *mdm.KVInventoryStore
	if cfg.GraphTenant != "" || cfg.File != "" {
		kv, err := svc.JS.KeyValue(ctx, bus.BucketMDMSources)
		if err != nil {
			return fmt.Errorf("mdm: %w", err)
		}
		if store, err = mdm.NewKVInventoryStore(kv, org); err != nil {
			return err
		}
	}
	if cfg.GraphTenant != "" {
		src, err := cfg.graphSource(svc.Log, svc.Tel.MeterProvider, svc.Tel.TracerProvider, store)
		if err != nil {
			return err
		}
		if err := startSingleton(ctx, svc, org, "mdm-graph", src); err != nil {
			return err
		}
	}
	if cfg.File != "" {
		src := mdm.NewFileSource(cfg.File, mdm.FileOptions{Format: cfg.FileFormat, MassRemovalShare: cfg.MassRemovalShare, Store: store, Logger: svc.Log})
		if err := startSingleton(ctx, svc, org, "mdm-file", src); err != nil {
			return err
		}
	}
	if cfg.WebhookAddr != "" {
		const name = "webhook"
		kv, err := svc.JS.KeyValue(ctx, bus.BucketMDMReplay)
		if err != nil {
			return fmt.Errorf("mdm webhook: %w", err)
		}
		replay, err := mdm.NewKVReplayStore(ctx, kv, org, name)
		if err != nil {
			return err
		}
		src, err := mdm.NewWebhookSource(name, mdm.WebhookOptions{Secret: []byte(cfg.WebhookSecret.Reveal()), Replay: replay})
		if err != nil {
			return err
		}
		sink := &busSink{svc: svc, org: org, source: src.Name(), kind: "webhook"}
		mux := http.NewServeMux()
		mux.Handle("POST /mdm/webhook", src)
		// The source bounds the body itself (its limit is the MDM's
		// batch size); the server bounds the rest.
		srv := health.NewHTTPServer(mux, 0)
		srv.Addr = cfg.WebhookAddr
		svc.Go("mdm webhook", func(ctx context.Context) error {
			errc := make(chan error, 1)
			go func() { errc <- srv.ListenAndServe() }()
			go func() { _ = src.Run(ctx, sink) }()
			select {
			case err := <-errc:
				return fmt.Errorf("mdm webhook: %w", err)
			case <-ctx.Done():
				sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_ = srv.Shutdown(sctx)
				return nil
			}
		})
	}
	return nil
}

// startSingleton runs an inventory source while this replica holds the
// org's lease on duty (mdm-graph, mdm-file); the duty's tail names the
// source's status key (mdm.graph, mdm.file).
func startSingleton(ctx context.Context, svc *service.Service, org bus.Org, duty string, src mdm.Source) error {
	kv, err := svc.JS.KeyValue(ctx, bus.BucketLeases)
	if err != nil {
		return fmt.Errorf("%s: %w", duty, err)
	}
	lease, err := bus.NewLease(ctx, kv, duty, org, svc.InstanceID(), svc.Log)
	if err != nil {
		return err
	}
	sink := &busSink{svc: svc, org: org, source: src.Name(), kind: strings.TrimPrefix(duty, "mdm-")}
	leased := mdm.Singleton(src, lease)
	svc.Go("mdm "+src.Name(), func(ctx context.Context) error { return leased.Run(ctx, sink) })
	return nil
}
