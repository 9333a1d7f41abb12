package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestProbe(t *testing.T) {
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) }))
	t.Cleanup(ok.Close)
	notReady := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "consumers not bound", http.StatusServiceUnavailable)
	}))
	t.Cleanup(notReady.Close)
	redirect := httptest.NewServer(http.RedirectHandler(ok.URL, http.StatusFound))
	t.Cleanup(redirect.Close)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	}))
	t.Cleanup(slow.Close)
	closed := httptest.NewServer(http.NotFoundHandler())
	closedURL := closed.URL
	closed.Close()

	tests := []struct {
		name string
		args []string
		code int
		says string
	}{
		{"healthy", []string{ok.URL}, 0, ""},
		{"every URL healthy", []string{ok.URL, ok.URL + "/readyz"}, 0, ""},
		{"not ready", []string{notReady.URL}, 1, "503 Service Unavailable: consumers not bound"},
		{"one of two not ready", []string{ok.URL, notReady.URL}, 1, "503"},
		{"redirect is not healthy", []string{redirect.URL}, 1, "302"},
		{"too slow", []string{"-timeout", "100ms", slow.URL}, 1, "deadline exceeded"},
		{"nothing listening", []string{closedURL}, 1, "connection refused"},
		{"no URL", nil, 2, "usage"},
		{"bad flag", []string{"-nope"}, 2, "not defined"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if code := run(tt.args, &stderr); code != tt.code || !strings.Contains(stderr.String(), tt.says) {
				t.Errorf("probe %v = %d, %q; want %d, %q", tt.args, code, stderr.String(), tt.code, tt.says)
			}
		})
	}
}
