package mdm

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// never is a poll interval no test waits for, so what a test sees was
// noticed through file events.
const never = time.Hour

const readFailedMsg = "mdm inventory read failed; keeping the previous inventory"

// startFile writes data to a new file name in a temporary directory and
// runs a FileSource on it until the test ends.
func startFile(tb testing.TB, name string, data []byte, opts FileOptions) (string, *recordingSink, *logRecorder) {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), name)
	if data != nil {
		writeInPlace(tb, path, data)
	}
	if opts.PollInterval == 0 {
		opts.PollInterval = never
	}
	logs := newLogRecorder()
	opts.Logger = slog.New(logs)
	sink := &recordingSink{}
	src := NewFileSource(path, opts)
	src.retryMin = 20 * time.Millisecond
	runSource(tb, src, sink)
	return path, sink, logs
}

func TestFileSourceFirstReadPublishesAll(t *testing.T) {
	ds := devices(3)
	envelope, err := json.Marshal(map[string]any{"@odata.context": "x", "value": ds})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		file   string
		format string
		data   []byte
	}{
		{"JSON array", "inventory.json", "", jsonArray(t, ds)},
		{"Graph envelope", "inventory.json", "auto", envelope},
		{"CSV", "inventory.csv", "", csvOf(ds)},
		{"CSV named by option", "export.txt", "csv", csvOf(ds)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			path, sink, _ := startFile(t, tt.file, tt.data, FileOptions{Format: tt.format})
			got := sink.waitCalls(t, 1)
			if len(got) != len(ds) {
				t.Fatalf("first read published %d changes, want %d", len(got), len(ds))
			}
			for i, c := range got {
				want, err := Normalize("file:"+path, ds[i])
				if err != nil {
					t.Fatal(err)
				}
				if tt.format == "csv" || strings.HasSuffix(tt.file, ".csv") {
					// csvOf writes only some columns.
					want.EmailAddress, want.OsVersion, want.Model, want.Manufacturer, want.DeviceName, want.EasActivated = "", "", "", "", "", false
				}
				if c.Removed || c.PreviousEASDeviceID != "" || !proto.Equal(c.Device, want) {
					t.Errorf("change %d = %+v, want the record %v", i, c, want)
				}
			}
			if a := sink.alertList(); len(a) != 0 {
				t.Errorf("unexpected alerts %+v", a)
			}
		})
	}
}

