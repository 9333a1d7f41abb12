package bus_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// A BulkReader reads what kv.Get reads, key for key, whether the bucket
// answers a page of keys in one direct get or through its leader one by
// one: values, revisions, deleted keys (with their markers' revisions)
// and keys that never existed, over more keys than one request asks for,
// each with the time it was asked for.
func TestBulkReaderReadsWhatGetReads(t *testing.T) {
	for _, tc := range []struct {
		name   string
		direct bool
	}{{"direct gets", true}, {"through the leader", false}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, _, js := natstest.Start(t)
			ctx := natstest.Context(t)
			cfg := bus.BucketStreamConfig(jetstream.KeyValueConfig{Bucket: "bulk", History: 1, Storage: jetstream.MemoryStorage})
			cfg.AllowDirect = tc.direct
			if _, err := js.CreateStream(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			kv, err := js.KeyValue(ctx, "bulk")
			if err != nil {
				t.Fatal(err)
			}
			var keys []string
			for i := range 600 {
				k := fmt.Sprintf("org.dev-%03d", i)
				keys = append(keys, k)
				switch i % 3 {
				case 0: // never written
				case 1:
					if _, err := kv.Put(ctx, k, []byte(k)); err != nil {
						t.Fatal(err)
					}
				case 2:
					if _, err := kv.Put(ctx, k, []byte(k)); err != nil {
						t.Fatal(err)
					}
					if err := kv.Delete(ctx, k); err != nil {
						t.Fatal(err)
					}
				}
			}
			keys = append(keys, keys[1], keys[2]) // asked twice
			r, err := bus.NewBulkReader(ctx, js, kv)
			if err != nil {
				t.Fatal(err)
			}
			got, err := r.Read(ctx, keys)
			if err != nil {
				t.Fatal(err)
			}
			values := 0
			for i, k := range keys[:600] {
				g, ok := got[k]
				e, err := kv.Get(ctx, k)
				switch {
				case err == nil:
					values++
					if !ok || !g.Exists || string(g.Value) != string(e.Value()) || g.Revision != e.Revision() {
						t.Fatalf("%s: read %+v (present %v), Get says %q at revision %d", k, g, ok, e.Value(), e.Revision())
					}
				case i%3 == 2:
					// Deleted: kv.Get says not found; a direct read also
					// gives the delete marker's revision, which an update
					// may name as easily as a create finds the key free.
					if !ok || g.Exists || tc.direct && g.Revision == 0 {
						t.Fatalf("%s: deleted key read as %+v (present %v)", k, g, ok)
					}
				default:
					if !ok || g.Exists || g.Revision != 0 {
						t.Fatalf("%s: never written, read as %+v (present %v)", k, g, ok)
					}
				}
				if g.At.IsZero() || g.At.After(time.Now()) {
					t.Fatalf("%s: read at %v", k, g.At)
				}
			}
			if values != 200 {
				t.Fatalf("%d values read, want the 200 standing", values)
			}
			// A key is taken for a ModifyRead once; the second time it is
			// read afresh.
			if r := got.Take(keys[1]); r == nil || !r.Exists {
				t.Fatalf("first take of %s: %+v", keys[1], r)
			}
			if r := got.Take(keys[1]); r != nil {
				t.Fatalf("second take of %s: %+v, want nil", keys[1], r)
			}
		})
	}
}

// ModifyRead starts from a read made earlier; if the key changed since,
// its compare-and-set fails and it reads again, so the change made in
// between is kept.
func TestModifyReadRetriesAStaleRead(t *testing.T) {
	_, _, js := natstest.Start(t)
	ctx := context.Background()
	if err := bus.Provision(ctx, js, fastTopology()); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, bus.BucketMDMUsers)
	if err != nil {
		t.Fatal(err)
	}
	key := string(org) + ".dev1"
	add := func(id string) func(*ev.MDMIndex, bool) (bus.Change, error) {
		return func(idx *ev.MDMIndex, _ bool) (bus.Change, error) {
			if idx.ById == nil {
				idx.ById = map[string]*ev.MDMDevice{}
			}
			idx.ById[id] = &ev.MDMDevice{MdmDeviceId: id}
			return bus.Write, nil
		}
	}
	for _, id := range []string{"a"} {
		if _, err := bus.Modify(ctx, kv, key, add(id)); err != nil {
			t.Fatal(err)
		}
	}
	r, err := bus.NewBulkReader(ctx, js, kv)
	if err != nil {
		t.Fatal(err)
	}
	reads, err := r.Read(ctx, []string{key})
	if err != nil {
		t.Fatal(err)
	}
	stale := reads[key]
	if _, err := bus.Modify(ctx, kv, key, add("b")); err != nil { // after the read
		t.Fatal(err)
	}
	attempts := 0
	if _, err := bus.ModifyRead(ctx, kv, key, &stale, func(idx *ev.MDMIndex, exists bool) (bus.Change, error) {
		attempts++
		return add("c")(idx, exists)
	}); err != nil {
		t.Fatal(err)
	}
	idx, _, err := bus.Load[ev.MDMIndex](ctx, kv, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(idx.GetById()) != 3 || attempts != 2 {
		t.Fatalf("records %v after %d attempts; want a, b and c after 2", idx.GetById(), attempts)
	}
	// A read of a key that did not exist, created since: Create fails and
	// the second attempt sees it.
	absent := bus.Read{}
	key2 := string(org) + ".dev2"
	if _, err := bus.Modify(ctx, kv, key2, add("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := bus.ModifyRead(ctx, kv, key2, &absent, add("y")); err != nil {
		t.Fatal(err)
	}
	if idx, _, _ := bus.Load[ev.MDMIndex](ctx, kv, key2); len(idx.GetById()) != 2 {
		t.Fatalf("records %v, want x and y", idx.GetById())
	}
	// A deleted key as a direct read gives it (its marker's revision) is
	// written again with an update.
	if err := kv.Delete(ctx, key2); err != nil {
		t.Fatal(err)
	}
	reads, err = r.Read(ctx, []string{key2})
	if err != nil {
		t.Fatal(err)
	}
	deleted := reads[key2]
	if _, err := bus.ModifyRead(ctx, kv, key2, &deleted, func(idx *ev.MDMIndex, exists bool) (bus.Change, error) {
		if exists || len(idx.GetById()) != 0 {
			t.Errorf("deleted key read as existing: %v", idx)
		}
		return add("z")(idx, exists)
	}); err != nil {
		t.Fatal(err)
	}
	if idx, _, _ := bus.Load[ev.MDMIndex](ctx, kv, key2); len(idx.GetById()) != 1 || idx.GetById()["z"] == nil {
		t.Fatalf("records %v, want z alone", idx.GetById())
	}
}
