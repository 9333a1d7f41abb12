package mdm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// waitTimeout bounds every wait in these tests; the race detector on a
// two-core machine is slow, the conditions normally hold within a second.
const waitTimeout = 15 * time.Second

// waitFor polls cond until it holds or the deadline passes.
func waitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			tb.Fatalf("timed out after %s waiting for %s", waitTimeout, what)
		case <-tick.C:
		}
	}
}

type alertCall struct {
	kind    ev.AlertKind
	summary string
	detail  map[string]string
}

// recordingSink records what a source delivers. failChanged, when set,
// decides per attempt (1-based) whether Changed fails.
type recordingSink struct {
	mu          sync.Mutex
	attempts    int
	changed     [][]Change // successful calls only
	alerts      []alertCall
	readOKs     int
	failChanged func(attempt int, changes []Change) error
}

// ReadOK counts the complete reads the source reports (ReadReporter).
func (s *recordingSink) ReadOK(context.Context, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.readOKs++
}

func (s *recordingSink) readOKCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.readOKs
}

var errSinkDown = errors.New("sink down")

func (s *recordingSink) Changed(_ context.Context, changes []Change) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.attempts++
	if s.failChanged != nil {
		if err := s.failChanged(s.attempts, changes); err != nil {
			return err
		}
	}
	s.changed = append(s.changed, append([]Change(nil), changes...))
	return nil
}

func (s *recordingSink) Alert(_ context.Context, kind ev.AlertKind, summary string, detail map[string]string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := make(map[string]string, len(detail))
	for k, v := range detail {
		d[k] = v
	}
	s.alerts = append(s.alerts, alertCall{kind: kind, summary: summary, detail: d})
	return nil
}

func (s *recordingSink) calls() [][]Change {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([][]Change(nil), s.changed...)
}

func (s *recordingSink) attemptCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.attempts
}

func (s *recordingSink) alertList() []alertCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]alertCall(nil), s.alerts...)
}

// waitCalls waits until n successful Changed calls were recorded and
// returns call n (1-based).
func (s *recordingSink) waitCalls(tb testing.TB, n int) []Change {
	tb.Helper()
	waitFor(tb, fmt.Sprintf("%d Changed calls", n), func() bool { return len(s.calls()) >= n })
	return s.calls()[n-1]
}

func (s *recordingSink) waitAlerts(tb testing.TB, n int) alertCall {
	tb.Helper()
	waitFor(tb, fmt.Sprintf("%d alerts", n), func() bool { return len(s.alertList()) >= n })
	return s.alertList()[n-1]
}

// logRecorder is a slog.Handler that counts records by message, so a test
// can tell that a read happened even when it published nothing.
type logRecorder struct {
	mu   sync.Mutex
	msgs map[string]int
}

func newLogRecorder() *logRecorder { return &logRecorder{msgs: map[string]int{}} }

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.msgs[r.Message]++
	return nil
}
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecorder) WithGroup(string) slog.Handler      { return l }

func (l *logRecorder) count(msg string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.msgs[msg]
}

// runSource runs src until the test ends and checks that Run then returns nil.
func runSource(tb testing.TB, src Source, sink Sink) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, sink) }()
	tb.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				tb.Errorf("%s: Run returned %v after the context ended", src.Name(), err)
			}
		case <-time.After(waitTimeout):
			tb.Errorf("%s: Run did not return after the context ended", src.Name())
		}
	})
}

// device returns a plausible managed iPhone record number i.
func device(i int) ManagedDevice {
	return ManagedDevice{
		ID:                fmt.Sprintf("0d1c%04d-aaaa-bbbb-cccc-000000000000", i),
		UserPrincipalName: fmt.Sprintf("user%d@contoso.com", i),
		EmailAddress:      fmt.Sprintf("user%d@contoso.com", i),
		EASDeviceID:       fmt.Sprintf("ApplF17XK%04dABCD", i),
		EASActivated:      true,
		ComplianceState:   "compliant",
		ManagementState:   "managed",
		OperatingSystem:   "iOS",
		OSVersion:         "17.4.1",
		Model:             "iPhone 15",
		Manufacturer:      "Apple",
		DeviceName:        fmt.Sprintf("iPhone of user %d", i),
		LastSyncDateTime:  "2025-01-02T03:04:05.1234567Z",
	}
}

func devices(n int) []ManagedDevice {
	out := make([]ManagedDevice, n)
	for i := range out {
		out[i] = device(i + 1)
	}
	return out
}

func jsonArray(tb testing.TB, ds []ManagedDevice) []byte {
	tb.Helper()
	b, err := json.MarshalIndent(ds, "", "  ")
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func csvOf(ds []ManagedDevice) []byte {
	var b strings.Builder
	b.WriteString("id,userPrincipalName,easDeviceId,complianceState,managementState,operatingSystem,lastSyncDateTime\n")
	for _, d := range ds {
		fmt.Fprintf(&b, "%s,%s,%s,%s,%s,%s,%s\n", d.ID, d.UserPrincipalName, d.EASDeviceID,
			d.ComplianceState, d.ManagementState, d.OperatingSystem, d.LastSyncDateTime)
	}
	return []byte(b.String())
}

// writeInPlace rewrites path in place, as a naive exporter or an editor
// without safe-write does.
func writeInPlace(tb testing.TB, path string, data []byte) {
	tb.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		tb.Fatal(err)
	}
}

// replaceFile writes a temporary file next to path and renames it over
// path, as careful exporters and editors do.
func replaceFile(tb testing.TB, path string, data []byte) {
	tb.Helper()
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		tb.Fatal(err)
	}
}

// changeIDs summarises changes as sorted "id" / "-id" (removed) strings.
func changeIDs(cs []Change) []string {
	out := make([]string, 0, len(cs))
	for _, c := range cs {
		id := c.Device.GetMdmDeviceId()
		if c.Removed {
			id = "-" + id
		}
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}
