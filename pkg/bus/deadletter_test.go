package bus_test

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
)

// Every binary runs a dead-letter mover, so several consume the advisories
// at once: they share one durable consumer on a work-queue stream, each
// advisory goes to one of them, and a redelivered one publishes the same
// dead-letter id. Every exhausted message becomes exactly one dead letter.
func TestSeveralMoversMoveEachMessageOnce(t *testing.T) {
	const movers, messages = 3, 20
	e := newEnv(t)
	ctx := natstest.Context(t)
	for range movers {
		// Each mover a runner of its own, as in its own process.
		cfg := bus.RunnerConfig{Service: "deadletter", Topology: e.topo, Concurrency: 2}
		runRunner(t, e.js, cfg, bus.DeadLetterMover())
	}
	dlq := collect(t, e.js, bus.StreamDLQ, bus.DeadLetter.Filter(org))

	cfg := e.topo.ConsumerConfig("crashy", "input", bus.EASObserved.Filter(org), org)
	cfg.AckWait = 200 * time.Millisecond
	cfg.MaxDeliver = 2
	cons, err := e.js.CreateOrUpdateConsumer(ctx, bus.StreamEAS, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for i := range messages {
		publishObserved(t, e, fmt.Sprintf("dev%d", i), fmt.Sprintf("m%d", i))
	}
	pullCtx, stopPulling := context.WithCancel(ctx)
	pulled := make(chan struct{})
	go func() {
		defer close(pulled)
		for pullCtx.Err() == nil {
			batch, err := cons.Fetch(messages, jetstream.FetchMaxWait(100*time.Millisecond))
			if err != nil {
				continue
			}
			for range batch.Messages() {
			}
		}
	}()
	dlq.AwaitLen(t, 20*time.Second, messages)
	stopPulling()
	<-pulled
	natstest.WaitDrained(t, e.js, 10*time.Second, bus.StreamAdvisories)
	seqs := map[string]int{}
	for _, m := range dlq.All() {
		seqs[m.Headers().Get(bus.HeaderDLQStreamSeq)]++
	}
	s, err := e.js.Stream(ctx, bus.StreamDLQ)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.CachedInfo().State.Msgs; n != messages {
		t.Errorf("%d dead letters stored for %d exhausted messages", n, messages)
	}
	for seq, n := range seqs {
		if _, err := strconv.Atoi(seq); err != nil || n != 1 {
			t.Errorf("stream sequence %q dead-lettered %d times", seq, n)
		}
	}
	t.Logf("%d movers, %d exhausted messages: %d dead letters", movers, messages, len(dlq.All()))
}
