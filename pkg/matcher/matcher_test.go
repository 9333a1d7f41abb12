package matcher_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/bus/bustest"
	"github.com/easguard/easguard/pkg/matcher"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

const org bus.Org = "contoso"

type harness struct {
	t     *testing.T
	m     *matcher.Matcher
	js    jetstream.JetStream
	pub   *bus.Publisher
	out   *natstest.Received[*ev.DeviceMatched]
	taken int // verdicts next has returned
	n     int
}

func start(t *testing.T) *harness {
	t.Helper()
	return startAfter(t, nil)
}

// startAfter starts the matcher after prepare has put on the bus what an
// earlier easguard left there.
func startAfter(t *testing.T, prepare func(ctx context.Context, js jetstream.JetStream)) *harness {
	t.Helper()
	_, _, js := natstest.Start(t)
	ctx := natstest.Context(t)
	if err := bus.Provision(ctx, js, bus.DefaultTopology()); err != nil {
		t.Fatal(err)
	}
	if prepare != nil {
		prepare(ctx, js)
	}
	m, err := matcher.New(ctx, js, org)
	if err != nil {
		t.Fatal(err)
	}
	r, err := bus.NewRunner(js, bus.RunnerConfig{Service: "matcher", Org: org}, m.Routes()...)
	if err != nil {
		t.Fatal(err)
	}
	bustest.Run(t, r)
	h := &harness{t: t, js: js, m: m}
	h.pub, _ = bus.NewPublisher(js, bus.Instrumentation{})
	h.out = natstest.Receive[ev.DeviceMatched](t, js, bus.StreamMatch, bus.DeviceMatched.Filter(org))
	return h
}

func (h *harness) observe(mailbox, upn, deviceID, guid string) {
	h.t.Helper()
	h.n++
	subj, _ := bus.EASObserved.Subject(org, deviceID)
	if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subj, MsgID: fmt.Sprint("o", h.n), Message: &ev.EASPartnershipObserved{
		Org: string(org), Partnership: &ev.EASPartnership{Mailbox: &ev.Mailbox{Identity: mailbox, PrimarySmtpAddress: mailbox, UserPrincipalName: upn}, DeviceId: deviceID, Guid: guid},
		Sync: &ev.SyncRef{SyncId: "s", Kind: ev.SyncKind_SYNC_KIND_QUICK}, ObservedAt: timestamppb.Now(), Change: ev.ObservationChange_OBSERVATION_CHANGE_NEW,
	}}); err != nil {
		h.t.Fatal(err)
	}
}

// observeAs publishes an observation of a partnership as the collector
// reports it: with a change and the time it was seen.
func (h *harness) observeAs(p *ev.EASPartnership, change ev.ObservationChange, at time.Time) {
	h.t.Helper()
	h.n++
	subj, _ := bus.EASObserved.Subject(org, p.GetDeviceId())
	if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subj, MsgID: fmt.Sprint("o", h.n), Message: &ev.EASPartnershipObserved{
		Org: string(org), Partnership: p, Sync: &ev.SyncRef{SyncId: fmt.Sprint("s", h.n), Kind: ev.SyncKind_SYNC_KIND_FULL}, ObservedAt: timestamppb.New(at), Change: change,
	}}); err != nil {
		h.t.Fatal(err)
	}
}

// revision returns the partnership index's revision for a device id.
func (h *harness) revision(deviceID string) uint64 {
	h.t.Helper()
	kv, err := h.js.KeyValue(context.Background(), bus.BucketPartnerships)
	if err != nil {
		h.t.Fatal(err)
	}
	key, err := bus.StateKey(org, deviceID)
	if err != nil {
		h.t.Fatal(err)
	}
	e, err := kv.Get(context.Background(), key)
	if err != nil {
		h.t.Fatalf("index of %s: %v", deviceID, err)
	}
	return e.Revision()
}

