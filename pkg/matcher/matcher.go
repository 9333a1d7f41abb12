// Package matcher joins ActiveSync partnerships with MDM records. It keeps
// both sides of the join in one JetStream KV record per EAS device id
// (compared case-insensitively, as Exchange compares device ids): the
// partnerships with that id and the MDM records that name it. It records
// how a match was made or exactly why there is none, and when an MDM
// record changes re-matches every partnership with that id.
//
// Each handler changes its side of a device's record with a
// compare-and-set and matches from the record as it wrote (or read) it, so
// a partnership and an MDM record that arrive at the same moment on two
// replicas are ordered by that one record: the second to write sees the
// first, and matches with it.
package matcher

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/telemetry"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Matcher is the matcher worker of one organisation.
type Matcher struct {
	org bus.Org
	// parts holds a record per EAS device id (its partnerships and MDM
	// records); users, the MDM records without an EAS id by user, and
	// each MDM record's last report (under mdm-id).
	parts, users jetstream.KeyValue
	// Pages of confirmed partnerships read their device records and
	// users a page at a time.
	partsBulk, usersBulk *bus.BulkReader
	// js writes the tombstones, which expire tombstoneTTL after they are
	// written (0: never).
	js           jetstream.JetStream
	tombstoneTTL time.Duration
	now          func() time.Time
	// afterMDMRead, when set (by tests), runs between a page's read of its
	// device records (the MDM side with them) and its verdicts.
	afterMDMRead func()
}

// New opens the matcher's indexes, folding in the MDM index an earlier
// easguard kept in a bucket of its own.
func New(ctx context.Context, js jetstream.JetStream, org bus.Org) (*Matcher, error) {
	m := &Matcher{org: org, js: js, now: time.Now}
	for _, b := range []struct {
		name string
		kv   *jetstream.KeyValue
	}{{bus.BucketPartnerships, &m.parts}, {bus.BucketMDMUsers, &m.users}} {
		kv, err := js.KeyValue(ctx, b.name)
		if err != nil {
			return nil, fmt.Errorf("matcher: open %s: %w", b.name, err)
		}
		*b.kv = kv
	}
	var err error
	for _, b := range []struct {
		kv jetstream.KeyValue
		r  **bus.BulkReader
	}{{m.parts, &m.partsBulk}, {m.users, &m.usersBulk}} {
		if *b.r, err = bus.NewBulkReader(ctx, js, b.kv); err != nil {
			return nil, fmt.Errorf("matcher: %w", err)
		}
	}
	if err := m.migrate(ctx, js); err != nil {
		return nil, err
	}
	ttl, err := tombstoneTTL(ctx, js, m.users)
	if err != nil {
		return nil, fmt.Errorf("matcher: %w", err)
	}
	m.tombstoneTTL = ttl
	return m, nil
}

// tombstoneMargin is how long a tombstone outlives the MDM reports it
// guards against: a report taken from the stream just before it expired
// may still be in a handler, or be redelivered once.
const tombstoneMargin = time.Hour

// tombstoneTTL is how long a removal's tombstone in the MDM memory is
// kept. It refuses reports of the record older than the removal, handled
// late (another replica, a redelivery); every report is stamped when its
// source published it, so none can arrive once the MDM stream no longer
// keeps it. A stream that keeps reports for good, or a bucket without the
// limit markers a per-key TTL needs (provisioned by an earlier easguard),
// keeps tombstones for good.
func tombstoneTTL(ctx context.Context, js jetstream.JetStream, users jetstream.KeyValue) (time.Duration, error) {
	st, err := js.Stream(ctx, bus.StreamMDM)
	if err != nil {
		return 0, fmt.Errorf("retention of %s: %w", bus.StreamMDM, err)
	}
	status, err := users.Status(ctx)
	if err != nil {
		return 0, fmt.Errorf("status of %s: %w", bus.BucketMDMUsers, err)
	}
	age := st.CachedInfo().Config.MaxAge
	if age <= 0 || status.LimitMarkerTTL() <= 0 {
		return 0, nil
	}
	return age + tombstoneMargin, nil
}

