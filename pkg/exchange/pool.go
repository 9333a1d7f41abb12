package exchange

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.opentelemetry.io/otel/trace"
)

// Runner runs one request on some worker. The pool and the one-shot mode
// both implement it, so the typed operations work on either.
type Runner interface {
	Do(ctx context.Context, req Request, onPage func([]Object) error) (Response, error)
}

// Pool is a set of persistent workers, each one PowerShell in one WinRM
// shell with its own client and connections, serving one request at a
// time. It starts at the primary CAS, discovers the organisation's other
// Client Access servers, fails over when the current one stops answering
// and returns to the primary when it recovers.
type Pool struct {
	opts *options
	log  *slog.Logger

	roundTrips atomic.Int64

	mu       sync.Mutex
	servers  []target // primary first
	current  int
	failures int // consecutive failures on the current server
	idle     []*worker
	total    int // workers alive or starting
	// waiters and urgentWaiters wake requests waiting for a worker (see
	// signal); urgent counts the urgent ones waiting, which a request
	// that is not urgent lets go first.
	waiters       chan struct{}
	urgentWaiters chan struct{}
	urgent        int
	closed        bool
	probing       bool

	// With a shared session budget (WithSessionSlots), every session this
	// process has open counts against a slot it holds: held is how many it
	// holds, outside how many sessions it has open beyond total (workers
	// being closed, a probe of the primary). A worker starts only on a
	// free held slot, and a slot is given back only once its session is
	// closed, so the processes of an organisation together never hold more
	// sessions than the budget.
	slots     SessionSlots
	held      int
	outside   int
	acquiring bool // one request at a time asks the budget for a slot

	// Under a backlog the pool opens sessions beyond Workers, up to what
	// the shared budget has free (see wantsBurst), and closes them again
	// once they have idled for BurstIdle (shrink). waiting is how many
	// requests wait for a worker, service the moving average of a
	// request's time on a worker (paged listings left out), served when
	// each worker last finished a request (a heartbeat is not use), and
	// noSlotUntil when the budget may be asked again for an extra slot
	// after it had none free.
	waiting     int
	service     time.Duration
	served      map[*worker]time.Time
	noSlotUntil time.Time

	// metrics are the domain metrics (WithMetrics), nowhere by default.
	metrics *instruments
	// tracer traces each request as a client span (WithTracing).
	tracer trace.Tracer

	stop chan struct{}
	wg   sync.WaitGroup
}

// SessionSlots is a budget of Exchange sessions shared with other
// processes (package budget keeps it in JetStream KV). Exchange's limit of
// concurrent sessions is per user, and every replica logs on as the same
// service account, so only a shared budget keeps their sum under it.
type SessionSlots interface {
	// Acquire takes one more slot; false (and no error) when none is free.
	Acquire(ctx context.Context) (bool, error)
	// Release gives one slot back.
	Release()
	// Lost receives one value per slot the process could no longer keep.
	Lost() <-chan struct{}
	// Total is the size of the whole budget.
	Total() int
}

// PoolOption changes how a pool is built.
type PoolOption func(*Pool)

// WithSessionSlots makes the pool open a session only on a slot of the
// shared budget, and close one for every slot it loses.
func WithSessionSlots(s SessionSlots) PoolOption {
	return func(p *Pool) { p.slots = s }
}

// ErrNoSessionSlot is returned when the pool could not get a slot of the
// shared session budget for its first worker within StartTimeout.
var ErrNoSessionSlot = errors.New("no free slot in the shared Exchange session budget")

// slotPoll is how often a pool that needs a session but finds the shared
// budget spent asks again (a slot freed by another process is not
// announced).
const slotPoll = 250 * time.Millisecond

// burstTarget is the wait the pool's backlog may cause before the pool
// opens a session beyond Workers: one more opens as soon as the queued
// requests need longer than this to clear on the sessions it has (opening
// ones included). Opening takes seconds (shell, PowerShell, Exchange
// session), far longer than this, so the pool does not wait for a backlog
// to prove lasting: a session opened at the first sign of one is ready
// while a burst still runs, and it stays BurstIdle, so the next burst
// finds it warm.
const burstTarget = 100 * time.Millisecond

