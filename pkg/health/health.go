// Package health serves the three endpoints every easguard worker exposes:
// /healthz (the process is alive), /readyz (its consumers are bound and it
// can do work; orchestrators route and roll out on it) and /metrics
// (Prometheus text format).
package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"sort"
	"strings"
	"sync"
	"time"
)

// Check returns nil when its part of the worker is ready.
type Check func() error

// Server is a worker's health and metrics endpoint.
type Server struct {
	mu      sync.RWMutex
	checks  map[string]Check
	metrics http.Handler
	mux     *http.ServeMux
}

// New returns a server that serves metrics with the given handler (nil:
// no /metrics).
func New(metrics http.Handler) *Server {
	s := &Server{checks: map[string]Check{}, metrics: metrics, mux: http.NewServeMux()}
	s.routes()
	return s
}

// Handle adds an endpoint next to the health endpoints (a worker's status
// page, an operator action); it may be called after Listen.
func (s *Server) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// AddReadiness registers a readiness check under a name shown by /readyz.
func (s *Server) AddReadiness(name string, c Check) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.checks[name] = c
}

// Ready runs every readiness check; the error lists each one that failed.
// With no checks registered the worker is not ready: it has nothing bound.
func (s *Server) Ready() error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if len(s.checks) == 0 {
		return errors.New("no components registered")
	}
	names := make([]string, 0, len(s.checks))
	for n := range s.checks {
		names = append(names, n)
	}
	sort.Strings(names)
	var errs []error
	for _, n := range names {
		if err := s.checks[n](); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
		}
	}
	return errors.Join(errs...)
}

// Handler returns the mux with /healthz, /readyz, /metrics and whatever
// was added with Handle.
func (s *Server) Handler() http.Handler { return s.mux }

func (s *Server) routes() {
	mux := s.mux
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if err := s.Ready(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "not ready:")
			for _, line := range strings.Split(err.Error(), "\n") {
				fmt.Fprintln(w, "  "+line)
			}
			return
		}
		fmt.Fprintln(w, "ready")
	})
	if s.metrics != nil {
		mux.Handle("GET /metrics", s.metrics)
	}
}

// Listen binds addr at once, so a port clash stops the worker at start,
// and returns the bound address with a function that serves until ctx ends.
func (s *Server) Listen(addr string) (net.Addr, func(ctx context.Context) error, error) {
	return ListenHandler(addr, s.Handler())
}

// Profiler serves Go's profiles (/debug/pprof/) on a mux of its own, so
// that they are reachable only on the address an operator chose for them,
// never on the health and metrics listener.
func Profiler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// Limits of every HTTP listener easguard opens: a client that sends its
// request slowly, or sends too much, is cut off instead of holding a
// connection and memory.
const (
	// MaxRequestBody is the most a request body may hold on a listener
	// whose handlers take no uploads (health, metrics, manual sync).
	MaxRequestBody = 64 << 10
	// MaxHeaderBytes bounds a request's header lines.
	MaxHeaderBytes = 32 << 10
)

// NewHTTPServer is an http.Server for h with easguard's limits: headers
// within 5 s and MaxHeaderBytes, the whole request within 30 s, idle
// connections closed after 2 minutes, and, when maxBody is positive, a
// body cut at maxBody (a handler that reads more gets an error and the
// client 413). No write timeout: a profile (/debug/pprof/profile) streams
// for as long as it was asked to.
func NewHTTPServer(h http.Handler, maxBody int64) *http.Server {
	if maxBody > 0 {
		h = http.MaxBytesHandler(h, maxBody)
	}
	return &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute,
		MaxHeaderBytes: MaxHeaderBytes}
}

// ListenHandler binds addr at once, so that a taken port fails the start,
// and returns a function that serves h until its context ends.
func ListenHandler(addr string, h http.Handler) (net.Addr, func(ctx context.Context) error, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	srv := NewHTTPServer(h, MaxRequestBody)
	serve := func(ctx context.Context) error {
		errc := make(chan error, 1)
		go func() { errc <- srv.Serve(ln) }()
		select {
		case err := <-errc:
			return fmt.Errorf("serve %s: %w", ln.Addr(), err)
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
			<-errc
			return nil
		}
	}
	return ln.Addr(), serve, nil
}
