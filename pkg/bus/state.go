package bus

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
)

// Load reads a protobuf record from a state bucket. ok is false when the
// key does not exist (or was deleted).
func Load[T any, PT interface {
	*T
	proto.Message
}](ctx context.Context, kv jetstream.KeyValue, key string) (rec PT, ok bool, err error) {
	rec = PT(new(T))
	e, err := kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return rec, false, nil
	}
	if err != nil {
		return rec, false, fmt.Errorf("load %s/%s: %w", kv.Bucket(), key, err)
	}
	if err := proto.Unmarshal(e.Value(), rec); err != nil {
		return rec, false, fmt.Errorf("load %s/%s: %w", kv.Bucket(), key, err)
	}
	return rec, true, nil
}

// Change is what a Modify callback decides.
type Change int

// Modify outcomes.
const (
	Keep   Change = iota // write nothing
	Write                // store the record
	Remove               // delete the key
)

// Modify reads a record, lets fn change it, and stores the result only if
// nobody else changed the key in between, retrying with a fresh read when
// somebody did. Several replicas of a worker can therefore update the same
// index entry concurrently without losing each other's changes.
func Modify[T any, PT interface {
	*T
	proto.Message
}](ctx context.Context, kv jetstream.KeyValue, key string, fn func(rec PT, exists bool) (Change, error)) (PT, error) {
	for attempt := 0; ; attempt++ {
		rec := PT(new(T))
		var rev uint64
		exists := false
		e, err := kv.Get(ctx, key)
		switch {
		case err == nil:
			if err := proto.Unmarshal(e.Value(), rec); err != nil {
				return nil, fmt.Errorf("modify %s/%s: %w", kv.Bucket(), key, err)
			}
			rev, exists = e.Revision(), true
		case errors.Is(err, jetstream.ErrKeyNotFound):
		case errors.Is(err, jetstream.ErrKeyDeleted):
			// A deleted key has a revision: Create needs it to be free,
			// Update needs the delete marker's revision.
			rev = e.Revision()
		default:
			return nil, fmt.Errorf("modify %s/%s: %w", kv.Bucket(), key, err)
		}
		change, err := fn(rec, exists)
		if err != nil {
			return nil, err
		}
		switch change {
		case Keep:
			return rec, nil
		case Remove:
			if !exists {
				return rec, nil
			}
			err = kv.Delete(ctx, key, jetstream.LastRevision(rev))
		case Write:
			var b []byte
			b, err = proto.Marshal(rec)
			if err != nil {
				return nil, fmt.Errorf("modify %s/%s: %w", kv.Bucket(), key, err)
			}
			if rev == 0 {
				_, err = kv.Create(ctx, key, b)
			} else {
				_, err = kv.Update(ctx, key, b, rev)
			}
		}
		if err == nil {
			return rec, nil
		}
		if (errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch)) && attempt < 50 {
			continue
		}
		return nil, fmt.Errorf("modify %s/%s: %w", kv.Bucket(), key, err)
	}
}

// Put stores a record unconditionally.
func Put(ctx context.Context, kv jetstream.KeyValue, key string, rec proto.Message) error {
	b, err := proto.Marshal(rec)
	if err != nil {
		return fmt.Errorf("put %s/%s: %w", kv.Bucket(), key, err)
	}
	if _, err := kv.Put(ctx, key, b); err != nil {
		return fmt.Errorf("put %s/%s: %w", kv.Bucket(), key, err)
	}
	return nil
}
