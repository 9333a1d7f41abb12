package mdm

import (
	"context"
	"encoding/base32"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// KnownDevice is one record an inventory source has delivered, as an
// InventoryStore keeps it.
type KnownDevice struct {
	// Device is the record as last delivered.
	Device *ev.MDMDevice
	// MissingSince is when complete reads first stopped listing the
	// device; zero while they list it.
	MissingSince time.Time
}

// InventoryStore keeps what an inventory source (the file, Graph) last
// delivered, so that a source that starts again, or a replica that takes
// over, compares the MDM with that instead of with nothing: a device
// deleted in the MDM while no source ran is then still reported removed.
// One store may serve several sources, each under its name; a source is
// the only writer of its records while it runs (see Singleton).
type InventoryStore interface {
	// Load returns every record stored for the source.
	Load(ctx context.Context, source string) ([]KnownDevice, error)
	// Save stores put and removes the records with the MDM device ids in
	// remove, for the source. On an error some of it may be stored: the
	// caller loads again before it trusts the store.
	Save(ctx context.Context, source string, put []KnownDevice, remove []string) error
}

// ReadMarker is an InventoryStore that also records that a source has
// delivered a complete read, even one with nothing to store (an empty
// inventory): the collector holds an organisation's first full sync until
// some source has, so that no enrolled phone is judged before its MDM
// record is read.
type ReadMarker interface {
	MarkRead(ctx context.Context, source string, devices int) error
}

// kvSaveParallel bounds the writes of one Save in flight at once: a first
// read of a large tenant stores tens of thousands of records, and one
// round trip at a time would take minutes.
const kvSaveParallel = 64

// KVInventoryStore is an InventoryStore in a JetStream KV bucket
// (bus.BucketMDMSources), one key per device under the org and the source
// (<org>.<source>.<mdm id>): it survives restarts and is shared by every
// replica of the source.
type KVInventoryStore struct {
	kv  jetstream.KeyValue
	org string
}

// NewKVInventoryStore returns the inventory store of org's sources in kv.
func NewKVInventoryStore(kv jetstream.KeyValue, org bus.Org) (*KVInventoryStore, error) {
	if _, err := bus.ParseOrg(string(org)); err != nil {
		return nil, fmt.Errorf("mdm inventory store: %w", err)
	}
	return &KVInventoryStore{kv: kv, org: string(org)}, nil
}

func (s *KVInventoryStore) prefix(source string) string { return s.org + "." + exactToken(source) }

// MarkRead stores when the source delivered a complete read under
// <org>.<source> itself, beside its records (<org>.<source>.<mdm id>),
// which Load does not read.
func (s *KVInventoryStore) MarkRead(ctx context.Context, source string, devices int) error {
	v := fmt.Sprintf(`{"read_at":%q,"devices":%d}`, time.Now().UTC().Format(time.RFC3339Nano), devices)
	if _, err := s.kv.Put(ctx, s.prefix(source), []byte(v)); err != nil {
		return fmt.Errorf("mark %s read: %w", source, err)
	}
	return nil
}

// Load reads every record of the source through one watcher, which walks
// the bucket's stream in one pass instead of a round trip per key.
func (s *KVInventoryStore) Load(ctx context.Context, source string) ([]KnownDevice, error) {
	prefix := s.prefix(source)
	w, err := s.kv.WatchFiltered(ctx, []string{prefix + ".>"}, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("load mdm inventory %s: %w", prefix, err)
	}
	defer func() { _ = w.Stop() }()
	var out []KnownDevice
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("load mdm inventory %s: %w", prefix, ctx.Err())
		case e, ok := <-w.Updates():
			if !ok {
				return nil, fmt.Errorf("load mdm inventory %s: watcher closed", prefix)
			}
			if e == nil { // every stored value has been delivered
				return out, nil
			}
			var rec ev.MDMSourceRecord
			if err := bus.DecodeRecord(e.Value(), &rec); err != nil {
				return nil, fmt.Errorf("load mdm inventory %s: key %s: %w", prefix, e.Key(), err)
			}
			if rec.GetDevice().GetMdmDeviceId() == "" {
				return nil, fmt.Errorf("load mdm inventory %s: key %s: %w: no device id", prefix, e.Key(), ErrInvalidRecord)
			}
			k := KnownDevice{Device: rec.GetDevice()}
			if rec.GetMissingSince() != nil {
				k.MissingSince = rec.GetMissingSince().AsTime()
			}
			out = append(out, k)
		}
	}
}

