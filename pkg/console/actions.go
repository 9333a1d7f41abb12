package console

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/evaluator"
	"github.com/easguard/easguard/pkg/policy"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// form reads a field of a form or of a JSON body.
func (r *request) form(name string) string {
	if r.PostForm == nil {
		_ = r.ParseForm()
	}
	if v := r.PostForm.Get(name); v != "" {
		return v
	}
	return r.URL.Query().Get(name)
}

// confirmed reports whether the operator confirmed an action that takes
// mail away or cannot be undone: a page asks first, the API wants
// confirm=yes.
func (r *request) confirmed() bool { return r.form("confirm") == "yes" }

// confirm answers an unconfirmed action with the page that asks.
func confirm(r *request, what, warning string) (any, error) {
	if r.api {
		return nil, fail(http.StatusPreconditionRequired, "%s: %s; send confirm=yes to go ahead", what, warning)
	}
	fields := map[string]string{}
	for k, v := range r.PostForm {
		if k != "csrf" && k != "confirm" && len(v) > 0 {
			fields[k] = v[0]
		}
	}
	return view{Template: "confirm.html", Data: map[string]any{"What": what, "Warning": warning, "Action": r.URL.Path, "Fields": fields}}, nil
}

// audit records an operator action; a failure to record fails the action's
// answer, since an unrecorded action is worse than a repeated one.
func (s *Server) record(ctx context.Context, r *request, action, target, outcome string, detail map[string]string) error {
	a, err := bus.AuditOutbound(r.org, action, r.who.Name, s.source(r.Request), target, outcome, detail, s.now())
	if err != nil {
		return err
	}
	if _, err := s.pub.Publish(ctx, a); err != nil {
		return fmt.Errorf("audit %s: %w", action, err)
	}
	return nil
}

// syncInFlight bounds how long a requested sync counts as running when no
// report of it arrives (a collector that is down).
const syncInFlight = 30 * time.Minute

func (s *Server) sync(r *request) (any, error) {
	kind := ev.SyncKind_SYNC_KIND_QUICK
	switch r.form("kind") {
	case "", "quick":
	case "full":
		kind = ev.SyncKind_SYNC_KIND_FULL
	default:
		return nil, fail(http.StatusBadRequest, "kind must be quick or full")
	}
	key := string(r.org) + "." + status.SyncRequestedKey(kind.Short())
	now := s.now()
	// One of a kind at a time: a request is replaced only once the
	// collector reported the last one, or it is long overdue.
	prev, rev, err := s.lastRequest(r.Context(), key)
	if err != nil {
		return nil, err
	}
	if prev.SyncID != "" && now.Sub(prev.RequestedAt) < syncInFlight {
		done, err := s.syncReported(r.Context(), r.org, kind.Short(), prev)
		if err != nil {
			return nil, err
		}
		if !done {
			_ = s.record(r.Context(), r, "sync", kind.Short(), "refused: "+prev.SyncID+" is still running", nil)
			return nil, fail(http.StatusConflict, "a %s sync asked for by %s at %s (%s) is still running", kind.Short(), prev.By, prev.RequestedAt.UTC().Format(time.TimeOnly), prev.SyncID)
		}
	}
	id := fmt.Sprintf("manual-%d", now.UnixNano())
	b, _ := json.Marshal(status.SyncRequest{SyncID: id, By: r.who.Name, RequestedAt: now})
	if rev == 0 {
		_, err = s.status.Create(r.Context(), key, b)
	} else {
		_, err = s.status.Update(r.Context(), key, b, rev)
	}
	if err != nil {
		return nil, fail(http.StatusConflict, "another %s sync was asked for at the same moment", kind.Short())
	}
	subject, err := bus.SyncRequested.Subject(r.org, "")
	if err != nil {
		return nil, err
	}
	_, perr := s.pub.Publish(r.Context(), bus.Outbound{Subject: subject, MsgID: id, Message: &ev.SyncRequested{
		Org: string(r.org), SyncId: id, Kind: kind, RequestedBy: r.who.Name, RequestedAt: timestamppb.New(now), Reason: r.form("reason"),
	}})
	outcome := "requested " + id
	if perr != nil {
		outcome = "failed: " + perr.Error()
		_ = s.status.Delete(r.Context(), key)
	}
	if err := s.record(r.Context(), r, "sync", kind.Short(), outcome, map[string]string{"reason": r.form("reason")}); err != nil {
		return nil, err
	}
	if perr != nil {
		return nil, fail(http.StatusServiceUnavailable, "sync not requested: %v", perr)
	}
	return Outcome{Done: kind.Short() + " sync requested", ID: id}, nil
}

