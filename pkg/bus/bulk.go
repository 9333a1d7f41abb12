package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/synadia-io/orbit.go/jetstreamext"
)

// bulkChunk is how many keys one batched read asks for. The server answers
// a multi-subject direct get with one message per key it has; a page of
// partnerships is never larger.
const bulkChunk = 256

// BulkReader reads many keys of one bucket at once: on a bucket that
// allows direct gets (a single server: see BucketStreamConfig) in one
// request per 256 keys, the server streaming back the last value of each
// (a multi-subject direct get, through jetstreamext.GetLastMsgsFor). A
// full sync that reads every partnership's records one request at a time
// pays a round trip to the server per key, and those, not the handlers,
// paced it. A replicated bucket reads key by key through its leader as
// kv.Get does, so a read never misses an acknowledged write.
type BulkReader struct {
	js     jetstream.JetStream
	kv     jetstream.KeyValue
	stream string
	prefix string
	direct bool
}

// NewBulkReader prepares batched reads of kv.
func NewBulkReader(ctx context.Context, js jetstream.JetStream, kv jetstream.KeyValue) (*BulkReader, error) {
	st, err := kv.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("bulk reader for %s: %w", kv.Bucket(), err)
	}
	b := &BulkReader{js: js, kv: kv, stream: BucketStream(kv.Bucket()), prefix: KeySubject(kv.Bucket(), "")}
	if s, ok := st.(*jetstream.KeyValueBucketStatus); ok {
		b.direct = s.StreamInfo().Config.AllowDirect
	}
	return b, nil
}

// Reads is what a BulkReader read, by key.
type Reads map[string]Read

// Take returns the read of key for a ModifyRead the first time it is
// asked for, and nil after: a page that holds a key twice (two
// partnerships of one device id) reads it afresh the second time, as the
// first may have written it.
func (r Reads) Take(key string) *Read {
	v, ok := r[key]
	if !ok {
		return nil
	}
	delete(r, key)
	return &v
}

// Read returns what the bucket holds under each key, every key asked
// for: one that does not exist has neither value nor revision. Keys may
// repeat. Each read's At is when it was asked for (one time for all the
// keys of one batched request, which the server answers at once).
func (b *BulkReader) Read(ctx context.Context, keys []string) (Reads, error) {
	out := make(Reads, len(keys))
	if !b.direct {
		for _, k := range keys {
			if _, done := out[k]; done {
				continue
			}
			r, err := readKey(ctx, b.kv, k)
			if err != nil {
				return nil, fmt.Errorf("read %s/%s: %w", b.kv.Bucket(), k, err)
			}
			out[k] = r
		}
		return out, nil
	}
	seen := make(map[string]bool, len(keys))
	subjects := make([]string, 0, min(len(keys), bulkChunk))
	flush := func() error {
		if len(subjects) == 0 {
			return nil
		}
		defer func() { subjects = subjects[:0] }()
		at := time.Now()
		for _, subj := range subjects {
			out[subj[len(b.prefix):]] = Read{At: at} // unless the server has it
		}
		msgs, err := jetstreamext.GetLastMsgsFor(ctx, b.js, b.stream, subjects, jetstreamext.GetLastMsgsBatchSize(len(subjects)))
		if err != nil {
			return fmt.Errorf("read %d keys of %s: %w", len(subjects), b.kv.Bucket(), err)
		}
		for m, err := range msgs {
			if errors.Is(err, jetstreamext.ErrNoMessages) {
				return nil // none of these keys exists
			}
			if err != nil {
				return fmt.Errorf("read %d keys of %s: %w", len(subjects), b.kv.Bucket(), err)
			}
			if len(m.Subject) <= len(b.prefix) {
				return fmt.Errorf("read keys of %s: answer on subject %q", b.kv.Bucket(), m.Subject)
			}
			k := m.Subject[len(b.prefix):]
			switch m.Header.Get(kvOperationHeader) {
			case "DEL", "PURGE":
				out[k] = Read{Revision: m.Sequence, At: at}
			default:
				out[k] = Read{Value: m.Data, Revision: m.Sequence, Exists: true, At: at}
			}
		}
		return nil
	}
	for _, k := range keys {
		if seen[k] {
			continue
		}
		seen[k] = true
		subjects = append(subjects, b.prefix+k)
		if len(subjects) == bulkChunk {
			if err := flush(); err != nil {
				return nil, err
			}
		}
	}
	if err := flush(); err != nil {
		return nil, err
	}
	return out, nil
}

// kvOperationHeader marks a KV delete or purge on the bucket's stream.
const kvOperationHeader = "KV-Operation"
