package mdm

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/telemetry/telemetrytest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/intunesim"
)

// graphSource starts a Graph source against the simulator, with the
// simulator's CA trusted; tweak adjusts the options.
func graphSource(tb testing.TB, sim *intunesim.Sim, tweak func(*GraphOptions)) *GraphSource {
	tb.Helper()
	client, err := GraphHTTPClient("none", sim.CAFile(tb), time.Minute)
	if err != nil {
		tb.Fatal(err)
	}
	opts := GraphOptions{
		Tenant: sim.Tenant(), ClientID: sim.ClientID(), ClientSecret: sim.ClientSecret(),
		Authority: sim.URL(), GraphURL: sim.GraphURL(), HTTPClient: client,
		PollInterval: 100 * time.Millisecond, Attempts: 3,
	}
	if tweak != nil {
		tweak(&opts)
	}
	g, err := NewGraphSource(opts)
	if err != nil {
		tb.Fatal(err)
	}
	// Backoff between attempts is kept short; Retry-After waits are real.
	return g
}

func changedIDs(calls [][]Change) (changed, removed []string) {
	for _, call := range calls {
		for _, c := range call {
			if c.Removed {
				removed = append(removed, c.Device.GetMdmDeviceId())
			} else {
				changed = append(changed, c.Device.GetMdmDeviceId())
			}
		}
	}
	return changed, removed
}

// A complete read follows every page; afterwards one device's compliance
// change is the only event of the next poll.
func TestGraphPollsPagesAndPublishesOnlyChanges(t *testing.T) {
	sim := intunesim.StartTest(t, intunesim.Config{Extra: 2500, PageSize: 1000})
	sink := &recordingSink{}
	runSource(t, graphSource(t, sim, nil), sink)
	first := sink.waitCalls(t, 1)
	if len(first) != sim.DeviceCount() {
		t.Fatalf("first poll published %d records, the simulator has %d", len(first), sim.DeviceCount())
	}
	pages := 0
	for _, r := range sim.Recorder.Records("graph") {
		if r.Status == 200 {
			pages++
		}
	}
	if pages < 3 {
		t.Fatalf("%d pages read for 2,500 devices at 1,000 a page", pages)
	}
	var target intunesim.Device
	for _, d := range sim.Devices() {
		if d.ComplianceState == "compliant" && d.EASDeviceID != "" {
			target = d
			break
		}
	}
	if _, err := sim.SetCompliance(target.ID, "noncompliant"); err != nil {
		t.Fatal(err)
	}
	got := sink.waitCalls(t, 2)
	if len(got) != 1 || got[0].Device.GetMdmDeviceId() != target.ID || got[0].Device.GetComplianceState() != ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT {
		t.Fatalf("second poll published %v, want only %s non-compliant", got, target.ID)
	}
	// Retiring in Intune is a change (retired), not a removal.
	if _, err := sim.Retire(target.ID); err != nil {
		t.Fatal(err)
	}
	got = sink.waitCalls(t, 3)
	if len(got) != 1 || !got[0].Device.GetRetired() || got[0].Removed {
		t.Fatalf("after retire: %v", got)
	}
}

// The app authenticates with a certificate instead of a secret.
func TestGraphCertificateCredential(t *testing.T) {
	certPEM, keyPEM, err := intunesim.GenerateClientCert("easguard")
	if err != nil {
		t.Fatal(err)
	}
	sim := intunesim.StartTest(t, intunesim.Config{Extra: 10, ClientCertPEM: certPEM})
	g := graphSource(t, sim, func(o *GraphOptions) { o.ClientSecret, o.Certificate = "", append(slices.Clone(certPEM), keyPEM...) })
	devices, err := g.Read(t.Context())
	if err != nil || len(devices) != 10 {
		t.Fatalf("read %d devices: %v", len(devices), err)
	}
	// A wrong secret is refused with the identity platform's reason.
	bad := graphSource(t, sim, func(o *GraphOptions) { o.ClientSecret = "wrong-secret-0123456789" })
	if _, err := bad.Read(t.Context()); err == nil || !strings.Contains(err.Error(), "AADSTS") {
		t.Fatalf("wrong secret: %v", err)
	}
}

