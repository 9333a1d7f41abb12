package exchangesim

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim/wsman"
)

// workerProcess is powershell.exe running the easguard bootstrap and then
// worker.ps1, simulated: it checks the script it is sent exactly as the
// bootstrap does, and then answers every request exactly as worker.ps1
// would on this Exchange server.
type workerProcess struct {
	*wsman.OutputQueue
	sim     *Sim
	ep      *Endpoint
	session *Session
	stdinR  *io.PipeReader
	stdinW  *io.PipeWriter
	ctx     context.Context
	cancel  context.CancelFunc
	once    sync.Once
}

func (s *Sim) startWorker(ctx context.Context, ep *Endpoint, user string) *workerProcess {
	r, w := io.Pipe()
	wctx, cancel := context.WithCancel(ctx)
	p := &workerProcess{
		OutputQueue: wsman.NewOutputQueue(), sim: s, ep: ep,
		session: s.Org.NewSession(ep.Name, user, s.checkPassword),
		stdinR:  r, stdinW: w, ctx: wctx, cancel: cancel,
	}
	p.session.host, p.session.rps = &s.cfg.WorkerHost, s.rps
	p.SetLimit(stdoutPipe)
	go p.run()
	return p
}

// WriteStdin passes Send data to the running script.
func (p *workerProcess) WriteStdin(b []byte) error {
	_, err := p.stdinW.Write(b)
	return err
}

// CloseStdin ends the script's input; the worker loop ends, its finally
// block removes the Exchange session, and it exits 0.
func (p *workerProcess) CloseStdin() error { return p.stdinW.Close() }

// Terminate kills the process (Signal terminate, Delete, a dropped shell).
// No script code runs any more: its Exchange session is left behind on
// the server until the session's idle timeout.
func (p *workerProcess) Terminate() {
	p.once.Do(func() {
		p.cancel()
		p.stdinR.CloseWithError(io.ErrClosedPipe)
	})
}

func (p *workerProcess) exit(code int) {
	p.Exit(code)
	p.Terminate()
}

func (p *workerProcess) stdout(s string) { p.Write(wsman.StreamStdout, []byte(s)) }

// clixmlError is how Windows PowerShell 5.1 started with -EncodedCommand
// writes a terminating error to stderr.
func clixmlError(msg string) string {
	esc := strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", "\r", "_x000D_", "\n", "_x000A_").Replace(msg)
	return "#< CLIXML\r\n<Objs Version=\"1.1.0.1\" xmlns=\"http://schemas.microsoft.com/powershell/2004/04\"><S S=\"Error\">" + esc + "_x000D__x000A_</S></Objs>"
}

func (p *workerProcess) run() {
	sleepCtx(p.ctx, p.sim.profile.ProcessStart)
	in := bufio.NewReaderSize(p.stdinR, 64<<10)
	// The bootstrap: first line, base64 of the worker script.
	line, err := in.ReadString('\n')
	if p.ctx.Err() != nil {
		return
	}
	if err != nil && line == "" {
		if p.ctx.Err() == nil {
			p.session.close()
		}
		p.Write(wsman.StreamStderr, []byte(clixmlError("Exception calling \"FromBase64String\" with \"1\" argument(s): \"Value cannot be null.\r\nParameter name: s\"")))
		p.exit(1)
		return
	}
	script, err := base64.StdEncoding.DecodeString(strings.TrimRight(line, "\r\n"))
	if err != nil {
		p.Write(wsman.StreamStderr, []byte(clixmlError("Exception calling \"FromBase64String\" with \"1\" argument(s): \"The input is not a valid Base-64 string as it contains a non-base 64 character, more than two padding characters, or an illegal character among the padding characters. \"")))
		p.exit(1)
		return
	}
	sum := sha256.Sum256(script)
	if hex.EncodeToString(sum[:]) != exchange.WorkerScriptSHA256() {
		p.stdout(exchange.FatalSentinel + "worker script hash mismatch\r\n")
		p.exit(exchange.ExitScriptMismatch)
		return
	}
	p.frame(readyFrame{ID: 0, Done: true, OK: true, Op: "ready", Protocol: exchange.ProtocolVersion, PS: "5.1.17763.6414", PID: 4000 + int(p.sim.pids.Add(1)), Host: p.ep.Name})
	for {
		line, err := in.ReadString('\n')
		if p.ctx.Err() != nil {
			return
		}
		if strings.TrimSpace(line) != "" {
			if stop := p.handle(strings.TrimSpace(line)); stop {
				p.session.close()
				p.exit(0)
				return
			}
		}
		if err != nil {
			// stdin closed: the loop ends, the session is removed, exit 0.
			p.session.close()
			p.exit(0)
			return
		}
	}
}

// Frames, field for field and in order as worker.ps1 builds them.
type readyFrame struct {
	ID       int64  `json:"id"`
	Done     bool   `json:"done"`
	OK       bool   `json:"ok"`
	Op       string `json:"op"`
	Protocol int    `json:"protocol"`
	PS       string `json:"ps"`
	PID      int    `json:"pid"`
	Host     string `json:"host"`
}

