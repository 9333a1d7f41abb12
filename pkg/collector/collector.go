// Package collector finds the ActiveSync partnerships of one Exchange
// organisation and reports each as an eas.observed event. Quick syncs
// read what is new or changed since the last one (every few minutes):
// partnerships first synced since, and those of mailboxes whose object
// changed since, which is where an administrator's allow or block lands.
// Full syncs read every partnership, notice the ones that disappeared,
// enforce the organisation's mail settings easguard owns, and report the
// organisation's DefaultAccessLevel, whose change the evaluator plans
// (daily). Manual syncs come as
// sync.requested commands. One collector per org is active at a time: it
// holds the org's collector lease, and replicas stand by.
package collector

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/metric/noop"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Config configures the collector.
type Config struct {
	QuickInterval       time.Duration `split_words:"true" default:"5m" desc:"How often the collector reads partnerships that are new, or whose mailbox changed, since its last sync."`
	FullInterval        time.Duration `split_words:"true" default:"24h" desc:"How often the collector reads every partnership and enforces the organisation settings."`
	QuickOverlap        time.Duration `split_words:"true" default:"2m" desc:"A quick sync reads back this far before the previous one started (new partnerships and changed mailboxes), to cover clock differences."`
	EnforceSettings     bool          `split_words:"true" default:"true" desc:"On full sync, read the organisation's ActiveSync settings, make the two below what they say, and report DefaultAccessLevel, which the evaluator plans as the policy's default_access_level says and the executor changes. false: easguard leaves the organisation settings alone, DefaultAccessLevel included."`
	AdminMailRecipients []string      `split_words:"true" desc:"Comma-separated AdminMailRecipients easguard enforces (Exchange's quarantine notices to administrators). Empty: left as Exchange has it."`
	UserMailInsert      string        `split_words:"true" desc:"UserMailInsert easguard enforces (the footer of Exchange's own quarantine mail), at most 256 characters. Empty: left as Exchange has it."`
	MDMWait             time.Duration `split_words:"true" default:"2m" desc:"Before the organisation's first full sync, wait up to this long for an MDM inventory (Graph or the file) to be read completely and indexed by the matcher, so that no enrolled phone is judged unknown (blocked, and its user told to enrol) because its partnership was read before its MDM record. 0: do not wait (an MDM that only calls the webhook)."`
}

// Validate checks the settings.
func (c *Config) Validate() error {
	if c.QuickInterval < time.Second {
		return config.Invalid(&c.QuickInterval, "must be at least 1s, got %s", c.QuickInterval)
	}
	if c.FullInterval < c.QuickInterval {
		return config.Invalid(&c.FullInterval, "must not be shorter than the quick interval")
	}
	if c.MDMWait < 0 {
		return config.Invalid(&c.MDMWait, "must not be negative, got %s", c.MDMWait)
	}
	if len([]rune(c.UserMailInsert)) > 256 {
		return config.Invalid(&c.UserMailInsert, "Exchange allows at most 256 characters")
	}
	return nil
}

// Exchange is what the collector needs of Exchange (exchange.Client does it).
type Exchange interface {
	ListPartnerships(ctx context.Context, opt exchange.ListOptions, fn func([]exchange.Partnership) error) error
	ListRecipients(ctx context.Context, fn func([]exchange.Recipient) error) error
	GetRecipient(ctx context.Context, identity string) (exchange.Recipient, error)
	EnforceOrgSettings(ctx context.Context, want exchange.OrgSettings, apply bool) (exchange.OrgSettings, []string, error)
}

// Collector is the collector worker of one organisation.
type Collector struct {
	org    bus.Org
	cfg    Config
	ex     Exchange
	server func() string
	log    *slog.Logger
	now    func() time.Time

	known, status, mdmSources jetstream.KeyValue
	// knownBulk reads what the collector knows of a listing page at once.
	knownBulk *bus.BulkReader
	js        jetstream.JetStream
	pub       *bus.Publisher
	mdmWaited bool

	mu         sync.Mutex // one sync at a time
	recipients map[string]exchange.Recipient

	// memo is what this collector last read or wrote of each partnership
	// in its bucket (its fingerprint and when it was last stamped seen),
	// so that a full sync of an organisation where nothing changed does
	// not read back, page after page, what it itself wrote: 100,000
	// partnerships were 100,000 batched reads a pass, each a message the
	// server builds with headers and the client parses. It is sound only
	// because the collector is the bucket's one writer: a leased
	// singleton. Another replica writes while it holds the lease, so the
	// memo is forgotten at the start of every lease term (Forget), and a
	// key is dropped from it whenever its write may have failed.
	memoMu sync.Mutex
	memo   map[string]memo

	// metrics are the domain metrics (Instrument), nowhere by default.
	metrics *instruments
}

// memo is what the collector knows a partnership's record holds.
type memo struct {
	fingerprint string
	lastSeen    time.Time
}

