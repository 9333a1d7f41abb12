package mdm

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"time"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// DefaultMassRemovalShare is the share of known devices that one read may
// remove before the removals are withheld as implausible.
const DefaultMassRemovalShare = 0.5

// massRemovalMinKnown is the number of known devices below which the share
// rule does not apply: removing 2 of 3 devices is a plausible edit.
const massRemovalMinKnown = 10

// inventory is the set of records of one read, by MDM device id, with the
// order the source gave them in (so changes are published in that order).
type inventory struct {
	order []string
	byID  map[string]*ev.MDMDevice
}

// newInventory indexes devices by id; a duplicate id makes the whole read
// unusable because nothing says which of the two records is true.
func newInventory(devices []*ev.MDMDevice) (*inventory, error) {
	inv := &inventory{order: make([]string, 0, len(devices)), byID: make(map[string]*ev.MDMDevice, len(devices))}
	for _, d := range devices {
		id := d.GetMdmDeviceId()
		if _, dup := inv.byID[id]; dup {
			return nil, fmt.Errorf("index inventory: %w: device id %q appears more than once", ErrInvalidInventory, id)
		}
		inv.order = append(inv.order, id)
		inv.byID[id] = d
	}
	return inv, nil
}

// reconciler turns full reads of an inventory into changes: it remembers
// the last inventory it delivered, publishes only the difference, withholds
// implausible removals, and raises each alert once per distinct condition.
// It is shared by every source that reads a whole inventory at a time (the
// file source, and a Graph poller), and is used from one goroutine.
type reconciler struct {
	// what names the inventory in alert summaries, e.g. `file "/x.json"`.
	what      string
	source    string
	massShare float64
	log       *slog.Logger
	sink      Sink

	// missingAfter, when set, keeps a record that a complete read no
	// longer lists until it has been missing this long (a device briefly
	// absent from an API listing is not a device that left management);
	// zero removes it at once (an export file is authoritative).
	missingAfter time.Duration
	now          func() time.Time
	// missingSince is when each known record was first missing.
	missingSince map[string]time.Time

	// known is what the sink has been told; nil before the first delivery.
	known *inventory

	// store, when set, keeps known and missingSince beyond this process,
	// so that a restarted (or newly elected) source compares with what was
	// last delivered; nil keeps them in memory only.
	store InventoryStore
	// loaded says known and missingSince are the store's; false at first
	// and after a failed save, when only a fresh load tells what it holds.
	loaded bool
	// savedMissing is missingSince as the store holds it.
	savedMissing map[string]time.Time
	// failureAlert and withheldAlert are the conditions last alerted, so a
	// condition that persists across reads alerts once.
	failureAlert  string
	withheldAlert string
	// marked says this run has told the store that a complete read was
	// delivered (ReadMarker), which it does once.
	marked bool
	// lastRead is how many records the last applied read listed, and
	// lastWithheld whether its removals were withheld: what repeat
	// reports again.
	lastRead     int
	lastWithheld bool
}

func newReconciler(what, source string, massShare float64, sink Sink, log *slog.Logger) *reconciler {
	if !(massShare > 0) { // zero, negative or NaN
		massShare = DefaultMassRemovalShare
	}
	return &reconciler{what: what, source: source, massShare: massShare, sink: sink, log: log, now: time.Now, missingSince: map[string]time.Time{}}
}

// load replaces known and missingSince with what the store holds, once
// per run and again after a failed save.
func (r *reconciler) load(ctx context.Context) error {
	if r.store == nil || r.loaded {
		return nil
	}
	recs, err := r.store.Load(ctx, r.source)
	if err != nil {
		return fmt.Errorf("load what %s last delivered: %w", r.what, err)
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].Device.GetMdmDeviceId() < recs[j].Device.GetMdmDeviceId() })
	inv := &inventory{order: make([]string, 0, len(recs)), byID: make(map[string]*ev.MDMDevice, len(recs))}
	r.missingSince, r.savedMissing = map[string]time.Time{}, map[string]time.Time{}
	for _, rec := range recs {
		id := rec.Device.GetMdmDeviceId()
		inv.order = append(inv.order, id)
		inv.byID[id] = rec.Device
		if !rec.MissingSince.IsZero() {
			r.missingSince[id], r.savedMissing[id] = rec.MissingSince, rec.MissingSince
		}
	}
	r.known = nil
	if len(recs) > 0 {
		r.known = inv
	}
	r.loaded = true
	r.log.InfoContext(ctx, "mdm source continues from the stored inventory", "devices", len(recs), "missing", len(r.missingSince))
	return nil
}

