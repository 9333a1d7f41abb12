package status_test

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/status"
)

const contoso, fabrikam bus.Org = "contoso", "fabrikam"

// bucket starts a JetStream server and creates the status bucket on it.
func bucket(tb testing.TB) jetstream.KeyValue {
	tb.Helper()
	_, _, js := natstest.Start(tb)
	kv, err := js.CreateKeyValue(natstest.Context(tb), jetstream.KeyValueConfig{Bucket: bus.BucketStatus})
	if err != nil {
		tb.Fatal(err)
	}
	return kv
}

// at is a time as it comes back from JSON: UTC, no monotonic reading.
func at(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		panic(err)
	}
	return t
}

func intp(n int) *int { return &n }

// roundTrip puts v under key and gets it back as T.
func roundTrip[T any](t *testing.T, kv jetstream.KeyValue, key string, v T) {
	t.Helper()
	ctx := natstest.Context(t)
	if err := status.Put(ctx, kv, contoso, key, v); err != nil {
		t.Fatal(err)
	}
	got, ok, err := status.Get[T](ctx, kv, contoso, key)
	if err != nil || !ok {
		t.Fatalf("get %s: ok %v, %v", key, ok, err)
	}
	if !reflect.DeepEqual(got, v) {
		t.Fatalf("get %s:\n got %+v\nwant %+v", key, got, v)
	}
}

// Every record comes back as it was put, under its key.
func TestPutGetRoundTrip(t *testing.T) {
	t.Parallel()
	kv := bucket(t)
	now := at("2026-03-01T10:00:00.123456789Z")
	for _, tc := range []struct {
		name string
		run  func(t *testing.T)
	}{
		{"sync", func(t *testing.T) {
			roundTrip(t, kv, status.SyncLastKey("full"), status.Sync{SyncID: "s1", Kind: "full", StartedAt: now, FinishedAt: now.Add(time.Second),
				Success: true, Counts: map[string]int64{"observed": 3}, Settings: []string{"DefaultAccessLevel"}, DefaultAccessLevel: "Allow"})
		}},
		{"guard", func(t *testing.T) {
			roundTrip(t, kv, status.GuardKey, status.Guard{State: status.GuardTripped, Batch: "sync/p1", Revocations: 3, Allowed: 4,
				Share: 0.75, Threshold: 0.5, At: now, Detail: "3 of 4", Since: now, Key: "abc"})
		}},
		{"approval", func(t *testing.T) {
			roundTrip(t, kv, status.GuardApprovalKey, status.GuardApproval{Key: "abc", By: "alice", Reason: "stolen", At: now})
		}},
		{"mdm wait", func(t *testing.T) {
			roundTrip(t, kv, status.MDMWaitKey, status.MDMWait{Since: now, Until: now.Add(time.Minute), InventoryRead: true, Indexed: true, Checks: 4})
		}},
		{"mdm source read nothing", func(t *testing.T) {
			roundTrip(t, kv, status.MDMSourceKey("file"), status.MDMSource{Source: "file", State: status.MDMOK, At: now, Devices: intp(0)})
		}},
		{"mdm source alert", func(t *testing.T) {
			roundTrip(t, kv, status.MDMSourceKey("graph"), status.MDMSource{Source: "graph", State: status.MDMAlert, At: now,
				Alert: "ALERT_KIND_MDM_UNREACHABLE", Summary: "down", Detail: map[string]string{"page": "2"}})
		}},
		{"pass judged", func(t *testing.T) {
			roundTrip(t, kv, status.PassJudgedKey("quick"), status.PassJudged{SyncID: "s2", Kind: "quick", Observed: 7, FinishedAt: now, JudgedAt: now})
		}},
		{"policy", func(t *testing.T) {
			roundTrip(t, kv, status.PolicyKey, status.Policy{Version: "v1", DryRun: true, LoadedAt: now, Warnings: []string{"w"}})
		}},
		{"default plan", func(t *testing.T) {
			roundTrip(t, kv, status.DefaultPlanKey, status.DefaultPlan{State: status.PlanHeld, SyncID: "s1", From: "Allow", To: "Block", At: now, Since: now, Key: "k"})
		}},
		{"default applied", func(t *testing.T) {
			roundTrip(t, kv, status.DefaultAppliedKey, status.DefaultApplied{DecisionID: "d", From: "Allow", To: "Block", Found: "Allow", Outcome: status.DefaultChanged, At: now})
		}},
		{"schedule", func(t *testing.T) {
			roundTrip(t, kv, status.ScheduleKey, status.Schedule{QuickInterval: 5 * time.Minute, FullInterval: 24 * time.Hour, StartedAt: now})
		}},
		{"sync requested", func(t *testing.T) {
			roundTrip(t, kv, status.SyncRequestedKey("full"), status.SyncRequest{SyncID: "manual-1", By: "alice", RequestedAt: now})
		}},
	} {
		t.Run(tc.name, tc.run)
	}
}

