package exchange

import (
	"context"
	"errors"
	"strings"
)

// Feature is a part of easguard that runs Exchange cmdlets of its own. The
// service account needs the cmdlets of the features its configuration
// enables and nothing more, so `easguard check exchange` asks per feature
// and the shipped role script (deploy/exchange/New-EasguardRole.ps1)
// grants the default features' cmdlets only.
type Feature string

const (
	// FeatureCore is what every deployment runs: the collector's reads
	// of partnerships and recipients, the executor's reads and writes of
	// the mailboxes' allow and block lists, CAS discovery and the
	// session's forest-wide view (the worker's connect), and what `check
	// exchange` reads (servers, mailbox count, ActiveSync settings).
	FeatureCore Feature = "core"
	// FeatureOrgSettings is the collector's enforcement of the
	// organisation's ActiveSync mail settings on full sync, and the
	// executor's change of DefaultAccessLevel that the evaluator plans
	// from what the full sync read (EASGUARD_COLLECTOR_ENFORCE_SETTINGS).
	FeatureOrgSettings Feature = "org settings"
	// FeatureRemoteWipe is Client.WipePartnership. Nothing in the
	// pipeline calls it yet, so it is never required.
	FeatureRemoteWipe Feature = "remote wipe"
	// FeaturePartnershipRemoval is Client.RemovePartnership. Nothing in
	// the pipeline calls it yet, so it is never required.
	FeaturePartnershipRemoval Feature = "partnership removal"
)

// featureCmdlets maps each feature, in the order check reports them, to
// the cmdlets it runs. The cmdlets of Exchange 2013 and later are named;
// cmdletAlternatives says what stands in for them on Exchange 2010.
// Get-ClientAccessService is left out on purpose: CAS discovery falls back
// to Get-ExchangeServer (pool.go), which core needs anyway, and the
// statistics cmdlets are left out because no worker reads statistics.
var featureCmdlets = []struct {
	feature Feature
	cmdlets []string
}{
	{FeatureCore, []string{
		"Get-MobileDevice", "Get-CASMailbox", "Set-CASMailbox", "Get-Recipient",
		"Get-ActiveSyncOrganizationSettings", "Get-ExchangeServer", "Set-ADServerSettings",
	}},
	{FeatureOrgSettings, []string{"Set-ActiveSyncOrganizationSettings"}},
	{FeatureRemoteWipe, []string{"Clear-ActiveSyncDevice"}},
	{FeaturePartnershipRemoval, []string{"Remove-ActiveSyncDevice"}},
}

// Features lists every feature in the order check reports them.
func Features() []Feature {
	out := make([]Feature, 0, len(featureCmdlets))
	for _, f := range featureCmdlets {
		out = append(out, f.feature)
	}
	return out
}

// DefaultFeatures are the features a configuration enables unless told
// otherwise (EASGUARD_COLLECTOR_ENFORCE_SETTINGS defaults to true): the
// ones the shipped role script grants.
func DefaultFeatures() []Feature { return []Feature{FeatureCore, FeatureOrgSettings} }

// FeatureCmdlets returns the cmdlets a feature runs (none for an unknown
// feature).
func FeatureCmdlets(f Feature) []string {
	for _, fc := range featureCmdlets {
		if fc.feature == f {
			return append([]string(nil), fc.cmdlets...)
		}
	}
	return nil
}

// CmdletAlternatives returns the cmdlets that do a cmdlet's work where the
// organisation's version lacks it (Exchange 2010's Get-ActiveSyncDevice for
// Get-MobileDevice), so a role on that version is built from them.
func CmdletAlternatives(cmdlet string) []string {
	return append([]string(nil), cmdletAlternatives[strings.ToLower(cmdlet)]...)
}

// RequiredCmdlets returns the cmdlets the given features run, core always
// included, each once, in the features' order.
func RequiredCmdlets(features ...Feature) []string {
	want := map[Feature]bool{FeatureCore: true}
	for _, f := range features {
		want[f] = true
	}
	var out []string
	for _, fc := range featureCmdlets {
		if want[fc.feature] {
			out = append(out, fc.cmdlets...)
		}
	}
	return out
}

// MissingByFeature asks Exchange (one Get-Command) which cmdlets of every
// feature the account may not run, so check can name what an enabled
// feature lacks and what an optional one would need. A cmdlet the
// organisation's version lacks is not missing when the one easguard uses
// there instead is available (Get-ActiveSyncDevice on Exchange 2010 for
// Get-MobileDevice, say).
func (c *Client) MissingByFeature(ctx context.Context) (map[Feature][]string, error) {
	var names []string
	for _, f := range featureCmdlets {
		for _, n := range f.cmdlets {
			names = append(names, n)
			names = append(names, cmdletAlternatives[strings.ToLower(n)]...)
		}
	}
	// Get-Command reports a name the session lacks as an error next to
	// the objects of the ones it has.
	objs, _, err := c.Invoke(ctx, Call{Cmdlet: "Get-Command", Params: Params{"Name": names}, Select: []string{"Name"}})
	if err != nil && !errors.Is(err, ErrPermission) && !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	have := map[string]bool{}
	for _, o := range objs {
		have[strings.ToLower(str(o, "Name"))] = true
	}
	out := map[Feature][]string{}
	for _, f := range featureCmdlets {
		if m := missingWithAlternatives(f.cmdlets, have); len(m) > 0 {
			out[f.feature] = m
		}
	}
	return out, nil
}

// MissingCmdlets returns the cmdlets of the given features (core always
// included) that the account may not run, in the features' order.
func (c *Client) MissingCmdlets(ctx context.Context, features ...Feature) ([]string, error) {
	byFeature, err := c.MissingByFeature(ctx)
	if err != nil {
		return nil, err
	}
	want := map[Feature]bool{FeatureCore: true}
	for _, f := range features {
		want[f] = true
	}
	var out []string
	for _, f := range Features() {
		if want[f] {
			out = append(out, byFeature[f]...)
		}
	}
	return out, nil
}
