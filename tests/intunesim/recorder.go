package intunesim

import (
	"strconv"
	"sync"
	"time"
)

// Record is one request the simulator answered on its HTTPS listener.
type Record struct {
	// Time is when the request arrived (the simulator's wall clock, not
	// Config.Now), so a test can measure how long a client waited.
	Time time.Time `json:"time"`
	// Kind is discovery, keys, token, graph or other.
	Kind   string `json:"kind"`
	Method string `json:"method"`
	// Path is the path and query as received.
	Path   string `json:"path"`
	Status int    `json:"status"`
	// RetryAfter is the Retry-After header sent, if any.
	RetryAfter string `json:"retry_after,omitempty"`
	// Fault is the injected fault kind that shaped the answer.
	Fault string `json:"fault,omitempty"`
	// ClientID and Auth (secret or certificate) of a token request; Error
	// is the OAuth or Graph error code answered.
	ClientID string `json:"client_id,omitempty"`
	Auth     string `json:"auth,omitempty"`
	Error    string `json:"error,omitempty"`
	// Page is the page number of a listing (1 = the first); Items the
	// devices it returned.
	Page  int `json:"page,omitempty"`
	Items int `json:"items,omitempty"`
	// Note says what the simulator ignored, e.g. "$filter ignored: …".
	Note     string        `json:"note,omitempty"`
	Duration time.Duration `json:"duration_ns"`
}

// Recorder keeps the most recent records and counts all of them.
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

// Add records one request. It counts it under its kind ("graph"), its kind
// and status ("graph:429"), and, for a token issued, "token:issued".
func (r *Recorder) Add(rec Record) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.counts[rec.Kind]++
	r.counts[rec.Kind+":"+strconv.Itoa(rec.Status)]++
	if rec.Kind == "token" && rec.Status == 200 {
		r.counts["token:issued"]++
	}
	if rec.Note != "" {
		r.counts["note"]++
	}
	if len(r.records) < r.max {
		r.records = append(r.records, rec)
		return
	}
	r.records[r.start] = rec
	r.start = (r.start + 1) % r.max
}

// Records returns the kept records, oldest first, optionally of one kind.
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

// Count returns a counter: a kind ("token", "graph"), a kind and status
// ("graph:200", "graph:429"), "token:issued", or "note".
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
