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
	"github.com/easguard/easguard/pkg/telemetry/telemetrytest"
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

// BenchmarkBulkRead measures what a full sync pays for each record it
// reads in a page's batched read (BulkReader, a multi-subject direct get
// of 128 keys), the embedded server's share included: its CPU and the
// bytes allocated per key. Records written by compare-and-set (cas, as
// every worker writes its state) keep the Nats-Expected-Last-Subject-
// Sequence header, which sends the server down its slow path of six
// header rebuilds per answer and gives the client a header map to parse;
// the same records written without a condition (put) are the baseline,
// in the same run.
func BenchmarkBulkRead(b *testing.B) {
	const keys, page = 25_600, 128
	value := make([]byte, 1100) // a decision record's size at 100,000 partnerships
	for i := range value {
		value[i] = byte('a' + i%26)
	}
	for _, shape := range []string{"cas", "put"} {
		b.Run(shape, func(b *testing.B) {
			// Connected as the workers are (bus.SyncQueueLen): each batch
			// is a synchronous subscription, whose default buffer alone
			// would be 512 kB a batch.
			_, js := natstest.Connect(b, natstest.Server(b), bus.SyncQueueLen())
			ctx := natstest.Context(b)
			if err := bus.Provision(ctx, js, fastTopology()); err != nil {
				b.Fatal(err)
			}
			kv, err := js.KeyValue(ctx, bus.BucketDecisions)
			if err != nil {
				b.Fatal(err)
			}
			names := make([]string, keys)
			for i := range names {
				names[i] = string(org) + ".dev" + strconv.Itoa(i) + ".p"
				if shape == "cas" {
					_, err = kv.Create(ctx, names[i], value)
				} else {
					_, err = kv.Put(ctx, names[i], value)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			r, err := bus.NewBulkReader(ctx, js, kv)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := telemetrytest.ProcessCPU(b)
			for i := range b.N {
				from := (i * page) % keys
				got, err := r.Read(ctx, names[from:from+page])
				if err != nil {
					b.Fatal(err)
				}
				if len(got) != page {
					b.Fatalf("read %d of %d keys", len(got), page)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(telemetrytest.ProcessCPU(b)-cpu0)/1e3/float64(b.N*page), "cpu_µs/key")
		})
	}
}
