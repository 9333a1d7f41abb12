package bus_test

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
)

// The stream Provision makes for a bucket is the one nats.go makes for a
// KeyValue bucket, so jetstream.KeyValue opens it as a bucket, except that
// a replicated bucket has no direct gets (a follower could answer them);
// Provision keeps them on a bucket of one replica that nats.go created,
// and turns them off when the bucket gets replicas
// (TestProvisionOnClusterAppliesReplicas).
func TestBucketStreamIsNATSKeyValueDirectOnlyUnreplicated(t *testing.T) {
	top := bus.DefaultTopology()
	for _, tt := range []struct {
		name string
		cfg  jetstream.KeyValueConfig
	}{
		{"state bucket", jetstream.KeyValueConfig{Bucket: bus.BucketDecisions, History: 1, Storage: jetstream.FileStorage, Replicas: 1}},
		{"lease bucket", top.LeaseBucketConfig()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, _, js := natstest.Start(t)
			ctx := natstest.Context(t)
			kv, err := js.CreateKeyValue(ctx, tt.cfg)
			if err != nil {
				t.Fatal(err)
			}
			st, err := kv.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			theirs := st.(*jetstream.KeyValueBucketStatus).StreamInfo().Config
			ours := bus.BucketStreamConfig(tt.cfg)
			// One replica: no follower to answer a direct get with an
			// older value, so direct gets stay on, as nats.go has them.
			if !ours.AllowDirect || !theirs.AllowDirect {
				t.Fatalf("allow direct: ours %v, nats.go's %v", ours.AllowDirect, theirs.AllowDirect)
			}
			r3 := tt.cfg
			r3.Replicas = 3
			if bus.BucketStreamConfig(r3).AllowDirect {
				t.Fatal("allow direct on a bucket of three replicas")
			}
			theirs.Metadata = nil
			if !reflect.DeepEqual(ours, theirs) {
				t.Fatalf("bucket stream differs from nats.go's:\n ours   %+v\n theirs %+v", ours, theirs)
			}
			if err := bus.Provision(ctx, js, top); err != nil {
				t.Fatal(err)
			}
			s, err := js.Stream(ctx, "KV_"+tt.cfg.Bucket)
			if err != nil {
				t.Fatal(err)
			}
			if !s.CachedInfo().Config.AllowDirect {
				t.Fatal("Provision turned direct gets off on a bucket of one replica")
			}
			if _, err := js.KeyValue(ctx, tt.cfg.Bucket); err != nil {
				t.Fatalf("open the provisioned bucket: %v", err)
			}
		})
	}
}

// retry runs call with a short deadline until it succeeds: while a cluster
// elects a leader, JetStream calls time out.
func retry(t *testing.T, what string, call func(ctx context.Context) error) {
	t.Helper()
	ctx := natstest.Context(t)
	var last error
	defer func() {
		if t.Failed() && last != nil {
			t.Logf("%s: last error %v", what, last)
		}
	}()
	natstest.Eventually(t, time.Minute, what, func() bool {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		last = call(cctx)
		return last == nil
	})
}

// On a three-node cluster Provision creates every stream and bucket with
// the replicas the topology asks for, and applies a changed count to what
// exists; every bucket reads through its stream leader.
func TestProvisionOnClusterAppliesReplicas(t *testing.T) {
	c := natstest.StartCluster(t, 3)
	_, js := c.Connect(t, 0)
	top := bus.DefaultTopology()
	check := func(replicas int) {
		t.Helper()
		retry(t, fmt.Sprintf("provision R%d", replicas), func(ctx context.Context) error {
			top.Replicas = replicas
			return bus.Provision(ctx, js, top)
		})
		var names []string
		for _, cfg := range top.StreamConfigs() {
			names = append(names, cfg.Name)
		}
		for _, b := range append([]string{bus.BucketLeases}, bus.StateBuckets...) {
			names = append(names, "KV_"+b)
		}
		for _, name := range names {
			var info *jetstream.StreamInfo
			retry(t, "info "+name, func(ctx context.Context) error {
				s, err := js.Stream(ctx, name)
				if err == nil {
					info = s.CachedInfo()
				}
				return err
			})
			if info.Config.Replicas != replicas {
				t.Errorf("%s: %d replicas, want %d", name, info.Config.Replicas, replicas)
			}
			if strings.HasPrefix(name, "KV_") && info.Config.AllowDirect != (replicas == 1) {
				t.Errorf("%s: allow direct %v with %d replicas", name, info.Config.AllowDirect, replicas)
			}
		}
	}
	check(1)
	check(3)
	// Scaling up takes the new replicas through a catch-up; wait until
	// every peer of a bucket is current before reading the group.
	natstest.Eventually(t, time.Minute, "decisions bucket on three current peers", func() bool {
		ctx, cancel := context.WithTimeout(natstest.Context(t), 2*time.Second)
		defer cancel()
		s, err := js.Stream(ctx, "KV_"+bus.BucketDecisions)
		if err != nil {
			return false
		}
		cl := s.CachedInfo().Cluster
		if cl == nil || cl.Leader == "" || len(cl.Replicas) != 2 {
			return false
		}
		for _, p := range cl.Replicas {
			if !p.Current {
				return false
			}
		}
		return true
	})
}

