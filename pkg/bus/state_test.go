package bus_test

import (
	"context"
	"sync"
	"testing"

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
