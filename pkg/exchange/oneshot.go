package exchange

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/masterzen/winrm"
)

// OneShot runs every request in a fresh shell and PowerShell process:
// start, send the worker script, connect to Exchange, run the one request,
// exit. It is what a connector that runs one command per invocation does,
// which makes it the baseline the pool is measured against, and it is
// useful for diagnostics because nothing is shared between requests.
type OneShot struct {
	opts       *options
	roundTrips atomic.Int64
}

// NewOneShot validates the settings; nothing is contacted until Do.
func NewOneShot(cfg Config) (*OneShot, error) {
	opts, err := cfg.options()
	if err != nil {
		return nil, err
	}
	return &OneShot{opts: opts}, nil
}

// RoundTrips returns how many HTTP requests the one-shot runs have sent.
func (o *OneShot) RoundTrips() int64 { return o.roundTrips.Load() }

// Do runs one request in its own shell.
func (o *OneShot) Do(ctx context.Context, req Request, onPage func([]Object) error) (Response, error) {
	ctx, cancel := context.WithTimeout(ctx, o.opts.cfg.StartTimeout+o.opts.cfg.RequestTimeout)
	defer cancel()
	t := o.opts.primary
	tr := newTransport(ctx, o.opts.transport, t, &o.roundTrips)
	params := winrm.NewParameters(isoSeconds(o.opts.cfg.OperationTimeout), "en-US", 153600)
	params.TransportDecorator = func() winrm.Transporter { return tr }
	client, err := winrm.NewClientWithParameters(&winrm.Endpoint{Host: t.fqdn, Port: t.port, HTTPS: o.opts.transport.https}, o.opts.transport.user, o.opts.transport.pass, params)
	if err != nil {
		return Response{}, fmt.Errorf("%w: winrm client: %w", ErrInvalid, err)
	}
	cs := o.opts.connect
	var stdin bytes.Buffer
	stdin.Write(ScriptLine())
	for i, r := range []Request{
		{Op: "connect", Mode: cs.mode, URI: strings.ReplaceAll(cs.psURL, "{server}", t.fqdn), Auth: cs.psAuth, User: cs.user, Password: cs.password, SkipCACheck: cs.skipCA, SkipCNCheck: cs.skipCA},
		req,
		{Op: "bye"},
	} {
		r.ID = int64(i + 1)
		line, err := EncodeRequest(r)
		if err != nil {
			return Response{}, fmt.Errorf("%w: %w", ErrInvalid, err)
		}
		stdin.Write(line)
	}
	stdout, stderr, code, err := client.RunWithContextWithString(ctx, CommandLine(), stdin.String())
	if err != nil {
		return Response{}, fmt.Errorf("one-shot run on %s: %w", t.fqdn, asKind(err))
	}
	var final *Response
	sc := bufio.NewScanner(strings.NewReader(stdout))
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), FatalSentinel) {
			return Response{}, fatalError(sc.Text())
		}
		r, ok, err := DecodeFrame(sc.Text())
		if !ok {
			continue
		}
		if err != nil {
			return Response{}, fmt.Errorf("%w: %w", ErrTransient, err)
		}
		switch {
		case r.ID == 1 && r.Done && !r.OK:
			return Response{}, fmt.Errorf("connect to Exchange on %s: %w", t.fqdn, ResultError("New-PSSession", r.Errors))
		case r.ID == 2 && !r.Done && onPage != nil:
			if err := onPage(r.Objects); err != nil {
				return Response{}, err
			}
		case r.ID == 2 && r.Done:
			rr := r
			final = &rr
		}
	}
	if final == nil {
		return Response{}, fmt.Errorf("%w: one-shot run on %s ended (exit %d) without an answer: %s", ErrTransient, t.fqdn, code, strings.TrimSpace(stderr))
	}
	return *final, nil
}