// save stores the difference between the inventory delivered before
// (prev) and now (r.known, r.missingSince). A failed save makes the next
// apply load the store again, so whatever did not reach it is delivered
// again: a change reported twice is harmless, a lost removal is not.
func (r *reconciler) save(ctx context.Context, prev map[string]*ev.MDMDevice) error {
	if r.store == nil {
		return nil
	}
	var put []KnownDevice
	for _, id := range r.known.order {
		d := r.known.byID[id]
		since := r.missingSince[id]
		old, had := prev[id]
		if had && old.EqualVT(d) && since.Equal(r.savedMissing[id]) {
			continue
		}
		put = append(put, KnownDevice{Device: d, MissingSince: since})
	}
	var remove []string
	for id := range prev {
		if _, ok := r.known.byID[id]; !ok {
			remove = append(remove, id)
		}
	}
	sort.Strings(remove)
	if len(put) == 0 && len(remove) == 0 {
		return nil
	}
	if err := r.store.Save(ctx, r.source, put, remove); err != nil {
		r.loaded = false
		return fmt.Errorf("store what %s delivered: %w", r.what, err)
	}
	saved := make(map[string]time.Time, len(r.missingSince))
	for id, t := range r.missingSince {
		saved[id] = t
	}
	r.savedMissing = saved
	return nil
}

// failed records a read that produced no usable inventory. Nothing is
// published and the known inventory stays, so an outage or a half-written
// export never looks like every device disappearing.
func (r *reconciler) failed(ctx context.Context, err error) {
	key := err.Error()
	r.log.WarnContext(ctx, "mdm inventory read failed; keeping the previous inventory",
		"source", r.source, "error", err)
	if key == r.failureAlert {
		return
	}
	summary := fmt.Sprintf("MDM %s could not be read, previous inventory kept: %v", r.what, err)
	if r.alert(ctx, ev.AlertKind_ALERT_KIND_MDM_UNREACHABLE, summary, map[string]string{"error": err.Error()}) {
		r.failureAlert = key
	}
}

// apply delivers the difference between the known inventory and next. It
// returns an error only when the sink or the store failed; the known
// inventory is then unchanged (or, after a failed save, read from the
// store again), so the next read offers the same difference again.
//
// With resync every record of next is delivered, changed or not, so that
// whatever a lost event left wrong downstream is put right.
func (r *reconciler) apply(ctx context.Context, next *inventory, resync bool) error {
	if err := r.load(ctx); err != nil {
		return err
	}
	r.failureAlert = ""
	var known map[string]*ev.MDMDevice
	if r.known != nil {
		known = r.known.byID
	}

	var changes []Change
	for _, id := range next.order {
		d := next.byID[id]
		old, had := known[id]
		if had && !resync && old.EqualVT(d) {
			continue
		}
		c := Change{Device: d}
		if had && old.GetEasDeviceId() != "" && !strings.EqualFold(old.GetEasDeviceId(), d.GetEasDeviceId()) {
			c.PreviousEASDeviceID = old.GetEasDeviceId()
		}
		changes = append(changes, c)
	}
	// Missing records: removed at once, or after missingAfter.
	var gone, waiting []string
	now := r.now()
	for id := range next.byID {
		delete(r.missingSince, id)
	}
	for id := range known {
		if _, ok := next.byID[id]; ok {
			continue
		}
		if r.missingAfter > 0 {
			since, seen := r.missingSince[id]
			if !seen {
				since = now
				r.missingSince[id] = now
			}
			if now.Sub(since) < r.missingAfter {
				waiting = append(waiting, id)
				continue
			}
		}
		gone = append(gone, id)
	}
	sort.Strings(gone)
	sort.Strings(waiting)

	withhold := r.judgeRemovals(ctx, len(next.order), len(known), len(gone))
	if !withhold {
		for _, id := range gone {
			changes = append(changes, Change{Device: known[id], Removed: true})
		}
	}

	if len(changes) > 0 {
		if err := r.sink.Changed(ctx, changes); err != nil {
			return fmt.Errorf("deliver %d changes of %s: %w", len(changes), r.what, err)
		}
	}

	// Commit: the new inventory, plus the withheld records, which stay
	// known so that they are neither removed later by accident nor
	// announced as new when they come back.
	// Records still waiting out missingAfter stay known the same way.
	keep := waiting
	if withhold {
		keep = append(append([]string(nil), waiting...), gone...)
	} else {
		for _, id := range gone {
			delete(r.missingSince, id)
		}
	}
	committed := next
	if len(keep) > 0 {
		committed = &inventory{order: append([]string(nil), next.order...), byID: make(map[string]*ev.MDMDevice, len(next.byID)+len(keep))}
		for id, d := range next.byID {
			committed.byID[id] = d
		}
		for _, id := range keep {
			committed.order = append(committed.order, id)
			committed.byID[id] = known[id]
		}
	}
	r.known = committed
	if err := r.save(ctx, known); err != nil {
		return err
	}
	if m, ok := r.store.(ReadMarker); ok && !r.marked {
		if err := m.MarkRead(ctx, r.source, len(next.order)); err != nil {
			return fmt.Errorf("mark %s read: %w", r.what, err)
		}
		r.marked = true
	}
	r.lastRead, r.lastWithheld = len(next.order), withhold
	r.reportRead(ctx)
	return nil
}

