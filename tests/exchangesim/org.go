// Package exchangesim is a stand-in for an on-premises Exchange
// organisation, faithful enough that easguard can be built, tested,
// benchmarked and demonstrated without one: a WS-Man server that the real
// masterzen/winrm client accepts (Basic and NTLM, HTTP and HTTPS), the
// easguard worker protocol spoken natively, an in-memory organisation that
// follows Exchange's Allow/Block/Quarantine rules and validation errors, and
// simulated phones that sync and get the access Exchange would give them.
//
// Where Exchange's behaviour is documented (../shared/reference/exchange.md)
// the simulator follows it; where it is not, the choice is marked
// UNCONFIRMED in a comment, so nobody mistakes it for a fact about Exchange.
package exchangesim

import (
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
)

// AccessState is Exchange's DeviceAccessState.
type AccessState int

// Exchange's DeviceAccessState values, in Exchange's numeric order.
const (
	StateUnknown AccessState = iota
	StateAllowed
	StateBlocked
	StateQuarantined
	StateDeviceDiscovery
)

var stateNames = []string{"Unknown", "Allowed", "Blocked", "Quarantined", "DeviceDiscovery"}

// String returns Exchange's name of the state.
func (s AccessState) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("AccessState(%d)", int(s))
}

// AccessReason is Exchange's DeviceAccessStateReason.
type AccessReason int

// Exchange's DeviceAccessStateReason values (numbers as in Exchange).
const (
	ReasonUnknown               AccessReason = 0
	ReasonGlobal                AccessReason = 1
	ReasonIndividual            AccessReason = 2
	ReasonDeviceRule            AccessReason = 3
	ReasonUpgrade               AccessReason = 4
	ReasonPolicy                AccessReason = 5
	ReasonUserAgentsChanges     AccessReason = 6
	ReasonRecentCommands        AccessReason = 7
	ReasonWatsons               AccessReason = 8
	ReasonOutOfBudgets          AccessReason = 9
	ReasonSyncCommands          AccessReason = 10
	ReasonEnableNotificationEml AccessReason = 11
	ReasonCommandFrequency      AccessReason = 12
	ReasonExternallyManaged     AccessReason = 51
	ReasonExternalCompliance    AccessReason = 52
	ReasonExternalEnrollment    AccessReason = 53
)

var reasonNames = map[AccessReason]string{
	0: "Unknown", 1: "Global", 2: "Individual", 3: "DeviceRule", 4: "Upgrade", 5: "Policy",
	6: "UserAgentsChanges", 7: "RecentCommands", 8: "Watsons", 9: "OutOfBudgets", 10: "SyncCommands",
	11: "EnableNotificationEmail", 12: "CommandFrequency", 51: "ExternallyManaged", 52: "ExternalCompliance", 53: "ExternalEnrollment",
}

// String returns Exchange's name of the reason.
func (r AccessReason) String() string {
	if n, ok := reasonNames[r]; ok {
		return n
	}
	return fmt.Sprintf("AccessReason(%d)", int(r))
}

// AccessLevel is the level of the org default and of device access rules.
type AccessLevel int

// Access levels (DeviceAccessLevel).
const (
	LevelAllow AccessLevel = iota
	LevelBlock
	LevelQuarantine
)

var levelNames = []string{"Allow", "Block", "Quarantine"}

// String returns Exchange's name of the level.
func (l AccessLevel) String() string { return levelNames[l] }

func (l AccessLevel) state() AccessState {
	switch l {
	case LevelBlock:
		return StateBlocked
	case LevelQuarantine:
		return StateQuarantined
	}
	return StateAllowed
}

// Characteristic is what a device access rule matches on.
type Characteristic int

// Rule characteristics; the evaluation order is UserAgent, DeviceOS,
// DeviceModel, DeviceType, whatever the rules' creation order.
const (
	CharDeviceType Characteristic = iota
	CharDeviceModel
	CharDeviceOS
	CharUserAgent
	CharXMSWLHeader
)

