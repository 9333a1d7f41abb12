package exchangesim

import (
	"encoding/json"
	"fmt"
	"net/url"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
)

// Session is one worker's view of Exchange: its connection mode, the CAS it
// reached, and the session settings (Set-ADServerSettings) that, as in
// Exchange, last only as long as the session.
type Session struct {
	org    *Org
	server string // the Exchange server name in error ids
	user   string
	mode   string // "" or "remote"
	// host is the Windows host the worker runs on; rps counts remote
	// sessions; remote is this worker's, once connected.
	host   *Host
	rps    *rpsRegistry
	remote *rpsSession
	// viewEntireForest widens the recipient scope from the forest root
	// domain to every domain.
	viewEntireForest bool
	// checkPassword verifies explicit credentials of a remote session.
	checkPassword func(user, password string) bool
}

// NewSession returns a session of user on the server named server. Until
// it is connected (ConnectRequest), no Exchange cmdlet exists in it.
func (o *Org) NewSession(server, user string, checkPassword func(user, password string) bool) *Session {
	return &Session{org: o, server: server, user: user, checkPassword: checkPassword}
}

func (s *Session) dc() string { return s.org.defaultDomain().DC }

// inScope reports whether a mailbox is visible to the session.
func (s *Session) inScope(m *Mailbox) bool {
	return s.viewEntireForest || m.Domain == s.org.defaultDomain()
}

// culture is the culture Exchange answers the session in: what the script
// pins the session to (New-PSSessionOption -Culture), else the host's.
func (s *Session) culture() string {
	if c := exchange.Contract().SessionCulture(); c != "" {
		return c
	}
	return s.host.culture()
}

// scriptError is what the script reports for an exception it throws itself
// (a RuntimeException carrying its message).
func scriptError(msg string) exchange.Error {
	return newError(msg, "OperationStopped", "RuntimeException", msg, "")
}

// Connect handles the worker's connect request: an explicit-credential
// remote session to a CAS of the organisation (the script offers no
// other mode). It fails as New-PSSession fails for a wrong password, a
// host that is not an Exchange server, or a user over Exchange's limit of
// concurrent sessions.
func (s *Session) Connect(req exchange.Request) (exchange.Object, *exchange.Error) {
	for _, f := range []struct{ name, v string }{{"mode", req.Mode}, {"password", req.Password}, {"user", req.User}, {"uri", req.URI}, {"auth", req.Auth}} {
		if f.v == "" && (f.name == "mode" || req.Mode == "remote") {
			e := scriptError(fmt.Sprintf("request field '%s' is required", f.name))
			return nil, &e
		}
	}
	switch req.Mode {
	case "remote":
		u, err := url.Parse(req.URI)
		host := ""
		if err == nil {
			host = u.Hostname()
		}
		known := false
		s.org.mu.RLock()
		for _, srv := range s.org.Servers {
			if strings.EqualFold(host, srv.FQDN) || strings.EqualFold(host, srv.Name) {
				known = true
			}
		}
		s.org.mu.RUnlock()
		if err != nil || u.Scheme == "" || !strings.EqualFold(strings.TrimSuffix(u.Path, "/"), "/PowerShell") || !known {
			e := newError(fmt.Sprintf("Connecting to remote server %s failed with the following error message : WinRM cannot process the request because the input connection URI %q is not valid or the computer cannot be found. For more information, see the about_Remote_Troubleshooting Help topic.", host, req.URI),
				"OpenError", "PSRemotingTransportException", "PSSessionOpenFailed", "System.Management.Automation.RemoteRunspace")
			return nil, &e
		}
		if s.checkPassword == nil || !s.checkPassword(req.User, req.Password) {
			e := newError(fmt.Sprintf("[%s] Connecting to remote server %s failed with the following error message : Access is denied. For more information, see the about_Remote_Troubleshooting Help topic.", host, host),
				"OpenError", "PSRemotingTransportException", "AccessDenied,PSSessionOpenFailed", "System.Management.Automation.RemoteRunspace")
			return nil, &e
		}
		if s.rps != nil {
			idle := time.Duration(exchange.Contract().SessionIdleTimeoutMS()) * time.Millisecond
			rs, err := s.rps.open(req.User, strings.ToLower(host), idle)
			if err != nil {
				return nil, err
			}
			s.remote = rs
		}
		s.user = req.User
	default:
		e := scriptError(fmt.Sprintf("connect: mode must be remote, not '%s' (the Exchange snap-in cannot reach Active Directory over WinRM)", req.Mode))
		return nil, &e
	}
	s.mode = req.Mode
	// worker.ps1 runs Set-ADServerSettings -ViewEntireForest $true after
	// importing the session, under $ErrorActionPreference Stop: where RBAC
	// did not grant it, the import left it out and the connect fails
	// with PowerShell's command-not-found error.
	if !s.available("Set-ADServerSettings") {
		e := newError("The term 'Set-ADServerSettings' is not recognized as the name of a cmdlet, function, script file, or operable program. Check the spelling of the name, or if a path was included, verify that the path is correct and try again.",
			"ObjectNotFound", "CommandNotFoundException", "CommandNotFoundException", "Set-ADServerSettings")
		return nil, &e
	}
	s.viewEntireForest = true
	var names []any
	for _, c := range exchange.AllowedCmdlets {
		if c != "Get-Command" && s.available(c) {
			names = append(names, c)
		}
	}
	if names == nil {
		names = []any{}
	}
	return exchange.Object{"mode": req.Mode, "cmdlets": names}, nil
}