// reportRead tells the sink of the last applied read. A read whose
// removals were withheld is not "ok": its alert stands until a plausible
// read.
func (r *reconciler) reportRead(ctx context.Context) {
	if rr, ok := r.sink.(ReadReporter); ok && !r.lastWithheld {
		rr.ReadOK(ctx, r.lastRead)
	}
}

// repeat reports a read identical to the one last applied without
// comparing it again, and says whether it could: applying it again would
// deliver nothing, store nothing and alert nothing new, unless records
// are waiting out missingAfter (time, not the read, moves them on) or the
// store must be loaded again after a failed save. The caller must know
// the read is identical and that the last apply succeeded.
func (r *reconciler) repeat(ctx context.Context) bool {
	if len(r.missingSince) > 0 || r.store != nil && !r.loaded {
		return false
	}
	r.failureAlert = "" // a read works again, as in apply
	r.reportRead(ctx)
	return true
}

// judgeRemovals decides whether the removals of a read are implausible and,
// if so, alerts (once per distinct condition) and reports that they must be
// withheld. An empty read is always implausible; so is a read that removes
// more than massShare of at least massRemovalMinKnown known devices.
func (r *reconciler) judgeRemovals(ctx context.Context, read, known, gone int) bool {
	var kind ev.AlertKind
	var summary string
	switch {
	case read == 0:
		kind = ev.AlertKind_ALERT_KIND_MDM_INVENTORY_EMPTY
		summary = fmt.Sprintf("MDM %s lists no devices", r.what)
		if gone > 0 {
			summary += fmt.Sprintf("; %d removals withheld", gone)
		}
	case known >= massRemovalMinKnown && float64(gone) > r.massShare*float64(known):
		kind = ev.AlertKind_ALERT_KIND_MDM_UNREACHABLE
		summary = fmt.Sprintf("MDM %s would remove %d of %d known devices (more than %.0f%%); removals withheld, the inventory may be partial",
			r.what, gone, known, r.massShare*100)
	default:
		r.withheldAlert = ""
		return false
	}
	key := fmt.Sprintf("%d/%d/%d", kind, gone, known)
	if key != r.withheldAlert {
		detail := map[string]string{
			"would_remove": strconv.Itoa(gone),
			"known":        strconv.Itoa(known),
			"read":         strconv.Itoa(read),
		}
		if r.alert(ctx, kind, summary, detail) {
			r.withheldAlert = key
		}
	}
	return true
}

// alert raises an alert and reports whether the sink took it; a condition
// whose alert failed is alerted again on the next read.
func (r *reconciler) alert(ctx context.Context, kind ev.AlertKind, summary string, detail map[string]string) bool {
	detail["source"] = r.source
	if err := r.sink.Alert(ctx, kind, summary, detail); err != nil {
		r.log.ErrorContext(ctx, "mdm alert not delivered", "source", r.source, "kind", kind.String(), "summary", summary, "error", err)
		return false
	}
	return true
}