// Routes returns the matcher's handlers.
func (m *Matcher) Routes() []bus.Route {
	return []bus.Route{
		bus.Handle("eas-observed", bus.EASObserved, m.Observed),
		// Pages are a hundred partnerships each: a few buffered suffice.
		bus.Handle("eas-confirmed", bus.EASConfirmed, m.Confirmed).Prefetch(2),
		bus.Handle("mdm-changed", bus.MDMChanged, m.MDMChanged),
		bus.Handle("device-rejudge", bus.RejudgeRequested, m.Rejudge),
	}
}

// observedResolution is how old the indexed observation of a partnership
// may get while the partnership stays as it was: a full sync of an
// organisation where nothing changed then costs the index one read per
// partnership, not a read and a write. An MDM change re-matches the
// indexed observation, so its time is at most this much older than the
// last sync that saw it, on top of the full sync's interval that quick
// syncs already leave it to.
const observedResolution = 12 * time.Hour

// Observed handles one observation of a partnership: store it, then match it.
func (m *Matcher) Observed(ctx context.Context, in *ev.EASPartnershipObserved) ([]bus.Outbound, error) {
	p := in.GetPartnership()
	key, err := bus.StateKey(m.org, p.GetDeviceId())
	if err != nil {
		return nil, bus.Poison(err)
	}
	// The verdict is as of the record's read, stamped before it: a
	// verdict stamped after a read that missed an MDM record written
	// meanwhile would look newer than the re-match that record set off.
	at := m.now()
	journey, stale, rec, err := m.index(ctx, key, in, nil)
	if err != nil || stale {
		return nil, err
	}
	out, err := m.match(ctx, in, "eas", at, rec)
	if err != nil {
		return nil, err
	}
	out.Parent = telemetry.ParseTraceparent(journey)
	return []bus.Outbound{out}, nil
}

// Confirmed handles a page of partnerships a sync found as they were:
// each is indexed and matched as Observed would, with the page's index
// entries, MDM records and users read in a few batched requests, and the
// verdicts go out together, as one DevicesMatched.
func (m *Matcher) Confirmed(ctx context.Context, in *ev.EASPartnershipsConfirmed) ([]bus.Outbound, error) {
	obs := in.Observations()
	keys := make([]string, len(obs))
	for i, o := range obs {
		k, err := bus.StateKey(m.org, o.GetPartnership().GetDeviceId())
		if err != nil {
			return nil, bus.Poison(fmt.Errorf("partnerships[%d]: %w", i, err))
		}
		keys[i] = k
	}
	indexed, err := m.partsBulk.Read(ctx, keys)
	if err != nil {
		return nil, err
	}
	if m.afterMDMRead != nil {
		m.afterMDMRead()
	}
	out := &ev.DevicesMatched{Org: string(m.org), Sync: in.GetSync(), Page: in.GetPage()}
	type live struct {
		i       int
		journey string
		at      time.Time
		rec     *ev.PartnershipIndex
	}
	var lives []live
	var userKeys []string
	for i, o := range obs {
		// As of when its record was read, not of now: see bus.Read. A key
		// the page holds twice is read again (Take), as the first may
		// have written it.
		read := indexed.Take(keys[i])
		at := m.now()
		if read != nil {
			at = read.At
		}
		journey, stale, rec, err := m.index(ctx, keys[i], o, read)
		if err != nil {
			return nil, err
		}
		if stale {
			continue
		}
		lives = append(lives, live{i: i, journey: journey, at: at, rec: rec})
		if len(rec.GetMdmById()) == 0 {
			ks, err := m.userKeys(o.GetPartnership().GetMailbox())
			if err != nil {
				return nil, err
			}
			userKeys = append(userKeys, ks...)
		}
	}
	if len(lives) == 0 {
		return nil, nil
	}
	users := bus.Reads{}
	if len(userKeys) > 0 {
		if users, err = m.usersBulk.Read(ctx, userKeys); err != nil {
			return nil, err
		}
	}
	lookup := func(_ context.Context, key string) (*ev.MDMIndex, error) {
		idx := &ev.MDMIndex{}
		if err := users[key].Into(idx); err != nil {
			return nil, fmt.Errorf("matcher: read %s: %w", key, err)
		}
		return idx, nil
	}
	for _, l := range lives {
		v, err := m.verdict(ctx, obs[l.i], "eas", l.at, l.rec, lookup)
		if err != nil {
			return nil, err
		}
		out.Matches = append(out.Matches, v)
		out.Journeys = append(out.Journeys, l.journey)
	}
	subject, err := bus.DevicesConfirmed.Subject(m.org, ev.PageKey(in.GetSync(), in.GetPage()))
	if err != nil {
		return nil, bus.Poison(err)
	}
	return []bus.Outbound{{Subject: subject, Message: out}}, nil
}