// Forget drops what the collector remembers of its bucket: the next pass
// reads every partnership's record again. The caller calls it whenever
// this replica takes the collector's lease, since another replica may
// have written the bucket while it held it. It waits for a pass still
// running (of a lease term that ended), which would otherwise remember
// its own writes into the new term.
func (c *Collector) Forget() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.memoMu.Lock()
	defer c.memoMu.Unlock()
	c.memo = map[string]memo{}
}

// recall reports whether the collector knows key's record to hold the
// partnership with fingerprint fp, stamped seen recently enough:
// reporting it needs no read.
func (c *Collector) recall(key, fp string) bool {
	c.memoMu.Lock()
	defer c.memoMu.Unlock()
	m, ok := c.memo[key]
	return ok && m.fingerprint == fp && c.seenLately(m.lastSeen)
}

// seenLately reports whether a record stamped seen at lastSeen needs no
// new stamp yet (lastSeenResolution): with the same fingerprint, it holds
// all there is to remember.
func (c *Collector) seenLately(lastSeen time.Time) bool {
	return !lastSeen.IsZero() && c.now().Sub(lastSeen) < lastSeenResolution
}

// note records in the memo what key's record holds; rec nil forgets it.
func (c *Collector) note(key string, rec *ev.CollectorRecord) {
	c.memoMu.Lock()
	defer c.memoMu.Unlock()
	if rec == nil || !rec.GetLastSeen().IsValid() {
		delete(c.memo, key)
		return
	}
	c.memo[key] = memo{fingerprint: rec.GetFingerprint(), lastSeen: rec.GetLastSeen().AsTime()}
}

// New opens the collector's state.
func New(ctx context.Context, js jetstream.JetStream, org bus.Org, cfg Config, ex Exchange, pub *bus.Publisher, server func() string, log *slog.Logger) (*Collector, error) {
	if log == nil {
		log = slog.Default()
	}
	if server == nil {
		server = func() string { return "" }
	}
	c := &Collector{org: org, cfg: cfg, ex: ex, pub: pub, server: server, log: log.With("worker", "collector"), now: time.Now,
		recipients: map[string]exchange.Recipient{}, memo: map[string]memo{}}
	var err error
	if c.metrics, err = newInstruments(noop.NewMeterProvider(), string(org)); err != nil {
		return nil, err
	}
	if c.known, err = js.KeyValue(ctx, bus.BucketCollector); err != nil {
		return nil, fmt.Errorf("collector: open %s: %w", bus.BucketCollector, err)
	}
	if c.knownBulk, err = bus.NewBulkReader(ctx, js, c.known); err != nil {
		return nil, fmt.Errorf("collector: %w", err)
	}
	if c.status, err = js.KeyValue(ctx, bus.BucketStatus); err != nil {
		return nil, fmt.Errorf("collector: open %s: %w", bus.BucketStatus, err)
	}
	if c.mdmSources, err = js.KeyValue(ctx, bus.BucketMDMSources); err != nil {
		return nil, fmt.Errorf("collector: open %s: %w", bus.BucketMDMSources, err)
	}
	c.js = js
	return c, nil
}

// Route returns the handler of manual sync commands; the caller binds it
// only while this replica holds the lease.
func (c *Collector) Route() bus.Route {
	// One sync at a time: a second request waits for the first.
	return bus.Handle("sync-requested", bus.SyncRequested, func(ctx context.Context, in *ev.SyncRequested) ([]bus.Outbound, error) {
		done, err := c.Sync(ctx, in.GetKind(), in.GetSyncId(), in.GetRequestedBy())
		if err != nil && done == nil {
			return nil, err
		}
		return nil, nil
	}).Serial()
}

