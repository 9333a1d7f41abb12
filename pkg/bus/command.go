package bus

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// ErrBadCommand is returned by CommandOutbound for a command that could
// never be carried out, so the console can tell the operator at once
// instead of leaving it to be dead-lettered.
var ErrBadCommand = errors.New("invalid device command")

// CommandRepeatWindow is how close together the same operator's same
// command for the same partnership must come to be one command: the
// command's id is derived from its request time cut down to this window,
// and the stream drops a message id it has seen (within DuplicateWindow).
// A double click in the console is thus one removal, one wipe, one rejudge;
// the console learns of the repeat from the PubAck's Duplicate.
const CommandRepeatWindow = time.Minute

// The audit actions of device commands (AuditEvent.action).
const (
	// AuditDeviceRemove records a partnership removed (or refused) on an operator's command.
	AuditDeviceRemove = "device-remove"
	// AuditDeviceWipe records a remote wipe requested (or refused) on an operator's command.
	AuditDeviceWipe = "device-wipe"
	// AuditDeviceRejudge records a device matched and judged again on an operator's command.
	AuditDeviceRejudge = "device-rejudge"
)

// CommandFamily returns the subject family that carries a command with
// this action to the worker that carries it out: the executor for a remove
// or a wipe, the matcher for a rejudge.
func CommandFamily(action string) (Event, error) {
	switch action {
	case ev.CommandRemove, ev.CommandWipe:
		return DeviceCommanded, nil
	case ev.CommandRejudge:
		return RejudgeRequested, nil
	}
	return Event{}, fmt.Errorf("%w: action %q is not remove, wipe or rejudge", ErrBadCommand, action)
}

// CommandID derives a command's id from what the operator asked, not from
// the request itself: the same operator, action, device and partnership
// within one CommandRepeatWindow give the same id.
func CommandID(org Org, action, deviceID, partnershipID, by string, at time.Time) string {
	bucket := at.UTC().Truncate(CommandRepeatWindow).Format(time.RFC3339)
	sum := sha256.Sum256([]byte(strings.Join([]string{string(org), action, strings.ToLower(deviceID), partnershipID, by, bucket}, "\x00")))
	return hex.EncodeToString(sum[:12])
}

// CommandOutbound builds an operator's device command for the console or
// the CLI to publish: action "remove" or "wipe" (on
// easguard.<org>.device.command.<device>, for the executor, which carries
// it out only where the organisation enabled it) or "rejudge" (on
// easguard.<org>.device.rejudge.<device>, for the matcher). partnershipID
// is the partnership as the decision record names it
// (easguardv1.PartnershipID); a rejudge without one judges every
// partnership of the device again. by is the operator, source the client
// address, notify the addresses Exchange mails about a wipe. The message
// id is derived with CommandID, so a double click is one command. A
// command that fails validation is refused here, wrapping ErrBadCommand
// and easguardv1.ErrInvalid.
func CommandOutbound(org Org, action, deviceID, partnershipID, mailbox, by, source, reason string, notify []string, at time.Time) (Outbound, error) {
	family, err := CommandFamily(action)
	if err != nil {
		return Outbound{}, err
	}
	id := CommandID(org, action, deviceID, partnershipID, by, at)
	cmd := &ev.DeviceCommand{
		Org: string(org), CommandId: id, Action: action, DeviceId: deviceID, PartnershipId: partnershipID, Mailbox: mailbox,
		RequestedBy: by, Source: source, Reason: reason, RequestedAt: timestamppb.New(at), NotifyAddresses: notify,
	}
	if err := cmd.Validate(); err != nil {
		return Outbound{}, fmt.Errorf("%w: %w", ErrBadCommand, err)
	}
	subject, err := family.Subject(org, deviceID)
	if err != nil {
		return Outbound{}, fmt.Errorf("%w: %w", ErrBadCommand, err)
	}
	return Outbound{Subject: subject, MsgID: "command:" + id, Message: cmd}, nil
}

// CommandAuditOutbound records how a device command ended, as the worker
// that carried it out saw it: the operator who asked is the actor, the
// device the target, and the detail names the command, the partnership,
// the mailbox and the reason given, plus what the worker adds. Its
// message id is derived from the command and the action, so a command
// redelivered after its outcome was recorded is recorded once.
func CommandAuditOutbound(org Org, action string, c *ev.DeviceCommand, outcome string, detail map[string]string, at time.Time) (Outbound, error) {
	d := map[string]string{"command_id": c.GetCommandId()}
	for k, v := range map[string]string{"partnership": c.GetPartnershipId(), "mailbox": c.GetMailbox(), "reason": c.GetReason()} {
		if v != "" {
			d[k] = v
		}
	}
	if len(c.GetNotifyAddresses()) > 0 {
		d["notify"] = strings.Join(c.GetNotifyAddresses(), ", ")
	}
	maps.Copy(d, detail)
	out, err := AuditOutbound(org, action, c.GetRequestedBy(), c.GetSource(), c.GetDeviceId(), outcome, d, at)
	if err != nil {
		return Outbound{}, err
	}
	out.MsgID = "audit:" + action + ":" + c.GetCommandId()
	return out, nil
}