// A worker that starts while its NATS cluster is still forming (a
// container set starts every node and worker at once) or has lost its
// quorum does not give up at the first unanswered request: Provision tries
// each step again until the cluster can answer, and ends only when its
// context does, saying what the last attempt met.
func TestProvisionWaitsForAClusterStillForming(t *testing.T) {
	bus.SetProvisionAttempt(t, 500*time.Millisecond)
	c := natstest.StartCluster(t, 3)
	c.Kill(1)
	c.Kill(2) // node 0 alone: no meta leader, the JetStream API cannot answer
	_, js := c.Connect(t, 0)
	top := bus.DefaultTopology()
	top.Replicas = 3

	t.Run("gives up when its context ends, saying why", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(natstest.Context(t), 2*time.Second)
		defer cancel()
		err := bus.Provision(ctx, js, top)
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "the last attempt") {
			t.Fatalf("Provision without a quorum = %v, want the deadline and the last attempt's error", err)
		}
	})
	t.Run("succeeds once the cluster forms", func(t *testing.T) {
		done := make(chan error, 1)
		go func() { done <- bus.Provision(natstest.Context(t), js, top) }()
		c.Restart(1)
		c.Restart(2)
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Provision while the cluster formed: %v", err)
			}
		case <-time.After(time.Minute):
			t.Fatal("Provision did not finish within a minute of the cluster forming")
		}
		s, err := js.Stream(natstest.Context(t), bus.StreamEAS)
		if err != nil {
			t.Fatal(err)
		}
		if r := s.CachedInfo().Config.Replicas; r != 3 {
			t.Errorf("%s has %d replicas, want 3", bus.StreamEAS, r)
		}
	})
}

// A value put through one node is what a Get through another node's
// connection returns right after, for every key: the workers' joins and
// compare-and-set depend on it. The same loop against a bucket as nats.go
// makes it (direct gets on) shows what happens without: a follower answers
// from what it has applied so far.
func TestBucketReadAfterWriteAcrossNodes(t *testing.T) {
	c := natstest.StartCluster(t, 3)
	_, js0 := c.Connect(t, 0)
	top := bus.DefaultTopology()
	top.Replicas = 3
	retry(t, "provision R3", func(ctx context.Context) error { return bus.Provision(ctx, js0, top) })
	retry(t, "nats.go bucket", func(ctx context.Context) error {
		_, err := js0.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "direct", Replicas: 3, Storage: jetstream.FileStorage})
		return err
	})
	// Write through the bucket stream's leader, read through each follower.
	leaderOf := func(stream string) int {
		var leader string
		retry(t, "leader of "+stream, func(ctx context.Context) error {
			s, err := js0.Stream(ctx, stream)
			if err != nil {
				return err
			}
			if cl := s.CachedInfo().Cluster; cl != nil && cl.Leader != "" {
				leader = cl.Leader
				return nil
			}
			return fmt.Errorf("no leader")
		})
		for i := range c.Size() {
			if c.Name(i) == leader {
				return i
			}
		}
		t.Fatalf("leader %q is no node", leader)
		return -1
	}
	const rounds = 300
	stale := func(bucket string) int {
		t.Helper()
		w := leaderOf("KV_" + bucket)
		_, wjs := c.Connect(t, w)
		var readers []jetstream.KeyValue
		for i := range c.Size() {
			if i == w {
				continue
			}
			_, rjs := c.Connect(t, i)
			var kv jetstream.KeyValue
			retry(t, "open "+bucket, func(ctx context.Context) (err error) { kv, err = rjs.KeyValue(ctx, bucket); return err })
			readers = append(readers, kv)
		}
		var wkv jetstream.KeyValue
		retry(t, "open "+bucket, func(ctx context.Context) (err error) { wkv, err = wjs.KeyValue(ctx, bucket); return err })
		ctx := natstest.Context(t)
		n := 0
		for i := range rounds {
			key, val := fmt.Sprintf("contoso.k%d", i%7), fmt.Sprintf("v%d", i)
			if _, err := wkv.Put(ctx, key, []byte(val)); err != nil {
				t.Fatal(err)
			}
			e, err := readers[i%len(readers)].Get(ctx, key)
			if err != nil && !isNotFound(err) {
				t.Fatal(err)
			}
			if err != nil || string(e.Value()) != val {
				n++
			}
		}
		return n
	}
	if n := stale(bus.BucketMDMUsers); n != 0 {
		t.Fatalf("%d of %d reads through another node missed the write just acknowledged", n, rounds)
	}
	// The control: with direct gets a follower answers, and misses a write
	// it has not applied yet whenever it lags (59 of 300 in one run here,
	// none in another on a loaded machine). How often depends on timing,
	// so it is reported, not required: requiring it made the test flaky.
	n := stale("direct")
	t.Logf("with direct gets (nats.go's default), %d of %d reads through a follower missed the write just acknowledged", n, rounds)
}

