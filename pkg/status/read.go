package status

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
)

// Org is everything the status bucket holds about one organisation,
// typed: what /status and the console show. Maps are keyed by kind (sync
// kind "quick"/"full", MDM source kind "graph"/"file"/"webhook") and are
// never nil; a pointer is nil when its record was never written.
type Org struct {
	// Last is the last sync pass of each kind; OK the last successful one.
	Last map[string]Sync `json:"last"`
	OK   map[string]Sync `json:"ok"`
	// Judged is when the evaluator had judged the last pass of each kind.
	Judged map[string]PassJudged `json:"judged"`
	// Guard is the blast-radius guard; Approval an approval not used yet.
	Guard    *Guard         `json:"guard,omitempty"`
	Approval *GuardApproval `json:"approval,omitempty"`
	// MDM is what each MDM source last reported.
	MDM map[string]MDMSource `json:"mdm"`
	// MDMWait is the first full sync's wait for the MDM inventory.
	MDMWait *MDMWait `json:"mdm_wait,omitempty"`
	// Schedule is the collector's schedule as it started it; Requested the
	// last sync of each kind the console asked for.
	Schedule  *Schedule              `json:"schedule,omitempty"`
	Requested map[string]SyncRequest `json:"requested"`
	// Policy is the policy in force; Default the plan for the
	// organisation's DefaultAccessLevel, DefaultApplied its last change.
	Policy         *Policy         `json:"policy,omitempty"`
	Default        *DefaultPlan    `json:"default,omitempty"`
	DefaultApplied *DefaultApplied `json:"default_applied,omitempty"`
	// Alerts is when each condition that goes on (bus.AlertDue's what:
	// "sync.quick", "smtp.auth", "executor.<what>", "dlq.<stage>") was
	// last alerted; a condition that resolved is absent. An administrator
	// sees here which alerts are being held back as repeats.
	Alerts map[string]time.Time `json:"alerts"`
	// Other holds records under keys this contract does not know (written
	// by a newer version), as stored, so that nothing the bucket holds is
	// hidden from a reader.
	Other map[string]json.RawMessage `json:"other,omitempty"`
}

// Read fills an Org from one listing of the organisation's keys
// (<org>.>), so a reader need not know the keys. A record that does not
// decode does not hide the others: Read returns every record it could
// read, together with an error wrapping ErrCorrupt that names each key
// it could not. A record deleted between the listing and its read is
// left out.
func Read(ctx context.Context, kv jetstream.KeyValue, org bus.Org) (Org, error) {
	o := Org{Last: map[string]Sync{}, OK: map[string]Sync{}, Judged: map[string]PassJudged{},
		MDM: map[string]MDMSource{}, Alerts: map[string]time.Time{}, Requested: map[string]SyncRequest{}}
	prefix := string(org) + "."
	l, err := kv.ListKeysFiltered(ctx, prefix+">")
	if err != nil {
		return o, fmt.Errorf("status: read %s: %w", org, err)
	}
	var keys []string
	for k := range l.Keys() {
		keys = append(keys, k)
	}
	var bad []error
	for _, k := range keys {
		e, err := kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return o, fmt.Errorf("status: read %s: %w", k, err)
		}
		if err := o.add(k, strings.TrimPrefix(k, prefix), e.Value()); err != nil {
			bad = append(bad, err)
		}
	}
	if len(bad) > 0 {
		return o, fmt.Errorf("status: read %s: %w", org, errors.Join(bad...))
	}
	return o, nil
}

// add decodes the record under key (rel after the org) into its field.
func (o *Org) add(key, rel string, b []byte) error {
	switch rel {
	case GuardKey:
		return decodeInto(key, b, &o.Guard)
	case GuardApprovalKey:
		return decodeInto(key, b, &o.Approval)
	case MDMWaitKey:
		return decodeInto(key, b, &o.MDMWait)
	case PolicyKey:
		return decodeInto(key, b, &o.Policy)
	case DefaultPlanKey:
		return decodeInto(key, b, &o.Default)
	case DefaultAppliedKey:
		return decodeInto(key, b, &o.DefaultApplied)
	case ScheduleKey:
		return decodeInto(key, b, &o.Schedule)
	}
	if what, ok := strings.CutPrefix(rel, bus.AlertedKeyPrefix); ok {
		at, err := time.Parse(time.RFC3339Nano, string(b))
		if err != nil {
			return fmt.Errorf("%s: %w: %w", key, ErrCorrupt, err)
		}
		o.Alerts[what] = at
		return nil
	}
	if kind, ok := strings.CutPrefix(rel, mdmPrefix); ok && kind != "" {
		return decodeMap(key, b, o.MDM, kind)
	}
	if rest, ok := strings.CutPrefix(rel, syncPrefix); ok {
		for _, s := range []struct {
			suffix string
			add    func(kind string) error
		}{
			{lastSuffix, func(kind string) error { return decodeMap(key, b, o.Last, kind) }},
			{okSuffix, func(kind string) error { return decodeMap(key, b, o.OK, kind) }},
			{judgedEnd, func(kind string) error { return decodeMap(key, b, o.Judged, kind) }},
			{requestEnd, func(kind string) error { return decodeMap(key, b, o.Requested, kind) }},
		} {
			if kind, ok := strings.CutSuffix(rest, s.suffix); ok && kind != "" && !strings.Contains(kind, ".") {
				return s.add(kind)
			}
		}
	}
	if o.Other == nil {
		o.Other = map[string]json.RawMessage{}
	}
	o.Other[rel] = json.RawMessage(b)
	return nil
}

// decodeInto decodes a record into a new T and points *dst at it.
func decodeInto[T any](key string, b []byte, dst **T) error {
	v := new(T)
	if err := decode(key, b, v); err != nil {
		return err
	}
	*dst = v
	return nil
}

// decodeMap decodes a record into m[kind].
func decodeMap[T any](key string, b []byte, m map[string]T, kind string) error {
	var v T
	if err := decode(key, b, &v); err != nil {
		return err
	}
	m[kind] = v
	return nil
}
