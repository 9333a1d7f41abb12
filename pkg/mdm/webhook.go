package mdm

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Webhook protocol headers (see WebhookSource).
const (
	// HeaderTimestamp carries the sender's clock in unix seconds; it is
	// signed, so a captured request stops working after MaxSkew.
	HeaderTimestamp = "X-Easguard-Timestamp"
	// HeaderEventID carries the sender's unique id of the delivery; it is
	// signed and remembered, so a captured request cannot be replayed.
	HeaderEventID = "X-Easguard-Event-Id"
	// HeaderSignature carries "sha256=" and the hex HMAC-SHA256 of
	// timestamp, event id and body, proving the sender holds the secret.
	HeaderSignature = "X-Easguard-Signature"
)

// Webhook limits and defaults.
const (
	// DefaultMaxSkew tolerates ordinary clock drift between sender and
	// easguard while keeping the replay window short.
	DefaultMaxSkew = 5 * time.Minute
	// DefaultMaxBody fits thousands of device records; larger bodies are
	// refused before they are read, so a sender cannot exhaust memory.
	DefaultMaxBody = 1 << 20
	// MinSecretLen is the shortest HMAC key accepted: shorter keys can be
	// guessed offline from one captured request.
	MinSecretLen = 16
	// MaxEventIDLen bounds an event id, which is kept in the replay store.
	MaxEventIDLen = 128
	// forgetTimeout bounds un-recording an event id after a failure, which
	// runs even when the sender has gone away.
	forgetTimeout = 5 * time.Second
)

// WebhookOptions configures a WebhookSource.
type WebhookOptions struct {
	// Secret is the HMAC-SHA256 key shared with the sender; required, at
	// least MinSecretLen bytes.
	Secret []byte
	// MaxSkew (default 5m) is the accepted difference between the sender's
	// timestamp and our clock. Event ids are remembered for twice as long,
	// so a request is either too old or recognised as a replay.
	MaxSkew time.Duration
	// MaxBody (default 1 MiB) is the largest request body read.
	MaxBody int64
	// Replay remembers event ids (default: in memory, this process only,
	// forgotten on restart). Replicas behind one load balancer, and a
	// webhook that must refuse a captured request after a restart, need a
	// shared store: KVReplayStore.
	Replay ReplayStore
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Logger receives rejected requests and sink failures; default
	// slog.Default().
	Logger *slog.Logger
}

// WebhookPayload is the body of a webhook request.
type WebhookPayload struct {
	// Devices are new or changed records, in Graph's managedDevice shape.
	Devices []ManagedDevice `json:"devices"`
	// Removed are the MDM device ids of records gone from the MDM.
	Removed []string `json:"removed"`
}

// WebhookSource is an MDM source that receives device changes POSTed by an
// MDM or an integration, so a change reaches easguard in seconds instead of
// at the next inventory read. Mount it where senders can reach it (for
// example at /mdm/webhook) and run it with Run.
//
// # Protocol
//
// The sender POSTs Content-Type application/json with three headers:
//
//	X-Easguard-Timestamp: <unix seconds>
//	X-Easguard-Event-Id:  <unique id: 1-128 printable ASCII characters, no "." and no spaces>
//	X-Easguard-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + event_id + "." + body)>
//
// and a body of Graph managedDevice objects and removed MDM device ids:
//
//	{"devices": [{"id": "…", "userPrincipalName": "…", "easDeviceId": "…",
//	              "complianceState": "compliant", "managementState": "managed",
//	              "operatingSystem": "iOS", "lastSyncDateTime": "2025-01-02T03:04:05Z"}],
//	 "removed": ["mdm device id", …]}
//
// Answers: 202 accepted; 400 malformed JSON or a bad record (the message
// says which; fix it and send a new event); 401 missing or invalid
// signature, or a timestamp more than MaxSkew away from easguard's clock;
// 405 not a POST; 409 this event id was already accepted (a replay: do not
// retry); 413 body larger than MaxBody; 415 not JSON; 503 easguard cannot
// take it now (not running, or publishing failed): retry the same request
// later, with a fresh timestamp and signature if MaxSkew has passed. Retrying
// the same event id after a 503 is safe; after a 202 it is answered 409.
//
// A sender in a few lines of shell (any unique string will do as the id):
//
//	ts=$(date +%s); id=$(uuidgen); body='{"devices":[{"id":"d1","easDeviceId":"ABC123","complianceState":"compliant"}]}'
//	sig=$(printf '%s.%s.%s' "$ts" "$id" "$body" | openssl dgst -sha256 -hmac "$SECRET" -r | cut -d' ' -f1)
//	curl -sS -X POST https://easguard.example/mdm/webhook -H 'Content-Type: application/json' \
//	  -H "X-Easguard-Timestamp: $ts" -H "X-Easguard-Event-Id: $id" -H "X-Easguard-Signature: sha256=$sig" \
//	  --data-binary "$body"
//
// In Go, WebhookSignature computes the header value.
//
// The webhook keeps no inventory: it never sets Change.PreviousEASDeviceID
// (the matcher's MDM index knows the previous id), and a removal carries
// only the source and the MDM device id.
type WebhookSource struct {
	name    string
	secret  []byte
	maxSkew time.Duration
	maxBody int64
	replay  ReplayStore
	now     func() time.Time
	log     *slog.Logger

	running atomic.Bool
	mu      sync.RWMutex
	sink    Sink
	// events serialises deliveries of one event id in this process, so
	// concurrent duplicates reach the replay store one after the other.
	events keyedMutex
}

