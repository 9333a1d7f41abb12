package mdm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
)

var testSecret = []byte("0123456789abcdef-test-secret")

// clock is a settable clock for the webhook and its replay store.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// webhookFixture is a running WebhookSource behind a real HTTP server.
type webhookFixture struct {
	src   *WebhookSource
	sink  *recordingSink
	srv   *httptest.Server
	clock *clock
}

func startWebhook(tb testing.TB, opts WebhookOptions) *webhookFixture {
	tb.Helper()
	f := &webhookFixture{sink: &recordingSink{}, clock: &clock{t: time.Unix(1_750_000_000, 0)}}
	if opts.Secret == nil {
		opts.Secret = testSecret
	}
	opts.Now = f.clock.now
	opts.Logger = slog.New(newLogRecorder())
	src, err := NewWebhookSource("webhook", opts)
	if err != nil {
		tb.Fatal(err)
	}
	f.src = src
	f.srv = httptest.NewServer(src)
	tb.Cleanup(f.srv.Close)
	runSource(tb, src, f.sink)
	waitFor(tb, "the webhook to run", func() bool { return src.currentSink() != nil })
	return f
}

// request is one webhook delivery as a sender would build it.
type request struct {
	method      string
	contentType string
	ts          string
	id          string
	body        []byte
	secret      []byte
	// signedBody, when set, is signed instead of body (a tampered body).
	signedBody []byte
	signature  *string
}

func (f *webhookFixture) newRequest(body []byte) request {
	return request{
		method:      http.MethodPost,
		contentType: "application/json",
		ts:          strconv.FormatInt(f.clock.now().Unix(), 10),
		id:          "evt-" + strconv.FormatInt(time.Now().UnixNano(), 36),
		body:        body,
		secret:      testSecret,
	}
}

// send posts r and returns the status and the decoded answer.
func (f *webhookFixture) send(tb testing.TB, r request) (int, map[string]any) {
	tb.Helper()
	status, answer, err := f.trySend(r)
	if err != nil {
		tb.Fatal(err)
	}
	return status, answer
}

