package check

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v4/pkg/chart/common"
	chartutil "helm.sh/helm/v4/pkg/chart/common/util"
	chartv2 "helm.sh/helm/v4/pkg/chart/v2"
	"helm.sh/helm/v4/pkg/chart/v2/lint"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	"k8s.io/apimachinery/pkg/util/validation"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"
)

const (
	chartDir  = "../easguard"
	rulesFile = "../../prometheus/easguard.rules.yml"
	chartCopy = "../easguard/files/easguard.rules.yml"
	release   = "eg"
	namespace = "easguard"
)

var workers = []string{"collector", "mdm", "matcher", "evaluator", "executor", "mailer"}

// The Secrets the test values name; their values exist only in the cluster.
var secretNames = []string{"contoso-exchange", "contoso-smtp", "contoso-graph", "fabrikam-exchange", "fabrikam-smtp", "fabrikam-graph", "console-oidc", "nats-auth"}

// decoder decodes YAML strictly into the Kubernetes API types and the
// Prometheus Operator's: an unknown field, a duplicate field or a wrong
// type is an error.
var decoder = func() runtime.Decoder {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := monitoringv1.AddToScheme(s); err != nil {
		panic(err)
	}
	return json.NewSerializerWithOptions(json.DefaultMetaFactory, s, s, json.SerializerOptions{Yaml: true, Strict: true})
}()

// manifests is one rendering, decoded.
type manifests struct {
	objects     []runtime.Object
	deployments map[string]*appsv1.Deployment
	services    map[string]*corev1.Service
	configMaps  map[string]*corev1.ConfigMap
	ingresses   map[string]*networkingv1.Ingress
	monitors    map[string]*monitoringv1.ServiceMonitor
	rules       map[string]*monitoringv1.PrometheusRule
	pdbs        map[string]*policyv1.PodDisruptionBudget
	raw         string
}

func loadChart(t testing.TB) *chartv2.Chart {
	t.Helper()
	ch, err := loader.LoadDir(chartDir)
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	return ch
}

// render renders the chart with the values (YAML) over values.yaml, as
// `helm template` would, and returns the rendered files.
func render(t testing.TB, valuesYAML string) (map[string]string, error) {
	t.Helper()
	ch := loadChart(t)
	vals, err := common.ReadValues([]byte(valuesYAML))
	if err != nil {
		t.Fatalf("test values: %v", err)
	}
	top, err := chartutil.ToRenderValues(ch, vals, common.ReleaseOptions{Name: release, Namespace: namespace, IsInstall: true, Revision: 1}, nil)
	if err != nil {
		return nil, err
	}
	return engine.Engine{}.RenderWithContext(context.Background(), ch, top)
}