type simpleFrame struct {
	ID   int64 `json:"id"`
	Done bool  `json:"done"`
	OK   bool  `json:"ok"`
}

type errorFrame struct {
	ID     int64            `json:"id"`
	Done   bool             `json:"done"`
	OK     bool             `json:"ok"`
	Errors []exchange.Error `json:"errors"`
}

type objectsFrame struct {
	ID      int64             `json:"id"`
	Done    bool              `json:"done"`
	OK      bool              `json:"ok"`
	Objects []exchange.Object `json:"objects"`
}

type pageFrame struct {
	ID      int64             `json:"id"`
	Page    int               `json:"page"`
	Objects []exchange.Object `json:"objects"`
}

type invokeFrame struct {
	ID       int64             `json:"id"`
	Done     bool              `json:"done"`
	OK       bool              `json:"ok"`
	Count    int               `json:"count"`
	Objects  []exchange.Object `json:"objects"`
	Errors   []exchange.Error  `json:"errors"`
	Warnings []string          `json:"warnings"`
}

type batchFrame struct {
	ID      int64             `json:"id"`
	Done    bool              `json:"done"`
	OK      bool              `json:"ok"`
	Results []exchange.Result `json:"results"`
}

// stdoutPipe is the simulated stdout pipe buffer: a worker that produces
// output faster than the client receives it waits, as powershell.exe
// blocks on a full pipe, instead of holding its whole result in memory.
const stdoutPipe = 256 << 10

func (p *workerProcess) frame(v any) {
	if err := p.WaitForRoom(p.ctx); err != nil {
		return
	}
	line, err := exchange.EncodeFrame(v)
	if err != nil {
		// A value the simulator built itself cannot fail to encode; if it
		// does, that is a simulator bug worth seeing on stderr.
		p.Write(wsman.StreamStderr, []byte(err.Error()))
		return
	}
	p.Write(wsman.StreamStdout, line)
}

func protocolError(msg string) exchange.Error {
	return newError(msg, "InvalidArgument", "ProtocolError", "ProtocolError", "")
}

// handle answers one request line; it returns true after bye.
func (p *workerProcess) handle(line string) bool {
	if kind, field := strictModeMissing(line); field != "" {
		// Set-StrictMode -Version 2.0: the script's unguarded read of a
		// field the request lacks is a terminating error.
		req, _ := exchange.DecodeRequest([]byte(line))
		if kind == "request" && (field == "id" || field == "v") {
			p.frame(errorFrame{ID: 0, Done: true, Errors: []exchange.Error{protocolError("bad request frame: " + propertyNotFound(field).Message)}})
			return false
		}
		p.frame(errorFrame{ID: req.ID, Done: true, Errors: []exchange.Error{propertyNotFound(field)}})
		return false
	}
	req, err := exchange.DecodeRequest([]byte(line))
	if err != nil {
		p.frame(errorFrame{ID: 0, Done: true, Errors: []exchange.Error{protocolError("bad request frame: " + err.Error())}})
		return false
	}
	if req.V != exchange.ProtocolVersion {
		p.frame(errorFrame{ID: req.ID, Done: true, Errors: []exchange.Error{protocolError(fmt.Sprintf("bad request frame: protocol version %d is not %d", req.V, exchange.ProtocolVersion))}})
		return false
	}
	switch req.Op {
	case "ping":
		if problem := p.heartbeat(); problem != "" {
			p.frame(errorFrame{ID: req.ID, Done: true, Errors: []exchange.Error{sessionBroken(problem)}})
			return false
		}
		p.frame(simpleFrame{ID: req.ID, Done: true, OK: true})
	case "connect":
		sleepCtx(p.ctx, p.sim.profile.Connect)
		info, cerr := p.session.Connect(req)
		if cerr != nil {
			p.frame(errorFrame{ID: req.ID, Done: true, Errors: []exchange.Error{*cerr}})
			return false
		}
		p.frame(objectsFrame{ID: req.ID, Done: true, OK: true, Objects: []exchange.Object{info}})
	case "invoke":
		if req.Call == nil {
			p.frame(errorFrame{ID: req.ID, Done: true, Errors: []exchange.Error{scriptError("request field 'call' is required")}})
			return false
		}
		r := p.invoke(*req.Call, req.ID, req.Page)
		p.frame(invokeFrame{ID: req.ID, Done: true, OK: r.OK, Count: r.Count, Objects: r.Objects, Errors: r.Errors, Warnings: r.Warnings})
	case "batch":
		results := make([]exchange.Result, 0, len(req.Calls))
		ok := true
		for _, c := range req.Calls {
			if p.ctx.Err() != nil {
				return false // killed mid-batch: the rest never runs
			}
			r := p.invoke(c, req.ID, 0)
			ok = ok && r.OK
			results = append(results, r)
		}
		p.frame(batchFrame{ID: req.ID, Done: true, OK: ok, Results: results})
	case "bye":
		p.session.close()
		p.frame(simpleFrame{ID: req.ID, Done: true, OK: true})
		return true
	default:
		p.frame(errorFrame{ID: req.ID, Done: true, Errors: []exchange.Error{protocolError(fmt.Sprintf("unknown op '%s'", req.Op))}})
	}
	return false
}

