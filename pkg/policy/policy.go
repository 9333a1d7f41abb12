package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// SchemaVersion is the only version of the policy file format there is.
// Files say it in their "version" key so that a later format can be told
// apart instead of being misread.
const SchemaVersion = 1

// MaxGracePeriod bounds grace_period: a grace period longer than a year is
// not a grace period but a way of switching the gate off.
const MaxGracePeriod = 365 * 24 * time.Hour

// Action is what a rule does to a device it catches. Administrators choose
// between Block (the device is refused outright) and Quarantine (Exchange
// holds it and the administrator can release it from the Exchange admin
// centre), so only those two are offered; Allow is reserved to exemptions,
// grace and compliance.
type Action string

const (
	// ActionBlock blocks the device on Exchange.
	ActionBlock Action = "block"
	// ActionQuarantine quarantines the device on Exchange.
	ActionQuarantine Action = "quarantine"
)

// desired maps an action to what Exchange should do. Anything but
// quarantine blocks, so that a hand-built policy with an empty or misspelt
// action fails closed instead of allowing.
func (a Action) desired() ev.DesiredAccess {
	if a == ActionQuarantine {
		return ev.DesiredAccess_DESIRED_ACCESS_QUARANTINE
	}
	return ev.DesiredAccess_DESIRED_ACCESS_BLOCK
}

// Policy is one Exchange organisation's policy, with one field per key of
// the YAML file. Obtain one from Parse, Load or Default; a Policy that is
// built or changed by hand should be checked with Validate. A Policy is
// read-only once shared: Evaluate and Version may run concurrently, but not
// with a change to the fields.
type Policy struct {
	// SchemaVersion is the file's "version" key. It is not called Version
	// because the Version method is the policy's content hash, which is what
	// decisions record.
	SchemaVersion int
	// Org is the organisation the policy is for. Evaluate refuses inputs of
	// another organisation, so that a policy file copied to the wrong place
	// cannot decide for mailboxes it was not written for.
	Org string
	// DryRun makes easguard decide and record but never change Exchange or
	// mail users, so that a policy can be tried on the real fleet first.
	DryRun bool
	// Scope says whose partnerships easguard manages at all.
	Scope Scope
	// Groups are named lists of address patterns that Scope refers to.
	// easguard does not read Exchange group membership, so groups are
	// written out here.
	Groups map[string][]string
	// UnknownDevice is the action for devices without a usable, enrolled
	// MDM record once any grace period is over.
	UnknownDevice Action
	// Noncompliant is the action for enrolled devices the MDM does not
	// report compliant.
	Noncompliant Action
	// AllowedPlatforms lists the platforms that may sync; empty allows
	// every platform.
	AllowedPlatforms []ev.Platform
	// PlatformNotAllowed is the action for devices of other platforms.
	PlatformNotAllowed Action
	// GracePeriod lets an unknown device sync for this long after its first
	// sync, so that a new phone works while its user enrols it instead of
	// being cut off on day one. Zero disables it.
	GracePeriod time.Duration
	// Exemptions always allow what they name (break-glass), until they
	// expire.
	Exemptions []Exemption
	// Notify asks for the users of blocked or quarantined devices to be told
	// how to enrol.
	Notify bool
	// TrustMDMRecordsWithoutUser lets an MDM record that names no user count
	// for whichever mailbox's partnership reports its EAS device id. Off by
	// default: the EAS id is chosen by the phone, so without a user on the
	// record a phone that copies an enrolled phone's id would inherit its
	// compliance. The matcher reports such a join as
	// NO_MATCH_REASON_RECORD_WITHOUT_USER and Evaluate uses the record only
	// when this is on.
	TrustMDMRecordsWithoutUser bool
	// DefaultAccessLevel is what easguard makes the organisation's
	// DefaultAccessLevel (see OrgDefault). Exchange applies a changed
	// default to every partnership that no list entry or rule covers, so
	// the evaluator plans a tightening as a mass revocation.
	DefaultAccessLevel DefaultLevel
}