// available reports whether a cmdlet exists in the session: Exchange's
// only after connecting, and in a remote session only if RBAC grants it.
func (s *Session) available(name string) bool {
	c := cmdlets[strings.ToLower(name)]
	if c == nil {
		return false
	}
	if c.core {
		return true
	}
	if s.org.Version.lacks(c.name) {
		return false
	}
	if s.mode == "" {
		return false
	}
	s.org.mu.RLock()
	defer s.org.mu.RUnlock()
	return s.org.isGranted(c.name)
}

// close ends the remote session (Remove-PSSession).
func (s *Session) close() {
	if s.remote != nil && s.rps != nil {
		s.rps.close(s.remote)
	}
}

// Invoke runs one call as worker.ps1 does: resolve the cmdlet in the
// session, bind the parameters, run it. emit receives each output object
// as it is produced, so large results can be paged.
func (s *Session) Invoke(call exchange.Call, emit func(exchange.Object)) (warnings []string, errs []exchange.Error) {
	allowed := ""
	for _, c := range exchange.AllowedCmdlets {
		if strings.EqualFold(c, call.Cmdlet) {
			allowed = c
		}
	}
	if allowed == "" {
		return nil, []exchange.Error{newError(fmt.Sprintf("cmdlet '%s' is not on the easguard allow-list", call.Cmdlet), "InvalidArgument", "ProtocolError", "ProtocolError", "")}
	}
	if err := checkWireParams(call.Params); err != nil {
		return nil, []exchange.Error{*err}
	}
	if !s.available(allowed) {
		return nil, []exchange.Error{commandNotFound(allowed)}
	}
	c := cmdlets[strings.ToLower(allowed)]
	a, berr := c.bind(call.Params)
	if berr != nil {
		return nil, []exchange.Error{*berr}
	}
	if c.shouldProcess {
		if wi, _ := a["WhatIf"].(bool); wi {
			return nil, nil
		}
		confirm, set := a["Confirm"].(bool)
		if (c.confirmHigh && (!set || confirm)) || (set && confirm) {
			return nil, []exchange.Error{nonInteractive(c.name)}
		}
	}
	var sel map[string]bool
	if len(call.Select) > 0 {
		sel = map[string]bool{}
		for _, p := range call.Select {
			sel[strings.ToLower(p)] = true
		}
	}
	out := &output{emit: func(o exchange.Object) {
		if sel != nil {
			for k := range o {
				if !sel[strings.ToLower(k)] {
					delete(o, k)
				}
			}
		}
		emit(o)
	}}
	c.run(s, a, out)
	s.org.mu.RLock()
	fault := s.org.callFault
	s.org.mu.RUnlock()
	if fault != nil {
		if e := fault(call); e != nil {
			out.fail(*e)
		}
	}
	return out.warnings, out.errors
}

