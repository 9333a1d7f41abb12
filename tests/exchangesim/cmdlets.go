package exchangesim

import (
	"fmt"
	"net/mail"
	"slices"
	"sort"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/easguard/easguard/pkg/exchange"
)

var (
	levelEnum = []string{"Allow", "Block", "Quarantine"}
	charEnum  = []string{"DeviceType", "DeviceModel", "DeviceOS", "UserAgent", "XMSWLHeader"}
)

const (
	levelType = "Microsoft.Exchange.Data.Directory.SystemConfiguration.DeviceAccessLevel"
	charType  = "Microsoft.Exchange.Data.Directory.SystemConfiguration.DeviceAccessCharacteristic"
)

// Filterable properties per object kind (reference/exchange.md §1.2).
var (
	deviceFilterProps = props("ClientType", "DeviceAccessControlRule", "DeviceAccessState", "DeviceAccessStateReason",
		"DeviceActiveSyncVersion", "DeviceId", "DeviceImei", "DeviceMobileOperator", "DeviceModel", "DeviceOS",
		"DeviceOSLanguage", "DeviceTelephoneNumber", "DeviceType", "DeviceUserAgent", "FirstSyncTime", "FriendlyName",
		"ProvisioningFlags", "UserDisplayName")
	recipientFilterProps = props("Alias", "DisplayName", "Name", "PrimarySmtpAddress", "EmailAddresses", "SamAccountName",
		"UserPrincipalName", "Guid", "DistinguishedName", "WhenChanged", "WhenCreated", "HasActiveSyncDevicePartnership",
		"ActiveSyncAllowedDeviceIDs", "ActiveSyncBlockedDeviceIDs", "ActiveSyncEnabled", "ActiveSyncMailboxPolicy",
		"RecipientType", "RecipientTypeDetails")
	classFilterProps = props("DeviceType", "DeviceModel", "LastUpdateTime", "Name")
)

func props(names ...string) map[string]string {
	m := map[string]string{}
	for _, n := range names {
		m[strings.ToLower(n)] = n
	}
	return m
}

// deviceProp returns a device property for filters.
func deviceProp(d *Device, name string) any {
	switch name {
	case "ClientType":
		return d.ClientType
	case "DeviceAccessControlRule":
		if d.Rule != nil {
			return d.Rule.Name()
		}
		return nil
	case "DeviceAccessState":
		return d.State.String()
	case "DeviceAccessStateReason":
		return d.Reason.String()
	case "DeviceActiveSyncVersion":
		return d.ActiveSyncVersion
	case "DeviceId":
		return d.DeviceID
	case "DeviceImei":
		return d.IMEI
	case "DeviceMobileOperator":
		return d.MobileOperator
	case "DeviceModel":
		return d.DeviceModel
	case "DeviceOS":
		return d.DeviceOS
	case "DeviceOSLanguage":
		return d.OSLanguage
	case "DeviceTelephoneNumber":
		return d.TelephoneNumber
	case "DeviceType":
		return d.DeviceType
	case "DeviceUserAgent":
		return d.UserAgent
	case "FirstSyncTime":
		return d.FirstSyncTime
	case "FriendlyName":
		return d.FriendlyName
	case "ProvisioningFlags":
		return int64(0)
	case "UserDisplayName":
		return d.Mailbox.Canonical()
	}
	return nil
}

func recipientProp(o *Org, m *Mailbox, name string) any {
	switch name {
	case "Alias":
		return m.Alias
	case "DisplayName":
		return m.DisplayName
	case "Name":
		return m.Name
	case "PrimarySmtpAddress":
		return m.PrimarySMTP
	case "EmailAddresses":
		return m.EmailAddresses
	case "SamAccountName":
		return m.SamAccountName
	case "UserPrincipalName":
		return m.UPN
	case "Guid":
		return m.GUID
	case "DistinguishedName":
		return m.DN()
	case "WhenChanged":
		return m.WhenChanged
	case "WhenCreated":
		return m.WhenCreated
	case "HasActiveSyncDevicePartnership":
		return m.hasPartnershipFlag()
	case "ActiveSyncAllowedDeviceIDs":
		return m.Allowed
	case "ActiveSyncBlockedDeviceIDs":
		return m.Blocked
	case "ActiveSyncEnabled":
		return m.ActiveSyncEnabled
	case "ActiveSyncMailboxPolicy":
		return o.policyOf(m).Name
	case "RecipientType", "RecipientTypeDetails":
		return "UserMailbox"
	}
	return nil
}

// filterArg parses -Filter, or reports Exchange's binding error.
func (s *Session) filterArg(cmdlet string, a args, allowed map[string]string, out *output) (filterNode, bool) {
	src := a.str("Filter")
	if !a.has("Filter") || src == "" {
		return nil, true
	}
	n, err := parseFilter(src, allowed)
	if err == nil && s.org.caseSensitiveLike {
		n = withCaseSensitiveLike(n)
	}
	if err == nil && s.org.refuseLeadingWildcard {
		if prop, ok := leadingWildcard(n); ok {
			// UNCONFIRMED wording: no Exchange was seen refusing one.
			err = fmt.Errorf("Wildcards at the beginning of a value are not supported for the property %q.", prop)
		}
	}
	if err == nil && dayFirst(s.culture()) {
		// The session's culture reads date literals day first: 12/25/2026
		// cannot be converted, 05/12/2026 is the 5th of December.
		n = withDayFirst(n)
		for _, lit := range dateLiterals(n, func(p string) bool {
			return p == "FirstSyncTime" || p == "WhenChanged" || p == "WhenCreated" || p == "LastUpdateTime"
		}) {
			if _, perr := parseOPATHTime(lit, true); perr != nil {
				// UNCONFIRMED wording of the conversion failure.
				err = fmt.Errorf("The value \"%s\" could not be converted to type System.DateTime.", lit)
			}
		}
	}
	if err != nil {
		out.fail(newError(fmt.Sprintf("Cannot bind parameter 'Filter' to the target. Exception setting \"Filter\": \"%s\"", err.Error()),
			"InvalidArgument", "ParameterBindingException", "ParameterBindingFailed,"+taskClass(cmdlet), ""))
		return nil, false
	}
	return n, true
}

