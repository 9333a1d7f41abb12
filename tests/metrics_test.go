package tests

import (
	"encoding/json"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.yaml.in/yaml/v3"
)

// scrape reads the stack's /metrics as Prometheus does.
func (s *stack) scrape() map[string]*dto.MetricFamily {
	s.t.Helper()
	resp, err := http.Get("http://" + s.svc.HTTPAddr + "/metrics")
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		s.t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// metricValue sums the samples of a family (a counter's or gauge's value,
// a histogram's count) whose labels include every one of want.
func metricValue(fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	f := fams[name]
	if f == nil {
		return 0
	}
	sum := 0.0
next:
	for _, m := range f.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if labels[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return sum
}

// metricNames lists the families whose name starts with prefix, for a
// failure message.
func metricNames(fams map[string]*dto.MetricFamily, prefix string) string {
	var out []string
	for n := range fams {
		if strings.HasPrefix(n, prefix) {
			out = append(out, n)
		}
	}
	return strings.Join(out, " ")
}

// The alerting rules and the dashboard under deploy/ query only metrics
// README documents (its Observability table, whose names the flow tests
// read from /metrics): a metric renamed in code and table but not in a
// rule would leave an alert that can never fire.
func TestDeployQueriesDocumentedMetrics(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	// A row names the metric first, then its labels.
	documented, labels := map[string]bool{}, map[string]bool{"easguard_org": true}
	token := regexp.MustCompile("`(easguard_[a-z_]+)`")
	for _, row := range regexp.MustCompile("(?m)^\\| `easguard_.*$").FindAllString(string(readme), -1) {
		for i, m := range token.FindAllStringSubmatch(row, -1) {
			if i == 0 {
				documented[m[1]] = true
			} else {
				labels[m[1]] = true
			}
		}
	}
	if len(documented) < 10 {
		t.Fatalf("found %d metrics in README's table", len(documented))
	}
	name := regexp.MustCompile(`\beasguard_[a-z_]+`)
	for _, file := range []string{"../deploy/prometheus/easguard.rules.yml", "../deploy/grafana/easguard.json"} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		var exprs []string
		if strings.HasSuffix(file, ".json") {
			var dash struct {
				Panels []struct {
					Title   string
					Targets []struct{ Expr string }
				}
			}
			if err := json.Unmarshal(b, &dash); err != nil {
				t.Fatalf("%s: %v", file, err)
			}
			for _, p := range dash.Panels {
				for _, tg := range p.Targets {
					exprs = append(exprs, tg.Expr)
				}
			}
		} else {
			var rules struct {
				Groups []struct {
					Rules []struct{ Alert, Expr string }
				}
			}
			if err := yaml.Unmarshal(b, &rules); err != nil {
				t.Fatalf("%s: %v", file, err)
			}
			for _, g := range rules.Groups {
				for _, r := range g.Rules {
					exprs = append(exprs, r.Expr)
				}
			}
		}
		if len(exprs) == 0 {
			t.Fatalf("%s: no queries", file)
		}
		for _, e := range exprs {
			for _, n := range name.FindAllString(e, -1) {
				base := n
				for _, suffix := range []string{"_bucket", "_count", "_sum"} {
					if b := strings.TrimSuffix(n, suffix); documented[b] {
						base = b
					}
				}
				if !documented[base] && !labels[n] {
					t.Errorf("%s queries %s, which README's metrics table does not list", file, n)
				}
			}
		}
	}
}
