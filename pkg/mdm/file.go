package mdm

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
)

const (
	// DefaultPollInterval is FileOptions.PollInterval when unset: short
	// enough that a change on a share without file events is seen within
	// half a minute, long enough that re-reading a large export is cheap.
	DefaultPollInterval = 30 * time.Second
	// fileDebounce is how long the file must be quiet after an event before
	// it is read: exporters write in several steps, and one read of the
	// finished file beats several of half-written ones.
	fileDebounce = 200 * time.Millisecond
	// fileRetryMin is the first delay before re-reading after the sink
	// failed; it doubles up to the poll interval.
	fileRetryMin = time.Second
)

// FileOptions configures a FileSource. The zero value is usable.
type FileOptions struct {
	// Format is "auto" (or empty: by the extension, .json or .csv), "json"
	// or "csv".
	Format string
	// MassRemovalShare (default 0.5): a read that would remove more than
	// this share of the known devices, with at least 10 known, publishes no
	// removals and raises an alert instead, because a truncated export must
	// not retire half the company. A value of 1 or more never withholds
	// (except for an empty inventory, which always does).
	MassRemovalShare float64
	// PollInterval (default 30s) re-reads the file even without file
	// events, for file systems that do not deliver them (network shares)
	// and to recover a lost directory watch.
	PollInterval time.Duration
	// Logger receives what operators may want to read besides alerts;
	// default slog.Default().
	Logger *slog.Logger
	// Store keeps what the source last delivered beyond this process
	// (default: memory only). With a store, a device dropped from the
	// inventory while easguard was down is reported removed at the first
	// read after it starts; without one it never is.
	Store InventoryStore
}

// FileSource is an MDM source that reads an inventory export (JSON or CSV
// of Graph's managedDevice fields) and re-reads it whenever it changes.
//
// JSON is an array of managedDevice objects or Graph's envelope
// {"value": [...]}; CSV is a header row naming managedDevice fields
// (case-insensitive, unknown columns ignored, id required) and one device
// per row.
//
// It watches the file's directory rather than the file, because editors and
// exporters replace a file by renaming a new one over it, which ends a watch
// on the file itself. Events are debounced and every read is compared with
// the previous one, so only real differences are published; a read of the
// content last delivered (most polls) is recognised by its hash and not
// parsed at all. Writers should
// replace the file atomically (write a temporary file, then rename it over
// the inventory): a file rewritten in place can be read half-written, and a
// CSV cut at a line boundary is a valid, shorter inventory.
//
// A read that fails publishes nothing and keeps the previous inventory
// (alerting ALERT_KIND_MDM_UNREACHABLE once per distinct failure); an empty
// or mass-removing read publishes additions and changes but withholds
// removals, with an alert. What was delivered is kept in FileOptions.Store:
// after a restart the first read is compared with it, so records removed
// while easguard was down are announced as removed (under the same
// safety rules), and unchanged records are not published again. Without a
// store the inventory lives in memory only, and a restart forgets it.
type FileSource struct {
	path     string
	opts     FileOptions
	running  atomic.Bool
	debounce time.Duration
	retryMin time.Duration
}

// NewFileSource returns a source reading the inventory at path. Nothing is
// checked until Run, so a file that does not exist yet is not an error.
func NewFileSource(path string, opts FileOptions) *FileSource {
	if opts.PollInterval <= 0 {
		opts.PollInterval = DefaultPollInterval
	}
	return &FileSource{path: path, opts: opts, debounce: fileDebounce, retryMin: fileRetryMin}
}

// Name is "file:" and the path as configured; it becomes MDMDevice.source.
func (f *FileSource) Name() string { return "file:" + f.path }

// format resolves FormatAuto by the file's extension.
func (f *FileSource) format() (string, error) {
	switch strings.ToLower(strings.TrimSpace(f.opts.Format)) {
	case "", FormatAuto:
		switch strings.ToLower(filepath.Ext(f.path)) {
		case ".json":
			return FormatJSON, nil
		case ".csv":
			return FormatCSV, nil
		}
		return "", fmt.Errorf("file source %q: %w: cannot tell the format from the extension %q; set the format to json or csv",
			f.path, ErrConfig, filepath.Ext(f.path))
	case FormatJSON:
		return FormatJSON, nil
	case FormatCSV:
		return FormatCSV, nil
	}
	return "", fmt.Errorf("file source %q: %w: unknown format %q (auto, json or csv)", f.path, ErrConfig, f.opts.Format)
}

// Run reads the inventory, publishes every record (with a Store: every
// difference to what the store holds), and then publishes what changes
// until ctx ends. It returns nil when ctx ends, and an error only
// for a nil sink, an unusable format or a second concurrent Run.
func (f *FileSource) Run(ctx context.Context, sink Sink) error {
	if sink == nil {
		return fmt.Errorf("run %s: %w: nil sink", f.Name(), ErrConfig)
	}
	format, err := f.format()
	if err != nil {
		return fmt.Errorf("run %s: %w", f.Name(), err)
	}
	abs, err := filepath.Abs(f.path)
	if err != nil {
		return fmt.Errorf("run %s: %w: %w", f.Name(), ErrConfig, err)
	}
	if !f.running.CompareAndSwap(false, true) {
		return fmt.Errorf("run %s: %w", f.Name(), ErrAlreadyRunning)
	}
	defer f.running.Store(false)

	log := logger(f.opts.Logger).With("source", f.Name())
	fr := &fileRun{
		path:   abs,
		source: f.Name(),
		format: format,
		log:    log,
		rec:    newReconciler(fmt.Sprintf("file %q", f.path), f.Name(), f.opts.MassRemovalShare, sink, log),
	}
	fr.rec.store = f.opts.Store
	return fr.loop(ctx, f.debounce, f.retryMin, f.opts.PollInterval)
}

