package exchange

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strings"
)

//go:embed worker_contract.json
var workerContractJSON []byte

// WorkerContract is what worker.ps1 does that the Go side and the Exchange
// simulator must agree with, taken from the script's syntax tree by
// .ci/pssyntax/contract.mjs (make contract) and checked current in CI. The
// script runs under Set-StrictMode, so the simulator refuses a request that
// lacks a field the script reads unguarded, as Windows PowerShell would, and
// models the session the script opens from the options recorded here.
type WorkerContract struct {
	// Reads lists, per wire object kind ("request", "call"), the fields the
	// script reads without Get-WireField: every request must carry them.
	Reads map[string][]string `json:"reads"`
	// InvokeCommon holds the common parameters the script passes to every
	// cmdlet it runs (ErrorAction, WarningAction).
	InvokeCommon map[string]string `json:"invoke_common"`
	// SessionOption holds New-PSSessionOption's arguments (Culture,
	// UICulture, IdleTimeout in milliseconds).
	SessionOption map[string]any `json:"session_option"`
	// ThreadCulture is the culture the script sets for its own thread.
	ThreadCulture string `json:"thread_culture"`
	// Ops lists, per op of the main loop, the script functions it reaches.
	Ops map[string][]string `json:"ops"`
	// BootstrapChecksLanguageMode says the bootstrap refuses to run outside
	// FullLanguage with a message of its own.
	BootstrapChecksLanguageMode bool `json:"bootstrap_checks_language_mode"`
}

var workerContract = func() WorkerContract {
	var c WorkerContract
	if err := json.Unmarshal(workerContractJSON, &c); err != nil {
		panic(fmt.Sprintf("exchange: worker_contract.json: %v", err))
	}
	return c
}()

// Contract returns the worker script's contract.
func Contract() WorkerContract { return workerContract }

// OpReaches reports whether the script's handling of op reaches the script
// function fn (compared case-insensitively, as PowerShell does).
func (c WorkerContract) OpReaches(op, fn string) bool {
	return slices.ContainsFunc(c.Ops[op], func(s string) bool { return strings.EqualFold(s, fn) })
}

// SessionCulture returns the culture the remote session is opened with, or
// "" when the script leaves it to the host.
func (c WorkerContract) SessionCulture() string {
	s, _ := c.SessionOption["Culture"].(string)
	return s
}

// SessionIdleTimeoutMS returns the idle timeout the remote session asks
// for, or 0 when the script leaves the default (two hours).
func (c WorkerContract) SessionIdleTimeoutMS() int64 {
	f, _ := c.SessionOption["IdleTimeout"].(float64)
	return int64(f)
}

// AlwaysSent returns the JSON fields of a wire object kind ("request" or
// "call") that EncodeRequest always writes: those without omitempty.
func AlwaysSent(kind string) []string {
	var t reflect.Type
	switch kind {
	case "request":
		t = reflect.TypeFor[Request]()
	case "call":
		t = reflect.TypeFor[Call]()
	default:
		return nil
	}
	var out []string
	for f := range t.Fields() {
		name, opts, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "" || name == "-" || slices.Contains(strings.Split(opts, ","), "omitempty") {
			continue
		}
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}
