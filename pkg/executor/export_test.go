package executor

import "github.com/nats-io/nats.go/jetstream"

// WrapApplied puts wrap around the executor's applied bucket (a
// natstest.FaultyKV, to lose its replies). Call it before the executor
// handles anything.
func WrapApplied(x *Executor, wrap func(jetstream.KeyValue) jetstream.KeyValue) {
	x.applied = wrap(x.applied)
}
