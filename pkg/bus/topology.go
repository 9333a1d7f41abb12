package bus

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go/jetstream"
)

// Stream names. Facts that may be replayed or audited use limits retention;
// commands consumed exactly once use work-queue retention.
const (
	StreamEAS          = "EASGUARD_EAS"
	StreamMDM          = "EASGUARD_MDM"
	StreamMatch        = "EASGUARD_MATCH"
	StreamDecisions    = "EASGUARD_DECISIONS"
	StreamApplied      = "EASGUARD_APPLIED"
	StreamNotify       = "EASGUARD_NOTIFY"
	StreamSyncRequests = "EASGUARD_SYNC_REQUESTS"
	StreamSync         = "EASGUARD_SYNC"
	StreamSettings     = "EASGUARD_SETTINGS"
	// StreamCommands holds operators' device commands (remove, wipe,
	// rejudge) until the executor or the matcher carries them out.
	StreamCommands = "EASGUARD_COMMANDS"
	StreamAlerts   = "EASGUARD_ALERTS"
	StreamDLQ      = "EASGUARD_DLQ"
	StreamAudit    = "EASGUARD_AUDIT"
	// StreamAdvisories captures the server's max-deliveries advisories,
	// which are fire-and-forget core messages, so that the dead-letter mover
	// can process every one even if it was down when it was sent.
	StreamAdvisories = "EASGUARD_ADVISORIES"
)

// BucketLeases is the KV bucket holding per-org singleton leases. Its
// bucket TTL is the lease TTL: a holder that stops renewing loses its key.
const BucketLeases = "easguard_leases"

// State buckets. Workers join and remember through them; every key starts
// with the org (see StateKey), so one bucket serves every organisation.
const (
	// BucketPartnerships: the matcher's record of each EAS device id,
	// <org>.<device> → PartnershipIndex: the partnerships observed with
	// the id and the MDM records that name it, the two sides of its join.
	BucketPartnerships = "easguard_partnerships"
	// BucketMDMUsers: MDM records without an EAS id, by user,
	// <org>.<user> → MDMIndex, which explain a non-match; and each MDM
	// record's last report, <org>.mdm-id.<mdm id> → MDMIndex.
	BucketMDMUsers = "easguard_mdm_users"
	// BucketDecisions: the evaluator's last decision per partnership.
	BucketDecisions = "easguard_decisions"
	// BucketStaged: decisions the blast-radius guard holds until their
	// sync or window is complete.
	BucketStaged = "easguard_staged"
	// BucketApplied: the executor's last applied decision per partnership.
	BucketApplied = "easguard_applied"
	// BucketNotified: when the mailer last mailed about a partnership.
	BucketNotified = "easguard_notified"
	// BucketCollector: the collector's view of Exchange, for change and
	// disappearance detection.
	BucketCollector = "easguard_collector"
	// BucketStatus: per-org status the console reads (pkg/status): last
	// syncs, guard state, MDM source health.
	BucketStatus = "easguard_status"
	// BucketMDMSources: what each inventory MDM source (file, Graph) last
	// delivered, <org>.<source>.<mdm id> → MDMSourceRecord, so removals
	// made while the source was down are still reported.
	BucketMDMSources = "easguard_mdm_sources"
)

// BucketMDMReplay holds the MDM webhook's accepted event ids, each key with
// its own TTL, so a captured request is refused after a restart and by
// every replica. Per-key TTLs need limit markers on the bucket.
const BucketMDMReplay = "easguard_mdm_replay"

// BucketConsoleSessions holds the console's sign-ins and the sign-ins in
// progress (keyed by hashes, never by the secrets themselves), so every
// console replica knows every session and a sign-out ends it everywhere.
// Its TTL bounds every session, whatever the console's setting.
const BucketConsoleSessions = "easguard_console_sessions"

// consoleSessionTTL is the session bucket's TTL: no sign-in outlives it.
const consoleSessionTTL = 24 * time.Hour