// Save writes the records, up to kvSaveParallel at once, and purges the
// removed ones (a purge keeps no history of a device that left).
func (s *KVInventoryStore) Save(ctx context.Context, source string, put []KnownDevice, remove []string) error {
	prefix := s.prefix(source)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sem := make(chan struct{}, kvSaveParallel)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	fail := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		if first == nil {
			first = err
			cancel()
		}
	}
	run := func(fn func() error) {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := fn(); err != nil {
				fail(err)
			}
		}()
	}
	for _, k := range put {
		rec := &ev.MDMSourceRecord{Device: k.Device}
		if !k.MissingSince.IsZero() {
			rec.MissingSince = timestamppb.New(k.MissingSince)
		}
		raw, err := proto.Marshal(rec)
		if err != nil {
			fail(fmt.Errorf("save mdm inventory %s: %w", prefix, err))
			break
		}
		key := prefix + "." + exactToken(k.Device.GetMdmDeviceId())
		run(func() error {
			if _, err := s.kv.Put(ctx, key, raw); err != nil {
				return fmt.Errorf("save mdm inventory %s: put %s: %w", prefix, key, err)
			}
			return nil
		})
	}
	for _, id := range remove {
		key := prefix + "." + exactToken(id)
		run(func() error {
			if err := s.kv.Purge(ctx, key); err != nil {
				return fmt.Errorf("save mdm inventory %s: purge %s: %w", prefix, key, err)
			}
			return nil
		})
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		first = fmt.Errorf("save mdm inventory %s: %w", prefix, ctx.Err())
	}
	return first
}

// KVReplayStore is a ReplayStore in a JetStream KV bucket with per-key TTLs
// (bus.BucketMDMReplay): an accepted event id is refused by every replica
// of the webhook and after a restart, until its TTL ends. Seen is one
// atomic create on the server, so two replicas given the same request at
// once cannot both accept it.
type KVReplayStore struct {
	kv     jetstream.KeyValue
	prefix string
}

// ErrReplayTTL is returned by NewKVReplayStore for a bucket that does not
// allow per-key TTLs: event ids would never expire.
var ErrReplayTTL = errors.New("mdm: replay bucket does not allow per-key TTLs")

// minKeyTTL is the shortest per-key TTL the server accepts.
const minKeyTTL = time.Second

// NewKVReplayStore returns the replay store of the webhook source named
// source for org, in kv (a bucket with LimitMarkerTTL set).
func NewKVReplayStore(ctx context.Context, kv jetstream.KeyValue, org bus.Org, source string) (*KVReplayStore, error) {
	if _, err := bus.ParseOrg(string(org)); err != nil {
		return nil, fmt.Errorf("mdm replay store: %w", err)
	}
	if source == "" {
		return nil, fmt.Errorf("mdm replay store: %w: empty source name", ErrConfig)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("mdm replay store: bucket status: %w", err)
	}
	if bs, ok := st.(*jetstream.KeyValueBucketStatus); ok && !bs.StreamInfo().Config.AllowMsgTTL {
		return nil, fmt.Errorf("mdm replay store %s: %w", kv.Bucket(), ErrReplayTTL)
	}
	return &KVReplayStore{kv: kv, prefix: string(org) + "." + exactToken(source)}, nil
}

func (s *KVReplayStore) key(id string) string { return s.prefix + "." + exactToken(id) }

// Seen creates the id's key with ttl (at least a second, the server's
// granularity) and reports true when it already existed.
func (s *KVReplayStore) Seen(ctx context.Context, id string, ttl time.Duration) (bool, error) {
	ttl = max(ttl, minKeyTTL).Round(time.Second)
	_, err := s.kv.Create(ctx, s.key(id), []byte(time.Now().UTC().Format(time.RFC3339Nano)), jetstream.KeyTTL(ttl))
	switch {
	case err == nil:
		return false, nil
	case errors.Is(err, jetstream.ErrKeyExists):
		return true, nil
	}
	return false, fmt.Errorf("replay store: record event %q: %w", id, err)
}

// Forget purges the id's key; the purge marker itself expires after a
// minute, so forgotten ids leave nothing behind.
func (s *KVReplayStore) Forget(ctx context.Context, id string) error {
	if err := s.kv.Purge(ctx, s.key(id), jetstream.PurgeTTL(time.Minute)); err != nil {
		return fmt.Errorf("replay store: forget event %q: %w", id, err)
	}
	return nil
}

// tokenEncoding is base32 without padding; lower-cased, its alphabet is
// a-z and 2-7.
var tokenEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// exactToken turns an id into one KV key token that keeps case: ids of
// lower-case letters, digits and '-' (Graph's GUIDs) are used as they are,
// anything else is base32 of its bytes behind a '_' that a plain token
// never has. Unlike bus.KeyToken it does not fold case, because two
// inventory ids that differ only in case are two devices.
func exactToken(id string) string {
	plain := id != ""
	for i := 0; i < len(id) && plain; i++ {
		c := id[i]
		plain = c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-'
	}
	if plain {
		return id
	}
	return "_" + strings.ToLower(tokenEncoding.EncodeToString([]byte(id)))
}
