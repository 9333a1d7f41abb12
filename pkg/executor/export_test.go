package executor

import (
	"context"
	"sync/atomic"

	"github.com/nats-io/nats.go/jetstream"
)

// lostReads is the applied bucket as a NATS node's death leaves it for a
// moment: the first reads are never answered (the request went to a stream
// leader that is gone), and every one after is the real bucket's.
type lostReads struct {
	jetstream.KeyValue
	lose atomic.Int32
}

func (l *lostReads) Get(ctx context.Context, key string) (jetstream.KeyValueEntry, error) {
	if l.lose.Add(-1) >= 0 {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return l.KeyValue.Get(ctx, key)
}

// LoseAppliedReads has the executor's first n reads of its applied bucket
// go unanswered. Call it before the executor handles anything.
func LoseAppliedReads(x *Executor, n int) {
	l := &lostReads{KeyValue: x.applied}
	l.lose.Store(int32(n))
	x.applied = l
}
