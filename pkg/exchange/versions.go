package exchange

import (
	"context"
	"errors"
	"strings"
	"time"
)

// deviceCmdlets are the cmdlets that read partnerships in one
// organisation. Exchange 2013 and later have Get-MobileDevice and
// Get-MobileDeviceStatistics, whose -ActiveSync switch leaves out OWA for
// Devices and REST partnerships; Exchange 2010 SP3 has only
// Get-ActiveSyncDevice and Get-ActiveSyncDeviceStatistics, which list EAS
// partnerships alone and have no such switch (reference/exchange.md §1.1,
// §2). Each is chosen on its own, so a role that grants one family's
// listing and the other's statistics still works.
type deviceCmdlets struct {
	list, stats string
	// listActiveSync, statsActiveSync: the cmdlet takes -ActiveSync.
	listActiveSync, statsActiveSync bool
}

// deviceCmdlets returns the partnership cmdlets of this organisation: the
// Get-MobileDevice family where the session has it, the Get-ActiveSyncDevice
// family where only that exists (Exchange 2010). It asks at most every
// deviceCmdletsTTL, so a changed role or an upgraded organisation is
// noticed without a restart.
func (c *Client) deviceCmdlets(ctx context.Context) (deviceCmdlets, error) {
	c.devMu.Lock()
	defer c.devMu.Unlock()
	if c.dev != nil && time.Since(c.devAt) < deviceCmdletsTTL {
		return *c.dev, nil
	}
	have, err := c.sessionCmdlets(ctx, "Get-MobileDevice", "Get-ActiveSyncDevice", "Get-MobileDeviceStatistics", "Get-ActiveSyncDeviceStatistics")
	if err != nil {
		return deviceCmdlets{}, err
	}
	// With neither of a pair, the Get-Mobile… cmdlet is tried and its
	// error names what the account lacks.
	d := deviceCmdlets{list: "Get-MobileDevice", listActiveSync: true, stats: "Get-MobileDeviceStatistics", statsActiveSync: true}
	if !have["get-mobiledevice"] && have["get-activesyncdevice"] {
		d.list, d.listActiveSync = "Get-ActiveSyncDevice", false
	}
	if !have["get-mobiledevicestatistics"] && have["get-activesyncdevicestatistics"] {
		d.stats, d.statsActiveSync = "Get-ActiveSyncDeviceStatistics", false
	}
	c.dev, c.devAt = &d, time.Now()
	return d, nil
}

// deviceCmdletsTTL is how long a client trusts its choice of cmdlets.
const deviceCmdletsTTL = 10 * time.Minute

// cmdletLister is a runner that knows which cmdlets its Exchange session
// has (the pool: the worker's connect answer lists them).
type cmdletLister interface {
	Cmdlets(ctx context.Context) ([]string, error)
}

// sessionCmdlets reports which of names the Exchange session has, keyed by
// lower-case name: from the runner when it knows (the pool), else from one
// Get-Command.
func (c *Client) sessionCmdlets(ctx context.Context, names ...string) (map[string]bool, error) {
	have := map[string]bool{}
	if l, ok := c.r.(cmdletLister); ok {
		list, err := l.Cmdlets(ctx)
		if err != nil {
			return nil, err
		}
		for _, n := range list {
			have[strings.ToLower(n)] = true
		}
		return have, nil
	}
	// Get-Command reports a name the session lacks as an error next to
	// the objects of the ones it has.
	objs, _, err := c.Invoke(ctx, Call{Cmdlet: "Get-Command", Params: Params{"Name": names}, Select: []string{"Name"}})
	if err != nil && !errors.Is(err, ErrPermission) && !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	for _, o := range objs {
		have[strings.ToLower(str(o, "Name"))] = true
	}
	return have, nil
}

// cmdletAlternatives names, for a cmdlet easguard may run, the cmdlets
// that do its work where it does not exist: the Get-ActiveSyncDevice
// family on Exchange 2010 for the Get-MobileDevice family (and the other
// way round, since only one family is used), and Get-ExchangeServer for CAS
// discovery where Get-ClientAccessService (2016+) is missing.
var cmdletAlternatives = map[string][]string{
	"get-mobiledevice":               {"Get-ActiveSyncDevice"},
	"get-activesyncdevice":           {"Get-MobileDevice"},
	"get-mobiledevicestatistics":     {"Get-ActiveSyncDeviceStatistics"},
	"get-activesyncdevicestatistics": {"Get-MobileDeviceStatistics"},
	"get-clientaccessservice":        {"Get-ExchangeServer"},
}

// missingWithAlternatives returns the names of req that the session lacks
// and that no available alternative stands in for.
func missingWithAlternatives(req []string, have map[string]bool) []string {
	var missing []string
	for _, n := range req {
		if have[strings.ToLower(n)] {
			continue
		}
		covered := false
		for _, alt := range cmdletAlternatives[strings.ToLower(n)] {
			covered = covered || have[strings.ToLower(alt)]
		}
		if !covered {
			missing = append(missing, n)
		}
	}
	return missing
}

// CountPartnerships counts the organisation's ActiveSync partnerships with
// the listing cmdlet its version has.
func (c *Client) CountPartnerships(ctx context.Context) (int, error) {
	dc, err := c.deviceCmdlets(ctx)
	if err != nil {
		return 0, err
	}
	params := Params{"ResultSize": "Unlimited"}
	if dc.listActiveSync {
		params["ActiveSync"] = true
	}
	return c.Count(ctx, dc.list, params)
}
