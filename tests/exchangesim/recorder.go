package exchangesim

import (
	"encoding/json"
	"sync"
	"time"
)

// Record is one entry of the recorder: a WS-Man request or a cmdlet call.
type Record struct {
	Time     time.Time `json:"time"`
	Endpoint string    `json:"endpoint"`
	Kind     string    `json:"kind"` // "wsman" or "cmdlet"
	User     string    `json:"user,omitempty"`
	// Action is the WS-Man action (Create, Command, Send, Receive, Signal, Delete).
	Action  string `json:"action,omitempty"`
	ShellID string `json:"shell_id,omitempty"`
	// Cmdlet and Params are the call exactly as the worker received it.
	Cmdlet   string          `json:"cmdlet,omitempty"`
	Params   json.RawMessage `json:"params,omitempty"`
	OK       bool            `json:"ok"`
	Objects  int             `json:"objects,omitempty"`
	Duration time.Duration   `json:"duration_ns,omitempty"`
}

// Recorder keeps the most recent records and counts all of them, so a
// test can assert what really reached "Exchange".
type Recorder struct {
	mu      sync.Mutex
	max     int
	records []Record
	start   int
	counts  map[string]int
}

// NewRecorder keeps at most max records (the oldest are dropped; counts
// are kept for all).
func NewRecorder(max int) *Recorder {
	return &Recorder{max: max, counts: map[string]int{}}
}

// Add records one entry.
func (r *Recorder) Add(rec Record) {
	r.mu.Lock()
	defer r.mu.Unlock()
	key := rec.Kind + ":" + rec.Action + rec.Cmdlet
	r.counts[key]++
	r.counts[rec.Kind]++
	if len(r.records) < r.max {
		r.records = append(r.records, rec)
		return
	}
	r.records[r.start] = rec
	r.start = (r.start + 1) % r.max
}

// Records returns the kept records, oldest first, optionally only of one kind.
func (r *Recorder) Records(kind string) []Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Record, 0, len(r.records))
	for i := range r.records {
		rec := r.records[(r.start+i)%len(r.records)]
		if kind == "" || rec.Kind == kind {
			out = append(out, rec)
		}
	}
	return out
}

// Count returns how many records of a kind ("wsman", "cmdlet") or of a
// kind and action/cmdlet ("wsman:Receive", "cmdlet:Set-CASMailbox") were added.
func (r *Recorder) Count(key string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.counts[key]
}

// Counts returns a copy of all counters.
func (r *Recorder) Counts() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]int, len(r.counts))
	for k, v := range r.counts {
		out[k] = v
	}
	return out
}

// Reset forgets all records and counts.
func (r *Recorder) Reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.records, r.start, r.counts = nil, 0, map[string]int{}
}
