package console

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Device is one partnership as the console lists it: what Exchange says,
// what the MDM says (or why nothing matched), and what easguard decided.
type Device struct {
	Key           string    `json:"key"`
	DeviceID      string    `json:"device_id"`
	PartnershipID string    `json:"partnership_id"`
	User          string    `json:"user"`
	Mailbox       string    `json:"mailbox"`
	Model         string    `json:"model"`
	Type          string    `json:"type"`
	OS            string    `json:"os"`
	ExchangeState string    `json:"exchange_state"`
	Match         string    `json:"match"`
	Compliance    string    `json:"compliance,omitempty"`
	MDMSource     string    `json:"mdm_source,omitempty"`
	Decision      string    `json:"decision"`
	Rule          string    `json:"rule"`
	Reason        string    `json:"reason,omitempty"`
	DecidedAt     time.Time `json:"decided_at"`
	DryRun        bool      `json:"dry_run,omitempty"`
	Held          bool      `json:"held,omitempty"`
	Staged        bool      `json:"staged,omitempty"`
	TraceID       string    `json:"trace_id,omitempty"`
	// LastSync is the phone's last successful sync as Exchange reported it.
	LastSync time.Time `json:"last_sync,omitzero"`

	search string
	// order sorts the list: user, then key, lower-cased once.
	order string
}

// word turns a protobuf enum name into the word administrators know
// (DEVICE_ACCESS_STATE_QUARANTINED → Quarantined).
func word(name, prefix string) string {
	s := strings.TrimPrefix(name, prefix)
	if s == "UNSPECIFIED" || s == "" {
		return ""
	}
	parts := strings.Split(strings.ToLower(s), "_")
	for i, p := range parts {
		if p != "" {
			parts[i] = strings.ToUpper(p[:1]) + p[1:]
		}
	}
	return strings.Join(parts, "")
}

// deviceFromRecord builds a row from the evaluator's record of a partnership.
func deviceFromRecord(key string, r *ev.DecisionRecord) Device {
	m := r.GetLastMatched()
	p := m.GetObserved().GetPartnership()
	user := p.GetMailbox().GetUserPrincipalName()
	if user == "" {
		user = p.GetMailbox().GetPrimarySmtpAddress()
	}
	d := Device{
		Key: key, DeviceID: p.GetDeviceId(), PartnershipID: ev.PartnershipID(p), User: user,
		Mailbox: p.GetMailbox().GetIdentity(), Model: p.GetDeviceModel(), Type: p.GetDeviceType(), OS: p.GetDeviceOs(),
		ExchangeState: word(p.GetDeviceAccessState().String(), "DEVICE_ACCESS_STATE_"),
		Decision:      word(r.GetDesired().String(), "DESIRED_ACCESS_"),
		Rule:          r.GetRule(), Reason: r.GetLastDecision().GetReason(),
		DecidedAt: r.GetDecidedAt().AsTime(), DryRun: r.GetDryRun(), Held: r.GetHeld(), Staged: r.GetStaged(),
		TraceID: traceID(r.GetTraceparent()),
	}
	if ls := p.GetLastSuccessSync(); ls != nil {
		d.LastSync = ls.AsTime()
	}
	switch {
	case m.GetMethod() != ev.MatchMethod_MATCH_METHOD_UNSPECIFIED && m.GetMdm() != nil:
		d.Match = "matched (" + word(m.GetMethod().String(), "MATCH_METHOD_") + ") to " + m.GetMdm().GetMdmDeviceId()
	case m.GetNoMatchReason() != ev.NoMatchReason_NO_MATCH_REASON_UNSPECIFIED:
		d.Match = "no match: " + word(m.GetNoMatchReason().String(), "NO_MATCH_REASON_")
		if m.GetDetail() != "" {
			d.Match += " — " + m.GetDetail()
		}
	default:
		d.Match = m.GetDetail()
	}
	if mdm := m.GetMdm(); mdm != nil {
		d.Compliance = word(mdm.GetComplianceState().String(), "COMPLIANCE_STATE_")
		d.MDMSource = mdm.GetSource()
	}
	d.search = strings.ToLower(strings.Join([]string{d.DeviceID, d.User, p.GetMailbox().GetPrimarySmtpAddress(), p.GetMailbox().GetDisplayName(), d.Model, d.Type}, "\x00"))
	d.order = strings.ToLower(d.User) + "\x00" + key
	return d
}

