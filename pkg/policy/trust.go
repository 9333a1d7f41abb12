package policy

import "fmt"

// Warnings names every rule of the policy that trusts a value the phone
// reports about itself (device id, device type, and through them the
// platform), which any phone can claim. A policy with warnings is valid —
// the rules that would admit a device on such a value alone carry an
// explicit trust_client_reported or trust_mdm_records_without_user — but
// an administrator should see them every time the policy is loaded, so the
// evaluator logs them and shows them in its policy status. Each warning's
// Path names the rule (exemptions[1], allowed_platforms); Line is 0.
func (p *Policy) Warnings() []Problem {
	if p == nil {
		return nil
	}
	var out []Problem
	for i, e := range p.Exemptions {
		path := fmt.Sprintf("exemptions[%d]", i)
		var what, val string
		switch {
		case e.DeviceID != "":
			what, val = "device id", e.DeviceID
		case e.DeviceType != "":
			what, val = "device type", e.DeviceType
		default:
			continue
		}
		if e.Mailbox != "" {
			if e.DeviceType == "" {
				continue // a device id bound to a mailbox: the mailbox's credentials are needed too
			}
			out = append(out, Problem{Path: path, Message: fmt.Sprintf(
				"(%s) trusts the client-reported device type %q: any phone of %s that reports it is exempt", e.Reason, val, e.Mailbox)})
			continue
		}
		out = append(out, Problem{Path: path, Message: fmt.Sprintf(
			"(%s) trusts the client-reported %s %q on every mailbox (trust_client_reported): any phone that reports it is exempt", e.Reason, what, val)})
	}
	if len(p.AllowedPlatforms) > 0 && p.PlatformNotAllowed == ActionBlock && p.UnknownDevice != ActionBlock {
		out = append(out, Problem{Path: "allowed_platforms", Message: "a device without an MDM platform is judged by its client-reported device type and OS, so a phone can claim an allowed platform to be treated by unknown_device instead of platform_not_allowed"})
	}
	if p.TrustMDMRecordsWithoutUser {
		out = append(out, Problem{Path: "trust_mdm_records_without_user", Message: "an MDM record that names no user counts for any mailbox whose partnership reports its EAS device id, a value the phone chooses"})
	}
	return out
}
