package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
)

// maxDeliveriesEvent is the server's io.nats.jetstream.advisory.v1.max_deliver advisory.
type maxDeliveriesEvent struct {
	Type       string `json:"type"`
	Stream     string `json:"stream"`
	Consumer   string `json:"consumer"`
	StreamSeq  uint64 `json:"stream_seq"`
	Deliveries uint64 `json:"deliveries"`
}

const maxDeliverType = "io.nats.jetstream.advisory.v1.max_deliver"

// DeadLetterMover returns the route that moves messages which reached a
// consumer's MaxDeliver without being settled (a worker crashed or hung on
// the last delivery) to the dead-letter subject. The server says which
// message through its max-deliveries advisory; the message itself stays in
// its stream, so the mover reads it by sequence, publishes it as a dead
// letter, and deletes it from work-queue streams where it would otherwise
// block nothing but linger forever. Run it in a runner without an org; one
// mover serves every org.
func DeadLetterMover() Route {
	return Route{
		name: "max-deliveries",
		bind: func(Org) (string, string, string, error) {
			return StreamAdvisories, maxDeliveriesAdvisory + ".>", maxDeliveriesAdvisory + ".{stream}.{consumer}", nil
		},
		decode: func(m jetstream.Msg) (any, error) {
			var ev maxDeliveriesEvent
			if err := json.Unmarshal(m.Data(), &ev); err != nil {
				return nil, fmt.Errorf("decode advisory: %w", err)
			}
			if ev.Type != maxDeliverType || ev.Stream == "" || ev.Consumer == "" || ev.StreamSeq == 0 {
				return nil, fmt.Errorf("advisory of type %q without stream, consumer or sequence", ev.Type)
			}
			return &ev, nil
		},
		handle: func(ctx context.Context, r *Runner, in any) ([]Outbound, error) {
			return nil, r.moveMaxDelivered(ctx, in.(*maxDeliveriesEvent))
		},
	}
}

func (r *Runner) moveMaxDelivered(ctx context.Context, ev *maxDeliveriesEvent) error {
	known, wq := isWorkQueue(r.cfg.Topology, ev.Stream)
	if !known || ev.Stream == StreamDLQ || ev.Stream == StreamAdvisories {
		// Not a pipeline stream: not ours to move.
		r.log.InfoContext(ctx, "ignoring max-deliveries advisory", "stream", ev.Stream, "consumer", ev.Consumer)
		return nil
	}
	stream, err := r.js.Stream(ctx, ev.Stream)
	if err != nil {
		return fmt.Errorf("move max-delivered %s/%d: %w", ev.Stream, ev.StreamSeq, err)
	}
	raw, err := stream.GetMsg(ctx, ev.StreamSeq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		// Already moved, or aged out of the stream.
		return nil
	}
	if err != nil {
		return fmt.Errorf("move max-delivered %s/%d: read: %w", ev.Stream, ev.StreamSeq, err)
	}
	org, _, err := ParseSubject(raw.Subject)
	if err != nil {
		r.log.ErrorContext(ctx, "max-delivered message on a foreign subject; left in place", "stream", ev.Stream, "seq", ev.StreamSeq, "subject", raw.Subject)
		return nil
	}
	stage := ev.Consumer
	if c, err := stream.Consumer(ctx, ev.Consumer); err == nil {
		if s := c.CachedInfo().Config.Metadata["easguard.service"]; s != "" {
			stage = s
		}
	}
	err = r.publishDeadLetter(ctx, deadLetterInfo{
		org: org, stage: stage, subject: raw.Subject, stream: ev.Stream, streamSeq: ev.StreamSeq,
		deliveries: ev.Deliveries, consumer: ev.Consumer,
		reason: fmt.Sprintf("reached max deliveries (%d) on consumer %s without being settled", ev.Deliveries, ev.Consumer),
		data:   raw.Data, header: raw.Header,
	})
	if err != nil {
		return fmt.Errorf("move max-delivered %s/%d: %w", ev.Stream, ev.StreamSeq, err)
	}
	if wq {
		if err := stream.DeleteMsg(ctx, ev.StreamSeq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			return fmt.Errorf("move max-delivered %s/%d: delete: %w", ev.Stream, ev.StreamSeq, err)
		}
	}
	r.log.WarnContext(ctx, "dead-lettered a max-delivered message", "stream", ev.Stream, "seq", ev.StreamSeq, "consumer", ev.Consumer, "subject", raw.Subject)
	return nil
}