var charNames = []string{"DeviceType", "DeviceModel", "DeviceOS", "UserAgent", "XMSWLHeader"}

// String returns Exchange's name of the characteristic.
func (c Characteristic) String() string { return charNames[c] }

// Domain is one Active Directory domain of the forest.
type Domain struct {
	DNS     string // contoso.com
	NetBIOS string // CONTOSO
	DC      string // DC01.contoso.com
}

// dn returns the domain's DN suffix, e.g. DC=contoso,DC=com.
func (d *Domain) dn() string {
	parts := strings.Split(d.DNS, ".")
	for i, p := range parts {
		parts[i] = "DC=" + p
	}
	return strings.Join(parts, ",")
}

// Mailbox is a user mailbox with its CAS mailbox settings.
type Mailbox struct {
	GUID        string
	Alias       string
	Name        string
	DisplayName string
	UPN         string
	PrimarySMTP string
	// EmailAddresses are proxy addresses, "SMTP:" primary and "smtp:" secondary.
	EmailAddresses []string
	SamAccountName string
	Domain         *Domain
	OU             string // canonical OU path below the domain, e.g. "Users"
	WhenCreated    time.Time
	WhenChanged    time.Time
	// Monitoring mailboxes (managed availability) are always allowed.
	Monitoring bool

	ActiveSyncEnabled      bool
	ActiveSyncDebugLogging bool
	OWAEnabled             bool
	EwsEnabled             bool
	MAPIEnabled            bool
	PopEnabled             bool
	ImapEnabled            bool
	// Allowed and Blocked hold ActiveSyncAllowed/BlockedDeviceIDs exactly
	// as they were set; comparisons are case-insensitive.
	Allowed []string
	Blocked []string
	// Policy is the assigned mailbox policy; nil means the default.
	Policy *MailboxPolicy

	Devices []*Device
	// stalePartnershipFlag makes HasActiveSyncDevicePartnership read false
	// although the mailbox has partnerships (SetStalePartnershipFlag).
	stalePartnershipFlag bool
	// Notices are the mails Exchange itself put in the user's Inbox.
	Notices []Notice

	// replLists are the recent writes of the lists (replication.go).
	replLists []listVersion
}

// hasPartnershipFlag is HasActiveSyncDevicePartnership as Exchange
// reports it and filters on: a stored flag, which can be stale [D7].
func (m *Mailbox) hasPartnershipFlag() bool { return len(m.Devices) > 0 && !m.stalePartnershipFlag }

// DN returns the mailbox user's distinguished name.
func (m *Mailbox) DN() string {
	return "CN=" + escapeDN(m.Name) + "," + ouDN(m.OU) + m.Domain.dn()
}

// Canonical returns the canonical name, Exchange's usual Identity form.
func (m *Mailbox) Canonical() string {
	return m.Domain.DNS + "/" + m.OU + "/" + m.Name
}

func ouDN(ou string) string {
	if ou == "" {
		return ""
	}
	parts := strings.Split(ou, "/")
	var out []string
	for i := len(parts) - 1; i >= 0; i-- {
		prefix := "OU="
		if parts[i] == "Users" && i == 0 {
			prefix = "CN="
		}
		out = append(out, prefix+escapeDN(parts[i]))
	}
	return strings.Join(out, ",") + ","
}