// decode renders and strictly decodes every manifest.
func decode(t testing.TB, valuesYAML string) *manifests {
	t.Helper()
	files, err := render(t, valuesYAML)
	if err != nil {
		t.Fatalf("render: %v", err)
	}
	if dir := os.Getenv("HELM_CHECK_DUMP"); dir != "" { // to read what the chart renders
		dump(t, filepath.Join(dir, strings.ReplaceAll(t.Name(), "/", "_")), files)
	}
	m := &manifests{
		deployments: map[string]*appsv1.Deployment{}, services: map[string]*corev1.Service{},
		configMaps: map[string]*corev1.ConfigMap{}, ingresses: map[string]*networkingv1.Ingress{},
		monitors: map[string]*monitoringv1.ServiceMonitor{}, rules: map[string]*monitoringv1.PrometheusRule{},
		pdbs: map[string]*policyv1.PodDisruptionBudget{},
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	seen := map[string]bool{}
	for _, name := range names {
		if !strings.HasSuffix(name, ".yaml") && !strings.HasSuffix(name, ".yml") {
			continue
		}
		m.raw += files[name]
		for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(files[name], -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			obj, gvk, err := decoder.Decode([]byte(doc), nil, nil)
			if err != nil {
				t.Fatalf("%s, document %d: not a valid Kubernetes object: %v\n%s", name, i, err, doc)
			}
			meta, err := metaOf(obj)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			key := gvk.Kind + "/" + meta.GetName()
			if seen[key] {
				t.Fatalf("%s rendered twice", key)
			}
			seen[key] = true
			checkMeta(t, key, meta)
			m.objects = append(m.objects, obj)
			switch o := obj.(type) {
			case *appsv1.Deployment:
				m.deployments[o.Name] = o
			case *corev1.Service:
				m.services[o.Name] = o
			case *corev1.ConfigMap:
				m.configMaps[o.Name] = o
			case *networkingv1.Ingress:
				m.ingresses[o.Name] = o
			case *monitoringv1.ServiceMonitor:
				m.monitors[o.Name] = o
			case *monitoringv1.PrometheusRule:
				m.rules[o.Name] = o
			case *policyv1.PodDisruptionBudget:
				m.pdbs[o.Name] = o
			case *corev1.Secret:
				t.Errorf("the chart rendered a Secret %s: secrets must only be referenced", o.Name)
			default:
				t.Errorf("%s: a kind the test does not check", key)
			}
		}
	}
	return m
}

func dump(t testing.TB, dir string, files map[string]string) {
	t.Helper()
	for name, text := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func metaOf(obj runtime.Object) (metav1.Object, error) {
	type metaGetter interface{ GetObjectMeta() metav1.Object }
	if g, ok := obj.(metaGetter); ok {
		return g.GetObjectMeta(), nil
	}
	if o, ok := obj.(metav1.Object); ok {
		return o, nil
	}
	return nil, os.ErrInvalid
}

// checkMeta holds names and labels to what the API server accepts.
func checkMeta(t testing.TB, key string, meta metav1.Object) {
	t.Helper()
	if errs := validation.IsDNS1123Subdomain(meta.GetName()); len(errs) > 0 {
		t.Errorf("%s: invalid name: %v", key, errs)
	}
	if strings.HasPrefix(key, "Service/") || strings.HasPrefix(key, "Deployment/") {
		if errs := validation.IsDNS1123Label(meta.GetName()); len(errs) > 0 {
			t.Errorf("%s: invalid name: %v", key, errs)
		}
	}
	if meta.GetNamespace() != "" {
		t.Errorf("%s: sets a namespace (%s); the release's is used", key, meta.GetNamespace())
	}
	checkLabels(t, key, meta.GetLabels())
}

func checkLabels(t testing.TB, key string, l map[string]string) {
	t.Helper()
	for k, v := range l {
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			t.Errorf("%s: label key %q: %v", key, k, errs)
		}
		if errs := validation.IsValidLabelValue(v); len(errs) > 0 {
			t.Errorf("%s: label %s=%q: %v", key, k, v, errs)
		}
	}
}

func envOf(c corev1.Container) map[string]string {
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	return env
}

// secretVars are the variables that hold a secret (README, Configuration:
// type secret); they may only be given as files.
var secretVars = []string{
	"EASGUARD_CONSOLE_OIDC_CLIENT_SECRET", "EASGUARD_EXCHANGE_PASSWORD", "EASGUARD_MAILER_ALERT_WEBHOOK_AUTHORIZATION",
	"EASGUARD_MAILER_SMTP_PASSWORD", "EASGUARD_MDM_GRAPH_CLIENT_SECRET", "EASGUARD_MDM_WEBHOOK_SECRET",
	"EASGUARD_NATS_LISTEN_PASSWORD", "EASGUARD_NATS_PASSWORD", "EASGUARD_NATS_TOKEN",
}

// checkPod checks what every easguard pod must have: probes, the security
// context, resources, one env entry per name, and secrets only as files
// from Secret volumes. It returns the container's env and the Secret
// (name/key) behind each *_FILE variable.
func checkPod(t testing.TB, name string, d *appsv1.Deployment) (map[string]string, map[string]string) {
	t.Helper()
	sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil || sel.Empty() || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
		t.Errorf("%s: selector %v does not select its pods (%v)", name, d.Spec.Selector, d.Spec.Template.Labels)
	}
	checkLabels(t, name+" pod", d.Spec.Template.Labels)
	ps := d.Spec.Template.Spec
	if psc := ps.SecurityContext; psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser != 65532 {
		t.Errorf("%s: pod securityContext %+v: want runAsNonRoot, runAsUser 65532", name, psc)
	}
	if len(ps.Containers) != 1 {
		t.Fatalf("%s: %d containers, want 1", name, len(ps.Containers))
	}
	c := ps.Containers[0]
	sc := c.SecurityContext
	switch {
	case sc == nil:
		t.Errorf("%s: no securityContext", name)
	case sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot, sc.RunAsUser == nil || *sc.RunAsUser != 65532:
		t.Errorf("%s: securityContext does not run as 65532, non-root", name)
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Errorf("%s: root filesystem not read-only", name)
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Errorf("%s: privilege escalation allowed", name)
	case sc.Privileged != nil && *sc.Privileged:
		t.Errorf("%s: privileged", name)
	case sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0:
		t.Errorf("%s: capabilities %+v, want drop [ALL] and none added", name, sc.Capabilities)
	}
	var metricsPort int32
	for _, p := range c.Ports {
		if p.Name == "metrics" {
			metricsPort = p.ContainerPort
		}
	}
	if metricsPort == 0 {
		t.Errorf("%s: no container port named metrics", name)
	}
	for _, p := range []struct {
		probe *corev1.Probe
		path  string
	}{{c.LivenessProbe, "/healthz"}, {c.ReadinessProbe, "/readyz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil || p.probe.HTTPGet.Path != p.path || p.probe.HTTPGet.Port.String() != "metrics" {
			t.Errorf("%s: want an HTTP probe of %s on the health port, got %+v", name, p.path, p.probe)
		}
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("%s: resources %+v: want cpu and memory requests and a memory limit", name, c.Resources)
	}
	env := map[string]string{}
	for _, e := range c.Env {
		if _, dup := env[e.Name]; dup {
			t.Errorf("%s: %s set twice", name, e.Name)
		}
		if e.ValueFrom != nil {
			t.Errorf("%s: %s from valueFrom; secrets are mounted as files", name, e.Name)
		}
		env[e.Name] = e.Value
		if slices.Contains(secretVars, e.Name) {
			t.Errorf("%s: secret %s given as a value", name, e.Name)
		}
	}
	if env["EASGUARD_HTTP_ADDR"] != ":"+itoa(metricsPort) {
		t.Errorf("%s: EASGUARD_HTTP_ADDR %q, but the probes use port %d", name, env["EASGUARD_HTTP_ADDR"], metricsPort)
	}
	// Every *_FILE secret variable names a file of a mounted Secret volume.
	mounts := map[string]string{} // mount path -> volume
	for _, vm := range c.VolumeMounts {
		mounts[vm.MountPath] = vm.Name
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range ps.Volumes {
		volumes[v.Name] = v
	}
	files := map[string]string{}
	for k, v := range env {
		if !strings.HasPrefix(v, "/run/secrets/") {
			continue
		}
		dir, file := filepath.Split(v)
		vol, ok := volumes[mounts[strings.TrimSuffix(dir, "/")]]
		if !ok || vol.Secret == nil {
			t.Errorf("%s: %s=%s is not in a mounted Secret volume", name, k, v)
			continue
		}
		if len(vol.Secret.Items) != 1 || vol.Secret.Items[0].Path != file {
			t.Errorf("%s: %s: volume %s does not hold %s", name, k, vol.Name, file)
			continue
		}
		files[k] = vol.Secret.SecretName + "/" + vol.Secret.Items[0].Key
	}
	for _, v := range ps.Volumes {
		if v.Secret != nil && !slices.Contains(secretNames, v.Secret.SecretName) {
			t.Errorf("%s: mounts Secret %s, which the values do not name", name, v.Secret.SecretName)
		}
	}
	return env, files
}

func itoa(i int32) string { return strconv.Itoa(int(i)) }

const contoso = `
  - name: contoso
    env:
      EASGUARD_EXCHANGE_SERVER: ex01.contoso.com
      EASGUARD_EXCHANGE_USER: 'CONTOSO\svc-easguard'
      EASGUARD_MDM_GRAPH_TENANT: 11111111-1111-1111-1111-111111111111
      EASGUARD_EXCHANGE_WORKERS: 4
      EASGUARD_EVALUATOR_DRY_RUN: true
    secrets:
      exchangePassword: {name: contoso-exchange, key: password}
      smtpPassword: {name: contoso-smtp, key: password}
      graphClientSecret: {name: contoso-graph, key: client-secret}
`

const fabrikam = `
  - name: fabrikam
    env:
      EASGUARD_EXCHANGE_SERVER: mail.fabrikam.net
    secrets:
      exchangePassword: {name: fabrikam-exchange, key: password}
      smtpPassword: {name: fabrikam-smtp, key: pw}
      graphClientSecret: {name: fabrikam-graph, key: secret}
    workers:
      executor: {replicas: 3}
      matcher: {replicas: 1, resources: {requests: {cpu: 200m, memory: 128Mi}, limits: {memory: 512Mi}}}
    mdmWebhook: {enabled: true, port: 8444}
    extraVolumes: [{name: exchange-ca, configMap: {name: fabrikam-exchange-ca}}]
    extraVolumeMounts: [{name: exchange-ca, mountPath: /etc/easguard/exchange-ca, readOnly: true}]
    policy: |
      scope:
        include: {domains: [fabrikam.net]}
`

// want is what one organisation's workers must look like.
type want struct {
	org      string
	replicas map[string]int32 // by worker; absent: 2
	secrets  map[string]string
	policy   bool
}

func TestChart(t *testing.T) {
	contosoWant := want{org: "contoso", secrets: map[string]string{
		"EASGUARD_EXCHANGE_PASSWORD_FILE":       "contoso-exchange/password",
		"EASGUARD_MAILER_SMTP_PASSWORD_FILE":    "contoso-smtp/password",
		"EASGUARD_MDM_GRAPH_CLIENT_SECRET_FILE": "contoso-graph/client-secret",
	}}
	fabrikamWant := want{org: "fabrikam", replicas: map[string]int32{"executor": 3, "matcher": 1}, policy: true, secrets: map[string]string{
		"EASGUARD_EXCHANGE_PASSWORD_FILE":       "fabrikam-exchange/password",
		"EASGUARD_MAILER_SMTP_PASSWORD_FILE":    "fabrikam-smtp/pw",
		"EASGUARD_MDM_GRAPH_CLIENT_SECRET_FILE": "fabrikam-graph/secret",
	}}
	consoleValues := `
console:
  enabled: true
  publicURL: https://easguard.example.com
  env: {EASGUARD_CONSOLE_OIDC_ISSUER: "https://login.example.com/t/v2.0", EASGUARD_CONSOLE_OIDC_CLIENT_ID: console}
  secrets: {oidcClientSecret: {name: console-oidc, key: client-secret}}
  ingress: {enabled: true, className: nginx, host: easguard.example.com, tlsSecretName: easguard-tls}
secrets:
  natsPassword: {name: nats-auth, key: password}
env:
  EASGUARD_NATS_USER: easguard
`
	cases := []struct {
		name     string
		values   string
		orgs     []want
		natsURL  string
		console  bool
		monitors []string
	}{
		{
			name:     "one organisation",
			values:   "nats: {enabled: false, url: 'nats://nats-0.nats:4222,nats://nats-1.nats:4222'}\norgs:" + contoso,
			orgs:     []want{contosoWant},
			natsURL:  "nats://nats-0.nats:4222,nats://nats-1.nats:4222",
			monitors: []string{"eg-easguard-contoso"},
		},
		{
			name:     "two organisations with the console, a ServiceMonitor each",
			values:   "nats: {enabled: false, url: 'nats://nats:4222'}\norgs:" + contoso + fabrikam + consoleValues,
			orgs:     []want{contosoWant, fabrikamWant},
			natsURL:  "nats://nats:4222",
			console:  true,
			monitors: []string{"eg-easguard-contoso", "eg-easguard-fabrikam", "eg-easguard-console"},
		},
		{
			name:     "two organisations, one ServiceMonitor, NATS from the dependency",
			values:   "serviceMonitor: {perOrg: false}\norgs:" + contoso + fabrikam,
			orgs:     []want{contosoWant, fabrikamWant},
			natsURL:  "nats://eg-nats:4222",
			monitors: []string{"eg-easguard"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := decode(t, tc.values)
			wantDeployments := len(tc.orgs) * len(workers)
			if tc.console {
				wantDeployments++
			}
			if len(m.deployments) != wantDeployments {
				t.Errorf("%d Deployments, want %d: %v", len(m.deployments), wantDeployments, keys(m.deployments))
			}
			for _, o := range tc.orgs {
				for _, w := range workers {
					name := "eg-easguard-" + o.org + "-" + w
					d, ok := m.deployments[name]
					if !ok {
						t.Errorf("no Deployment %s", name)
						continue
					}
					wantReplicas, ok := o.replicas[w]
					if !ok {
						wantReplicas = 2
					}
					if d.Spec.Replicas == nil || *d.Spec.Replicas != wantReplicas {
						t.Errorf("%s: replicas %s, want %d", name, ptrString(d.Spec.Replicas), wantReplicas)
					}
					env, files := checkPod(t, name, d)
					for k, v := range map[string]string{
						"EASGUARD_ORG": o.org, "EASGUARD_WORKERS": w, "EASGUARD_NATS_URL": tc.natsURL, "EASGUARD_NATS_REPLICAS": "3",
					} {
						if env[k] != v {
							t.Errorf("%s: %s=%q, want %q", name, k, env[k], v)
						}
					}
					if o.org == "contoso" && (env["EASGUARD_EXCHANGE_WORKERS"] != "4" || env["EASGUARD_EVALUATOR_DRY_RUN"] != "true") {
						t.Errorf("%s: the org's env is not passed as strings: %v", name, env)
					}
					wantFiles := map[string]string{}
					for k, v := range o.secrets {
						if secretFor(k, w) {
							wantFiles[k] = v
						}
					}
					if tc.console { // the values' shared NATS password goes to every process
						wantFiles["EASGUARD_NATS_PASSWORD_FILE"] = "nats-auth/password"
					}
					if !reflect.DeepEqual(files, wantFiles) {
						t.Errorf("%s: secret files %v, want %v", name, files, wantFiles)
					}
					hasCA := slices.ContainsFunc(d.Spec.Template.Spec.Volumes, func(v corev1.Volume) bool {
						return v.ConfigMap != nil && v.ConfigMap.Name == "fabrikam-exchange-ca"
					})
					if hasCA != (o.org == "fabrikam") || len(d.Spec.Template.Spec.Containers[0].VolumeMounts) != len(d.Spec.Template.Spec.Volumes) {
						t.Errorf("%s: the org's extra volumes are not (only) where they belong", name)
					}
					if wa := env["EASGUARD_MDM_WEBHOOK_ADDR"]; (wa != "") != (o.org == "fabrikam" && w == "mdm") || (wa != "" && wa != ":8444") {
						t.Errorf("%s: EASGUARD_MDM_WEBHOOK_ADDR %q", name, wa)
					}
					if pf := env["EASGUARD_EVALUATOR_POLICY_FILE"]; (pf != "") != (o.policy && w == "evaluator") {
						t.Errorf("%s: policy file %q", name, pf)
					}
				}
				if o.policy {
					cm, ok := m.configMaps["eg-easguard-"+o.org+"-policy"]
					if !ok || !strings.Contains(cm.Data["policy.yaml"], "scope:") {
						t.Errorf("%s: no policy ConfigMap", o.org)
					}
				}
				if wh, ok := m.services["eg-easguard-"+o.org+"-mdm-webhook"]; ok != (o.org == "fabrikam") {
					t.Errorf("%s: webhook Service %v", o.org, ok)
				} else if ok {
					sel := labels.SelectorFromSet(wh.Spec.Selector)
					for n, d := range m.deployments {
						if sel.Matches(labels.Set(d.Spec.Template.Labels)) != (n == "eg-easguard-fabrikam-mdm") {
							t.Errorf("the webhook Service of %s selects %s: %v", o.org, n, n == "eg-easguard-fabrikam-mdm")
						}
					}
					if wh.Spec.Ports[0].TargetPort.String() != "webhook" || !slices.ContainsFunc(m.deployments["eg-easguard-fabrikam-mdm"].Spec.Template.Spec.Containers[0].Ports, func(p corev1.ContainerPort) bool { return p.Name == "webhook" && p.ContainerPort == 8444 }) {
						t.Errorf("the webhook Service does not reach the mdm container's port 8444")
					}
				}
				svc, ok := m.services["eg-easguard-"+o.org+"-metrics"]
				if !ok {
					t.Errorf("%s: no metrics Service", o.org)
				} else {
					sel := labels.SelectorFromSet(svc.Spec.Selector)
					for _, w := range workers {
						if d := m.deployments["eg-easguard-"+o.org+"-"+w]; d != nil && !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
							t.Errorf("metrics Service of %s does not select %s", o.org, w)
						}
					}
					for n, d := range m.deployments {
						if !strings.Contains(n, "-"+o.org+"-") && sel.Matches(labels.Set(d.Spec.Template.Labels)) {
							t.Errorf("metrics Service of %s selects %s", o.org, n)
						}
					}
				}
			}
			if tc.console {
				checkConsole(t, m, tc.orgs)
			}
			if got := keys(m.monitors); !slices.Equal(got, sorted(tc.monitors)) {
				t.Errorf("ServiceMonitors %v, want %v", got, sorted(tc.monitors))
			}
			checkMonitors(t, m)
			checkPDBs(t, m)
			checkRules(t, m)
			for _, s := range []string{"password:", "stringData", "kind: Secret\n"} {
				if strings.Contains(m.raw, s) {
					t.Errorf("the manifests hold %q", s)
				}
			}
		})
	}
}