// traceID is the trace id of a W3C traceparent (version-traceid-spanid-flags).
func traceID(traceparent string) string {
	parts := strings.Split(traceparent, "-")
	if len(parts) != 4 || len(parts[1]) != 32 {
		return ""
	}
	return parts[1]
}

// deviceIndex keeps every partnership of one organisation in memory,
// fed by a watch of the decision records: a search through 100,000
// partnerships is then a scan of a slice, not 100,000 KV reads per page.
type deviceIndex struct {
	org bus.Org

	mu sync.RWMutex
	// byKey holds every partnership's row; a row is replaced, never
	// changed, so a pointer read under the lock stays good after it.
	byKey map[string]*Device
	// keyByPID finds a row by its partnership id, for the collector's news.
	keyByPID map[string]string
	// seen is Exchange's side as the collector last saw it, by
	// partnership id: a decision record keeps the state it was judged
	// in, the collector the state Exchange has now (after the block).
	seen   map[string]seenState
	sorted []*Device      // by user, then key; nil when stale
	counts map[string]int // of sorted, by Exchange state
	ready  bool
	err    error
}

func newDeviceIndex(org bus.Org) *deviceIndex {
	return &deviceIndex{org: org, byKey: map[string]*Device{}, keyByPID: map[string]string{}, seen: map[string]seenState{}}
}

// seenState is a partnership's state on Exchange at the last sync.
type seenState struct {
	state    string
	lastSync time.Time
}

// watch follows the decisions and the collector's buckets until ctx ends.
func (x *deviceIndex) watch(ctx context.Context, decisions, collector jetstream.KeyValue) error {
	wd, err := decisions.WatchFiltered(ctx, []string{string(x.org) + ".>"})
	if err != nil {
		return fmt.Errorf("watch %s: %w", bus.BucketDecisions, err)
	}
	defer func() { _ = wd.Stop() }()
	wc, err := collector.WatchFiltered(ctx, []string{string(x.org) + ".>"})
	if err != nil {
		return fmt.Errorf("watch %s: %w", bus.BucketCollector, err)
	}
	defer func() { _ = wc.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-wd.Updates():
			if !ok {
				return errors.New("device index: the watch of the decisions ended")
			}
			x.apply(e)
		case e, ok := <-wc.Updates():
			if !ok {
				return errors.New("device index: the watch of the collector's view ended")
			}
			x.applySeen(e)
		}
	}
}

func (x *deviceIndex) applySeen(e jetstream.KeyValueEntry) {
	if e == nil {
		return
	}
	var r ev.CollectorRecord
	if e.Operation() != jetstream.KeyValuePut || bus.DecodeRecord(e.Value(), &r) != nil || r.GetPartnership() == nil {
		return
	}
	p := r.GetPartnership()
	st := seenState{state: word(p.GetDeviceAccessState().String(), "DEVICE_ACCESS_STATE_")}
	if ls := p.GetLastSuccessSync(); ls != nil {
		st.lastSync = ls.AsTime()
	}
	pid := ev.PartnershipID(p)
	x.mu.Lock()
	defer x.mu.Unlock()
	x.seen[pid] = st
	if key, ok := x.keyByPID[pid]; ok {
		d := x.current(*x.byKey[key])
		x.byKey[key] = &d
		x.sorted = nil
	}
}

// current is a row with Exchange's state as last seen.
func (x *deviceIndex) current(d Device) Device {
	if st, ok := x.seen[d.PartnershipID]; ok && st.state != "" {
		d.ExchangeState = st.state
		if !st.lastSync.IsZero() {
			d.LastSync = st.lastSync
		}
	}
	return d
}