// ConsoleSessionsBucketConfig returns the configuration of the console's
// session bucket.
func (t Topology) ConsoleSessionsBucketConfig() jetstream.KeyValueConfig {
	return jetstream.KeyValueConfig{
		Bucket:      BucketConsoleSessions,
		Description: "console sign-ins",
		History:     1,
		TTL:         consoleSessionTTL,
		Storage:     jetstream.FileStorage,
		Replicas:    t.Replicas,
	}
}

// BucketMDMDevicesLegacy is where an earlier easguard kept the matcher's
// MDM records by EAS id, apart from the partnerships. It is no longer
// provisioned: the matcher folds what it finds there into
// BucketPartnerships when it starts, and deletes it when it is empty.
const BucketMDMDevicesLegacy = "easguard_mdm_devices"

// StateBuckets lists the state buckets Provision creates.
var StateBuckets = []string{BucketPartnerships, BucketMDMUsers, BucketDecisions, BucketStaged, BucketApplied, BucketNotified, BucketCollector, BucketStatus, BucketMDMSources}

// StateBucketConfig returns the configuration of a state bucket. The MDM
// memory (BucketMDMUsers) has limit markers, which per-key TTLs need: a
// removal's tombstone there is written to expire (the matcher's
// tombstoneTTL), where it would otherwise stay for good, one key for every
// MDM record ever removed.
func (t Topology) StateBucketConfig(bucket string) jetstream.KeyValueConfig {
	cfg := jetstream.KeyValueConfig{Bucket: bucket, History: 1, Storage: jetstream.FileStorage, Replicas: t.Replicas}
	if bucket == BucketMDMUsers {
		cfg.LimitMarkerTTL = time.Minute
	}
	return cfg
}

// StateKey builds a state key: the org, then each part as a subject-safe
// token (KeyToken), so a hostile device id or user name cannot escape its
// place in the key.
func StateKey(org Org, parts ...string) (string, error) {
	if _, err := ParseOrg(string(org)); err != nil {
		return "", fmt.Errorf("state key: %w", err)
	}
	key := string(org)
	for _, p := range parts {
		tok, err := KeyToken(p)
		if err != nil {
			return "", fmt.Errorf("state key: %w", err)
		}
		key += "." + tok
	}
	return key, nil
}

// maxDeliveriesAdvisory is the subject prefix of the server's advisory sent
// when a message reaches a consumer's MaxDeliver.
const maxDeliveriesAdvisory = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"

// Topology holds the tunables of every stream, consumer and bucket. The
// zero value is not useful; start from DefaultTopology.
type Topology struct {
	// Replicas of every stream and bucket: 1 for a single server, 3 for a cluster.
	Replicas int
	// FactsMaxAge bounds how long observed, matched, decided and applied events are kept.
	FactsMaxAge time.Duration
	// DeadLetterMaxAge bounds how long dead letters and alerts are kept; long, because a human reads them.
	DeadLetterMaxAge time.Duration
	// DuplicateWindow is how long a Nats-Msg-Id is remembered; it must cover
	// the longest publisher retry and a worker restart.
	DuplicateWindow time.Duration
	// LeaseTTL bounds how long a singleton duty stays unattended after its
	// holder stops renewing: a standby takes over within it. At least 2s.
	LeaseTTL time.Duration
	// Consumer holds the defaults for durable consumers.
	Consumer ConsumerDefaults
}

// ConsumerDefaults are the redelivery settings of durable consumers.
type ConsumerDefaults struct {
	// AckWait is how long a delivered message may go without an ack or a
	// progress heartbeat before the server redelivers it.
	AckWait time.Duration
	// MaxDeliver bounds deliveries; the last failed one is dead-lettered.
	MaxDeliver int
	// MaxAckPending bounds unacknowledged messages across all instances of
	// a consumer: the real concurrency limit of a stage.
	MaxAckPending int
}

