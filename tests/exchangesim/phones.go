package exchangesim

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/easguard/easguard/pkg/exchange"
)

// Phone is a simulated mobile device of a user. Every Sync is one
// ActiveSync request: the first creates the partnership, and each gets the
// access Exchange would give the device at that moment.
type Phone struct {
	// Mailbox is any identity of the user's mailbox (SMTP, UPN, alias, …).
	Mailbox         string `json:"mailbox"`
	DeviceID        string `json:"device_id"`
	DeviceType      string `json:"device_type"`
	DeviceModel     string `json:"device_model,omitempty"`
	DeviceOS        string `json:"device_os,omitempty"`
	UserAgent       string `json:"user_agent,omitempty"`
	IMEI            string `json:"imei,omitempty"`
	FriendlyName    string `json:"friendly_name,omitempty"`
	OSLanguage      string `json:"os_language,omitempty"`
	MobileOperator  string `json:"mobile_operator,omitempty"`
	TelephoneNumber string `json:"telephone_number,omitempty"`
	// ActiveSyncVersion is the protocol version, e.g. 16.1.
	ActiveSyncVersion string `json:"activesync_version,omitempty"`
	// ClientType is EAS for ActiveSync (MOWA for OWA for Devices).
	ClientType string `json:"client_type,omitempty"`
	// NoDeviceInfo: the phone does not send its DeviceInformation, so it
	// can sit in DeviceDiscovery while rules exist.
	NoDeviceInfo bool `json:"no_device_info,omitempty"`
	// NotProvisionable: the phone cannot enforce the mailbox policy.
	NotProvisionable bool `json:"not_provisionable,omitempty"`
}

// SyncResult is what the phone saw.
type SyncResult struct {
	// Created: this sync created the partnership.
	Created bool `json:"created"`
	// HTTPStatus is the status Exchange answered the ActiveSync request with.
	HTTPStatus int    `json:"http_status"`
	State      string `json:"access_state"`
	Reason     string `json:"access_state_reason"`
	Rule       string `json:"rule,omitempty"`
	// GetsMail is true when the phone syncs mail (Allowed).
	GetsMail bool `json:"gets_mail"`
	// Wiped is true when this sync delivered a pending remote wipe.
	Wiped bool `json:"wiped,omitempty"`
	// Error names an ActiveSync failure, e.g. MaximumDevicesReached.
	Error string `json:"error,omitempty"`
}

// ErrBadRequest is returned for a sync Exchange would reject outright.
var ErrBadRequest = errors.New("bad ActiveSync request")