func (s *Server) lastRequest(ctx context.Context, key string) (status.SyncRequest, uint64, error) {
	e, err := s.status.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return status.SyncRequest{}, 0, nil
	}
	if err != nil {
		return status.SyncRequest{}, 0, fmt.Errorf("read %s: %w", key, err)
	}
	var req status.SyncRequest
	_ = json.Unmarshal(e.Value(), &req)
	return req, e.Revision(), nil
}

// syncReported reports whether the collector reported the requested sync
// (or any sync of the kind that started after it was asked for).
func (s *Server) syncReported(ctx context.Context, org bus.Org, kind string, req status.SyncRequest) (bool, error) {
	last, ok, err := status.Get[status.Sync](ctx, s.status, org, status.SyncLastKey(kind))
	if err != nil {
		return false, err
	}
	return ok && (last.SyncID == req.SyncID || last.StartedAt.After(req.RequestedAt)), nil
}

func (s *Server) approve(r *request) (any, error) {
	key, reason := r.form("key"), strings.TrimSpace(r.form("reason"))
	if key == "" {
		return nil, fail(http.StatusBadRequest, "name the held set (key)")
	}
	if reason == "" {
		return nil, fail(http.StatusBadRequest, "say why these devices lose mail (reason): it goes into the audit trail")
	}
	if !r.confirmed() {
		return confirm(r, "Approve the mass revocation "+key, "every device in the held set loses mail at once")
	}
	err := evaluator.ApproveGuard(r.Context(), s.status, s.pub, r.org, key, r.who.Name, s.source(r.Request), reason, s.now())
	if errors.Is(err, evaluator.ErrNothingHeld) {
		return nil, fail(http.StatusConflict, "%v", err)
	}
	if err != nil {
		return nil, err
	}
	// Judged again now, not at the next scheduled pass.
	r.PostForm.Set("kind", "full")
	r.PostForm.Set("reason", "approved mass revocation "+key)
	if _, err := s.sync(r); err != nil {
		return Outcome{Done: "approved; it goes through with the next full sync", Detail: err.Error()}, nil
	}
	return Outcome{Done: "approved; a full sync judges the held devices again now"}, nil
}

func (s *Server) discard(r *request) (any, error) {
	key := r.form("key")
	if key == "" {
		return nil, fail(http.StatusBadRequest, "name the held set (key)")
	}
	err := evaluator.DiscardGuard(r.Context(), s.status, s.pub, r.org, key, r.who.Name, s.source(r.Request), r.form("reason"), s.now())
	if errors.Is(err, evaluator.ErrNothingHeld) {
		return nil, fail(http.StatusConflict, "%v", err)
	}
	if err != nil {
		return nil, err
	}
	return Outcome{Done: "discarded: the devices keep their mail, and the same set is held without a new alert"}, nil
}

// DeadLetter is a message a worker could not process, as the console lists it.
type DeadLetter struct {
	Seq        uint64    `json:"seq"`
	Stage      string    `json:"stage"`
	Subject    string    `json:"subject"`
	Reason     string    `json:"reason"`
	Type       string    `json:"type"`
	Deliveries string    `json:"deliveries"`
	At         time.Time `json:"at"`
}

func (s *Server) deadLetters(r *request) (any, error) {
	msgs, err := readStream(r.Context(), s.js, bus.StreamDLQ, []string{bus.DeadLetter.Filter(r.org)}, historyLimit)
	if err != nil {
		return nil, err
	}
	out := []DeadLetter{}
	for i := len(msgs) - 1; i >= 0; i-- {
		m := msgs[i]
		_, stage, _ := strings.Cut(strings.TrimPrefix(m.subject, "easguard."+string(r.org)+"."), ".")
		out = append(out, DeadLetter{Seq: m.seq, Stage: stage, Subject: m.header.Get(bus.HeaderDLQSubject), Reason: m.header.Get(bus.HeaderDLQReason),
			Type: m.typ, Deliveries: m.header.Get(bus.HeaderDLQDeliveries), At: m.at})
	}
	return out, nil
}

// deadLetter reads one dead letter of the request's org.
func (s *Server) deadLetter(r *request) (jetstream.Stream, *jetstream.RawStreamMsg, error) {
	seq, err := strconv.ParseUint(r.PathValue("seq"), 10, 64)
	if err != nil {
		return nil, nil, fail(http.StatusBadRequest, "no such dead letter")
	}
	st, err := s.js.Stream(r.Context(), bus.StreamDLQ)
	if err != nil {
		return nil, nil, err
	}
	m, err := st.GetMsg(r.Context(), seq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil, fail(http.StatusNotFound, "dead letter %d is gone (replayed or discarded)", seq)
	}
	if err != nil {
		return nil, nil, err
	}
	if org, _, err := bus.ParseSubject(m.Subject); err != nil || org != r.org {
		return nil, nil, fail(http.StatusNotFound, "dead letter %d is not %s's", seq, r.org)
	}
	return st, m, nil
}

