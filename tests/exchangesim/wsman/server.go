// Package wsman is the WS-Management server of the Exchange simulator: the WinRS "cmd" shell endpoint (/wsman) that
// easguard's cmdlet executor reaches through github.com/masterzen/winrm.
//
// The simulator exists so that tests, benchmarks and the demo exercise the same protocol corners as production. It
// therefore copies Windows where Windows is strict: faults carry the Windows codes and texts, Receive long-polls and
// answers the w:TimedOut fault when idle (an immediate empty answer would make the client spin), output is cut to the
// client's MaxEnvelopeSize, shells are counted against a per-user quota and reaped when idle, and requests are parsed
// by namespace URI so that any client prefix works. Authentication is not done here: an outer handler authenticates and
// Options.UserFromRequest names the account.
//
// What runs inside a shell is supplied by a Launcher; the server only moves bytes between HTTP requests and a Process.
package wsman

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Launcher starts the process a Command request names. It is the seam between the protocol server and the simulated
// Windows host (cmd.exe, powershell.exe, the cmdlet executor's worker), so protocol tests can use trivial fakes.
type Launcher interface {
	// Launch starts commandLine (the rsp:Command text) with args (the rsp:Arguments), both exactly as the client sent
	// them, on behalf of user, the authenticated account. ctx lives as long as the command: it is cancelled when the
	// command is signalled, its shell is deleted, dropped or reaped, or the server closes, so a process may tie its
	// goroutines to it. Returning an error (or a *Fault, possibly wrapped) answers the Command request with a fault.
	Launch(ctx context.Context, user, commandLine string, args []string) (Process, error)
}

// Process is a running command.
//
// Stdin: the server never blocks an HTTP request on the process. Send data is buffered per command and delivered by a
// server goroutine in order, one call at a time: WriteStdin for each Send's decoded bytes, then CloseStdin once, after
// the data of the Send that carried End="true". Both may block (like a pipe write) but must return promptly once
// Terminate has been called.
//
// Output: stdout and stderr share one ordered queue that the server long-polls. Ready returns a channel that is closed
// while output is queued or the process has exited; it is level-triggered and fetched afresh before every wait, so
// Receive waits without polling and cannot miss a wake-up. ReadOutput removes the oldest queued bytes of a single
// stream. OutputQueue implements both methods and is what simulated processes are expected to embed.
type Process interface {
	// WriteStdin delivers the next piece of stdin.
	WriteStdin(p []byte) error
	// CloseStdin signals end of input (the client's End="true").
	CloseStdin() error
	// Ready returns a channel closed while output is queued or the process has exited.
	Ready() <-chan struct{}
	// ReadOutput removes and returns up to max bytes of the oldest queued output (one stream). An empty Chunk means
	// nothing is queued. done reports that the process has exited and all output has been read; exitCode is its exit
	// status then. done and the returned bytes must be decided atomically.
	ReadOutput(max int) (c Chunk, done bool, exitCode int)
	// Terminate kills the process. It is called once, for Signal (terminate, ctrl_c, ctrl_break), for Delete,
	// DropShell and idle reaping of its shell, and for Server.Close; it must not block for long.
	Terminate()
}

// Request describes one parsed WS-Man request, for request recorders and fault injection.
type Request struct {
	// Action is the a:Action URI (see the Action constants).
	Action string
	// MessageID is the client's a:MessageID.
	MessageID string
	// ShellID is the ShellId selector; empty for Create.
	ShellID string
	// CommandID is the command the request is about (Send, Receive, Signal); empty otherwise.
	CommandID string
	// User is the authenticated account from Options.UserFromRequest.
	User string
	// Time is when the request was parsed.
	Time time.Time
	// BodySize is the size of the request body in bytes.
	BodySize int64
	// RemoteAddr is the client's address as net/http reports it.
	RemoteAddr string
	// OperationTimeout is the parsed w:OperationTimeout, 0 when absent.
	OperationTimeout time.Duration
	// Options holds the w:OptionSet values (WINRS_CODEPAGE, WINRS_SKIP_CMD_SHELL, …) by name.
	Options map[string]string
}