func TestFileSourcePublishesDifferences(t *testing.T) {
	tests := []struct {
		name  string
		write func(testing.TB, string, []byte)
		edit  func(ds []ManagedDevice) []ManagedDevice
		check func(t *testing.T, got []Change, ds []ManagedDevice)
	}{
		{
			name:  "compliance edited in place",
			write: writeInPlace,
			edit: func(ds []ManagedDevice) []ManagedDevice {
				ds[1].ComplianceState = "noncompliant"
				return ds
			},
			check: func(t *testing.T, got []Change, ds []ManagedDevice) {
				if len(got) != 1 || got[0].Removed || got[0].Device.GetMdmDeviceId() != ds[1].ID ||
					got[0].Device.GetComplianceState() != ev.ComplianceState_COMPLIANCE_STATE_NONCOMPLIANT ||
					got[0].PreviousEASDeviceID != "" {
					t.Errorf("got %+v, want exactly device 2 now noncompliant", got)
				}
			},
		},
		{
			name:  "file replaced by rename",
			write: replaceFile,
			edit: func(ds []ManagedDevice) []ManagedDevice {
				ds[0].ManagementState = "retireIssued"
				return ds
			},
			check: func(t *testing.T, got []Change, ds []ManagedDevice) {
				if len(got) != 1 || got[0].Device.GetMdmDeviceId() != ds[0].ID || !got[0].Device.GetRetired() {
					t.Errorf("got %+v, want exactly device 1 now retired", got)
				}
			},
		},
		{
			name:  "device removed",
			write: replaceFile,
			edit: func(ds []ManagedDevice) []ManagedDevice {
				return slices.Delete(ds, 2, 3)
			},
			check: func(t *testing.T, got []Change, ds []ManagedDevice) {
				gone := device(3)
				if len(got) != 1 || !got[0].Removed || got[0].Device.GetMdmDeviceId() != gone.ID ||
					got[0].Device.GetEasDeviceId() != gone.EASDeviceID {
					t.Errorf("got %+v, want exactly device 3 removed, with its last record", got)
				}
			},
		},
		{
			name:  "EAS id changed",
			write: replaceFile,
			edit: func(ds []ManagedDevice) []ManagedDevice {
				ds[2].EASDeviceID = "NEWEASID0003"
				return ds
			},
			check: func(t *testing.T, got []Change, ds []ManagedDevice) {
				if len(got) != 1 || got[0].Removed || got[0].Device.GetEasDeviceId() != "NEWEASID0003" ||
					got[0].PreviousEASDeviceID != device(3).EASDeviceID {
					t.Errorf("got %+v, want device 3 with PreviousEASDeviceID %q", got, device(3).EASDeviceID)
				}
			},
		},
		{
			name:  "EAS id changed only in case",
			write: replaceFile,
			edit: func(ds []ManagedDevice) []ManagedDevice {
				ds[2].EASDeviceID = strings.ToLower(ds[2].EASDeviceID)
				return ds
			},
			check: func(t *testing.T, got []Change, ds []ManagedDevice) {
				if len(got) != 1 || got[0].PreviousEASDeviceID != "" {
					t.Errorf("got %+v, want one change without PreviousEASDeviceID (Exchange ids compare case-insensitively)", got)
				}
			},
		},
		{
			name:  "device added",
			write: replaceFile,
			edit: func(ds []ManagedDevice) []ManagedDevice {
				return append(ds, device(4))
			},
			check: func(t *testing.T, got []Change, ds []ManagedDevice) {
				if len(got) != 1 || got[0].Removed || got[0].Device.GetMdmDeviceId() != device(4).ID {
					t.Errorf("got %+v, want exactly device 4 added", got)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ds := devices(3)
			path, sink, _ := startFile(t, "inventory.json", jsonArray(t, ds), FileOptions{})
			sink.waitCalls(t, 1)
			next := tt.edit(devices(3))
			tt.write(t, path, jsonArray(t, next))
			tt.check(t, sink.waitCalls(t, 2), next)

			// Nothing else was published in between: the next edit is
			// the next call, alone.
			marker := append(next, device(99))
			replaceFile(t, path, jsonArray(t, marker))
			if got := changeIDs(sink.waitCalls(t, 3)); !slices.Equal(got, []string{device(99).ID}) {
				t.Errorf("after the edit, the next call was %v, want only the marker device", got)
			}
			if a := sink.alertList(); len(a) != 0 {
				t.Errorf("unexpected alerts %+v", a)
			}
		})
	}
}

func TestFileSourceFailedReadPublishesNothing(t *testing.T) {
	good := jsonArray(t, devices(3))
	tests := []struct {
		name   string
		break_ func(tb testing.TB, path string)
		// repeatable: doing it again is a new file event with the same
		// failure (a file cannot be deleted twice).
		repeatable bool
		wantIn     string
	}{
		{"truncated write", func(tb testing.TB, path string) { writeInPlace(tb, path, good[:len(good)/2]) }, true, "unexpected EOF"},
		{"garbage", func(tb testing.TB, path string) {
			replaceFile(tb, path, []byte("<html>503 Service Unavailable</html>"))
		}, true, "expected an array"},
		{"emptied file", func(tb testing.TB, path string) { writeInPlace(tb, path, nil) }, true, "empty"},
		{"bad record", func(tb testing.TB, path string) {
			ds := devices(3)
			ds[1].EASDeviceID = strings.Repeat("X", 40)
			replaceFile(tb, path, jsonArray(tb, ds))
		}, true, "easDeviceId"},
		{"file deleted", func(tb testing.TB, path string) {
			if err := os.Remove(path); err != nil {
				tb.Fatal(err)
			}
		}, false, "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			path, sink, logs := startFile(t, "inventory.json", good, FileOptions{})
			sink.waitCalls(t, 1)

			tt.break_(t, path)
			a := sink.waitAlerts(t, 1)
			if a.kind != ev.AlertKind_ALERT_KIND_MDM_UNREACHABLE || !strings.Contains(a.summary, path) ||
				!strings.Contains(a.summary, tt.wantIn) {
				t.Errorf("alert %+v, want MDM_UNREACHABLE naming %s and %q", a, path, tt.wantIn)
			}

			if tt.repeatable {
				// The same failure again is read (and logged) but not
				// alerted again.
				reads := logs.count(readFailedMsg)
				tt.break_(t, path)
				waitFor(t, "the repeated failure to be read", func() bool { return logs.count(readFailedMsg) > reads })
				if n := len(sink.alertList()); n != 1 {
					t.Errorf("%d alerts for one persisting failure, want 1: %+v", n, sink.alertList())
				}
			}
			if n := len(sink.calls()); n != 1 {
				t.Errorf("a failed read published: %d Changed calls, want only the first read's", n)
			}

			// A fixed file publishes only the real difference.
			ds := devices(3)
			ds[0].ComplianceState = "noncompliant"
			replaceFile(t, path, jsonArray(t, ds))
			if got := changeIDs(sink.waitCalls(t, 2)); !slices.Equal(got, []string{ds[0].ID}) {
				t.Errorf("after the fix, published %v, want only %s", got, ds[0].ID)
			}
			if n := len(sink.alertList()); n != 1 {
				t.Errorf("%d alerts in all, want 1: %+v", n, sink.alertList())
			}

			// A failure after recovery is a new incident and alerts again.
			tt.break_(t, path)
			sink.waitAlerts(t, 2)
		})
	}
}