// NewPool validates the settings and starts one worker, so that wrong
// credentials, an untrusted certificate or a missing role show at once.
// Further workers start as requests need them.
func NewPool(ctx context.Context, cfg Config, log *slog.Logger, opts ...PoolOption) (*Pool, error) {
	o, err := cfg.options()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	p := &Pool{opts: o, log: log.With("component", "exchange-pool"), servers: []target{o.primary}, waiters: make(chan struct{}, 1), urgentWaiters: make(chan struct{}, 1), stop: make(chan struct{}), served: map[*worker]time.Time{}}
	p.metrics = noInstruments()
	p.tracer = noTracer
	for _, opt := range opts {
		opt(p)
	}
	sctx, cancel := context.WithTimeout(ctx, cfg.StartTimeout)
	defer cancel()
	if p.slots != nil {
		if err := p.firstSlot(sctx); err != nil {
			return nil, err
		}
	}
	w, err := p.spawn(sctx, o.primary)
	if err != nil {
		p.trimSlots()
		return nil, err
	}
	p.mu.Lock()
	p.total = 1
	p.idle = append(p.idle, w)
	p.mu.Unlock()
	if p.slots != nil {
		p.wg.Add(2)
		go p.watchSlots()
		go p.shrink()
	}
	if cfg.CASFailover {
		if err := p.discover(ctx, w); err != nil {
			p.log.Warn("CAS discovery failed; failover limited to the configured server", "error", err)
		}
	}
	p.wg.Add(1)
	go p.maintain()
	return p, nil
}

func (p *Pool) spawn(ctx context.Context, t target) (*worker, error) {
	w, err := startWorker(ctx, p.opts.transport, t, p.opts.connect, p.opts.cfg.OperationTimeout, &p.roundTrips)
	if err != nil {
		return nil, err
	}
	p.log.Debug("worker started", "server", t.fqdn, "mode", w.mode)
	return w, nil
}

// Cmdlets returns the cmdlets the connected account may run, as the first
// worker's session reported them.
func (p *Pool) Cmdlets(ctx context.Context) ([]string, error) {
	w, err := p.acquire(ctx, Request{}) // not urgent, not a batch
	if err != nil {
		return nil, err
	}
	defer p.release(w, nil)
	return append([]string(nil), w.cmdlets...), nil
}

// discover asks Exchange for its Client Access servers (Get-ClientAccessService
// on 2016+, Get-ExchangeServer otherwise) and adds them after the primary.
func (p *Pool) discover(ctx context.Context, w *worker) error {
	var names []string
	collect := func(objs []Object, roleCheck bool) {
		for _, o := range objs {
			fqdn := str(o, "Fqdn")
			if roleCheck {
				if v, _ := o.Get("IsClientAccessServer"); v == false {
					continue
				}
			}
			if fqdn != "" {
				names = append(names, strings.ToLower(fqdn))
			}
		}
	}
	cctx, cancel := context.WithTimeout(ctx, p.opts.cfg.RequestTimeout)
	defer cancel()
	_, r, err := w.call(cctx, Request{Op: "invoke", Call: &Call{Cmdlet: "Get-ClientAccessService", Select: []string{"Fqdn"}}}, nil)
	if err != nil {
		return err
	}
	if r.OK {
		collect(r.Objects, false)
	} else {
		_, r, err = w.call(cctx, Request{Op: "invoke", Call: &Call{Cmdlet: "Get-ExchangeServer", Select: []string{"Fqdn", "IsClientAccessServer"}}}, nil)
		if err != nil {
			return err
		}
		if !r.OK {
			return ResultError("Get-ExchangeServer", r.Errors)
		}
		collect(r.Objects, true)
	}
	sort.Strings(names)
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, n := range names {
		if n != p.opts.primary.fqdn {
			p.servers = append(p.servers, target{fqdn: n, port: p.opts.primary.port})
		}
	}
	p.log.Info("Client Access servers", "servers", p.serverNames())
	return nil
}

func (p *Pool) serverNames() []string {
	var out []string
	for _, s := range p.servers {
		out = append(out, s.fqdn)
	}
	return out
}

// Servers returns the servers the pool may use, primary first.
func (p *Pool) Servers() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.serverNames()
}

// Current returns the server new workers start on.
func (p *Pool) Current() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.servers[p.current].fqdn
}

// RoundTrips returns how many HTTP requests the pool's workers have sent.
func (p *Pool) RoundTrips() int64 { return p.roundTrips.Load() }

