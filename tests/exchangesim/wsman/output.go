package wsman

import (
	"context"
	"errors"
	"io"
	"sync"
)

// Stream names used on the wire. WinRS shells created by masterzen/winrm (and by winrs.exe) declare exactly these
// output streams, and the client routes bytes by the Name attribute, so a process that invents other names would
// produce output nobody reads.
const (
	StreamStdout = "stdout"
	StreamStderr = "stderr"
)

// ErrProcessExited is returned by OutputQueue writes after Exit. The server reports Done to the client as soon as the
// queue is empty after Exit, so bytes written later could never reach it; failing loudly exposes such bugs in a
// simulated process instead of silently dropping output.
var ErrProcessExited = errors.New("wsman: process has already exited")

// Chunk is a run of output bytes from one stream, in the order the process wrote them.
type Chunk struct {
	// Stream is StreamStdout or StreamStderr.
	Stream string
	// Data holds the bytes; the server encodes each Chunk as its own rsp:Stream element.
	Data []byte
}

// OutputQueue is a ready-made implementation of the output half of Process. Simulated processes write to Stdout and
// Stderr (never blocking: the queue grows with what the process writes) and call Exit once; the server long-polls
// Ready and drains with ReadOutput. Keeping one queue for both streams preserves the arrival order across stdout and
// stderr, which is what Windows does when it fills a ReceiveResponse. The zero value is not usable; call
// NewOutputQueue.
type OutputQueue struct {
	mu          sync.Mutex
	chunks      []Chunk
	exited      bool
	code        int
	ready       chan struct{}
	readyClosed bool
	// pending counts queued bytes; room is closed while pending < limit.
	pending int
	limit   int
	room    chan struct{}
}

// NewOutputQueue returns an empty queue for a running process.
func NewOutputQueue() *OutputQueue {
	room := make(chan struct{})
	close(room)
	return &OutputQueue{ready: make(chan struct{}), room: room}
}

// SetLimit makes the queue behave like a pipe with a buffer of n bytes for
// writers that call WaitForRoom: a process that writes faster than the
// client receives then waits, as a real process blocks on a full stdout
// pipe, instead of piling its whole output up in memory. 0 means no limit.
func (q *OutputQueue) SetLimit(n int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.limit = n
	q.updateRoomLocked()
}

// WaitForRoom blocks while the queue holds at least its limit, until the
// client has read enough, the process has exited, or ctx ends.
func (q *OutputQueue) WaitForRoom(ctx context.Context) error {
	for {
		q.mu.Lock()
		room, full := q.room, q.limit > 0 && q.pending >= q.limit && !q.exited
		q.mu.Unlock()
		if !full {
			return nil
		}
		select {
		case <-room:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (q *OutputQueue) updateRoomLocked() {
	full := q.limit > 0 && q.pending >= q.limit
	select {
	case <-q.room:
		if full {
			q.room = make(chan struct{})
		}
	default:
		if !full {
			close(q.room)
		}
	}
}

// Stdout returns a writer that appends to the stdout stream. It is safe for concurrent use with every other method.
func (q *OutputQueue) Stdout() io.Writer { return streamWriter{q: q, stream: StreamStdout} }

// Stderr returns a writer that appends to the stderr stream. It is safe for concurrent use with every other method.
func (q *OutputQueue) Stderr() io.Writer { return streamWriter{q: q, stream: StreamStderr} }

type streamWriter struct {
	q      *OutputQueue
	stream string
}

func (w streamWriter) Write(p []byte) (int, error) { return w.q.Write(w.stream, p) }

// Write appends p to the named stream. Consecutive writes to the same stream are merged so that a chatty process
// does not turn into thousands of tiny rsp:Stream elements; a write to the other stream starts a new chunk, which
// keeps the cross-stream order intact. Write copies p and never blocks on the reader.
func (q *OutputQueue) Write(stream string, p []byte) (int, error) {
	if stream != StreamStdout && stream != StreamStderr {
		return 0, errors.New("wsman: unknown output stream " + stream)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.exited {
		return 0, ErrProcessExited
	}
	if len(p) == 0 {
		return 0, nil
	}
	q.pending += len(p)
	q.updateRoomLocked()
	if n := len(q.chunks); n > 0 && q.chunks[n-1].Stream == stream {
		q.chunks[n-1].Data = append(q.chunks[n-1].Data, p...)
	} else {
		q.chunks = append(q.chunks, Chunk{Stream: stream, Data: append([]byte(nil), p...)})
	}
	q.signalLocked()
	return len(p), nil
}

// Exit records that the process finished with code. Only the first call counts, because a real process exits once
// and a simulated one may race its own Terminate path against a normal exit.
func (q *OutputQueue) Exit(code int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.exited {
		return
	}
	q.exited = true
	q.code = code
	q.signalLocked()
	if q.limit > 0 {
		q.limit = 0
		q.updateRoomLocked()
	}
}

// Exited reports whether Exit has been called, and with which code. Queued output may still be waiting to be read.
func (q *OutputQueue) Exited() (code int, exited bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.code, q.exited
}

// Ready returns a channel that is closed while output is queued or the process has exited. It is level-triggered:
// callers fetch a fresh channel before every wait, so a wake-up can never be lost between a ReadOutput that found
// nothing and the next wait.
func (q *OutputQueue) Ready() <-chan struct{} {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.ready
}

// ReadOutput removes and returns up to max bytes from the oldest queued chunk (a single stream). It returns an empty
// Chunk when nothing is queued. done is true once the process has exited and every byte has been read; exitCode is
// only meaningful then. Both results come from one critical section, so the server can never report Done while a
// final write is still in flight.
func (q *OutputQueue) ReadOutput(max int) (c Chunk, done bool, exitCode int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.chunks) > 0 && max > 0 {
		head := &q.chunks[0]
		n := min(max, len(head.Data))
		// A full slice expression caps the capacity, so a caller's append can never scribble over bytes that a
		// later merge appends behind the returned window.
		c = Chunk{Stream: head.Stream, Data: head.Data[:n:n]}
		head.Data = head.Data[n:]
		q.pending -= n
		q.updateRoomLocked()
		if len(head.Data) == 0 {
			q.chunks[0] = Chunk{}
			q.chunks = q.chunks[1:]
		}
	}
	if len(q.chunks) == 0 && !q.exited && q.readyClosed {
		q.ready = make(chan struct{})
		q.readyClosed = false
	}
	return c, q.exited && len(q.chunks) == 0, q.code
}

func (q *OutputQueue) signalLocked() {
	if !q.readyClosed {
		close(q.ready)
		q.readyClosed = true
	}
}
