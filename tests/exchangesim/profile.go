package exchangesim

import (
	"strings"
	"time"
)

// Profile is the simulator's latency and throttling profile: what a real
// Exchange server makes a client wait for. Tests use the zero Profile (no
// latency); benchmarks and the demo use DefaultProfile, so that the
// difference between one cmdlet per PowerShell start and a persistent
// worker is the difference an administrator would see.
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
	// PerObject is the cost of each object a cmdlet returns (AD read and
	// serialisation across the remote session): 0.3 ms.
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

// TestProfile has no latency but keeps Exchange's limits, so tests are fast
// and still meet the 18-session throttle.
func TestProfile() Profile {
	return Profile{MaxShellsPerUser: 18}
}

// cmdletCost is the simulated time of one cmdlet with n output objects.
func (p Profile) cmdletCost(cmdlet string, n int) time.Duration {
	base := p.CmdletRead
	if IsWrite(cmdlet) {
		base = p.CmdletWrite
	}
	if strings.EqualFold(cmdlet, "Get-Command") || strings.EqualFold(cmdlet, "Set-ADServerSettings") {
		base = 0
	}
	return base + time.Duration(n)*p.PerObject
}

// sleep waits d unless it is zero; the simulator's own waiting, never a test's.
func sleep(d time.Duration) {
	if d > 0 {
		time.Sleep(d)
	}
}