// A 429 with Retry-After: 3 midway through a listing is waited out, to the
// second, and the read then completes.
func TestGraphWaitsRetryAfter(t *testing.T) {
	sim := intunesim.StartTest(t, intunesim.Config{Extra: 2500, PageSize: 1000})
	if err := sim.Inject(intunesim.Fault{Kind: "throttle", RetryAfter: 3, AtPage: 2, Count: 1}); err != nil {
		t.Fatal(err)
	}
	metrics := telemetrytest.NewMetrics(t)
	g := graphSource(t, sim, func(o *GraphOptions) { o.MeterProvider = metrics.Provider })
	devices, err := g.Read(t.Context())
	if err != nil || len(devices) != 2500 {
		t.Fatalf("read %d devices: %v", len(devices), err)
	}
	// Three pages read, one of them after a 429.
	for outcome, want := range map[string]float64{"ok": 3, "throttled": 1, "failed": 0, "refused": 0} {
		if got := metrics.Value(t, "easguard.graph.requests", map[string]string{"easguard.outcome": outcome, "easguard.graph.tenant": sim.Tenant()}); got != want {
			t.Errorf("easguard.graph.requests %s = %v, want %v", outcome, got, want)
		}
	}
	var throttled, retried time.Time
	for _, r := range sim.Recorder.Records("graph") {
		switch {
		case r.Status == 429:
			throttled = r.Time
		case !throttled.IsZero() && retried.IsZero():
			retried = r.Time
		}
	}
	if throttled.IsZero() || retried.IsZero() {
		t.Fatalf("no 429 followed by a retry in %v", sim.Recorder.Records("graph"))
	}
	if wait := retried.Sub(throttled); wait < 3*time.Second || wait > 4*time.Second {
		t.Fatalf("retried %s after the 429, want Retry-After's 3s", wait)
	}
}

// A listing that fails midway — a malformed page, a 500 that does not go
// away — publishes nothing, names the page, and alerts once; the next good
// poll finds nothing changed.
func TestGraphFailedReadPublishesNothing(t *testing.T) {
	for _, fault := range []intunesim.Fault{
		{Kind: "malformed", AtPage: 2},
		{Kind: "error", Status: 500, AtPage: 2},
	} {
		t.Run(fault.Kind, func(t *testing.T) {
			sim := intunesim.StartTest(t, intunesim.Config{Extra: 2500, PageSize: 1000})
			sink := &recordingSink{}
			runSource(t, graphSource(t, sim, nil), sink)
			sink.waitCalls(t, 1)
			if err := sim.Inject(fault); err != nil {
				t.Fatal(err)
			}
			alert := sink.waitAlerts(t, 1)
			if alert.kind != ev.AlertKind_ALERT_KIND_MDM_UNREACHABLE || !strings.Contains(alert.summary, "page 2") {
				t.Fatalf("alert %+v", alert)
			}
			calls := len(sink.calls())
			// Let several more polls fail: still one alert, no changes.
			failures := func() int {
				n := 0
				for _, r := range sim.Recorder.Records("graph") {
					if r.Fault != "" {
						n++
					}
				}
				return n
			}
			seen := failures()
			waitFor(t, "three more failed pages", func() bool { return failures() >= seen+3 })
			if len(sink.calls()) != calls || len(sink.alertList()) != 1 {
				t.Fatalf("during the outage: %d more change calls, %d alerts", len(sink.calls())-calls, len(sink.alertList()))
			}
			sim.ClearFaults()
			before := sim.Recorder.Count("graph")
			waitFor(t, "a complete poll after the outage", func() bool { return sim.Recorder.Count("graph") >= before+3 })
			if changed, removed := changedIDs(sink.calls()[calls:]); len(changed)+len(removed) != 0 {
				t.Fatalf("after the outage: changed %v removed %v", changed, removed)
			}
		})
	}
}