// resolveMailbox finds exactly one mailbox in the session's scope by any
// of the identity forms Exchange accepts.
func (s *Session) resolveMailbox(cmdlet, id string) (*Mailbox, *exchange.Error) {
	var found []*Mailbox
	for _, m := range s.org.byKey[strings.ToLower(strings.TrimSpace(id))] {
		if s.inScope(m) {
			found = append(found, m)
		}
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		e := s.notFound(cmdlet, id)
		return nil, &e
	}
	e := s.ambiguous(cmdlet, id)
	return nil, &e
}

// resolveDevice finds a partnership by GUID, DN, canonical identity, or
// <mailbox>\ExchangeActiveSyncDevices\<type>§<id>.
func (s *Session) resolveDevice(cmdlet, id string) (*Device, *exchange.Error) {
	key := strings.ToLower(strings.TrimSpace(id))
	if d, ok := s.org.byGUID[key]; ok && s.inScope(d.Mailbox) {
		return d, nil
	}
	for _, sep := range []string{`\exchangeactivesyncdevices\`, "/exchangeactivesyncdevices/"} {
		i := strings.LastIndex(key, sep)
		if i < 0 {
			continue
		}
		m, err := s.resolveMailbox(cmdlet, id[:i])
		if err != nil {
			e := s.notFound(cmdlet, id)
			return nil, &e
		}
		name := id[i+len(sep):]
		for _, d := range m.Devices {
			if strings.EqualFold(d.Name(), name) {
				return d, nil
			}
		}
		e := s.notFound(cmdlet, id)
		return nil, &e
	}
	for _, m := range s.org.mailboxes {
		if !s.inScope(m) {
			continue
		}
		for _, d := range m.Devices {
			if strings.EqualFold(d.DN(), id) {
				return d, nil
			}
		}
	}
	e := s.notFound(cmdlet, id)
	return nil, &e
}

// devicesInScope lists partnerships the way Get-MobileDevice does:
// mailbox by mailbox in creation order, monitoring probes hidden unless
// asked for, and only EAS partnerships with -ActiveSync.
func (s *Session) devicesInScope(a args, easOnly bool) []*Device {
	var out []*Device
	monitoring := a.boolean("Monitoring")
	for _, m := range s.org.mailboxes {
		if !s.inScope(m) {
			continue
		}
		for _, d := range m.Devices {
			if d.DeviceType == "EASProbeDeviceType" && !monitoring {
				continue
			}
			if easOnly && d.ClientType != "EAS" {
				continue
			}
			out = append(out, d)
		}
	}
	return out
}

func getDevices(cmdlet string, easOnlyAlways bool) func(s *Session, a args, out *output) {
	return func(s *Session, a args, out *output) {
		matched, ok := func() ([]*Device, bool) {
			s.org.mu.RLock()
			defer s.org.mu.RUnlock()
			f, ok := s.filterArg(cmdlet, a, deviceFilterProps, out)
			if !ok {
				return nil, false
			}
			easOnly := easOnlyAlways || a.boolean("ActiveSync")
			var list []*Device
			switch {
			case a.has("Identity") && a["Identity"] != nil:
				d, err := s.resolveDevice(cmdlet, a.str("Identity"))
				if err != nil {
					out.fail(*err)
					return nil, false
				}
				list = []*Device{d}
			case a.has("Mailbox"):
				m, err := s.resolveMailbox(cmdlet, a.str("Mailbox"))
				if err != nil {
					out.fail(*err)
					return nil, false
				}
				for _, d := range m.Devices {
					if !easOnly || d.ClientType == "EAS" {
						list = append(list, d)
					}
				}
			default:
				list = s.devicesInScope(a, easOnly)
			}
			var matched []*Device
			for _, d := range list {
				if f == nil || f.eval(lastProp(func(p string) any { return s.deviceProp(d, p) })) {
					matched = append(matched, d)
				}
			}
			return matched[:limit(a, len(matched), out)], true
		}()
		if ok {
			emitEach(s.org, matched, s.deviceObject, a.str("SortBy"), out)
		}
	}
}

// emitEach builds and emits one object per item. Objects are built under
// the read lock one at a time and emitted outside it, so a client that
// reads a large listing slowly holds up no writer; with -SortBy all are
// built first, as Exchange must sort before it can emit.
func emitEach[T any](o *Org, items []T, build func(T) exchange.Object, sortBy string, out *output) {
	if sortBy != "" {
		objs := make([]exchange.Object, 0, len(items))
		o.mu.RLock()
		for _, it := range items {
			objs = append(objs, build(it))
		}
		o.mu.RUnlock()
		sortObjects(objs, sortBy)
		for _, obj := range objs {
			out.object(obj)
		}
		return
	}
	for _, it := range items {
		o.mu.RLock()
		obj := build(it)
		o.mu.RUnlock()
		out.object(obj)
	}
}

func getStatistics(cmdlet string) func(s *Session, a args, out *output) {
	return func(s *Session, a args, out *output) {
		list, ok := func() ([]*Device, bool) {
			s.org.mu.RLock()
			defer s.org.mu.RUnlock()
			var list []*Device
			switch {
			case a.has("Mailbox"):
				m, err := s.resolveMailbox(cmdlet, a.str("Mailbox"))
				if err != nil {
					out.fail(*err)
					return nil, false
				}
				list = append(list, m.Devices...)
			case a.has("Identity") && a["Identity"] != nil:
				d, err := s.resolveDevice(cmdlet, a.str("Identity"))
				if err != nil {
					out.fail(*err)
					return nil, false
				}
				list = []*Device{d}
			default:
				// A $null or missing -Identity returns every partnership
				// (reference/exchange.md §2): callers must guard against it.
				list = s.devicesInScope(a, false)
			}
			var keep []*Device
			for _, d := range list {
				if !a.boolean("ActiveSync") || d.ClientType == "EAS" {
					keep = append(keep, d)
				}
			}
			return keep, true
		}()
		if ok {
			emitEach(s.org, list, s.statisticsObject, "", out)
		}
	}
}

// applyMulti applies a bound multi-valued parameter to a list. Adding a
// value already present (case-insensitively) does nothing; UNCONFIRMED:
// Exchange's own behaviour for duplicates in these lists.
func applyMulti(list []string, mv *multi) []string {
	if mv.replace {
		var out []string
		for _, v := range mv.values {
			if !containsFold(out, v) {
				out = append(out, v)
			}
		}
		return out
	}
	out := append([]string(nil), list...)
	for _, v := range mv.rmove {
		out = removeFold(out, v)
	}
	for _, v := range mv.add {
		if !containsFold(out, v) {
			out = append(out, v)
		}
	}
	return out
}

// checkDeviceIDs validates values for the device id lists: at most 32
// characters like the DeviceId attribute, and no NUL, which AD strings
// cannot hold. UNCONFIRMED: that the list attributes enforce the 32
// character limit of msExchDeviceID.
func (s *Session) checkDeviceIDs(cmdlet string, mv *multi, out *output) bool {
	vals := append(append(append([]string(nil), mv.values...), mv.add...), mv.rmove...)
	for _, v := range vals {
		if n := utf8.RuneCountInString(v); n > exchange.MaxDeviceIDLen {
			out.fail(s.tooLong(cmdlet, exchange.MaxDeviceIDLen, n))
			return false
		}
		if strings.ContainsRune(v, 0) {
			out.fail(s.exchangeError(cmdlet, "NotSpecified", "DataValidationException", "", "The value contains a NUL character, which is not valid in a directory string."))
			return false
		}
	}
	return true
}

func setCASMailbox(s *Session, a args, out *output) {
	const cmdlet = "Set-CASMailbox"
	s.org.mu.Lock()
	defer s.org.mu.Unlock()
	m, err := s.resolveMailbox(cmdlet, a.str("Identity"))
	if err != nil {
		out.fail(*err)
		return
	}
	allowedArg, allowedSet := a["ActiveSyncAllowedDeviceIDs"].(*multi)
	blockedArg, blockedSet := a["ActiveSyncBlockedDeviceIDs"].(*multi)
	// The cmdlet reads and writes the lists on its CAS's domain controller.
	prevAllowed, prevBlocked := s.org.listsAt(m, s.server)
	allowed, blocked := prevAllowed, prevBlocked
	if allowedSet {
		if !s.checkDeviceIDs(cmdlet, allowedArg, out) || !s.checkStrictMulti(cmdlet, m, m.Allowed, allowedArg, out) {
			return
		}
		allowed = applyMulti(prevAllowed, allowedArg)
	}
	if blockedSet {
		if !s.checkDeviceIDs(cmdlet, blockedArg, out) || !s.checkStrictMulti(cmdlet, m, m.Blocked, blockedArg, out) {
			return
		}
		blocked = applyMulti(prevBlocked, blockedArg)
	}
	// reference/exchange.md §3.4: editing both lists with an id in both is
	// an error; editing one list removes its ids from the other.
	switch {
	case allowedSet && blockedSet:
		for _, id := range allowed {
			if containsFold(blocked, id) {
				out.fail(s.exchangeError(cmdlet, "InvalidArgument", "ArgumentException", m.Canonical(),
					"The device ID '%s' can't be in both ActiveSyncAllowedDeviceIDs and ActiveSyncBlockedDeviceIDs.", id))
				return
			}
		}
	case allowedSet:
		for _, id := range allowed {
			blocked = removeFold(blocked, id)
		}
	case blockedSet:
		for _, id := range blocked {
			allowed = removeFold(allowed, id)
		}
	}
	// Exchange saves the object only when a property changed; otherwise it
	// warns and writes nothing, so WhenChanged stays and no device is
	// re-stamped (the warning is Exchange's for every Set- cmdlet).
	policy := m.Policy
	modified := !slices.Equal(allowed, m.Allowed) || !slices.Equal(blocked, m.Blocked)
	if a.has("ActiveSyncMailboxPolicy") {
		if a["ActiveSyncMailboxPolicy"] == nil {
			policy = nil
		} else {
			p := s.org.findPolicy(a.str("ActiveSyncMailboxPolicy"))
			if p == nil {
				out.fail(s.notFound(cmdlet, a.str("ActiveSyncMailboxPolicy")))
				return
			}
			policy = p
		}
		// Naming the default policy explicitly clears IsDefaulted, a change.
		modified = modified || policy != m.Policy
	}
	for name, field := range map[string]*bool{
		"ActiveSyncEnabled": &m.ActiveSyncEnabled, "ActiveSyncDebugLogging": &m.ActiveSyncDebugLogging,
		"OWAEnabled": &m.OWAEnabled, "EwsEnabled": &m.EwsEnabled, "MAPIEnabled": &m.MAPIEnabled,
		"PopEnabled": &m.PopEnabled, "ImapEnabled": &m.ImapEnabled,
	} {
		if v, ok := a[name].(bool); ok && *field != v {
			*field, modified = v, true
		}
	}
	if !modified {
		out.warn(fmt.Sprintf("The command completed successfully but no settings of '%s' have been modified.", m.Canonical()))
		return
	}
	listsChanged := !slices.Equal(allowed, m.Allowed) || !slices.Equal(blocked, m.Blocked)
	m.Policy = policy
	m.Allowed, m.Blocked = allowed, blocked
	if !listsChanged || !s.org.listEditsKeepWhenChanged {
		m.WhenChanged = s.org.now()
	}
	if allowedSet || blockedSet {
		s.org.recordLists(m, s.server, prevAllowed, prevBlocked)
		s.org.restamp(m, s.server)
	}
}

// checkStrictMulti refuses, when the organisation is set to (SetStrictLists),
// an @{Add=} of a value already on the list or an @{Remove=} of one that is
// not, as a strict MultiValuedProperty would. UNCONFIRMED: whether Exchange
// does; the messages and ids are invented after MultiValuedProperty's
// duplicate-value error, and refuse the whole call as a terminating error
// would.
func (s *Session) checkStrictMulti(cmdlet string, m *Mailbox, list []string, mv *multi, out *output) bool {
	if mv.replace {
		return true
	}
	if s.org.strictAdd {
		for _, v := range mv.add {
			if containsFold(list, v) {
				out.fail(s.exchangeError(cmdlet, "InvalidOperation", "InvalidOperationException", m.Canonical(),
					"The value \"%s\" is already present in the collection.", v))
				return false
			}
		}
	}
	if s.org.strictRemove {
		for _, v := range mv.rmove {
			if !containsFold(list, v) {
				out.fail(s.exchangeError(cmdlet, "InvalidOperation", "InvalidOperationException", m.Canonical(),
					"The value \"%s\" isn't present in the collection and can't be removed.", v))
				return false
			}
		}
	}
	return true
}

// SetStrictLists makes Set-CASMailbox refuse an @{Add=} of an id already on
// a device list (add) and an @{Remove=} of an id that is not on it
// (remove). Both are off by default, as the simulator has always accepted
// them; which Exchange does is UNCONFIRMED, so tests run both ways.
func (o *Org) SetStrictLists(add, remove bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.strictAdd, o.strictRemove = add, remove
}

// SetListEditsKeepWhenChanged makes a Set-CASMailbox that changes only the
// device lists leave the mailbox's WhenChanged as it was. Off by default:
// the lists are attributes of the user object, and Active Directory stamps
// whenChanged on every write to an object; that Exchange's WhenChanged (and
// a Get-CASMailbox -Filter on it) shows that stamp is UNCONFIRMED, and
// easguard's quick sync depends on it, so tests run both ways.
func (o *Org) SetListEditsKeepWhenChanged(keep bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.listEditsKeepWhenChanged = keep
}

// SetCaseSensitiveLike makes -like and -notlike in -Filter compare case
// by case. Off by default: OPATH filters become LDAP queries, and Active
// Directory matches its string attributes regardless of case, but the
// reference has no source for how Exchange's -like treats case (for
// DeviceId, which a partitioned listing filters on, in particular): it is
// UNCONFIRMED, so tests run both ways.
func (o *Org) SetCaseSensitiveLike(v bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.caseSensitiveLike = v
}

// SetRefuseLeadingWildcard makes -Filter refuse a -like or -notlike whose
// value begins with * ('*a'), as a parameter binding error. Off by
// default: OPATH filters become LDAP queries, which take a final substring
// (attribute=*a), and administrators filter on "EmailAddresses -like
// '*@contoso.com'"; but the reference has no source for it on
// Get-MobileDevice or Get-Recipient (UNCONFIRMED), and easguard's
// partitioned listing relies on it, so tests run both ways.
func (o *Org) SetRefuseLeadingWildcard(v bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.refuseLeadingWildcard = v
}

// SetCallFault makes every call for which fail returns an error end with
// that error after it has produced its objects, as a listing does whose
// domain controller went away part way through; nil removes the fault.
// fail is called without the organisation's lock held.
func (o *Org) SetCallFault(fail func(exchange.Call) *exchange.Error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.callFault = fail
}

// SetStalePartnershipFlag makes a mailbox's HasActiveSyncDevicePartnership
// read (and filter) false although it has partnerships: the flag is stored
// on the mailbox and can be stale, which is why Get-CASMailbox has
// -RecalculateHasActiveSyncDevicePartnership [D7]. How it goes stale in a
// real organisation is not modelled; tests set it. The recalculating switch
// is accepted but does not clear it (UNCONFIRMED whether it rewrites the
// stored flag or only the object it returns).
func (o *Org) SetStalePartnershipFlag(mailbox string, stale bool) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	ms := o.byKey[strings.ToLower(mailbox)]
	if len(ms) != 1 {
		return fmt.Errorf("no single mailbox %q", mailbox)
	}
	ms[0].stalePartnershipFlag = stale
	return nil
}

func getCASMailbox(s *Session, a args, out *output) {
	listMailboxes(s, a, out, "Get-CASMailbox", s.casMailboxObject)
}

func getRecipient(s *Session, a args, out *output) {
	listMailboxes(s, a, out, "Get-Recipient", s.org.recipientObject)
}

func listMailboxes(s *Session, a args, out *output, cmdlet string, obj func(*Mailbox) exchange.Object) {
	matched, ok := func() ([]*Mailbox, bool) {
		s.org.mu.RLock()
		defer s.org.mu.RUnlock()
		f, ok := s.filterArg(cmdlet, a, recipientFilterProps, out)
		if !ok {
			return nil, false
		}
		var list []*Mailbox
		if a.has("Identity") && a["Identity"] != nil {
			m, err := s.resolveMailbox(cmdlet, a.str("Identity"))
			if err != nil {
				out.fail(*err)
				return nil, false
			}
			list = []*Mailbox{m}
		} else {
			for _, m := range s.org.mailboxes {
				if s.inScope(m) {
					list = append(list, m)
				}
			}
		}
		var matched []*Mailbox
		for _, m := range list {
			if f == nil || f.eval(lastProp(func(p string) any { return s.recipientProp(m, p) })) {
				matched = append(matched, m)
			}
		}
		return matched[:limit(a, len(matched), out)], true
	}()
	if ok {
		emitEach(s.org, matched, obj, a.str("SortBy"), out)
	}
}

func (o *Org) findPolicy(id string) *MailboxPolicy {
	for _, p := range o.Policies {
		if strings.EqualFold(p.Name, id) || strings.EqualFold(p.GUID, id) {
			return p
		}
	}
	return nil
}

func (o *Org) findRule(id string) *DeviceAccessRule {
	for _, r := range o.Rules {
		if strings.EqualFold(r.Name(), id) || strings.EqualFold(r.GUID, id) || strings.EqualFold(o.configDN("CN="+escapeDN(r.Name())+",CN=Mobile Mailbox Settings"), id) {
			return r
		}
	}
	return nil
}

func validSMTP(s string) bool {
	a, err := mail.ParseAddress(s)
	return err == nil && a.Address == s && strings.Contains(s[strings.IndexByte(s, '@')+1:], ".")
}

func setOrgSettings(s *Session, a args, out *output) {
	const cmdlet = "Set-ActiveSyncOrganizationSettings"
	s.org.mu.Lock()
	defer s.org.mu.Unlock()
	if id := a.str("Identity"); a.has("Identity") && !strings.EqualFold(id, "Mobile Mailbox Settings") {
		out.fail(s.notFound(cmdlet, id))
		return
	}
	st := s.org.Settings
	if v, ok := a["DefaultAccessLevel"].(string); ok {
		if i := slices.Index(levelEnum, v); i >= 0 {
			st.DefaultAccessLevel = AccessLevel(i)
		}
	}
	for _, f := range []struct {
		name string
		dst  *string
	}{{"UserMailInsert", &st.UserMailInsert}, {"OtaNotificationMailInsert", &st.OtaNotificationMailInsert}} {
		if !a.has(f.name) {
			continue
		}
		v := a.str(f.name)
		if n := utf8.RuneCountInString(v); n > 256 {
			out.fail(s.tooLong(cmdlet, 256, n))
			return
		}
		*f.dst = v
	}
	if mv, ok := a["AdminMailRecipients"].(*multi); ok {
		for _, v := range append(append([]string(nil), mv.values...), mv.add...) {
			if !validSMTP(v) {
				out.fail(bindConvert(cmdlet, "AdminMailRecipients", fmt.Sprintf("Cannot convert value \"%s\" to type \"Microsoft.Exchange.Data.MultiValuedProperty`1[Microsoft.Exchange.Data.SmtpAddress]\". Error: \"The email address \"%s\" isn't correct. Please use this format: user name, the @ sign, followed by the domain name. For example, tonysmith@contoso.com or tony.smith@contoso.com.\"", v, v)))
				return
			}
		}
		st.AdminMailRecipients = applyMulti(st.AdminMailRecipients, mv)
	}
	if v, ok := a["AllowAccessForUnSupportedPlatform"].(bool); ok {
		st.AllowAccessForUnSupportedPlatform = v
	}
	st.WhenChanged = s.org.now()
	s.org.Settings = st
}