func (h *harness) mdm(d *ev.MDMDevice, removed bool, prev string) {
	h.t.Helper()
	h.n++
	key := d.GetEasDeviceId()
	if key == "" {
		key = d.GetMdmDeviceId()
	}
	subj, _ := bus.MDMChanged.Subject(org, key)
	if d.Source == "" {
		d.Source = "test"
	}
	if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subj, MsgID: fmt.Sprint("m", h.n), Message: &ev.MDMDeviceChanged{
		Org: string(org), Device: d, ObservedAt: timestamppb.Now(), Removed: removed, PreviousEasDeviceId: prev,
	}}); err != nil {
		h.t.Fatal(err)
	}
	// An MDM change is indexed before the next observation: the two
	// arrive on different consumers and are otherwise unordered.
	natstest.WaitDrained(h.t, h.js, 10*time.Second, bus.StreamMDM)
}

// next waits for the next n verdicts.
func (h *harness) next(n int) []*ev.DeviceMatched {
	h.t.Helper()
	got := h.out.AwaitLen(h.t, 10*time.Second, h.taken+n)[h.taken : h.taken+n]
	h.taken += n
	return got
}

func TestNoMatchReasons(t *testing.T) {
	h := start(t)
	h.observe("alice@contoso.com", "alice@contoso.com", "DevA", "g1")
	if v := h.next(1)[0]; v.GetNoMatchReason() != ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD || v.GetMdm() != nil || v.GetTrigger() != "eas" {
		t.Fatalf("no record: %v", v)
	}
	// bob's MDM record has no EAS id (an Android without it).
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m-bob", UserPrincipalName: "bob@contoso.com"}, false, "")
	h.observe("bob@contoso.com", "bob@contoso.com", "DevB", "g2")
	if v := h.next(1)[0]; v.GetNoMatchReason() != ev.NoMatchReason_NO_MATCH_REASON_MDM_RECORD_WITHOUT_EAS_ID {
		t.Fatalf("without EAS id: %v", v)
	}
	// carol's phone id belongs to dave in the MDM.
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m-dave", UserPrincipalName: "dave@contoso.com", EasDeviceId: "DevC"}, false, "")
	h.observe("carol@contoso.com", "carol@contoso.com", "devc", "g3")
	if v := h.next(1)[0]; v.GetNoMatchReason() != ev.NoMatchReason_NO_MATCH_REASON_RECORD_FOR_ANOTHER_USER {
		t.Fatalf("another user: %v", v)
	}
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m-erin", UserPrincipalName: "erin@contoso.com", EasDeviceId: "DevE", Retired: true}, false, "")
	h.observe("erin@contoso.com", "erin@contoso.com", "DevE", "g4")
	if v := h.next(1)[0]; v.GetNoMatchReason() != ev.NoMatchReason_NO_MATCH_REASON_RETIRED {
		t.Fatalf("retired: %v", v)
	}
}

// An MDM change re-matches every partnership with that id (one phone,
// two mailboxes), case-insensitively, and a removal or a changed id is
// followed.
func TestMDMChangeRematches(t *testing.T) {
	h := start(t)
	h.observe("alice@contoso.com", "alice@contoso.com", "ApplSHARED", "g1")
	h.observe("shared@contoso.com", "shared@contoso.com", "ApplSHARED", "g2")
	h.next(2)
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m1", UserPrincipalName: "alice@contoso.com", EasDeviceId: "applshared",
		ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT}, false, "")
	got := h.next(2)
	byMailbox := map[string]*ev.DeviceMatched{}
	for _, v := range got {
		if v.GetTrigger() != "mdm" {
			t.Fatalf("trigger %q", v.GetTrigger())
		}
		byMailbox[v.GetObserved().GetPartnership().GetMailbox().GetIdentity()] = v
	}
	if a := byMailbox["alice@contoso.com"]; a.GetMdm().GetMdmDeviceId() != "m1" || a.GetMethod() != ev.MatchMethod_MATCH_METHOD_EAS_DEVICE_ID_AND_USER {
		t.Fatalf("alice: %v", a)
	}
	if sh := byMailbox["shared@contoso.com"]; sh.GetNoMatchReason() != ev.NoMatchReason_NO_MATCH_REASON_RECORD_FOR_ANOTHER_USER {
		t.Fatalf("shared mailbox: %v", sh)
	}
	// The record moves to a new EAS id (the phone was reset): the old
	// partnerships lose their match.
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m1", UserPrincipalName: "alice@contoso.com", EasDeviceId: "ApplNEWID"}, false, "ApplSHARED")
	for _, v := range h.next(2) {
		if v.GetMdm() != nil {
			t.Fatalf("still matched after the id moved: %v", v)
		}
	}
	// A removal that names only the MDM id is followed too.
	h.observe("alice@contoso.com", "alice@contoso.com", "ApplNEWID", "g5")
	if v := h.next(1)[0]; v.GetMdm().GetMdmDeviceId() != "m1" {
		t.Fatalf("new id: %v", v)
	}
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m1"}, true, "")
	if v := h.next(1)[0]; v.GetMdm() != nil || v.GetNoMatchReason() != ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD {
		t.Fatalf("after removal: %v", v)
	}
}

