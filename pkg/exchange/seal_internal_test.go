package exchange

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/masterzen/winrm/soap"

	"github.com/easguard/easguard/tests/exchangesim/winauth"
)

// tamperingWriter flips one byte of the sealed ciphertext it passes on.
type tamperingWriter struct {
	http.ResponseWriter
}

func (w tamperingWriter) Write(p []byte) (int, error) {
	if strings.HasPrefix(w.Header().Get("Content-Type"), "multipart/encrypted") {
		p = bytes.Clone(p)
		p[len(p)-len("--Encrypted Boundary--\r\n")-1] ^= 1
	}
	return w.ResponseWriter.Write(p)
}

// sealedServer is a WinRM-like HTTP endpoint with Windows' default
// AllowUnencrypted=false (the simulator's authentication layer) answering a
// SOAP echo, and a switch that corrupts sealed answers on the wire.
func sealedServer(t *testing.T) (*httptest.Server, *atomic.Bool, *transport) {
	t.Helper()
	var tamper atomic.Bool
	echo := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/soap+xml;charset=UTF-8")
		_, _ = w.Write(body)
	})
	auth := winauth.Middleware(winauth.StaticAccounts{"svc": "pw"}, winauth.Options{NTLM: true}, echo)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if tamper.Load() {
			w = tamperingWriter{w}
		}
		auth.ServeHTTP(w, r)
	}))
	srv.Config.ConnContext = winauth.ConnContext
	srv.Start()
	t.Cleanup(srv.Close)
	host, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	p, _ := strconv.Atoi(port)
	var rt atomic.Int64
	tr := newTransport(context.Background(), transportConfig{ntlm: true, user: `CONTOSO\svc`, pass: "pw", opTimeout: time.Second},
		target{fqdn: host, port: p}, &rt)
	return srv, &tamper, tr
}

func post(tr *transport) (string, error) {
	m := soap.NewMessage()
	m.NewBody()
	defer m.Free()
	return tr.Post(nil, m)
}

// An answer whose sealed bytes were changed on the way fails the NTLM
// signature check and is refused; the lane then authenticates again and
// carries on. So does a lane whose connection was replaced: the server
// answers 401 to a context it does not know, and the lane authenticates on
// the new connection and resends.
func TestSealedAnswerIsChecked(t *testing.T) {
	_, tamper, tr := sealedServer(t)
	want, err := post(tr)
	if err != nil || !strings.Contains(want, "Envelope") {
		t.Fatalf("sealed round trip: %q, %v", want, err)
	}
	tamper.Store(true)
	if got, err := post(tr); !errors.Is(err, ErrTransient) || !strings.Contains(err.Error(), "signature") {
		t.Fatalf("tampered answer: %q, %v; want a signature error", got, err)
	}
	tamper.Store(false)
	if got, err := post(tr); err != nil || got != want {
		t.Fatalf("after a refused answer: %q, %v", got, err)
	}
	tr.sealOther.client.CloseIdleConnections()
	if got, err := post(tr); err != nil || got != want {
		t.Fatalf("on a new connection: %q, %v", got, err)
	}
}

// A sealed answer's buffer goes back to the pool only when the plaintext
// does not share it: overlaps must see any shared byte, and only those.
func TestOverlaps(t *testing.T) {
	buf := make([]byte, 16, 32)
	other := make([]byte, 16)
	for _, tc := range []struct {
		name string
		a, b []byte
		want bool
	}{
		{"the same slice", buf, buf, true},
		{"a part of it", buf[4:8], buf, true},
		{"its spare capacity", buf[16:20], buf[:4], true},
		{"another buffer", other, buf, false},
		{"an empty one", nil, buf, false},
		{"next to each other", buf[0:4:4], buf[4:8], false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := overlaps(tc.a, tc.b); got != tc.want {
				t.Fatalf("overlaps = %v, want %v", got, tc.want)
			}
			if got := overlaps(tc.b, tc.a); got != tc.want {
				t.Fatalf("overlaps, turned round = %v, want %v", got, tc.want)
			}
		})
	}
}
