// Package bustest runs a worker's bus.Runner for the length of a test, the
// way the worker binaries run it, so that every worker's tests start,
// await and stop their runner alike.
package bustest

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
)

// readyTimeout bounds the wait for a runner's consumers: provisioning and
// binding take well under a second, even with -race on two cores.
const readyTimeout = 10 * time.Second

// Run runs r until the test ends and returns once it is ready. A runner
// that stops before the test ends, or that reports an error when it is
// stopped (drained) at the end, fails the test: a worker must not die
// quietly under a test that then only sees nothing happen.
func Run(tb testing.TB, r *bus.Runner) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("runner stopped with: %v", err)
		}
	})
	natstest.Eventually(tb, readyTimeout, "runner ready", func() bool {
		select {
		case err := <-done:
			done <- err // for the cleanup
			tb.Fatalf("runner stopped before the test ended: %v", err)
		default:
		}
		return r.Ready() == nil
	})
}

// DeadLetter is a message a worker's runner gave up on, with the reason
// the runner wrote on it.
type DeadLetter[PT any] struct {
	Reason  string
	Message PT
}

// DeadLetters keeps everything service's runner of org dead-letters, its
// body decoded as T as far as it decodes: a malformed message is
// dead-lettered too, and its reason is what a test looks at.
func DeadLetters[T any, PT natstest.Message[T]](tb testing.TB, js jetstream.JetStream, org bus.Org, service string) *natstest.Received[DeadLetter[PT]] {
	tb.Helper()
	subject, err := bus.DeadLetter.Subject(org, service)
	if err != nil {
		tb.Fatal(err)
	}
	return natstest.ReceiveFunc(tb, js, bus.StreamDLQ, subject, func(msg jetstream.Msg) (DeadLetter[PT], bool) {
		m := PT(new(T))
		_ = proto.Unmarshal(msg.Data(), m)
		return DeadLetter[PT]{Reason: msg.Headers().Get(bus.HeaderDLQReason), Message: m}, true
	})
}