// index stores an observation in its device's record unless a newer one
// is there (stale) or it is there already; journey is the trace its
// partnership was first seen in (a traceparent, "" before this one), and
// rec the record as written or read, MDM records and all. read is the
// record as read with its page, nil to read it here.
func (m *Matcher) index(ctx context.Context, key string, in *ev.EASPartnershipObserved, read *bus.Read) (journey string, stale bool, rec *ev.PartnershipIndex, err error) {
	id := ev.PartnershipID(in.GetPartnership())
	rec, err = bus.ModifyRead(ctx, m.parts, key, read, func(idx *ev.PartnershipIndex, _ bool) (bus.Change, error) {
		stale = false
		journey = idx.GetTraceparentById()[id]
		prev := idx.GetById()[id]
		if prev != nil && prev.GetObservedAt().AsTime().After(in.GetObservedAt().AsTime()) {
			stale = true // a newer observation is already indexed
			return bus.Keep, nil
		}
		if in.GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_GONE {
			if prev == nil {
				return bus.Keep, nil
			}
			delete(idx.ById, id)
			if len(idx.ById) == 0 && len(idx.MdmById) == 0 {
				return bus.Remove, nil
			}
			return bus.Write, nil
		}
		if in.GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED && prev != nil &&
			prev.GetPartnership().EqualVT(in.GetPartnership()) &&
			in.GetObservedAt().AsTime().Sub(prev.GetObservedAt().AsTime()) < observedResolution {
			// Indexed as it is: only the time it was seen would change.
			// An older observation that differs and comes late may pass
			// the check above against the earlier time, but the
			// collector says unchanged only after an observation that
			// made the partnership so (new or changed, never skipped
			// here), later than that one: if it is not indexed yet, it
			// will be, over the older one.
			return bus.Keep, nil
		}
		if idx.ById == nil {
			idx.ById = map[string]*ev.EASPartnershipObserved{}
		}
		idx.ById[id] = in
		if !telemetry.ParseTraceparent(journey).IsValid() {
			// First sight of this partnership: its journey is this trace.
			if tp := telemetry.Traceparent(ctx); tp != "" {
				if idx.TraceparentById == nil {
					idx.TraceparentById = map[string]string{}
				}
				idx.TraceparentById[id] = tp
			}
		}
		return bus.Write, nil
	})
	return journey, stale, rec, err
}