// Hooks are optional callbacks for the simulator's request recorder and fault injection. They run on the request's
// goroutine, so they must be safe for concurrent use; slow hooks slow the request down, which BeforeReceive relies on.
type Hooks struct {
	// OnRequest is called for every request that parsed as a WS-Man envelope, before it is handled.
	OnRequest func(Request)
	// BeforeReceive runs before a Receive starts waiting. It may sleep (a slow or stalled Receive, bounded by ctx,
	// the HTTP request's context) or return a Fault to send instead of output. nil means normal handling.
	BeforeReceive func(ctx context.Context, shellID, commandID string) *Fault
	// BeforeAction runs after OnRequest for every request; a non-nil Fault answers the request instead of handling
	// it, e.g. to fail every Send of a shell as if it had been dropped.
	BeforeAction func(Request) *Fault
}

// Options configure a Server. The zero value works and mirrors a default Windows Server WinRM configuration.
type Options struct {
	// UserFromRequest returns the authenticated account for a request (the authentication middleware stores it).
	// An empty result means the server was mounted without authentication, a deployment error: every request is then
	// answered with an internal-error fault rather than served anonymously.
	UserFromRequest func(*http.Request) string
	// MaxShellsPerUser is the per-user shell quota (Windows default 30, Exchange 18); 0 means unlimited.
	MaxShellsPerUser int
	// ShellQuotaFault builds the fault for a Create beyond MaxShellsPerUser; nil means DefaultShellQuotaFault.
	ShellQuotaFault func(user string, limit int) Fault
	// MaxOperationTimeout caps how long a Receive waits for output (default 60s, Windows' MaxTimeoutms); the
	// request's w:OperationTimeout applies when shorter. Tests lower it to keep idle polls short.
	MaxOperationTimeout time.Duration
	// IdleTimeout is how long a shell may go without requests before it is deleted (default 2h, as Windows Server
	// 2012+ reports); a negative value disables reaping. A shell with a Receive in progress is never idle.
	IdleTimeout time.Duration
	// MaxEnvelopeSize is the largest request body accepted, in bytes (default 512000, Windows' MaxEnvelopeSizekb=500).
	// It also caps the response size a client may ask for with w:MaxEnvelopeSize, as MS-WSMAN prescribes.
	MaxEnvelopeSize int
	// EnvelopeLimitFault selects how an oversized request is refused. false (the default) answers like Windows: a
	// bare HTTP 413, which the Windows client reports as "the request size exceeded the configured MaxEnvelopeSize
	// quota" and masterzen/winrm as "http response error: 413 - invalid content type". true answers a SOAP
	// w:EncodingLimit fault (HTTP 500) instead.
	EnvelopeLimitFault bool
	// Machine is put in f:WSManFault/@Machine; empty means the host name the client used (the Host header), which is
	// what Windows shows.
	Machine string
	// CoalesceDelay is how long Receive waits after the first new bytes before answering, so that output written in
	// quick succession costs one request instead of many (default 10ms; negative disables).
	CoalesceDelay time.Duration
	// Hooks are the recorder and fault-injection callbacks.
	Hooks Hooks
}

// Server is the /wsman endpoint. It is safe for concurrent use; create it with NewServer and release it with Close.
type Server struct {
	launcher Launcher
	opts     Options

	mu      sync.Mutex
	shells  map[string]*shell
	perUser map[string]int
	closed  bool

	baseCtx    context.Context
	cancelBase context.CancelFunc
	wg         sync.WaitGroup // janitor and stdin pumps
}

type shell struct {
	id         string
	owner      string
	clientIP   string
	created    time.Time
	lastActive time.Time
	receiving  int
	commands   map[string]*command
}

type command struct {
	id     string
	proc   Process
	ctx    context.Context
	cancel context.CancelFunc
	once   sync.Once

	stdinMu     sync.Mutex
	stdinQueue  [][]byte
	stdinEOF    bool // End="true" received
	stdinErr    error
	pumping     bool
	closeCalled bool
}

const (
	defaultMaxOperationTimeout = 60 * time.Second
	defaultIdleTimeout         = 2 * time.Hour
	defaultMaxEnvelopeSize     = 512000
	defaultClientEnvelopeSize  = 153600
	defaultCoalesceDelay       = 10 * time.Millisecond
	// receiveReserve is the part of the client's envelope kept for the header, the CommandState and the End streams;
	// the rest carries base64 output.
	receiveReserve = 2048
)