// secretFor says which workers read which secret file.
func secretFor(env, worker string) bool {
	switch env {
	case "EASGUARD_EXCHANGE_PASSWORD_FILE":
		return worker == "collector" || worker == "executor"
	case "EASGUARD_MAILER_SMTP_PASSWORD_FILE":
		return worker == "mailer"
	case "EASGUARD_MDM_GRAPH_CLIENT_SECRET_FILE":
		return worker == "mdm"
	}
	return false
}

func checkConsole(t testing.TB, m *manifests, orgs []want) {
	t.Helper()
	d, ok := m.deployments["eg-easguard-console"]
	if !ok {
		t.Fatalf("no console Deployment")
	}
	env, files := checkPod(t, "console", d)
	var names []string
	for _, o := range orgs {
		names = append(names, o.org)
	}
	for k, v := range map[string]string{
		"EASGUARD_WORKERS": "none", "EASGUARD_CONSOLE_ORGS": strings.Join(names, ","), "EASGUARD_CONSOLE_BEHIND_PROXY": "true",
		"EASGUARD_ORG": names[0], "EASGUARD_CONSOLE_ADDR": ":8080", "EASGUARD_CONSOLE_PUBLIC_URL": "https://easguard.example.com",
	} {
		if env[k] != v {
			t.Errorf("console: %s=%q, want %q", k, env[k], v)
		}
	}
	wantFiles := map[string]string{"EASGUARD_CONSOLE_OIDC_CLIENT_SECRET_FILE": "console-oidc/client-secret", "EASGUARD_NATS_PASSWORD_FILE": "nats-auth/password"}
	if !reflect.DeepEqual(files, wantFiles) {
		t.Errorf("console: secret files %v, want %v", files, wantFiles)
	}
	svc, ok := m.services["eg-easguard-console"]
	if !ok || !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(d.Spec.Template.Labels)) {
		t.Fatalf("no console Service selecting the console")
	}
	ing, ok := m.ingresses["eg-easguard-console"]
	if !ok {
		t.Fatalf("no console Ingress")
	}
	b := ing.Spec.Rules[0].HTTP.Paths[0].Backend.Service
	if b.Name != svc.Name || b.Port.Name != "http" || len(ing.Spec.TLS) != 1 {
		t.Errorf("Ingress %+v does not lead to the console Service over TLS", ing.Spec)
	}
}