// The step that indexes an MDM change may run again after its memory of
// the record was written: its acknowledgement was lost, or a later write
// failed and the message came back. The second run must match again what
// the first did (its outputs were lost with it), not take its own report
// for the one before: an id that moved without the source saying so, and a
// removal that names only the MDM id, still reach the partnerships of the
// id the record had. And a report older than a removal, processed late,
// does not bring the record back.
func TestMDMChangeRunAgainMatchesWhatTheFirstRunDid(t *testing.T) {
	tests := []struct {
		name   string
		change *ev.MDMDeviceChanged
	}{
		{"id moved unannounced", &ev.MDMDeviceChanged{Device: &ev.MDMDevice{MdmDeviceId: "m1", UserPrincipalName: "alice@contoso.com", EasDeviceId: "ApplNEW"}}},
		{"removal naming only the MDM id", &ev.MDMDeviceChanged{Device: &ev.MDMDevice{MdmDeviceId: "m1"}, Removed: true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t)
			ctx := natstest.Context(t)
			h.observe("alice@contoso.com", "alice@contoso.com", "ApplOLD", "g1")
			h.next(1)
			h.mdm(&ev.MDMDevice{MdmDeviceId: "m1", UserPrincipalName: "alice@contoso.com", EasDeviceId: "ApplOLD",
				ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT}, false, "")
			if v := h.next(1)[0]; v.GetMdm().GetMdmDeviceId() != "m1" {
				t.Fatalf("before the change: %v", v)
			}
			in := proto.Clone(tc.change).(*ev.MDMDeviceChanged)
			in.Org, in.ObservedAt = string(org), timestamppb.Now()
			in.Device.Source = "test"
			for run := 1; run <= 2; run++ {
				outs, err := h.m.MDMChanged(ctx, in)
				if err != nil {
					t.Fatalf("run %d: %v", run, err)
				}
				var lost []string
				for _, o := range outs {
					v := o.Message.(*ev.DeviceMatched)
					if v.GetObserved().GetPartnership().GetDeviceId() == "ApplOLD" && v.GetMdm() == nil {
						lost = append(lost, v.GetDetail())
					}
				}
				if len(lost) != 1 {
					t.Fatalf("run %d: %d outputs, %d re-matches of ApplOLD's partnership without the record (%q), want 1",
						run, len(outs), len(lost), lost)
				}
			}
			// A report of the record from before the change, processed
			// only now, changes nothing.
			old := &ev.MDMDeviceChanged{Org: string(org), ObservedAt: timestamppb.New(in.GetObservedAt().AsTime().Add(-time.Minute)),
				Device: &ev.MDMDevice{MdmDeviceId: "m1", UserPrincipalName: "alice@contoso.com", EasDeviceId: "ApplOLD", Source: "test"}}
			if outs, err := h.m.MDMChanged(ctx, old); err != nil || len(outs) != 0 {
				t.Fatalf("older report processed late: %d outputs, %v; want none", len(outs), err)
			}
			h.observe("alice@contoso.com", "alice@contoso.com", "ApplOLD", "g1")
			if v := h.next(1)[0]; v.GetMdm() != nil {
				t.Fatalf("after the older report: ApplOLD matched again: %v", v)
			}
		})
	}
}

