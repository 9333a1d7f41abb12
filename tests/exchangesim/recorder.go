package exchangesim

import (
	"encoding/json"
	"time"

	"github.com/easguard/easguard/tests/simrecord"
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
// test can assert what really reached "Exchange". Records are counted
// under their kind ("wsman", "cmdlet") and under kind and action or
// cmdlet ("wsman:Receive", "cmdlet:Set-CASMailbox").
type Recorder struct {
	*simrecord.Log[Record]
}

// NewRecorder keeps at most max records (the oldest are dropped; counts
// are kept for all).
func NewRecorder(max int) *Recorder {
	return &Recorder{simrecord.New[Record](max)}
}

// Add records one entry.
func (r *Recorder) Add(rec Record) {
	r.Log.Add(rec, rec.Kind, rec.Kind+":"+rec.Action+rec.Cmdlet)
}

// Records returns the kept records, oldest first, optionally only of one kind.
func (r *Recorder) Records(kind string) []Record {
	return r.Select(func(rec Record) bool { return kind == "" || rec.Kind == kind })
}