// NewWebhookSource returns a webhook source named name (MDMDevice.source).
// It fails, wrapping ErrConfig, without a name or with a secret shorter than
// MinSecretLen.
func NewWebhookSource(name string, opts WebhookOptions) (*WebhookSource, error) {
	if strings.TrimSpace(name) == "" {
		return nil, fmt.Errorf("new webhook source: %w: empty name", ErrConfig)
	}
	if len(opts.Secret) < MinSecretLen {
		return nil, fmt.Errorf("new webhook source %q: %w: secret has %d bytes, at least %d required",
			name, ErrConfig, len(opts.Secret), MinSecretLen)
	}
	if opts.MaxSkew <= 0 {
		opts.MaxSkew = DefaultMaxSkew
	}
	if opts.MaxBody <= 0 {
		opts.MaxBody = DefaultMaxBody
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Replay == nil {
		opts.Replay = NewMemoryReplayStore(opts.Now)
	}
	return &WebhookSource{
		name:    name,
		secret:  bytes.Clone(opts.Secret),
		maxSkew: opts.MaxSkew,
		maxBody: opts.MaxBody,
		replay:  opts.Replay,
		now:     opts.Now,
		log:     logger(opts.Logger).With("source", name),
	}, nil
}

// Name is the name given to NewWebhookSource.
func (w *WebhookSource) Name() string { return w.name }

// Run makes the source accept requests, delivering them to sink, until ctx
// ends; it then returns nil and requests are answered 503 again.
func (w *WebhookSource) Run(ctx context.Context, sink Sink) error {
	if sink == nil {
		return fmt.Errorf("run %s: %w: nil sink", w.name, ErrConfig)
	}
	if !w.running.CompareAndSwap(false, true) {
		return fmt.Errorf("run %s: %w", w.name, ErrAlreadyRunning)
	}
	defer w.running.Store(false)
	w.setSink(sink)
	defer w.setSink(nil)
	<-ctx.Done()
	return nil
}

func (w *WebhookSource) setSink(s Sink) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.sink = s
}

func (w *WebhookSource) currentSink() Sink {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return w.sink
}

// WebhookSignature returns the X-Easguard-Signature value for a request:
// "sha256=" and the hex HMAC-SHA256 of timestamp + "." + eventID + "." + body.
func WebhookSignature(secret []byte, timestamp, eventID string, body []byte) string {
	return "sha256=" + hex.EncodeToString(webhookMAC(secret, timestamp, eventID, body))
}

func webhookMAC(secret []byte, timestamp, eventID string, body []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(timestamp))
	m.Write([]byte{'.'})
	m.Write([]byte(eventID))
	m.Write([]byte{'.'})
	m.Write(body)
	return m.Sum(nil)
}

// webhookError is a rejection: the status and what the sender is told.
type webhookError struct {
	status int
	msg    string
}

func (e *webhookError) Error() string { return fmt.Sprintf("%d %s", e.status, e.msg) }

func reject(status int, format string, args ...any) *webhookError {
	return &webhookError{status: status, msg: fmt.Sprintf(format, args...)}
}