// An MDM record that names no user is not joined to any mailbox by the
// phone-reported EAS id alone: every partnership with that id gets
// RECORD_WITHOUT_USER, carrying the record for the policy to judge, and a
// record that names the mailbox's user wins over it.
func TestRecordWithoutUserIsNotAMatch(t *testing.T) {
	h := start(t)
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m-nobody", EasDeviceId: "ApplCOPIED", LastCheckIn: timestamppb.Now(),
		ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT}, false, "")
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m-old-carol", UserPrincipalName: "carol@contoso.com", EasDeviceId: "ApplCOPIED",
		LastCheckIn: timestamppb.New(time.Now().Add(-time.Hour)), ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT}, false, "")
	tests := []struct {
		mailbox    string
		wantReason ev.NoMatchReason
		wantMethod ev.MatchMethod
		wantMDM    string
	}{
		{"alice@contoso.com", ev.NoMatchReason_NO_MATCH_REASON_RECORD_WITHOUT_USER, ev.MatchMethod_MATCH_METHOD_EAS_DEVICE_ID, "m-nobody"},
		{"bob@contoso.com", ev.NoMatchReason_NO_MATCH_REASON_RECORD_WITHOUT_USER, ev.MatchMethod_MATCH_METHOD_EAS_DEVICE_ID, "m-nobody"},
		// carol's own record is older but names her: it is the match.
		{"carol@contoso.com", ev.NoMatchReason_NO_MATCH_REASON_UNSPECIFIED, ev.MatchMethod_MATCH_METHOD_EAS_DEVICE_ID_AND_USER, "m-old-carol"},
	}
	for i, tc := range tests {
		t.Run(tc.mailbox, func(t *testing.T) {
			h.t = t
			h.observe(tc.mailbox, tc.mailbox, "ApplCOPIED", fmt.Sprint("g", i))
			v := h.next(1)[0]
			if v.GetNoMatchReason() != tc.wantReason || v.GetMethod() != tc.wantMethod || v.GetMdm().GetMdmDeviceId() != tc.wantMDM {
				t.Fatalf("verdict: reason %v method %v mdm %q, want %v %v %q (%s)", v.GetNoMatchReason(), v.GetMethod(),
					v.GetMdm().GetMdmDeviceId(), tc.wantReason, tc.wantMethod, tc.wantMDM, v.GetDetail())
			}
			if err := v.Validate(); err != nil {
				t.Fatalf("verdict does not validate: %v", err)
			}
		})
	}
}

// A full sync of an organisation where nothing changed reads the index
// and writes nothing: an observation the collector reports unchanged,
// equal to the one indexed, is matched without being stored again. One
// that differs, or that the collector reports new or changed, is stored.
func TestUnchangedObservationIsNotRewritten(t *testing.T) {
	h := start(t)
	p := &ev.EASPartnership{Mailbox: &ev.Mailbox{Identity: "alice@contoso.com", PrimarySmtpAddress: "alice@contoso.com", UserPrincipalName: "alice@contoso.com"},
		DeviceId: "ApplSTEADY", Guid: "g1", DeviceAccessState: ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED}
	t0 := time.Now().Add(-time.Hour)
	h.observeAs(p, ev.ObservationChange_OBSERVATION_CHANGE_NEW, t0)
	h.next(1)
	rev := h.revision("ApplSTEADY")

	steps := []struct {
		name    string
		change  ev.ObservationChange
		edit    func(*ev.EASPartnership)
		written bool
	}{
		{"unchanged and equal: matched, not stored", ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED, nil, false},
		{"reported changed although equal: stored", ev.ObservationChange_OBSERVATION_CHANGE_CHANGED, nil, true},
		{"unchanged but different from the index: stored", ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED,
			func(p *ev.EASPartnership) { p.DeviceAccessState = ev.DeviceAccessState_DEVICE_ACCESS_STATE_BLOCKED }, true},
		{"unchanged again: not stored", ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED,
			func(p *ev.EASPartnership) { p.DeviceAccessState = ev.DeviceAccessState_DEVICE_ACCESS_STATE_BLOCKED }, false},
	}
	for i, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			q := proto.Clone(p).(*ev.EASPartnership)
			if s.edit != nil {
				s.edit(q)
			}
			h.observeAs(q, s.change, t0.Add(time.Duration(i+1)*time.Minute))
			v := h.next(1)[0]
			if v.GetTrigger() != "eas" || v.GetObserved().GetChange() != s.change || !proto.Equal(v.GetObserved().GetPartnership(), q) {
				t.Fatalf("verdict %v", v)
			}
			got := h.revision("ApplSTEADY")
			if written := got != rev; written != s.written {
				t.Fatalf("index written = %v (revision %d → %d), want %v", written, rev, got, s.written)
			}
			rev = got
		})
	}
}

