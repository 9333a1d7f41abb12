package policy

import "fmt"

// DefaultLevel is what the policy wants of the organisation's
// DefaultAccessLevel, the level Exchange gives every partnership that no
// individual list entry and no device access rule covers.
type DefaultLevel string

const (
	// DefaultAuto, the value when the file says nothing: Quarantine when
	// the scope is everyone (a new phone is held until easguard has judged
	// it), the organisation's own default left as it is otherwise (a pilot
	// must not take mail from the mailboxes it leaves out).
	DefaultAuto DefaultLevel = ""
	// DefaultUnchanged leaves the organisation's default as it is.
	DefaultUnchanged DefaultLevel = "unchanged"
	// DefaultAllow, DefaultBlock and DefaultQuarantine name the level
	// easguard makes the default. Tightening it to Block or Quarantine is
	// planned as a mass revocation even when the scope is a pilot: then
	// every phone of a mailbox out of scope loses mail, and the
	// blast-radius guard counts them.
	DefaultAllow      DefaultLevel = "allow"
	DefaultBlock      DefaultLevel = "block"
	DefaultQuarantine DefaultLevel = "quarantine"
)

// exchangeLevels maps the policy's names to Exchange's DeviceAccessLevel names.
var exchangeLevels = map[DefaultLevel]string{DefaultAllow: "Allow", DefaultBlock: "Block", DefaultQuarantine: "Quarantine"}

// ScopeIsEveryone reports whether the scope selects every mailbox of the
// organisation: no include and no exclude. Any selector at all makes it a
// pilot, whatever the organisation's mailboxes happen to be today, so that
// the answer does not change when a mailbox in another domain appears.
func (p *Policy) ScopeIsEveryone() bool {
	return p.Scope.Include.empty() && p.Scope.Exclude.empty()
}

// OrgDefault returns the DefaultAccessLevel easguard should give the
// organisation, as Exchange names it (Allow, Block or Quarantine), or ""
// when it must leave the default as it is; explicit says whether the file
// chose it (default_access_level) rather than the scope.
func (p *Policy) OrgDefault() (level string, explicit bool) {
	switch p.DefaultAccessLevel {
	case DefaultAuto:
		if p.ScopeIsEveryone() {
			return "Quarantine", false
		}
		return "", false
	case DefaultUnchanged:
		return "", true
	}
	return exchangeLevels[p.DefaultAccessLevel], true
}

// defaultProblems checks default_access_level and what depends on it.
// Exchange has no per-device quarantine: easguard quarantines a device by
// leaving it off both lists, so that the organisation's default applies to
// it. A quarantine action therefore needs the default to be Quarantine.
func (v *validator) defaultProblems(p *Policy) {
	switch p.DefaultAccessLevel {
	case DefaultAuto, DefaultUnchanged, DefaultAllow, DefaultBlock, DefaultQuarantine:
	default:
		v.add("default_access_level", "%q is not quarantine, block, allow or unchanged", string(p.DefaultAccessLevel))
		return
	}
	level, _ := p.OrgDefault()
	if level == "Quarantine" {
		return
	}
	why := fmt.Sprintf("default_access_level is %s", p.DefaultAccessLevel)
	if p.DefaultAccessLevel == DefaultAuto {
		why = "the scope is a pilot, so easguard leaves the organisation's DefaultAccessLevel as it is unless default_access_level says otherwise"
	}
	for _, a := range []struct {
		path   string
		action Action
	}{{"unknown_device", p.UnknownDevice}, {"noncompliant", p.Noncompliant}, {"platform_not_allowed", p.PlatformNotAllowed}} {
		if a.action == ActionQuarantine {
			v.add(a.path, "quarantine needs the organisation's DefaultAccessLevel to be Quarantine (Exchange has no per-device quarantine; easguard quarantines a device by leaving it to the default), but %s: use block, or set default_access_level: quarantine", why)
		}
	}
}
