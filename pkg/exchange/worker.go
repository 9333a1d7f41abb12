package exchange

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/masterzen/winrm"
)

// ErrWorkerDead is wrapped when a worker cannot take more requests: its
// process exited, its shell was dropped, or a request timed out.
var ErrWorkerDead = fmt.Errorf("%w: worker died", ErrTransient)

// connectSettings says how a worker reaches Exchange once it runs.
type connectSettings struct {
	mode     string // remote
	psURL    string // e.g. http://{server}/PowerShell/
	psAuth   string
	user     string
	password string
	skipCA   bool
}

// worker is one long-lived powershell.exe running worker.ps1 in one WinRM
// shell on one CAS. It serves one request at a time.
type worker struct {
	target target
	// mu guards shell, cmd and state. The boot goroutine writes shell and
	// cmd while startWorker may give up on the start; whoever comes second
	// (boot finishing, or the start's deadline) decides who tears down.
	mu     sync.Mutex
	shell  *winrsShell
	cmd    *winrsCommand
	state  startState
	ctx    context.Context
	cancel context.CancelFunc
	frames chan frame
	// gone is closed when the worker dies; frames is never closed.
	gone chan struct{}
	// exited is closed when the process's stdout has ended (it exited, or
	// its shell is gone); nil until the process runs.
	exited chan struct{}
	// retiring marks a worker that still answers but must not take more
	// requests (its Exchange session broke): it leaves with bye.
	retiring atomic.Bool
	stderr   *tail
	started  time.Time
	// Connected describes the Exchange session: mode and the cmdlets the
	// account may run.
	mode    string
	cmdlets []string
	host    string

	nextID   int64
	requests int
	lastUsed time.Time
	dead     atomic.Bool
	deadErr  atomic.Value
	once     sync.Once
}

// startState is where a worker's start stands.
type startState int

const (
	// starting: boot is running and owns the shell it may create.
	starting startState = iota
	// running: boot succeeded before anyone gave up; the worker is handed out.
	running
	// abandoned: the start failed or its deadline passed first. Boot
	// still owns what it created and deletes it when it returns, so a shell
	// whose Create is answered after the deadline is deleted too.
	abandoned
)

type frame struct {
	r   Response
	err error
}

// tail keeps the last bytes of a stream, for error messages.
type tail struct {
	mu  sync.Mutex
	buf []byte
}

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > 4096 {
		t.buf = t.buf[len(t.buf)-4096:]
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.TrimSpace(string(t.buf))
}

// frameDepth is how many decoded frames a worker holds for its caller
// beyond the one being handed over. A listing's frame is 500 objects, and
// an object decoded into a map holds several kilobytes: with
// sixteen frames held ahead of a collector slower than the listing, the
// frames of the four sessions were up to 68 MB of the all-in-one's live
// heap in a steady pass of 100,000 partnerships, with two up to 40 MB
// (heap profiles every 5 s), and the pass was no slower (it waits for the
// CPU, not for frames). Beyond these, the worker's output waits in the
// WinRM shell, which keeps a command's output until it is received.
const frameDepth = 2

// startWorker opens a shell, starts the bootstrap, sends the worker script
// and connects the Exchange session.
func startWorker(ctx context.Context, cfg transportConfig, t target, cs connectSettings, opTimeout time.Duration, roundTrips *atomic.Int64) (*worker, error) {
	wctx, cancel := context.WithCancel(context.Background())
	tr := newTransport(wctx, cfg, t, roundTrips)
	params := winrm.NewParameters(isoSeconds(opTimeout), "en-US", 153600)
	w := &worker{target: t, ctx: wctx, cancel: cancel, frames: make(chan frame, frameDepth), gone: make(chan struct{}), stderr: &tail{}, started: time.Now()}
	done := make(chan error, 1)
	go func() { done <- w.start(tr, params, cs) }()
	select {
	case err := <-done:
		if err != nil {
			return nil, err
		}
	case <-ctx.Done():
		if w.abandon() {
			// Boot goes on in the background until its current WinRM
			// request is answered, then deletes whatever it made.
			return nil, fmt.Errorf("%w: starting a worker on %s: %w", ErrUnreachable, t.fqdn, ctx.Err())
		}
		// Boot finished as the deadline passed: take its result.
		if err := <-done; err != nil {
			return nil, err
		}
	}
	return w, nil
}

// start runs boot and settles the worker's state. A boot that failed, or
// finished after its start was abandoned, tears the worker down itself:
// only boot knows whether a Create or Command is still on its way, so
// only boot can delete a shell that was made after the deadline.
func (w *worker) start(tr *transport, params *winrm.Parameters, cs connectSettings) error {
	err := w.boot(tr, params, cs)
	w.mu.Lock()
	if err == nil && w.state == starting {
		w.state = running
		w.mu.Unlock()
		return nil
	}
	if err == nil {
		err = fmt.Errorf("%w: start on %s abandoned", ErrWorkerDead, w.target.fqdn)
	}
	w.state = abandoned
	w.mu.Unlock()
	w.kill()
	return err
}

