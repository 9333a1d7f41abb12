package exchange_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// NTLM over plain HTTP against a simulator with Windows' default
// AllowUnencrypted=false: only sealed bodies are accepted, so a pool that
// starts and runs cmdlets proves every body went sealed and every answer
// was unsealed and its signature checked, through the real masterzen client.
func TestSealedNTLMOverHTTP(t *testing.T) {
	s := startSim(t, exchangesim.Config{CAS: []string{"EX01", "EX02"}})
	cfg := simConfig(t, s)
	if cfg.HTTPS || cfg.Auth != "ntlm" || cfg.AllowUnencrypted {
		t.Fatalf("ExchangeConfig is not NTLM over HTTP without the opt-in: %+v", cfg)
	}
	p := newPool(t, cfg)
	c := exchange.NewClient(p, cfg)
	if _, err := c.GetOrgSettings(context.Background()); err != nil {
		t.Fatalf("a cmdlet over sealed NTLM: %v", err)
	}
	var seen int
	err := c.ListPartnerships(context.Background(), exchange.ListOptions{}, func(ps []exchange.Partnership) error {
		seen += len(ps)
		return nil
	})
	if err != nil || seen != s.Org.DeviceCount() {
		t.Fatalf("listing over sealed NTLM: %d of %d partnerships, err %v", seen, s.Org.DeviceCount(), err)
	}
}

// A wrong password over sealed NTLM is still an authentication failure an
// administrator must fix, not a transient one.
func TestSealedNTLMWrongPassword(t *testing.T) {
	s := startSim(t, exchangesim.Config{})
	cfg := simConfig(t, s)
	cfg.Password = config.Secret("wrong")
	_, err := exchange.NewPool(context.Background(), cfg, quiet())
	if !errors.Is(err, exchange.ErrAuth) || !exchange.IsFatal(err) || strings.Contains(err.Error(), "wrong") {
		t.Fatalf("err = %v", err)
	}
}

// Basic over HTTP works only where WinRM allows unencrypted bodies: the
// opt-in lets easguard start, and a host that refuses (with either answer
// reported for Windows, see winauth.Options.UnencryptedStatus) stops it.
func TestBasicOverHTTPNeedsAllowUnencrypted(t *testing.T) {
	basic := func(s *exchangesim.Sim) exchange.Config {
		cfg := simConfig(t, s)
		cfg.Auth, cfg.AllowUnencrypted, cfg.Workers = "basic", true, 1
		return cfg
	}
	for _, status := range []int{0, http.StatusInternalServerError} {
		t.Run("host refuses with "+http.StatusText(max(status, 401)), func(t *testing.T) {
			s := startSim(t, exchangesim.Config{UnencryptedStatus: status})
			_, err := exchange.NewPool(context.Background(), basic(s), quiet())
			if err == nil {
				t.Fatal("a pool started with Basic over HTTP against a host with AllowUnencrypted=false")
			}
		})
	}
	t.Run("host allows", func(t *testing.T) {
		// This is the lab setting the opt-in exists for.
		s := startSim(t, exchangesim.Config{AllowUnencrypted: true})
		cfg := basic(s)
		if _, err := exchange.NewClient(newPool(t, cfg), cfg).GetOrgSettings(context.Background()); err != nil {
			t.Fatal(err)
		}
	})
}

// exchangeSpec embeds Config the way the service does, so that Load names
// variables as an administrator sees them.
type exchangeSpec struct {
	Exchange exchange.Config
}

func (s *exchangeSpec) Validate() error { return s.Exchange.Validate() }

func TestConfigRefusesBasicOverHTTP(t *testing.T) {
	for _, tc := range []struct {
		name    string
		env     map[string]string
		wantErr bool
	}{
		{"basic over HTTP", map[string]string{"AUTH": "basic", "HTTPS": "false"}, true},
		{"basic over HTTP with the opt-in", map[string]string{"AUTH": "basic", "HTTPS": "false", "ALLOW_UNENCRYPTED": "true"}, false},
		{"basic over HTTPS", map[string]string{"AUTH": "basic"}, false},
		{"ntlm over HTTP is sealed", map[string]string{"HTTPS": "false"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("EASGUARD_EXCHANGE_SERVER", "ex01.contoso.com")
			t.Setenv("EASGUARD_EXCHANGE_USER", "svc")
			t.Setenv("EASGUARD_EXCHANGE_PASSWORD", "pw")
			for k, v := range tc.env {
				t.Setenv("EASGUARD_EXCHANGE_"+k, v)
			}
			err := config.Load(&exchangeSpec{})
			if !tc.wantErr {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, config.ErrConfig) || !strings.Contains(err.Error(), "EASGUARD_EXCHANGE_AUTH") ||
				!strings.Contains(err.Error(), "EASGUARD_EXCHANGE_ALLOW_UNENCRYPTED") {
				t.Fatalf("err = %v, want a config error naming EASGUARD_EXCHANGE_AUTH and the opt-in", err)
			}
		})
	}
}
