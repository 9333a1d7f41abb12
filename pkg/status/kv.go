package status

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
)

// ErrCorrupt is returned, wrapped with the key, for a record that does not
// decode as its type: a reader must tell a broken record from an absent
// one, which would otherwise look like "never happened".
var ErrCorrupt = errors.New("corrupt record")

// ErrExists is returned by Create when the key already holds a record.
var ErrExists = errors.New("record exists")

// fullKey is a record's key in the bucket.
func fullKey(org bus.Org, key string) string { return string(org) + "." + key }

// Put stores v as JSON under <org>.<key>, replacing what was there.
func Put[T any](ctx context.Context, kv jetstream.KeyValue, org bus.Org, key string, v T) error {
	k := fullKey(org, key)
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("status: put %s: encode: %w", k, err)
	}
	if _, err := kv.Put(ctx, k, b); err != nil {
		return fmt.Errorf("status: put %s: %w", k, err)
	}
	return nil
}

// Create stores v under <org>.<key> only if the key holds nothing, so
// that a worker can record a starting state without overwriting one
// another replica recorded since; it returns ErrExists otherwise.
func Create[T any](ctx context.Context, kv jetstream.KeyValue, org bus.Org, key string, v T) error {
	k := fullKey(org, key)
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("status: create %s: encode: %w", k, err)
	}
	if _, err := kv.Create(ctx, k, b); err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			return fmt.Errorf("status: create %s: %w", k, ErrExists)
		}
		return fmt.Errorf("status: create %s: %w", k, err)
	}
	return nil
}

// Get reads the record under <org>.<key>. ok is false, with no error, when
// the key holds none; a record that does not decode as T is an error
// wrapping ErrCorrupt and naming the key.
func Get[T any](ctx context.Context, kv jetstream.KeyValue, org bus.Org, key string) (T, bool, error) {
	var v T
	k := fullKey(org, key)
	e, err := kv.Get(ctx, k)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return v, false, nil
	}
	if err != nil {
		return v, false, fmt.Errorf("status: get %s: %w", k, err)
	}
	if err := decode(k, e.Value(), &v); err != nil {
		return v, false, fmt.Errorf("status: get %w", err)
	}
	return v, true, nil
}

// Delete removes the record under <org>.<key>; an absent one is no error.
func Delete(ctx context.Context, kv jetstream.KeyValue, org bus.Org, key string) error {
	k := fullKey(org, key)
	if err := kv.Delete(ctx, k); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("status: delete %s: %w", k, err)
	}
	return nil
}

// decode decodes the record under the full key k into v.
func decode(k string, b []byte, v any) error {
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w: %w", k, ErrCorrupt, err)
	}
	return nil
}