// output collects what a cmdlet writes to its streams.
type output struct {
	emit     func(exchange.Object)
	warnings []string
	errors   []exchange.Error
}

func (o *output) object(obj exchange.Object) { o.emit(obj) }
func (o *output) warn(w string)              { o.warnings = append(o.warnings, w) }
func (o *output) fail(e exchange.Error)      { o.errors = append(o.errors, e) }

// cmdlet is one implemented cmdlet.
type cmdlet struct {
	name          string
	params        []param
	defaultSet    string
	shouldProcess bool // supports -Confirm and -WhatIf
	confirmHigh   bool // ConfirmImpact High: prompts unless -Confirm:$false
	core          bool // a PowerShell cmdlet, present without Exchange
	write         bool // changes Exchange (for the latency profile)
	run           func(s *Session, a args, out *output)
}

// cmdlets is filled by cmdlets.go, keyed by lower-case name.
var cmdlets = map[string]*cmdlet{}

func register(c *cmdlet) {
	cmdlets[strings.ToLower(c.name)] = c
}

// IsWrite reports whether a cmdlet changes Exchange.
func IsWrite(name string) bool {
	c := cmdlets[strings.ToLower(name)]
	return c != nil && c.write
}

// resultSizeWarning is Exchange's warning when output was truncated at the
// default ResultSize.
const resultSizeWarning = "By default, only the first 1000 items are returned. Use the ResultSize parameter to specify the number of items returned. To return all items, specify \"-ResultSize Unlimited\". Be aware that, depending on the actual number of items, returning all items can take a long time and consume a large amount of memory. Also, we don't recommend storing the results in a variable. Instead, pipe the results to another task or script to perform batch changes."

// limit applies -ResultSize to a listing: it returns how many items to
// emit and adds Exchange's warning when the default cut the result.
func limit(a args, total int, out *output) int {
	n := int64(1000)
	explicit := false
	if v, ok := a["ResultSize"].(int64); ok {
		n, explicit = v, true
	}
	if n < 0 || int64(total) <= n {
		return total
	}
	if !explicit {
		out.warn(resultSizeWarning)
	}
	return int(n)
}

// sortObjects applies -SortBy (one property, ascending).
func sortObjects(objs []exchange.Object, by string) {
	if by == "" {
		return
	}
	sort.SliceStable(objs, func(i, j int) bool {
		return strings.ToLower(fmt.Sprint(objs[i][by])) < strings.ToLower(fmt.Sprint(objs[j][by]))
	})
}

// checkWireParams refuses what worker.ps1's ConvertFrom-WireParams refuses,
// with its messages, before anything reaches a cmdlet.
func checkWireParams(params exchange.Params) *exchange.Error {
	fail := func(msg string) *exchange.Error {
		e := newError(msg, "InvalidArgument", "ProtocolError", "ProtocolError", "")
		return &e
	}
	for name, v := range params {
		if !paramName.MatchString(name) {
			return fail("invalid parameter name")
		}
		switch x := v.(type) {
		case []any:
			for _, item := range x {
				switch it := item.(type) {
				case nil, string:
				case json.Number:
					if _, err := it.Int64(); err != nil {
						return fail(fmt.Sprintf("parameter %s: arrays may hold only strings", name))
					}
				default:
					return fail(fmt.Sprintf("parameter %s: arrays may hold only strings", name))
				}
			}
		case map[string]any:
			for k := range x {
				if k != "Add" && k != "Remove" {
					return fail(fmt.Sprintf("parameter %s: only Add and Remove may change a multi-valued parameter", name))
				}
			}
		}
	}
	return nil
}

// paramName mirrors the script's .NET pattern, whose $ also matches before a final newline.
var paramName = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9]{0,63}\n?$`)