// checkPDBs: a PodDisruptionBudget of one unavailable pod for every
// Deployment of two replicas or more, selecting its pods and no others.
func checkPDBs(t testing.TB, m *manifests) {
	t.Helper()
	for n, d := range m.deployments {
		pdb, ok := m.pdbs[n]
		if (*d.Spec.Replicas >= 2) != ok {
			t.Errorf("%s: %d replicas, PodDisruptionBudget %v", n, *d.Spec.Replicas, ok)
			continue
		}
		if !ok {
			continue
		}
		if pdb.Spec.MaxUnavailable == nil || pdb.Spec.MaxUnavailable.IntValue() != 1 {
			t.Errorf("PodDisruptionBudget %s: maxUnavailable %v", n, pdb.Spec.MaxUnavailable)
		}
		sel, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
		if err != nil {
			t.Fatal(err)
		}
		for n2, d2 := range m.deployments {
			if sel.Matches(labels.Set(d2.Spec.Template.Labels)) != (n2 == n) {
				t.Errorf("PodDisruptionBudget %s selects %s: %v", n, n2, n2 == n)
			}
		}
	}
	if len(m.pdbs) > len(m.deployments) {
		t.Errorf("PodDisruptionBudgets %v for Deployments %v", keys(m.pdbs), keys(m.deployments))
	}
}