func (x *deviceIndex) apply(e jetstream.KeyValueEntry) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if e == nil {
		x.ready = true
		return
	}
	if e.Operation() != jetstream.KeyValuePut {
		if d, ok := x.byKey[e.Key()]; ok {
			delete(x.keyByPID, d.PartnershipID)
		}
		delete(x.byKey, e.Key())
		x.sorted = nil
		return
	}
	var r ev.DecisionRecord
	if err := bus.DecodeRecord(e.Value(), &r); err != nil {
		return
	}
	d := x.current(deviceFromRecord(e.Key(), &r))
	x.byKey[e.Key()] = &d
	x.keyByPID[d.PartnershipID] = e.Key()
	x.sorted = nil
}

// DeviceQuery selects and pages devices.
type DeviceQuery struct {
	// Search matches user, device id, address, display name, model or
	// type, case-insensitive, anywhere in them.
	Search string
	// State filters by Exchange state or decision (Allowed, Blocked,
	// Quarantined, Allow, Block, Quarantine), or held, dry-run or
	// unmatched.
	State string
	Page  int
	Size  int
}

// DevicePage is one page of a device query.
type DevicePage struct {
	Devices []Device `json:"devices"`
	Total   int      `json:"total"`
	Page    int      `json:"page"`
	Pages   int      `json:"pages"`
	// Counts is every partnership of the organisation by Exchange state.
	Counts map[string]int `json:"counts"`
	Ready  bool           `json:"ready"`
}

func (x *deviceIndex) query(q DeviceQuery) DevicePage {
	x.mu.Lock()
	if x.sorted == nil {
		x.sorted = make([]*Device, 0, len(x.byKey))
		x.counts = map[string]int{}
		for _, d := range x.byKey {
			x.sorted = append(x.sorted, d)
			x.counts[stateOrUnknown(d.ExchangeState)]++
		}
		slices.SortFunc(x.sorted, func(a, b *Device) int { return strings.Compare(a.order, b.order) })
	}
	all, ready, counts := x.sorted, x.ready, maps.Clone(x.counts)
	x.mu.Unlock()

	size := q.Size
	if size <= 0 || size > 500 {
		size = 50
	}
	page := max(q.Page, 1)
	search, state := strings.ToLower(strings.TrimSpace(q.Search)), strings.ToLower(q.State)
	out := DevicePage{Counts: counts, Ready: ready, Page: page}
	first := page*size - size
	if search == "" && state == "" {
		// The whole list: the page is a slice of it.
		out.Total = len(all)
		for _, d := range all[min(first, len(all)):min(first+size, len(all))] {
			out.Devices = append(out.Devices, *d)
		}
	} else {
		for _, d := range all {
			if search != "" && !strings.Contains(d.search, search) {
				continue
			}
			if state != "" && !d.hasState(state) {
				continue
			}
			if out.Total >= first && len(out.Devices) < size {
				out.Devices = append(out.Devices, *d)
			}
			out.Total++
		}
	}
	out.Pages = (out.Total + size - 1) / size
	return out
}

func stateOrUnknown(s string) string {
	if s == "" {
		return "Unknown"
	}
	return s
}

func (d Device) hasState(s string) bool {
	switch s {
	case "held":
		return d.Held
	case "dry-run":
		return d.DryRun
	case "unmatched":
		return strings.HasPrefix(d.Match, "no match")
	}
	return strings.EqualFold(d.ExchangeState, s) || strings.EqualFold(d.Decision, s)
}

// byDevice returns every partnership with this EAS device id.
func (x *deviceIndex) byDevice(id string) []Device {
	x.mu.RLock()
	defer x.mu.RUnlock()
	var out []Device
	for _, d := range x.byKey {
		if strings.EqualFold(d.DeviceID, id) {
			out = append(out, *d)
		}
	}
	slices.SortFunc(out, func(a, b Device) int { return strings.Compare(a.Key, b.Key) })
	return out
}
