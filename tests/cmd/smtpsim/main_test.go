package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/easguard/easguard/tests/simcmd"
)

func TestRunServesUntilCancelled(t *testing.T) {
	t.Setenv("SMTPSIM_PASSWORD", "env-secret")
	certFile := filepath.Join(t.TempDir(), "ca.pem")
	var st started
	sim := simcmd.Start(t, run, &st, "-user", "svc", "-require-tls", "-cert-out", certFile)
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

	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, st.API+"/api/messages", nil)
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

	sim.Stop(t)
}

func TestRunRejectsBadFlags(t *testing.T) {
	t.Setenv("SMTPSIM_PASSWORD", "")
	simcmd.CheckBadFlags(t, run, []simcmd.BadFlags{
		{Name: "user without password", Args: []string{"-user", "svc"}, Want: "needs a password"},
		{Name: "password without user", Args: []string{"-password", "x"}, Want: "-password needs -user"},
		{Name: "cert-out without TLS", Args: []string{"-no-tls", "-cert-out", "x.pem"}, Want: "-cert-out needs TLS"},
		{Name: "unknown flag", Args: []string{"-bogus"}, Want: "flag provided but not defined"},
		{Name: "stray argument", Args: []string{"extra"}, Want: "unexpected arguments"},
	})
}