// NewServer returns a server that starts commands with l. It starts the idle-shell reaper, which Close stops.
func NewServer(l Launcher, o Options) *Server {
	if o.MaxOperationTimeout <= 0 {
		o.MaxOperationTimeout = defaultMaxOperationTimeout
	}
	if o.IdleTimeout == 0 {
		o.IdleTimeout = defaultIdleTimeout
	}
	if o.MaxEnvelopeSize <= 0 {
		o.MaxEnvelopeSize = defaultMaxEnvelopeSize
	}
	if o.CoalesceDelay == 0 {
		o.CoalesceDelay = defaultCoalesceDelay
	}
	if o.ShellQuotaFault == nil {
		o.ShellQuotaFault = DefaultShellQuotaFault
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		launcher:   l,
		opts:       o,
		shells:     make(map[string]*shell),
		perUser:    make(map[string]int),
		baseCtx:    ctx,
		cancelBase: cancel,
	}
	if o.IdleTimeout > 0 {
		s.wg.Add(1)
		go s.janitor()
	}
	return s
}

// Shells returns the number of open shells of user, so tests and the demo can check quota use and cleanup.
func (s *Server) Shells(user string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.perUser[user]
}

// ShellIDs returns the ids of user's open shells, so fault injection can pick a shell to drop.
func (s *Server) ShellIDs(user string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids []string
	for id, sh := range s.shells {
		if sh.owner == user {
			ids = append(ids, id)
		}
	}
	return ids
}

// DropShell terminates and forgets a shell as if its host process had died: requests that are waiting on it and
// every later request naming it get the "shell not found" fault. It is a no-op for an unknown id.
func (s *Server) DropShell(shellID string) {
	s.mu.Lock()
	cmds, _ := s.removeShellLocked(shellID)
	s.mu.Unlock()
	terminateAll(cmds)
}

// Close terminates every command, forgets every shell and stops the reaper; later requests are answered with HTTP
// 503 like a stopped WinRM service. It waits for the server's own goroutines, so a test can check for leaks after it.
func (s *Server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	var all []*command
	for id := range s.shells {
		cmds, _ := s.removeShellLocked(id)
		all = append(all, cmds...)
	}
	s.mu.Unlock()
	s.cancelBase()
	terminateAll(all)
	s.wg.Wait()
}

// removeShellLocked forgets a shell and detaches its commands under s.mu, so that a concurrent Signal cannot touch the
// command map while the caller terminates the commands outside the lock.
func (s *Server) removeShellLocked(id string) ([]*command, bool) {
	sh, ok := s.shells[id]
	if !ok {
		return nil, false
	}
	delete(s.shells, id)
	if s.perUser[sh.owner]--; s.perUser[sh.owner] <= 0 {
		delete(s.perUser, sh.owner)
	}
	cmds := make([]*command, 0, len(sh.commands))
	for cid, c := range sh.commands {
		cmds = append(cmds, c)
		delete(sh.commands, cid)
	}
	return cmds, true
}

// terminateAll kills commands; it runs outside s.mu because Terminate is process code.
func terminateAll(cmds []*command) {
	for _, c := range cmds {
		c.terminate()
	}
}

func (c *command) terminate() {
	c.once.Do(func() {
		c.cancel()
		c.proc.Terminate()
	})
}

func (s *Server) janitor() {
	defer s.wg.Done()
	interval := min(max(s.opts.IdleTimeout/10, 10*time.Millisecond), time.Minute)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-s.baseCtx.Done():
			return
		case now := <-t.C:
			s.reapIdle(now)
		}
	}
}

func (s *Server) reapIdle(now time.Time) {
	var idle []*command
	s.mu.Lock()
	for id, sh := range s.shells {
		if sh.receiving == 0 && now.Sub(sh.lastActive) > s.opts.IdleTimeout {
			cmds, _ := s.removeShellLocked(id)
			idle = append(idle, cmds...)
		}
	}
	s.mu.Unlock()
	terminateAll(idle)
}

// call carries one request through the handlers.
type call struct {
	w         http.ResponseWriter
	r         *http.Request
	env       *envelope
	req       Request
	machine   string
	clientEnv int
}

