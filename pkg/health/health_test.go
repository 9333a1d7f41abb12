package health_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

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