// A device gone from the listing is removed only after MissingAfter.
func TestGraphMissingDeviceRemovedAfterGrace(t *testing.T) {
	sim := intunesim.StartTest(t, intunesim.Config{Extra: 20})
	sink := &recordingSink{}
	runSource(t, graphSource(t, sim, func(o *GraphOptions) { o.MissingAfter = 700 * time.Millisecond }), sink)
	sink.waitCalls(t, 1)
	gone := sim.Devices()[3]
	deleted := time.Now()
	if err := sim.Delete(gone.ID); err != nil {
		t.Fatal(err)
	}
	got := sink.waitCalls(t, 2)
	if len(got) != 1 || !got[0].Removed || got[0].Device.GetMdmDeviceId() != gone.ID {
		t.Fatalf("removal %v", got)
	}
	if waited := time.Since(deleted); waited < 700*time.Millisecond {
		t.Fatalf("removed %s after it left the listing, before MissingAfter", waited)
	}
}

// A token Graph no longer accepts is renewed once, and the read succeeds.
func TestGraphRenewsARefusedToken(t *testing.T) {
	sim := intunesim.StartTest(t, intunesim.Config{Extra: 5})
	g := graphSource(t, sim, nil)
	if _, err := g.Read(t.Context()); err != nil {
		t.Fatal(err)
	}
	issued := sim.TokensIssued()
	sim.ExpireTokens()
	if _, err := g.Read(t.Context()); err != nil {
		t.Fatalf("after the token was revoked: %v", err)
	}
	if sim.TokensIssued() != issued+1 {
		t.Fatalf("%d tokens issued, want one more", sim.TokensIssued()-issued)
	}
}

// A Graph that does not serve managementState on v1.0 is read without it;
// a retire is still seen, from deviceActionResults.
func TestGraphWithoutManagementState(t *testing.T) {
	sim := intunesim.StartTest(t, intunesim.Config{Extra: 5, StrictV1: true})
	g := graphSource(t, sim, nil)
	target := sim.Devices()[0]
	if _, err := sim.Retire(target.ID); err != nil {
		t.Fatal(err)
	}
	devices, err := g.Read(t.Context())
	if err != nil || len(devices) != 5 {
		t.Fatalf("read %d: %v", len(devices), err)
	}
	for _, d := range devices {
		if d.GetMdmDeviceId() == target.ID && !d.GetRetired() {
			t.Fatalf("retired device read as %v", d)
		}
	}
}

func TestNewGraphSourceRefusesBadOptions(t *testing.T) {
	for _, tt := range []struct {
		name string
		opts GraphOptions
	}{
		{"no tenant", GraphOptions{ClientID: "c", ClientSecret: "s"}},
		{"no credential", GraphOptions{Tenant: "t", ClientID: "c"}},
		{"both credentials", GraphOptions{Tenant: "t", ClientID: "c", ClientSecret: "s", Certificate: []byte("x")}},
		{"http graph", GraphOptions{Tenant: "t", ClientID: "c", ClientSecret: "s", GraphURL: "http://graph.example/v1.0"}},
		{"bad certificate", GraphOptions{Tenant: "t", ClientID: "c", Certificate: []byte("not a pem")}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := NewGraphSource(tt.opts); !errors.Is(err, ErrConfig) {
				t.Fatalf("want ErrConfig, got %v", err)
			}
		})
	}
}

// BenchmarkGraphPoll50k times one complete poll of 50,000 managed devices
// (50 pages, normalised and indexed), next to the bare HTTP listing of the
// same pages as the baseline of what the simulator itself costs.
func BenchmarkGraphPoll50k(b *testing.B) {
	sim := intunesim.StartTest(b, intunesim.Config{Extra: 50000, PageSize: 1000})
	g := graphSource(b, sim, nil)
	ctx := context.Background()
	var poll, bare time.Duration
	for range b.N {
		start := time.Now()
		devices, err := g.Read(ctx)
		if err != nil || len(devices) != 50000 {
			b.Fatalf("read %d: %v", len(devices), err)
		}
		inv, err := newInventory(devices)
		if err != nil {
			b.Fatal(err)
		}
		rec := newReconciler("bench", g.Name(), 0.5, &recordingSink{}, slog.Default())
		if err := rec.apply(ctx, inv, false); err != nil {
			b.Fatal(err)
		}
		poll += time.Since(start)

		start = time.Now()
		n, err := bareList(ctx, g)
		if err != nil || n != 50000 {
			b.Fatalf("bare list %d: %v", n, err)
		}
		bare += time.Since(start)
	}
	b.ReportMetric(poll.Seconds()/float64(b.N), "graph_poll_50k:s")
	b.ReportMetric(bare.Seconds()/float64(b.N), "graph_list_50k_bare:s")
}