// fileRun is the state of one Run.
type fileRun struct {
	path, source, format string
	log                  *slog.Logger
	rec                  *reconciler
	// last describes the file as of the last read attempt, nil if it
	// could not be opened; it lets events about other names in the
	// directory (such as a symlink swap) be checked cheaply.
	last os.FileInfo
	// applied is the SHA-256 of the content last parsed and delivered in
	// full, zero before that and after a delivery failed. A read of the
	// same content (every poll of an export that has not changed) is not
	// parsed or compared again: for 100,000 devices that is seconds of
	// CPU and a second inventory's worth of memory every poll interval.
	// The content, not the size and modification time, decides, because
	// a share may keep both across a rewrite.
	applied [sha256.Size]byte
}

func (fr *fileRun) loop(ctx context.Context, debounceFor, retryMin, pollEvery time.Duration) error {
	dir := filepath.Dir(fr.path)
	var (
		w        *fsnotify.Watcher
		events   <-chan fsnotify.Event
		werrs    <-chan error
		watching bool
	)
	if nw, err := fsnotify.NewWatcher(); err != nil {
		fr.log.WarnContext(ctx, "file events unavailable; polling only", "poll_interval", pollEvery, "error", err)
	} else {
		w = nw
		defer w.Close()
		events, werrs = w.Events, w.Errors
	}
	watch := func() {
		if w == nil || watching {
			return
		}
		if err := w.Add(dir); err != nil {
			fr.log.WarnContext(ctx, "cannot watch the inventory's directory; polling until it can", "dir", dir, "error", err)
			return
		}
		watching = true
	}

	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	defer debounce.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	poll := time.NewTicker(pollEvery)
	defer poll.Stop()

	var retryDelay time.Duration
	read := func(force bool) {
		watch()
		if !force && fr.unchanged() {
			return
		}
		if !fr.read(ctx) {
			retryDelay = 0
			retry.Stop()
			return
		}
		retryDelay = min(max(2*retryDelay, retryMin), pollEvery)
		retry.Reset(retryDelay)
	}

	read(true)
	ours := false // an event named the file itself since the last read
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			switch {
			case e.Name == fr.path:
				ours = true
			case e.Name == dir && e.Has(fsnotify.Remove|fsnotify.Rename):
				// The directory itself went away or moved: the watch is
				// useless now; the poll re-establishes it.
				_ = w.Remove(dir)
				watching = false
				ours = true
			}
			debounce.Reset(debounceFor)
		case err, ok := <-werrs:
			if !ok {
				werrs = nil
				continue
			}
			// Typically an event queue overflow: events were lost.
			fr.log.WarnContext(ctx, "file watch error; re-reading", "error", err)
			ours = true
			debounce.Reset(debounceFor)
		case <-debounce.C:
			force := ours
			ours = false
			read(force)
		case <-poll.C:
			read(true)
		case <-retry.C:
			read(true)
		}
	}
}

// unchanged reports whether the file is still the one last read, by
// identity, size and modification time.
func (fr *fileRun) unchanged() bool {
	cur, err := os.Stat(fr.path)
	if err != nil || fr.last == nil {
		return err != nil && fr.last == nil
	}
	return os.SameFile(fr.last, cur) && cur.Size() == fr.last.Size() && cur.ModTime().Equal(fr.last.ModTime())
}

// read reads, parses and reconciles the file once. It reports true when the
// sink failed and the same difference must be offered again soon.
func (fr *fileRun) read(ctx context.Context) (retry bool) {
	inv, sum, err := fr.load(ctx)
	if err != nil {
		fr.rec.failed(ctx, err)
		return false
	}
	if inv == nil {
		return false // the content last delivered, reported again
	}
	fr.applied = [sha256.Size]byte{}
	if err := fr.rec.apply(ctx, inv, false); err != nil {
		fr.log.WarnContext(ctx, "mdm changes not delivered; will offer them again", "error", err)
		return true
	}
	fr.applied = sum
	return false
}

// unchangedMsg is logged (at debug) for a read of the content last
// delivered, which is neither parsed nor compared again.
const unchangedMsg = "mdm inventory unchanged since it was last delivered; not parsed again"

// load reads the file. It returns a nil inventory, and no error, when the
// file holds what was last delivered in full and the reconciler can
// report that read again without comparing it (fileRun.applied); the
// file is then read once, to hash it, and not parsed.
func (fr *fileRun) load(ctx context.Context) (*inventory, [sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	fh, err := os.Open(fr.path)
	if err != nil {
		fr.last = nil
		return nil, sum, fmt.Errorf("read inventory: %w", err)
	}
	defer fh.Close()
	info, err := fh.Stat()
	if err != nil {
		fr.last = nil
		return nil, sum, fmt.Errorf("read inventory: %w", err)
	}
	fr.last = info
	h := sha256.New()
	if _, err := io.Copy(h, fh); err != nil {
		return nil, sum, fmt.Errorf("read inventory %s: %w", fr.path, err)
	}
	h.Sum(sum[:0])
	if sum == fr.applied && fr.rec.repeat(ctx) {
		fr.log.DebugContext(ctx, unchangedMsg)
		return nil, sum, nil
	}
	if _, err := fh.Seek(0, io.SeekStart); err != nil {
		return nil, sum, fmt.Errorf("read inventory %s: %w", fr.path, err)
	}
	inv, err := parseInventory(fr.source, fr.format, fh)
	if err != nil {
		return nil, sum, fmt.Errorf("read inventory %s: %w", fr.path, err)
	}
	return inv, sum, nil
}