// Scope selects the mailboxes easguard manages. Exclude wins over Include
// so that an administrator can carve service accounts or a VIP out of a
// broad include without rewriting it.
type Scope struct {
	// Include selects the managed mailboxes; an empty Include selects all.
	Include Selector
	// Exclude removes mailboxes from the managed set.
	Exclude Selector
}

// Selector matches mailboxes by address. A mailbox matches when its primary
// SMTP address or its UPN matches any entry of any of the three lists.
type Selector struct {
	// Mailboxes are address patterns (local@domain, "*" matches any run of
	// characters), compared case-insensitively.
	Mailboxes []string
	// Domains are domain patterns compared with the address's domain part;
	// "contoso.com" does not match sub-domains, "*.contoso.com" does.
	Domains []string
	// Groups are names of entries of Policy.Groups.
	Groups []string
}

// empty reports whether the selector names nothing.
func (s Selector) empty() bool {
	return len(s.Mailboxes) == 0 && len(s.Domains) == 0 && len(s.Groups) == 0
}

// Exemption always allows the devices it names: a mailbox (every device of
// it), a device of a mailbox (Mailbox with DeviceID or DeviceType), or,
// only with TrustClientReported, a device id or type on any mailbox. The
// device id and type are values the phone reports about itself, so an
// exemption by them alone admits every phone that claims them; bound to a
// mailbox, only a phone that also holds that mailbox's credentials can.
// The reason is mandatory because every exemption is a hole in the gate
// that an auditor will ask about.
type Exemption struct {
	// DeviceID is an EAS device id, compared case-insensitively.
	DeviceID string
	// DeviceType is an EAS device type (for example "EASProbeDeviceType"),
	// compared case-insensitively.
	DeviceType string
	// Mailbox is an exact address (primary SMTP or UPN); wildcards are not
	// accepted, so that one exemption cannot silently cover a whole domain.
	// With DeviceID or DeviceType it binds the exemption to that mailbox.
	Mailbox string
	// TrustClientReported acknowledges that an exemption without Mailbox
	// trusts a value any phone can claim; validation refuses such an
	// exemption without it.
	TrustClientReported bool
	// Reason says why, for administrators and the audit log.
	Reason string
	// Until ends the exemption; zero means it never ends. Timed exemptions
	// exist so that a break-glass cannot be forgotten and stay open.
	Until time.Time
}

// active reports whether the exemption is still valid at now.
func (e Exemption) active(now time.Time) bool {
	return e.Until.IsZero() || now.Before(e.Until)
}

// Default returns the policy easguard applies when an organisation has no
// file: everyone in scope, unknown and noncompliant devices blocked, every
// platform allowed, users notified. Parse starts from the same values, so a
// file only has to say what differs.
func Default(org string) *Policy {
	return &Policy{
		SchemaVersion:      SchemaVersion,
		Org:                org,
		UnknownDevice:      ActionBlock,
		Noncompliant:       ActionBlock,
		PlatformNotAllowed: ActionBlock,
		Notify:             true,
	}
}

// platformNames are the YAML names of the platforms, in the enum's order.
var platformNames = map[ev.Platform]string{
	ev.Platform_PLATFORM_IOS:     "ios",
	ev.Platform_PLATFORM_IPADOS:  "ipados",
	ev.Platform_PLATFORM_ANDROID: "android",
	ev.Platform_PLATFORM_WINDOWS: "windows",
	ev.Platform_PLATFORM_MACOS:   "macos",
	ev.Platform_PLATFORM_OTHER:   "other",
}

// PlatformName returns the name the policy file uses for a platform ("ios",
// "android", …), or "" for PLATFORM_UNSPECIFIED and unknown values, so that
// reasons and the console speak the file's language.
func PlatformName(p ev.Platform) string { return platformNames[p] }

