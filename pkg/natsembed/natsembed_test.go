package natsembed_test

import (
	"context"
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