// checkMonitors: every ServiceMonitor selects at least one metrics Service,
// each scraped on its port named metrics at /metrics, and every metrics
// Service (one with a metrics port) is scraped.
func checkMonitors(t testing.TB, m *manifests) {
	t.Helper()
	scraped := map[string]bool{}
	for n, sm := range m.monitors {
		sel, err := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
		if err != nil {
			t.Fatalf("ServiceMonitor %s: %v", n, err)
		}
		if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "metrics" || sm.Spec.Endpoints[0].Path != "/metrics" {
			t.Errorf("ServiceMonitor %s endpoints %+v", n, sm.Spec.Endpoints)
		}
		found := false
		for sn, svc := range m.services {
			if sel.Matches(labels.Set(svc.Labels)) {
				found = true
				if scraped[sn] {
					t.Errorf("Service %s scraped twice", sn)
				}
				scraped[sn] = true
				if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == "metrics" }) {
					t.Errorf("Service %s has no port named metrics", sn)
				}
			}
		}
		if !found {
			t.Errorf("ServiceMonitor %s selects no Service", n)
		}
	}
	for sn, svc := range m.services {
		hasMetrics := slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == "metrics" })
		if hasMetrics && !scraped[sn] {
			t.Errorf("Service %s is not scraped", sn)
		}
	}
}