// platformByName is the inverse of platformNames.
func platformByName(name string) (ev.Platform, bool) {
	for p, n := range platformNames {
		if n == name {
			return p, true
		}
	}
	return ev.Platform_PLATFORM_UNSPECIFIED, false
}

// platformList is the list of platform names for error messages.
const platformList = "ios, ipados, android, windows, macos, other"

// orgPattern is the organisation-name rule of pkg/bus (ParseOrg), repeated
// here so that a policy naming an org that can never receive events is
// refused when it is loaded; policy stays free of NATS dependencies.
var orgPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)

// groupNamePattern keeps group names plain so that they read well in paths
// and reasons.
var groupNamePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// maxDeviceIDLen is Exchange's limit on a device id.
const maxDeviceIDLen = ev.MaxDeviceIDLen

// maxDeviceTypeLen is generous for EAS device types, which are short words.
const maxDeviceTypeLen = 64

// maxAddressLen is the longest address (RFC 5321: 64 + 1 + 255).
const maxAddressLen = 320

// Validate checks a policy the way Parse does, for policies built or changed
// in code. The error wraps ErrInvalid and is an *Error listing every problem
// by path; it is nil for a valid policy.
func (p *Policy) Validate() error {
	if p == nil {
		return &Error{Problems: []Problem{{Message: "policy is nil"}}}
	}
	if probs := p.problems(); len(probs) > 0 {
		return &Error{Problems: probs}
	}
	return nil
}

// problems lists what is semantically wrong with p, by path.
func (p *Policy) problems() []Problem {
	var v validator
	if p.SchemaVersion != SchemaVersion {
		v.add("version", "%d is not supported (only %d is)", p.SchemaVersion, SchemaVersion)
	}
	switch {
	case p.Org == "":
		v.add("org", "is missing")
	case !orgPattern.MatchString(p.Org):
		v.add("org", "%q is not an organisation name (1 to 63 lower-case letters, digits, '-' or '_', starting with a letter or digit)", p.Org)
	}
	for _, name := range slices.Sorted(maps.Keys(p.Groups)) {
		members := p.Groups[name]
		if !groupNamePattern.MatchString(name) {
			v.probs = append(v.probs, Problem{
				Path:    "groups",
				Message: fmt.Sprintf("%q is not a group name (up to 64 letters, digits, '.', '-', '_', starting with a letter or digit)", name),
				at:      "groups." + name,
			})
		}
		for i, m := range members {
			v.address(fmt.Sprintf("groups.%s[%d]", name, i), m, true)
		}
	}
	v.selector("scope.include", p.Scope.Include, p.Groups)
	v.selector("scope.exclude", p.Scope.Exclude, p.Groups)
	v.action("unknown_device", p.UnknownDevice)
	v.action("noncompliant", p.Noncompliant)
	v.action("platform_not_allowed", p.PlatformNotAllowed)
	v.defaultProblems(p)
	for i, pl := range p.AllowedPlatforms {
		if PlatformName(pl) == "" {
			v.add(fmt.Sprintf("allowed_platforms[%d]", i), "%v is not a platform (%s)", pl, platformList)
		}
	}
	if p.GracePeriod < 0 {
		v.add("grace_period", "%v is negative", p.GracePeriod)
	} else if p.GracePeriod > MaxGracePeriod {
		v.add("grace_period", "%v is longer than 365 days", p.GracePeriod)
	}
	for i, e := range p.Exemptions {
		v.exemption(fmt.Sprintf("exemptions[%d]", i), e)
	}
	return v.probs
}

// validator collects problems.
type validator struct{ probs []Problem }

func (v *validator) add(path, format string, args ...any) {
	v.probs = append(v.probs, Problem{Path: path, Message: fmt.Sprintf(format, args...)})
}

