package exchangesim

import (
	"fmt"
	"strings"

	"github.com/easguard/easguard/pkg/exchange"
)

// Version is the Exchange release the simulated organisation runs. It
// decides which cmdlets a session has, the servers' version strings and
// the shape of some objects.
type Version string

// The releases easguard supports (Exchange 2010 SP3 to 2019).
const (
	Version2010 Version = "2010"
	Version2013 Version = "2013"
	Version2016 Version = "2016"
	Version2019 Version = "2019"
)

// ParseVersion accepts "2010", "2013", "2016", "2019" (empty: 2019).
func ParseVersion(s string) (Version, error) {
	switch v := Version(strings.TrimSpace(s)); v {
	case "":
		return Version2019, nil
	case Version2010, Version2013, Version2016, Version2019:
		return v, nil
	}
	return "", fmt.Errorf("exchangesim: unknown Exchange version %q (use 2010, 2013, 2016 or 2019)", s)
}

// adminDisplayVersion is Get-ExchangeServer's AdminDisplayVersion of a
// server of this release: 14.3 is 2010 SP3, 15.0 2013, 15.1 2016, 15.2
// 2019 (reference/exchange.md §9, D34). UNCONFIRMED: the string's format
// ("Version 14.3 (Build 123.4)") and the builds, which stand for a late
// cumulative update or rollup of each.
func (v Version) adminDisplayVersion() string {
	switch v {
	case Version2010:
		return "Version 14.3 (Build 123.4)"
	case Version2013:
		return "Version 15.0 (Build 1497.2)"
	case Version2016:
		return "Version 15.1 (Build 2507.6)"
	}
	return "Version 15.2 (Build 1544.4)"
}

// e15 reports a release of the Exchange 2013 code base or later.
func (v Version) e15() bool { return v != Version2010 }

// roles is the ServerRole of a multi-role server. Exchange 2010 servers
// carry the Hub Transport role separately; 2013+ merged it into Mailbox.
func (v Version) roles() string {
	if v == Version2010 {
		return "Mailbox, ClientAccess, HubTransport"
	}
	return "Mailbox, ClientAccess"
}

// recipientExchangeVersion is the ExchangeVersion of a mailbox object
// (Get-CASMailbox): the version of the object's schema. UNCONFIRMED for
// 2010 (the 2010 object version 0.10 (14.0.100.0) is taken from the
// configuration objects, which show it on every release).
func (v Version) recipientExchangeVersion() string {
	if v == Version2010 {
		return "0.10 (14.0.100.0)"
	}
	return "0.20 (15.0.0.0)"
}

// lacks reports whether a release has no such cmdlet: Get-MobileDevice and
// Get-MobileDeviceStatistics came with 2013 (reference/exchange.md §1.1,
// §2), Get-ClientAccessService with 2016 (§9). In a session of a release
// that lacks one, calling it fails as a missing command does
// (CommandNotFoundException), and Get-Command does not list it.
func (v Version) lacks(cmdlet string) bool {
	switch strings.ToLower(cmdlet) {
	case "get-mobiledevice", "get-mobiledevicestatistics":
		return v == Version2010
	case "get-clientaccessservice":
		return v == Version2010 || v == Version2013
	}
	return false
}

// shapeDevice makes a Get-ActiveSyncDevice object look as Exchange 2010
// prints it: without the properties 2013 added with OWA for Devices
// (ClientType, ClientVersion) and without the computed provisioning
// flags (IsManaged, IsCompliant, IsDisabled). UNCONFIRMED: the exact property
// list of Get-ActiveSyncDevice on 2010 SP3; the documentation lists the
// filterable properties only, and these are the ones whose schema
// attributes (msExchDeviceClientType, ProvisioningFlags' computed bools)
// appear with 2013 in the decompiled code (reference/exchange.md §1.3).
func (v Version) shapeDevice(obj exchange.Object) {
	if v != Version2010 {
		return
	}
	for _, k := range []string{"ClientType", "ClientVersion", "IsManaged", "IsCompliant", "IsDisabled"} {
		delete(obj, k)
	}
}

// shapeStatistics does the same for Get-ActiveSyncDeviceStatistics:
// ClientType, the account-only wipe times (2016+) and the OWA/REST fields
// are not there on 2010. UNCONFIRMED, as above.
func (v Version) shapeStatistics(obj exchange.Object) {
	if v != Version2010 {
		return
	}
	for _, k := range []string{"ClientType", "AccountOnlyDeviceWipeSentTime", "AccountOnlyDeviceWipeRequestTime",
		"AccountOnlyDeviceWipeAckTime", "LastAccountOnlyDeviceWipeRequestor"} {
		delete(obj, k)
	}
}