// MDMChanged handles a changed MDM record: update the indexes, then
// re-match every partnership with the record's EAS id (and its previous
// one, when the id changed).
func (m *Matcher) MDMChanged(ctx context.Context, in *ev.MDMDeviceChanged) ([]bus.Outbound, error) {
	d := in.GetDevice()
	mdmID := d.GetMdmDeviceId()
	// The last record seen for this MDM id: a removal may name only the
	// id (a webhook does), and the indexes are keyed by EAS id and user.
	byIDKey, err := bus.StateKey(m.org, "mdm-id", mdmID)
	if err != nil {
		return nil, bus.Poison(err)
	}
	// The record's last report is replaced in one compare-and-set with the
	// check that this report is not older, so that two reports of one
	// record handled at once (two replicas, or two handlers of one) leave
	// the newer one, whichever finishes first. The report it replaced is
	// kept with it, and a removal leaves a tombstone: this step may run
	// again after its write was stored (its acknowledgement lost, or a
	// later step failed and the message came back), and must then know
	// what the first run knew, not take its own report for the previous.
	var prev *ev.MDMDevice
	newer := false
	if _, err := bus.Modify(ctx, m.users, byIDKey, func(last *ev.MDMIndex, exists bool) (bus.Change, error) {
		prev, newer = nil, false
		seen := last.GetObservedAtById()[mdmID]
		if seen.IsValid() && in.GetObservedAt().IsValid() && seen.AsTime().After(in.GetObservedAt().AsTime()) {
			newer = true
			return bus.Keep, nil
		}
		if sameReport(last, mdmID, in) {
			prev = last.GetPreviousById()[mdmID]
			return bus.Keep, nil // this report, indexed before: run again
		}
		known := last.GetById()[mdmID] // live, or a tombstone
		if known != nil && !last.GetRemovedById()[mdmID] {
			prev = proto.Clone(known).(*ev.MDMDevice)
		}
		stored := d
		if in.GetRemoved() {
			stored = withIdentity(d, known)
		}
		last.Reset()
		last.ById = map[string]*ev.MDMDevice{mdmID: stored}
		if in.GetObservedAt().IsValid() {
			last.ObservedAtById = map[string]*timestamppb.Timestamp{mdmID: in.GetObservedAt()}
		}
		if prev != nil {
			last.PreviousById = map[string]*ev.MDMDevice{mdmID: prev}
		}
		if in.GetRemoved() {
			last.RemovedById = map[string]bool{mdmID: true}
			if m.tombstoneTTL > 0 {
				return bus.Expire, nil
			}
		}
		return bus.Write, nil
	}, bus.ExpireAfter(m.js, m.tombstoneTTL)); err != nil {
		return nil, fmt.Errorf("matcher: record %s: %w", mdmID, err)
	}
	if newer {
		return nil, nil // a newer report of this record was already indexed
	}
	if in.GetRemoved() {
		d = withIdentity(d, prev)
	}
	if prev != nil && in.GetPreviousEasDeviceId() == "" && !strings.EqualFold(prev.GetEasDeviceId(), d.GetEasDeviceId()) {
		// The id moved without the source saying so: treat it as moved.
		in = proto.Clone(in).(*ev.MDMDeviceChanged)
		in.PreviousEasDeviceId = prev.GetEasDeviceId()
	}
	easID := strings.TrimSpace(d.GetEasDeviceId())
	// Each device record the change touches, as written: its partnerships
	// are matched again with its MDM records, as of just before the write.
	type touched struct {
		at  time.Time
		rec *ev.PartnershipIndex
	}
	affected := map[string]touched{}
	setDevice := func(part string, present bool) error {
		key, err := bus.StateKey(m.org, part)
		if err != nil {
			return bus.Poison(err)
		}
		at := m.now()
		rec, err := bus.Modify(ctx, m.parts, key, func(idx *ev.PartnershipIndex, _ bool) (bus.Change, error) {
			switch {
			case !place(&idx.MdmById, mdmID, d, present):
				return bus.Keep, nil
			case len(idx.MdmById) == 0 && len(idx.ById) == 0:
				return bus.Remove, nil
			}
			return bus.Write, nil
		})
		if err != nil {
			return fmt.Errorf("matcher: index %s: %w", mdmID, err)
		}
		affected[key] = touched{at: at, rec: rec}
		return nil
	}
	if prev := strings.TrimSpace(in.GetPreviousEasDeviceId()); prev != "" && !strings.EqualFold(prev, easID) {
		if err := setDevice(prev, false); err != nil {
			return nil, err
		}
	}
	if easID != "" {
		if err := setDevice(easID, !in.GetRemoved()); err != nil {
			return nil, err
		}
	}
	if upn := strings.ToLower(d.GetUserPrincipalName()); upn != "" {
		key, err := bus.StateKey(m.org, upn)
		if err != nil {
			return nil, bus.Poison(err)
		}
		present := easID == "" && !in.GetRemoved()
		if _, err := bus.Modify(ctx, m.users, key, func(idx *ev.MDMIndex, _ bool) (bus.Change, error) {
			switch {
			case !place(&idx.ById, mdmID, d, present):
				return bus.Keep, nil
			case len(idx.ById) == 0:
				return bus.Remove, nil
			}
			return bus.Write, nil
		}); err != nil {
			return nil, fmt.Errorf("matcher: index %s: %w", mdmID, err)
		}
	}
	var outs []bus.Outbound
	for _, key := range slices.Sorted(maps.Keys(affected)) {
		t := affected[key]
		for _, id := range slices.Sorted(maps.Keys(t.rec.GetById())) {
			out, err := m.match(ctx, t.rec.ById[id], "mdm", t.at, t.rec)
			if err != nil {
				return nil, err
			}
			// The re-match belongs to the device's journey; the MDM
			// change that set it off becomes a link.
			out.Parent = telemetry.ParseTraceparent(t.rec.GetTraceparentById()[id])
			outs = append(outs, out)
		}
	}
	return outs, nil
}