// A poll of an export that has not changed is reported as a good read
// but neither parsed nor compared again; a change, a failure and the
// return to the delivered content are each still seen by the poll.
func TestFileSourceSkipsAnUnchangedInventory(t *testing.T) {
	good := jsonArray(t, devices(3))
	path, sink, logs := startFile(t, "inventory.json", good, FileOptions{PollInterval: 20 * time.Millisecond})
	sink.waitCalls(t, 1)
	waitFor(t, "three polls of the unchanged file", func() bool { return logs.count(unchangedMsg) >= 3 })
	if n := sink.readOKCount(); n < 4 {
		t.Errorf("%d good reads reported after the first read and three unchanged polls, want at least 4", n)
	}

	// A change is parsed and delivered.
	ds := devices(3)
	ds[1].ComplianceState = "noncompliant"
	changed := jsonArray(t, ds)
	writeInPlace(t, path, changed)
	if got := changeIDs(sink.waitCalls(t, 2)); !slices.Equal(got, []string{ds[1].ID}) {
		t.Errorf("after the edit, published %v, want only %s", got, ds[1].ID)
	}
	skipped := logs.count(unchangedMsg)
	waitFor(t, "a poll of the edited file", func() bool { return logs.count(unchangedMsg) > skipped })

	// A broken file alerts; the delivered content back is a good read
	// without a parse; the same breakage then alerts again.
	garbage := []byte("<html>503 Service Unavailable</html>")
	replaceFile(t, path, garbage)
	sink.waitAlerts(t, 1)
	replaceFile(t, path, changed)
	skipped, oks := logs.count(unchangedMsg), sink.readOKCount()
	waitFor(t, "the delivered content read again", func() bool {
		return logs.count(unchangedMsg) > skipped && sink.readOKCount() > oks
	})
	replaceFile(t, path, garbage)
	sink.waitAlerts(t, 2)
	if n := len(sink.calls()); n != 2 {
		t.Errorf("%d Changed calls, want 2 (the first read and the edit): %+v", n, sink.calls())
	}
}

func TestFileSourceMissingAtStart(t *testing.T) {
	path, sink, _ := startFile(t, "later.csv", nil, FileOptions{})
	a := sink.waitAlerts(t, 1)
	if a.kind != ev.AlertKind_ALERT_KIND_MDM_UNREACHABLE || !strings.Contains(a.summary, path) {
		t.Errorf("alert %+v, want MDM_UNREACHABLE naming %s", a, path)
	}
	replaceFile(t, path, csvOf(devices(2)))
	if got := sink.waitCalls(t, 1); len(got) != 2 {
		t.Errorf("once the file appeared, published %d changes, want 2", len(got))
	}
}