var policyParams = []param{
	{name: "AllowNonProvisionableDevices", kind: kBool}, {name: "AllowExternalDeviceManagement", kind: kBool},
	{name: "DevicePasswordEnabled", kind: kBool}, {name: "AlphanumericDevicePasswordRequired", kind: kBool},
	{name: "AllowSimpleDevicePassword", kind: kBool}, {name: "MinDevicePasswordLength", kind: kInt},
	{name: "RequireDeviceEncryption", kind: kBool}, {name: "DeviceEncryptionEnabled", kind: kBool},
	{name: "MaxInactivityTimeDeviceLock", kind: kString}, {name: "DevicePolicyRefreshInterval", kind: kString},
	{name: "IsDefault", kind: kBool},
}

func applyPolicy(o *Org, p *MailboxPolicy, a args) {
	bools := map[string]*bool{
		"AllowNonProvisionableDevices": &p.AllowNonProvisionableDevices, "AllowExternalDeviceManagement": &p.AllowExternalDeviceManagement,
		"DevicePasswordEnabled": &p.DevicePasswordEnabled, "AlphanumericDevicePasswordRequired": &p.AlphanumericPasswordRequired,
		"AllowSimpleDevicePassword": &p.AllowSimpleDevicePassword, "RequireDeviceEncryption": &p.RequireDeviceEncryption,
		"DeviceEncryptionEnabled": &p.RequireDeviceEncryption,
	}
	for n, dst := range bools {
		if v, ok := a[n].(bool); ok {
			*dst = v
		}
	}
	if v, ok := a["MinDevicePasswordLength"].(int64); ok {
		p.MinDevicePasswordLength = int(v)
	}
	for n, dst := range map[string]*string{"MaxInactivityTimeDeviceLock": &p.MaxInactivityTimeDeviceLock, "DevicePolicyRefreshInterval": &p.DevicePolicyRefreshInterval} {
		if a.has(n) {
			*dst = a.str(n)
		}
	}
	if v, ok := a["IsDefault"].(bool); ok && v {
		for _, q := range o.Policies {
			q.IsDefault = false
		}
		p.IsDefault = true
	}
	p.WhenChanged = o.now()
}

