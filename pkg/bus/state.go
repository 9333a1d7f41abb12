package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

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
	if err := DecodeRecord(e.Value(), rec); err != nil {
		return rec, false, fmt.Errorf("load %s/%s: %w", kv.Bucket(), key, err)
	}
	return rec, true, nil
}

// vtDecoder is a record with vtprotobuf's generated decoder (make proto).
type vtDecoder interface {
	UnmarshalVT([]byte) error
}

// DecodeRecord decodes a state record (a KV value easguard wrote) into
// rec, which it resets first, as proto.Unmarshal does; every reader of a
// record, watchers included, decodes it here. Records of easguard's own
// types decode through their generated code: a full sync reads a record
// per partnership on each of two hops, and the reflection-driven decoder,
// its maps most of all, was a twentieth of the pipeline's CPU there.
// Unlike proto.Unmarshal it does not check that strings are UTF-8: the
// records are easguard's own, written by proto.Marshal, which does; events
// from the bus keep proto.Unmarshal.
func DecodeRecord(b []byte, rec proto.Message) error {
	if v, ok := rec.(vtDecoder); ok {
		proto.Reset(rec)
		return v.UnmarshalVT(b)
	}
	return proto.Unmarshal(b, rec)
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
	return ModifyRead[T, PT](ctx, kv, key, nil, fn)
}

// ModifyRead is Modify starting from a read already made (by a
// BulkReader, with the reads of a whole page): the first attempt costs no
// read of its own, and a compare-and-set that finds the key changed since
// retries with a fresh read as Modify does. read nil reads first.
func ModifyRead[T any, PT interface {
	*T
	proto.Message
}](ctx context.Context, kv jetstream.KeyValue, key string, read *Read, fn func(rec PT, exists bool) (Change, error)) (PT, error) {
	for attempt := 0; ; attempt++ {
		rec := PT(new(T))
		r := read
		read = nil
		if r == nil {
			got, err := readKey(ctx, kv, key)
			if err != nil {
				return nil, fmt.Errorf("modify %s/%s: %w", kv.Bucket(), key, err)
			}
			r = &got
		}
		rev, exists := r.Revision, r.Exists
		if err := r.Into(rec); err != nil {
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

// Read is one key of a bucket as read: its value and revision, or that it
// does not exist. A deleted key read by a BulkReader's direct get has the
// revision of its delete marker, which an update names; kv.Get reports
// one as not found, and a create finds it free.
type Read struct {
	Value    []byte
	Revision uint64
	Exists   bool
	// At is when the read was asked for: the value is at least as new as
	// the bucket was then. A verdict made from it is as of At, not of
	// when it was made: a page's reads take a while, and a record written
	// meanwhile must not make an earlier "no record" look newer than the
	// verdict made from it.
	At time.Time
}

// Into decodes the value read into rec, and leaves rec as it is when the
// key does not exist.
func (r Read) Into(rec proto.Message) error {
	if !r.Exists {
		return nil
	}
	return DecodeRecord(r.Value, rec)
}

// readKey reads one key as Modify needs it. kv.Get reports a deleted key
// as not found.
func readKey(ctx context.Context, kv jetstream.KeyValue, key string) (Read, error) {
	at := time.Now()
	e, err := kv.Get(ctx, key)
	switch {
	case err == nil:
		return Read{Value: e.Value(), Revision: e.Revision(), Exists: true, At: at}, nil
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return Read{At: at}, nil
	default:
		return Read{}, err
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

// ListKeys lists the keys of a bucket under filter (a subject filter on
// the keys, such as "<org>.>"); a bucket with none under it lists none.
func ListKeys(ctx context.Context, kv jetstream.KeyValue, filter string) ([]string, error) {
	l, err := kv.ListKeysFiltered(ctx, filter)
	if errors.Is(err, jetstream.ErrNoKeysFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s %s: %w", kv.Bucket(), filter, err)
	}
	var keys []string
	for k := range l.Keys() {
		keys = append(keys, k)
	}
	return keys, nil
}