// ServeHTTP serves the /wsman endpoint. Mount it on the path /wsman behind the authentication handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Server", "Microsoft-HTTPAPI/2.0")
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	switch {
	case closed:
		bareStatus(w, http.StatusServiceUnavailable)
		return
	case !strings.EqualFold(r.URL.Path, "/wsman"):
		bareStatus(w, http.StatusNotFound)
		return
	case r.Method != http.MethodPost:
		w.Header().Set("Allow", http.MethodPost)
		bareStatus(w, http.StatusMethodNotAllowed)
		return
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/soap+xml" {
		bareStatus(w, http.StatusUnsupportedMediaType)
		return
	}
	machine := s.opts.Machine
	if machine == "" {
		machine = r.Host
		if h, _, err := net.SplitHostPort(r.Host); err == nil {
			machine = h
		}
	}
	limit := int64(s.opts.MaxEnvelopeSize)
	if r.ContentLength > limit {
		s.refuseOversized(w, machine)
		return
	}
	data, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		// A broken chunked encoding or a connection lost mid-body: refuse below the SOAP layer rather than let net/http
		// send an implicit empty 200.
		bareStatus(w, http.StatusBadRequest)
		return
	}
	if int64(len(data)) > limit {
		s.refuseOversized(w, machine)
		return
	}
	c := &call{w: w, r: r, machine: machine}
	env, err := decodeEnvelope(data)
	if errors.Is(err, errNotSOAP12) {
		c.fault(versionMismatchFault())
		return
	}
	if err != nil || env.Header == nil {
		c.fault(invalidXMLFault())
		return
	}
	c.env = env
	h := env.Header
	c.req = Request{
		Action:     h.Action.trimmed(),
		MessageID:  h.MessageID.trimmed(),
		Time:       time.Now(),
		BodySize:   int64(len(data)),
		RemoteAddr: r.RemoteAddr,
	}
	if s.opts.UserFromRequest != nil {
		c.req.User = s.opts.UserFromRequest(r)
	}
	headerFault := s.validateHeader(c)
	// The recorder sees every envelope, including the ones refused below, so tests can count rejected requests too.
	if hk := s.opts.Hooks.OnRequest; hk != nil {
		hk(c.req)
	}
	if headerFault != nil {
		c.fault(*headerFault)
		return
	}
	if c.req.User == "" {
		c.fault(InternalErrorFault(0, "The WS-Management service cannot process the request because no authenticated "+
			"user is associated with it."))
		return
	}
	if hk := s.opts.Hooks.BeforeAction; hk != nil {
		if f := hk(c.req); f != nil {
			c.fault(*f)
			return
		}
	}
	switch c.req.Action {
	case ActionCreate:
		s.create(c)
	case ActionCommand:
		s.command(c)
	case ActionSend:
		s.send(c)
	case ActionReceive:
		s.receive(c)
	case ActionSignal:
		s.signal(c)
	case ActionDelete:
		s.delete(c)
	default:
		c.fault(actionNotSupportedFault())
	}
}

// validateHeader checks the addressing and WS-Man headers and fills the parsed values into c.req.
func (s *Server) validateHeader(c *call) *Fault {
	h := c.env.Header
	for _, o := range h.Other {
		if o.mustUnderstand() {
			f := mustUnderstandFault(o.XMLName.Space + ":" + o.XMLName.Local)
			return &f
		}
	}
	if c.req.Action == "" {
		f := headerRequiredFault("Action")
		return &f
	}
	if c.req.MessageID == "" {
		f := headerRequiredFault("MessageID")
		return &f
	}
	if h.ResourceURI.trimmed() != ResourceURICmd {
		f := resourceNotFoundFault()
		return &f
	}
	c.clientEnv = defaultClientEnvelopeSize
	if h.MaxEnvelopeSize != nil {
		n, err := strconv.Atoi(h.MaxEnvelopeSize.trimmed())
		if err != nil || n <= 0 {
			f := invalidXMLFault()
			return &f
		}
		if n < minClientEnvelopeSize {
			f := envelopeTooSmallFault()
			return &f
		}
		c.clientEnv = n
	}
	c.clientEnv = min(c.clientEnv, s.opts.MaxEnvelopeSize)
	if h.OperationTimeout != nil {
		d, err := parseDuration(h.OperationTimeout.trimmed())
		if err != nil {
			f := invalidTimeoutFault()
			return &f
		}
		c.req.OperationTimeout = d
	}
	if h.SelectorSet != nil {
		for _, sel := range h.SelectorSet.Selectors {
			if sel.Name == "ShellId" {
				c.req.ShellID = strings.TrimSpace(sel.Value)
			}
		}
	}
	if h.OptionSet != nil && len(h.OptionSet.Options) > 0 {
		c.req.Options = make(map[string]string, len(h.OptionSet.Options))
		for _, o := range h.OptionSet.Options {
			c.req.Options[o.Name] = strings.TrimSpace(o.Value)
		}
	}
	if b := c.env.Body; b != nil {
		switch {
		case b.Send != nil && len(b.Send.Streams) > 0:
			c.req.CommandID = b.Send.Streams[0].CommandID
		case b.Receive != nil && b.Receive.DesiredStream != nil && b.Receive.DesiredStream.CommandID != nil:
			c.req.CommandID = *b.Receive.DesiredStream.CommandID
		case b.Signal != nil:
			c.req.CommandID = b.Signal.CommandID
		}
	}
	return nil
}

