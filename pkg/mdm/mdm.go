// Package mdm reads what an MDM knows about devices and hands it to easguard
// as changes of normalised device records.
//
// Every source speaks the same model so the matcher never learns where a
// record came from: a source turns the MDM's records into Graph's
// managedDevice shape (ManagedDevice), Normalize turns that into an
// ev.MDMDevice, and the source reports what is new, changed or gone to a
// Sink. Sources that read a whole inventory at a time (the file source here,
// and a Microsoft Graph poller of /deviceManagement/managedDevices) share one
// reconciler that computes the difference to the previous read and refuses to
// publish implausible removals, because an MDM outage that looks like "every
// device was retired" must never block a company's mail. Sources that are
// told about individual changes (the webhook) publish them as they arrive.
//
// Several replicas of easguard's mdm worker may run at once. An inventory
// source runs under a lease (Singleton), so one replica reads the MDM and
// the others stand by, and keeps what it delivered in an InventoryStore
// (KVInventoryStore, in JetStream), so that the replica that takes over, or
// the same one after a restart, compares the MDM with what easguard was
// last told: a device removed while no source ran is still reported
// removed. The webhook runs on every replica; its ReplayStore
// (KVReplayStore) is shared by them and survives restarts.
package mdm

import (
	"context"
	"errors"
	"log/slog"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Sentinel errors; callers branch on them with errors.Is.
var (
	// ErrInvalidRecord is wrapped by every error about one device record
	// (see RecordError): retrying the same input will never succeed.
	ErrInvalidRecord = errors.New("mdm: invalid device record")
	// ErrInvalidInventory is wrapped when an inventory as a whole cannot be
	// used (unparsable, a missing column, a duplicate id), so a reader
	// keeps its previous view instead of concluding that devices vanished.
	ErrInvalidInventory = errors.New("mdm: invalid inventory")
	// ErrConfig is wrapped when a source is configured so that it can never
	// work; Run returns it at once rather than retrying forever.
	ErrConfig = errors.New("mdm: invalid source configuration")
	// ErrAlreadyRunning is returned by Run when the source is already
	// running: two loops would publish every change twice.
	ErrAlreadyRunning = errors.New("mdm: source already running")
)

// Change is one device record that is new, changed, or removed at the source.
type Change struct {
	// Device is the record as the source now has it; for a removal, the
	// last record the source knew (or only its source and id when the
	// source never saw more), so the matcher can release its EAS id.
	Device *ev.MDMDevice
	// Removed says the record is gone from the source.
	Removed bool
	// PreviousEASDeviceID is set when the record's EAS device id changed
	// since the last read, so the matcher can re-match the partnership that
	// lost its MDM record. Only sources that remember the previous record
	// (inventory readers) can set it.
	PreviousEASDeviceID string
}

// Sink receives what a source observes. easguard's implementation publishes
// mdm.changed events and alerts; it is a separate interface so sources can
// be tested, and reused, without a message bus.
type Sink interface {
	// Changed delivers a batch of changes. An error means none of them
	// may be assumed delivered: the source offers the same changes again.
	Changed(ctx context.Context, changes []Change) error
	// Alert tells operators about something a human must look at.
	Alert(ctx context.Context, kind ev.AlertKind, summary string, detail map[string]string) error
}

// ReadReporter is implemented by a Sink that wants to know of every
// complete, usable read, changes or not: status pages show when the MDM
// was last read successfully, and that an outage has ended.
type ReadReporter interface {
	ReadOK(ctx context.Context, devices int)
}

// Source is an MDM source. Run blocks until ctx ends and then returns nil; it
// survives transient failures (a file being rewritten, a bad webhook
// request) without returning, and returns an error only for a configuration
// that can never work (wrapping ErrConfig) or a second concurrent Run
// (ErrAlreadyRunning).
type Source interface {
	// Name identifies the source instance; it becomes MDMDevice.source.
	Name() string
	// Run delivers changes to sink until ctx ends.
	Run(ctx context.Context, sink Sink) error
}

// logger returns l, or the process default when the caller set none.
func logger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.Default()
	}
	return l
}