// replay publishes a dead letter again where it came from, with its
// original headers, and removes it from the dead letters.
func (s *Server) replay(r *request) (any, error) {
	st, m, err := s.deadLetter(r)
	if err != nil {
		return nil, err
	}
	subject := m.Header.Get(bus.HeaderDLQSubject)
	if org, _, err := bus.ParseSubject(subject); err != nil || org != r.org {
		return nil, fail(http.StatusConflict, "dead letter %d has no subject of %s to go back to", m.Sequence, r.org)
	}
	h := nats.Header{}
	for k, v := range m.Header {
		if !strings.HasPrefix(k, "Easguard-Dlq-") && k != jetstream.MsgIDHeader {
			h[k] = v
		}
	}
	target := fmt.Sprint(m.Sequence)
	if _, err := s.js.PublishMsg(r.Context(), &nats.Msg{Subject: subject, Data: m.Data, Header: h},
		jetstream.WithMsgID(fmt.Sprintf("replay:%d:%d", m.Sequence, s.now().UnixNano()))); err != nil {
		_ = s.record(r.Context(), r, "deadletter-replay", target, "failed: "+err.Error(), map[string]string{"subject": subject})
		return nil, fmt.Errorf("replay dead letter %d: %w", m.Sequence, err)
	}
	_ = st.DeleteMsg(r.Context(), m.Sequence)
	if err := s.record(r.Context(), r, "deadletter-replay", target, "replayed to "+subject, map[string]string{"reason": m.Header.Get(bus.HeaderDLQReason)}); err != nil {
		return nil, err
	}
	return Outcome{Done: "dead letter " + target + " replayed to " + subject}, nil
}

func (s *Server) dropDeadLetter(r *request) (any, error) {
	st, m, err := s.deadLetter(r)
	if err != nil {
		return nil, err
	}
	if !r.confirmed() {
		return confirm(r, fmt.Sprintf("Discard dead letter %d (%s)", m.Sequence, m.Header.Get(bus.HeaderDLQSubject)), "the event is gone for good; nothing will process it")
	}
	if err := st.DeleteMsg(r.Context(), m.Sequence); err != nil {
		return nil, fmt.Errorf("discard dead letter %d: %w", m.Sequence, err)
	}
	target := fmt.Sprint(m.Sequence)
	if err := s.record(r.Context(), r, "deadletter-discard", target, "discarded",
		map[string]string{"subject": m.Header.Get(bus.HeaderDLQSubject), "reason": m.Header.Get(bus.HeaderDLQReason)}); err != nil {
		return nil, err
	}
	return Outcome{Done: "dead letter " + target + " discarded"}, nil
}

// auditEntry is one operator action as exported.
type auditEntry struct {
	At      time.Time         `json:"at"`
	Action  string            `json:"action"`
	Actor   string            `json:"actor"`
	Source  string            `json:"source"`
	Target  string            `json:"target"`
	Outcome string            `json:"outcome"`
	Detail  map[string]string `json:"detail,omitempty"`
	ID      string            `json:"audit_id"`
}

// audit exports the organisation's audit trail as JSON lines (default) or
// CSV, oldest first; since=<RFC 3339> bounds it.
func (s *Server) audit(r *request) (any, error) {
	var since time.Time
	if v := r.URL.Query().Get("since"); v != "" {
		t, err := time.Parse(time.RFC3339, v)
		if err != nil {
			return nil, fail(http.StatusBadRequest, "since must be an RFC 3339 time: %v", err)
		}
		since = t
	}
	msgs, err := readStream(r.Context(), s.js, bus.StreamAudit, []string{bus.AuditRecorded.Filter(r.org)}, 1<<20)
	if err != nil {
		return nil, err
	}
	var entries []auditEntry
	for _, m := range msgs {
		var a ev.AuditEvent
		if proto.Unmarshal(m.data, &a) != nil || a.GetAt().AsTime().Before(since) {
			continue
		}
		entries = append(entries, auditEntry{At: a.GetAt().AsTime().UTC(), Action: a.GetAction(), Actor: a.GetActor(), Source: a.GetSource(),
			Target: a.GetTarget(), Outcome: a.GetOutcome(), Detail: a.GetDetail(), ID: a.GetAuditId()})
	}
	var b bytes.Buffer
	name := "easguard-audit-" + string(r.org) + "-" + s.now().UTC().Format("20060102T150405Z")
	switch r.URL.Query().Get("format") {
	case "", "jsonl":
		enc := json.NewEncoder(&b)
		for _, e := range entries {
			_ = enc.Encode(e)
		}
		return download{ContentType: "application/x-ndjson", Filename: name + ".jsonl", Body: b.Bytes()}, nil
	case "csv":
		w := csv.NewWriter(&b)
		_ = w.Write([]string{"at", "action", "actor", "source", "target", "outcome", "detail", "audit_id"})
		for _, e := range entries {
			var d []string
			for _, k := range slices.Sorted(maps.Keys(e.Detail)) {
				d = append(d, k+"="+e.Detail[k])
			}
			_ = w.Write([]string{e.At.Format(time.RFC3339Nano), e.Action, e.Actor, csvSafe(e.Source), csvSafe(e.Target), csvSafe(e.Outcome), csvSafe(strings.Join(d, "; ")), e.ID})
		}
		w.Flush()
		return download{ContentType: "text/csv; charset=utf-8", Filename: name + ".csv", Body: b.Bytes()}, nil
	}
	return nil, fail(http.StatusBadRequest, "format must be jsonl or csv")
}