func newPolicy(s *Session, a args, out *output) {
	const cmdlet = "New-ActiveSyncMailboxPolicy"
	s.org.mu.Lock()
	defer s.org.mu.Unlock()
	name := a.str("Name")
	if p := s.org.findPolicy(name); p != nil {
		out.fail(s.exchangeError(cmdlet, "NotSpecified", "ADObjectAlreadyExistsException", "",
			"Active Directory operation failed on %s. The object '%s' already exists.", s.dc(), s.org.configDN("CN="+escapeDN(name)+",CN=Mobile Mailbox Policies")))
		return
	}
	now := s.org.now()
	p := &MailboxPolicy{GUID: s.org.newGUID(), Name: name, AllowSimpleDevicePassword: true, MinDevicePasswordLength: 4,
		MaxInactivityTimeDeviceLock: "Unlimited", DevicePolicyRefreshInterval: "Unlimited", WhenCreated: now}
	s.org.Policies = append(s.org.Policies, p)
	applyPolicy(s.org, p, a)
	out.object(s.org.policyObject(p))
}

func setPolicy(s *Session, a args, out *output) {
	s.org.mu.Lock()
	defer s.org.mu.Unlock()
	p := s.org.findPolicy(a.str("Identity"))
	if p == nil {
		out.fail(s.notFound("Set-ActiveSyncMailboxPolicy", a.str("Identity")))
		return
	}
	if a.has("Name") && a.str("Name") != "" {
		p.Name = a.str("Name")
	}
	applyPolicy(s.org, p, a)
}

