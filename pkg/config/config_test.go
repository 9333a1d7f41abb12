package config_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/config"
)

const password = "s3cr3t-Pa55!"

// clearEnv unsets every EASGUARD_ variable for the test.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, config.Prefix+"_") {
			t.Setenv(k, "")
			os.Unsetenv(k)
		}
	}
}

func setEnv(t *testing.T, env map[string]string) {
	t.Helper()
	clearEnv(t)
	for k, v := range env {
		t.Setenv(k, v)
	}
}

func TestLoadCommon(t *testing.T) {
	setEnv(t, map[string]string{"EASGUARD_ORG": "contoso", "EASGUARD_LEASE_TTL": "5s", "EASGUARD_NATS_URL": "nats://a:4222, nats://b:4222"})
	var c config.Common
	if err := config.Load(&c); err != nil {
		t.Fatal(err)
	}
	if c.Org != "contoso" || c.LeaseTTL != 5*time.Second || c.HTTPAddr != "127.0.0.1:9090" || c.NatsReplicas != 1 {
		t.Fatalf("loaded %+v", c)
	}
	if topo := c.Topology(); topo.LeaseTTL != 5*time.Second || topo.Replicas != 1 {
		t.Fatalf("topology %+v", topo)
	}
}

func TestLoadErrorsNameTheVariable(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want string
	}{
		{"missing org", map[string]string{}, "EASGUARD_ORG is required"},
		{"bad org", map[string]string{"EASGUARD_ORG": "Contoso Ltd"}, "EASGUARD_ORG: invalid organisation name"},
		{"bad duration", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_LEASE_TTL": "soon"}, `EASGUARD_LEASE_TTL: "soon" is not a valid duration`},
		{"lease too short", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_LEASE_TTL": "1s"}, "EASGUARD_LEASE_TTL: must be at least 2s"},
		{"bad replicas", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_NATS_REPLICAS": "2"}, "EASGUARD_NATS_REPLICAS: must be 1, 3 or 5"},
		{"bad level", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_LOG_LEVEL": "loud"}, "EASGUARD_LOG_LEVEL"},
		{"bad http addr", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_HTTP_ADDR": "9090"}, "EASGUARD_HTTP_ADDR"},
		{"bad nats url", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_NATS_URL": "http://x:1"}, "EASGUARD_NATS_URL"},
		{"bad otel endpoint", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_OTEL_ENDPOINT": "collector:4318"}, "EASGUARD_OTEL_ENDPOINT"},
		{"user without password", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_NATS_USER": "u"}, "EASGUARD_NATS_USER"},
		{"token and password", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_NATS_USER": "u", "EASGUARD_NATS_PASSWORD": password, "EASGUARD_NATS_TOKEN": password}, "EASGUARD_NATS_TOKEN"},
		{"secret twice", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_NATS_PASSWORD": password, "EASGUARD_NATS_PASSWORD_FILE": "/x"}, "set EASGUARD_NATS_PASSWORD or EASGUARD_NATS_PASSWORD_FILE, not both"},
		{"secret file missing", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_NATS_PASSWORD_FILE": "/does/not/exist"}, "EASGUARD_NATS_PASSWORD_FILE"},
		{"password in nats url", map[string]string{"EASGUARD_ORG": "c", "EASGUARD_NATS_URL": "http://u:" + password + "@x:1"}, "EASGUARD_NATS_URL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			setEnv(t, tt.env)
			var c config.Common
			err := config.Load(&c)
			if err == nil {
				t.Fatal("loaded")
			}
			if !errors.Is(err, config.ErrConfig) {
				t.Errorf("%v does not wrap ErrConfig", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not say %q", err, tt.want)
			}
			if strings.Contains(err.Error(), password) {
				t.Errorf("error %q leaks the secret", err)
			}
		})
	}
}

func TestSecretFromFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(path, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	setEnv(t, map[string]string{"EASGUARD_ORG": "c", "EASGUARD_NATS_USER": "svc", "EASGUARD_NATS_PASSWORD_FILE": path})
	var c config.Common
	if err := config.Load(&c); err != nil {
		t.Fatal(err)
	}
	if c.NatsPassword.Reveal() != password {
		t.Fatalf("password %q", c.NatsPassword.Reveal())
	}
	if _, ok := os.LookupEnv("EASGUARD_NATS_PASSWORD"); ok {
		t.Fatal("the secret read from its file was left in the environment for child processes")
	}
}

func TestSecretNeverPrints(t *testing.T) {
	s := config.Secret(password)
	var logBuf bytes.Buffer
	slog.New(slog.NewJSONHandler(&logBuf, nil)).Info("cfg", "password", s, "cfg", struct{ P config.Secret }{s})
	js, _ := json.Marshal(struct{ P config.Secret }{s})
	outputs := []string{
		fmt.Sprint(s), fmt.Sprintf("%v %s %q %#v %+v", s, s, s, s, s), fmt.Sprintf("%+v", config.Common{NatsPassword: s}),
		fmt.Sprintf("%#v", config.Common{NatsPassword: s}), logBuf.String(), string(js),
	}
	for _, out := range outputs {
		if strings.Contains(out, password) {
			t.Errorf("secret printed: %s", out)
		}
	}
	if s.Reveal() != password {
		t.Fatal("Reveal lost the value")
	}
}

func TestUsageListsEveryVariable(t *testing.T) {
	vars, err := config.Vars(&config.Common{})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := config.Usage(&buf, &config.Common{}); err != nil {
		t.Fatal(err)
	}
	want := []string{"EASGUARD_ORG", "EASGUARD_NATS_URL", "EASGUARD_NATS_USER", "EASGUARD_NATS_PASSWORD", "EASGUARD_NATS_TOKEN",
		"EASGUARD_NATS_CREDS_FILE", "EASGUARD_NATS_REPLICAS", "EASGUARD_LEASE_TTL", "EASGUARD_RETENTION", "EASGUARD_ACK_WAIT", "EASGUARD_MAX_DELIVER", "EASGUARD_CONCURRENCY", "EASGUARD_HTTP_ADDR", "EASGUARD_DEBUG_ADDR",
		"EASGUARD_LOG_LEVEL", "EASGUARD_OTEL_ENDPOINT", "EASGUARD_INSTANCE_ID", "EASGUARD_SHUTDOWN_TIMEOUT", "EASGUARD_MEMORY_LIMIT_RATIO", "EASGUARD_BIND_TIMEOUT"}
	if len(vars) != len(want) {
		t.Errorf("%d variables, want %d", len(vars), len(want))
	}
	for i, k := range want {
		if i < len(vars) && vars[i].Key != k {
			t.Errorf("variable %d is %s, want %s", i, vars[i].Key, k)
		}
		if !strings.Contains(buf.String(), k) {
			t.Errorf("usage lacks %s", k)
		}
	}
	if !strings.Contains(buf.String(), "EASGUARD_NATS_PASSWORD_FILE") {
		t.Error("usage does not mention the _FILE form of secrets")
	}
}

func TestEnvconfigTagIsRefused(t *testing.T) {
	type bad struct {
		URL string `envconfig:"NATS_URL" desc:"x"`
	}
	clearEnv(t)
	if err := config.Load(&bad{}); err == nil || !strings.Contains(err.Error(), "envconfig tag") {
		t.Fatalf("err = %v", err)
	}
	type undocumented struct {
		URL string `split_words:"true"`
	}
	if err := config.Load(&undocumented{}); err == nil || !strings.Contains(err.Error(), "desc") {
		t.Fatalf("err = %v", err)
	}
}
