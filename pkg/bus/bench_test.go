package bus_test

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// BenchmarkHop measures one pipeline hop — consume an event, handle it,
// publish its output with a message id, acknowledge — through the runner,
// side by side with the bare minimum on the same server: a consumer that
// only acknowledges. The difference is what the runner's guarantees cost
// (decode, validation, trace context, output publish, double ack).
func BenchmarkHop(b *testing.B) {
	b.Run("runner", func(b *testing.B) {
		e := newEnv(b)
		var done atomic.Int64
		runRunner(b, e.js, bus.RunnerConfig{Service: "matcher", Org: org, Topology: e.topo, Concurrency: 4, Prefetch: 64},
			bus.Handle("eas-observed", bus.EASObserved, func(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
				done.Add(1)
				return []bus.Outbound{matchedFrom(in)}, nil
			}))
		hop(b, e, &done)
	})
	b.Run("bare-ack-baseline", func(b *testing.B) {
		e := newEnv(b)
		var done atomic.Int64
		cons, err := e.js.CreateOrUpdateConsumer(natstest.Context(b), bus.StreamEAS, e.topo.ConsumerConfig("bare", "eas", bus.EASObserved.Filter(org), org))
		if err != nil {
			b.Fatal(err)
		}
		cc, err := cons.Consume(func(m jetstream.Msg) {
			_ = m.Ack()
			done.Add(1)
		}, jetstream.PullMaxMessages(256))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(cc.Stop)
		hop(b, e, &done)
	})
}

// hop publishes b.N events asynchronously and waits until all were handled.
func hop(b *testing.B, e *env, done *atomic.Int64) {
	b.Helper()
	subj, _ := bus.EASObserved.Subject(org, "dev1")
	data, _ := proto.Marshal(observed("dev1"))
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		m := natsMsg(subj, data)
		if _, err := e.js.PublishMsgAsync(m, jetstream.WithMsgID("m"+strconv.Itoa(i))); err != nil {
			b.Fatal(err)
		}
	}
	<-e.js.PublishAsyncComplete()
	natstest.Eventually(b, 5*time.Minute, "all handled", func() bool { return done.Load() >= int64(b.N) })
	b.StopTimer()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
}