// DefaultTopology returns production defaults.
func DefaultTopology() Topology {
	return Topology{
		Replicas:         1,
		FactsMaxAge:      14 * 24 * time.Hour,
		DeadLetterMaxAge: 90 * 24 * time.Hour,
		DuplicateWindow:  10 * time.Minute,
		LeaseTTL:         15 * time.Second,
		Consumer: ConsumerDefaults{
			AckWait:       30 * time.Second,
			MaxDeliver:    10,
			MaxAckPending: 256,
		},
	}
}

// AuditMaxAge is how long operator actions are kept at least: a year and
// a month, so that a yearly review finds the whole year.
const AuditMaxAge = 400 * 24 * time.Hour

// StreamConfigs returns the configuration of every stream easguard uses.
func (t Topology) StreamConfigs() []jetstream.StreamConfig {
	facts := func(e Event, desc string) jetstream.StreamConfig {
		return jetstream.StreamConfig{
			Name:        e.stream,
			Description: desc,
			Subjects:    streamSubjects(e.stream),
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      t.FactsMaxAge,
			Duplicates:  t.DuplicateWindow,
			Storage:     jetstream.FileStorage,
			Replicas:    t.Replicas,
		}
	}
	syncReq := facts(SyncRequested, "sync commands for the collector, consumed once")
	syncReq.Retention = jetstream.WorkQueuePolicy
	commands := facts(DeviceCommanded, "operators' device commands for the executor and the matcher, consumed once")
	commands.Retention = jetstream.WorkQueuePolicy
	alerts := facts(AlertRaised, "alerts for operators")
	alerts.MaxAge = t.DeadLetterMaxAge
	dlq := facts(DeadLetter, "messages a worker gave up on, with the reason in headers")
	dlq.MaxAge = t.DeadLetterMaxAge
	audit := facts(AuditRecorded, "operator actions: who did what, when, from where, and the outcome")
	audit.MaxAge = max(t.FactsMaxAge, AuditMaxAge)
	return []jetstream.StreamConfig{
		facts(EASObserved, "ActiveSync partnerships as observed on Exchange"),
		facts(MDMChanged, "device records changed in an MDM"),
		facts(DeviceMatched, "partnerships joined with MDM records"),
		facts(AccessDecided, "access decisions of the evaluator"),
		facts(AccessApplied, "access changes applied on Exchange"),
		facts(NotifySent, "notification mails sent"),
		syncReq,
		facts(SyncCompleted, "sync passes of the collector"),
		facts(SettingsDecided, "planned changes of the organisation settings"),
		commands,
		alerts,
		dlq,
		audit,
		{
			Name:        StreamAdvisories,
			Description: "max-deliveries advisories for the dead-letter mover",
			Subjects:    []string{maxDeliveriesAdvisory + ".>"},
			Retention:   jetstream.WorkQueuePolicy,
			MaxAge:      t.DeadLetterMaxAge,
			Storage:     jetstream.FileStorage,
			Replicas:    t.Replicas,
		},
	}
}

// streamSubjects is the subjects of every family a stream stores.
func streamSubjects(stream string) []string {
	var subjects []string
	for _, e := range Events {
		if e.stream == stream {
			subjects = append(subjects, e.streamSubject())
		}
	}
	return subjects
}

// LeaseKeyTTL is how long a lease key lives on the server after its last
// renewal. The server removes expired messages up to about a quarter second
// late, so the key TTL is shorter than LeaseTTL by a fifth (at least 300ms):
// that way a standby holds the lease within LeaseTTL of the holder's last
// renewal, as promised.
func (t Topology) LeaseKeyTTL() time.Duration {
	allowance := t.LeaseTTL / 5
	if allowance < 300*time.Millisecond {
		allowance = 300 * time.Millisecond
	}
	return t.LeaseTTL - allowance
}

// LeaseBucketConfig returns the configuration of the lease bucket. Limit
// markers make an expired lease visible to watchers at once, so a standby
// takes over as soon as the holder's key expires instead of at its next poll.
func (t Topology) LeaseBucketConfig() jetstream.KeyValueConfig {
	return jetstream.KeyValueConfig{
		Bucket:         BucketLeases,
		Description:    "per-org singleton leases",
		History:        1,
		TTL:            t.LeaseKeyTTL(),
		LimitMarkerTTL: t.LeaseTTL,
		Storage:        jetstream.FileStorage,
		Replicas:       t.Replicas,
	}
}