// A page of confirmed partnerships is matched as the observations it
// stands for would be, one verdict each in the page's order, in one
// DevicesMatched: joined, without a record, by a record without an EAS id,
// for another user, and one the index had not seen (stored now). Those
// indexed as they are are not stored again.
func TestConfirmedPageIsMatchedAsObservationsAre(t *testing.T) {
	h := start(t)
	pages := natstest.Receive[ev.DevicesMatched](t, h.js, bus.StreamMatch, bus.DevicesConfirmed.Filter(org))
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m-alice", UserPrincipalName: "alice@contoso.com", EasDeviceId: "ApplALICE",
		ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT}, false, "")
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m-bob", UserPrincipalName: "bob@contoso.com"}, false, "")
	h.mdm(&ev.MDMDevice{MdmDeviceId: "m-dave", UserPrincipalName: "dave@contoso.com", EasDeviceId: "DevC"}, false, "")
	part := func(user, deviceID, guid string) *ev.EASPartnership {
		return &ev.EASPartnership{Mailbox: &ev.Mailbox{Identity: user, PrimarySmtpAddress: user, UserPrincipalName: user},
			DeviceId: deviceID, Guid: guid, DeviceAccessState: ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED}
	}
	known := []*ev.EASPartnership{
		part("alice@contoso.com", "ApplALICE", "g1"),
		part("shared@contoso.com", "ApplALICE", "g2"), // the same id, another mailbox
		part("bob@contoso.com", "DevB", "g3"),
		part("carol@contoso.com", "devc", "g4"),
		part("erin@contoso.com", "DevE", "g5"),
	}
	t0 := time.Now().Add(-time.Hour)
	for _, p := range known {
		h.observeAs(p, ev.ObservationChange_OBSERVATION_CHANGE_NEW, t0)
	}
	alone := map[string]*ev.DeviceMatched{}
	for _, v := range h.next(len(known)) {
		alone[v.GetObserved().GetPartnership().GetGuid()] = v
	}
	revs := map[string]uint64{}
	for _, p := range known {
		revs[p.GetDeviceId()] = h.revision(p.GetDeviceId())
	}

	unseen := part("frank@contoso.com", "DevF", "g6")
	page := append(append([]*ev.EASPartnership{}, known...), unseen)
	ref := &ev.SyncRef{SyncId: "full-2", Kind: ev.SyncKind_SYNC_KIND_FULL}
	subj, _ := bus.EASConfirmed.Subject(org, ev.PageKey(ref, 1))
	if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subj, MsgID: "page-1", Message: &ev.EASPartnershipsConfirmed{
		Org: string(org), Sync: ref, ObservedAt: timestamppb.New(t0.Add(time.Minute)), Partnerships: page, Page: 1,
	}}); err != nil {
		t.Fatal(err)
	}
	got := pages.AwaitLen(t, 10*time.Second, 1)[0]
	if len(got.GetMatches()) != len(page) || len(got.GetJourneys()) != len(page) || got.GetPage() != 1 || got.GetSync().GetSyncId() != "full-2" {
		t.Fatalf("%d verdicts, %d journeys on page %d of %q; want %d", len(got.GetMatches()), len(got.GetJourneys()), got.GetPage(), got.GetSync().GetSyncId(), len(page))
	}
	for i, v := range got.GetMatches() {
		p := page[i]
		if !proto.Equal(v.GetObserved().GetPartnership(), p) || v.GetObserved().GetChange() != ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED ||
			v.GetObserved().GetSync().GetSyncId() != "full-2" || v.GetTrigger() != "eas" {
			t.Fatalf("verdict %d is not of %s: %v", i, p.GetGuid(), v)
		}
		if err := v.Validate(); err != nil {
			t.Fatalf("verdict %d: %v", i, err)
		}
		if want, ok := alone[p.GetGuid()]; ok {
			if v.GetNoMatchReason() != want.GetNoMatchReason() || v.GetMethod() != want.GetMethod() ||
				!proto.Equal(v.GetMdm(), want.GetMdm()) || v.GetDetail() != want.GetDetail() {
				t.Fatalf("%s in a page: %v; alone: %v", p.GetGuid(), v, want)
			}
			if r := h.revision(p.GetDeviceId()); r != revs[p.GetDeviceId()] {
				t.Fatalf("%s: index rewritten (revision %d → %d)", p.GetDeviceId(), revs[p.GetDeviceId()], r)
			}
		}
	}
	if v := got.GetMatches()[len(page)-1]; v.GetNoMatchReason() != ev.NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD {
		t.Fatalf("unseen partnership: %v", v)
	}
	h.revision("DevF") // stored: fails if not
}