// trySend is send for goroutines other than the test's.
func (f *webhookFixture) trySend(r request) (int, map[string]any, error) {
	req, err := http.NewRequest(r.method, f.srv.URL+"/mdm/webhook", bytes.NewReader(r.body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", r.contentType)
	req.Header.Set(HeaderTimestamp, r.ts)
	req.Header.Set(HeaderEventID, r.id)
	signed := r.body
	if r.signedBody != nil {
		signed = r.signedBody
	}
	sig := WebhookSignature(r.secret, r.ts, r.id, signed)
	if r.signature != nil {
		sig = *r.signature
	}
	req.Header.Set(HeaderSignature, sig)
	resp, err := f.srv.Client().Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, err
	}
	var answer map[string]any
	if err := json.Unmarshal(raw, &answer); err != nil {
		return 0, nil, fmt.Errorf("answer %q is not JSON: %w", raw, err)
	}
	return resp.StatusCode, answer, nil
}

func payload(tb testing.TB, devices []ManagedDevice, removed ...string) []byte {
	tb.Helper()
	b, err := json.Marshal(WebhookPayload{Devices: devices, Removed: removed})
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func TestWebhookAcceptsSignedChanges(t *testing.T) {
	f := startWebhook(t, WebhookOptions{})
	d := device(1)
	d.ComplianceState = "noncompliant"
	status, answer := f.send(t, f.newRequest(payload(t, []ManagedDevice{d}, "gone-1")))
	if status != http.StatusAccepted {
		t.Fatalf("status %d (%v), want 202", status, answer)
	}
	got := f.sink.waitCalls(t, 1)
	want, err := Normalize("webhook", d)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Removed || !proto.Equal(got[0].Device, want) {
		t.Errorf("changes %+v, want the normalised device first", got)
	}
	if len(got) == 2 && (!got[1].Removed || got[1].Device.GetMdmDeviceId() != "gone-1" || got[1].Device.GetSource() != "webhook") {
		t.Errorf("second change %+v, want the removal of gone-1", got[1])
	}
}

func TestWebhookRejects(t *testing.T) {
	good := func(tb testing.TB) []byte { return payload(tb, []ManagedDevice{device(1)}) }
	tests := []struct {
		name   string
		opts   WebhookOptions
		edit   func(tb testing.TB, f *webhookFixture, r *request)
		status int
		wantIn string
	}{
		{"wrong secret", WebhookOptions{}, func(_ testing.TB, _ *webhookFixture, r *request) {
			r.secret = []byte("another-secret-of-enough-bytes")
		}, http.StatusUnauthorized, "signature"},
		{"tampered body", WebhookOptions{}, func(tb testing.TB, _ *webhookFixture, r *request) {
			r.signedBody = r.body
			d := device(1)
			d.ComplianceState = "compliant"
			d.ManagementState = "managed"
			d.EASDeviceID = "ATTACKERSPHONE"
			r.body = payload(tb, []ManagedDevice{d})
		}, http.StatusUnauthorized, "signature"},
		{"signature without scheme", WebhookOptions{}, func(_ testing.TB, _ *webhookFixture, r *request) {
			s := strings.TrimPrefix(WebhookSignature(r.secret, r.ts, r.id, r.body), "sha256=")
			r.signature = &s
		}, http.StatusUnauthorized, "signature"},
		{"missing signature", WebhookOptions{}, func(_ testing.TB, _ *webhookFixture, r *request) {
			s := ""
			r.signature = &s
		}, http.StatusUnauthorized, HeaderSignature},
		{"missing timestamp", WebhookOptions{}, func(_ testing.TB, _ *webhookFixture, r *request) { r.ts = "" }, http.StatusUnauthorized, HeaderTimestamp},
		{"old timestamp", WebhookOptions{}, func(_ testing.TB, f *webhookFixture, r *request) {
			r.ts = strconv.FormatInt(f.clock.now().Add(-6*time.Minute).Unix(), 10)
		}, http.StatusUnauthorized, "timestamp"},
		{"future timestamp", WebhookOptions{MaxSkew: time.Minute}, func(_ testing.TB, f *webhookFixture, r *request) {
			r.ts = strconv.FormatInt(f.clock.now().Add(2*time.Minute).Unix(), 10)
		}, http.StatusUnauthorized, "timestamp"},
		{"timestamp not a number", WebhookOptions{}, func(_ testing.TB, _ *webhookFixture, r *request) { r.ts = "yesterday" }, http.StatusUnauthorized, "unix seconds"},
		{"event id with a dot", WebhookOptions{}, func(_ testing.TB, _ *webhookFixture, r *request) { r.id = "a.b" }, http.StatusBadRequest, HeaderEventID},
		{"oversized body", WebhookOptions{MaxBody: 512}, func(tb testing.TB, _ *webhookFixture, r *request) {
			r.body = payload(tb, devices(10))
		}, http.StatusRequestEntityTooLarge, "larger"},
		{"bad JSON", WebhookOptions{}, func(_ testing.TB, _ *webhookFixture, r *request) {
			r.body = []byte(`{"devices":[{"id":"a"}`)
		}, http.StatusBadRequest, "malformed JSON"},
		{"data after the JSON", WebhookOptions{}, func(_ testing.TB, _ *webhookFixture, r *request) {
			r.body = []byte(`{"devices":[]} {}`)
		}, http.StatusBadRequest, "malformed JSON"},
		{"bad record", WebhookOptions{}, func(tb testing.TB, _ *webhookFixture, r *request) {
			d := device(1)
			d.ID = "dev-x"
			d.EASDeviceID = strings.Repeat("E", 33)
			r.body = payload(tb, []ManagedDevice{device(2), d})
		}, http.StatusBadRequest, `devices[1]: record "dev-x": field easDeviceId`},
		{"device also removed", WebhookOptions{}, func(tb testing.TB, _ *webhookFixture, r *request) {
			r.body = payload(tb, []ManagedDevice{device(1)}, device(1).ID)
		}, http.StatusBadRequest, "removed[0]"},
		{"not JSON", WebhookOptions{}, func(_ testing.TB, _ *webhookFixture, r *request) { r.contentType = "text/plain" }, http.StatusUnsupportedMediaType, "application/json"},
		{"GET", WebhookOptions{}, func(_ testing.TB, _ *webhookFixture, r *request) { r.method = http.MethodGet }, http.StatusMethodNotAllowed, "POST"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := startWebhook(t, tt.opts)
			r := f.newRequest(good(t))
			tt.edit(t, f, &r)
			status, answer := f.send(t, r)
			if status != tt.status {
				t.Errorf("status %d (%v), want %d", status, answer, tt.status)
			}
			if msg, _ := answer["error"].(string); !strings.Contains(msg, tt.wantIn) {
				t.Errorf("answer %v does not mention %q", answer, tt.wantIn)
			}
			if n := f.sink.attemptCount(); n != 0 {
				t.Errorf("a rejected request reached the sink (%d calls)", n)
			}
			// A rejection never burns the event id: the corrected
			// request with the same id is accepted.
			if tt.name == "event id with a dot" {
				return
			}
			fixed := f.newRequest(good(t))
			fixed.id = r.id
			if status, answer := f.send(t, fixed); status != http.StatusAccepted {
				t.Errorf("corrected request with the same event id: status %d (%v), want 202", status, answer)
			}
		})
	}
}

func TestWebhookReplay(t *testing.T) {
	f := startWebhook(t, WebhookOptions{})
	r := f.newRequest(payload(t, []ManagedDevice{device(1)}))
	if status, answer := f.send(t, r); status != http.StatusAccepted {
		t.Fatalf("first delivery: status %d (%v)", status, answer)
	}
	f.clock.advance(4 * time.Minute) // still within MaxSkew of the timestamp
	if status, answer := f.send(t, r); status != http.StatusConflict {
		t.Errorf("replay: status %d (%v), want 409", status, answer)
	}
	if n := f.sink.attemptCount(); n != 1 {
		t.Errorf("sink called %d times, want 1", n)
	}
}

func TestWebhookRetryAfterSinkFailure(t *testing.T) {
	f := startWebhook(t, WebhookOptions{})
	f.sink.mu.Lock()
	f.sink.failChanged = func(attempt int, _ []Change) error {
		if attempt == 1 {
			return errSinkDown
		}
		return nil
	}
	f.sink.mu.Unlock()
	r := f.newRequest(payload(t, []ManagedDevice{device(1)}))
	if status, answer := f.send(t, r); status != http.StatusServiceUnavailable {
		t.Fatalf("delivery while the sink fails: status %d (%v), want 503", status, answer)
	}
	if status, answer := f.send(t, r); status != http.StatusAccepted {
		t.Fatalf("retry of the same event: status %d (%v), want 202", status, answer)
	}
	if status, _ := f.send(t, r); status != http.StatusConflict {
		t.Errorf("third delivery of the event: status %d, want 409", status)
	}
	if got := f.sink.calls(); len(got) != 1 || got[0][0].Device.GetMdmDeviceId() != device(1).ID {
		t.Errorf("sink received %v, want the device once", got)
	}
}

func TestWebhookConcurrentDuplicates(t *testing.T) {
	tests := []struct {
		name      string
		failFirst bool
		want      map[int]int // status -> count
	}{
		{"all succeed", false, map[int]int{http.StatusAccepted: 1, http.StatusConflict: 15}},
		{"first delivery fails", true, map[int]int{http.StatusServiceUnavailable: 1, http.StatusAccepted: 1, http.StatusConflict: 14}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := startWebhook(t, WebhookOptions{})
			if tt.failFirst {
				f.sink.mu.Lock()
				f.sink.failChanged = func(attempt int, _ []Change) error {
					if attempt == 1 {
						return errSinkDown
					}
					return nil
				}
				f.sink.mu.Unlock()
			}
			r := f.newRequest(payload(t, []ManagedDevice{device(7)}))
			const n = 16
			start := make(chan struct{})
			statuses := make(chan int, n)
			var wg sync.WaitGroup
			for range n {
				wg.Go(func() {
					<-start
					status, _, err := f.trySend(r)
					if err != nil {
						t.Error(err)
					}
					statuses <- status
				})
			}
			close(start)
			wg.Wait()
			close(statuses)
			got := map[int]int{}
			for s := range statuses {
				got[s]++
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("statuses %v, want %v", got, tt.want)
			}
			if calls := f.sink.calls(); len(calls) != 1 {
				t.Errorf("%d deliveries reached the sink, want exactly 1", len(calls))
			}
		})
	}
}