// MDMReplayBucketConfig returns the configuration of the webhook's replay
// bucket: no bucket TTL (each key carries its own), limit markers on so
// that per-key TTLs are allowed.
func (t Topology) MDMReplayBucketConfig() jetstream.KeyValueConfig {
	return jetstream.KeyValueConfig{
		Bucket:         BucketMDMReplay,
		Description:    "MDM webhook event ids already accepted",
		History:        1,
		LimitMarkerTTL: time.Minute,
		Storage:        jetstream.FileStorage,
		Replicas:       t.Replicas,
	}
}

// DurableName is the durable consumer of a service's route for org
// (service-route[-org]), for a barrier that waits on another worker's
// consumer.
func DurableName(service, route string, org Org) string {
	name := service + "-" + route
	if org != "" {
		name += "-" + string(org)
	}
	return name
}

// ConsumerConfig returns the durable consumer of one route. The durable name
// is service-route[-org]; all instances of a service share it, which is how
// a stage scales out.
func (t Topology) ConsumerConfig(service, route, filter string, org Org) jetstream.ConsumerConfig {
	name := DurableName(service, route, org)
	md := map[string]string{"easguard.service": service, "easguard.route": route}
	if org != "" {
		md["easguard.org"] = string(org)
	}
	return jetstream.ConsumerConfig{
		Durable:       name,
		Description:   fmt.Sprintf("%s consumes %s", service, filter),
		FilterSubject: filter,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       t.Consumer.AckWait,
		MaxDeliver:    t.Consumer.MaxDeliver,
		MaxAckPending: t.Consumer.MaxAckPending,
		Metadata:      md,
	}
}

// Provision creates or updates every stream and bucket. It is idempotent and
// safe to call from every worker at start: the first caller creates, the
// others find the same configuration and change nothing. A stream or bucket
// is updated only when a setting easguard chooses differs: an update
// rewrites the store's configuration, and the server has been seen racing
// such a rewrite against a consumer another process creates at that moment.
//
// Each step is tried again until ctx ends: a cluster that has just formed
// (every node started at once, as a container set starts) or that is
// electing a leader answers "temporarily unavailable" or, when the meta
// leader changes under a request, not at all. Each attempt therefore has
// its own deadline (provisionAttempt), and only an error that no retry can
// mend (a setting the server refuses) ends it early.
func Provision(ctx context.Context, js jetstream.JetStream, t Topology) error {
	var names []string // every stream made, to wait for (waitVisible)
	for _, cfg := range t.StreamConfigs() {
		if err := retryProvision(ctx, func(ctx context.Context) error { return provisionStream(ctx, js, cfg) }); err != nil {
			return fmt.Errorf("provision stream %s: %w", cfg.Name, err)
		}
		names = append(names, cfg.Name)
	}
	buckets := []jetstream.KeyValueConfig{t.LeaseBucketConfig(), t.MDMReplayBucketConfig(), t.ConsoleSessionsBucketConfig()}
	for _, b := range StateBuckets {
		buckets = append(buckets, t.StateBucketConfig(b))
	}
	for _, cfg := range buckets {
		if err := retryProvision(ctx, func(ctx context.Context) error { return provisionBucket(ctx, js, cfg) }); err != nil {
			return fmt.Errorf("provision bucket %s: %w", cfg.Bucket, err)
		}
		names = append(names, BucketStreamConfig(cfg).Name)
	}
	return waitVisible(ctx, js, names)
}