// A page's verdict is as of its read of the MDM side: when a record is
// indexed after that read, and its re-match is made before the page's
// verdicts, the page's "no record" is the older of the two, so that the
// evaluator keeps the re-match. Stamped when made, it looked newer, and an
// enrolled phone was blocked again.
func TestPageVerdictIsAsOfItsRead(t *testing.T) {
	h := start(t)
	pages := natstest.Receive[ev.DevicesMatched](t, h.js, bus.StreamMatch, bus.DevicesConfirmed.Filter(org))
	p := &ev.EASPartnership{Mailbox: &ev.Mailbox{Identity: "alice@contoso.com", PrimarySmtpAddress: "alice@contoso.com", UserPrincipalName: "alice@contoso.com"},
		DeviceId: "ApplRACE", Guid: "g1", DeviceAccessState: ev.DeviceAccessState_DEVICE_ACCESS_STATE_QUARANTINED}
	t0 := time.Now().Add(-time.Minute)
	h.observeAs(p, ev.ObservationChange_OBSERVATION_CHANGE_NEW, t0)
	h.next(1)

	var rematch *ev.DeviceMatched
	done := make(chan error, 1)
	matcher.SetAfterMDMRead(h.m, func() {
		// The record is indexed and re-matched between the page's read
		// and its verdicts.
		subj, _ := bus.MDMChanged.Subject(org, "ApplRACE")
		_, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subj, MsgID: "m-race", Message: &ev.MDMDeviceChanged{
			Org: string(org), ObservedAt: timestamppb.Now(),
			Device: &ev.MDMDevice{Source: "test", MdmDeviceId: "m-race", UserPrincipalName: "alice@contoso.com", EasDeviceId: "ApplRACE",
				ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT},
		}})
		for deadline := time.Now().Add(10 * time.Second); err == nil && rematch == nil; {
			for _, v := range h.out.All() {
				if v.GetTrigger() == "mdm" {
					rematch = v
				}
			}
			if time.Now().After(deadline) {
				err = fmt.Errorf("no re-match within 10s")
			}
			time.Sleep(10 * time.Millisecond) // a handler waiting on another's output; not a test's sleep
		}
		done <- err
	})
	ref := &ev.SyncRef{SyncId: "quick-2", Kind: ev.SyncKind_SYNC_KIND_QUICK}
	subj, _ := bus.EASConfirmed.Subject(org, ev.PageKey(ref, 1))
	if _, err := h.pub.Publish(context.Background(), bus.Outbound{Subject: subj, MsgID: "race-page", Message: &ev.EASPartnershipsConfirmed{
		Org: string(org), Sync: ref, ObservedAt: timestamppb.New(t0.Add(time.Second)), Partnerships: []*ev.EASPartnership{p}, Page: 1,
	}}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	v := pages.AwaitLen(t, 10*time.Second, 1)[0].GetMatches()[0]
	if v.GetMdm() != nil || rematch.GetMdm().GetMdmDeviceId() != "m-race" {
		t.Fatalf("page verdict %v, re-match %v: want no record read by the page, the record by the re-match", v, rematch)
	}
	if !v.GetMatchedAt().AsTime().Before(rematch.GetMatchedAt().AsTime()) {
		t.Fatalf("the page's verdict (no record, read before the record was indexed) is stamped %v, not before the re-match's %v",
			v.GetMatchedAt().AsTime(), rematch.GetMatchedAt().AsTime())
	}
}