// place puts MDM record d under mdmID in records (present) or takes
// whatever is there out, and reports whether that changed records.
func place(records *map[string]*ev.MDMDevice, mdmID string, d *ev.MDMDevice, present bool) bool {
	had, ok := (*records)[mdmID]
	switch {
	case !present && !ok, present && ok && had.EqualVT(d):
		return false
	case !present:
		delete(*records, mdmID)
	default:
		if *records == nil {
			*records = map[string]*ev.MDMDevice{}
		}
		(*records)[mdmID] = d
	}
	return true
}

// sameReport reports whether last, the matcher's memory of record mdmID,
// already holds the report in: the same time of observation and the same
// kind (a removal, or the same record). It is then this step run again,
// or the source repeating itself.
func sameReport(last *ev.MDMIndex, mdmID string, in *ev.MDMDeviceChanged) bool {
	stored := last.GetById()[mdmID]
	if stored == nil || last.GetRemovedById()[mdmID] != in.GetRemoved() {
		return false
	}
	seen, at := last.GetObservedAtById()[mdmID], in.GetObservedAt()
	if seen.IsValid() != at.IsValid() || seen.IsValid() && !seen.AsTime().Equal(at.AsTime()) {
		return false
	}
	// A removal is stored with the identity its record had (withIdentity),
	// which the removal itself may not name.
	return in.GetRemoved() || stored.EqualVT(in.GetDevice())
}

// withIdentity returns a removal's record with the EAS id and user of the
// record as last reported filled in where the removal leaves them out (a
// webhook names only the MDM id): the indexes are keyed by those.
func withIdentity(d, prev *ev.MDMDevice) *ev.MDMDevice {
	if prev == nil || d.GetEasDeviceId() != "" && d.GetUserPrincipalName() != "" {
		return d
	}
	d = proto.Clone(d).(*ev.MDMDevice)
	if d.EasDeviceId == "" {
		d.EasDeviceId = prev.GetEasDeviceId()
	}
	if d.UserPrincipalName == "" {
		d.UserPrincipalName = prev.GetUserPrincipalName()
	}
	return d
}

// ErrNotRejudge is why a command other than a rejudge is dead-lettered
// when it arrives on the matcher's subject: only a publisher that bypassed
// bus.CommandOutbound puts it there.
var ErrNotRejudge = errors.New("not a rejudge command")

// RejudgeUnknown is the audit outcome of a rejudge of a device (or
// partnership) the matcher has not indexed: nothing to judge.
const RejudgeUnknown = "refused: unknown device"