func removePolicy(s *Session, a args, out *output) {
	const cmdlet = "Remove-ActiveSyncMailboxPolicy"
	s.org.mu.Lock()
	defer s.org.mu.Unlock()
	p := s.org.findPolicy(a.str("Identity"))
	if p == nil {
		out.fail(s.notFound(cmdlet, a.str("Identity")))
		return
	}
	if p.IsDefault {
		// UNCONFIRMED wording.
		out.fail(s.exchangeError(cmdlet, "InvalidOperation", "InvalidOperationException", p.Name,
			"The default mobile device mailbox policy '%s' can't be removed. Make another policy the default first.", p.Name))
		return
	}
	var keep []*MailboxPolicy
	for _, q := range s.org.Policies {
		if q != p {
			keep = append(keep, q)
		}
	}
	s.org.Policies = keep
	for _, m := range s.org.mailboxes {
		if m.Policy == p {
			m.Policy = nil
		}
	}
}

func newRule(s *Session, a args, out *output) {
	const cmdlet = "New-ActiveSyncDeviceAccessRule"
	s.org.mu.Lock()
	defer s.org.mu.Unlock()
	r := &DeviceAccessRule{GUID: s.org.newGUID(), QueryString: a.str("QueryString")}
	if i := slices.Index(charEnum, a.str("Characteristic")); i >= 0 {
		r.Characteristic = Characteristic(i)
	}
	if i := slices.Index(levelEnum, a.str("AccessLevel")); i >= 0 {
		r.AccessLevel = AccessLevel(i)
	}
	if s.org.findRule(r.Name()) != nil {
		// UNCONFIRMED wording.
		out.fail(s.exchangeError(cmdlet, "NotSpecified", "ADObjectAlreadyExistsException", "",
			"Active Directory operation failed on %s. The object '%s' already exists.", s.dc(), s.org.configDN("CN="+escapeDN(r.Name())+",CN=Mobile Mailbox Settings")))
		return
	}
	r.WhenCreated, r.WhenChanged = s.org.now(), s.org.now()
	s.org.Rules = append(s.org.Rules, r)
	out.object(s.org.ruleObject(r))
}

