package executor

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/exchange"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// ErrNotForExecutor is why a command the executor does not carry out (a
// rejudge, which is the matcher's) is dead-lettered when it arrives on the
// executor's subject anyway: only a publisher that bypassed
// bus.CommandOutbound puts it there.
var ErrNotForExecutor = errors.New("not an executor command")

// The outcomes a device command's audit record gives, besides
// "failed: <error>".
const (
	// CommandDone: Exchange carried the command out.
	CommandDone = "done"
	// CommandAlreadyGone: a removal delivered again found the partnership
	// gone: this command's earlier delivery removed it before a crash or
	// a lost answer kept it from being acknowledged. What the operator
	// asked for holds. On the first delivery, a partnership Exchange does
	// not know is a failure: the command named nothing there.
	CommandAlreadyGone = "done: the partnership was already gone"
	// CommandRefused: the organisation did not enable the action
	// (EASGUARD_EXECUTOR_ALLOW_REMOVE, EASGUARD_EXECUTOR_ALLOW_WIPE).
	CommandRefused = "refused: not enabled for this organisation"
)

// Command carries out an operator's remove or wipe on Exchange, if the
// organisation enabled it, and records the outcome in the audit trail
// (device-remove, device-wipe). A refusal, and a failure Exchange gives for
// the command itself (the partnership is not there to wipe, Exchange
// refuses the identity) are outcomes, recorded and acknowledged; retrying
// would not change them. An Exchange that cannot be reached, throttles, or
// refuses easguard's account is retried as decisions are, and the command
// is dead-lettered with the reason when retries run out.
func (x *Executor) Command(ctx context.Context, c *ev.DeviceCommand) ([]bus.Outbound, error) {
	var (
		action  string
		allowed bool
		do      func() error
	)
	switch c.GetAction() {
	case ev.CommandRemove:
		action, allowed = bus.AuditDeviceRemove, x.cfg.AllowRemove
		do = func() error { return x.devices.RemovePartnership(ctx, c.GetPartnershipId()) }
	case ev.CommandWipe:
		action, allowed = bus.AuditDeviceWipe, x.cfg.AllowWipe
		do = func() error { return x.devices.WipePartnership(ctx, c.GetPartnershipId(), c.GetNotifyAddresses()) }
	default:
		return nil, bus.Poison(fmt.Errorf("%w: action %q", ErrNotForExecutor, c.GetAction()))
	}
	detail := map[string]string{"attempts": strconv.Itoa(int(attempts(ctx)))}
	record := func(outcome string) ([]bus.Outbound, error) {
		if s := x.server(); s != "" {
			detail["cas_server"] = s
		}
		if x.actor != "" {
			detail["account"] = x.actor
		}
		out, err := bus.CommandAuditOutbound(x.org, action, c, outcome, detail, x.now())
		if err != nil {
			return nil, bus.Poison(err)
		}
		return []bus.Outbound{out}, nil
	}
	if !allowed {
		x.log.WarnContext(ctx, "device command refused: not enabled", "action", c.GetAction(), "device_id", c.GetDeviceId(),
			"partnership", c.GetPartnershipId(), "requested_by", c.GetRequestedBy(), "command_id", c.GetCommandId())
		return record(CommandRefused)
	}
	err := do()
	switch {
	case err == nil:
		x.log.InfoContext(ctx, "device command carried out", "action", c.GetAction(), "device_id", c.GetDeviceId(),
			"partnership", c.GetPartnershipId(), "requested_by", c.GetRequestedBy(), "command_id", c.GetCommandId())
		return record(CommandDone)
	case c.GetAction() == ev.CommandRemove && errors.Is(err, exchange.ErrNotFound) && bus.Delivery(ctx) > 1:
		return record(CommandAlreadyGone)
	case errors.Is(err, exchange.ErrNotFound), errors.Is(err, exchange.ErrInvalid):
		return record("failed: " + err.Error())
	default:
		if exchange.IsFatal(err) {
			x.alertFatal(ctx, err)
		}
		return nil, fmt.Errorf("%s %s of device %s: %w", c.GetAction(), c.GetPartnershipId(), c.GetDeviceId(), err)
	}
}
