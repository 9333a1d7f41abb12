// Package hooksim is a webhook receiver for tests: an HTTP server that
// records the JSON bodies POSTed to it, the way an alert receiver (an
// Alertmanager-compatible tool, a Teams workflow) takes easguard's alerts,
// and that can answer the first requests with errors.
package hooksim

import (
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
)

// Receiver records what it is sent.
type Receiver struct {
	// URL is where to POST.
	URL string

	mu     sync.Mutex
	bodies [][]byte
	auth   []string
	fail   []int
}

// Start serves a receiver until the test ends; the first requests are
// answered with the statuses of fail, in order, and not recorded.
func Start(tb testing.TB, fail ...int) *Receiver {
	tb.Helper()
	r := &Receiver{fail: fail}
	srv := httptest.NewServer(http.HandlerFunc(r.serve))
	tb.Cleanup(srv.Close)
	r.URL = srv.URL + "/hooks/easguard"
	return r
}

func (r *Receiver) serve(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(io.LimitReader(req.Body, 1<<20))
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil || req.Method != http.MethodPost || req.Header.Get("Content-Type") != "application/json" {
		http.Error(w, "want a POST of application/json", http.StatusBadRequest)
		return
	}
	if len(r.fail) > 0 {
		code := r.fail[0]
		r.fail = r.fail[1:]
		w.WriteHeader(code)
		return
	}
	r.bodies = append(r.bodies, body)
	r.auth = append(r.auth, req.Header.Get("Authorization"))
	w.WriteHeader(http.StatusOK)
}

// Received returns the bodies recorded so far.
func (r *Receiver) Received() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.bodies...)
}

// Authorizations returns the Authorization header of each recorded request.
func (r *Receiver) Authorizations() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.auth...)
}
