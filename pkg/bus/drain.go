package bus

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
)

// ConsumerDrained looks up a durable consumer of stream and reports
// whether it is Drained, with the consumer's info for messages. An error
// wraps jetstream.ErrConsumerNotFound when the consumer does not exist
// (its worker has not bound it yet, or never ran), which callers weigh
// differently.
func ConsumerDrained(ctx context.Context, js jetstream.JetStream, stream, durable string) (bool, *jetstream.ConsumerInfo, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return false, nil, fmt.Errorf("drained %s: %w", durable, err)
	}
	c, err := s.Consumer(ctx, durable)
	if err != nil {
		return false, nil, fmt.Errorf("drained %s: %w", durable, err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		return false, nil, fmt.Errorf("drained %s: %w", durable, err)
	}
	drained, err := Drained(ctx, s, info)
	return drained, info, err
}

// Drained reports whether the durable consumer ci of stream s has been
// given, and has settled, the newest message s holds for it: everything
// published to it before the call has been handled. Barriers use it, the
// evaluator's before it judges a finished sync pass and the tests' before
// they assert that something did not happen.
//
// NumPending alone cannot tell: the server counts a stored message into a
// consumer's pending count from a queue of its own, after the publish has
// been acknowledged, so for a moment a message just published is neither
// pending nor delivered. The newest sequence the consumer's filter matches
// is read from the stream itself and must have been delivered.
func Drained(ctx context.Context, s jetstream.Stream, ci *jetstream.ConsumerInfo) (bool, error) {
	if ci.NumPending > 0 || ci.NumAckPending > 0 {
		return false, nil
	}
	last, err := lastStored(ctx, s, ci.Config)
	if err != nil {
		return false, fmt.Errorf("drained %s: %w", ci.Name, err)
	}
	return ci.Delivered.Stream >= last, nil
}

// lastStored returns the sequence of the newest message of s that a
// consumer with cfg is given, 0 when there is none.
func lastStored(ctx context.Context, s jetstream.Stream, cfg jetstream.ConsumerConfig) (uint64, error) {
	filters := cfg.FilterSubjects
	if cfg.FilterSubject != "" {
		filters = append(filters, cfg.FilterSubject)
	}
	if len(filters) == 0 {
		filters = []string{">"}
	}
	var last uint64
	for _, f := range filters {
		m, err := s.GetLastMsgForSubject(ctx, f)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("last message of %s: %w", f, err)
		}
		last = max(last, m.Sequence)
	}
	return last, nil
}
