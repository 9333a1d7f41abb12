package health_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/health"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestEndpoints(t *testing.T) {
	metrics := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "up 1\n") })
	s := health.New(metrics)
	addr, serve, err := s.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	base := "http://" + addr.String()

	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz = %d", code)
	}
	if code, body := get(t, base+"/readyz"); code != 503 || !strings.Contains(body, "no components") {
		t.Errorf("/readyz with nothing registered = %d %q", code, body)
	}
	var bound atomic.Bool
	s.AddReadiness("runner matcher", func() error {
		if !bound.Load() {
			return errors.New("consumers not bound")
		}
		return nil
	})
	s.AddReadiness("nats", func() error { return nil })
	if code, body := get(t, base+"/readyz"); code != 503 || !strings.Contains(body, "runner matcher: consumers not bound") {
		t.Errorf("/readyz before binding = %d %q", code, body)
	}
	bound.Store(true)
	if code, _ := get(t, base+"/readyz"); code != 200 {
		t.Errorf("/readyz after binding = %d", code)
	}
	if code, body := get(t, base+"/metrics"); code != 200 || body != "up 1\n" {
		t.Errorf("/metrics = %d %q", code, body)
	}
}

func TestListenFailsOnBusyPort(t *testing.T) {
	s := health.New(nil)
	addr, _, err := s.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := health.New(nil).Listen(addr.String()); err == nil {
		t.Fatal("second listen on the same port succeeded")
	}
}

// Every listener cuts off oversized headers and bodies and a client that
// sends its headers too slowly, instead of holding memory and a connection.
func TestListenerLimits(t *testing.T) {
	read := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err != nil {
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) {
				http.Error(w, err.Error(), http.StatusRequestEntityTooLarge)
				return
			}
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	addr, serve, err := health.ListenHandler("127.0.0.1:0", read)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	url := "http://" + addr.String() + "/"

	for _, tt := range []struct {
		name   string
		body   int
		header int
		want   int
	}{
		{"small", 1 << 10, 0, http.StatusNoContent},
		{"body over the limit", health.MaxRequestBody + 1, 0, http.StatusRequestEntityTooLarge},
		{"header over the limit", 0, 2 * health.MaxHeaderBytes, http.StatusRequestHeaderFieldsTooLarge},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(strings.Repeat("x", tt.body)))
			if err != nil {
				t.Fatal(err)
			}
			if tt.header > 0 {
				req.Header.Set("X-Padding", strings.Repeat("y", tt.header))
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Errorf("status %d, want %d", resp.StatusCode, tt.want)
			}
		})
	}

	// Headers that do not arrive within the header timeout: the server
	// hangs up (the deadline is 5 s; the test waits for the close).
	conn, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n")); err != nil {
		t.Fatal(err)
	}
	if err := conn.SetReadDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := io.ReadAll(conn); err != nil {
		t.Fatalf("waiting for the server to hang up: %v", err)
	}
	if waited := time.Since(start); waited > 15*time.Second {
		t.Errorf("server held a slow client for %s", waited)
	}
}
