package intunesim

import (
	"strconv"
	"time"

	"github.com/easguard/easguard/tests/simrecord"
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

// Recorder keeps the most recent records and counts all of them: under
// the kind ("graph"), kind and status ("graph:429"), "token:issued" for a
// token handed out, and "note" for a request with something ignored.
type Recorder struct {
	*simrecord.Log[Record]
}

// NewRecorder keeps at most max records (the oldest are dropped; counts
// are kept for all).
func NewRecorder(max int) *Recorder {
	return &Recorder{simrecord.New[Record](max)}
}

// Add records one request.
func (r *Recorder) Add(rec Record) {
	keys := []string{rec.Kind, rec.Kind + ":" + strconv.Itoa(rec.Status)}
	if rec.Kind == "token" && rec.Status == 200 {
		keys = append(keys, "token:issued")
	}
	if rec.Note != "" {
		keys = append(keys, "note")
	}
	r.Log.Add(rec, keys...)
}

// Records returns the kept records, oldest first, optionally of one kind.
func (r *Recorder) Records(kind string) []Record {
	return r.Select(func(rec Record) bool { return kind == "" || rec.Kind == kind })
}