func TestFileSourceWithholdsImplausibleRemovals(t *testing.T) {
	tests := []struct {
		name        string
		share       float64
		known, keep int
		wantRemoved int
		wantKind    ev.AlertKind // unspecified: removals published, no alert
	}{
		{"empty inventory after 20", 0, 20, 0, 0, ev.AlertKind_ALERT_KIND_MDM_INVENTORY_EMPTY},
		{"75% removed of 20", 0, 20, 5, 0, ev.AlertKind_ALERT_KIND_MDM_UNREACHABLE},
		{"40% removed of 20", 0, 20, 12, 8, ev.AlertKind_ALERT_KIND_UNSPECIFIED},
		{"exactly half removed", 0, 20, 10, 10, ev.AlertKind_ALERT_KIND_UNSPECIFIED},
		{"80% of only 5 known", 0, 5, 1, 4, ev.AlertKind_ALERT_KIND_UNSPECIFIED},
		{"empty after 3 known", 0, 3, 0, 0, ev.AlertKind_ALERT_KIND_MDM_INVENTORY_EMPTY},
		{"75% with share 0.9", 0.9, 20, 5, 15, ev.AlertKind_ALERT_KIND_UNSPECIFIED},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			path, sink, _ := startFile(t, "inventory.json", jsonArray(t, devices(tt.known)), FileOptions{MassRemovalShare: tt.share})
			sink.waitCalls(t, 1)

			// Keep the first tt.keep devices, one of them changed, and
			// add one: additions and changes are published either way.
			next := devices(tt.known)[:tt.keep]
			if tt.keep > 0 {
				next[0].ComplianceState = "noncompliant"
			}
			if tt.keep > 0 {
				next = append(next, device(100))
			}
			replaceFile(t, path, jsonArray(t, next))

			if tt.wantKind != ev.AlertKind_ALERT_KIND_UNSPECIFIED {
				a := sink.waitAlerts(t, 1)
				if a.kind != tt.wantKind || a.detail["would_remove"] == "" {
					t.Errorf("alert %+v, want %v with would_remove", a, tt.wantKind)
				}
				wantWould := tt.known - tt.keep
				if a.detail["would_remove"] != strconv.Itoa(wantWould) || !strings.Contains(a.summary, strconv.Itoa(wantWould)) {
					t.Errorf("alert %+v does not say %d would be removed", a, wantWould)
				}
			}
			var got []Change
			if tt.keep > 0 {
				got = sink.waitCalls(t, 2)
			}
			removed := 0
			for _, c := range got {
				if c.Removed {
					removed++
				}
			}
			if removed != tt.wantRemoved {
				t.Errorf("published %d removals, want %d", removed, tt.wantRemoved)
			}
			if tt.keep > 0 && len(got)-removed != 2 {
				t.Errorf("published %d additions/changes, want 2 (the changed and the new device)", len(got)-removed)
			}

			// Withheld devices stay known: bringing the full inventory
			// back publishes only what really differs from before.
			if tt.wantKind == ev.AlertKind_ALERT_KIND_UNSPECIFIED {
				if a := sink.alertList(); len(a) != 0 {
					t.Errorf("unexpected alerts %+v", a)
				}
				return
			}
			full := append(devices(tt.known), device(200))
			replaceFile(t, path, jsonArray(t, full))
			n := 3
			if tt.keep == 0 {
				n = 2
			}
			want := []string{device(200).ID}
			if tt.keep > 0 {
				want = []string{device(1).ID, device(100).ID, device(200).ID}
				want[1] = "-" + device(100).ID
				slices.Sort(want)
			}
			if got := changeIDs(sink.waitCalls(t, n)); !slices.Equal(got, want) {
				t.Errorf("restoring the inventory published %v, want %v", got, want)
			}
			if a := sink.alertList(); len(a) != 1 {
				t.Errorf("%d alerts, want 1: %+v", len(a), a)
			}
		})
	}
}

func TestFileSourceSinkFailureReoffersTheDifference(t *testing.T) {
	ds := devices(5)
	path, sink, _ := startFile(t, "inventory.json", jsonArray(t, ds), FileOptions{})
	var failed []Change
	sink.mu.Lock()
	sink.failChanged = func(attempt int, changes []Change) error {
		if attempt == 2 { // the first read succeeds, the edit fails once
			failed = append([]Change(nil), changes...)
			return errSinkDown
		}
		return nil
	}
	sink.mu.Unlock()
	sink.waitCalls(t, 1)

	ds[0].ComplianceState = "noncompliant"
	ds[2].EASDeviceID = "CHANGEDEAS"
	ds = slices.Delete(ds, 4, 5)
	replaceFile(t, path, jsonArray(t, ds))

	got := sink.waitCalls(t, 2)
	if sink.attemptCount() < 3 {
		t.Fatalf("%d attempts: the failing call did not happen", sink.attemptCount())
	}
	sink.mu.Lock()
	offered := failed
	sink.mu.Unlock()
	if len(got) != 3 || len(offered) != len(got) {
		t.Fatalf("re-offered %v after the failure of %v, want the same 3 changes", changeIDs(got), changeIDs(offered))
	}
	for i := range got {
		if got[i].Removed != offered[i].Removed || got[i].PreviousEASDeviceID != offered[i].PreviousEASDeviceID ||
			!proto.Equal(got[i].Device, offered[i].Device) {
			t.Errorf("change %d re-offered as %+v, first offered as %+v", i, got[i], offered[i])
		}
	}
	if got[1].PreviousEASDeviceID != device(3).EASDeviceID {
		t.Errorf("re-offered EAS change lost its previous id: %+v", got[1])
	}

	// Once delivered, the difference is not offered again.
	marker := append(ds, device(50))
	replaceFile(t, path, jsonArray(t, marker))
	if got := changeIDs(sink.waitCalls(t, 3)); !slices.Equal(got, []string{device(50).ID}) {
		t.Errorf("next call %v, want only the marker", got)
	}
}

func TestFileSourceRecoversDeletedDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "exports")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "inventory.json")
	writeInPlace(t, path, jsonArray(t, devices(2)))
	sink := &recordingSink{}
	runSource(t, NewFileSource(path, FileOptions{PollInterval: 50 * time.Millisecond, Logger: slog.New(newLogRecorder())}), sink)
	sink.waitCalls(t, 1)

	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	sink.waitAlerts(t, 1)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	ds := devices(2)
	ds[1].ComplianceState = "error"
	replaceFile(t, path, jsonArray(t, ds))
	if got := changeIDs(sink.waitCalls(t, 2)); !slices.Equal(got, []string{ds[1].ID}) {
		t.Errorf("after the directory came back, published %v, want only %s", got, ds[1].ID)
	}
}

func TestFileSourceRunErrors(t *testing.T) {
	tests := []struct {
		name   string
		path   string
		format string
		sink   Sink
		want   error
	}{
		{"nil sink", "x.json", "", nil, ErrConfig},
		{"unknown extension", "x.xml", "auto", &recordingSink{}, ErrConfig},
		{"unknown format", "x.json", "yaml", &recordingSink{}, ErrConfig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := NewFileSource(filepath.Join(t.TempDir(), tt.path), FileOptions{Format: tt.format})
			if err := src.Run(context.Background(), tt.sink); !errors.Is(err, tt.want) {
				t.Errorf("Run = %v, want %v", err, tt.want)
			}
		})
	}

	t.Run("second concurrent Run", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "x.json")
		writeInPlace(t, path, []byte("[]"))
		src := NewFileSource(path, FileOptions{PollInterval: never, Logger: slog.New(newLogRecorder())})
		sink := &recordingSink{}
		runSource(t, src, sink)
		sink.waitAlerts(t, 1) // the empty inventory: Run is under way
		if err := src.Run(context.Background(), sink); !errors.Is(err, ErrAlreadyRunning) {
			t.Errorf("second Run = %v, want ErrAlreadyRunning", err)
		}
	})
}

// BenchmarkFilePollUnchanged100k measures one poll of an export of
// 100,000 devices that has not changed since it was delivered: "parsed"
// as every poll did before the content's hash was kept (parse, normalise,
// compare with what was delivered), "hashed" as a poll does now. Each
// sub-benchmark delivers the file once before the timer starts.
func BenchmarkFilePollUnchanged100k(b *testing.B) {
	path := filepath.Join(b.TempDir(), "inventory.json")
	writeInPlace(b, path, jsonArray(b, devices(100_000)))
	for _, tc := range []struct {
		name  string
		parse bool
	}{{"parsed", true}, {"hashed", false}} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			log := slog.New(slog.DiscardHandler)
			sink := &recordingSink{}
			fr := &fileRun{path: path, source: "file:" + path, format: FormatJSON, log: log,
				rec: newReconciler("file", "file:"+path, 0, sink, log)}
			if fr.read(ctx) || len(sink.calls()) != 1 {
				b.Fatalf("first read: %d deliveries, want 1", len(sink.calls()))
			}
			oks := sink.readOKCount()
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if tc.parse {
					fr.applied = [32]byte{}
				}
				if fr.read(ctx) {
					b.Fatal("an unchanged read asked to be retried")
				}
			}
			b.StopTimer()
			if n := len(sink.calls()); n != 1 {
				b.Fatalf("%d deliveries of an unchanged file, want the first only", n)
			}
			if got := sink.readOKCount() - oks; got != b.N {
				b.Fatalf("%d good reads reported for %d polls", got, b.N)
			}
		})
	}
}