func (v *validator) action(path string, a Action) {
	if a != ActionBlock && a != ActionQuarantine {
		v.add(path, "%q is not block or quarantine", string(a))
	}
}

func (v *validator) selector(path string, s Selector, groups map[string][]string) {
	for i, m := range s.Mailboxes {
		v.address(fmt.Sprintf("%s.mailboxes[%d]", path, i), m, true)
	}
	for i, d := range s.Domains {
		if !validDomain(d, true) {
			v.add(fmt.Sprintf("%s.domains[%d]", path, i), "%q is not a domain name", d)
		}
	}
	for i, g := range s.Groups {
		if _, ok := groups[g]; !ok {
			v.probs = append(v.probs, Problem{
				Path:    "groups",
				Message: fmt.Sprintf("%q used in %s.groups is not defined", g, path),
				at:      fmt.Sprintf("%s.groups[%d]", path, i),
			})
		}
	}
}

func (v *validator) address(path, a string, wildcard bool) {
	if !validAddress(a, wildcard) {
		if wildcard {
			v.add(path, "%q is not an address or address pattern (local@domain, '*' allowed)", a)
		} else {
			v.add(path, "%q is not an address (local@domain, no wildcards)", a)
		}
	}
}

func (v *validator) exemption(path string, e Exemption) {
	switch {
	case e.DeviceID == "" && e.DeviceType == "" && e.Mailbox == "":
		v.add(path, "needs a mailbox, a mailbox with a device_id or device_type, or (with trust_client_reported) a device_id or device_type")
	case e.DeviceID != "" && e.DeviceType != "":
		v.add(path, "has both device_id and device_type; give one of them")
	case e.Mailbox == "" && !e.TrustClientReported:
		what, val := "device_id", e.DeviceID
		if e.DeviceType != "" {
			what, val = "device_type", e.DeviceType
		}
		v.add(path, "exempts every phone that reports %s %q on any mailbox, a value the phone chooses itself; bind it to a mailbox (mailbox: user@domain) or acknowledge the risk with trust_client_reported: true", what, val)
	case e.Mailbox != "" && e.TrustClientReported:
		v.add(path+".trust_client_reported", "is only for exemptions without a mailbox; this one is bound to %s", e.Mailbox)
	}
	if e.DeviceID != "" && !validToken(e.DeviceID, maxDeviceIDLen) {
		v.add(path+".device_id", "%q is not a device id (1 to %d characters, no spaces or '*')", e.DeviceID, maxDeviceIDLen)
	}
	if e.DeviceType != "" && !validToken(e.DeviceType, maxDeviceTypeLen) {
		v.add(path+".device_type", "%q is not a device type (1 to %d characters, no spaces or '*')", e.DeviceType, maxDeviceTypeLen)
	}
	if e.Mailbox != "" {
		v.address(path+".mailbox", e.Mailbox, false)
	}
	if strings.TrimSpace(e.Reason) == "" {
		v.add(path+".reason", "is missing: every exemption needs a reason for the audit log")
	} else if !utf8.ValidString(e.Reason) {
		v.add(path+".reason", "is not valid UTF-8")
	}
}