// csvSafe keeps a value that a spreadsheet would run as a formula (a
// device id or user name chosen by someone else) as text.
func csvSafe(s string) string {
	if s != "" && strings.ContainsRune("=+-@\t\r", rune(s[0])) {
		return "'" + s
	}
	return s
}

// Preview is what a candidate policy would decide for the organisation's
// partnerships as they are now.
type Preview struct {
	Partnerships int            `json:"partnerships"`
	Counts       map[string]int `json:"counts"`
	// Changes is every partnership whose decision would differ from
	// today's (at most previewList of them).
	Changes []PreviewChange `json:"changes"`
	More    int             `json:"more,omitempty"`
	Problem string          `json:"problem,omitempty"`
	Policy  string          `json:"-"`
}

// PreviewChange is one partnership a candidate policy would decide otherwise.
type PreviewChange struct {
	DeviceID string `json:"device_id"`
	User     string `json:"user"`
	Now      string `json:"now"`
	Would    string `json:"would"`
	Rule     string `json:"rule"`
	Reason   string `json:"reason"`
}

const previewList = 500

func (s *Server) policyPage(r *request) (any, error) {
	return Preview{}, nil
}

// preview judges every partnership's last verdict with a candidate policy,
// in dry run: nothing is published or written.
func (s *Server) preview(r *request) (any, error) {
	text := r.form("policy")
	out := Preview{Counts: map[string]int{}, Policy: text, Changes: []PreviewChange{}}
	pol, err := policy.Parse([]byte(text))
	if err != nil {
		if r.api {
			return nil, fail(http.StatusUnprocessableEntity, "%v", err)
		}
		out.Problem = err.Error()
		return view{Template: "policy.html", Data: out}, nil
	}
	kv, err := s.js.KeyValue(r.Context(), bus.BucketDecisions)
	if err != nil {
		return nil, err
	}
	w, err := kv.WatchFiltered(r.Context(), []string{string(r.org) + ".>"}, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("preview: %w", err)
	}
	defer func() { _ = w.Stop() }()
	now := s.now()
	for e := range w.Updates() {
		if e == nil {
			break
		}
		var rec ev.DecisionRecord
		if bus.DecodeRecord(e.Value(), &rec) != nil {
			continue
		}
		m := rec.GetLastMatched()
		p := m.GetObserved().GetPartnership()
		v := pol.Evaluate(policy.Input{Org: string(r.org), Mailbox: p.GetMailbox(), Partnership: p, MDM: m.GetMdm(), NoMatch: m.GetNoMatchReason(), Now: now})
		out.Partnerships++
		would := "Out of scope"
		if v.InScope {
			would = word(v.Desired.String(), "DESIRED_ACCESS_")
		}
		out.Counts[would]++
		current := word(rec.GetDesired().String(), "DESIRED_ACCESS_")
		if current == "" {
			current = "Out of scope"
		}
		if would != current {
			if len(out.Changes) < previewList {
				out.Changes = append(out.Changes, PreviewChange{DeviceID: p.GetDeviceId(), User: ev.MailboxName(p.GetMailbox()), Now: current, Would: would, Rule: v.Rule, Reason: v.Reason})
			} else {
				out.More++
			}
		}
	}
	if err := s.record(r.Context(), r, "policy-preview", "policy", fmt.Sprintf("previewed: %d partnerships, %v", out.Partnerships, out.Counts), nil); err != nil {
		return nil, err
	}
	return view{Template: "policy.html", Data: out}, nil
}