// checkRules: the PrometheusRule holds exactly the groups of
// deploy/prometheus/easguard.rules.yml, and the chart's copy is that file.
func checkRules(t testing.TB, m *manifests) {
	t.Helper()
	if len(m.rules) != 1 {
		t.Fatalf("%d PrometheusRules, want 1", len(m.rules))
	}
	var want struct {
		Groups []monitoringv1.RuleGroup `json:"groups"`
	}
	b, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, &want); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	if len(want.Groups) == 0 || len(want.Groups[0].Rules) < 5 {
		t.Fatalf("%s: too few rules: %+v", rulesFile, want.Groups)
	}
	for _, r := range m.rules {
		if !reflect.DeepEqual(r.Spec.Groups, want.Groups) {
			t.Errorf("PrometheusRule %s's groups differ from %s", r.Name, rulesFile)
		}
	}
}

func TestRulesCopyIsTheOriginal(t *testing.T) {
	orig, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	cp, err := os.ReadFile(chartCopy)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(orig, cp) {
		t.Fatalf("%s differs from %s: run `make helm-rules` and commit", chartCopy, rulesFile)
	}
}

// The NATS dependency is declared as the NATS project's chart, for a
// three-node JetStream cluster; it is not vendored (charts/ is fetched by
// `helm dependency update` where the network allows).
func TestNATSDependency(t *testing.T) {
	ch := loadChart(t)
	var dep *chartv2.Dependency
	for _, d := range ch.Metadata.Dependencies {
		if d.Name == "nats" {
			dep = d
		}
	}
	if dep == nil {
		t.Fatalf("Chart.yaml has no nats dependency: %+v", ch.Metadata.Dependencies)
	}
	if dep.Repository != "https://nats-io.github.io/k8s/helm/charts/" || dep.Condition != "nats.enabled" || dep.Version == "" {
		t.Errorf("nats dependency %+v", dep)
	}
	if err := ch.Validate(); err != nil {
		t.Errorf("Chart.yaml: %v", err)
	}
	nats, _ := ch.Values["nats"].(map[string]any)
	cfg, _ := nats["config"].(map[string]any)
	cluster, _ := cfg["cluster"].(map[string]any)
	js, _ := cfg["jetstream"].(map[string]any)
	if nats["enabled"] != true || cluster["enabled"] != true || toInt(cluster["replicas"]) != 3 || js["enabled"] != true || toInt(nats["streamReplicas"]) != 3 {
		t.Errorf("values.yaml: nats %+v, want a three-node JetStream cluster and streams of 3 replicas", nats)
	}
}

