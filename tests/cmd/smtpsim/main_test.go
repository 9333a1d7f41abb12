package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

func TestRunServesUntilCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	t.Setenv("SMTPSIM_PASSWORD", "env-secret")
	certFile := filepath.Join(t.TempDir(), "ca.pem")
	outR, outW := io.Pipe()
	var stderr lockedBuffer
	exit := make(chan int, 1)
	go func() {
		code := run(ctx, []string{"-user", "svc", "-require-tls", "-cert-out", certFile}, outW, &stderr)
		outW.Close()
		exit <- code
	}()

	line, err := bufio.NewReader(outR).ReadString('\n')
	if err != nil {
		t.Fatalf("no start line: %v (stderr: %s)", err, stderr.String())
	}
	go io.Copy(io.Discard, outR) //nolint:errcheck // drain until run returns
	var st started
	if err := json.Unmarshal([]byte(line), &st); err != nil {
		t.Fatalf("start line %q: %v", line, err)
	}
	if !strings.HasPrefix(st.SMTP, "127.0.0.1:") || !strings.HasPrefix(st.API, "http://127.0.0.1:") || st.CACert != certFile {
		t.Fatalf("start line %+v", st)
	}

	pem, err := os.ReadFile(certFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("ca_cert holds no certificate")
	}
	c, err := smtp.DialStartTLS(st.SMTP, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Auth(sasl.NewPlainClient("", "svc", "env-secret")); err != nil {
		t.Fatalf("auth with the SMTPSIM_PASSWORD password: %v", err)
	}
	mail := "Subject: hello\r\nMessage-ID: <m1@test>\r\n\r\nbody\r\n"
	if err := c.SendMail("it@contoso.com", []string{"anna@contoso.com"}, strings.NewReader(mail)); err != nil {
		t.Fatal(err)
	}

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, st.API+"/api/messages", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var msgs []struct {
		Subject string   `json:"subject"`
		To      []string `json:"to"`
		Text    string   `json:"text"`
	}
	err = json.NewDecoder(resp.Body).Decode(&msgs)
	resp.Body.Close()
	if err != nil || len(msgs) != 1 || msgs[0].Subject != "hello" || msgs[0].Text != "body\n" {
		t.Fatalf("API listed %+v (%v)", msgs, err)
	}

	cancel()
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("exit %d, stderr: %s", code, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after cancel")
	}
}

func TestRunRejectsBadFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"user without password", []string{"-user", "svc"}, "needs a password"},
		{"password without user", []string{"-password", "x"}, "-password needs -user"},
		{"cert-out without TLS", []string{"-no-tls", "-cert-out", "x.pem"}, "-cert-out needs TLS"},
		{"unknown flag", []string{"-bogus"}, "flag provided but not defined"},
		{"stray argument", []string{"extra"}, "unexpected arguments"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("SMTPSIM_PASSWORD", "")
			var stdout, stderr bytes.Buffer
			if code := run(context.Background(), tt.args, &stdout, &stderr); code != 2 {
				t.Errorf("exit %d, want 2", code)
			}
			if !strings.Contains(stderr.String(), tt.want) || stdout.Len() != 0 {
				t.Errorf("stderr %q lacks %q (stdout %q)", stderr.String(), tt.want, stdout.String())
			}
		})
	}
}

// lockedBuffer is stderr shared between run's goroutines and the test.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
