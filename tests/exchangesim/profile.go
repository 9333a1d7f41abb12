package exchangesim

import (
	"encoding/json"
	"fmt"
	"hash/fnv"
	"strings"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
)

// Profile is the simulator's latency and throttling profile: what a real
// Exchange server makes a client wait for. Tests use the zero Profile (no
// latency); benchmarks and the demo use DefaultProfile, so that the
// difference between one cmdlet per PowerShell start and a persistent
// worker is the difference an administrator would see. SlowProfile is a
// large organisation read through a remote session, where listings take
// minutes (ProfileByName selects one by name).
//
// The numbers are estimates, not measurements: reference/exchange.md and
// reference/winrm.md mark every Windows-side timing UNCONFIRMED. Each
// field says what it stands for and why it has its value.
type Profile struct {
	// ShellCreate is the cost of a WS-Man Create: WinRM authorises the
	// user and starts winrshost.exe. Field reports put it at 50–200 ms; 100 ms.
	ShellCreate time.Duration
	// ProcessStart is cmd.exe plus powershell.exe starting (no profile, .NET
	// JIT) before the first line of script runs: 0.5–2 s reported; 700 ms.
	ProcessStart time.Duration
	// Connect is opening the Exchange session: New-PSSession to /PowerShell
	// plus Import-PSSession of the ~24 allow-listed cmdlets (remote), or
	// Add-PSSnapin (snap-in). 3–20 s reported for remote; 2.5 s.
	Connect time.Duration
	// CmdletRead and CmdletWrite are the fixed cost of one cmdlet: RBAC
	// check, AD query or write, and for writes the re-stamping of the
	// user's device objects. 10 ms to read, 40 ms to write.
	CmdletRead  time.Duration
	CmdletWrite time.Duration
	// CmdletWriteMax, when above CmdletWrite, spreads the cost of each write
	// between the two: each call gets a point of the range from a hash of
	// its cmdlet and parameters, so the spread is the same in every run.
	CmdletWriteMax time.Duration
	// PerObject is the cost of each object a cmdlet returns (AD read and
	// serialisation across the remote session): 0.3 ms. It is spent as the
	// objects are produced, so a paged listing's pages arrive at its pace.
	PerObject time.Duration
	// RoundTrip is the WinRM request handling on the server per HTTP
	// request (HTTP.SYS, WS-Man, winrshost I/O): 2 ms.
	RoundTrip time.Duration
	// MaxShellsPerUser is Exchange's PowerShellMaxConcurrency: 18
	// concurrent sessions per user (2010–SE default).
	MaxShellsPerUser int
	// MaxCmdlets and CmdletPeriod model PowerShellMaxCmdlets: more cmdlets
	// than this in the period are refused with a back-off. Zero (the
	// default, as in Exchange) means unlimited.
	MaxCmdlets   int
	CmdletPeriod time.Duration
}

// DefaultProfile is the profile benchmarks and the demo use.
func DefaultProfile() Profile {
	return Profile{
		ShellCreate:      100 * time.Millisecond,
		ProcessStart:     700 * time.Millisecond,
		Connect:          2500 * time.Millisecond,
		CmdletRead:       10 * time.Millisecond,
		CmdletWrite:      40 * time.Millisecond,
		PerObject:        300 * time.Microsecond,
		RoundTrip:        2 * time.Millisecond,
		MaxShellsPerUser: 18,
	}
}

// SlowProfile is a large organisation read through an Exchange remote
// session (implicit remoting), where every object a cmdlet returns is
// serialised to CLIXML on the CAS, sent over WinRM and deserialised in the
// worker: listings of tens of thousands of partnerships take minutes, and
// a remote Set-CASMailbox takes most of a second. All three numbers below
// are UNCONFIRMED estimates (no Exchange was measured), chosen from the
// range the issue reports for remote sessions:
//
//   - PerObject 4 ms (250 objects/s, "a few hundred objects per second"):
//     a Get-MobileDevice object carries about 60 properties, each
//     serialised and deserialised, and the remote session's AD reads are
//     paged. A 50,000-partnership listing takes 200 s at this rate, which
//     a 2 m request deadline over the whole listing could never allow.
//   - CmdletWrite 300 ms to CmdletWriteMax 1 s: a remote Set-CASMailbox
//     resolves the mailbox, validates and writes the ActiveSync lists to
//     AD, and re-stamps the user's device objects; mailboxes with more
//     devices, and busier domain controllers, take longer. The spread is
//     deterministic (a hash of the call), not random per run.
//   - Everything else as DefaultProfile.
func SlowProfile() Profile {
	p := DefaultProfile()
	p.PerObject = 4 * time.Millisecond
	p.CmdletWrite = 300 * time.Millisecond
	p.CmdletWriteMax = time.Second
	return p
}

// ProfileByName returns the profile named default, slow or none (no
// latency, Exchange's limits: TestProfile).
func ProfileByName(name string) (Profile, error) {
	switch name {
	case "default":
		return DefaultProfile(), nil
	case "slow":
		return SlowProfile(), nil
	case "none":
		return TestProfile(), nil
	}
	return Profile{}, fmt.Errorf("unknown latency profile %q: use default, slow or none", name)
}

// TestProfile has no latency but keeps Exchange's limits, so tests are fast
// and still meet the 18-session throttle.
func TestProfile() Profile {
	return Profile{MaxShellsPerUser: 18}
}

// cmdletCost is the fixed simulated time of one call, without the cost of
// the objects it returns (PerObject, spent as they are produced).
func (p Profile) cmdletCost(c exchange.Call) time.Duration {
	if strings.EqualFold(c.Cmdlet, "Get-Command") || strings.EqualFold(c.Cmdlet, "Set-ADServerSettings") {
		return 0
	}
	if !IsWrite(c.Cmdlet) {
		return p.CmdletRead
	}
	if p.CmdletWriteMax <= p.CmdletWrite {
		return p.CmdletWrite
	}
	h := fnv.New64a()
	h.Write([]byte(strings.ToLower(c.Cmdlet)))
	params, _ := json.Marshal(c.Params) // map keys sorted: the same call hashes the same
	h.Write(params)
	return p.CmdletWrite + time.Duration(h.Sum64()%uint64(p.CmdletWriteMax-p.CmdletWrite+1))
}

// sleep waits d unless it is zero; the simulator's own waiting, never a test's.
func sleep(d time.Duration) {
	if d > 0 {
		time.Sleep(d)
	}
}