func TestWebhookNotRunning(t *testing.T) {
	src, err := NewWebhookSource("webhook", WebhookOptions{Secret: testSecret, Logger: slog.New(newLogRecorder())})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(src)
	t.Cleanup(srv.Close)
	post := func() int {
		body := payload(t, []ManagedDevice{device(1)})
		ts := strconv.FormatInt(time.Now().Unix(), 10)
		req, err := http.NewRequest(http.MethodPost, srv.URL, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set(HeaderTimestamp, ts)
		req.Header.Set(HeaderEventID, "evt-1")
		req.Header.Set(HeaderSignature, WebhookSignature(testSecret, ts, "evt-1", body))
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if s := post(); s != http.StatusServiceUnavailable {
		t.Errorf("before Run: status %d, want 503", s)
	}

	ctx, cancel := context.WithCancel(context.Background())
	sink := &recordingSink{}
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, sink) }()
	waitFor(t, "Run to start", func() bool { return src.currentSink() != nil })
	if err := src.Run(ctx, sink); !errors.Is(err, ErrAlreadyRunning) {
		t.Errorf("second Run = %v, want ErrAlreadyRunning", err)
	}
	if s := post(); s != http.StatusAccepted {
		t.Errorf("while running: status %d, want 202", s)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v after the context ended, want nil", err)
	}
	if s := post(); s != http.StatusServiceUnavailable {
		t.Errorf("after Run: status %d, want 503", s)
	}
}