// Sync performs one ActiveSync request of a phone.
func (o *Org) Sync(p Phone) (SyncResult, error) {
	if p.DeviceID == "" || p.DeviceType == "" {
		return SyncResult{HTTPStatus: http.StatusBadRequest}, fmt.Errorf("%w: DeviceId and DeviceType are required", ErrBadRequest)
	}
	if n := utf8.RuneCountInString(p.DeviceID); n > exchange.MaxDeviceIDLen {
		return SyncResult{HTTPStatus: http.StatusBadRequest}, fmt.Errorf("%w: DeviceId has %d characters, more than %d", ErrBadRequest, n, exchange.MaxDeviceIDLen)
	}
	for _, r := range p.DeviceID + p.DeviceType {
		if unicode.IsControl(r) {
			return SyncResult{HTTPStatus: http.StatusBadRequest}, fmt.Errorf("%w: DeviceId or DeviceType holds a control character", ErrBadRequest)
		}
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	var m *Mailbox
	if ms := o.byKey[strings.ToLower(p.Mailbox)]; len(ms) == 1 {
		m = ms[0]
	}
	if m == nil {
		return SyncResult{HTTPStatus: http.StatusUnauthorized}, fmt.Errorf("%w: no single mailbox %q", ErrBadRequest, p.Mailbox)
	}
	if !m.ActiveSyncEnabled {
		return SyncResult{HTTPStatus: http.StatusForbidden, Error: "ActiveSyncDisabled", State: StateBlocked.String(), Reason: ReasonPolicy.String()}, nil
	}
	now := o.now()
	var d *Device
	for _, x := range m.Devices {
		if strings.EqualFold(x.DeviceID, p.DeviceID) && strings.EqualFold(x.DeviceType, p.DeviceType) {
			d = x
		}
	}
	res := SyncResult{}
	if d == nil {
		if len(m.Devices) >= o.MaxDevicesPerMailbox {
			// EASMaxDevices: the new partnership is refused (EAS status 177).
			return SyncResult{HTTPStatus: http.StatusForbidden, Error: "MaximumDevicesReached"}, nil
		}
		d = &Device{GUID: o.newGUID(), Mailbox: m, DeviceID: p.DeviceID, DeviceType: p.DeviceType,
			FirstSyncTime: now, WhenCreated: now, WhenChanged: now, ClientType: "EAS"}
		m.Devices = append(m.Devices, d)
		o.byGUID[strings.ToLower(d.GUID)] = d
		o.deviceCount++
		res.Created = true
	}
	o.applyPhone(d, p, now)
	if !d.WipeRequestTime.IsZero() && d.WipeAckTime.IsZero() {
		d.WipeSentTime, d.WipeAckTime = now, now
		res.Wiped = true
	}
	// The request is served by the first CAS, on its domain controller.
	before := o.stateAt(d, o.easDC())
	state, reason, rule := o.evaluate(d, now)
	if res.Created {
		// A new partnership is created with its state, and creation is
		// not subject to replication here (replication.go).
		d.State, d.Reason, d.Rule = state, reason, rule
	} else {
		o.setState(d, o.easDC(), before, state, reason, rule)
	}
	d.LastSyncAttemptTime = now
	o.notify(d, before.state, now)
	res.State, res.Reason = state.String(), reason.String()
	if rule != nil {
		res.Rule = rule.Name()
	}
	switch state {
	case StateAllowed:
		d.LastSuccessSync, d.LastPolicyUpdateTime = now, now
		d.FoldersSynced = 12
		res.HTTPStatus, res.GetsMail = http.StatusOK, true
	case StateBlocked:
		res.HTTPStatus = http.StatusForbidden
	default:
		// Quarantined and DeviceDiscovery devices get a limited sync: they
		// see Exchange's notice, not the mailbox.
		res.HTTPStatus = http.StatusOK
	}
	return res, nil
}

// applyPhone records what the phone reported about itself.
func (o *Org) applyPhone(d *Device, p Phone, now time.Time) {
	set := func(dst *string, v string) {
		if v != "" && *dst != v {
			*dst = v
			d.WhenChanged = now
		}
	}
	set(&d.DeviceModel, p.DeviceModel)
	if d.DeviceModel == "" {
		d.DeviceModel = d.DeviceType // Exchange's fallback when no model was sent
	}
	set(&d.DeviceOS, p.DeviceOS)
	set(&d.UserAgent, p.UserAgent)
	set(&d.IMEI, p.IMEI)
	set(&d.FriendlyName, p.FriendlyName)
	set(&d.OSLanguage, p.OSLanguage)
	set(&d.MobileOperator, p.MobileOperator)
	set(&d.TelephoneNumber, p.TelephoneNumber)
	set(&d.ClientType, p.ClientType)
	v := p.ActiveSyncVersion
	if v == "" {
		v = "16.1"
	}
	set(&d.ActiveSyncVersion, v)
	if !p.NoDeviceInfo {
		d.SentDeviceInfo = true
	}
	d.Provisionable = !p.NotProvisionable
	key := d.DeviceType + "§" + d.DeviceModel
	o.classes[key] = now
}

// notify records the mails Exchange sends itself when a device's state
// changes to Quarantined or Blocked (reference/exchange.md §4.3): to the
// user always, to AdminMailRecipients for Quarantined; not for Policy or
// the auto-block reasons.
func (o *Org) notify(d *Device, prev AccessState, now time.Time) {
	if d.State == prev || (d.State != StateQuarantined && d.State != StateBlocked) {
		return
	}
	if d.Reason == ReasonPolicy || (d.Reason >= ReasonUserAgentsChanges && d.Reason <= ReasonCommandFrequency) {
		return
	}
	m := d.Mailbox
	subject := "Your device is blocked from accessing email"
	if d.State == StateQuarantined {
		subject = "Your device is temporarily blocked from synchronizing with the server until access is granted"
	}
	m.Notices = append(m.Notices, Notice{Time: now, To: []string{m.PrimarySMTP}, Subject: subject, DeviceID: d.DeviceID, State: d.State})
	if d.State == StateQuarantined && len(o.Settings.AdminMailRecipients) > 0 {
		m.Notices = append(m.Notices, Notice{Time: now, To: append([]string(nil), o.Settings.AdminMailRecipients...),
			Subject: "A new device is in quarantine: " + d.DeviceType + " (" + m.DisplayName + ")", DeviceID: d.DeviceID, State: d.State, Admin: true})
	}
}

// Partnership is a partnership as the admin API reports it.
type Partnership struct {
	Mailbox     string `json:"mailbox"`
	PrimarySMTP string `json:"primary_smtp"`
	UPN         string `json:"upn"`
	DeviceID    string `json:"device_id"`
	DeviceType  string `json:"device_type"`
	DeviceModel string `json:"device_model"`
	DeviceOS    string `json:"device_os"`
	State       string `json:"access_state"`
	Reason      string `json:"access_state_reason"`
	Allowed     bool   `json:"in_allowed_list"`
	Blocked     bool   `json:"in_blocked_list"`
	FirstSync   string `json:"first_sync_time"`
	LastSuccess string `json:"last_success_sync,omitempty"`
	Identity    string `json:"identity"`
	Notices     int    `json:"notices"`
}

// ListedByActiveSync reports whether an organisation-wide
// Get-MobileDevice -ActiveSync lists the partnership: not a managed
// availability probe (hidden without -Monitoring), not OWA for Devices.
func (p Partnership) ListedByActiveSync() bool {
	return p.DeviceType != "EASProbeDeviceType" && p.DeviceType != "OWA"
}

// ActiveSyncCount returns how many partnerships an organisation-wide
// Get-MobileDevice -ActiveSync lists.
func (o *Org) ActiveSyncCount() int {
	ps, _ := o.Partnerships("")
	n := 0
	for _, p := range ps {
		if p.ListedByActiveSync() {
			n++
		}
	}
	return n
}

// Partnerships lists the partnerships, optionally of one mailbox.
func (o *Org) Partnerships(mailbox string) ([]Partnership, error) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	list := o.mailboxes
	if mailbox != "" {
		ms := o.byKey[strings.ToLower(mailbox)]
		if len(ms) != 1 {
			return nil, fmt.Errorf("no single mailbox %q", mailbox)
		}
		list = ms
	}
	var out []Partnership
	for _, m := range list {
		for _, d := range m.Devices {
			p := Partnership{
				Mailbox: m.Alias, PrimarySMTP: m.PrimarySMTP, UPN: m.UPN, DeviceID: d.DeviceID, DeviceType: d.DeviceType,
				DeviceModel: d.DeviceModel, DeviceOS: d.DeviceOS, State: d.State.String(), Reason: d.Reason.String(),
				Allowed: containsFold(m.Allowed, d.DeviceID), Blocked: containsFold(m.Blocked, d.DeviceID),
				FirstSync: d.FirstSyncTime.Format(time.RFC3339Nano), Identity: d.Identity(), Notices: len(m.Notices),
			}
			if !d.LastSuccessSync.IsZero() {
				p.LastSuccess = d.LastSuccessSync.Format(time.RFC3339Nano)
			}
			out = append(out, p)
		}
	}
	return out, nil
}

// Lists returns a mailbox's allowed and blocked device id lists.
func (o *Org) Lists(mailbox string) (allowed, blocked []string, err error) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	ms := o.byKey[strings.ToLower(mailbox)]
	if len(ms) != 1 {
		return nil, nil, fmt.Errorf("no single mailbox %q", mailbox)
	}
	return append([]string(nil), ms[0].Allowed...), append([]string(nil), ms[0].Blocked...), nil
}
