package natstest

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// A three-node cluster holds an R3 stream through the hard loss of the
// node that leads it (the other two elect a new leader and keep taking
// writes), takes the node back with its store, and keeps every message
// through a stop and start of all three.
func TestClusterSurvivesKillRestartAndFullRestart(t *testing.T) {
	c := StartCluster(t, 3)
	if len(c.URLs()) != 3 || c.URL() == "" {
		t.Fatalf("urls %v", c.URLs())
	}
	nc, err := nats.Connect(c.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := Context(t)
	// Calls made while a leader is being elected time out; retry them
	// with short per-call deadlines.
	retry := func(what string, call func(ctx context.Context) error) {
		t.Helper()
		var last error
		Eventually(t, time.Minute, what, func() bool {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			last = call(cctx)
			return last == nil
		})
	}
	retry("create R3 stream", func(ctx context.Context) error {
		_, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}, Replicas: 3, Storage: jetstream.FileStorage})
		return err
	})
	publish := func(n int) {
		t.Helper()
		retry(fmt.Sprintf("publish %d", n), func(ctx context.Context) error {
			_, err := js.Publish(ctx, "s.x", []byte(fmt.Sprint(n)), jetstream.WithMsgID(fmt.Sprint(n)))
			return err
		})
	}
	publish(1)
	leader := func() int {
		t.Helper()
		var info *jetstream.StreamInfo
		retry("stream info", func(ctx context.Context) error {
			s, err := js.Stream(ctx, "S")
			if err == nil {
				info = s.CachedInfo()
			}
			return err
		})
		if info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
			t.Fatalf("stream cluster info %+v: want a leader and two replicas", info.Cluster)
		}
		i := slices.IndexFunc([]string{c.Name(0), c.Name(1), c.Name(2)}, func(n string) bool { return n == info.Cluster.Leader })
		if i < 0 {
			t.Fatalf("stream leader %q is no node", info.Cluster.Leader)
		}
		return i
	}
	dead := leader()
	c.Kill(dead)
	if c.Server(dead) != nil {
		t.Fatal("a killed node still has a server")
	}
	publish(2)
	if now := leader(); now == dead {
		t.Fatalf("leader is still the killed node %s", c.Name(dead))
	}
	c.Restart(dead)
	publish(3)

	c.StopAll()
	for i := range c.Size() {
		if c.Server(i) != nil {
			t.Fatalf("node %d runs after StopAll", i)
		}
	}
	c.StartAll()
	publish(4)
	// Every message, once, read through each node on its own.
	for i := range c.Size() {
		_, njs := c.Connect(t, i)
		var got []string
		retry("read through "+c.Name(i), func(ctx context.Context) error {
			got = nil
			s, err := njs.Stream(ctx, "S")
			if err != nil {
				return err
			}
			for seq := uint64(1); seq <= s.CachedInfo().State.LastSeq; seq++ {
				m, err := s.GetMsg(ctx, seq)
				if err != nil {
					return err
				}
				got = append(got, string(m.Data))
			}
			return nil
		})
		if !slices.Equal(got, []string{"1", "2", "3", "4"}) {
			t.Fatalf("through %s: %v", c.Name(i), got)
		}
	}
}