// An earlier easguard kept the MDM records by EAS id in a bucket of their
// own. The matcher folds them into the device records when it starts, so
// that an upgrade does not find every enrolled phone unknown (an MDM
// source reports a record again only when it changes), and deletes the
// bucket; a record whose last report the matcher remembers as removed, or
// as moved to another EAS id, is not brought back.
func TestMDMIndexOfAnEarlierVersionIsFoldedIn(t *testing.T) {
	alice := &ev.MDMDevice{Source: "test", MdmDeviceId: "m-alice", UserPrincipalName: "alice@contoso.com", EasDeviceId: "ApplALICE",
		ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT}
	bob := &ev.MDMDevice{Source: "test", MdmDeviceId: "m-bob", UserPrincipalName: "bob@contoso.com", EasDeviceId: "ApplBOB"}
	carol := &ev.MDMDevice{Source: "test", MdmDeviceId: "m-carol", UserPrincipalName: "carol@contoso.com", EasDeviceId: "ApplCAROL"}
	other := "fabrikam.applother"
	h := startAfter(t, func(ctx context.Context, js jetstream.JetStream) {
		old, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bus.BucketMDMDevicesLegacy, History: 1, Storage: jetstream.FileStorage})
		if err != nil {
			t.Fatal(err)
		}
		users, err := js.KeyValue(ctx, bus.BucketMDMUsers)
		if err != nil {
			t.Fatal(err)
		}
		put := func(kv jetstream.KeyValue, key string, v proto.Message) {
			b, err := proto.Marshal(v)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := kv.Put(ctx, key, b); err != nil {
				t.Fatal(err)
			}
		}
		for _, d := range []*ev.MDMDevice{alice, bob, carol} {
			key, _ := bus.StateKey(org, d.GetEasDeviceId())
			put(old, key, &ev.MDMIndex{ById: map[string]*ev.MDMDevice{d.GetMdmDeviceId(): d}})
		}
		// Another organisation's entry stays for its own matcher.
		put(old, other, &ev.MDMIndex{ById: map[string]*ev.MDMDevice{"m-other": {MdmDeviceId: "m-other", EasDeviceId: "ApplOTHER"}}})
		// What the matcher remembers of the records' last reports: alice's
		// as indexed, bob's removed since, carol's moved to another id;
		// each as this version would have handled it after the old index
		// was written.
		memory := func(d *ev.MDMDevice, removed bool) {
			key, _ := bus.StateKey(org, "mdm-id", d.GetMdmDeviceId())
			rec := &ev.MDMIndex{ById: map[string]*ev.MDMDevice{d.GetMdmDeviceId(): d}}
			if removed {
				rec.RemovedById = map[string]bool{d.GetMdmDeviceId(): true}
			}
			put(users, key, rec)
		}
		memory(alice, false)
		memory(bob, true)
		moved := proto.Clone(carol).(*ev.MDMDevice)
		moved.EasDeviceId = "ApplCAROLNEW"
		memory(moved, false)
	})
	for _, tc := range []struct {
		mailbox, device string
		want            string
	}{{"alice@contoso.com", "ApplALICE", "m-alice"}, {"bob@contoso.com", "ApplBOB", ""}, {"carol@contoso.com", "ApplCAROL", ""}} {
		h.observe(tc.mailbox, tc.mailbox, tc.device, "g-"+tc.device)
		if v := h.next(1)[0]; v.GetMdm().GetMdmDeviceId() != tc.want {
			t.Errorf("%s after the upgrade: matched %q (%s), want %q", tc.device, v.GetMdm().GetMdmDeviceId(), v.GetDetail(), tc.want)
		}
	}
	ctx := natstest.Context(t)
	old, err := h.js.KeyValue(ctx, bus.BucketMDMDevicesLegacy)
	if err != nil {
		t.Fatalf("the old bucket, which another organisation still has an entry in: %v", err)
	}
	keys, err := old.ListKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for k := range keys.Keys() {
		left = append(left, k)
	}
	if len(left) != 1 || left[0] != other {
		t.Fatalf("left in the old bucket: %q, want only %s", left, other)
	}
	// That organisation's matcher folds its entry in, and the bucket goes.
	if _, err := matcher.New(ctx, h.js, "fabrikam"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.js.KeyValue(ctx, bus.BucketMDMDevicesLegacy); !errors.Is(err, jetstream.ErrBucketNotFound) {
		t.Fatalf("the old bucket after every organisation's matcher started: %v, want it deleted", err)
	}
}

