package exchangesim

import (
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
)

// defaultIdleTimeout is a remote PowerShell session's idle timeout when the
// client asks for none (PSSessionOption's default, two hours).
const defaultIdleTimeout = 2 * time.Hour

// rpsSession is one remote PowerShell session to Exchange's /PowerShell
// endpoint as the server counts it, apart from the WinRM shell the worker
// runs in: a worker killed without bye leaves its session behind, counting
// against the user's PowerShellMaxConcurrency until its idle timeout.
type rpsSession struct {
	user   string
	server string // the CAS whose /PowerShell the session is on
	idle   time.Duration
	last   time.Time
	closed bool
	// gone: the server dropped the session (an app-pool recycle, iisreset).
	gone bool
	// broken: the client noticed; its PSSession is Broken.
	broken bool
}

// rpsRegistry is the organisation's table of remote sessions.
type rpsRegistry struct {
	mu       sync.Mutex
	sessions []*rpsSession
	max      int
	scale    float64
	now      func() time.Time
	peak     map[string]int
	refused  map[string]int
}

func newRPSRegistry(max int, scale float64, now func() time.Time) *rpsRegistry {
	if max == 0 {
		max = 18
	}
	if scale <= 0 {
		scale = 1
	}
	return &rpsRegistry{max: max, scale: scale, now: now, peak: map[string]int{}, refused: map[string]int{}}
}

// expired reports whether the server has closed s for idleness; callers hold mu.
func (r *rpsRegistry) expired(s *rpsSession, now time.Time) bool {
	return now.Sub(s.last) >= time.Duration(float64(s.idle)*r.scale)
}

// liveLocked counts a user's sessions the server still holds.
func (r *rpsRegistry) liveLocked(user string, now time.Time) int {
	n := 0
	keep := r.sessions[:0]
	for _, s := range r.sessions {
		if s.closed || s.gone || r.expired(s, now) {
			continue
		}
		keep = append(keep, s)
		if strings.EqualFold(s.user, user) {
			n++
		}
	}
	clear(r.sessions[len(keep):])
	r.sessions = keep
	return n
}

// open opens a session for user on server, or refuses it as Exchange does
// beyond PowerShellMaxConcurrency (18 by default, 2010–SE).
func (r *rpsRegistry) open(user, server string, idle time.Duration) (*rpsSession, *exchange.Error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	if r.max > 0 && r.liveLocked(user, now) >= r.max {
		r.refused[strings.ToLower(user)]++
		// Exchange 2010's wording [B11]; 2013+ answer through the RPS
		// AuthZ plugin with a budget message (UNCONFIRMED English text).
		e := newError(fmt.Sprintf("Connecting to remote server %s failed with the following error message : The WS-Management service cannot process the request. This user is allowed a maximum of %d concurrent shells, which has been exceeded. Close existing shells or raise the quota for this user. For more information, see the about_Remote_Troubleshooting Help topic.", server, r.max),
			"OpenError", "PSRemotingTransportException", "-2144108060,PSSessionOpenFailed", "System.Management.Automation.RemoteRunspace")
		return nil, &e
	}
	if idle <= 0 {
		idle = defaultIdleTimeout
	}
	s := &rpsSession{user: user, server: server, idle: idle, last: now}
	r.sessions = append(r.sessions, s)
	if n := r.liveLocked(user, now); n > r.peak[strings.ToLower(user)] {
		r.peak[strings.ToLower(user)] = n
	}
	return s, nil
}

// use is one call through the session: it keeps the session from its idle
// timeout, or finds the server has dropped it. ok is false when the call
// cannot reach the server (the client's PSSession turns Broken).
func (r *rpsRegistry) use(s *rpsSession) (ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if s.broken {
		return false
	}
	if s.gone || s.closed || r.expired(s, r.now()) {
		s.gone, s.broken = true, true
		return false
	}
	s.last = r.now()
	return true
}

// isBroken reports the client's view: its PSSession state is Broken.
func (r *rpsRegistry) isBroken(s *rpsSession) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return s.broken
}

// close is Remove-PSSession.
func (r *rpsRegistry) close(s *rpsSession) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s.closed = true
}

// recycle drops every session on a server, as an app-pool recycle or an
// iisreset does; returns how many.
func (r *rpsRegistry) recycle(server string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, s := range r.sessions {
		if !s.closed && !s.gone && strings.EqualFold(s.server, server) {
			s.gone = true
			n++
		}
	}
	return n
}

// RemoteSessions returns how many remote PowerShell sessions of user the
// organisation holds now: open ones and ones left behind by killed
// workers that have not yet reached their idle timeout.
func (s *Sim) RemoteSessions(user string) int {
	s.rps.mu.Lock()
	defer s.rps.mu.Unlock()
	return s.rps.liveLocked(user, s.rps.now())
}

// PeakRemoteSessions returns the most remote sessions user held at once.
func (s *Sim) PeakRemoteSessions(user string) int {
	s.rps.mu.Lock()
	defer s.rps.mu.Unlock()
	return s.rps.peak[strings.ToLower(user)]
}

// RefusedRemoteSessions returns how many of user's sessions were refused
// for exceeding the concurrency limit.
func (s *Sim) RefusedRemoteSessions(user string) int {
	s.rps.mu.Lock()
	defer s.rps.mu.Unlock()
	return s.rps.refused[strings.ToLower(user)]
}

// Recycle drops every remote session opened to this CAS's /PowerShell, as
// an app-pool recycle or iisreset does; the workers' shells stay up.
func (e *Endpoint) Recycle() int {
	n := e.sim.rps.recycle(e.FQDN)
	return n + e.sim.rps.recycle(e.Name)
}
