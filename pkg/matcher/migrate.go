package matcher

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// migrate folds the organisation's entries of the MDM index an earlier
// easguard kept in a bucket of its own (bus.BucketMDMDevicesLegacy) into
// the device records, and deletes that bucket once no organisation has
// entries left in it. Without it, an upgrade would find every enrolled
// phone without its MDM record until the MDM source reported each one
// again, which a source reports only when the record changes: every phone
// blocked as unknown. Every step is safe to run twice, or on two replicas
// at once.
func (m *Matcher) migrate(ctx context.Context, js jetstream.JetStream) error {
	old, err := js.KeyValue(ctx, bus.BucketMDMDevicesLegacy)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("matcher: open %s: %w", bus.BucketMDMDevicesLegacy, err)
	}
	keys, err := bus.ListKeys(ctx, old, string(m.org)+".>")
	if err != nil {
		return fmt.Errorf("matcher: migrate %s: %w", bus.BucketMDMDevicesLegacy, err)
	}
	for _, key := range keys {
		idx, _, err := bus.Load[ev.MDMIndex](ctx, old, key)
		if err != nil {
			return fmt.Errorf("matcher: migrate %s: %w", key, err)
		}
		for id, d := range idx.GetById() {
			if err := m.fold(ctx, key, id, d); err != nil {
				return fmt.Errorf("matcher: migrate %s: %w", key, err)
			}
		}
		if err := old.Delete(ctx, key); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			return fmt.Errorf("matcher: migrate %s: %w", key, err)
		}
	}
	rest, err := bus.ListKeys(ctx, old, ">")
	if err != nil {
		return fmt.Errorf("matcher: migrate %s: %w", bus.BucketMDMDevicesLegacy, err)
	}
	if len(rest) == 0 {
		if err := js.DeleteKeyValue(ctx, bus.BucketMDMDevicesLegacy); err != nil && !errors.Is(err, jetstream.ErrBucketNotFound) {
			return fmt.Errorf("matcher: delete %s: %w", bus.BucketMDMDevicesLegacy, err)
		}
	}
	return nil
}

// fold puts MDM record id of the old index into the device record under
// key, unless the matcher's memory of the record's last report says it was
// removed or has moved to another EAS id since (a report handled by a
// replica that already runs this version), and looks at that memory again
// after the write, taking the record out if such a report was handled
// meanwhile. The report's own record is folded in where the memory has
// one: it is the newest.
func (m *Matcher) fold(ctx context.Context, key, id string, d *ev.MDMDevice) error {
	current := func() (*ev.MDMDevice, error) {
		byIDKey, err := bus.StateKey(m.org, "mdm-id", id)
		if err != nil {
			return nil, bus.Poison(err)
		}
		last, ok, err := bus.Load[ev.MDMIndex](ctx, m.users, byIDKey)
		if err != nil {
			return nil, err
		}
		if !ok {
			return d, nil // no memory of it: the old index is all there is
		}
		r := last.GetById()[id]
		if r == nil || last.GetRemovedById()[id] || !strings.EqualFold(strings.TrimSpace(r.GetEasDeviceId()), strings.TrimSpace(d.GetEasDeviceId())) {
			return nil, nil
		}
		return r, nil
	}
	r, err := current()
	if err != nil || r == nil {
		return err
	}
	if _, err := bus.Modify(ctx, m.parts, key, func(rec *ev.PartnershipIndex, _ bool) (bus.Change, error) {
		if _, has := rec.GetMdmById()[id]; has || !place(&rec.MdmById, id, r, true) {
			return bus.Keep, nil // indexed since by this version
		}
		return bus.Write, nil
	}); err != nil {
		return err
	}
	if again, err := current(); err != nil || again != nil {
		return err
	}
	// Removed or moved while it was folded in: the report's own step may
	// have found nothing to take out.
	_, err = bus.Modify(ctx, m.parts, key, func(rec *ev.PartnershipIndex, _ bool) (bus.Change, error) {
		switch got := rec.GetMdmById()[id]; {
		case got == nil || !got.EqualVT(r) || !place(&rec.MdmById, id, nil, false):
			return bus.Keep, nil
		case len(rec.MdmById) == 0 && len(rec.ById) == 0:
			return bus.Remove, nil
		}
		return bus.Write, nil
	})
	return err
}
