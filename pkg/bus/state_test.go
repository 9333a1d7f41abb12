package bus_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

func TestModifyIsSafeUnderConcurrency(t *testing.T) {
	_, _, js := natstest.Start(t)
	ctx := context.Background()
	if err := bus.Provision(ctx, js, fastTopology()); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, bus.BucketMDMUsers)
	if err != nil {
		t.Fatal(err)
	}
	key, err := bus.StateKey(org, "Dev'1$(x)")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := string(rune('a' + i))
			if _, err := bus.Modify(ctx, kv, key, func(idx *ev.MDMIndex, _ bool) (bus.Change, error) {
				if idx.ById == nil {
					idx.ById = map[string]*ev.MDMDevice{}
				}
				idx.ById[id] = &ev.MDMDevice{MdmDeviceId: id}
				return bus.Write, nil
			}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	idx, ok, err := bus.Load[ev.MDMIndex](ctx, kv, key)
	if err != nil || !ok || len(idx.ById) != 20 {
		t.Fatalf("%d records after 20 concurrent adds (ok %v, err %v)", len(idx.GetById()), ok, err)
	}
	if _, err := bus.Modify(ctx, kv, key, func(*ev.MDMIndex, bool) (bus.Change, error) { return bus.Remove, nil }); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := bus.Load[ev.MDMIndex](ctx, kv, key); ok {
		t.Fatal("still there after Remove")
	}
	// A deleted key can be written again.
	if _, err := bus.Modify(ctx, kv, key, func(idx *ev.MDMIndex, exists bool) (bus.Change, error) {
		if exists {
			t.Error("deleted key reported as existing")
		}
		idx.ById = map[string]*ev.MDMDevice{"z": {MdmDeviceId: "z"}}
		return bus.Write, nil
	}); err != nil {
		t.Fatal(err)
	}
}

// A record written with Expire goes when its TTL has passed, whether the
// write created the key, replaced a live record (a tombstone replaces the
// record it marks removed) or followed a delete; a later plain Write keeps
// the key for good. An Expire whose read is stale loses its
// compare-and-set and is made again from a fresh read, as a Write is.
func TestModifyExpireRemovesTheRecordAfterItsTTL(t *testing.T) {
	t.Parallel()
	_, _, js := natstest.Start(t)
	ctx := natstest.Context(t)
	if err := bus.Provision(ctx, js, fastTopology()); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, bus.BucketMDMUsers)
	if err != nil {
		t.Fatal(err)
	}
	const ttl = time.Second // the server's granularity
	expiring := bus.ExpireAfter(js, ttl)
	write := func(key, id string, change bus.Change, read *bus.Read) {
		t.Helper()
		runs := 0
		if _, err := bus.ModifyRead(ctx, kv, key, read, func(idx *ev.MDMIndex, _ bool) (bus.Change, error) {
			runs++
			idx.ById = map[string]*ev.MDMDevice{id: {MdmDeviceId: id}}
			return change, nil
		}, expiring); err != nil {
			t.Fatalf("%s %s: %v", key, id, err)
		}
		if read != nil && runs != 2 {
			t.Fatalf("%s from a stale read: the callback ran %d times, want 2 (the stale attempt, then a fresh one)", key, runs)
		}
	}
	held := func(key string) bool {
		_, ok, err := bus.Load[ev.MDMIndex](ctx, kv, key)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	created, replaced, recreated, kept, stale := org.String()+".created", org.String()+".replaced", org.String()+".recreated", org.String()+".kept", org.String()+".stale"
	write(created, "a", bus.Expire, nil)
	write(replaced, "a", bus.Write, nil)
	write(replaced, "b", bus.Expire, nil)
	write(recreated, "a", bus.Write, nil)
	if err := kv.Delete(ctx, recreated); err != nil {
		t.Fatal(err)
	}
	write(recreated, "b", bus.Expire, nil)
	write(kept, "a", bus.Expire, nil)
	write(kept, "b", bus.Write, nil)
	write(stale, "a", bus.Write, nil)
	e, err := kv.Get(ctx, stale)
	if err != nil {
		t.Fatal(err)
	}
	old := bus.Read{Value: e.Value(), Revision: e.Revision(), Exists: true}
	write(stale, "b", bus.Write, nil)
	write(stale, "c", bus.Expire, &old)
	for _, key := range []string{created, replaced, recreated, kept, stale} {
		if !held(key) {
			t.Fatalf("%s gone at once", key)
		}
	}
	natstest.Eventually(t, 10*time.Second, "the expiring records gone", func() bool {
		return !held(created) && !held(replaced) && !held(recreated) && !held(stale)
	})
	if !held(kept) {
		t.Fatal("a record written plainly after an expiring one expired with it")
	}

	if _, err := bus.Modify(ctx, kv, created, func(*ev.MDMIndex, bool) (bus.Change, error) { return bus.Expire, nil }); err == nil {
		t.Fatal("Expire without ExpireAfter was accepted")
	}
}

// A compare-and-set that lost is a conflict however it is reported: by
// nats.go's key-value calls, or by the server to a message published to the
// bucket's stream, under either of its codes (a replicated stream answers
// 10164 while another write to the key is in flight).
func TestIsConflict(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"key exists", fmt.Errorf("create: %w", jetstream.ErrKeyExists), true},
		{"revision mismatch", fmt.Errorf("update: %w", jetstream.ErrKeyRevisionMismatch), true},
		{"wrong last sequence", &jetstream.APIError{Code: 400, ErrorCode: jetstream.JSErrCodeStreamWrongLastSequence}, true},
		{"wrong last sequence, replicated", fmt.Errorf("publish: %w", &jetstream.APIError{Code: 400, ErrorCode: jetstream.JSErrCodeStreamWrongLastSequenceConstant}), true},
		{"another API error", &jetstream.APIError{Code: 503, ErrorCode: jetstream.JSErrCodeJetStreamNotEnabled}, false},
		{"not found", jetstream.ErrKeyNotFound, false},
		{"timeout", context.DeadlineExceeded, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := bus.IsConflict(tc.err); got != tc.want {
				t.Fatalf("IsConflict(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}