// abandon gives up on a start that is still booting and reports whether it
// did; false means boot has already finished, successfully or not. It
// marks the worker dead, which ends boot's waits for frames at once.
func (w *worker) abandon() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.state != starting {
		return false
	}
	w.state = abandoned
	w.die(fmt.Errorf("%w: start on %s abandoned at its deadline", ErrWorkerDead, w.target.fqdn))
	return true
}

// parts returns the shell and command, as far as boot has made them.
func (w *worker) parts() (*winrsShell, *winrsCommand) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.shell, w.cmd
}

func (w *worker) boot(tr *transport, params *winrm.Parameters, cs connectSettings) error {
	shell, err := openShell(tr, params)
	if err != nil {
		return fmt.Errorf("create shell on %s: %w", w.target.fqdn, asKind(err))
	}
	w.mu.Lock()
	w.shell = shell
	w.mu.Unlock()
	if w.dead.Load() {
		return fmt.Errorf("%w: start on %s abandoned", ErrWorkerDead, w.target.fqdn)
	}
	cmd, err := shell.start(w.ctx, CommandLine(), w.stderr)
	if err != nil {
		return fmt.Errorf("start worker on %s: %w", w.target.fqdn, asKind(err))
	}
	w.mu.Lock()
	w.cmd = cmd
	w.mu.Unlock()
	w.mu.Lock()
	w.exited = make(chan struct{})
	w.mu.Unlock()
	go w.readFrames()
	if err := cmd.write(ScriptLine()); err != nil {
		return fmt.Errorf("%w: send worker script to %s: %w", ErrTransient, w.target.fqdn, err)
	}
	ready, err := w.next(context.Background(), 0)
	if err != nil {
		return fmt.Errorf("worker on %s did not start: %w", w.target.fqdn, err)
	}
	if ready.Op != "ready" || ready.Protocol != ProtocolVersion {
		return fmt.Errorf("%w: worker on %s speaks protocol %d (%q), not %d", ErrInvalid, w.target.fqdn, ready.Protocol, ready.Op, ProtocolVersion)
	}
	w.host = ready.Host
	uri := strings.ReplaceAll(cs.psURL, "{server}", w.target.fqdn)
	_, res, err := w.call(context.Background(), Request{Op: "connect", Mode: cs.mode, URI: uri, Auth: cs.psAuth, User: cs.user, Password: cs.password, SkipCACheck: cs.skipCA, SkipCNCheck: cs.skipCA}, nil)
	if err != nil {
		return fmt.Errorf("connect to Exchange on %s: %w", w.target.fqdn, err)
	}
	if !res.OK {
		return fmt.Errorf("connect to Exchange on %s: %w", w.target.fqdn, ResultError("New-PSSession", res.Errors))
	}
	if len(res.Objects) == 1 {
		w.mode, _ = res.Objects[0]["mode"].(string)
		if list, ok := res.Objects[0]["cmdlets"].([]any); ok {
			for _, c := range list {
				if s, ok := c.(string); ok {
					w.cmdlets = append(w.cmdlets, s)
				}
			}
		}
	}
	return nil
}

// asKind keeps a classified error as it is and marks anything else transient.
func asKind(err error) error {
	for _, k := range []error{ErrTransient, ErrUnreachable, ErrThrottled, ErrNotFound, ErrInvalid, ErrAuth, ErrPermission, ErrTLS} {
		if errors.Is(err, k) {
			return err
		}
	}
	return fmt.Errorf("%w: %w", ErrTransient, err)
}

func isoSeconds(d time.Duration) string {
	if d <= 0 {
		d = 20 * time.Second
	}
	return fmt.Sprintf("PT%dS", int(d.Seconds()+0.5))
}

// readFrames turns the worker's stdout into frames; it ends when the
// process exits or the shell fails.
//
// Once the worker is dead its output is still read (and dropped) until the
// process ends: a process whose stdout nobody reads would block on it and
// never reach the end of its script, where it removes its Exchange session.
func (w *worker) readFrames() {
	defer close(w.exited)
	err := scanFrames(w.cmd.stdout, func(line string) { w.die(fatalError(line)) }, func(f frame) {
		select {
		case w.frames <- f:
		case <-w.gone:
		}
	})
	if err == nil {
		err = fmt.Errorf("worker process exited with code %d", w.cmd.wait())
		if s := w.stderr.String(); s != "" {
			err = fmt.Errorf("%w; stderr: %s", err, s)
		}
	}
	w.die(fmt.Errorf("%w: %w", ErrWorkerDead, asKind(err)))
}