// escapeDN escapes a relative distinguished name value (RFC 4514).
func escapeDN(v string) string {
	var b strings.Builder
	for i, r := range v {
		switch {
		case strings.ContainsRune(`,+"\<>;=`, r):
			b.WriteByte('\\')
			b.WriteRune(r)
		case (i == 0 && (r == ' ' || r == '#')) || (i == len(v)-1 && r == ' '):
			b.WriteByte('\\')
			b.WriteRune(r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// Device is one ActiveSync partnership (msExchActiveSyncDevice).
type Device struct {
	GUID              string
	Mailbox           *Mailbox
	DeviceID          string
	DeviceType        string
	DeviceModel       string
	DeviceOS          string
	UserAgent         string
	IMEI              string
	FriendlyName      string
	OSLanguage        string
	MobileOperator    string
	TelephoneNumber   string
	ActiveSyncVersion string
	ClientType        string // EAS
	FirstSyncTime     time.Time
	WhenCreated       time.Time
	WhenChanged       time.Time
	State             AccessState
	Reason            AccessReason
	Rule              *DeviceAccessRule
	// SentDeviceInfo: the device sent its DeviceInformation (Settings command).
	SentDeviceInfo bool
	// Provisionable: the device can enforce the mailbox policy.
	Provisionable bool

	LastSuccessSync      time.Time
	LastSyncAttemptTime  time.Time
	LastPolicyUpdateTime time.Time
	FoldersSynced        int
	WipeRequestTime      time.Time
	WipeSentTime         time.Time
	WipeAckTime          time.Time
	WipeRequestor        string
	WipeNotify           []string

	// replState are the recent writes of the access state (replication.go).
	replState []stateVersion
}

// Name is the AD object name: <DeviceType>§<DeviceId>.
func (d *Device) Name() string { return d.DeviceType + "§" + d.DeviceID }

// Identity is the canonical identity Get-MobileDevice shows.
func (d *Device) Identity() string {
	return d.Mailbox.Canonical() + "/ExchangeActiveSyncDevices/" + d.Name()
}

// DN is the device object's distinguished name.
func (d *Device) DN() string {
	return "CN=" + escapeDN(d.Name()) + ",CN=ExchangeActiveSyncDevices," + d.Mailbox.DN()
}

// wipeStatus is the DeviceRemoteWipeStatus of the statistics.
func (d *Device) wipeStatus() string {
	switch {
	case !d.WipeAckTime.IsZero():
		return "DeviceWipeSucceeded"
	case !d.WipeRequestTime.IsZero():
		return "DeviceWipePending"
	case d.State == StateBlocked:
		return "DeviceBlocked"
	}
	return "DeviceOk"
}

// DeviceAccessRule is an org-wide ActiveSync device access rule.
type DeviceAccessRule struct {
	GUID           string
	QueryString    string
	Characteristic Characteristic
	AccessLevel    AccessLevel
	WhenCreated    time.Time
	WhenChanged    time.Time
}

// Name is the rule's name and identity, "QueryString (Characteristic)".
// UNCONFIRMED: the exact spacing; the docs show both forms.
func (r *DeviceAccessRule) Name() string {
	return r.QueryString + " (" + r.Characteristic.String() + ")"
}

// MailboxPolicy is an ActiveSync (mobile device) mailbox policy.
type MailboxPolicy struct {
	GUID                          string
	Name                          string
	IsDefault                     bool
	AllowNonProvisionableDevices  bool
	AllowExternalDeviceManagement bool
	DevicePasswordEnabled         bool
	AlphanumericPasswordRequired  bool
	AllowSimpleDevicePassword     bool
	MinDevicePasswordLength       int
	RequireDeviceEncryption       bool
	MaxInactivityTimeDeviceLock   string
	DevicePolicyRefreshInterval   string
	WhenCreated                   time.Time
	WhenChanged                   time.Time
}

// OrgSettings are the ActiveSync organisation settings ("Mobile Mailbox Settings").
type OrgSettings struct {
	GUID                              string
	DefaultAccessLevel                AccessLevel
	AdminMailRecipients               []string
	UserMailInsert                    string
	OtaNotificationMailInsert         string
	AllowAccessForUnSupportedPlatform bool
	WhenChanged                       time.Time
}

// Server is an Exchange server of the organisation.
type Server struct {
	GUID    string
	Name    string // EX01
	FQDN    string
	Site    string
	Version string // AdminDisplayVersion, e.g. "Version 15.2 (Build 1544.4)"
	Edition string
	Roles   string // "Mailbox, ClientAccess"
}

// Notice is a mail Exchange itself sent about a device's access state.
type Notice struct {
	Time     time.Time   `json:"time"`
	To       []string    `json:"to"`
	Subject  string      `json:"subject"`
	DeviceID string      `json:"device_id"`
	State    AccessState `json:"-"`
	Admin    bool        `json:"admin"`
}

// Org is an Exchange organisation in memory. All methods are safe for
// concurrent use; cmdlets and phone syncs serialise on one lock, as AD
// writes would.
type Org struct {
	mu sync.RWMutex

	Name        string // Exchange organisation name, e.g. "Contoso"
	Domains     []*Domain
	Settings    OrgSettings
	Rules       []*DeviceAccessRule
	Policies    []*MailboxPolicy
	Servers     []*Server
	mailboxes   []*Mailbox
	byKey       map[string][]*Mailbox // lower-cased identity forms → mailboxes
	byGUID      map[string]*Device    // lower-cased device GUID
	deviceCount int
	// classes are the device classes seen, keyed by type§model.
	classes map[string]time.Time
	// granted are the cmdlets the service account's role grants.
	granted map[string]bool
	// strictAdd, strictRemove and listEditsKeepWhenChanged model
	// unconfirmed list behaviour (SetStrictLists, SetListEditsKeepWhenChanged).
	strictAdd, strictRemove, listEditsKeepWhenChanged bool
	// caseSensitiveLike, refuseLeadingWildcard and callFault:
	// SetCaseSensitiveLike, SetRefuseLeadingWildcard, SetCallFault.
	caseSensitiveLike, refuseLeadingWildcard bool
	callFault                                func(exchange.Call) *exchange.Error

	// DiscoveryPeriod is how long a new device without DeviceInformation
	// stays in DeviceDiscovery while rules exist. UNCONFIRMED default; the
	// field reports "up to 14 minutes".
	DiscoveryPeriod time.Duration
	// MaxDevicesPerMailbox is EASMaxDevices (default 100).
	MaxDevicesPerMailbox int
	// Now is the organisation's clock.
	Now func() time.Time
	// Version is the Exchange release (empty: 2019); set it with SetVersion.
	Version Version
	// ReplicationDelay is how long a write through one CAS takes to reach
	// the domain controllers of the others (replication.go); zero: at once.
	ReplicationDelay time.Duration
	// OriginWhenChanged makes a replicated change show the originating
	// domain controller's WhenChanged instead of the time it arrived on the
	// reading one (UNCONFIRMED which one Exchange shows; replication.go).
	OriginWhenChanged bool
	// Keep2013Properties gives Exchange 2010 partnerships the properties
	// 2013 added (ClientType, …): UNCONFIRMED which ones 2010 SP3 returns
	// (version.go).
	Keep2013Properties bool

	guidSeq uint64
}

// NewOrg returns an empty organisation with one domain, one server, the
// default mailbox policy and Exchange's default settings.
func NewOrg(name, domain string) *Org {
	netbios := strings.ToUpper(strings.Split(domain, ".")[0])
	o := &Org{
		Name:                 name,
		Domains:              []*Domain{{DNS: domain, NetBIOS: netbios, DC: "DC01." + domain}},
		byKey:                map[string][]*Mailbox{},
		byGUID:               map[string]*Device{},
		classes:              map[string]time.Time{},
		granted:              map[string]bool{},
		DiscoveryPeriod:      14 * time.Minute,
		MaxDevicesPerMailbox: 100,
		Now:                  time.Now,
	}
	now := o.Now().UTC()
	o.Settings = OrgSettings{GUID: o.newGUID(), DefaultAccessLevel: LevelAllow, WhenChanged: now}
	o.Policies = []*MailboxPolicy{{GUID: o.newGUID(), Name: "Default", IsDefault: true, AllowSimpleDevicePassword: true,
		MinDevicePasswordLength: 4, MaxInactivityTimeDeviceLock: "Unlimited", DevicePolicyRefreshInterval: "Unlimited", WhenCreated: now, WhenChanged: now}}
	o.Servers = []*Server{{GUID: o.newGUID(), Name: "EX01", FQDN: "ex01." + domain, Site: domain + "/Configuration/Sites/Default-First-Site-Name",
		Version: "Version 15.2 (Build 1544.4)", Edition: "Enterprise", Roles: "Mailbox, ClientAccess"}}
	return o
}

// newGUID returns a deterministic, unique GUID-shaped id; callers hold the lock or own the org.
func (o *Org) newGUID() string {
	o.guidSeq++
	n := o.guidSeq
	return fmt.Sprintf("%08x-%04x-4%03x-8%03x-%012x", uint32(n*2654435761), uint16(n>>7), uint16(n)&0xfff, uint16(n>>3)&0xfff, n*0x9E3779B97F4A7C15&0xffffffffffff)
}

func (o *Org) now() time.Time { return o.Now().UTC() }

// defaultDomain is where new mailboxes go and what a session sees without
// Set-ADServerSettings -ViewEntireForest.
func (o *Org) defaultDomain() *Domain { return o.Domains[0] }

// AddDomain adds a child domain to the forest, for forest-wide scope tests.
func (o *Org) AddDomain(dns string) *Domain {
	o.mu.Lock()
	defer o.mu.Unlock()
	d := &Domain{DNS: dns, NetBIOS: strings.ToUpper(strings.Split(dns, ".")[0]), DC: "DC01." + dns}
	o.Domains = append(o.Domains, d)
	return d
}

// AddServer adds an Exchange server (a CAS the pool can fail over to).
func (o *Org) AddServer(name, fqdn, version string) *Server {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := &Server{GUID: o.newGUID(), Name: name, FQDN: fqdn, Site: o.Servers[0].Site, Version: version, Edition: "Enterprise", Roles: o.Version.roles()}
	o.Servers = append(o.Servers, s)
	return s
}

// SetVersion makes the organisation a release of Exchange: its servers'
// version strings and roles, the cmdlets its sessions have, the shape of
// its objects.
func (o *Org) SetVersion(v Version) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.Version = v
	for _, s := range o.Servers {
		s.Version, s.Roles = v.adminDisplayVersion(), v.roles()
	}
}

// Grant sets the cmdlets the service account's role grants (Get-Command
// reports only these, and calls to others fail as in a real RBAC session).
// An empty list grants every cmdlet the simulator implements.
func (o *Org) Grant(cmdlets []string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.granted = map[string]bool{}
	for _, c := range cmdlets {
		o.granted[strings.ToLower(c)] = true
	}
}

// granted reports whether the role grants a cmdlet.
func (o *Org) isGranted(cmdlet string) bool {
	if len(o.granted) == 0 {
		return true
	}
	return o.granted[strings.ToLower(cmdlet)]
}

// MailboxSpec describes a mailbox to create.
type MailboxSpec struct {
	Alias       string
	DisplayName string
	// Domain is the DNS domain; empty means the forest root.
	Domain string
	// UPN and SMTP default to alias@domain.
	UPN  string
	SMTP string
	OU   string
}

// AddMailbox creates a mailbox, as New-Mailbox would, with ActiveSync
// enabled and the default policy.
func (o *Org) AddMailbox(s MailboxSpec) (*Mailbox, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.addMailboxLocked(s)
}

func (o *Org) addMailboxLocked(s MailboxSpec) (*Mailbox, error) {
	if s.Alias == "" || !validAlias(s.Alias) {
		return nil, fmt.Errorf("alias %q is not valid: use letters, digits and !#$%%&'*+-/=?^_`{|}~. only", s.Alias)
	}
	dom := o.defaultDomain()
	if s.Domain != "" {
		dom = nil
		for _, d := range o.Domains {
			if strings.EqualFold(d.DNS, s.Domain) {
				dom = d
			}
		}
		if dom == nil {
			return nil, fmt.Errorf("domain %q is not in the forest", s.Domain)
		}
	}
	if len(o.byKey[strings.ToLower(s.Alias)]) > 0 {
		return nil, fmt.Errorf("alias %q is already used", s.Alias)
	}
	name := s.DisplayName
	if name == "" {
		name = s.Alias
	}
	upn := s.UPN
	if upn == "" {
		upn = s.Alias + "@" + dom.DNS
	}
	smtp := s.SMTP
	if smtp == "" {
		smtp = s.Alias + "@" + o.defaultDomain().DNS
	}
	ou := s.OU
	if ou == "" {
		ou = "Users"
	}
	now := o.now()
	m := &Mailbox{
		GUID: o.newGUID(), Alias: s.Alias, Name: name, DisplayName: name, UPN: upn, PrimarySMTP: smtp,
		EmailAddresses: []string{"SMTP:" + smtp}, SamAccountName: truncate(s.Alias, 20), Domain: dom, OU: ou,
		WhenCreated: now, WhenChanged: now, ActiveSyncEnabled: true, OWAEnabled: true, EwsEnabled: true, MAPIEnabled: true,
		PopEnabled: true, ImapEnabled: true,
	}
	o.mailboxes = append(o.mailboxes, m)
	o.indexMailbox(m)
	return m, nil
}

func truncate(s string, n int) string {
	r := []rune(s)
	if len(r) > n {
		return string(r[:n])
	}
	return s
}

// validAlias follows Exchange's alias rule: RFC 5322 atom characters and dots.
func validAlias(a string) bool {
	for _, r := range a {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("!#$%&'*+-/=?^_`{|}~.", r)) {
			return false
		}
	}
	return !strings.HasPrefix(a, ".") && !strings.HasSuffix(a, ".")
}

// indexMailbox registers every identity form Exchange resolves.
func (o *Org) indexMailbox(m *Mailbox) {
	keys := []string{m.Alias, m.Name, m.UPN, m.PrimarySMTP, m.GUID, m.DN(), m.Canonical(), m.SamAccountName,
		m.Domain.NetBIOS + `\` + m.SamAccountName, legacyDN(o, m)}
	for _, a := range m.EmailAddresses {
		if i := strings.IndexByte(a, ':'); i >= 0 {
			keys = append(keys, a[i+1:])
		}
	}
	seen := map[string]bool{}
	for _, k := range keys {
		k = strings.ToLower(k)
		if k == "" || seen[k] {
			continue
		}
		seen[k] = true
		o.byKey[k] = append(o.byKey[k], m)
	}
}

func legacyDN(o *Org, m *Mailbox) string {
	return "/o=" + o.Name + "/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)/cn=Recipients/cn=" + m.GUID[:8] + "-" + m.Alias
}

// Mailboxes returns the mailboxes in creation order (the slice is a copy).
func (o *Org) Mailboxes() []*Mailbox {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return append([]*Mailbox(nil), o.mailboxes...)
}

// DeviceCount returns the number of partnerships.
func (o *Org) DeviceCount() int {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.deviceCount
}

// containsFold reports whether list holds id, compared as Exchange compares
// device ids in the lists: case-insensitively (OrdinalIgnoreCase).
func containsFold(list []string, id string) bool {
	for _, v := range list {
		if strings.EqualFold(v, id) {
			return true
		}
	}
	return false
}

func removeFold(list []string, id string) []string {
	out := list[:0:0]
	for _, v := range list {
		if !strings.EqualFold(v, id) {
			out = append(out, v)
		}
	}
	return out
}

// policyOf returns the mailbox's effective policy.
func (o *Org) policyOf(m *Mailbox) *MailboxPolicy {
	if m.Policy != nil {
		return m.Policy
	}
	for _, p := range o.Policies {
		if p.IsDefault {
			return p
		}
	}
	return o.Policies[0]
}

// Evaluate returns the access Exchange gives a device now, following
// Command.DetermineDeviceAccessState (reference/exchange.md §6): monitoring
// mailboxes; the blocked list (blocked wins); the allowed list; device
// discovery while rules exist and the device has not identified itself;
// rules, first match in the order UserAgent, DeviceOS, DeviceModel,
// DeviceType; the organisation's DefaultAccessLevel. A device allowed by
// any of these that cannot enforce its mailbox policy is Blocked/Policy.
func (o *Org) evaluate(d *Device, now time.Time) (AccessState, AccessReason, *DeviceAccessRule) {
	m := d.Mailbox
	if m.Monitoring {
		return StateAllowed, ReasonGlobal, nil
	}
	// The ActiveSync request reads the lists on its CAS's domain controller.
	allowed, blocked := o.listsAt(m, o.easDC())
	if containsFold(blocked, d.DeviceID) {
		return StateBlocked, ReasonIndividual, nil
	}
	policyCheck := func(s AccessState, r AccessReason, rule *DeviceAccessRule) (AccessState, AccessReason, *DeviceAccessRule) {
		if s == StateAllowed && !d.Provisionable && !o.policyOf(m).AllowNonProvisionableDevices {
			return StateBlocked, ReasonPolicy, nil
		}
		return s, r, rule
	}
	if containsFold(allowed, d.DeviceID) {
		return policyCheck(StateAllowed, ReasonIndividual, nil)
	}
	inDiscovery := !d.SentDeviceInfo && now.Sub(d.FirstSyncTime) < o.DiscoveryPeriod
	if len(o.Rules) > 0 && inDiscovery {
		return StateDeviceDiscovery, ReasonDeviceRule, nil
	}
	for _, c := range []Characteristic{CharUserAgent, CharDeviceOS, CharDeviceModel, CharDeviceType} {
		var value string
		switch c {
		case CharUserAgent:
			value = d.UserAgent
		case CharDeviceOS:
			value = d.DeviceOS
		case CharDeviceModel:
			value = d.DeviceModel
		case CharDeviceType:
			value = d.DeviceType
		}
		for _, r := range o.Rules {
			// Exact match, no wildcards (documented). UNCONFIRMED: case
			// sensitivity; compared case-insensitively here.
			if r.Characteristic == c && value != "" && strings.EqualFold(r.QueryString, value) {
				return policyCheck(r.AccessLevel.state(), ReasonDeviceRule, r)
			}
		}
	}
	level := o.Settings.DefaultAccessLevel
	if level == LevelQuarantine && inDiscovery {
		return StateDeviceDiscovery, ReasonGlobal, nil
	}
	return policyCheck(level.state(), ReasonGlobal, nil)
}

// restamp applies Set-CASMailbox's re-stamping after the lists of a
// mailbox changed (reference/exchange.md §3.4): listed devices take their
// list's state at once; devices that were individually allowed or blocked
// and no longer are go back to Unknown until their next request. It
// happens on the domain controller dc the cmdlet wrote the lists to.
func (o *Org) restamp(m *Mailbox, dc string) {
	for _, d := range m.Devices {
		prev := o.stateAt(d, dc)
		state, reason, rule := prev.state, prev.reason, prev.rule
		switch {
		case containsFold(m.Blocked, d.DeviceID):
			state, reason, rule = StateBlocked, ReasonIndividual, nil
		case containsFold(m.Allowed, d.DeviceID):
			state, reason, rule = StateAllowed, ReasonIndividual, nil
		case prev.reason == ReasonIndividual && (prev.state == StateAllowed || prev.state == StateBlocked):
			state, reason, rule = StateUnknown, ReasonUnknown, nil
		}
		o.setState(d, dc, prev, state, reason, rule)
	}
}

// SetDefaultAccessLevel sets the organisation's DefaultAccessLevel (Allow,
// Block or Quarantine), as Set-ActiveSyncOrganizationSettings would.
func (o *Org) SetDefaultAccessLevel(level string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	for i, n := range levelNames {
		if strings.EqualFold(n, level) {
			o.Settings.DefaultAccessLevel = AccessLevel(i)
			o.Settings.WhenChanged = o.now()
			return nil
		}
	}
	return fmt.Errorf("access level %q: use Allow, Block or Quarantine", level)
}

// DefaultAccessLevel returns the organisation's DefaultAccessLevel (Allow,
// Block or Quarantine), as Get-ActiveSyncOrganizationSettings shows it.
func (o *Org) DefaultAccessLevel() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.Settings.DefaultAccessLevel.String()
}