func toInt(v any) int {
	switch n := v.(type) {
	case int:
		return n
	case int64:
		return int(n)
	case float64:
		return int(n)
	}
	return -1
}

// Helm's own linter (Chart.yaml, values.yaml, the templates, deprecated
// APIs) finds nothing but the NATS dependency missing from charts/, which
// is fetched only where the network allows (README).
func TestLint(t *testing.T) {
	vals, err := common.ReadValues([]byte("nats: {enabled: false, url: 'nats://nats:4222'}\norgs:" + contoso + fabrikam + "console: {enabled: true, ingress: {enabled: true}, secrets: {localUsers: {name: console-users, key: users}}}"))
	if err != nil {
		t.Fatal(err)
	}
	l := lint.RunAll(chartDir, vals, namespace)
	for _, m := range l.Messages {
		if m.Severity >= support.WarningSev && !strings.Contains(m.Err.Error(), "missing these dependencies: nats") {
			t.Errorf("helm lint: %s", m)
		}
	}
}

// Values the chart refuses, with the reason.
func TestChartRefuses(t *testing.T) {
	cases := []struct {
		name, values, reason string
	}{
		{"a secret as a value", "nats: {url: nats://n:4222}\norgs:\n  - name: contoso\n    env: {EASGUARD_EXCHANGE_PASSWORD: hunter2-do-not-render}", "EASGUARD_EXCHANGE_PASSWORD holds a secret"},
		{"a secret as a shared value", "nats: {url: nats://n:4222}\nenv: {EASGUARD_NATS_PASSWORD: hunter2-do-not-render}\norgs:\n  - name: contoso", "EASGUARD_NATS_PASSWORD holds a secret"},
		{"a variable the chart sets", "nats: {url: nats://n:4222}\norgs:\n  - name: contoso\n    env: {EASGUARD_ORG: other}", "EASGUARD_ORG is set by the chart"},
		{"the console's URL as a variable", "nats: {url: nats://n:4222}\norgs:\n  - name: contoso\nconsole: {enabled: true, env: {EASGUARD_CONSOLE_PUBLIC_URL: https://x}}", "EASGUARD_CONSOLE_PUBLIC_URL is set by the chart"},
		{"no NATS", "nats: {enabled: false}\norgs:\n  - name: contoso", "nats.url is required"},
		{"a bad org name", "nats: {url: nats://n:4222}\norgs:\n  - name: Contoso.com", "does not match pattern"},
		{"an org name too long", "nats: {url: nats://n:4222}\norgs:\n  - name: " + strings.Repeat("a", 41), "maxLength"},
		{"names too long", "fullnameOverride: " + strings.Repeat("r", 20) + "\nnats: {url: nats://n:4222}\norgs:\n  - name: " + strings.Repeat("a", 40), "longer than Kubernetes' 63 characters"},
		{"an org twice", "nats: {url: nats://n:4222}\norgs:\n  - name: contoso\n  - name: contoso", "listed twice"},
		{"an unknown secret", "nats: {url: nats://n:4222}\norgs:\n  - name: contoso\n    secrets: {exchangePasword: {name: x, key: k}}", "unknown secret"},
		{"a secret without a key", "nats: {url: nats://n:4222}\norgs:\n  - name: contoso\n    secrets: {exchangePassword: {name: x}}", "missing property 'key'"},
		{"a misspelt setting", "nats: {url: nats://n:4222}\norgs:\n  - name: contoso\n    workers: {executor: {replica: 3}}", "additional properties 'replica' not allowed"},
		{"an unknown worker", "nats: {url: nats://n:4222}\norgs:\n  - name: contoso\n    workers: {collecter: {replicas: 3}}", "additional properties 'collecter' not allowed"},
		{"replicas as a string", "nats: {url: nats://n:4222}\nworkers: {mailer: {replicas: \"2\"}}", "want integer"},
		{"the console without orgs", "nats: {url: nats://n:4222}\nconsole: {enabled: true}", "needs at least one organisation"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			files, err := render(t, tc.values)
			if err == nil {
				t.Fatalf("rendered, want an error about %q", tc.reason)
			}
			if !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("error %v, want %q", err, tc.reason)
			}
			for n, f := range files {
				if strings.Contains(f, "hunter2") {
					t.Errorf("%s holds the secret value", n)
				}
			}
		})
	}
}

// An empty organisation list renders only what is shared, and validly.
func TestChartWithoutOrganisations(t *testing.T) {
	m := decode(t, "nats: {enabled: false, url: nats://n:4222}")
	if len(m.deployments) != 0 || len(m.monitors) != 0 || len(m.rules) != 1 {
		t.Errorf("deployments %v, monitors %v, rules %d", keys(m.deployments), keys(m.monitors), len(m.rules))
	}
}

func ptrString[T any](p *T) string {
	if p == nil {
		return "unset"
	}
	return fmt.Sprint(*p)
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	sort.Strings(s)
	return s
}