func setRule(s *Session, a args, out *output) {
	s.org.mu.Lock()
	defer s.org.mu.Unlock()
	r := s.org.findRule(a.str("Identity"))
	if r == nil {
		out.fail(s.notFound("Set-ActiveSyncDeviceAccessRule", a.str("Identity")))
		return
	}
	if i := slices.Index(levelEnum, a.str("AccessLevel")); i >= 0 {
		r.AccessLevel = AccessLevel(i)
	}
	r.WhenChanged = s.org.now()
}

func removeRule(s *Session, a args, out *output) {
	s.org.mu.Lock()
	defer s.org.mu.Unlock()
	r := s.org.findRule(a.str("Identity"))
	if r == nil {
		out.fail(s.notFound("Remove-ActiveSyncDeviceAccessRule", a.str("Identity")))
		return
	}
	var keep []*DeviceAccessRule
	for _, q := range s.org.Rules {
		if q != r {
			keep = append(keep, q)
		}
	}
	s.org.Rules = keep
	for _, m := range s.org.mailboxes {
		for _, d := range m.Devices {
			if d.Rule == r {
				d.Rule = nil
			}
		}
	}
}

func clearDevice(s *Session, a args, out *output) {
	s.org.mu.Lock()
	defer s.org.mu.Unlock()
	d, err := s.resolveDevice("Clear-ActiveSyncDevice", a.str("Identity"))
	if err != nil {
		out.fail(*err)
		return
	}
	if a.boolean("Cancel") {
		d.WipeRequestTime, d.WipeSentTime, d.WipeRequestor = time.Time{}, time.Time{}, ""
		return
	}
	d.WipeRequestTime = s.org.now()
	d.WipeRequestor = s.user
	if mv, ok := a["NotificationEmailAddresses"].(*multi); ok {
		d.WipeNotify = applyMulti(nil, mv)
	}
	d.WhenChanged = s.org.now()
}

func removeDevice(s *Session, a args, out *output) {
	s.org.mu.Lock()
	defer s.org.mu.Unlock()
	d, err := s.resolveDevice("Remove-ActiveSyncDevice", a.str("Identity"))
	if err != nil {
		out.fail(*err)
		return
	}
	s.org.removeDeviceLocked(d)
}

func (o *Org) removeDeviceLocked(d *Device) {
	m := d.Mailbox
	var keep []*Device
	for _, x := range m.Devices {
		if x != d {
			keep = append(keep, x)
		}
	}
	m.Devices = keep
	delete(o.byGUID, strings.ToLower(d.GUID))
	o.deviceCount--
}