// ServeHTTP verifies and delivers one webhook request (see WebhookSource for
// the protocol).
func (w *WebhookSource) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	n, err := w.serve(rw, r)
	if err != nil {
		var we *webhookError
		if !errors.As(err, &we) {
			we = reject(http.StatusInternalServerError, "internal error")
		}
		w.log.WarnContext(r.Context(), "mdm webhook request rejected",
			"status", we.status, "reason", we.msg, "event_id", truncate(r.Header.Get(HeaderEventID), 2*MaxEventIDLen), "remote", r.RemoteAddr)
		switch we.status {
		case http.StatusMethodNotAllowed:
			rw.Header().Set("Allow", http.MethodPost)
		case http.StatusServiceUnavailable:
			rw.Header().Set("Retry-After", "5")
		}
		writeJSON(rw, we.status, map[string]any{"error": we.msg})
		return
	}
	writeJSON(rw, http.StatusAccepted, map[string]any{"status": "accepted", "changes": n})
}

// truncate bounds what a request puts into a log line.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

func writeJSON(rw http.ResponseWriter, status int, v any) {
	rw.Header().Set("Content-Type", "application/json")
	rw.Header().Set("Cache-Control", "no-store")
	rw.WriteHeader(status)
	_ = json.NewEncoder(rw).Encode(v)
}

// serve returns the number of changes delivered, or a *webhookError.
func (w *WebhookSource) serve(rw http.ResponseWriter, r *http.Request) (int, error) {
	if r.Method != http.MethodPost {
		return 0, reject(http.StatusMethodNotAllowed, "only POST is accepted")
	}
	sink := w.currentSink()
	if sink == nil {
		return 0, reject(http.StatusServiceUnavailable, "not running")
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return 0, reject(http.StatusUnsupportedMediaType, "Content-Type must be application/json")
	}
	if r.ContentLength > w.maxBody {
		return 0, reject(http.StatusRequestEntityTooLarge, "body larger than %d bytes", w.maxBody)
	}
	body, err := io.ReadAll(http.MaxBytesReader(rw, r.Body, w.maxBody))
	if err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return 0, reject(http.StatusRequestEntityTooLarge, "body larger than %d bytes", w.maxBody)
		}
		return 0, reject(http.StatusBadRequest, "reading the body failed")
	}

	ts, id, sig := r.Header.Get(HeaderTimestamp), r.Header.Get(HeaderEventID), r.Header.Get(HeaderSignature)
	switch {
	case ts == "":
		return 0, reject(http.StatusUnauthorized, "missing %s", HeaderTimestamp)
	case id == "":
		return 0, reject(http.StatusUnauthorized, "missing %s", HeaderEventID)
	case sig == "":
		return 0, reject(http.StatusUnauthorized, "missing %s", HeaderSignature)
	}
	if err := checkEventID(id); err != nil {
		return 0, reject(http.StatusBadRequest, "%s: %v", HeaderEventID, err)
	}
	if !w.validSignature(sig, ts, id, body) {
		return 0, reject(http.StatusUnauthorized, "invalid signature")
	}
	sent, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return 0, reject(http.StatusUnauthorized, "%s is not unix seconds", HeaderTimestamp)
	}
	if skew := w.now().Sub(time.Unix(sent, 0)).Abs(); skew > w.maxSkew {
		return 0, reject(http.StatusUnauthorized, "timestamp is %s away from easguard's clock (at most %s accepted)",
			skew.Truncate(time.Second), w.maxSkew)
	}

	changes, err := w.parse(body)
	if err != nil {
		return 0, reject(http.StatusBadRequest, "%v", err)
	}
	return len(changes), w.deliver(r.Context(), sink, id, changes)
}