// MaxSessions returns how many sessions the pool may open under a backlog:
// Workers, or with a shared budget the whole budget (the budget, not this
// number, decides how many it gets). Callers that split work into
// parallel requests split it this many ways, so that a backlog reaches
// the pool as waiting requests, which is what makes it grow.
func (p *Pool) MaxSessions() int { return p.ceiling() }

func (p *Pool) ceiling() int {
	if p.slots == nil {
		return p.opts.cfg.Workers
	}
	return max(p.opts.cfg.Workers, min(p.slots.Total(), MaxSessionBudget))
}

// Sessions returns how many sessions the pool has open or opening.
func (p *Pool) Sessions() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.total
}

// wantsBurst reports whether the requests queued for a worker (the asking
// one included) need longer than burstTarget to clear on the pool's
// sessions, so that one more session beyond Workers is worth opening.
// Only with a shared budget: it is what bounds the growth. Call it with
// p.mu held.
func (p *Pool) wantsBurst() bool {
	if p.slots == nil || p.total >= p.ceiling() || p.service <= 0 || time.Now().Before(p.noSlotUntil) {
		return false
	}
	queued := time.Duration(p.waiting + 1)
	return queued*p.service > burstTarget*time.Duration(max(p.total, 1))
}

// markServed records that w finished a request that took d (zero: not
// counted in the average), for shrink and wantsBurst.
func (p *Pool) markServed(w *worker, d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.served[w] = time.Now()
	if d > 0 {
		if p.service == 0 {
			p.service = d
		} else {
			p.service += (d - p.service) / 5
		}
	}
}

// shrink closes sessions beyond Workers that have idled for BurstIdle,
// which gives their slots back to the organisation's budget.
func (p *Pool) shrink() {
	defer p.wg.Done()
	idle := p.opts.cfg.burstIdle()
	t := time.NewTicker(min(max(idle/4, 50*time.Millisecond), 15*time.Second))
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
		p.mu.Lock()
		var drop []*worker
		keep := p.idle[:0]
		for _, w := range p.idle {
			if p.total > p.opts.cfg.Workers && time.Since(p.served[w]) >= idle {
				drop = append(drop, w)
				delete(p.served, w)
				p.total--
				p.outside++
			} else {
				keep = append(keep, w)
			}
		}
		p.idle = keep
		sessions := p.total
		p.mu.Unlock()
		if len(drop) > 0 {
			p.log.Info("closing idle sessions opened for a backlog", "closing", len(drop), "sessions", sessions, "idle", idle)
		}
		for _, w := range drop {
			go p.closeOutside(w)
		}
	}
}

