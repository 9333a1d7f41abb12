package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// ErrHoldLost is a renewal the bucket refused: the key changed under its
// holder (another process wrote it after it expired) or is gone. No retry
// mends it; the holder must stop using what the key stood for at once.
var ErrHoldLost = errors.New("key no longer held")

// Hold is a key a process holds in a bucket whose TTL frees it when the
// process stops renewing it: a lease (Lease) or a session slot (package
// budget). Rev is the revision of the last write of the key the bucket
// stored; Sent is when that write was sent. The bucket stamps a write no
// earlier than it was sent, so the key lives at least the TTL from Sent,
// and a holder that stops using the key a margin before then never
// overlaps with the next one.
type Hold struct {
	Rev  uint64
	Sent time.Time
}

// RenewHold writes value to key over h, the request bounded by attempt:
// without its own deadline, a request sent to a bucket leader that died
// waits for the caller's, as its reply never comes, and loses the hold to
// an election that ends seconds later.
//
// It returns the renewed hold (Sent the time of this write), or h with an
// error the caller retries while the key may still be its own (the
// request went unanswered, the connection dropped), or ErrHoldLost when
// the bucket refused. A refusal for a wrong revision is not a loss when
// the key holds a value mine accepts at a newer revision: an earlier
// renewal landed though its reply was lost. That revision is adopted and
// Sent kept, since when the landed write was sent is not known.
func RenewHold(ctx context.Context, kv jetstream.KeyValue, key string, value []byte, h Hold, attempt time.Duration, mine func([]byte) bool) (Hold, error) {
	ctx, cancel := context.WithTimeout(ctx, attempt)
	defer cancel()
	sent := time.Now()
	rev, err := kv.Update(ctx, key, value, h.Rev)
	if err == nil {
		return Hold{Rev: rev, Sent: sent}, nil
	}
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		if e, gerr := kv.Get(ctx, key); gerr == nil && e.Revision() > h.Rev && mine(e.Value()) {
			return Hold{Rev: e.Revision(), Sent: h.Sent}, nil
		}
	}
	var api *jetstream.APIError
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyNotFound) || errors.As(err, &api) && !Unanswered(err) {
		return h, fmt.Errorf("%w: %w", ErrHoldLost, err)
	}
	return h, err
}
