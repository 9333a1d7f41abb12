package natsembed_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/natsembed"
)

func TestInProcessOnly(t *testing.T) {
	dir := t.TempDir()
	s, err := natsembed.Start(natsembed.Options{StoreDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown()
	if s.ClientURL() != "" || s.MonitorURL() != "" {
		t.Fatalf("listening without being asked: %q %q", s.ClientURL(), s.MonitorURL())
	}
	nc, err := s.Connect("test")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "T", Subjects: []string{"t.>"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "t.1", []byte("x")); err != nil {
		t.Fatal(err)
	}
}

// The store is a directory on disk: a restarted server finds its streams.
func TestStoreSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	s, err := natsembed.Start(natsembed.Options{StoreDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	nc, _ := s.Connect("a")
	js, _ := jetstream.New(nc)
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "T", Subjects: []string{"t.>"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "t.1", []byte("kept")); err != nil {
		t.Fatal(err)
	}
	nc.Close()
	s.Shutdown()

	s, err = natsembed.Start(natsembed.Options{StoreDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown()
	nc, _ = s.Connect("b")
	defer nc.Close()
	js, _ = jetstream.New(nc)
	st, err := js.Stream(ctx, "T")
	if err != nil {
		t.Fatal(err)
	}
	m, err := st.GetMsg(ctx, 1)
	if err != nil {
		t.Fatalf("after restart: %v", err)
	}
	if string(m.Data) != "kept" {
		t.Fatalf("after restart: %q", m.Data)
	}
}

func TestListensWhenAsked(t *testing.T) {
	s, err := natsembed.Start(natsembed.Options{StoreDir: t.TempDir(), Listen: "127.0.0.1:0", MonitorListen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown()
	if s.ClientURL() == "" || s.MonitorURL() == "" {
		t.Fatalf("urls %q %q", s.ClientURL(), s.MonitorURL())
	}
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatalf("TCP client: %v", err)
	}
	nc.Close()
}

func TestStartErrors(t *testing.T) {
	if _, err := natsembed.Start(natsembed.Options{}); err == nil {
		t.Fatal("started without a store directory")
	}
	if _, err := natsembed.Start(natsembed.Options{StoreDir: t.TempDir(), Listen: "nonsense"}); err == nil {
		t.Fatal("started with a bad listen address")
	}
}

// With a user and password, the listener turns away clients without them;
// the process's own in-process clients log on by themselves.
func TestListenerNeedsTheCredentials(t *testing.T) {
	const user, pass = "easguard", "0123456789abcdef-secret"
	s, err := natsembed.Start(natsembed.Options{StoreDir: t.TempDir(), Listen: "127.0.0.1:0", Username: user, Password: pass})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown()
	if nc, err := nats.Connect(s.ClientURL()); err == nil {
		nc.Close()
		t.Fatal("a client without credentials was let in")
	} else if !errors.Is(err, nats.ErrAuthorization) && !strings.Contains(strings.ToLower(err.Error()), "authorization") {
		t.Fatalf("refused with %v, want an authorization error", err)
	}
	if nc, err := nats.Connect(s.ClientURL(), nats.UserInfo(user, "wrong-password-0123")); err == nil {
		nc.Close()
		t.Fatal("a client with the wrong password was let in")
	}
	nc, err := nats.Connect(s.ClientURL(), nats.UserInfo(user, pass))
	if err != nil {
		t.Fatalf("with the credentials: %v", err)
	}
	nc.Close()
	in, err := s.Connect("in-process")
	if err != nil {
		t.Fatalf("in-process: %v", err)
	}
	in.Close()
	if _, err := natsembed.Start(natsembed.Options{StoreDir: t.TempDir(), Username: user}); err == nil {
		t.Error("a user without a password was accepted")
	}
}

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:4222": true, "127.1.2.3:4222": true, "[::1]:4222": true, "localhost:4222": true, "LOCALHOST:0": true,
		"0.0.0.0:4222": false, ":4222": false, "[::]:4222": false, "10.0.0.5:4222": false, "nats.contoso.com:4222": false, "127.0.0.1": false,
	} {
		if got := natsembed.IsLoopback(addr); got != want {
			t.Errorf("IsLoopback(%q) = %v, want %v", addr, got, want)
		}
	}
}