// acquire returns an idle worker on the current server, starts one if
// the pool has room, or waits for one to come back. A request that is not
// urgent takes no idle worker while an urgent one waits for it, and a
// batch of reads leaves one idle (kept).
func (p *Pool) acquire(ctx context.Context, req Request) (*worker, error) {
	urgent := req.Urgent
	// queued: this urgent request is counted in p.urgent, from its first
	// wait until it has a worker or gives up, so that no other request
	// takes the worker that wakes it before it has run. Guarded by p.mu.
	queued := false
	unqueue := func() {
		if queued {
			p.urgent--
			queued = false
		}
	}
	for {
		p.mu.Lock()
		if p.closed {
			unqueue()
			p.mu.Unlock()
			return nil, fmt.Errorf("%w: pool closed", ErrTransient)
		}
		cur := p.servers[p.current]
		for len(p.idle) > p.kept(req) && (urgent || p.urgent == 0) {
			w := p.idle[len(p.idle)-1]
			p.idle = p.idle[:len(p.idle)-1]
			if w.dead.Load() || w.target != cur {
				// Dead, or on a server the pool has moved away from.
				p.total--
				p.outside++
				p.mu.Unlock()
				p.closeOutside(w)
				p.mu.Lock()
				continue
			}
			// A release wakes one waiter; pass the wake on while workers
			// are left for the others.
			unqueue()
			more := len(p.idle) > 0 && p.waiting > 0
			p.mu.Unlock()
			if more {
				p.signal()
			}
			return w, nil
		}
		burst := p.total >= p.opts.cfg.Workers && p.wantsBurst()
		grow := p.total < p.opts.cfg.Workers || burst
		var poll <-chan time.Time
		if grow && p.slots != nil && p.total+p.outside >= p.held && p.acquiring {
			grow, poll = false, time.After(slotPoll)
		} else if grow && p.slots != nil && p.total+p.outside >= p.held {
			// Every held slot has its session: take one more, if the
			// organisation's budget has one free.
			p.acquiring = true
			p.mu.Unlock()
			ok, err := p.slots.Acquire(ctx)
			if err != nil {
				p.log.Warn("session budget unavailable", "error", err)
			}
			p.mu.Lock()
			p.acquiring = false
			p.signal()
			if ok {
				p.held++
				p.mu.Unlock()
				continue
			}
			if burst {
				// Other processes hold the rest: ask again later, not
				// at every request of the backlog.
				p.noSlotUntil = time.Now().Add(slotPoll)
			}
			grow = false
			poll = time.After(slotPoll)
		}
		if grow && burst {
			// The session opens in the background: this request takes
			// whichever worker is free first, which is seldom the new one.
			p.total++
			p.log.Info("opening a session for a backlog", "queued", p.waiting+1, "sessions", p.total, "workers", p.opts.cfg.Workers, "request_ms", p.service.Milliseconds())
			p.wg.Add(1)
			go p.spawnExtra(cur)
			grow = false
		}
		if grow {
			p.total++
			unqueue()
			p.mu.Unlock()
			p.signal() // a worker that came back meanwhile is for the others
			sctx, cancel := context.WithTimeout(ctx, p.opts.cfg.StartTimeout)
			w, err := p.spawn(sctx, cur)
			cancel()
			if err != nil {
				p.mu.Lock()
				p.total--
				p.mu.Unlock()
				p.trimSlots()
				p.noteFailure(cur, err)
				p.signal()
				return nil, err
			}
			p.markServed(w, 0)
			p.noteSuccess(cur)
			return w, nil
		}
		p.waiting++
		wake := p.waiters
		if urgent {
			if !queued {
				p.urgent++
				queued = true
			}
			wake = p.urgentWaiters
		}
		p.mu.Unlock()
		var err error
		select {
		case <-wake:
		case <-poll:
		case <-ctx.Done():
			err = fmt.Errorf("%w: waiting for a worker: %w", ErrTransient, ctx.Err())
		}
		p.mu.Lock()
		p.waiting--
		if err != nil {
			unqueue()
			p.mu.Unlock()
			p.signal() // the workers it held back are for the others
			return nil, err
		}
		p.mu.Unlock()
	}
}

