package exchangesim

import (
	"time"

	"github.com/easguard/easguard/pkg/exchange"
)

// Active Directory replication between the CAS endpoints.
//
// Exchange keeps the device lists and the partnerships in Active
// Directory, and each Client Access server reads and writes through a
// domain controller of its own site. A change made on one domain
// controller reaches the others only by replication: within a site about
// 15 seconds after the change (change notification), between sites on the
// site link's schedule (15 minutes at the least, 3 hours by default). With
// Org.ReplicationDelay above zero the simulator models this: every CAS
// endpoint has its own domain controller (keyed by the endpoint's name),
// and a write becomes visible on the other domain controllers
// ReplicationDelay after it was made; until then they show the previous
// value. Concurrent writes on two domain controllers resolve as AD
// resolves a conflict of equal version: the later write wins everywhere.
//
// What is modelled:
//   - a mailbox's ActiveSyncAllowedDeviceIDs and ActiveSyncBlockedDeviceIDs:
//     Get-CASMailbox (and -Filter on them) shows the endpoint's domain
//     controller's lists, and Set-CASMailbox applies its Add/Remove to them,
//     so a change made on a domain controller that has not seen an earlier
//     change elsewhere overwrites it (the whole attribute replicates);
//   - a partnership's DeviceAccessState, DeviceAccessStateReason,
//     DeviceAccessControlRule and WhenChanged: re-stamping by Set-CASMailbox
//     happens on the endpoint's domain controller, re-evaluation by a
//     phone's ActiveSync request on the first CAS's (phones reach the
//     organisation through the primary CAS), which also reads its lists
//     there; Get-MobileDevice, Get-ActiveSyncDevice and their statistics
//     (and -Filter on these properties) show the endpoint's view.
//
// What is not (visible everywhere at once): creating and removing
// partnerships and mailboxes, the properties a phone reports (model, OS,
// user agent), wipe requests, organisation settings, device access rules
// and mailbox policies. whenChanged is not a replicated attribute in AD:
// each domain controller stamps its own when it applies a change, so a
// partnership shows, through another CAS, the time the change arrived
// there. UNCONFIRMED: that Exchange's WhenChanged is the reading domain
// controller's whenChanged; Org.OriginWhenChanged shows the originating
// domain controller's stamp instead, and the tests run both ways. Phones
// going through the first CAS is a choice of the simulator, not a claim
// about Exchange (a load balancer may send them to any CAS).
// With ReplicationDelay zero (the default) every endpoint sees every write
// at once, as before.

// listVersion is one write of a mailbox's device lists.
type listVersion struct {
	at               time.Time // when it was written on its domain controller
	dc               string    // where; "" is the value before any recorded write, seen everywhere
	allowed, blocked []string
}

// stateVersion is one write of a partnership's access state.
type stateVersion struct {
	at          time.Time
	dc          string
	state       AccessState
	reason      AccessReason
	rule        *DeviceAccessRule
	whenChanged time.Time
}

// visibleAt reports whether a write made at at on origin is visible on dc.
func (o *Org) visibleAt(at time.Time, origin, dc string, now time.Time) bool {
	return origin == "" || origin == dc || now.Sub(at) >= o.ReplicationDelay
}

// easDC is the domain controller phones' ActiveSync requests go through:
// the first CAS's.
func (o *Org) easDC() string { return o.Servers[0].Name }

// listsAt returns a mailbox's lists as the domain controller of dc sees
// them; the caller holds the lock.
func (o *Org) listsAt(m *Mailbox, dc string) (allowed, blocked []string) {
	now := o.now()
	for i := len(m.replLists) - 1; i >= 0; i-- {
		if v := m.replLists[i]; o.visibleAt(v.at, v.dc, dc, now) {
			return v.allowed, v.blocked
		}
	}
	return m.Allowed, m.Blocked
}

// recordLists remembers a write of m's lists (already in m.Allowed and
// m.Blocked) made on dc, whose view before the write was prevAllowed and
// prevBlocked.
func (o *Org) recordLists(m *Mailbox, dc string, prevAllowed, prevBlocked []string) {
	if o.ReplicationDelay <= 0 {
		return
	}
	now := o.now()
	if len(m.replLists) == 0 {
		m.replLists = []listVersion{{allowed: prevAllowed, blocked: prevBlocked}}
	}
	m.replLists = append(m.replLists, listVersion{at: now, dc: dc, allowed: m.Allowed, blocked: m.Blocked})
	// Versions older than the newest one every domain controller has are
	// seen nowhere any more.
	for i := len(m.replLists) - 1; i > 0; i-- {
		if now.Sub(m.replLists[i].at) >= o.ReplicationDelay {
			m.replLists = m.replLists[i:]
			break
		}
	}
}