func isNotFound(err error) bool {
	return errors.Is(err, jetstream.ErrKeyNotFound)
}

// Unanswered tells what a new leader will likely answer from what JetStream
// refused: the claim and provisioning retries depend on it.
func TestUnanswered(t *testing.T) {
	for _, tt := range []struct {
		name string
		err  error
		want bool
	}{
		{"timeout", fmt.Errorf("get: %w", context.DeadlineExceeded), true},
		{"nats timeout", nats.ErrTimeout, true},
		{"no response from stream", fmt.Errorf("update: %w", jetstream.ErrNoStreamResponse), true},
		{"no responders", nats.ErrNoResponders, true},
		{"temporarily unavailable", &jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}, true},
		{"a refusal", &jetstream.APIError{Code: 400, ErrorCode: 10071, Description: "wrong last sequence"}, false},
		{"key exists", jetstream.ErrKeyExists, false},
		{"cancelled", context.Canceled, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := bus.Unanswered(tt.err); got != tt.want {
				t.Errorf("Unanswered(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

// Provisioning waits out what a forming cluster answers and stops at a
// refusal of the setting itself. CI once saw "no suitable peers for
// placement, peer offline" while two nodes rejoined: the meta leader knew
// them before they reported in.
func TestProvisionRetryable(t *testing.T) {
	for _, tt := range []struct {
		name string
		err  error
		want bool
	}{
		{"no answer", fmt.Errorf("stream info: %w", context.DeadlineExceeded), true},
		{"temporarily unavailable", &jetstream.APIError{Code: 503, ErrorCode: 10008}, true},
		{"peers offline", &jetstream.APIError{Code: 400, ErrorCode: 10005, Description: "no suitable peers for placement, peer offline"}, true},
		{"a setting refused", &jetstream.APIError{Code: 400, ErrorCode: 10052, Description: "stream configuration for replicas is invalid"}, false},
		{"name in use", jetstream.ErrStreamNameAlreadyInUse, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := bus.ProvisionRetryable(tt.err); got != tt.want {
				t.Errorf("provisionRetryable(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

// The wait Provision ends with: a stream that is not found yet (a new
// meta leader that has not applied its creation) is asked for again until
// it is, and one that never is ends the wait with its name when the
// start-up budget runs out. Only a forming cluster makes a stream
// Provision has just made unfound, so the wait is driven here with a
// stream made later, not through Provision.
func TestWaitVisibleAsksUntilAStreamIsFound(t *testing.T) {
	_, _, js := natstest.Start(t)
	ctx := natstest.Context(t)
	t.Run("found once created", func(t *testing.T) {
		done := make(chan error, 1)
		go func() { done <- bus.WaitVisible(ctx, js, []string{"LATE"}) }()
		start := time.Now()
		natstest.Eventually(t, 10*time.Second, "three retries' time", func() bool { return time.Since(start) > time.Second })
		select {
		case err := <-done:
			t.Fatalf("returned %v before the stream existed", err)
		default:
		}
		if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "LATE", Subjects: []string{"late.>"}}); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("after the stream was created: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("still waiting 10s after the stream was created")
		}
	})
	t.Run("never created", func(t *testing.T) {
		short, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		err := bus.WaitVisible(short, js, []string{"NEVER"})
		if err == nil || !strings.Contains(err.Error(), "stream NEVER") || !strings.Contains(err.Error(), "not found yet") {
			t.Fatalf("err = %v, want one naming stream NEVER, not found yet", err)
		}
	})
}

// The MDM memory that an earlier easguard made without limit markers gets
// them when a worker of this one provisions, and keeps what it holds: the
// matcher's tombstones there expire by a per-key TTL, which needs them.
func TestProvisionGivesTheMDMMemoryLimitMarkers(t *testing.T) {
	_, _, js := natstest.Start(t)
	ctx := natstest.Context(t)
	earlier := jetstream.KeyValueConfig{Bucket: bus.BucketMDMUsers, History: 1, Storage: jetstream.FileStorage, Replicas: 1}
	if _, err := js.CreateStream(ctx, bus.BucketStreamConfig(earlier)); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, bus.BucketMDMUsers)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "contoso.mdm-id.m1", []byte("kept")); err != nil {
		t.Fatal(err)
	}
	if st, _ := kv.Status(ctx); st.LimitMarkerTTL() != 0 {
		t.Fatalf("the earlier bucket has limit markers (%s) already", st.LimitMarkerTTL())
	}
	if err := bus.Provision(ctx, js, bus.DefaultTopology()); err != nil {
		t.Fatal(err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := bus.DefaultTopology().StateBucketConfig(bus.BucketMDMUsers).LimitMarkerTTL; want <= 0 || st.LimitMarkerTTL() != want {
		t.Fatalf("limit markers after provisioning: %s, want %s", st.LimitMarkerTTL(), want)
	}
	if e, err := kv.Get(ctx, "contoso.mdm-id.m1"); err != nil || string(e.Value()) != "kept" {
		t.Fatalf("the record the earlier bucket held: %v", err)
	}
}