// invoke runs one call with the profile's latency and the throttling
// budget, records it, and streams page frames when asked to.
func (p *workerProcess) invoke(c exchange.Call, id int64, page int) exchange.Result {
	start := time.Now()
	res := exchange.Result{Objects: []exchange.Object{}, Errors: []exchange.Error{}, Warnings: []string{}}
	// PerObject is spent as each object is produced, against a clock so
	// that timer overshoot does not add up over a long listing.
	due := time.Now()
	if errs := p.sessionCall(); errs != nil {
		res.Errors = append(res.Errors, errs...)
	} else if err := p.sim.throttle(p.session.user, p.session.culture()); err != nil {
		res.Errors = append(res.Errors, *err)
	} else {
		pageNo := 0
		warnings, errs := p.session.Invoke(c, func(o exchange.Object) {
			o = p.session.host.wire(o)
			if d := p.sim.profile.PerObject; d > 0 {
				due = due.Add(d)
				if wait := time.Until(due); wait >= time.Millisecond {
					sleepCtx(p.ctx, wait)
				}
			}
			res.Objects = append(res.Objects, o)
			res.Count++
			if page > 0 && len(res.Objects) >= page {
				p.frame(pageFrame{ID: id, Page: pageNo, Objects: res.Objects})
				pageNo++
				res.Objects = []exchange.Object{}
			}
		})
		if warningsReachScript(p.session.mode) {
			res.Warnings = append(res.Warnings, warnings...)
		}
		res.Errors = append(res.Errors, errs...)
	}
	res.OK = len(res.Errors) == 0
	sleepCtx(p.ctx, p.sim.profile.cmdletCost(c)+time.Until(due))
	params, _ := json.Marshal(c.Params)
	p.sim.Recorder.Add(Record{Time: start, Endpoint: p.ep.Name, Kind: "cmdlet", User: p.session.user, Cmdlet: c.Cmdlet,
		Params: params, OK: res.OK, Objects: res.Count, Duration: time.Since(start)})
	if IsWrite(c.Cmdlet) && p.sim.killAfterWrites.Load() > 0 && p.sim.killAfterWrites.Add(-1) == 0 {
		p.exit(1)
	}
	return res
}

// sessionBroken is the error the script reports instead of calling through
// a session that is not Opened (New-SessionBrokenError).
func sessionBroken(problem string) exchange.Error {
	return newError(problem, "ResourceUnavailable", "SessionBroken", "SessionBroken", "")
}

// scriptChecks reports whether the script's handling of op checks the
// session's state (Get-SessionProblem), as its syntax tree says.
func scriptChecks(op string) bool {
	return exchange.Contract().OpReaches(op, "Get-SessionProblem")
}

// sessionCall models one cmdlet call through the worker's remote session
// as the script and implicit remoting make it: on a session the client
// knows is Broken, the script reports SessionBroken without calling (or,
// without that check, the proxy tries to rebuild the session and prompts
// for credentials, which -NonInteractive refuses); a session the server
// dropped fails the call and turns Broken. nil means the call goes ahead.
func (p *workerProcess) sessionCall() []exchange.Error {
	s := p.session
	if s.remote == nil {
		return nil
	}
	if s.rps.isBroken(s.remote) {
		if scriptChecks("invoke") {
			return []exchange.Error{sessionBroken("the Exchange session is Broken (None)")}
		}
		// UNCONFIRMED id: the implicit-remoting module's credential prompt.
		return []exchange.Error{newError("Windows PowerShell is in NonInteractive mode. Read and Prompt functionality is not available.",
			"InvalidOperation", "PSInvalidOperationException", "HostFunctionNotImplemented", "")}
	}
	if !s.rps.use(s.remote) {
		errs := []exchange.Error{newError(fmt.Sprintf("Processing data from remote server %s failed with the following error message: The session state is Broken. For more information, see the about_Remote_Troubleshooting Help topic.", s.remote.server),
			"OperationStopped", "PSRemotingTransportException", "JobFailure", s.remote.server)}
		if scriptChecks("invoke") {
			errs = append(errs, sessionBroken("the Exchange session is Broken (None)"))
		}
		return errs
	}
	return nil
}

// heartbeat answers ping as the script does: where its ping reaches
// Test-ExchangeSession, the session's state is checked and one call made
// through it (keeping it from its idle timeout); otherwise ping is local.
// It returns the problem the script reports, or "".
func (p *workerProcess) heartbeat() string {
	s := p.session
	if s.remote == nil || !exchange.Contract().OpReaches("ping", "Test-ExchangeSession") {
		return ""
	}
	if s.rps.isBroken(s.remote) || !s.rps.use(s.remote) {
		return "the Exchange session is Broken (None)"
	}
	return ""
}

// sleepCtx waits d or until ctx ends; simulated work, never a test's wait.
func sleepCtx(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
