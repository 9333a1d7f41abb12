package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
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
	// Expire stores the record for a while only: the server removes the
	// key the TTL given to Modify (ExpireAfter) after this write, unless
	// a later write replaces it first. It is for records whose only use
	// ends with time, a removal's tombstone say, which a bucket would
	// otherwise keep forever. The bucket needs limit markers (per-message
	// TTLs); Modify without ExpireAfter refuses it.
	Expire
)

// ModifyOption tunes Modify.
type ModifyOption func(*modifyOptions)

type modifyOptions struct {
	js  jetstream.JetStream
	ttl time.Duration
}

// ExpireAfter lets the callback answer Expire: the record is written with
// a per-message TTL of ttl. js publishes it: the key-value API sets a TTL
// only on a key it creates, and a tombstone replaces a live record.
func ExpireAfter(js jetstream.JetStream, ttl time.Duration) ModifyOption {
	return func(o *modifyOptions) { o.js, o.ttl = js, ttl }
}

// Modify reads a record, lets fn change it, and stores the result only if
// nobody else changed the key in between, retrying with a fresh read when
// somebody did. Several replicas of a worker can therefore update the same
// index entry concurrently without losing each other's changes.
func Modify[T any, PT interface {
	*T
	proto.Message
}](ctx context.Context, kv jetstream.KeyValue, key string, fn func(rec PT, exists bool) (Change, error), opts ...ModifyOption) (PT, error) {
	return ModifyRead[T, PT](ctx, kv, key, nil, fn, opts...)
}

// ModifyRead is Modify starting from a read already made (by a
// BulkReader, with the reads of a whole page): the first attempt costs no
// read of its own, and a compare-and-set that finds the key changed since
// retries with a fresh read as Modify does. read nil reads first.
func ModifyRead[T any, PT interface {
	*T
	proto.Message
}](ctx context.Context, kv jetstream.KeyValue, key string, read *Read, fn func(rec PT, exists bool) (Change, error), opts ...ModifyOption) (PT, error) {
	var o modifyOptions
	for _, opt := range opts {
		opt(&o)
	}
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
		case Write, Expire:
			var b []byte
			b, err = proto.Marshal(rec)
			if err != nil {
				return nil, fmt.Errorf("modify %s/%s: %w", kv.Bucket(), key, err)
			}
			switch {
			case change == Expire && (o.js == nil || o.ttl <= 0):
				return nil, fmt.Errorf("modify %s/%s: %w", kv.Bucket(), key, errExpireWithoutTTL)
			case change == Expire && rev == 0:
				// Create sets a key's TTL, and takes a deleted key's place.
				_, err = kv.Create(ctx, key, b, jetstream.KeyTTL(o.ttl))
			case change == Expire:
				_, err = o.js.PublishMsg(ctx, &nats.Msg{Subject: KeySubject(kv.Bucket(), key), Data: b},
					jetstream.WithExpectLastSequencePerSubject(rev), jetstream.WithMsgTTL(o.ttl))
			case rev == 0:
				_, err = kv.Create(ctx, key, b)
			default:
				_, err = kv.Update(ctx, key, b, rev)
			}
		}
		if err == nil {
			return rec, nil
		}
		if IsConflict(err) && attempt < 50 {
			continue
		}
		return nil, fmt.Errorf("modify %s/%s: %w", kv.Bucket(), key, err)
	}
}

// errExpireWithoutTTL is a callback's Expire when Modify was given no TTL.
var errExpireWithoutTTL = errors.New("expire asked for without ExpireAfter")

// IsConflict reports a compare-and-set on a bucket that lost: the key was
// written, created or deleted since it was read. nats.go's key-value calls
// report it as ErrKeyExists or ErrKeyRevisionMismatch; a message published
// to the bucket's stream gets the server's "wrong last sequence", under a
// code of its own (10164) on a replicated stream while another write to
// the key is still in flight. Every conditional write and delete of
// easguard's state asks this, so that a lost race on a cluster is retried
// or ignored as on a single server, not taken for a failure.
func IsConflict(err error) bool {
	if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		return true
	}
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
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