// spawnExtra opens a session beyond Workers (counted in total already)
// and hands it to whoever waits for a worker.
func (p *Pool) spawnExtra(t target) {
	defer p.wg.Done()
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.cfg.StartTimeout)
	defer cancel()
	go func() {
		select {
		case <-p.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	w, err := p.spawn(ctx, t)
	if err != nil {
		p.mu.Lock()
		p.total--
		p.mu.Unlock()
		p.trimSlots()
		p.noteFailure(t, err)
		p.signal()
		p.log.Warn("could not open a session for a backlog", "server", t.fqdn, "error", err)
		return
	}
	p.markServed(w, 0)
	p.noteSuccess(t)
	p.release(w, nil)
}

// firstSlot waits for the slot of the first worker.
func (p *Pool) firstSlot(ctx context.Context) error {
	for {
		ok, err := p.slots.Acquire(ctx)
		if ok {
			p.mu.Lock()
			p.held++
			p.mu.Unlock()
			return nil
		}
		p.log.Debug("waiting for a session slot", "error", err)
		select {
		case <-ctx.Done():
			if err == nil {
				err = fmt.Errorf("all %d are held by other processes (EASGUARD_EXCHANGE_SESSION_BUDGET)", p.slots.Total())
			}
			return fmt.Errorf("%w: %w", ErrNoSessionSlot, err)
		case <-time.After(slotPoll):
		}
	}
}

// trimSlots gives back the slots no open session needs.
func (p *Pool) trimSlots() {
	if p.slots == nil {
		return
	}
	p.mu.Lock()
	n := p.held - (p.total + p.outside)
	if n > 0 {
		p.held -= n
	}
	p.mu.Unlock()
	for range n {
		p.slots.Release()
	}
	if n > 0 {
		p.signal()
	}
}

// closeOutside closes a worker that no longer counts in total; its slot
// is given back once its session is gone. Call it with p.outside already
// counting the worker.
func (p *Pool) closeOutside(w *worker) {
	w.close(context.Background())
	p.mu.Lock()
	delete(p.served, w)
	p.outside--
	p.mu.Unlock()
	p.trimSlots()
}

// watchSlots gives up one session for every slot the pool loses: an idle
// worker at once, else the next worker that finishes its request.
func (p *Pool) watchSlots() {
	defer p.wg.Done()
	for {
		select {
		case <-p.stop:
			return
		case <-p.slots.Lost():
		}
		p.mu.Lock()
		p.held--
		var w *worker
		if p.total+p.outside > p.held && len(p.idle) > 0 {
			w = p.idle[0]
			p.idle = p.idle[1:]
			p.total--
			p.outside++
		}
		p.mu.Unlock()
		if w != nil {
			p.log.Warn("session slot lost; closing an idle worker", "server", w.target.fqdn)
			go p.closeOutside(w)
		}
	}
}

// kept is how many idle workers a request leaves to others: a batch that
// no change waits for (a sync's reads of mailboxes) leaves one whenever
// the pool has two or more, so that a change someone waits for finds a
// session free at once instead of waiting for a batch to end. The reads
// of quick syncs, a few cmdlets a batch on every session in step, made
// an allow wait up to a batch's 60 ms: 91 ms at the 99th percentile of
// BenchmarkTimeToAllow/webhook_idle against Set-CASMailbox's 40, 60 ms
// with the session kept. Such batches run on one session fewer; a backlog
// of them opens more (wantsBurst), as it would have anyway. A listing
// (invoke) keeps nothing back: it holds its session until it ends, and a
// full listing's parts are as many as the sessions, so one kept back
// would slow it by a part in four where Exchange's pace bounds it
// (BenchmarkFullListing with the slow profile); a change during a full
// listing still waits for a part to end. Guarded by p.mu.
func (p *Pool) kept(req Request) int {
	if req.Urgent || req.Op != "batch" || p.total < 2 {
		return 0
	}
	return 1
}

// signal wakes a request waiting for a worker: an urgent one and one
// that is not, each of which takes a worker if one is idle (the other
// waits on while an urgent one does) and passes the wake on while more
// are idle.
func (p *Pool) signal() {
	select {
	case p.urgentWaiters <- struct{}{}:
	default:
	}
	select {
	case p.waiters <- struct{}{}:
	default:
	}
}

// release returns a worker after a request; dead, recycled or stranded
// workers are closed instead.
func (p *Pool) release(w *worker, err error) {
	p.mu.Lock()
	retire := w.dead.Load() || w.retiring.Load() || p.closed || w.target != p.servers[p.current] ||
		w.requests >= p.opts.cfg.RecycleRequests || time.Since(w.started) >= p.opts.cfg.RecycleAfter ||
		(p.slots != nil && p.total+p.outside > p.held) // a slot was lost
	if retire {
		p.total--
		p.outside++
	} else {
		p.idle = append(p.idle, w)
	}
	p.mu.Unlock()
	if retire {
		go p.closeOutside(w)
	}
	p.signal()
}

// noteFailure counts a failure to reach a server; two in a row move the
// pool to the next server, and start probing the primary if the pool left it.
func (p *Pool) noteFailure(t target, err error) {
	if IsFatal(err) || !(errors.Is(err, ErrUnreachable) || errors.Is(err, ErrWorkerDead) || errors.Is(err, ErrTransient)) {
		return
	}
	if errors.Is(err, ErrSessionBroken) {
		// The CAS answered; its app pool recycled. A new session works.
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.servers[p.current] != t {
		return
	}
	p.failures++
	if p.failures < 2 || len(p.servers) < 2 {
		return
	}
	from := p.servers[p.current].fqdn
	p.current = (p.current + 1) % len(p.servers)
	p.failures = 0
	p.log.Warn("failing over to another Client Access server", "from", from, "to", p.servers[p.current].fqdn, "error", err)
	if p.current != 0 && !p.probing {
		p.probing = true
		p.wg.Add(1)
		go p.probePrimary()
	}
}

func (p *Pool) noteSuccess(t target) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.servers[p.current] == t {
		p.failures = 0
	}
}

// probePrimary tries the primary with backoff until it answers again, then
// moves the pool back to it.
func (p *Pool) probePrimary() {
	defer p.wg.Done()
	b := backoff.NewExponentialBackOff(backoff.WithInitialInterval(500*time.Millisecond), backoff.WithMaxInterval(30*time.Second), backoff.WithMaxElapsedTime(0))
	for {
		select {
		case <-p.stop:
			return
		case <-time.After(b.NextBackOff()):
		}
		ctx, cancel := context.WithTimeout(context.Background(), p.opts.cfg.StartTimeout)
		if !p.probeSlot(ctx) {
			cancel()
			p.log.Debug("no session slot free to probe the primary")
			continue
		}
		w, err := p.spawn(ctx, p.opts.primary)
		cancel()
		if err != nil {
			p.mu.Lock()
			p.outside--
			p.mu.Unlock()
			p.trimSlots()
			p.log.Debug("primary still unavailable", "server", p.opts.primary.fqdn, "error", err)
			continue
		}
		p.mu.Lock()
		p.current, p.failures, p.probing = 0, 0, false
		keep := p.total < p.opts.cfg.Workers && !p.closed
		if keep {
			// The probe's session becomes a worker on the same slot.
			p.total++
			p.outside--
			p.idle = append(p.idle, w)
		}
		p.mu.Unlock()
		if !keep {
			p.closeOutside(w)
		}
		p.log.Info("back on the primary Client Access server", "server", p.opts.primary.fqdn)
		p.signal()
		return
	}
}

// probeSlot counts the probe's session against a slot, taking one more
// from the shared budget if no held slot is free; false when none is.
func (p *Pool) probeSlot(ctx context.Context) bool {
	if p.slots == nil {
		p.mu.Lock()
		p.outside++
		p.mu.Unlock()
		return true
	}
	p.mu.Lock()
	if p.total+p.outside < p.held {
		p.outside++
		p.mu.Unlock()
		return true
	}
	p.mu.Unlock()
	ok, err := p.slots.Acquire(ctx)
	if !ok {
		if err != nil {
			p.log.Debug("session budget unavailable", "error", err)
		}
		return false
	}
	p.mu.Lock()
	p.held++
	p.outside++
	p.mu.Unlock()
	return true
}

// maintain pings idle workers and retires old ones.
func (p *Pool) maintain() {
	defer p.wg.Done()
	t := time.NewTicker(p.opts.cfg.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
		p.mu.Lock()
		var check []*worker
		keep := p.idle[:0]
		for _, w := range p.idle {
			if time.Since(w.lastUsed) >= p.opts.cfg.Heartbeat {
				check = append(check, w)
			} else {
				keep = append(keep, w)
			}
		}
		p.idle = keep
		p.mu.Unlock()
		for _, w := range check {
			ctx, cancel := context.WithTimeout(context.Background(), p.opts.cfg.OperationTimeout+10*time.Second)
			_, r, err := w.call(ctx, Request{Op: "ping"}, nil)
			cancel()
			switch {
			case err != nil:
				p.log.Warn("idle worker failed its heartbeat; replacing it", "server", w.target.fqdn, "error", err)
				w.kill()
			case !r.OK:
				// It answers, so it can say bye and remove what is left of
				// its session.
				p.log.Warn("idle worker's Exchange session failed its heartbeat; replacing it", "server", w.target.fqdn, "error", ResultError("ping", r.Errors))
				w.retiring.Store(true)
			}
			p.release(w, err)
		}
	}
}

// Do runs one request, retrying transient failures with backoff on a fresh
// worker (and, after failover, another CAS).
//
// The request deadline (RequestTimeout) bounds silence, not the whole
// request: it counts from the start, and for a paged answer again from
// every page received, so a listing of any size completes as long as its
// pages keep coming; a worker silent for RequestTimeout is killed and the
// request fails with ErrTransient wrapping context.DeadlineExceeded. The
// caller's own context still bounds everything.
//
// Requests are safe to repeat (reads are reads, and easguard's writes add
// and remove list entries, which converge when applied twice), but a
// repeated listing would hand the caller its first pages again. So a
// request is retried only while none of its answer has reached onPage;
// after that its failure is returned and the caller starts over.
func (p *Pool) Do(ctx context.Context, req Request, onPage func([]Object) error) (Response, error) {
	timeout := p.opts.cfg.RequestTimeout
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	silence := fmt.Errorf("%w: %s: no answer from Exchange for %s (EASGUARD_EXCHANGE_REQUEST_TIMEOUT): %w", ErrTransient, req.Op, timeout, context.DeadlineExceeded)
	quiet := time.AfterFunc(timeout, func() { cancel(silence) })
	defer quiet.Stop()
	delivered := false
	page := func(objs []Object) error {
		// The caller's time with a page is not the worker's silence.
		quiet.Stop()
		delivered = true
		var err error
		if onPage != nil {
			err = onPage(objs)
		}
		quiet.Reset(timeout)
		return err
	}
	b := backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond), backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(0)), ctx)
	var last error
	for {
		w, err := p.acquire(ctx, req)
		if err == nil {
			var r Response
			began := time.Now()
			sctx, span := p.startSpan(ctx, req, w.target.fqdn)
			_, r, err = w.call(sctx, req, page)
			endSpan(span, req, r, err)
			took := time.Since(began)
			p.metrics.record(ctx, req, took, r, err)
			if delivered || err != nil {
				took = 0 // a listing's pages or a failure say nothing of a request's time
			}
			p.markServed(w, took)
			if err == nil {
				if berr := sessionBrokenIn(r); berr != nil {
					// The worker answers, but its Exchange session is gone:
					// it leaves with bye, and a new worker (a new session)
					// runs the request. Reads are reads; easguard's writes
					// read the lists first, so a repeated batch is safe.
					w.retiring.Store(true)
					p.log.Warn("Exchange session broken; replacing the worker", "server", w.target.fqdn, "error", berr)
					err = berr
				}
			}
			p.release(w, err)
			if err == nil {
				p.noteSuccess(w.target)
				return r, nil
			}
			p.noteFailure(w.target, err)
		}
		if ctx.Err() != nil {
			return Response{}, deadlineError(ctx, err, last)
		}
		if !IsTransient(err) {
			return Response{}, err
		}
		if delivered {
			return Response{}, fmt.Errorf("%w (not retried: part of the answer had reached the caller)", err)
		}
		last = err
		d := b.NextBackOff()
		if d == backoff.Stop {
			return Response{}, err
		}
		p.log.Debug("retrying request", "op", req.Op, "in", d, "error", err)
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return Response{}, deadlineError(ctx, err, last)
		}
	}
}