// validToken accepts device ids and types: printable, no spaces, no
// wildcard, at most max characters.
func validToken(s string, max int) bool {
	if s == "" || !utf8.ValidString(s) || utf8.RuneCountInString(s) > max {
		return false
	}
	for _, r := range s {
		if r == '*' || unicode.IsSpace(r) || !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

// validAddress accepts local@domain with a non-empty local part and a
// domain (pattern) with a dot, or, with wildcard, "*" in either part.
// Lists separated by commas or semicolons and display-name forms are
// refused, because they are the usual copy-and-paste mistakes.
func validAddress(a string, wildcard bool) bool {
	if a == "" || len(a) > maxAddressLen || !utf8.ValidString(a) {
		return false
	}
	at := strings.LastIndexByte(a, '@')
	if at <= 0 || strings.Count(a, "@") != 1 {
		return false
	}
	local, domain := a[:at], a[at+1:]
	for _, r := range local {
		if unicode.IsSpace(r) || !unicode.IsPrint(r) || strings.ContainsRune(`,;<>"()[]\`, r) || (r == '*' && !wildcard) {
			return false
		}
	}
	return validDomain(domain, wildcard)
}

// validDomain accepts ASCII domain names with at least two labels (letters,
// digits, '-'), or, with wildcard, "*" in labels. A lone "*" is a valid
// domain pattern.
func validDomain(d string, wildcard bool) bool {
	if wildcard && d == "*" {
		return true
	}
	if d == "" || len(d) > 253 {
		return false
	}
	labels := strings.Split(d, ".")
	if len(labels) < 2 {
		return false
	}
	for _, l := range labels {
		if l == "" || len(l) > 63 {
			return false
		}
		for _, r := range l {
			ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || (r == '*' && wildcard)
			if !ok {
				return false
			}
		}
	}
	return true
}

// normalise brings p to the canonical form Parse stores and Version hashes:
// addresses and domains in lower case, set-like lists sorted and
// deduplicated, times in UTC. Exemptions keep their order, which is the
// order reasons are chosen in.
func (p *Policy) normalise() {
	normList := func(l []string) []string {
		if len(l) == 0 {
			return nil
		}
		out := make([]string, len(l))
		for i, s := range l {
			out[i] = strings.ToLower(s)
		}
		slices.Sort(out)
		return slices.Compact(out)
	}
	p.Scope.Include.Mailboxes = normList(p.Scope.Include.Mailboxes)
	p.Scope.Include.Domains = normList(p.Scope.Include.Domains)
	p.Scope.Include.Groups = sortedSet(p.Scope.Include.Groups)
	p.Scope.Exclude.Mailboxes = normList(p.Scope.Exclude.Mailboxes)
	p.Scope.Exclude.Domains = normList(p.Scope.Exclude.Domains)
	p.Scope.Exclude.Groups = sortedSet(p.Scope.Exclude.Groups)
	if len(p.Groups) == 0 {
		p.Groups = nil
	} else {
		groups := make(map[string][]string, len(p.Groups))
		for name, members := range p.Groups {
			groups[name] = normList(members)
		}
		p.Groups = groups
	}
	if len(p.AllowedPlatforms) == 0 {
		p.AllowedPlatforms = nil
	} else {
		pl := slices.Clone(p.AllowedPlatforms)
		slices.Sort(pl)
		p.AllowedPlatforms = slices.Compact(pl)
	}
	if len(p.Exemptions) == 0 {
		p.Exemptions = nil
	} else {
		ex := slices.Clone(p.Exemptions)
		for i := range ex {
			ex[i].Mailbox = strings.ToLower(ex[i].Mailbox)
			if !ex[i].Until.IsZero() {
				ex[i].Until = ex[i].Until.UTC()
			}
		}
		p.Exemptions = ex
	}
}

// sortedSet sorts and deduplicates a copy of l, keeping case.
func sortedSet(l []string) []string {
	if len(l) == 0 {
		return nil
	}
	out := slices.Clone(l)
	slices.Sort(out)
	return slices.Compact(out)
}

// clone returns a deep copy of p, so that normalise can work on it without
// changing the caller's policy.
func (p *Policy) clone() *Policy {
	c := *p
	c.Scope.Include = cloneSelector(p.Scope.Include)
	c.Scope.Exclude = cloneSelector(p.Scope.Exclude)
	if p.Groups != nil {
		c.Groups = make(map[string][]string, len(p.Groups))
		for k, v := range p.Groups {
			c.Groups[k] = slices.Clone(v)
		}
	}
	c.AllowedPlatforms = slices.Clone(p.AllowedPlatforms)
	c.Exemptions = slices.Clone(p.Exemptions)
	return &c
}

func cloneSelector(s Selector) Selector {
	return Selector{Mailboxes: slices.Clone(s.Mailboxes), Domains: slices.Clone(s.Domains), Groups: slices.Clone(s.Groups)}
}

// canonical is the hashed form of a policy. Its JSON field names are fixed
// here, not derived from the Go fields, so that renaming a Go field does
// not change every recorded policy version.
type canonical struct {
	Version            int                 `json:"version"`
	Org                string              `json:"org"`
	DryRun             bool                `json:"dry_run"`
	Include            canonicalSelector   `json:"include"`
	Exclude            canonicalSelector   `json:"exclude"`
	Groups             map[string][]string `json:"groups"`
	UnknownDevice      string              `json:"unknown_device"`
	Noncompliant       string              `json:"noncompliant"`
	AllowedPlatforms   []string            `json:"allowed_platforms"`
	PlatformNotAllowed string              `json:"platform_not_allowed"`
	GracePeriodNanos   int64               `json:"grace_period_ns"`
	Exemptions         []canonicalExempt   `json:"exemptions"`
	Notify             bool                `json:"notify"`
	TrustUserless      bool                `json:"trust_mdm_records_without_user,omitempty"`
	DefaultAccess      string              `json:"default_access_level,omitempty"`
}

type canonicalSelector struct {
	Mailboxes []string `json:"mailboxes"`
	Domains   []string `json:"domains"`
	Groups    []string `json:"groups"`
}

type canonicalExempt struct {
	DeviceID   string `json:"device_id,omitempty"`
	DeviceType string `json:"device_type,omitempty"`
	Mailbox    string `json:"mailbox,omitempty"`
	Reason     string `json:"reason"`
	Until      string `json:"until,omitempty"`
	Trust      bool   `json:"trust_client_reported,omitempty"`
}

// Version returns a short, stable hash of the normalised policy (16 hex
// digits). Every decision records it, so that an auditor can tell which
// policy decided and a change of policy is visible in the log; it does not
// change with comments, whitespace, key order or the order of set-like
// lists, and it changes with anything that can change a verdict or a reason.
// It is computed on each call, so it stays right if the fields are changed.
func (p *Policy) Version() string {
	if p == nil {
		return ""
	}
	n := p.clone()
	n.normalise()
	c := canonical{
		Version:            n.SchemaVersion,
		Org:                n.Org,
		DryRun:             n.DryRun,
		Include:            canonicalSelector(n.Scope.Include),
		Exclude:            canonicalSelector(n.Scope.Exclude),
		Groups:             n.Groups,
		UnknownDevice:      string(n.UnknownDevice),
		Noncompliant:       string(n.Noncompliant),
		PlatformNotAllowed: string(n.PlatformNotAllowed),
		GracePeriodNanos:   int64(n.GracePeriod),
		Notify:             n.Notify,
		TrustUserless:      n.TrustMDMRecordsWithoutUser,
		DefaultAccess:      string(n.DefaultAccessLevel),
	}
	for _, pl := range n.AllowedPlatforms {
		name := PlatformName(pl)
		if name == "" {
			name = pl.String()
		}
		c.AllowedPlatforms = append(c.AllowedPlatforms, name)
	}
	for _, e := range n.Exemptions {
		ce := canonicalExempt{DeviceID: e.DeviceID, DeviceType: e.DeviceType, Mailbox: e.Mailbox, Reason: e.Reason, Trust: e.TrustClientReported}
		if !e.Until.IsZero() {
			ce.Until = e.Until.Format(time.RFC3339Nano)
		}
		c.Exemptions = append(c.Exemptions, ce)
	}
	// Marshalling plain strings, ints, bools, slices and string-keyed maps
	// cannot fail; json sorts map keys, which keeps the hash stable.
	b, err := json.Marshal(c)
	if err != nil {
		panic(fmt.Sprintf("policy: marshal canonical form: %v", err))
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}
