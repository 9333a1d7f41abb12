package mdm

import (
	"context"
	"fmt"
)

// Leader runs a duty only while this replica holds a lease, as
// *bus.Lease does: lead gets a context that ends the moment the lease is
// lost, and Run campaigns again after lead returned.
type Leader interface {
	Run(ctx context.Context, lead func(ctx context.Context)) error
}

// singleton is a Source that runs another only while it holds a lease.
type singleton struct {
	src   Source
	lease Leader
}

// Singleton returns a Source that runs src only while lease is held, so
// that of N replicas of the mdm worker one reads the MDM and the others
// stand by, taking over within the lease's TTL when the holder stops. An
// inventory source needs it twice over: N Graph pollers would spend N
// times one tenant's throttling budget, and N readers of one inventory
// would each publish every change. Give src an InventoryStore shared by
// the replicas, so that the replica taking over continues from what the
// previous holder delivered.
func Singleton(src Source, lease Leader) Source {
	return &singleton{src: src, lease: lease}
}

// Name is the wrapped source's name.
func (s *singleton) Name() string { return s.src.Name() }

// Run campaigns for the lease until ctx ends and runs the source while it
// holds it. An error of the source (a configuration that can never work)
// ends the campaign and is returned.
func (s *singleton) Run(ctx context.Context, sink Sink) error {
	if sink == nil {
		return fmt.Errorf("run %s: %w: nil sink", s.Name(), ErrConfig)
	}
	var runErr error
	err := s.lease.Run(ctx, func(lctx context.Context) {
		// The lease ends Run's campaign when lead returns on its own,
		// which is only when the source failed for good.
		runErr = s.src.Run(lctx, sink)
	})
	if runErr != nil {
		return runErr
	}
	if err != nil {
		return fmt.Errorf("run %s: %w", s.Name(), err)
	}
	return nil
}