// waitVisible waits until every stream named is found. A cluster that has
// just formed may elect a meta leader that has not yet applied a stream
// created a moment before, and answers "not found" for it meanwhile; the
// workers open their buckets right after provisioning and stop at "bucket
// not found" (a compose start-up's mailer did, "open easguard_notified",
// and Docker restarted it). It runs after the last stream is made, and
// asks again for those found while provisioning, since the meta leader
// may change during the later creations: one request a stream at each
// start. Each is asked for until it is found or ctx ends; a refusal other
// than "not found" ends it at once.
func waitVisible(ctx context.Context, js jetstream.JetStream, names []string) error {
	for _, name := range names {
		err := retryProvision(ctx, func(ctx context.Context) error {
			_, err := js.Stream(ctx, name)
			if errors.Is(err, jetstream.ErrStreamNotFound) {
				// Not the API error itself: retryProvision gives up on those.
				return fmt.Errorf("not found yet after it was provisioned (%s)", err.Error())
			}
			return err
		})
		if err != nil {
			return fmt.Errorf("provision: stream %s: %w", name, err)
		}
	}
	return nil
}

// provisionAttempt is how long one attempt of a provisioning step waits
// for the JetStream API before it is made again: far longer than a healthy
// cluster takes, and short enough that a request lost in a leader change
// costs little of the start-up time. Tests shorten it.
var provisionAttempt = 10 * time.Second

// retryProvision runs op with a deadline of provisionAttempt per attempt,
// with backoff, until it succeeds, fails for good, or ctx ends; then the
// error says what the last attempt met.
func retryProvision(ctx context.Context, op func(ctx context.Context) error) error {
	b := backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(0)), ctx)
	var (
		last     error
		attempts int
	)
	err := backoff.Retry(func() error {
		attempts++
		actx, cancel := context.WithTimeout(ctx, provisionAttempt)
		defer cancel()
		err := op(actx)
		switch {
		case err == nil:
			return nil
		case !provisionRetryable(err):
			return backoff.Permanent(err)
		case ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded):
			last = fmt.Errorf("no answer within %s", provisionAttempt)
		default:
			last = err
		}
		return err
	}, b)
	if err != nil && ctx.Err() != nil && last != nil {
		return fmt.Errorf("%w after %d attempts; the last attempt: %w", ctx.Err(), attempts, last)
	}
	return err
}

// errCodeNoPeers is the server's JSClusterNoPeersErrF: "no suitable peers
// for placement", which a forming cluster answers while the meta leader
// knows the other nodes but they have not reported in yet ("peer
// offline"). nats.go names no constant for it.
const errCodeNoPeers jetstream.ErrorCode = 10005

// provisionRetryable tells a JetStream that cannot answer yet (no meta
// leader, a lost request, a node not connected, peers not yet back for an
// R3 placement) from one that refuses the setting: the server's API errors
// are final unless they say 503 or no peers. A cluster that will never have
// the peers (R3 asked of one node) thus costs the start-up budget, and the
// error then names what the last attempt met.
func provisionRetryable(err error) bool {
	var api *jetstream.APIError
	if errors.As(err, &api) {
		return api.Code == http.StatusServiceUnavailable || api.ErrorCode == errCodeNoPeers
	}
	return true
}

// provisionStream creates a stream, or updates it when a setting cfg sets
// (a non-zero field) differs from what the server has.
func provisionStream(ctx context.Context, js jetstream.JetStream, cfg jetstream.StreamConfig) error {
	s, err := js.Stream(ctx, cfg.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		_, err = js.CreateOrUpdateStream(ctx, cfg)
		return err
	}
	if err != nil {
		return err
	}
	have := s.CachedInfo().Config
	if !setFieldsDiffer(&cfg, &have) {
		return nil
	}
	_, err = js.CreateOrUpdateStream(ctx, cfg)
	return err
}

// provisionBucket creates a bucket's stream, or updates it when a setting
// easguard chooses differs. It never goes through nats.go's KeyValue
// creation, which always allows direct gets (see BucketStreamConfig): a
// replicated bucket created that way, even for a moment, would hand out
// handles that read from followers.
func provisionBucket(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) error {
	want := BucketStreamConfig(cfg)
	s, err := js.Stream(ctx, want.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		_, err = js.CreateStream(ctx, want)
		if !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return err
		}
		// Another process created it meanwhile: check its settings.
		s, err = js.Stream(ctx, want.Name)
	}
	if err != nil {
		return err
	}
	have := s.CachedInfo().Config
	if have.AllowDirect == want.AllowDirect && !setFieldsDiffer(&want, &have) {
		return nil
	}
	_, err = js.UpdateStream(ctx, want)
	return err
}