// Schedule runs syncs on their intervals until ctx ends: a full sync when
// the last successful one is older than FullInterval (so a new leader does
// not wait a day), quick syncs in between. After any sync, failed or not,
// the next waits a quick interval, so a broken Exchange is not hammered.
func (c *Collector) Schedule(ctx context.Context) error {
	// What the evaluator's watchdog judges an overdue sync by: a collector
	// that stopped cannot raise that alert itself.
	putStatus(ctx, c, status.ScheduleKey, status.Schedule{QuickInterval: c.cfg.QuickInterval, FullInterval: c.cfg.FullInterval, StartedAt: c.now().UTC()})
	for {
		next := c.cfg.QuickInterval
		lastFull, okFull := c.lastSuccess(ctx, "full")
		lastQuick, okQuick := c.lastSuccess(ctx, "quick")
		switch {
		case !okFull || c.now().Sub(lastFull.StartedAt) >= c.cfg.FullInterval:
			if !okFull && !c.mdmWaited {
				c.mdmWaited = true
				c.waitForMDM(ctx)
			}
			if _, err := c.Sync(ctx, ev.SyncKind_SYNC_KIND_FULL, "", "schedule"); err != nil && ctx.Err() == nil {
				c.log.Error("full sync failed", "error", err)
			}
		case !okQuick || c.now().Sub(lastQuick.StartedAt) >= c.cfg.QuickInterval:
			if _, err := c.Sync(ctx, ev.SyncKind_SYNC_KIND_QUICK, "", "schedule"); err != nil && ctx.Err() == nil {
				c.log.Error("quick sync failed", "error", err)
			}
		default:
			next = c.cfg.QuickInterval - c.now().Sub(lastQuick.StartedAt)
		}
		t := time.NewTimer(next)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// waitForMDM holds the organisation's first full sync until an MDM
// inventory source has delivered a complete read (what it delivered is in
// bus.BucketMDMSources) and the matcher has indexed every MDM change
// published so far (its consumer is drained), or until MDMWait has passed.
// Started together, easguard's collector lists the partnerships while its
// MDM source is still reading the inventory: a partnership matched before
// its MDM record would be judged an unknown device, blocked, and its
// enrolled user sent a mail telling them to enrol, all undone a moment
// later. The wait comes before the first full sync only: later, the
// indexes hold the MDM's records.
func (c *Collector) waitForMDM(ctx context.Context) {
	if c.cfg.MDMWait <= 0 {
		return
	}
	st := status.MDMWait{Waiting: true, Since: c.now()}
	putStatus(ctx, c, status.MDMWaitKey, st)
	deadline := st.Since.Add(c.cfg.MDMWait)
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		var err error
		if !st.InventoryRead {
			st.InventoryRead, err = c.inventoryDelivered(ctx)
		}
		if st.InventoryRead && err == nil {
			st.Indexed, err = c.mdmIndexed(ctx)
		}
		st.Checks++
		done := st.InventoryRead && st.Indexed
		if done || c.now().After(deadline) || ctx.Err() != nil {
			st.Waiting, st.Until = false, c.now()
			putStatus(ctx, c, status.MDMWaitKey, st)
			if done {
				c.log.Info("first full sync: the MDM inventory is read and indexed", "waited", st.Until.Sub(st.Since).Round(time.Millisecond))
			} else if ctx.Err() == nil {
				c.log.Warn("first full sync starts without a complete MDM inventory: devices whose MDM record is not indexed yet are judged unknown until it is",
					"waited", c.cfg.MDMWait, "inventory_read", st.InventoryRead, "indexed", st.Indexed, "error", err)
			}
			return
		}
		putStatus(ctx, c, status.MDMWaitKey, st)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
}

// inventoryDelivered reports whether an inventory source of this org has
// stored what it delivered: it does so after each complete read.
func (c *Collector) inventoryDelivered(ctx context.Context) (bool, error) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := c.mdmSources.WatchFiltered(wctx, []string{string(c.org) + ".>"}, jetstream.MetaOnly(), jetstream.IgnoreDeletes())
	if err != nil {
		return false, fmt.Errorf("watch %s: %w", bus.BucketMDMSources, err)
	}
	defer func() { _ = w.Stop() }()
	select {
	case e := <-w.Updates():
		// The first key, or nil: the bucket holds none for this org.
		return e != nil, nil
	case <-wctx.Done():
		return false, wctx.Err()
	}
}

// mdmIndexed reports whether the matcher has handled every MDM change of
// this org published so far.
func (c *Collector) mdmIndexed(ctx context.Context) (bool, error) {
	drained, _, err := bus.ConsumerDrained(ctx, c.js, bus.StreamMDM, bus.DurableName("matcher", "mdm-changed", c.org))
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		return false, nil // the matcher has not bound yet
	}
	return drained, err
}

// policyWait is how long a full sync waits for the evaluator to say
// whether the policy is a dry run.
const policyWait = 20 * time.Second