// deadlineError says why a request's context ended: the request deadline
// (its cause, already classified) or the caller's context, with the last
// failure before it.
func deadlineError(ctx context.Context, err, last error) error {
	cause := context.Cause(ctx)
	if !IsTransient(cause) {
		// The caller's context ended.
		cause = fmt.Errorf("%w: %w", ErrTransient, cause)
	}
	switch {
	case last != nil:
		// Wrapped, so that what kept failing can be told from the error
		// (an alert says "unreachable", not just "timed out").
		return fmt.Errorf("%w (last failure: %w)", cause, last)
	case err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%w (failure: %w)", cause, err)
	}
	return cause
}

// sessionBrokenIn returns the classified error when a response (or one
// call of a batch) says the worker's Exchange session broke.
func sessionBrokenIn(r Response) error {
	check := func(errs []Error) error {
		for _, e := range errs {
			if e.Reason == "SessionBroken" {
				return classify("session", e)
			}
		}
		return nil
	}
	if err := check(r.Errors); err != nil {
		return err
	}
	for _, res := range r.Results {
		if err := check(res.Errors); err != nil {
			return err
		}
	}
	return nil
}

// Close ends every worker cleanly (their shells are deleted, so none is
// left to count against the throttling limit) and stops the pool.
func (p *Pool) Close(ctx context.Context) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	idle := p.idle
	p.idle = nil
	p.total -= len(idle) // under the lock: release reads it while busy workers finish
	p.mu.Unlock()
	close(p.stop)
	var wg sync.WaitGroup
	for _, w := range idle {
		wg.Add(1)
		go func() { defer wg.Done(); w.close(ctx) }()
	}
	wg.Wait()
	p.wg.Wait()
	// The slots of the closed sessions go back; busy workers give theirs
	// back when their request ends.
	p.trimSlots()
}