// bareList fetches every page without decoding the devices.
func bareList(ctx context.Context, g *GraphSource) (int, error) {
	next := strings.TrimRight(g.opts.GraphURL, "/") + "/deviceManagement/managedDevices?$select=" + strings.Join(g.selects, ",")
	n := 0
	for next != "" {
		var p struct {
			Value    []struct{} `json:"value"`
			NextLink string     `json:"@odata.nextLink"`
		}
		if err := g.getOnce(ctx, next, &p); err != nil {
			return n, err
		}
		n += len(p.Value)
		next = p.NextLink
	}
	return n, nil
}

// connectProxy is a minimal HTTPS forward proxy (HTTP CONNECT), as a
// company's egress proxy would be; it counts the tunnels it opened.
func connectProxy(tb testing.TB) (proxyURL string, tunnels *atomic.Int64) {
	tb.Helper()
	tunnels = &atomic.Int64{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodConnect {
			http.Error(w, "CONNECT only", http.StatusMethodNotAllowed)
			return
		}
		upstream, err := net.Dial("tcp", r.Host)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		hj, ok := w.(http.Hijacker)
		if !ok {
			upstream.Close()
			return
		}
		w.WriteHeader(http.StatusOK)
		client, _, err := hj.Hijack()
		if err != nil {
			upstream.Close()
			return
		}
		tunnels.Add(1)
		go func() { _, _ = io.Copy(upstream, client); upstream.Close() }()
		go func() { _, _ = io.Copy(client, upstream); client.Close() }()
	}))
	tb.Cleanup(srv.Close)
	return srv.URL, tunnels
}

// Behind a proxy: the token and every Graph page go through it.
func TestGraphThroughProxy(t *testing.T) {
	sim := intunesim.StartTest(t, intunesim.Config{Extra: 1500, PageSize: 1000})
	proxy, tunnels := connectProxy(t)
	client, err := GraphHTTPClient(proxy, sim.CAFile(t), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	g := graphSource(t, sim, func(o *GraphOptions) { o.HTTPClient = client })
	devices, err := g.Read(t.Context())
	if err != nil || len(devices) != 1500 {
		t.Fatalf("read %d through the proxy: %v", len(devices), err)
	}
	if tunnels.Load() == 0 {
		t.Fatal("nothing went through the proxy")
	}
	// The proxy down: the read fails, it does not go around the proxy.
	dead, err := GraphHTTPClient("http://127.0.0.1:1", sim.CAFile(t), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	g = graphSource(t, sim, func(o *GraphOptions) { o.HTTPClient, o.Attempts = dead, 1 })
	if _, err := g.Read(t.Context()); err == nil || !strings.Contains(err.Error(), "proxy") && !strings.Contains(err.Error(), "connect") {
		t.Fatalf("read with the proxy down: %v", err)
	}
}

// Every FullResync the source publishes every record again, changed or
// not, so that anything a lost event left wrong downstream is put right.
func TestGraphFullResync(t *testing.T) {
	sim := intunesim.StartTest(t, intunesim.Config{Extra: 30})
	sink := &recordingSink{}
	runSource(t, graphSource(t, sim, func(o *GraphOptions) { o.FullResync = 500 * time.Millisecond }), sink)
	if first := sink.waitCalls(t, 1); len(first) != 30 {
		t.Fatalf("first poll: %d records", len(first))
	}
	if again := sink.waitCalls(t, 2); len(again) != 30 {
		t.Fatalf("resync published %d records, want all 30", len(again))
	}
}
