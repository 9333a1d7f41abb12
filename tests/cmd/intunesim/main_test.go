package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/AzureAD/microsoft-authentication-library-for-go/apps/confidential"

	"github.com/easguard/easguard/tests/exchangesim"
	"github.com/easguard/easguard/tests/intunesim"
	"github.com/easguard/easguard/tests/simcmd"
)

func TestRunServesUntilCancelled(t *testing.T) {
	t.Setenv("INTUNESIM_CLIENT_SECRET", "env-secret")
	dir := t.TempDir()
	ca, env, cert := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "graph.env"), filepath.Join(dir, "client.pem")
	ctx := t.Context()
	var st started
	sim := simcmd.Start(t, run, &st, "-seed", "4", "-mailboxes", "50", "-partnerships", "80", "-extra", "5",
		"-cert-out", ca, "-env-out", env, "-client-cert-out", cert)
	if !strings.HasPrefix(st.URL, "https://127.0.0.1:") || st.Graph != st.URL+"/v1.0" || st.Authority != st.URL+"/"+intunesim.DefaultTenant ||
		!strings.HasPrefix(st.Admin, "http://127.0.0.1:") || st.CACert != ca || st.EnvFile != env || st.ClientCert != cert || st.ClientKey != cert+".key" ||
		st.Tenant != intunesim.DefaultTenant || st.ClientID != intunesim.DefaultClientID || st.StartSeconds <= 0 {
		t.Fatalf("start line %+v", st)
	}
	// The same organisation, in-process, has as many devices.
	ref := intunesim.StartTest(t, intunesim.Config{Seed: &exchangesim.SeedSpec{Mailboxes: 50, Partnerships: 80, Seed: 4, ChildDomainShare: 0.1}, Extra: 5})
	if st.Devices != ref.DeviceCount() || st.Devices < 10 {
		t.Fatalf("%d devices, the same flags in-process give %d", st.Devices, ref.DeviceCount())
	}

	// The env file has exactly what easguard needs.
	b, err := os.ReadFile(env)
	if err != nil {
		t.Fatal(err)
	}
	settings := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		k, v, _ := strings.Cut(l, "=")
		settings[k] = v
	}
	want := map[string]string{
		"EASGUARD_MDM_GRAPH_TENANT": st.Tenant, "EASGUARD_MDM_GRAPH_CLIENT_ID": st.ClientID, "EASGUARD_MDM_GRAPH_CLIENT_SECRET": "env-secret",
		"EASGUARD_MDM_GRAPH_AUTHORITY": st.URL, "EASGUARD_MDM_GRAPH_URL": st.Graph, "EASGUARD_MDM_GRAPH_CA_BUNDLE": ca,
	}
	if len(settings) != len(want) {
		t.Fatalf("env file %v", settings)
	}
	for k, v := range want {
		if settings[k] != v {
			t.Errorf("%s=%q, want %q", k, settings[k], v)
		}
	}
	if fi, err := os.Stat(env); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("env file mode: %v %v", fi.Mode(), err)
	}

	// easguard's way in: MSAL with the settings, trusting the CA bundle.
	pemCA, err := os.ReadFile(settings["EASGUARD_MDM_GRAPH_CA_BUNDLE"])
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemCA) {
		t.Fatal("ca_cert holds no certificate")
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 30 * time.Second}
	authority := settings["EASGUARD_MDM_GRAPH_AUTHORITY"] + "/" + settings["EASGUARD_MDM_GRAPH_TENANT"]
	scope := []string{settings["EASGUARD_MDM_GRAPH_AUTHORITY"] + "/.default"}
	secretCred, err := confidential.NewCredFromSecret(settings["EASGUARD_MDM_GRAPH_CLIENT_SECRET"])
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := os.ReadFile(st.ClientKey)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := os.ReadFile(st.ClientCert)
	if err != nil {
		t.Fatal(err)
	}
	certs, key, err := confidential.CertFromPEM(append(certPEM, keyPEM...), "")
	if err != nil {
		t.Fatal(err)
	}
	certCred, err := confidential.NewCredFromCert(certs, key)
	if err != nil {
		t.Fatal(err)
	}
	for name, cred := range map[string]confidential.Credential{"secret": secretCred, "certificate": certCred} {
		app, err := confidential.New(authority, settings["EASGUARD_MDM_GRAPH_CLIENT_ID"], cred,
			confidential.WithHTTPClient(hc), confidential.WithInstanceDiscovery(false))
		if err != nil {
			t.Fatal(err)
		}
		res, err := app.AcquireTokenByCredential(ctx, scope)
		if err != nil {
			t.Fatalf("token by %s: %v", name, err)
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, settings["EASGUARD_MDM_GRAPH_URL"]+"/deviceManagement/managedDevices?$select=id,easDeviceId", nil)
		req.Header.Set("Authorization", "Bearer "+res.AccessToken)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var page struct {
			Value []map[string]any `json:"value"`
		}
		err = json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || len(page.Value) != st.Devices {
			t.Fatalf("Graph with the %s token: %d, %d devices (%v)", name, resp.StatusCode, len(page.Value), err)
		}
	}

	resp, err := http.Get(st.Admin + "/api/info")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("admin API: %d", resp.StatusCode)
	}

	sim.Stop(t)
}

func TestRunRejectsBadFlags(t *testing.T) {
	simcmd.CheckBadFlags(t, run, []simcmd.BadFlags{
		{Name: "cert in and out", Args: []string{"-client-cert-in", "a.pem", "-client-cert-out", "b.pem"}, Want: "exclude each other"},
		{Name: "key without cert", Args: []string{"-client-key-out", "k.pem"}, Want: "-client-key-out needs -client-cert-out"},
		{Name: "env without CA", Args: []string{"-env-out", "x.env"}, Want: "-env-out needs -cert-out"},
		{Name: "bad mix", Args: []string{"-mix", "compliant=2x"}, Want: "-mix"},
		{Name: "unknown share", Args: []string{"-mix", "lost=0.1"}, Want: "unknown share"},
		{Name: "missing cert file", Args: []string{"-client-cert-in", "/nonexistent/cert.pem"}, Want: "-client-cert-in"},
		{Name: "unknown flag", Args: []string{"-bogus"}, Want: "flag provided but not defined"},
		{Name: "stray argument", Args: []string{"extra"}, Want: "unexpected arguments"},
	})
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"-mix", "compliant=0.9,noncompliant=0.5"}, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "more than 1") {
		t.Errorf("a mix over 1: exit %d, %q", code, stderr.String())
	}
}

// TestBinaryExitsOnSignal builds the command and stops it with SIGTERM
// and SIGINT, as the demo script does.
func TestBinaryExitsOnSignal(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := filepath.Join(t.TempDir(), "intunesim")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		cmd := exec.Command(bin, "-mailboxes", "20", "-partnerships", "30")
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr simcmd.LockedBuffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err != nil || !strings.Contains(line, `"graph":"https://127.0.0.1:`) {
			_ = cmd.Process.Kill()
			t.Fatalf("start line %q: %v (stderr %s)", line, err, stderr.String())
		}
		if err := cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%v: %v (stderr %s)", sig, err, stderr.String())
			}
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			t.Fatalf("%v: the simulator did not exit", sig)
		}
	}
}