// The records keep the JSON names the bucket held before the contract:
// the demo walker and running installations read them.
func TestWireFormat(t *testing.T) {
	t.Parallel()
	now := at("2026-03-01T10:00:00Z")
	for _, tc := range []struct {
		name string
		v    any
		want string
	}{
		{"mdm read", status.MDMSource{Source: "file", State: status.MDMOK, At: now, Devices: intp(0)},
			`{"source":"file","state":"ok","at":"2026-03-01T10:00:00Z","devices":0}`},
		{"mdm changes", status.MDMSource{Source: "webhook", State: status.MDMOK, At: now, LastChanges: intp(2)},
			`{"source":"webhook","state":"ok","at":"2026-03-01T10:00:00Z","last_changes":2}`},
		{"mdm alert", status.MDMSource{Source: "file", State: status.MDMAlert, At: now, Alert: "ALERT_KIND_MDM_INVENTORY_EMPTY", Summary: "empty", Detail: map[string]string{"known": "3"}},
			`{"source":"file","state":"alert","at":"2026-03-01T10:00:00Z","alert":"ALERT_KIND_MDM_INVENTORY_EMPTY","summary":"empty","detail":{"known":"3"}}`},
		{"approval", status.GuardApproval{Key: "k", By: "alice", At: now},
			`{"key":"k","by":"alice","at":"2026-03-01T10:00:00Z"}`},
		{"mdm wait", status.MDMWait{Waiting: true, Since: now, Checks: 1},
			`{"waiting":true,"since":"2026-03-01T10:00:00Z","inventory_read":false,"indexed":false,"checks":1}`},
		{"pass judged", status.PassJudged{SyncID: "s", Kind: "full", Observed: 1, FinishedAt: now, JudgedAt: now},
			`{"sync_id":"s","kind":"full","observed":1,"finished_at":"2026-03-01T10:00:00Z","judged_at":"2026-03-01T10:00:00Z"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := json.Marshal(tc.v)
			if err != nil {
				t.Fatal(err)
			}
			if string(b) != tc.want {
				t.Fatalf("got  %s\nwant %s", b, tc.want)
			}
		})
	}
}

// An absent record is not an error; Delete of one is not either.
func TestAbsent(t *testing.T) {
	t.Parallel()
	kv := bucket(t)
	ctx := natstest.Context(t)
	g, ok, err := status.Get[status.Guard](ctx, kv, contoso, status.GuardKey)
	if err != nil || ok || g != (status.Guard{}) {
		t.Fatalf("absent guard: %+v %v %v", g, ok, err)
	}
	if err := status.Delete(ctx, kv, contoso, status.GuardApprovalKey); err != nil {
		t.Fatalf("delete absent: %v", err)
	}
	if err := status.Put(ctx, kv, contoso, status.GuardApprovalKey, status.GuardApproval{Key: "k"}); err != nil {
		t.Fatal(err)
	}
	if err := status.Delete(ctx, kv, contoso, status.GuardApprovalKey); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := status.Get[status.GuardApproval](ctx, kv, contoso, status.GuardApprovalKey); ok || err != nil {
		t.Fatalf("deleted approval: ok %v, %v", ok, err)
	}
	o, err := status.Read(ctx, kv, contoso)
	if err != nil || o.Approval != nil || o.Guard != nil || len(o.Last) != 0 || o.Last == nil {
		t.Fatalf("empty org: %+v %v", o, err)
	}
}

// Create records a starting state once: a second Create, another
// replica's, leaves the first in place and says so.
func TestCreate(t *testing.T) {
	t.Parallel()
	kv := bucket(t)
	ctx := natstest.Context(t)
	if err := status.Create(ctx, kv, contoso, status.GuardKey, status.Guard{State: status.GuardOK, Detail: "first"}); err != nil {
		t.Fatal(err)
	}
	err := status.Create(ctx, kv, contoso, status.GuardKey, status.Guard{State: status.GuardOK, Detail: "second"})
	if !errors.Is(err, status.ErrExists) || !strings.Contains(err.Error(), "contoso.guard") {
		t.Fatalf("second create: %v", err)
	}
	if g, _, _ := status.Get[status.Guard](ctx, kv, contoso, status.GuardKey); g.Detail != "first" {
		t.Fatalf("guard %+v", g)
	}
}

// A record that does not decode is an error naming its key, never taken
// for an absent one; Read still returns the records it could read.
func TestCorrupt(t *testing.T) {
	t.Parallel()
	kv := bucket(t)
	ctx := natstest.Context(t)
	if _, err := kv.Put(ctx, "contoso.guard", []byte(`{"state":`)); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "contoso."+status.AlertKey("smtp.auth"), []byte("yesterday")); err != nil {
		t.Fatal(err)
	}
	if err := status.Put(ctx, kv, contoso, status.PolicyKey, status.Policy{Version: "v1"}); err != nil {
		t.Fatal(err)
	}
	_, ok, err := status.Get[status.Guard](ctx, kv, contoso, status.GuardKey)
	if ok || !errors.Is(err, status.ErrCorrupt) || !strings.Contains(err.Error(), "contoso.guard") {
		t.Fatalf("get corrupt guard: ok %v, %v", ok, err)
	}
	o, err := status.Read(ctx, kv, contoso)
	if !errors.Is(err, status.ErrCorrupt) || !strings.Contains(err.Error(), "contoso.guard") || !strings.Contains(err.Error(), "contoso.alerted.smtp.auth") {
		t.Fatalf("read: %v", err)
	}
	if o.Guard != nil || o.Policy == nil || o.Policy.Version != "v1" {
		t.Fatalf("read around the corrupt records: %+v", o)
	}
}

// Read sorts every key of the organisation into its field, the alert
// throttle as bus.AlertDue writes it included, and no other
// organisation's.
func TestRead(t *testing.T) {
	t.Parallel()
	kv := bucket(t)
	ctx := natstest.Context(t)
	now := at("2026-03-01T10:00:00Z")
	put := func(org bus.Org, key string, v any) {
		t.Helper()
		if err := status.Put(ctx, kv, org, key, v); err != nil {
			t.Fatal(err)
		}
	}
	full := status.Sync{SyncID: "f1", Kind: "full", Success: true, StartedAt: now, Counts: map[string]int64{"observed": 2}}
	quick := status.Sync{SyncID: "q1", Kind: "quick", StartedAt: now, Errors: []string{"unreachable"}, Counts: map[string]int64{}}
	judged := status.PassJudged{SyncID: "f1", Kind: "full", Observed: 2, FinishedAt: now, JudgedAt: now}
	guard := status.Guard{State: status.GuardTripped, Key: "k", At: now, Since: now}
	approval := status.GuardApproval{Key: "k", By: "alice", At: now}
	graph := status.MDMSource{Source: "graph", State: status.MDMOK, At: now, Devices: intp(2)}
	wait := status.MDMWait{Since: now, Until: now, InventoryRead: true, Indexed: true, Checks: 2}
	pol := status.Policy{Version: "v1", LoadedAt: now}
	plan := status.DefaultPlan{State: status.PlanInPlace, SyncID: "f1", From: "Allow", At: now}
	applied := status.DefaultApplied{DecisionID: "d", Outcome: status.DefaultAlready, At: now}
	sched := status.Schedule{QuickInterval: time.Minute, FullInterval: time.Hour, StartedAt: now}
	asked := status.SyncRequest{SyncID: "manual-1", By: "alice", RequestedAt: now}
	put(contoso, status.SyncLastKey("full"), full)
	put(contoso, status.SyncOKKey("full"), full)
	put(contoso, status.SyncLastKey("quick"), quick)
	put(contoso, status.PassJudgedKey("full"), judged)
	put(contoso, status.GuardKey, guard)
	put(contoso, status.GuardApprovalKey, approval)
	put(contoso, status.MDMSourceKey("graph"), graph)
	put(contoso, status.MDMWaitKey, wait)
	put(contoso, status.PolicyKey, pol)
	put(contoso, status.DefaultPlanKey, plan)
	put(contoso, status.DefaultAppliedKey, applied)
	put(contoso, status.ScheduleKey, sched)
	put(contoso, status.SyncRequestedKey("full"), asked)
	put(contoso, "console.note", map[string]string{"by": "a newer version"})
	// The throttle of an alert, written as the workers write it.
	due, err := bus.AlertDue(ctx, kv, contoso, "sync.quick", time.Hour, now)
	if err != nil || !due {
		t.Fatalf("alert due: %v %v", due, err)
	}
	// Fabrikam's records, some under the same keys, are not contoso's.
	put(fabrikam, status.GuardKey, status.Guard{State: status.GuardOK})
	put(fabrikam, status.SyncOKKey("quick"), quick)
	put(fabrikam, status.MDMSourceKey("file"), status.MDMSource{Source: "file"})

	got, err := status.Read(ctx, kv, contoso)
	if err != nil {
		t.Fatal(err)
	}
	want := status.Org{
		Last:           map[string]status.Sync{"full": full, "quick": quick},
		OK:             map[string]status.Sync{"full": full},
		Judged:         map[string]status.PassJudged{"full": judged},
		Guard:          &guard,
		Approval:       &approval,
		MDM:            map[string]status.MDMSource{"graph": graph},
		MDMWait:        &wait,
		Policy:         &pol,
		Default:        &plan,
		DefaultApplied: &applied,
		Schedule:       &sched,
		Requested:      map[string]status.SyncRequest{"full": asked},
		Alerts:         map[string]time.Time{"sync.quick": now},
		Other:          map[string]json.RawMessage{"console.note": json.RawMessage(`{"by":"a newer version"}`)},
	}
	if !reflect.DeepEqual(got, want) {
		gb, _ := json.MarshalIndent(got, "", " ")
		wb, _ := json.MarshalIndent(want, "", " ")
		t.Fatalf("read contoso:\n%s\nwant\n%s", gb, wb)
	}

	other, err := status.Read(ctx, kv, fabrikam)
	if err != nil {
		t.Fatal(err)
	}
	if other.Guard == nil || other.Guard.State != status.GuardOK || len(other.OK) != 1 || len(other.Last) != 0 || len(other.MDM) != 1 ||
		other.Approval != nil || len(other.Alerts) != 0 || other.Other != nil {
		t.Fatalf("read fabrikam: %+v", other)
	}
}

// Put and Get report the operation and the key when the bucket fails them.
func TestBucketErrorsNameTheKey(t *testing.T) {
	t.Parallel()
	kv := bucket(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := status.Put(ctx, kv, contoso, status.GuardKey, status.Guard{})
	if err == nil || !strings.Contains(err.Error(), "put contoso.guard") || !errors.Is(err, context.Canceled) {
		t.Fatalf("put with a cancelled context: %v", err)
	}
	_, _, err = status.Get[status.Guard](ctx, kv, contoso, status.GuardKey)
	if err == nil || !strings.Contains(err.Error(), "get contoso.guard") || !errors.Is(err, context.Canceled) {
		t.Fatalf("get with a cancelled context: %v", err)
	}
}

// Overdue follows the Prometheus rules: three quick intervals, a full
// interval and a twelfth.
func TestScheduleOverdue(t *testing.T) {
	s := status.Schedule{QuickInterval: 5 * time.Minute, FullInterval: 24 * time.Hour}
	for kind, want := range map[string]time.Duration{"quick": 15 * time.Minute, "full": 26 * time.Hour} {
		if got := s.Overdue(kind); got != want {
			t.Errorf("%s overdue after %s, want %s", kind, got, want)
		}
	}
}
