package executor

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// A batch claims only while the executor holds its liveness lease, and
// sends only under the tenure it claimed in: an executor whose lease was
// lost after its claims (NATS out of reach for most of the lease's TTL
// while another replica took the claims over) sends nothing, even when it
// holds the lease again by then, and its handlers are told to try again.
func TestBatchIsFencedByTheLivenessLease(t *testing.T) {
	type tenure struct {
		n    uint64
		held bool
	}
	tests := []struct {
		name string
		// before is the lease as the batch starts (a list: one per look,
		// the last one repeated), after once the claims are made.
		before []tenure
		after  tenure
		sent   bool
	}{
		{name: "held throughout", before: []tenure{{1, true}}, after: tenure{1, true}, sent: true},
		{name: "lost after the claims", before: []tenure{{1, true}}, after: tenure{1, false}},
		{name: "lost and taken again after the claims", before: []tenure{{1, true}}, after: tenure{2, true}},
		{name: "not held yet at the start: waits, then claims and sends", before: []tenure{{0, false}, {0, false}, {1, true}}, after: tenure{1, true}, sent: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var (
				mu      sync.Mutex
				looks   int
				seen    tenure // the last the batch looked at before claiming
				claimed bool
				applied atomic.Int32
			)
			b := &batcher{
				window: time.Millisecond, max: 10, claimTTL: time.Minute,
				tenure: func() (uint64, bool) {
					mu.Lock()
					defer mu.Unlock()
					if claimed {
						return tt.after.n, tt.after.held
					}
					seen = tt.before[min(looks, len(tt.before)-1)]
					looks++
					return seen.n, seen.held
				},
				claim: func(context.Context, string, *ev.AccessDecided, time.Time) (claimVerdict, error) {
					mu.Lock()
					defer mu.Unlock()
					if !seen.held {
						t.Errorf("claimed without the lease (tenure %d)", seen.n)
					}
					claimed = true
					return claimVerdict{kind: claimClaimed}, nil
				},
				apply: func(_ context.Context, changes []exchange.Change) ([]exchange.ChangeResult, error) {
					applied.Add(1)
					out := make([]exchange.ChangeResult, len(changes))
					for i, c := range changes {
						out[i] = exchange.ChangeResult{Change: c}
					}
					return out, nil
				},
			}
			d := &ev.AccessDecided{DecisionId: "d1", Desired: ev.DesiredAccess_DESIRED_ACCESS_ALLOW}
			res, v, err := b.submit(natstest.Context(t), &submission{key: "contoso.dev1.g1", decision: d,
				change: exchange.Change{Mailbox: "ann@contoso.com", DeviceID: "dev1", Access: exchange.AccessAllow}})
			if err != nil || v.kind != claimClaimed {
				t.Fatalf("verdict %+v error %v, want claimed", v, err)
			}
			if sent := applied.Load() == 1; sent != tt.sent {
				t.Fatalf("sent %v, want %v", sent, tt.sent)
			}
			if !tt.sent && !errors.Is(res.Err, errFenced) {
				t.Errorf("result error %v, want %v", res.Err, errFenced)
			}
			if tt.sent && res.Err != nil {
				t.Errorf("result error %v, want none", res.Err)
			}
		})
	}
}
