package console

import (
	"errors"
	"net/http"
	"strings"

	"github.com/easguard/easguard/pkg/bus"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

func (s *Server) deviceActions() {
	s.action("/orgs/{org}/devices/{id}/rejudge", RoleOperator, s.command(ev.CommandRejudge))
	s.action("/orgs/{org}/devices/{id}/remove", RoleDeviceAdmin, s.command(ev.CommandRemove))
	s.action("/orgs/{org}/devices/{id}/wipe", RoleDeviceAdmin, s.command(ev.CommandWipe))
}

// command publishes an operator's device command. The console records
// that it was asked; the worker that carries it out records how it ended
// (an executor where the organisation did not enable removal or wiping
// refuses it, and says so in the audit trail).
func (s *Server) command(action string) handler {
	return func(r *request) (any, error) {
		id := r.PathValue("id")
		parts := s.index[r.org].byDevice(id)
		partnership, mailbox := r.form("partnership"), r.form("mailbox")
		if action != ev.CommandRejudge {
			if strings.TrimSpace(r.form("reason")) == "" {
				return nil, fail(http.StatusBadRequest, "say why (reason): it goes into the audit trail")
			}
			// The partnership is named, or is the device's only one.
			if partnership == "" {
				if len(parts) != 1 {
					return nil, fail(http.StatusBadRequest, "%s has %d partnerships: name one (partnership)", id, len(parts))
				}
				partnership, mailbox = parts[0].PartnershipID, parts[0].Mailbox
			}
			found := false
			for _, p := range parts {
				if p.PartnershipID == partnership {
					found, mailbox = true, p.Mailbox
				}
			}
			if !found {
				return nil, fail(http.StatusNotFound, "%s has no partnership %q", id, partnership)
			}
			if !r.confirmed() {
				warn := "the partnership is deleted on Exchange; the phone syncs again as a new device"
				if action == ev.CommandWipe {
					warn = "the phone is erased at its next sync; this cannot be undone"
				}
				return confirm(r, action+" "+id, warn)
			}
		} else if len(parts) == 0 {
			return nil, fail(http.StatusNotFound, "%s knows no device %q", r.org, id)
		}
		out, err := bus.CommandOutbound(r.org, action, id, partnership, mailbox, r.who.Name, s.source(r.Request), r.form("reason"), nil, s.now())
		if errors.Is(err, bus.ErrBadCommand) {
			return nil, fail(http.StatusBadRequest, "%v", err)
		}
		if err != nil {
			return nil, err
		}
		ack, err := s.pub.Publish(r.Context(), out)
		if err != nil {
			return nil, fail(http.StatusServiceUnavailable, "%s not requested: %v", action, err)
		}
		if ack.Duplicate {
			return Outcome{Done: action + " of " + id + " was already asked for", ID: out.MsgID}, nil
		}
		return Outcome{Done: action + " of " + id + " requested; the history shows how it ends", ID: out.MsgID}, nil
	}
}