func (s *Server) refuseOversized(w http.ResponseWriter, machine string) {
	if !s.opts.EnvelopeLimitFault {
		bareStatus(w, http.StatusRequestEntityTooLarge)
		return
	}
	c := &call{w: w, machine: machine}
	c.fault(encodingLimitFault())
}

// bareStatus answers without a SOAP body, as http.sys and WinRM do below the SOAP layer.
func bareStatus(w http.ResponseWriter, status int) {
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(status)
}

func (c *call) write(status int, body []byte) {
	h := c.w.Header()
	h.Set("Content-Type", "application/soap+xml;charset=UTF-8")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	c.w.WriteHeader(status)
	// A write error means the client went away; there is nothing left to tell it.
	_, _ = c.w.Write(body)
}

func (c *call) reply(action string, body func(*bytes.Buffer)) {
	c.write(http.StatusOK, buildEnvelope(action, c.req.MessageID, false, body))
}

func (c *call) fault(f Fault) {
	c.write(f.status(), buildEnvelope(f.action(), c.req.MessageID, true, faultBody(&f, c.machine)))
}

// lookupShell returns the caller's shell and marks it active. A shell owned by another account is reported as not
// found, as each account's shells live in its own host process on Windows.
func (s *Server) lookupShell(c *call) (*shell, bool) {
	if c.req.ShellID == "" {
		c.fault(missingShellSelectorFault())
		return nil, false
	}
	s.mu.Lock()
	sh, ok := s.shells[c.req.ShellID]
	if ok && sh.owner != c.req.User {
		ok = false
	}
	if ok {
		sh.lastActive = time.Now()
	}
	s.mu.Unlock()
	if !ok {
		c.fault(ShellNotFoundFault(c.req.ShellID))
		return nil, false
	}
	return sh, true
}

func (s *Server) lookupCommand(c *call, commandID string) (*shell, *command, bool) {
	sh, ok := s.lookupShell(c)
	if !ok {
		return nil, nil, false
	}
	s.mu.Lock()
	cmd, ok := sh.commands[commandID]
	s.mu.Unlock()
	if !ok {
		c.fault(ShellNotFoundFault(c.req.ShellID))
		return nil, nil, false
	}
	return sh, cmd, true
}

func (s *Server) create(c *call) {
	if c.req.ShellID != "" {
		// Create addresses the shell collection; a selector names an existing shell.
		c.fault(invalidParameterFault())
		return
	}
	now := time.Now()
	clientIP := c.r.RemoteAddr
	if h, _, err := net.SplitHostPort(clientIP); err == nil {
		clientIP = h
	}
	sh := &shell{
		id:         newGUID(),
		owner:      c.req.User,
		clientIP:   clientIP,
		created:    now,
		lastActive: now,
		commands:   make(map[string]*command),
	}
	s.mu.Lock()
	if limit := s.opts.MaxShellsPerUser; limit > 0 && s.perUser[sh.owner] >= limit {
		s.mu.Unlock()
		c.fault(s.opts.ShellQuotaFault(sh.owner, limit))
		return
	}
	s.shells[sh.id] = sh
	s.perUser[sh.owner]++
	s.mu.Unlock()

	idle := s.opts.IdleTimeout
	if idle < 0 {
		idle = 0
	}
	address := "http://" + c.r.Host + "/wsman"
	if c.r.TLS != nil {
		address = "https://" + c.r.Host + "/wsman"
	}
	c.reply(actionCreateResponse, func(b *bytes.Buffer) {
		b.WriteString(`<x:ResourceCreated><a:Address>`)
		xmlText(b, address)
		b.WriteString(`</a:Address><a:ReferenceParameters><w:ResourceURI>` + ResourceURICmd +
			`</w:ResourceURI><w:SelectorSet><w:Selector Name="ShellId">` + sh.id +
			`</w:Selector></w:SelectorSet></a:ReferenceParameters></x:ResourceCreated>`)
		b.WriteString(`<rsp:Shell xmlns:rsp="` + NamespaceShell + `"><rsp:ShellId>` + sh.id + `</rsp:ShellId>`)
		b.WriteString(`<rsp:ResourceUri>` + ResourceURICmd + `</rsp:ResourceUri><rsp:Owner>`)
		xmlText(b, sh.owner)
		b.WriteString(`</rsp:Owner><rsp:ClientIP>`)
		xmlText(b, sh.clientIP)
		b.WriteString(`</rsp:ClientIP><rsp:IdleTimeOut>` + formatSeconds(idle) + `</rsp:IdleTimeOut>`)
		b.WriteString(`<rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams>`)
		b.WriteString(`<rsp:ShellRunTime>` + formatDHMS(0) + `</rsp:ShellRunTime><rsp:ShellInactivity>` +
			formatDHMS(0) + `</rsp:ShellInactivity></rsp:Shell>`)
	})
}