// policyDryRun reports whether the org's policy is a dry run, as the
// evaluator recorded it; known is false when none has yet.
func (c *Collector) policyDryRun(ctx context.Context) (dry, known bool) {
	deadline := c.now().Add(policyWait)
	for {
		if p, ok, err := status.Get[status.Policy](ctx, c.status, c.org, status.PolicyKey); err == nil && ok {
			return p.DryRun, true
		}
		if c.now().After(deadline) {
			return false, false
		}
		select {
		case <-ctx.Done():
			return false, false
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// lastSuccess reads the last successful sync of a kind. A record that
// cannot be read counts as none: the schedule then runs that kind now,
// which is what a missing record asks for anyway.
func (c *Collector) lastSuccess(ctx context.Context, kind string) (status.Sync, bool) {
	st, ok, err := status.Get[status.Sync](ctx, c.status, c.org, status.SyncOKKey(kind))
	if err != nil {
		c.log.Warn("last successful sync not read", "kind", kind, "error", err)
		return status.Sync{}, false
	}
	return st, ok
}

// fingerprint covers what the rest of easguard reacts to, so an unchanged
// partnership is reported as unchanged.
func fingerprint(p *ev.EASPartnership) string {
	mb := p.GetMailbox()
	sum := sha256.Sum256([]byte(strings.Join([]string{p.GetDeviceId(), p.GetDeviceType(), p.GetDeviceModel(), p.GetDeviceOs(), p.GetDeviceUserAgent(),
		p.GetFriendlyName(), p.GetDeviceAccessState().String(), p.GetDeviceAccessStateReason().String(), p.GetDeviceAccessControlRule(),
		mb.GetIdentity(), mb.GetGuid(), mb.GetPrimarySmtpAddress(), mb.GetUserPrincipalName()}, "\x00")))
	return hex.EncodeToString(sum[:16])
}

var stateNames = map[string]ev.DeviceAccessState{
	"Unknown": ev.DeviceAccessState_DEVICE_ACCESS_STATE_UNKNOWN, "Allowed": ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED,
	"Blocked": ev.DeviceAccessState_DEVICE_ACCESS_STATE_BLOCKED, "Quarantined": ev.DeviceAccessState_DEVICE_ACCESS_STATE_QUARANTINED,
	"DeviceDiscovery": ev.DeviceAccessState_DEVICE_ACCESS_STATE_DEVICE_DISCOVERY,
}

var reasonNames = map[string]ev.DeviceAccessStateReason{
	"Unknown": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_UNKNOWN, "Global": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_GLOBAL,
	"Individual": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_INDIVIDUAL, "DeviceRule": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_DEVICE_RULE,
	"Upgrade": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_UPGRADE, "Policy": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_POLICY,
	"UserAgentsChanges": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_USER_AGENTS_CHANGES, "RecentCommands": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_RECENT_COMMANDS,
	"Watsons": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_WATSONS, "OutOfBudgets": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_OUT_OF_BUDGETS,
	"SyncCommands": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_SYNC_COMMANDS, "EnableNotificationEmail": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_ENABLE_NOTIFICATION_EMAIL,
	"CommandFrequency": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_COMMAND_FREQUENCY, "ExternallyManaged": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_EXTERNALLY_MANAGED,
	"ExternalCompliance": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_EXTERNAL_COMPLIANCE, "ExternalEnrollment": ev.DeviceAccessStateReason_DEVICE_ACCESS_STATE_REASON_EXTERNAL_ENROLLMENT,
}

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func toEvent(p exchange.Partnership, r exchange.Recipient) *ev.EASPartnership {
	identity := r.Identity
	if identity == "" {
		identity = p.Mailbox
	}
	return &ev.EASPartnership{
		Mailbox:  &ev.Mailbox{Identity: identity, Guid: r.GUID, PrimarySmtpAddress: r.PrimarySmtpAddress, UserPrincipalName: r.UserPrincipalName, DisplayName: r.DisplayName},
		DeviceId: p.DeviceID, DeviceType: p.DeviceType, DeviceModel: p.DeviceModel, DeviceOs: p.DeviceOS, DeviceUserAgent: p.UserAgent,
		DeviceImei: p.IMEI, FriendlyName: p.FriendlyName, ClientType: p.ClientType, DeviceAccessState: stateNames[p.AccessState],
		DeviceAccessStateReason: reasonNames[p.AccessReason], DeviceAccessControlRule: p.AccessRule, FirstSyncTime: ts(p.FirstSyncTime),
		DeviceActiveSyncVersion: p.ActiveSyncVersion, Identity: p.Identity, Guid: strings.ToLower(p.GUID), WhenChanged: ts(p.WhenChanged),
	}
}

// Sync runs one sync pass and reports it (sync.completed, and the status
// bucket). An empty id gets one made from the kind and the start time.
func (c *Collector) Sync(ctx context.Context, kind ev.SyncKind, id, requestedBy string) (*ev.SyncCompleted, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	start := c.now()
	if kind == ev.SyncKind_SYNC_KIND_UNSPECIFIED {
		kind = ev.SyncKind_SYNC_KIND_QUICK
	}
	if id == "" {
		id = fmt.Sprintf("%s-%d", kind.Short(), start.UnixNano())
	}
	st := status.Sync{SyncID: id, Kind: kind.Short(), RequestedBy: requestedBy, StartedAt: start, Counts: map[string]int64{}}
	counts := &ev.SyncCounts{}
	var states *stateCounts // a full sync's partnerships by access state
	if kind == ev.SyncKind_SYNC_KIND_FULL {
		states = &stateCounts{}
	}
	var settings []string
	err := func() error {
		if kind == ev.SyncKind_SYNC_KIND_FULL && c.cfg.EnforceSettings {
			dry, known := c.policyDryRun(ctx)
			// No DefaultAccessLevel: its change is a mass revocation, which
			// the evaluator plans from the level read here.
			want := exchange.OrgSettings{AdminMailRecipients: c.cfg.AdminMailRecipients, UserMailInsert: c.cfg.UserMailInsert}
			have, changed, err := c.ex.EnforceOrgSettings(ctx, want, known && !dry)
			if err != nil {
				return fmt.Errorf("enforce organisation settings: %w", err)
			}
			st.DefaultAccessLevel = have.DefaultAccessLevel
			switch {
			case !known:
				st.SettingsNote = "organisation settings not enforced: no evaluator has published the policy yet, so a dry run cannot be ruled out"
				if len(changed) > 0 {
					st.SettingsNote += "; would change " + strings.Join(changed, ", ")
				}
				c.log.Warn(st.SettingsNote)
			case dry:
				if len(changed) > 0 {
					st.SettingsNote = "dry run: would change " + strings.Join(changed, ", ")
				}
			default:
				settings = changed
			}
		}
		seen := map[string]bool{}
		opt := exchange.ListOptions{}
		if kind == ev.SyncKind_SYNC_KIND_FULL {
			c.recipients = map[string]exchange.Recipient{}
			if err := c.ex.ListRecipients(ctx, func(rs []exchange.Recipient) error {
				for _, r := range rs {
					c.recipients[strings.ToLower(r.Identity)] = r
				}
				counts.Mailboxes += int64(len(rs))
				return nil
			}); err != nil {
				return fmt.Errorf("list mailboxes: %w", err)
			}
		} else {
			since := time.Time{}
			if last, ok := c.lastSuccess(ctx, "quick"); ok {
				since = last.StartedAt
			}
			if last, ok := c.lastSuccess(ctx, "full"); ok && last.StartedAt.After(since) {
				since = last.StartedAt
			}
			if since.IsZero() {
				since = start.Add(-c.cfg.FullInterval)
			}
			// New partnerships, and those of mailboxes changed since (an
			// administrator's allow or block): ListOptions says how.
			opt.NewSince = since.Add(-c.cfg.QuickOverlap)
			opt.ChangedSince = opt.NewSince
		}
		// Partnerships are reported several at once: each report is a
		// compare-and-set of what the collector knows and a publish, two
		// round trips to the bus that would otherwise pace the whole pass.
		rep := &reporter{counts: counts}
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(reportConcurrency)
		// Each page's read of what the collector knows runs beside the
		// listing, pageDepth pages at a time: made in the listing's
		// callback, its round trip held up the reading of Exchange's
		// output (every part's: the callback runs one part at a time), and
		// a full sync of 100,000 partnerships took 21.6 s where the bare
		// listing takes 12.2 s. A failed read stops the listing (pctx).
		pg, pctx := errgroup.WithContext(gctx)
		pg.SetLimit(pageDepth)
		conf := &confirmations{send: func(ctx context.Context, page []*ev.EASPartnership, n uint32) error {
			return c.confirm(ctx, id, kind, start, page, n)
		}}
		// reportPage reads what the collector knows of one page of the
		// listing in one batched read (at 100,000 partnerships, a read each
		// paced the pass) and hands each partnership's report to g. A
		// failed read fails the pass, as a failed report does (see report).
		reportPage := func(obs []observation) error {
			// Only what the collector does not know already is read.
			unknown := make([]string, 0, len(obs))
			for i := range obs {
				if obs[i].known = c.recall(obs[i].key, obs[i].fp); !obs[i].known {
					unknown = append(unknown, obs[i].key)
				}
			}
			known := bus.Reads{}
			if len(unknown) > 0 {
				var err error
				if known, err = c.knownBulk.Read(pctx, unknown); err != nil {
					rep.add(func(n *ev.SyncCounts) { n.Failed += int64(len(obs)) })
					return bus.MarkPublishFailure(fmt.Errorf("remember: %w", err))
				}
			}
			for _, o := range obs {
				read := known.Take(o.key)
				g.Go(func() error {
					err := c.report(gctx, kind, id, start, o, read, rep, conf)
					if err != nil && (errors.Is(err, context.Canceled) || bus.IsPublishFailure(err)) {
						rep.add(func(n *ev.SyncCounts) { n.Failed++ })
						return err
					}
					if err != nil {
						rep.failed(c.log, o.src, err)
					}
					return nil
				})
				if err := pctx.Err(); err != nil {
					return err // the pass failed: the rest of the page is not reported
				}
			}
			return nil
		}
		lerr := c.ex.ListPartnerships(pctx, opt, func(ps []exchange.Partnership) error {
			obs := make([]observation, 0, len(ps))
			for _, p := range ps {
				o, err := c.prepare(pctx, p, seen)
				if err != nil {
					rep.failed(c.log, p, err)
					continue
				}
				obs = append(obs, o)
				if states != nil {
					states.add(p.AccessState)
				}
			}
			pg.Go(func() error { return reportPage(obs) })
			return pctx.Err()
		})
		// Pages first: they are what hands reports to g.
		perr := pg.Wait()
		if err := g.Wait(); err != nil {
			return fmt.Errorf("list partnerships: %w", err)
		}
		if perr != nil {
			return fmt.Errorf("list partnerships: %w", perr)
		}
		if err := conf.flush(ctx); err != nil {
			return fmt.Errorf("list partnerships: %w", err)
		}
		if lerr != nil {
			return fmt.Errorf("list partnerships: %w", lerr)
		}
		if kind == ev.SyncKind_SYNC_KIND_FULL {
			if err := c.reportGone(ctx, id, start, seen, counts); err != nil {
				return err
			}
		}
		return nil
	}()
	st.FinishedAt = c.now()
	st.Success = err == nil
	st.Settings, st.Server = settings, c.server()
	if err != nil {
		st.Errors = []string{err.Error()}
	}
	st.Counts = map[string]int64{"observed": counts.Observed, "new": counts.New, "changed": counts.Changed, "unchanged": counts.Unchanged,
		"gone": counts.Gone, "failed": counts.Failed, "mailboxes": counts.Mailboxes}
	done := &ev.SyncCompleted{Org: string(c.org), SyncId: id, Kind: kind, RequestedBy: requestedBy, Counts: counts, Errors: st.Errors,
		StartedAt: timestamppb.New(start), FinishedAt: timestamppb.New(st.FinishedAt), Success: st.Success, CasServer: st.Server, SettingsEnforced: settings,
		DefaultAccessLevel: st.DefaultAccessLevel}
	// The status and the metrics first: whoever acts on the report (the
	// evaluator's barrier, the console, a test) finds them current.
	putStatus(ctx, c, status.SyncLastKey(st.Kind), st)
	if st.Success {
		putStatus(ctx, c, status.SyncOKKey(st.Kind), st)
	}
	c.metrics.synced(ctx, st.Kind, st.Success, st.FinishedAt.Sub(start), st.FinishedAt, states)
	subject, serr := bus.SyncCompleted.Subject(c.org, "")
	if serr == nil {
		if _, perr := c.pub.Publish(ctx, bus.Outbound{Subject: subject, Message: done, MsgID: "sync-completed:" + id}); perr != nil {
			return nil, fmt.Errorf("report sync %s: %w", id, perr)
		}
	}
	if err != nil {
		c.alertSyncFailed(ctx, st.Kind, id, err)
	} else {
		bus.AlertResolved(ctx, c.status, c.org, "sync."+st.Kind)
	}
	c.log.Info("sync finished", "sync_id", id, "kind", st.Kind, "success", st.Success, "observed", counts.Observed, "new", counts.New,
		"changed", counts.Changed, "gone", counts.Gone, "duration", st.FinishedAt.Sub(start))
	return done, err
}

// syncAlertEvery is how often syncs that go on failing are alerted again.
const syncAlertEvery = time.Hour

// alertSyncFailed raises an alert for a failed sync, as what the error
// says when it is Exchange's (unreachable, the account's credentials or
// role refused) or else as a failed sync: when syncs of the kind start
// failing, and again each hour they go on failing, not at every attempt.
func (c *Collector) alertSyncFailed(ctx context.Context, kind, id string, err error) {
	ak, sev, what := ev.AlertKind_ALERT_KIND_SYNC_FAILED, ev.AlertSeverity_ALERT_SEVERITY_WARNING, "the "+kind+" sync failed"
	switch {
	case errors.Is(err, exchange.ErrAuth), errors.Is(err, exchange.ErrTLS):
		ak, sev, what = ev.AlertKind_ALERT_KIND_EXCHANGE_AUTH, ev.AlertSeverity_ALERT_SEVERITY_CRITICAL, "Exchange refused easguard's credentials"
	case errors.Is(err, exchange.ErrPermission):
		ak, sev, what = ev.AlertKind_ALERT_KIND_EXCHANGE_PERMISSION, ev.AlertSeverity_ALERT_SEVERITY_CRITICAL, "easguard's account lacks a permission on Exchange"
	case errors.Is(err, exchange.ErrUnreachable):
		ak, what = ev.AlertKind_ALERT_KIND_EXCHANGE_UNREACHABLE, "Exchange is unreachable"
	}
	if rerr := bus.RaiseDue(ctx, c.pub, c.status, c.org, "sync."+kind, syncAlertEvery, c.now(), bus.Alert{Kind: ak, Severity: sev, ID: "sync-failed:" + id,
		Summary: fmt.Sprintf("%s (%s sync %s): %v", what, kind, id, err), Detail: map[string]string{"sync_id": id, "kind": kind, "error": err.Error(), "cas_server": c.server()}}); rerr != nil {
		c.log.Warn("sync failure not alerted", "sync_id", id, "error", rerr)
	}
}

// putStatus records v under key in the status bucket. A record that
// fails is logged, not returned: the status is what an administrator
// reads, and the sync it describes went on regardless.
func putStatus[T any](ctx context.Context, c *Collector, key string, v T) {
	if err := status.Put(ctx, c.status, c.org, key, v); err != nil {
		c.log.Warn("status not recorded", "key", key, "error", err)
	}
}

// recipient finds the mailbox of a partnership, asking Exchange for the
// ones not seen yet (quick sync).
func (c *Collector) recipient(ctx context.Context, mailbox string) (exchange.Recipient, error) {
	if r, ok := c.recipients[strings.ToLower(mailbox)]; ok {
		return r, nil
	}
	r, err := c.ex.GetRecipient(ctx, mailbox)
	if err != nil {
		return exchange.Recipient{}, err
	}
	c.recipients[strings.ToLower(mailbox)] = r
	return r, nil
}

// lastSeenResolution is how stale the last-seen time of an unchanged
// partnership may get: a pass rewrites only what changed, or what was last
// stamped longer ago, so that a full sync of an organisation where nothing
// changed costs one read per partnership, not a read and a write.
const lastSeenResolution = 12 * time.Hour

// reportConcurrency is how many partnerships a pass reports at once.
const reportConcurrency = 16

// pageDepth is how many pages of a listing have their known records read,
// and their reports handed out, while the listing goes on: enough to keep
// every part of a partitioned listing reading, few enough that a pass
// holds only a few pages beyond those being reported.
const pageDepth = 4

// reporter gathers a pass's counts from the reports running at once.
type reporter struct {
	mu     sync.Mutex
	counts *ev.SyncCounts
}

func (r *reporter) add(fn func(*ev.SyncCounts)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fn(r.counts)
}

// failed counts a partnership that could not be reported, which the next
// pass reads again.
func (r *reporter) failed(log *slog.Logger, p exchange.Partnership, err error) {
	r.add(func(n *ev.SyncCounts) { n.Failed++ })
	log.Warn("partnership not reported", "identity", p.Identity, "error", err)
}

// observation is a partnership ready to be reported: the event, and its
// key in what the collector knows.
type observation struct {
	ep  *ev.EASPartnership
	key string
	src exchange.Partnership
	// fp is ep's fingerprint; known, that the collector's memo says its
	// record holds it already (recall), so it is reported unchanged
	// without a read.
	fp    string
	known bool
}

// prepare marks a partnership seen by this pass (even if reporting it
// fails below: it is on Exchange, and must not be reported gone) and
// joins it with its mailbox. It runs in the listing's order, one at a
// time: seen and the recipients are not shared with the reports.
func (c *Collector) prepare(ctx context.Context, p exchange.Partnership, seen map[string]bool) (observation, error) {
	pid := strings.ToLower(p.GUID)
	if pid == "" {
		pid = p.Identity
	}
	key, err := bus.StateKey(c.org, pid)
	if err != nil {
		return observation{}, err
	}
	seen[key] = true
	r, err := c.recipient(ctx, p.Mailbox)
	if err != nil {
		return observation{}, fmt.Errorf("mailbox of %s: %w", p.Identity, err)
	}
	ep := toEvent(p, r)
	return observation{ep: ep, key: key, src: p, fp: fingerprint(ep)}, nil
}

// report remembers one partnership and reports it: an unchanged one in a
// page of confirmations, any other alone. read is what the collector
// knew of it as read with its page (nil: read it here).
func (c *Collector) report(ctx context.Context, kind ev.SyncKind, syncID string, at time.Time, o observation, read *bus.Read, rep *reporter, conf *confirmations) error {
	ep, key, fp := o.ep, o.key, o.fp
	change := ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED
	if !o.known {
		var err error
		if change, err = c.record(ctx, key, ep, fp, syncID, read); err != nil {
			return err
		}
	}
	rep.add(func(n *ev.SyncCounts) {
		n.Observed++
		switch change {
		case ev.ObservationChange_OBSERVATION_CHANGE_NEW:
			n.New++
		case ev.ObservationChange_OBSERVATION_CHANGE_CHANGED:
			n.Changed++
		default:
			n.Unchanged++
		}
	})
	if change == ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED && ep.Validate() == nil {
		// One that would not validate goes alone, to be dead-lettered
		// by itself rather than with its page.
		return conf.add(ctx, ep)
	}
	return c.publish(ctx, syncID, kind, at, ep, change)
}

// record stores a partnership in what the collector knows, unless it is
// there as it is, and says how it changed since last reported. read is
// the record as read with its page (nil: read it here).
func (c *Collector) record(ctx context.Context, key string, ep *ev.EASPartnership, fp, syncID string, read *bus.Read) (ev.ObservationChange, error) {
	change := ev.ObservationChange_OBSERVATION_CHANGE_NEW
	rec, err := bus.ModifyRead(ctx, c.known, key, read, func(rec *ev.CollectorRecord, exists bool) (bus.Change, error) {
		switch {
		case !exists:
			change = ev.ObservationChange_OBSERVATION_CHANGE_NEW
		case rec.GetFingerprint() == fp:
			change = ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED
			if rec.GetLastSeen().IsValid() && c.seenLately(rec.GetLastSeen().AsTime()) {
				return bus.Keep, nil // nothing to remember that is not there
			}
		default:
			change = ev.ObservationChange_OBSERVATION_CHANGE_CHANGED
		}
		rec.Fingerprint, rec.DeviceId, rec.LastSeen, rec.LastSyncId, rec.Partnership = fp, ep.GetDeviceId(), timestamppb.New(c.now()), syncID, ep
		return bus.Write, nil
	})
	if err != nil {
		// A write whose answer was lost may have been stored: the memo
		// must not vouch for either outcome.
		c.note(key, nil)
		// The bus, not this partnership, failed (a NATS leader election,
		// say): like a failed publish it fails the pass, so that the
		// next quick sync reads back from the last successful one. Skipped
		// as a bad partnership, it would not be read again until the next
		// full sync: a phone lost for hours.
		return change, bus.MarkPublishFailure(fmt.Errorf("remember %s: %w", key, err))
	}
	c.note(key, rec)
	return change, nil
}

// confirmPage is how many unchanged partnerships one confirmation carries:
// a page's store, delivery and acknowledgement stand for this many
// partnerships', and the verdicts on it stay well below the server's
// message size limit (1 MB) with their MDM records.
const confirmPage = 128

// confirmations gathers a pass's unchanged partnerships into pages of
// confirmPage, sending each page as it fills.
type confirmations struct {
	mu   sync.Mutex
	page []*ev.EASPartnership
	n    uint32
	send func(ctx context.Context, page []*ev.EASPartnership, n uint32) error
}

// add puts one partnership on the page, and sends the page if it is full.
func (f *confirmations) add(ctx context.Context, ep *ev.EASPartnership) error {
	if page, n := f.cut(ep, confirmPage); page != nil {
		return f.send(ctx, page, n)
	}
	return nil
}

// flush sends the last page, once every report is done.
func (f *confirmations) flush(ctx context.Context) error {
	if page, n := f.cut(nil, 1); page != nil {
		return f.send(ctx, page, n)
	}
	return nil
}

// cut puts ep (if any) on the page and takes the page off, numbered, once
// it holds at least least partnerships; the sending is the caller's, out
// of the lock.
func (f *confirmations) cut(ep *ev.EASPartnership, least int) ([]*ev.EASPartnership, uint32) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if ep != nil {
		f.page = append(f.page, ep)
	}
	if len(f.page) < least {
		return nil, 0
	}
	page := f.page
	f.page = nil
	f.n++
	return page, f.n
}

// confirm publishes one page of unchanged partnerships.
func (c *Collector) confirm(ctx context.Context, syncID string, kind ev.SyncKind, at time.Time, page []*ev.EASPartnership, n uint32) error {
	ref := &ev.SyncRef{SyncId: syncID, Kind: kind}
	subject, err := bus.EASConfirmed.Subject(c.org, ev.PageKey(ref, n))
	if err != nil {
		return err
	}
	_, err = c.pub.Publish(ctx, bus.Outbound{Subject: subject, MsgID: "eas-confirmed:" + ev.PageKey(ref, n), Message: &ev.EASPartnershipsConfirmed{
		Org: string(c.org), Sync: ref, ObservedAt: timestamppb.New(at), Partnerships: page, Page: n,
	}})
	if err != nil {
		return bus.MarkPublishFailure(err)
	}
	return nil
}

// publish reports one partnership. at is when the sync began: what it
// read from Exchange is at least that fresh, and never claimed fresher
// (the evaluator tells drift from a decision in flight by it).
func (c *Collector) publish(ctx context.Context, syncID string, kind ev.SyncKind, at time.Time, p *ev.EASPartnership, change ev.ObservationChange) error {
	subject, err := bus.EASObserved.Subject(c.org, p.GetDeviceId())
	if err != nil {
		return err
	}
	pid := p.GetGuid()
	if pid == "" {
		pid = p.GetIdentity()
	}
	_, err = c.pub.Publish(ctx, bus.Outbound{Subject: subject, MsgID: "eas:" + syncID + ":" + pid, Message: &ev.EASPartnershipObserved{
		Org: string(c.org), Partnership: p, Sync: &ev.SyncRef{SyncId: syncID, Kind: kind}, ObservedAt: timestamppb.New(at), Change: change,
	}})
	if err != nil {
		return bus.MarkPublishFailure(err)
	}
	return nil
}

// reportGone reports the partnerships a full sync no longer saw: those
// the collector knows whose key the pass did not mark seen.
func (c *Collector) reportGone(ctx context.Context, syncID string, at time.Time, seen map[string]bool, counts *ev.SyncCounts) error {
	keys, err := bus.ListKeys(ctx, c.known, string(c.org)+".>")
	if err != nil {
		return fmt.Errorf("list known partnerships: %w", err)
	}
	for _, k := range keys {
		if seen[k] {
			continue // only the ones not seen are read
		}
		rec, ok, err := bus.Load[ev.CollectorRecord](ctx, c.known, k)
		if err != nil || !ok {
			continue
		}
		p := rec.GetPartnership()
		if err := c.publish(ctx, syncID, ev.SyncKind_SYNC_KIND_FULL, at, p, ev.ObservationChange_OBSERVATION_CHANGE_GONE); err != nil {
			return err
		}
		c.note(k, nil)
		if err := c.known.Delete(ctx, k); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			return fmt.Errorf("forget %s: %w", k, err)
		}
		counts.Gone++
	}
	return nil
}