// deliver records the event id and delivers the changes, un-recording the
// id if delivery failed so that the sender's retry is accepted. Deliveries
// of one id are serialised in this process: a concurrent duplicate waits
// for the first and then finds the id recorded (409), or, if the first
// failed, delivers in its place.
func (w *WebhookSource) deliver(ctx context.Context, sink Sink, id string, changes []Change) error {
	unlock, err := w.events.lock(ctx, id)
	if err != nil {
		return reject(http.StatusServiceUnavailable, "request ended while waiting for a concurrent delivery of the same event")
	}
	defer unlock()
	seen, err := w.replay.Seen(ctx, id, 2*w.maxSkew)
	if err != nil {
		w.log.ErrorContext(ctx, "mdm webhook replay store failed", "error", err)
		return reject(http.StatusServiceUnavailable, "replay store unavailable")
	}
	if seen {
		return reject(http.StatusConflict, "event id already accepted")
	}
	if len(changes) == 0 {
		return nil
	}
	if err := sink.Changed(ctx, changes); err != nil {
		w.log.ErrorContext(ctx, "mdm webhook changes not delivered", "event_id", id, "changes", len(changes), "error", err)
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), forgetTimeout)
		defer cancel()
		if ferr := w.replay.Forget(fctx, id); ferr != nil {
			// The sender's retry will now be answered 409 and the change
			// is lost until the MDM sends the device again.
			w.log.ErrorContext(ctx, "mdm webhook could not un-record a failed event; its retry will be refused",
				"event_id", id, "error", ferr)
		}
		return reject(http.StatusServiceUnavailable, "changes could not be published; retry")
	}
	return nil
}

func (w *WebhookSource) validSignature(header, ts, id string, body []byte) bool {
	scheme, hexSig, ok := strings.Cut(header, "=")
	if !ok || !strings.EqualFold(strings.TrimSpace(scheme), "sha256") {
		return false
	}
	got, err := hex.DecodeString(strings.TrimSpace(hexSig))
	if err != nil {
		return false
	}
	return hmac.Equal(got, webhookMAC(w.secret, ts, id, body))
}

// checkEventID keeps event ids short, printable and free of ".", which
// separates the signed parts: with a "." an id could absorb the start of
// the body and a different split of the same bytes would carry the same
// signature.
func checkEventID(id string) error {
	if len(id) > MaxEventIDLen {
		return fmt.Errorf("longer than %d characters", MaxEventIDLen)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c <= ' ' || c > '~' || c == '.' {
			return fmt.Errorf("character %d is not allowed (printable ASCII without spaces or \".\")", i)
		}
	}
	return nil
}

// parse decodes and normalises a payload; any bad record rejects all of it,
// so the sender learns about it instead of losing part of an event.
func (w *WebhookSource) parse(body []byte) ([]Change, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	var p WebhookPayload
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("malformed JSON: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("malformed JSON: data after the payload")
	}
	changes := make([]Change, 0, len(p.Devices)+len(p.Removed))
	ids := make(map[string]string, len(p.Devices)+len(p.Removed))
	for i, m := range p.Devices {
		d, err := Normalize(w.name, m)
		if err != nil {
			return nil, fmt.Errorf("devices[%d]: %w", i, err)
		}
		if where, dup := ids[d.GetMdmDeviceId()]; dup {
			return nil, fmt.Errorf("devices[%d]: id %q also in %s", i, d.GetMdmDeviceId(), where)
		}
		ids[d.GetMdmDeviceId()] = fmt.Sprintf("devices[%d]", i)
		changes = append(changes, Change{Device: d})
	}
	for i, id := range p.Removed {
		if strings.TrimSpace(id) == "" {
			return nil, fmt.Errorf("removed[%d]: %w: empty id", i, ErrInvalidRecord)
		}
		if where, dup := ids[id]; dup {
			return nil, fmt.Errorf("removed[%d]: id %q also in %s", i, id, where)
		}
		ids[id] = fmt.Sprintf("removed[%d]", i)
		changes = append(changes, Change{Device: &ev.MDMDevice{Source: w.name, MdmDeviceId: id}, Removed: true})
	}
	return changes, nil
}

// keyedMutex is a mutex per key, held only while some caller uses the key.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyLock
}

type keyLock struct {
	held chan struct{} // capacity 1: full while locked
	refs int
}

// lock waits for key, or for ctx to end, and returns the unlock function.
func (k *keyedMutex) lock(ctx context.Context, key string) (func(), error) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyLock{}
	}
	l := k.locks[key]
	if l == nil {
		l = &keyLock{held: make(chan struct{}, 1)}
		k.locks[key] = l
	}
	l.refs++
	k.mu.Unlock()

	select {
	case l.held <- struct{}{}:
		return func() {
			<-l.held
			k.release(key, l)
		}, nil
	case <-ctx.Done():
		k.release(key, l)
		return nil, fmt.Errorf("wait for event %q: %w", key, ctx.Err())
	}
}

func (k *keyedMutex) release(key string, l *keyLock) {
	k.mu.Lock()
	defer k.mu.Unlock()
	l.refs--
	if l.refs == 0 {
		delete(k.locks, key)
	}
}