func (s *Server) command(c *call) {
	sh, ok := s.lookupShell(c)
	if !ok {
		return
	}
	b := c.env.Body
	if b == nil || b.CommandLine == nil || b.CommandLine.Command == nil ||
		strings.TrimSpace(b.CommandLine.Command.Value) == "" {
		c.fault(invalidParameterFault())
		return
	}
	args := make([]string, 0, len(b.CommandLine.Arguments))
	for _, a := range b.CommandLine.Arguments {
		args = append(args, a.Value)
	}
	ctx, cancel := context.WithCancel(s.baseCtx)
	proc, err := s.launcher.Launch(ctx, c.req.User, b.CommandLine.Command.Value, args)
	if err != nil {
		cancel()
		var f *Fault
		if errors.As(err, &f) {
			c.fault(*f)
			return
		}
		c.fault(InternalErrorFault(0, err.Error()))
		return
	}
	cmd := &command{id: newGUID(), proc: proc, ctx: ctx, cancel: cancel}
	s.mu.Lock()
	// The shell may have been deleted, dropped or reaped while the process started.
	live := s.shells[sh.id] == sh
	if live {
		sh.commands[cmd.id] = cmd
	}
	s.mu.Unlock()
	if !live {
		cmd.terminate()
		c.fault(ShellNotFoundFault(sh.id))
		return
	}
	c.reply(actionCommandResponse, func(b *bytes.Buffer) {
		b.WriteString(`<rsp:CommandResponse><rsp:CommandId>` + cmd.id + `</rsp:CommandId></rsp:CommandResponse>`)
	})
}

func (s *Server) send(c *call) {
	b := c.env.Body
	if b == nil || b.Send == nil || len(b.Send.Streams) == 0 {
		if _, ok := s.lookupShell(c); ok {
			c.fault(invalidParameterFault())
		}
		return
	}
	type piece struct {
		cmd  *command
		data []byte
		end  bool
	}
	var pieces []piece
	for _, st := range b.Send.Streams {
		_, cmd, ok := s.lookupCommand(c, st.CommandID)
		if !ok {
			return
		}
		if st.Name != "stdin" {
			c.fault(invalidParameterFault())
			return
		}
		data, err := base64.StdEncoding.DecodeString(stripXMLSpace(st.Data))
		if err != nil {
			c.fault(invalidParameterFault())
			return
		}
		end := strings.TrimSpace(st.End)
		pieces = append(pieces, piece{cmd: cmd, data: data, end: end == "true" || end == "1"})
	}
	for _, p := range pieces {
		if f := s.enqueueStdin(p.cmd, c.req.ShellID, p.data, p.end); f != nil {
			c.fault(*f)
			return
		}
	}
	c.reply(actionSendResponse, func(b *bytes.Buffer) { b.WriteString(`<rsp:SendResponse/>`) })
}

func stripXMLSpace(s string) string {
	return strings.Map(func(r rune) rune {
		switch r {
		case ' ', '\t', '\r', '\n':
			return -1
		}
		return r
	}, s)
}