// A removal's tombstone in the MDM memory is kept as long as the MDM
// stream keeps reports it could refuse (plus a margin), then the server
// removes it: without that, the memory keeps a key for every MDM record
// ever removed. A live record's memory does not expire, and a bucket that
// an earlier easguard made without limit markers keeps tombstones for good
// rather than failing the removal.
func TestRemovalTombstoneExpires(t *testing.T) {
	memory := func(t *testing.T, h *harness, id string) (*ev.MDMIndex, bool) {
		t.Helper()
		kv, err := h.js.KeyValue(natstest.Context(t), bus.BucketMDMUsers)
		if err != nil {
			t.Fatal(err)
		}
		key, _ := bus.StateKey(org, "mdm-id", id)
		idx, ok, err := bus.Load[ev.MDMIndex](natstest.Context(t), kv, key)
		if err != nil {
			t.Fatal(err)
		}
		return idx, ok
	}
	// m2 enrolled, m1 enrolled and removed (indexed when mdm returns).
	removeM1 := func(t *testing.T, h *harness) {
		t.Helper()
		h.mdm(&ev.MDMDevice{MdmDeviceId: "m2", UserPrincipalName: "bob@contoso.com", EasDeviceId: "ApplKEPT"}, false, "")
		for _, removed := range []bool{false, true} {
			h.mdm(&ev.MDMDevice{MdmDeviceId: "m1", UserPrincipalName: "alice@contoso.com", EasDeviceId: "ApplGONE"}, removed, "")
		}
	}
	tombstoned := func(t *testing.T, h *harness) {
		t.Helper()
		if idx, ok := memory(t, h, "m1"); !ok || !idx.GetRemovedById()["m1"] {
			t.Fatalf("m1's memory after its removal: %v (present %v), want a tombstone", idx, ok)
		}
		if _, ok := memory(t, h, "m2"); !ok {
			t.Fatal("m2's memory missing")
		}
	}
	t.Run("expires", func(t *testing.T) {
		h := start(t)
		if got, want := matcher.TombstoneTTL(h.m), bus.DefaultTopology().FactsMaxAge+time.Hour; got != want {
			t.Fatalf("tombstone TTL %s, want the MDM stream's retention and an hour, %s", got, want)
		}
		matcher.SetTombstoneTTL(h.m, 3*time.Second)
		removeM1(t, h)
		tombstoned(t, h)
		natstest.Eventually(t, 30*time.Second, "m1's tombstone gone", func() bool { _, ok := memory(t, h, "m1"); return !ok })
		if _, kept := memory(t, h, "m2"); !kept {
			t.Fatal("m2's record, live, expired with the tombstone")
		}
	})
	t.Run("bucket without limit markers", func(t *testing.T) {
		h := startAfter(t, func(ctx context.Context, js jetstream.JetStream) {
			if err := js.DeleteKeyValue(ctx, bus.BucketMDMUsers); err != nil {
				t.Fatal(err)
			}
			if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bus.BucketMDMUsers, History: 1}); err != nil {
				t.Fatal(err)
			}
		})
		if got := matcher.TombstoneTTL(h.m); got != 0 {
			t.Fatalf("tombstone TTL %s on a bucket without limit markers, want 0 (kept)", got)
		}
		removeM1(t, h)
		tombstoned(t, h)
	})
}