// BucketStream names the stream behind a KV bucket, as nats.go does.
func BucketStream(bucket string) string { return "KV_" + bucket }

// KeySubject is the subject a KV bucket stores key under, as nats.go
// makes it; a key filter ("<org>.>") makes the filter of those keys. What
// reads or writes a bucket's stream rather than through the key-value
// API (batched reads, a write with a per-key TTL, a leader's last
// sequence) names its subjects here.
func KeySubject(bucket, key string) string { return "$KV." + bucket + "." + key }

// BucketStreamConfig returns the stream behind a KV bucket: what nats.go
// (v1.55) creates for cfg, except that direct gets are off when the bucket
// has replicas. A direct get may be answered by any replica, and a
// follower that has not applied the latest write yet answers with the
// previous value, so a KV read on a cluster would not see a write that was
// already acknowledged (nats.docs PR #815, nats-server issues 6557 and
// 7281). The workers join and compare-and-set on these buckets: the
// matcher must see the MDM record another replica has just indexed, or it
// blocks a compliant phone. With direct gets off, jetstream.KeyValue reads
// through the stream leader (STREAM.MSG.GET), which answers only with what
// it has committed. A bucket of one replica has no follower, so its direct
// gets (binary, without the JSON API's encoding) are as current and
// several times cheaper: a full sync of a large organisation makes
// hundreds of thousands of them. Only the fields easguard uses are carried
// (no mirrors, sources, placement).
func BucketStreamConfig(cfg jetstream.KeyValueConfig) jetstream.StreamConfig {
	history := int64(max(cfg.History, 1))
	replicas := max(cfg.Replicas, 1)
	duplicates := 2 * time.Minute
	if cfg.TTL > 0 && cfg.TTL < duplicates {
		duplicates = cfg.TTL
	}
	sc := jetstream.StreamConfig{
		Name:              BucketStream(cfg.Bucket),
		Description:       cfg.Description,
		Subjects:          []string{KeySubject(cfg.Bucket, ">")},
		MaxMsgsPerSubject: history,
		MaxBytes:          -1,
		MaxAge:            cfg.TTL,
		MaxMsgSize:        -1,
		Storage:           cfg.Storage,
		Replicas:          replicas,
		AllowRollup:       true,
		DenyDelete:        true,
		Duplicates:        duplicates,
		MaxMsgs:           -1,
		MaxConsumers:      -1,
		AllowDirect:       replicas == 1,
		Discard:           jetstream.DiscardNew,
		Metadata:          cfg.Metadata,
	}
	if cfg.LimitMarkerTTL != 0 {
		sc.AllowMsgTTL, sc.SubjectDeleteMarkerTTL = true, cfg.LimitMarkerTTL
	}
	return sc
}

// setFieldsDiffer reports whether a field want sets (non-zero) differs from
// have's: the server fills in defaults for the fields easguard leaves unset.
func setFieldsDiffer(want, have *jetstream.StreamConfig) bool {
	w, h := reflect.ValueOf(want).Elem(), reflect.ValueOf(have).Elem()
	for i := range w.NumField() {
		if f := w.Field(i); !f.IsZero() && !reflect.DeepEqual(f.Interface(), h.Field(i).Interface()) {
			return true
		}
	}
	return false
}

// isWorkQueue reports whether a stream removes a message once it is acked,
// which decides whether a dead-lettered message must also be deleted.
func isWorkQueue(t Topology, stream string) (known, wq bool) {
	for _, cfg := range t.StreamConfigs() {
		if cfg.Name == stream {
			return true, cfg.Retention == jetstream.WorkQueuePolicy
		}
	}
	return false, false
}
