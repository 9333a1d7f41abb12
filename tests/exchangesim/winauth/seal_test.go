package winauth_test

import (
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"github.com/masterzen/winrm"

	"github.com/easguard/easguard/tests/exchangesim/winauth"
)

// newEncryptingClient builds a masterzen/winrm client with the library's own
// NTLM message encryption (ported from pywinrm), an implementation of the
// session-encrypted format independent of easguard's and of the simulator's.
func newEncryptingClient(t testing.TB, s *simulator, user, password string) *winrm.Client {
	t.Helper()
	enc, err := winrm.NewEncryption("ntlm")
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(s.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	port, err := strconv.Atoi(u.Port())
	if err != nil {
		t.Fatal(err)
	}
	params := winrm.NewParameters("PT60S", "en-US", 153600)
	params.TransportDecorator = func() winrm.Transporter { return enc }
	client, err := winrm.NewClientWithParameters(winrm.NewEndpoint(u.Hostname(), port, false, false, nil, nil, nil, 0), user, password, params)
	if err != nil {
		t.Fatal(err)
	}
	return client
}

// Over plain HTTP the server behaves like WinRM with AllowUnencrypted=false:
// Basic and NTLM without sealing are refused whatever the credentials, with
// either answer reported for Windows (Options.UnencryptedStatus), and
// accepted once the host allows unencrypted bodies. Sealed NTLM always
// works, and over HTTPS nothing is refused.
func TestUnencryptedBodiesOverHTTP(t *testing.T) {
	clients := []struct {
		name   string
		sealed bool
		client func(t testing.TB, s *simulator) *winrm.Client
	}{
		{"Basic", false, func(t testing.TB, s *simulator) *winrm.Client {
			return newWinRMClient(t, s, false, "alice", alicePassword)
		}},
		{"NTLM without sealing", false, func(t testing.TB, s *simulator) *winrm.Client {
			return newWinRMClient(t, s, true, "alice", alicePassword)
		}},
		{"NTLM sealed (masterzen Encryption)", true, func(t testing.TB, s *simulator) *winrm.Client {
			return newEncryptingClient(t, s, "alice", alicePassword)
		}},
	}
	hosts := []struct {
		name    string
		tls     bool
		opts    winauth.Options
		refuses bool
		status  string
	}{
		{"HTTP, default (401)", false, winauth.Options{}, true, "401"},
		{"HTTP, default answering 500", false, winauth.Options{UnencryptedStatus: http.StatusInternalServerError}, true, "500"},
		{"HTTP, AllowUnencrypted", false, winauth.Options{AllowUnencrypted: true}, false, ""},
		{"HTTPS, default", true, winauth.Options{}, false, ""},
	}
	for _, h := range hosts {
		for _, c := range clients {
			if c.sealed && h.tls {
				continue // the library's encryption transport does not speak TLS to a test CA
			}
			t.Run(h.name+"/"+c.name, func(t *testing.T) {
				opts := h.opts
				opts.Basic, opts.NTLM = true, true
				sim := startSimulatorAs(t, h.tls, opts)
				_, err := c.client(t, sim).CreateShell()
				if !h.refuses || c.sealed {
					if err != nil {
						t.Fatalf("CreateShell: %v", err)
					}
					if got := sim.served(); len(got) != 1 || got[0] != "Alice" {
						t.Fatalf("served %q, want [Alice]", got)
					}
					return
				}
				if err == nil || !strings.Contains(err.Error(), h.status) {
					t.Fatalf("CreateShell: %v, want a refusal with HTTP %s", err, h.status)
				}
				if len(sim.served()) != 0 {
					t.Fatal("an unencrypted body reached the handler")
				}
				failures := sim.failureReasons()
				if len(failures) == 0 || !strings.Contains(failures[len(failures)-1].Error(), "unencrypted") {
					t.Fatalf("failures %v, want an unencrypted-message refusal", failures)
				}
			})
		}
	}
}