// enqueueStdin buffers data for the command and makes sure a pump goroutine delivers it. Buffering keeps a Send
// request independent of how fast the process reads, as a pipe with a large buffer would.
func (s *Server) enqueueStdin(cmd *command, shellID string, data []byte, end bool) *Fault {
	// Reserve a pump slot before deciding, under s.mu, so that a pump can never be added after Close began waiting.
	s.mu.Lock()
	closed := s.closed
	if !closed {
		s.wg.Add(1)
	}
	s.mu.Unlock()
	if closed || cmd.ctx.Err() != nil {
		if !closed {
			s.wg.Done()
		}
		f := ShellNotFoundFault(shellID)
		return &f
	}
	cmd.stdinMu.Lock()
	if cmd.stdinEOF || cmd.stdinErr != nil {
		cmd.stdinMu.Unlock()
		s.wg.Done()
		f := brokenPipeFault()
		return &f
	}
	if len(data) > 0 {
		cmd.stdinQueue = append(cmd.stdinQueue, data)
	}
	if end {
		cmd.stdinEOF = true
	}
	start := !cmd.pumping && (len(cmd.stdinQueue) > 0 || (cmd.stdinEOF && !cmd.closeCalled))
	if start {
		cmd.pumping = true
	}
	cmd.stdinMu.Unlock()
	if start {
		go s.pumpStdin(cmd)
	} else {
		s.wg.Done()
	}
	return nil
}

// pumpStdin delivers buffered stdin in order and exits when the buffer is empty, so idle commands cost no goroutine.
func (s *Server) pumpStdin(cmd *command) {
	defer s.wg.Done()
	for {
		cmd.stdinMu.Lock()
		if cmd.ctx.Err() != nil {
			cmd.stdinQueue = nil
			cmd.pumping = false
			cmd.stdinMu.Unlock()
			return
		}
		if len(cmd.stdinQueue) == 0 {
			if cmd.stdinEOF && !cmd.closeCalled {
				cmd.closeCalled = true
				cmd.stdinMu.Unlock()
				if err := cmd.proc.CloseStdin(); err != nil {
					cmd.stdinMu.Lock()
					cmd.stdinErr = fmt.Errorf("closing stdin: %w", err)
					cmd.stdinMu.Unlock()
				}
				continue
			}
			cmd.pumping = false
			cmd.stdinMu.Unlock()
			return
		}
		data := cmd.stdinQueue[0]
		cmd.stdinQueue[0] = nil
		cmd.stdinQueue = cmd.stdinQueue[1:]
		cmd.stdinMu.Unlock()
		if err := cmd.proc.WriteStdin(data); err != nil {
			cmd.stdinMu.Lock()
			cmd.stdinErr = fmt.Errorf("writing stdin: %w", err)
			cmd.stdinQueue = nil
			cmd.pumping = false
			cmd.stdinMu.Unlock()
			return
		}
	}
}