func TestNewWebhookSourceErrors(t *testing.T) {
	tests := []struct {
		name       string
		sourceName string
		secret     []byte
	}{
		{"no secret", "webhook", nil},
		{"short secret", "webhook", []byte("0123456789abcde")},
		{"no name", " ", testSecret},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := NewWebhookSource(tt.sourceName, WebhookOptions{Secret: tt.secret}); !errors.Is(err, ErrConfig) {
				t.Errorf("NewWebhookSource = %v, want ErrConfig", err)
			}
		})
	}
}

// failingStore is a ReplayStore that is down.
type failingStore struct{ calls atomic.Int32 }

func (s *failingStore) Seen(context.Context, string, time.Duration) (bool, error) {
	s.calls.Add(1)
	return false, errors.New("kv unavailable")
}
func (s *failingStore) Forget(context.Context, string) error { return nil }

func TestWebhookReplayStoreDown(t *testing.T) {
	store := &failingStore{}
	f := startWebhook(t, WebhookOptions{Replay: store})
	status, _ := f.send(t, f.newRequest(payload(t, []ManagedDevice{device(1)})))
	if status != http.StatusServiceUnavailable || store.calls.Load() != 1 || f.sink.attemptCount() != 0 {
		t.Errorf("status %d, store calls %d, sink calls %d; want 503, 1, 0", status, store.calls.Load(), f.sink.attemptCount())
	}
}

func TestMemoryReplayStore(t *testing.T) {
	c := &clock{t: time.Unix(1_000_000, 0)}
	s := NewMemoryReplayStore(c.now)
	ctx := context.Background()
	steps := []struct {
		name    string
		advance time.Duration
		forget  bool
		id      string
		want    bool
	}{
		{name: "new id", id: "a", want: false},
		{name: "same id again", id: "a", want: true},
		{name: "other id", id: "b", want: false},
		{name: "just before expiry", advance: 9*time.Minute + 59*time.Second, id: "a", want: true},
		{name: "after expiry", advance: time.Second, id: "a", want: false},
		{name: "forgotten", forget: true, id: "b", want: false},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			c.advance(st.advance)
			if st.forget {
				if err := s.Forget(ctx, st.id); err != nil {
					t.Fatal(err)
				}
			}
			seen, err := s.Seen(ctx, st.id, 10*time.Minute)
			if err != nil || seen != st.want {
				t.Errorf("Seen(%q) = %v, %v; want %v", st.id, seen, err, st.want)
			}
		})
	}
}

// TestWebhookSignatureKnownVector pins the signed string, so a sender
// written from the documentation agrees with easguard byte for byte.
func TestWebhookSignatureKnownVector(t *testing.T) {
	tests := []struct {
		secret, ts, id, body, want string
	}{
		// printf '%s' '1750000000.evt-1.{}' | openssl dgst -sha256 -hmac 0123456789abcdef
		{"0123456789abcdef", "1750000000", "evt-1", "{}", "41f16f6d79b3a16362c4b26a26904069f1928a3136141cda1496c4a1a33e68a3"},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			got := WebhookSignature([]byte(tt.secret), tt.ts, tt.id, []byte(tt.body))
			want := "sha256=" + tt.want
			if got != want {
				t.Errorf("WebhookSignature = %s, want %s", got, want)
			}
		})
	}
}

// TestWebhookSignatureNotHex: a signature that looks right but is not even
// hex is a plain 401, not a 500.
func TestWebhookSignatureNotHex(t *testing.T) {
	f := startWebhook(t, WebhookOptions{})
	r := f.newRequest(payload(t, []ManagedDevice{device(1)}))
	s := "sha256=zz" + strings.Repeat("0", 62)
	r.signature = &s
	if status, _ := f.send(t, r); status != http.StatusUnauthorized {
		t.Errorf("status %d, want 401", status)
	}
}