func init() {
	identity := param{name: "Identity", kind: kString, set: "Identity"}
	deviceListing := []param{
		identity, {name: "Mailbox", kind: kIdentity, set: "Mailbox", mandatory: true},
		{name: "Filter", kind: kString}, {name: "ResultSize", kind: kUnlimited}, {name: "SortBy", kind: kString},
		{name: "OrganizationalUnit", kind: kString}, {name: "Monitoring", kind: kSwitch},
	}
	register(&cmdlet{name: "Get-MobileDevice", defaultSet: "Identity", params: append(append([]param(nil), deviceListing...),
		param{name: "ActiveSync", kind: kSwitch}, param{name: "OWAforDevices", kind: kSwitch},
		param{name: "RestApi", kind: kSwitch}, param{name: "UniversalOutlook", kind: kSwitch}),
		run: getDevices("Get-MobileDevice", false)})
	register(&cmdlet{name: "Get-ActiveSyncDevice", defaultSet: "Identity", params: deviceListing,
		run: getDevices("Get-ActiveSyncDevice", true)})
	statParams := []param{identity, {name: "Mailbox", kind: kIdentity, set: "Mailbox", mandatory: true},
		{name: "GetMailboxLog", kind: kSwitch}, {name: "NotificationEmailAddresses", kind: kMulti}, {name: "ShowRecoveryPassword", kind: kSwitch}}
	register(&cmdlet{name: "Get-MobileDeviceStatistics", defaultSet: "Identity", params: append(append([]param(nil), statParams...),
		param{name: "ActiveSync", kind: kSwitch}, param{name: "OWAforDevices", kind: kSwitch},
		param{name: "RestApi", kind: kSwitch}, param{name: "UniversalOutlook", kind: kSwitch}),
		run: getStatistics("Get-MobileDeviceStatistics")})
	register(&cmdlet{name: "Get-ActiveSyncDeviceStatistics", defaultSet: "Identity", params: statParams,
		run: getStatistics("Get-ActiveSyncDeviceStatistics")})

	mailboxListing := []param{{name: "Identity", kind: kString}, {name: "Filter", kind: kString}, {name: "ResultSize", kind: kUnlimited},
		{name: "SortBy", kind: kString}, {name: "OrganizationalUnit", kind: kString}, {name: "Anr", kind: kString},
		{name: "IgnoreDefaultScope", kind: kSwitch}, {name: "ReadFromDomainController", kind: kSwitch}}
	register(&cmdlet{name: "Get-CASMailbox", params: append(append([]param(nil), mailboxListing...),
		param{name: "ActiveSyncDebugLogging", kind: kSwitch}, param{name: "ProtocolSettings", kind: kSwitch},
		param{name: "RecalculateHasActiveSyncDevicePartnership", kind: kSwitch}), run: getCASMailbox})
	register(&cmdlet{name: "Get-Recipient", params: append(append([]param(nil), mailboxListing...),
		param{name: "RecipientType", kind: kStrings}, param{name: "RecipientTypeDetails", kind: kStrings}), run: getRecipient})
	register(&cmdlet{name: "Set-CASMailbox", shouldProcess: true, write: true, params: []param{
		{name: "Identity", kind: kIdentity, mandatory: true},
		{name: "ActiveSyncAllowedDeviceIDs", kind: kMulti}, {name: "ActiveSyncBlockedDeviceIDs", kind: kMulti},
		{name: "ActiveSyncEnabled", kind: kBool}, {name: "ActiveSyncMailboxPolicy", kind: kString},
		{name: "ActiveSyncDebugLogging", kind: kBool}, {name: "ActiveSyncSuppressReadReceipt", kind: kBool},
		{name: "OWAEnabled", kind: kBool}, {name: "EwsEnabled", kind: kBool}, {name: "MAPIEnabled", kind: kBool},
		{name: "PopEnabled", kind: kBool}, {name: "ImapEnabled", kind: kBool},
	}, run: setCASMailbox})

	register(&cmdlet{name: "Get-ActiveSyncOrganizationSettings", params: []param{{name: "Identity", kind: kString}},
		run: func(s *Session, a args, out *output) {
			s.org.mu.RLock()
			defer s.org.mu.RUnlock()
			if id := a.str("Identity"); a.has("Identity") && id != "" && !strings.EqualFold(id, "Mobile Mailbox Settings") {
				out.fail(s.notFound("Get-ActiveSyncOrganizationSettings", id))
				return
			}
			out.object(s.org.orgSettingsObject())
		}})
	register(&cmdlet{name: "Set-ActiveSyncOrganizationSettings", shouldProcess: true, write: true, params: []param{
		{name: "Identity", kind: kString},
		{name: "DefaultAccessLevel", kind: kEnum, enum: levelEnum, enumType: levelType},
		{name: "AdminMailRecipients", kind: kMulti}, {name: "UserMailInsert", kind: kString},
		{name: "OtaNotificationMailInsert", kind: kString}, {name: "AllowAccessForUnSupportedPlatform", kind: kBool},
	}, run: setOrgSettings})

	register(&cmdlet{name: "Get-ActiveSyncMailboxPolicy", params: []param{{name: "Identity", kind: kString}},
		run: getConfigObjects("Get-ActiveSyncMailboxPolicy", func(o *Org) []*MailboxPolicy { return o.Policies }, (*Org).findPolicy, (*Org).policyObject)})
	register(&cmdlet{name: "New-ActiveSyncMailboxPolicy", shouldProcess: true, write: true,
		params: append([]param{{name: "Name", kind: kIdentity, mandatory: true}}, policyParams...), run: newPolicy})
	register(&cmdlet{name: "Set-ActiveSyncMailboxPolicy", shouldProcess: true, write: true,
		params: append([]param{{name: "Identity", kind: kIdentity, mandatory: true}, {name: "Name", kind: kString}}, policyParams...), run: setPolicy})
	register(&cmdlet{name: "Remove-ActiveSyncMailboxPolicy", shouldProcess: true, confirmHigh: true, write: true,
		params: []param{{name: "Identity", kind: kIdentity, mandatory: true}}, run: removePolicy})

	register(&cmdlet{name: "Get-ActiveSyncDeviceAccessRule", params: []param{{name: "Identity", kind: kString}},
		run: getConfigObjects("Get-ActiveSyncDeviceAccessRule", func(o *Org) []*DeviceAccessRule { return o.Rules }, (*Org).findRule, (*Org).ruleObject)})
	register(&cmdlet{name: "New-ActiveSyncDeviceAccessRule", shouldProcess: true, write: true, params: []param{
		{name: "QueryString", kind: kIdentity, mandatory: true},
		{name: "Characteristic", kind: kEnum, enum: charEnum, enumType: charType, mandatory: true},
		{name: "AccessLevel", kind: kEnum, enum: levelEnum, enumType: levelType, mandatory: true},
	}, run: newRule})
	register(&cmdlet{name: "Set-ActiveSyncDeviceAccessRule", shouldProcess: true, write: true, params: []param{
		{name: "Identity", kind: kIdentity, mandatory: true},
		{name: "AccessLevel", kind: kEnum, enum: levelEnum, enumType: levelType},
	}, run: setRule})
	register(&cmdlet{name: "Remove-ActiveSyncDeviceAccessRule", shouldProcess: true, confirmHigh: true, write: true,
		params: []param{{name: "Identity", kind: kIdentity, mandatory: true}}, run: removeRule})

	register(&cmdlet{name: "Get-ActiveSyncDeviceClass", params: []param{{name: "Identity", kind: kString}, {name: "Filter", kind: kString},
		{name: "ResultSize", kind: kUnlimited}, {name: "SortBy", kind: kString}},
		run: func(s *Session, a args, out *output) {
			s.org.mu.RLock()
			defer s.org.mu.RUnlock()
			f, ok := s.filterArg("Get-ActiveSyncDeviceClass", a, classFilterProps, out)
			if !ok {
				return
			}
			keys := make([]string, 0, len(s.org.classes))
			for k := range s.org.classes {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			var objs []exchange.Object
			for _, k := range keys {
				if a.has("Identity") && a["Identity"] != nil && !strings.EqualFold(a.str("Identity"), k) {
					continue
				}
				obj := s.org.deviceClassObject(k, s.org.classes[k])
				if f != nil && !f.eval(func(p string) any {
					if p == "LastUpdateTime" {
						return s.org.classes[k]
					}
					return obj[p]
				}) {
					continue
				}
				objs = append(objs, obj)
			}
			n := limit(a, len(objs), out)
			sortObjects(objs[:n], a.str("SortBy"))
			for _, o := range objs[:n] {
				out.object(o)
			}
		}})

	register(&cmdlet{name: "Get-ExchangeServer", params: []param{{name: "Identity", kind: kString}, {name: "Domain", kind: kString}, {name: "Status", kind: kSwitch}},
		run: func(s *Session, a args, out *output) {
			s.org.mu.RLock()
			defer s.org.mu.RUnlock()
			found := false
			for _, srv := range s.org.Servers {
				if a.has("Identity") && a["Identity"] != nil && !strings.EqualFold(a.str("Identity"), srv.Name) && !strings.EqualFold(a.str("Identity"), srv.FQDN) {
					continue
				}
				found = true
				out.object(s.org.serverObject(srv))
			}
			if !found && a.has("Identity") {
				out.fail(s.notFound("Get-ExchangeServer", a.str("Identity")))
			}
		}})
	register(&cmdlet{name: "Get-ClientAccessService", params: []param{{name: "Identity", kind: kString},
		{name: "IncludeAlternateServiceAccountCredentialStatus", kind: kSwitch}, {name: "IncludeAlternateServiceAccountCredentialPassword", kind: kSwitch}},
		run: func(s *Session, a args, out *output) {
			s.org.mu.RLock()
			defer s.org.mu.RUnlock()
			for _, srv := range s.org.Servers {
				if !strings.Contains(srv.Roles, "ClientAccess") {
					continue
				}
				if a.has("Identity") && a["Identity"] != nil && !strings.EqualFold(a.str("Identity"), srv.Name) && !strings.EqualFold(a.str("Identity"), srv.FQDN) {
					continue
				}
				out.object(s.org.casServiceObject(srv))
			}
		}})

	register(&cmdlet{name: "Clear-ActiveSyncDevice", shouldProcess: true, confirmHigh: true, write: true, params: []param{
		{name: "Identity", kind: kIdentity, mandatory: true}, {name: "Cancel", kind: kSwitch}, {name: "NotificationEmailAddresses", kind: kMulti},
	}, run: clearDevice})
	register(&cmdlet{name: "Remove-ActiveSyncDevice", shouldProcess: true, confirmHigh: true, write: true, params: []param{
		{name: "Identity", kind: kIdentity, mandatory: true},
	}, run: removeDevice})

	register(&cmdlet{name: "Set-ADServerSettings", params: []param{
		{name: "ViewEntireForest", kind: kBool}, {name: "PreferredServer", kind: kString}, {name: "PreferredGlobalCatalog", kind: kString},
		{name: "ConfigurationDomainController", kind: kString}, {name: "RecipientViewRoot", kind: kString},
		{name: "SetPreferredDomainControllers", kind: kStrings}, {name: "RunspaceServerSettings", kind: kString},
	}, run: func(s *Session, a args, out *output) {
		if v, ok := a["ViewEntireForest"].(bool); ok {
			s.viewEntireForest = v
		}
		if a.has("RecipientViewRoot") {
			root := strings.ToLower(a.str("RecipientViewRoot"))
			s.viewEntireForest = false
			for _, d := range s.org.Domains {
				if strings.HasPrefix(root, strings.ToLower(d.DNS)) && d != s.org.defaultDomain() {
					s.viewEntireForest = true
				}
			}
		}
	}})

	register(&cmdlet{name: "Get-Command", core: true, params: []param{
		{name: "Name", kind: kStrings}, {name: "Module", kind: kStrings}, {name: "CommandType", kind: kString},
		{name: "Noun", kind: kStrings}, {name: "Verb", kind: kStrings},
	}, run: getCommand})
}

// getConfigObjects is the Get- cmdlet of an organisation-wide object
// list: one object by -Identity, or all of them.
func getConfigObjects[T any](cmdlet string, all func(*Org) []*T, find func(*Org, string) *T, obj func(*Org, *T) exchange.Object) func(*Session, args, *output) {
	return func(s *Session, a args, out *output) {
		s.org.mu.RLock()
		defer s.org.mu.RUnlock()
		if a.has("Identity") && a["Identity"] != nil {
			x := find(s.org, a.str("Identity"))
			if x == nil {
				out.fail(s.notFound(cmdlet, a.str("Identity")))
				return
			}
			out.object(obj(s.org, x))
			return
		}
		for _, x := range all(s.org) {
			out.object(obj(s.org, x))
		}
	}
}

func getCommand(s *Session, a args, out *output) {
	cmdType, module := "Cmdlet", "Microsoft.Exchange.Management.PowerShell.SnapIn"
	if s.mode == "remote" {
		cmdType, module = "Function", "tmp_easguard_exchange"
	}
	obj := func(name string) exchange.Object {
		return exchange.Object{"Name": name, "CommandType": cmdType, "ModuleName": module, "Source": module, "Version": "1.0", "Visibility": "Public"}
	}
	if mv, ok := a["Name"].(*multi); ok && len(mv.values) > 0 {
		for _, n := range mv.values {
			c := cmdlets[strings.ToLower(n)]
			if c == nil || !s.available(c.name) {
				out.fail(commandNotFound(n))
				continue
			}
			out.object(obj(c.name))
		}
		return
	}
	var names []string
	for _, c := range cmdlets {
		if !c.core && s.available(c.name) {
			names = append(names, c.name)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		out.object(obj(n))
	}
}