// Rejudge handles an operator's request to judge a device again: every
// partnership of the device in the matcher's index (or only the one the
// command names) is matched again with today's MDM records and goes to
// the evaluator with trigger "operator", which judges it with today's
// policy, as an MDM change would have it judged. The outcome is recorded
// in the audit trail (device-rejudge). Nothing is read from Exchange: the
// partnership is judged as last observed, which is what the operator saw.
func (m *Matcher) Rejudge(ctx context.Context, c *ev.DeviceCommand) ([]bus.Outbound, error) {
	if c.GetAction() != ev.CommandRejudge {
		return nil, bus.Poison(fmt.Errorf("%w: action %q", ErrNotRejudge, c.GetAction()))
	}
	key, err := bus.StateKey(m.org, c.GetDeviceId())
	if err != nil {
		return nil, bus.Poison(err)
	}
	at := m.now()
	idx, _, err := bus.Load[ev.PartnershipIndex](ctx, m.parts, key)
	if err != nil {
		return nil, fmt.Errorf("matcher: rejudge %s: %w", c.GetDeviceId(), err)
	}
	want := c.GetPartnershipId()
	ids := make([]string, 0, len(idx.GetById()))
	for id := range idx.GetById() {
		// The index is keyed by PartnershipID, which lower-cases a GUID;
		// the console may name it as Exchange wrote it.
		if want == "" || id == want || strings.EqualFold(id, want) {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	var outs []bus.Outbound
	for _, id := range ids {
		out, err := m.match(ctx, idx.ById[id], "operator", at, idx)
		if err != nil {
			return nil, err
		}
		// A message id of the command's, so a redelivered command does
		// not have its partnerships judged twice.
		sum := sha256.Sum256([]byte(id))
		out.MsgID = "rejudge:" + c.GetCommandId() + ":" + hex.EncodeToString(sum[:8])
		out.Parent = telemetry.ParseTraceparent(idx.GetTraceparentById()[id])
		outs = append(outs, out)
	}
	outcome := fmt.Sprintf("done: %d partnerships", len(ids))
	if len(ids) == 0 {
		outcome = RejudgeUnknown
	}
	audit, err := bus.CommandAuditOutbound(m.org, bus.AuditDeviceRejudge, c, outcome, nil, m.now())
	if err != nil {
		return nil, bus.Poison(err)
	}
	return append(outs, audit), nil
}

// sameUser reports whether an MDM record belongs to the partnership's
// mailbox: its UPN (or e-mail) equals the mailbox's UPN or SMTP address.
func sameUser(d *ev.MDMDevice, mb *ev.Mailbox) bool {
	for _, u := range []string{d.GetUserPrincipalName(), d.GetEmailAddress()} {
		if u == "" {
			continue
		}
		if strings.EqualFold(u, mb.GetUserPrincipalName()) || strings.EqualFold(u, mb.GetPrimarySmtpAddress()) {
			return true
		}
	}
	return false
}

// match joins one observation with the MDM records of rec, its device's
// record as read at at (the verdict's time).
func (m *Matcher) match(ctx context.Context, obs *ev.EASPartnershipObserved, trigger string, at time.Time, rec *ev.PartnershipIndex) (bus.Outbound, error) {
	p := obs.GetPartnership()
	out, err := m.verdict(ctx, obs, trigger, at, rec, func(ctx context.Context, key string) (*ev.MDMIndex, error) {
		idx, _, err := bus.Load[ev.MDMIndex](ctx, m.users, key)
		return idx, err
	})
	if err != nil {
		return bus.Outbound{}, err
	}
	subject, err := bus.DeviceMatched.Subject(m.org, p.GetDeviceId())
	if err != nil {
		return bus.Outbound{}, bus.Poison(err)
	}
	return bus.Outbound{Subject: subject, Message: out}, nil
}

// usersIndex reads the users index under one key.
type usersIndex func(ctx context.Context, key string) (*ev.MDMIndex, error)

// verdict joins one observation with the MDM records of rec, the record
// of its EAS id as read at at (the verdict's time); users reads the users
// index when no record has the id.
func (m *Matcher) verdict(ctx context.Context, obs *ev.EASPartnershipObserved, trigger string, at time.Time, rec *ev.PartnershipIndex, users usersIndex) (*ev.DeviceMatched, error) {
	p := obs.GetPartnership()
	mb := p.GetMailbox()
	out := &ev.DeviceMatched{Org: string(m.org), Observed: obs, MatchedAt: timestamppb.New(at), Trigger: trigger}
	var mine, others []*ev.MDMDevice
	for _, d := range rec.GetMdmById() {
		if !strings.EqualFold(strings.TrimSpace(d.GetEasDeviceId()), p.GetDeviceId()) {
			continue
		}
		if d.GetUserPrincipalName() == "" && d.GetEmailAddress() == "" || sameUser(d, mb) {
			mine = append(mine, d)
		} else {
			others = append(others, d)
		}
	}
	// Live records before retired ones; then a record that names the
	// mailbox's user before one that names nobody; then the newest check-in.
	sort.Slice(mine, func(i, j int) bool {
		if mine[i].GetRetired() != mine[j].GetRetired() {
			return !mine[i].GetRetired()
		}
		if ui, uj := userOf(mine[i]) != "", userOf(mine[j]) != ""; ui != uj {
			return ui
		}
		return mine[i].GetLastCheckIn().AsTime().After(mine[j].GetLastCheckIn().AsTime())
	})
	switch {
	case len(mine) > 0 && !mine[0].GetRetired() && userOf(mine[0]) == "":
		// The EAS id is the phone's own claim: a record that names no user
		// is no proof that this mailbox's phone is the enrolled one. It
		// travels with the verdict so that the policy can choose to trust
		// it (trust_mdm_records_without_user).
		d := mine[0]
		out.Mdm = d
		out.Method = ev.MatchMethod_MATCH_METHOD_EAS_DEVICE_ID
		out.NoMatchReason = ev.NoMatchReason_NO_MATCH_REASON_RECORD_WITHOUT_USER
		out.Detail = fmt.Sprintf("MDM record %s has EAS id %s but names no user, so it is not joined to %s by the phone-reported EAS id alone", d.GetMdmDeviceId(), d.GetEasDeviceId(), userOfMailbox(mb))
	case len(mine) > 0 && !mine[0].GetRetired():
		d := mine[0]
		out.Mdm = d
		out.Method = ev.MatchMethod_MATCH_METHOD_EAS_DEVICE_ID_AND_USER
		out.Detail = fmt.Sprintf("MDM record %s has EAS id %s and belongs to %s", d.GetMdmDeviceId(), d.GetEasDeviceId(), userOf(d))
		if len(mine) > 1 {
			out.Detail += fmt.Sprintf("; %d records share the id, the most recently checked-in one was taken", len(mine))
		}
	case len(mine) > 0:
		out.NoMatchReason = ev.NoMatchReason_NO_MATCH_REASON_RETIRED
		out.Detail = fmt.Sprintf("MDM record %s for this device is retired (%s)", mine[0].GetMdmDeviceId(), mine[0].GetManagementState())
	case len(others) > 0:
		out.NoMatchReason = ev.NoMatchReason_NO_MATCH_REASON_RECORD_FOR_ANOTHER_USER
		out.Detail = fmt.Sprintf("MDM record %s has this EAS id but belongs to %s, not %s", others[0].GetMdmDeviceId(), userOf(others[0]), userOfMailbox(mb))
	default:
		out.NoMatchReason = ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD
		out.Detail = "no MDM record has EAS id " + p.GetDeviceId()
		if n, err := m.recordsWithoutEASID(ctx, mb, users); err != nil {
			return nil, err
		} else if n > 0 {
			out.NoMatchReason = ev.NoMatchReason_NO_MATCH_REASON_MDM_RECORD_WITHOUT_EAS_ID
			out.Detail = fmt.Sprintf("%s has %d MDM record(s) without an EAS id, so none can be joined to this partnership (an Android device without its EAS id, or enrolment not finished)", userOfMailbox(mb), n)
		}
	}
	return out, nil
}

// userKeys returns the users index keys of a mailbox: its UPN and its
// primary SMTP address.
func (m *Matcher) userKeys(mb *ev.Mailbox) ([]string, error) {
	var keys []string
	seen := map[string]bool{}
	for _, u := range []string{mb.GetUserPrincipalName(), mb.GetPrimarySmtpAddress()} {
		u = strings.ToLower(u)
		if u == "" || seen[u] {
			continue
		}
		seen[u] = true
		key, err := bus.StateKey(m.org, u)
		if err != nil {
			return nil, bus.Poison(err)
		}
		keys = append(keys, key)
	}
	return keys, nil
}

func (m *Matcher) recordsWithoutEASID(ctx context.Context, mb *ev.Mailbox, users usersIndex) (int, error) {
	n := 0
	keys, err := m.userKeys(mb)
	if err != nil {
		return 0, err
	}
	for _, key := range keys {
		idx, err := users(ctx, key)
		if err != nil {
			return 0, err
		}
		for _, d := range idx.GetById() {
			if d.GetEasDeviceId() == "" && !d.GetRetired() {
				n++
			}
		}
	}
	return n, nil
}

func userOf(d *ev.MDMDevice) string {
	if d.GetUserPrincipalName() != "" {
		return d.GetUserPrincipalName()
	}
	return d.GetEmailAddress()
}

func userOfMailbox(mb *ev.Mailbox) string {
	if mb.GetUserPrincipalName() != "" {
		return mb.GetUserPrincipalName()
	}
	if mb.GetPrimarySmtpAddress() != "" {
		return mb.GetPrimarySmtpAddress()
	}
	return mb.GetIdentity()
}