// stateAt returns a partnership's access state as the domain controller of
// dc sees it; the caller holds the lock. whenChanged is not a replicated
// attribute: each domain controller stamps it when it applies a change,
// its own or one that replication brought, so a write made elsewhere shows
// the time it arrived (unless Org.OriginWhenChanged).
func (o *Org) stateAt(d *Device, dc string) stateVersion {
	now := o.now()
	for i := len(d.replState) - 1; i >= 0; i-- {
		v := d.replState[i]
		if !o.visibleAt(v.at, v.dc, dc, now) {
			continue
		}
		if v.dc != "" && v.dc != dc && !o.OriginWhenChanged {
			v.whenChanged = v.at.Add(o.ReplicationDelay)
		}
		if i == len(d.replState)-1 && d.WhenChanged.After(v.whenChanged) {
			// The newest write, and a change that is not modelled (the
			// phone's own properties) came after it.
			v.whenChanged = d.WhenChanged
		}
		return v
	}
	return stateVersion{state: d.State, reason: d.Reason, rule: d.Rule, whenChanged: d.WhenChanged}
}

// setState writes a partnership's access state on dc, as re-stamping or an
// ActiveSync request does, and stamps WhenChanged when it changed. prev is
// dc's view before the write.
func (o *Org) setState(d *Device, dc string, prev stateVersion, state AccessState, reason AccessReason, rule *DeviceAccessRule) {
	if state == prev.state && reason == prev.reason && rule == prev.rule {
		return // nothing changes on dc, so nothing is written
	}
	now := o.now()
	if o.ReplicationDelay > 0 {
		if len(d.replState) == 0 {
			d.replState = []stateVersion{{state: d.State, reason: d.Reason, rule: d.Rule, whenChanged: d.WhenChanged}}
		}
		d.replState = append(d.replState, stateVersion{at: now, dc: dc, state: state, reason: reason, rule: rule, whenChanged: now})
		for i := len(d.replState) - 1; i > 0; i-- {
			if now.Sub(d.replState[i].at) >= o.ReplicationDelay {
				d.replState = d.replState[i:]
				break
			}
		}
	}
	d.State, d.Reason, d.Rule, d.WhenChanged = state, reason, rule, now
}

// overlayDevice puts dc's view of the access state on a device object.
func (o *Org) overlayDevice(obj exchange.Object, d *Device, dc string, withWhenChanged bool) {
	if len(d.replState) == 0 {
		return
	}
	v := o.stateAt(d, dc)
	var rule any
	if v.rule != nil {
		rule = v.rule.Name()
	}
	obj["DeviceAccessState"], obj["DeviceAccessStateReason"], obj["DeviceAccessControlRule"] = enumOf(v.state, v.state.String()), enumOf(v.reason, v.reason.String()), rule
	if withWhenChanged {
		obj["WhenChanged"], obj["WhenChangedUTC"] = localTime(v.whenChanged), wireTime(v.whenChanged)
	}
}

// deviceObject is Get-MobileDevice output as this session's domain
// controller sees it.
func (s *Session) deviceObject(d *Device) exchange.Object {
	obj := s.org.mobileDeviceObject(d)
	s.org.overlayDevice(obj, d, s.server, true)
	return obj
}

// statisticsObject is Get-MobileDeviceStatistics output as this session's
// domain controller sees it.
func (s *Session) statisticsObject(d *Device) exchange.Object {
	obj := s.org.deviceStatisticsObject(d)
	s.org.overlayDevice(obj, d, s.server, false)
	return obj
}

// casMailboxObject is Get-CASMailbox output as this session's domain
// controller sees it.
func (s *Session) casMailboxObject(m *Mailbox) exchange.Object {
	obj := s.org.casMailboxObject(m)
	if len(m.replLists) > 0 {
		allowed, blocked := s.org.listsAt(m, s.server)
		obj["ActiveSyncAllowedDeviceIDs"], obj["ActiveSyncBlockedDeviceIDs"] = wireStrings(allowed), wireStrings(blocked)
	}
	return obj
}

// deviceProp is a device property for -Filter as this session sees it.
func (s *Session) deviceProp(d *Device, name string) any {
	if len(d.replState) > 0 {
		switch name {
		case "DeviceAccessState", "DeviceAccessStateReason", "DeviceAccessControlRule":
			v := s.org.stateAt(d, s.server)
			shown := *d
			shown.State, shown.Reason, shown.Rule = v.state, v.reason, v.rule
			return deviceProp(&shown, name)
		}
	}
	return deviceProp(d, name)
}

// recipientProp is a mailbox property for -Filter as this session sees it.
func (s *Session) recipientProp(m *Mailbox, name string) any {
	if len(m.replLists) > 0 && (name == "ActiveSyncAllowedDeviceIDs" || name == "ActiveSyncBlockedDeviceIDs") {
		allowed, blocked := s.org.listsAt(m, s.server)
		if name == "ActiveSyncAllowedDeviceIDs" {
			return allowed
		}
		return blocked
	}
	return recipientProp(s.org, m, name)
}