// scanFrames reads a worker's stdout until it ends and hands each frame to
// emit, and the bootstrap's refusal (a FatalSentinel line) to fatal; other
// lines are noise. It returns the failure that ended the output, nil for
// its end.
func scanFrames(stdout io.Reader, fatal func(line string), emit func(frame)) error {
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	var dec frameDecoder
	for sc.Scan() {
		line := sc.Bytes()
		if bytes.HasPrefix(line, []byte(FatalSentinel)) {
			fatal(string(line))
			continue
		}
		r, ok, err := dec.decode(line)
		if !ok {
			continue
		}
		emit(frame{r: r, err: err})
	}
	return sc.Err()
}

// die marks the worker dead with its first cause.
func (w *worker) die(err error) {
	if w.dead.CompareAndSwap(false, true) {
		w.deadErr.Store(err)
		close(w.gone)
	}
}

func (w *worker) cause() error {
	if err, ok := w.deadErr.Load().(error); ok {
		return err
	}
	return ErrWorkerDead
}

// next waits for the next frame of request id.
func (w *worker) next(ctx context.Context, id int64) (Response, error) {
	var f frame
	select {
	case f = <-w.frames:
	default:
		select {
		case f = <-w.frames:
		case <-w.gone:
			return Response{}, w.cause()
		case <-ctx.Done():
			return Response{}, ctx.Err()
		}
	}
	{
		if f.err != nil {
			return Response{}, fmt.Errorf("%w: %w", ErrTransient, f.err)
		}
		if f.r.ID != id {
			// A frame of an earlier, abandoned request: the stream is out
			// of step, so the worker cannot be trusted any more.
			err := fmt.Errorf("%w: frame for request %d while waiting for %d", ErrWorkerDead, f.r.ID, id)
			w.die(err)
			return Response{}, err
		}
		return f.r, nil
	}
}

// call sends one request and waits for its answer, passing page frames to
// onPage as they arrive. A context that ends first kills the worker: its
// stream would be out of step with the next request.
func (w *worker) call(ctx context.Context, req Request, onPage func([]Object) error) ([]Response, Response, error) {
	if w.dead.Load() {
		return nil, Response{}, w.cause()
	}
	w.nextID++
	req.ID = w.nextID
	w.requests++
	w.lastUsed = time.Now()
	line, err := EncodeRequest(req)
	if err != nil {
		return nil, Response{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if err := w.cmd.write(line); err != nil {
		w.die(fmt.Errorf("%w: send: %w", ErrWorkerDead, err))
		return nil, Response{}, w.cause()
	}
	var pages []Response
	for {
		r, err := w.next(ctx, req.ID)
		if err != nil {
			if ctx.Err() != nil {
				w.die(fmt.Errorf("%w: request %d (%s) timed out: %w", ErrWorkerDead, req.ID, req.Op, ctx.Err()))
				w.kill()
				return nil, Response{}, fmt.Errorf("%w: %w", ErrTransient, ctx.Err())
			}
			return nil, Response{}, err
		}
		if r.Done {
			return pages, r, nil
		}
		if onPage != nil {
			if err := onPage(r.Objects); err != nil {
				// The caller stopped reading; the rest of the answer is
				// still coming, so the worker must go.
				w.die(fmt.Errorf("%w: caller abandoned request %d", ErrWorkerDead, req.ID))
				w.kill()
				return nil, Response{}, err
			}
			continue
		}
		pages = append(pages, r)
	}
}

// close ends the worker cleanly: bye (the worker removes its Exchange
// session and exits), then the shell is deleted, so no shell lingers
// against the user's throttling budget.
func (w *worker) close(ctx context.Context) {
	w.once.Do(func() {
		if _, cmd := w.parts(); !w.dead.Load() && cmd != nil {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, _, _ = w.call(cctx, Request{Op: "bye"}, nil)
			cancel()
		}
		w.teardown()
	})
}

// kill stops the worker at once: no request reaches it any more, and its
// shell is deleted in the background (see teardown).
func (w *worker) kill() {
	w.once.Do(func() {
		go w.teardown()
	})
}

// exitGrace is how long teardown lets a worker whose input has ended run
// on: long enough to finish a cmdlet in flight and remove its Exchange
// session, which would otherwise count against the user's 18 sessions
// until its idle timeout.
const exitGrace = 15 * time.Second

// teardown ends the worker's input, so the script leaves its loop and its
// finally block removes the Exchange session, waits up to exitGrace for
// the process to end, and then deletes the shell (which kills a process
// stuck in a cmdlet; its session then expires after the idle timeout).
func (w *worker) teardown() {
	w.die(ErrWorkerDead)
	shell, cmd := w.parts()
	if cmd != nil {
		_ = cmd.closeInput()
		w.mu.Lock()
		exited := w.exited
		w.mu.Unlock()
		if exited != nil {
			select {
			case <-exited:
			case <-time.After(exitGrace):
			}
		}
	}
	// Deleting the shell also ends its command; it goes over the other
	// lane, so it is not stuck behind the long poll.
	if shell != nil {
		done := make(chan struct{})
		go func() { _ = shell.close(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
		}
	}
	w.cancel()
}
