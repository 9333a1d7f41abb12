package bus_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/bus/bustest"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

const org bus.Org = "contoso"

// fastTopology shortens every timer so redelivery and expiry happen within
// a test's patience; the semantics are the production ones.
func fastTopology() bus.Topology {
	t := bus.DefaultTopology()
	t.Consumer.AckWait = time.Second
	t.Consumer.MaxDeliver = 4
	t.LeaseTTL = 2 * time.Second
	return t
}

func fastRetry() bus.RetryPolicy {
	return bus.RetryPolicy{Initial: 100 * time.Millisecond, Max: 2 * time.Second, Multiplier: 2}
}

// env is one test's JetStream with the topology provisioned.
type env struct {
	nc   *nats.Conn
	js   jetstream.JetStream
	topo bus.Topology
	pub  *bus.Publisher
}

func newEnv(t testing.TB) *env {
	t.Helper()
	_, nc, js := natstest.Start(t)
	topo := fastTopology()
	if err := bus.Provision(natstest.Context(t), js, topo); err != nil {
		t.Fatalf("provision: %v", err)
	}
	pub, err := bus.NewPublisher(js, bus.Instrumentation{})
	if err != nil {
		t.Fatal(err)
	}
	return &env{nc: nc, js: js, topo: topo, pub: pub}
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// runRunner starts a runner and waits until it is ready; it is stopped
// (drained) when the test ends.
func runRunner(t testing.TB, js jetstream.JetStream, cfg bus.RunnerConfig, routes ...bus.Route) *bus.Runner {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quietLogger()
	}
	r, err := bus.NewRunner(js, cfg, routes...)
	if err != nil {
		t.Fatalf("new runner: %v", err)
	}
	bustest.Run(t, r)
	return r
}

func observed(deviceID string) *ev.EASPartnershipObserved {
	return &ev.EASPartnershipObserved{
		Org: string(org),
		Partnership: &ev.EASPartnership{
			Mailbox:           &ev.Mailbox{Identity: "alice@contoso.com", PrimarySmtpAddress: "alice@contoso.com"},
			DeviceId:          deviceID,
			DeviceType:        "iPhone",
			DeviceAccessState: ev.DeviceAccessState_DEVICE_ACCESS_STATE_QUARANTINED,
		},
		Sync:       &ev.SyncRef{SyncId: "sync-1", Kind: ev.SyncKind_SYNC_KIND_QUICK},
		ObservedAt: timestamppb.Now(),
		Change:     ev.ObservationChange_OBSERVATION_CHANGE_NEW,
	}
}

func publishObserved(t testing.TB, e *env, deviceID, msgID string) {
	t.Helper()
	subj, err := bus.EASObserved.Subject(org, deviceID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.pub.Publish(context.Background(), bus.Outbound{Subject: subj, Message: observed(deviceID), MsgID: msgID}); err != nil {
		t.Fatalf("publish: %v", err)
	}
}

// collect keeps every message of stream under filter, undecoded, to see
// what really reached a stream (headers included).
func collect(t testing.TB, js jetstream.JetStream, stream, filter string) *natstest.Received[jetstream.Msg] {
	t.Helper()
	return natstest.ReceiveFunc(t, js, stream, filter, func(m jetstream.Msg) (jetstream.Msg, bool) { return m, true })
}

func decode[T any, PT interface {
	*T
	proto.Message
}](t testing.TB, m jetstream.Msg) PT {
	t.Helper()
	out := PT(new(T))
	if err := proto.Unmarshal(m.Data(), out); err != nil {
		t.Fatalf("decode: %v", err)
	}
	return out
}

// matchedFrom is a handler output: the verdict for an observation.
func matchedFrom(in *ev.EASPartnershipObserved) bus.Outbound {
	subj, _ := bus.DeviceMatched.Subject(bus.Org(in.GetOrg()), in.GetPartnership().GetDeviceId())
	return bus.Outbound{Subject: subj, Message: &ev.DeviceMatched{
		Org: in.GetOrg(), Observed: in,
		NoMatchReason: ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD,
		MatchedAt:     timestamppb.Now(),
	}}
}

func natsMsg(subject string, data []byte) *nats.Msg {
	m := nats.NewMsg(subject)
	m.Data = data
	m.Header.Set(bus.HeaderType, "easguard.v1.EASPartnershipObserved")
	return m
}