func (s *Server) receive(c *call) {
	b := c.env.Body
	if b == nil || b.Receive == nil || b.Receive.DesiredStream == nil || b.Receive.DesiredStream.CommandID == nil {
		if _, ok := s.lookupShell(c); ok {
			c.fault(invalidParameterFault())
		}
		return
	}
	for _, name := range strings.Fields(b.Receive.DesiredStream.Streams) {
		if name != StreamStdout && name != StreamStderr {
			if _, ok := s.lookupShell(c); ok {
				c.fault(invalidParameterFault())
			}
			return
		}
	}
	sh, cmd, ok := s.lookupCommand(c, c.req.CommandID)
	if !ok {
		return
	}
	s.mu.Lock()
	sh.receiving++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		sh.receiving--
		sh.lastActive = time.Now()
		s.mu.Unlock()
	}()

	ctx := c.r.Context()
	if hk := s.opts.Hooks.BeforeReceive; hk != nil {
		if f := hk(ctx, c.req.ShellID, c.req.CommandID); f != nil {
			c.fault(*f)
			return
		}
		if ctx.Err() != nil {
			return
		}
	}
	wait := s.opts.MaxOperationTimeout
	if c.env.Header.OperationTimeout != nil {
		wait = min(wait, c.req.OperationTimeout)
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for expired := false; ; {
		select {
		case <-cmd.proc.Ready():
		case <-timer.C:
			expired = true
			// select picks randomly among ready cases; output that is already queued wins over the timeout.
			select {
			case <-cmd.proc.Ready():
			default:
				c.fault(TimedOutFault())
				return
			}
		case <-ctx.Done():
			return
		case <-cmd.ctx.Done():
			c.fault(ShellNotFoundFault(c.req.ShellID))
			return
		}
		if d := s.opts.CoalesceDelay; d > 0 {
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			case <-cmd.ctx.Done():
				t.Stop()
				c.fault(ShellNotFoundFault(c.req.ShellID))
				return
			}
		}
		// The echoed MessageID (a:RelatesTo) is the only client-controlled part of the header, so it is reserved too.
		budget := c.clientEnv - receiveReserve - len(c.req.MessageID)
		chunks, done, code := drainOutput(cmd.proc, budget, len(cmd.id))
		if len(chunks) == 0 && !done {
			// A concurrent Receive took the output; keep waiting rather than answer empty, unless time is up.
			if expired {
				c.fault(TimedOutFault())
				return
			}
			continue
		}
		c.reply(actionReceiveResponse, func(b *bytes.Buffer) {
			b.WriteString(`<rsp:ReceiveResponse>`)
			for _, ch := range chunks {
				// Stream comes from Process code; escape it so a misbehaving process cannot break the envelope.
				b.WriteString(`<rsp:Stream Name="`)
				xmlText(b, ch.Stream)
				b.WriteString(`" CommandId="` + cmd.id + `">`)
				b.WriteString(base64.StdEncoding.EncodeToString(ch.Data))
				b.WriteString(`</rsp:Stream>`)
			}
			if done {
				b.WriteString(`<rsp:Stream Name="stdout" CommandId="` + cmd.id + `" End="true"></rsp:Stream>`)
				b.WriteString(`<rsp:Stream Name="stderr" CommandId="` + cmd.id + `" End="true"></rsp:Stream>`)
				b.WriteString(`<rsp:CommandState CommandId="` + cmd.id + `" State="` + CommandStateDone +
					`"><rsp:ExitCode>` + strconv.Itoa(code) + `</rsp:ExitCode></rsp:CommandState>`)
			} else {
				b.WriteString(`<rsp:CommandState CommandId="` + cmd.id + `" State="` + CommandStateRunning +
					`"></rsp:CommandState>`)
			}
			b.WriteString(`</rsp:ReceiveResponse>`)
		})
		return
	}
}

// streamElementOverhead is the markup around one rsp:Stream's base64 text, excluding the command id.
var streamElementOverhead = len(`<rsp:Stream Name="stdout" CommandId=""></rsp:Stream>`)

// drainOutput takes output in arrival order until the encoded size would exceed budget bytes, so the response stays
// within the client's MaxEnvelopeSize however the process interleaved its writes.
func drainOutput(p interface {
	ReadOutput(max int) (Chunk, bool, int)
}, budget, idLen int) (chunks []Chunk, done bool, code int) {
	perElement := streamElementOverhead + idLen
	for {
		room := budget - perElement
		if room < 4 {
			return chunks, false, 0
		}
		c, d, exit := p.ReadOutput(room / 4 * 3)
		if len(c.Data) > 0 {
			chunks = append(chunks, c)
			budget -= perElement + base64.StdEncoding.EncodedLen(len(c.Data))
		}
		if d {
			return chunks, true, exit
		}
		if len(c.Data) == 0 {
			return chunks, false, 0
		}
	}
}

func (s *Server) signal(c *call) {
	b := c.env.Body
	if b == nil || b.Signal == nil || b.Signal.CommandID == "" || b.Signal.Code == nil {
		if _, ok := s.lookupShell(c); ok {
			c.fault(invalidParameterFault())
		}
		return
	}
	sh, cmd, ok := s.lookupCommand(c, b.Signal.CommandID)
	if !ok {
		return
	}
	switch b.Signal.Code.trimmed() {
	case SignalTerminate, SignalCtrlC, SignalCtrlBreak:
	default:
		c.fault(invalidParameterFault())
		return
	}
	s.mu.Lock()
	delete(sh.commands, cmd.id)
	s.mu.Unlock()
	cmd.terminate()
	c.reply(actionSignalResponse, func(b *bytes.Buffer) { b.WriteString(`<rsp:SignalResponse/>`) })
}

func (s *Server) delete(c *call) {
	if _, ok := s.lookupShell(c); !ok {
		return
	}
	s.mu.Lock()
	cmds, ok := s.removeShellLocked(c.req.ShellID)
	s.mu.Unlock()
	if !ok {
		// Deleted concurrently by another request, the reaper or DropShell.
		c.fault(ShellNotFoundFault(c.req.ShellID))
		return
	}
	terminateAll(cmds)
	c.reply(actionDeleteResponse, nil)
}
