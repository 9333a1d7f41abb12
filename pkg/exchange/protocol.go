// Package exchange is easguard's access to Exchange: a worker script that
// runs in a long-lived powershell.exe on a Windows host reached over WinRM,
// the frame protocol spoken with it, and (in later files) the pool of such
// workers and the typed operations built on them.
//
// The protocol is in PROTOCOL.md. Its one rule: data never becomes code.
// A request names an allow-listed cmdlet and carries its parameters as JSON
// values that the worker converts to typed values and splats.
package exchange

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode/utf16"

	"go.opentelemetry.io/otel/trace"
)

//go:embed worker.ps1
var workerScript []byte

//go:embed bootstrap.ps1
var bootstrapTemplate string

// ProtocolVersion is the frame protocol version the worker script speaks.
const ProtocolVersion = 1

// FrameSentinel starts every line the worker writes for easguard; other
// lines on stdout (a profile's greeting, host noise) are ignored.
const FrameSentinel = "EGF1 "

// FatalSentinel starts the one line the bootstrap writes when the worker
// script it received is not the one it was built for.
const FatalSentinel = "EGF1-FATAL "

// ExitScriptMismatch is the bootstrap's exit code for a script whose
// SHA-256 differs from the one it embeds.
const ExitScriptMismatch = 3

// ExitLanguageMode is the bootstrap's exit code on a host whose PowerShell
// runs in a language mode other than FullLanguage (Constrained Language
// Mode under AppLocker or WDAC), where the worker cannot run.
const ExitLanguageMode = 4

// fatalError is the error for the one line the bootstrap writes when it
// refuses to go on: a script whose hash is wrong, or a host in Constrained
// Language Mode. Neither gets better by retrying.
func fatalError(line string) error {
	msg := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), strings.TrimSpace(FatalSentinel)))
	return fmt.Errorf("%w: the worker refused to start on the Windows host: %s", ErrInvalid, msg)
}

// MaxDeviceIDLen is Exchange's limit on an ActiveSync DeviceId (the
// msExchDeviceID attribute holds at most 32 characters).
const MaxDeviceIDLen = 32

// AllowedCmdlets lists the cmdlets the worker script runs, in the script's
// order; it refuses every other name.
var AllowedCmdlets = []string{
	"Get-ActiveSyncOrganizationSettings", "Set-ActiveSyncOrganizationSettings",
	"Get-CASMailbox", "Set-CASMailbox",
	"Get-ActiveSyncMailboxPolicy", "Set-ActiveSyncMailboxPolicy", "New-ActiveSyncMailboxPolicy", "Remove-ActiveSyncMailboxPolicy",
	"Get-ActiveSyncDeviceAccessRule", "Set-ActiveSyncDeviceAccessRule", "New-ActiveSyncDeviceAccessRule", "Remove-ActiveSyncDeviceAccessRule",
	"Get-ActiveSyncDeviceStatistics", "Get-ActiveSyncDevice", "Get-ActiveSyncDeviceClass",
	"Get-MobileDevice", "Get-MobileDeviceStatistics",
	"Get-ExchangeServer", "Get-ClientAccessService", "Get-Recipient",
	"Clear-ActiveSyncDevice", "Remove-ActiveSyncDevice",
	"Set-ADServerSettings", "Get-Command",
}

// WorkerScript returns the worker script, byte for byte as shipped.
func WorkerScript() []byte { return bytes.Clone(workerScript) }

// WorkerScriptSHA256 returns the lower-case hex SHA-256 of the worker script,
// which the bootstrap checks before running it.
func WorkerScriptSHA256() string {
	sum := sha256.Sum256(workerScript)
	return hex.EncodeToString(sum[:])
}

// Bootstrap returns the small script passed on the command line. It reads
// the worker script as the first stdin line, refuses it unless its SHA-256
// is the shipped one, and runs it with the same stdin reader. The worker
// travels over stdin because a command line holds only about 3,000
// characters of script.
func Bootstrap() string {
	return strings.ReplaceAll(bootstrapTemplate, "@@SHA256@@", WorkerScriptSHA256())
}

// CommandLine returns the command that starts a worker on the Windows host.
func CommandLine() string {
	return "powershell.exe -NoLogo -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand " + EncodeCommand(Bootstrap())
}

// EncodeCommand encodes a script for powershell.exe -EncodedCommand:
// base64 of its UTF-16LE bytes.
func EncodeCommand(script string) string {
	u := utf16.Encode([]rune(script))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		b[2*i] = byte(c)
		b[2*i+1] = byte(c >> 8)
	}
	return base64.StdEncoding.EncodeToString(b)
}

// ScriptLine returns the first line sent to a starting worker: the worker
// script in base64.
func ScriptLine() []byte {
	return []byte(base64.StdEncoding.EncodeToString(workerScript) + "\n")
}

// Request is one request frame. Op is ping, connect, invoke, batch or bye.
type Request struct {
	V  int    `json:"v"`
	ID int64  `json:"id"`
	Op string `json:"op"`
	// Call is the cmdlet of an invoke.
	Call *Call `json:"call,omitempty"`
	// Calls are the cmdlets of a batch, run in order in one round trip.
	Calls []Call `json:"calls,omitempty"`
	// Page, when positive, streams an invoke's objects in frames of this many.
	Page int `json:"page,omitempty"`
	// Connect settings; the password travels only here, over stdin.
	Mode        string `json:"mode,omitempty"`
	URI         string `json:"uri,omitempty"`
	Auth        string `json:"auth,omitempty"`
	User        string `json:"user,omitempty"`
	Password    string `json:"password,omitempty"`
	SkipCACheck bool   `json:"skip_ca_check,omitempty"`
	SkipCNCheck bool   `json:"skip_cn_check,omitempty"`
	// Urgent marks a request that a change waits for (the reads and
	// writes of ApplyAccess, an operator's removal): the pool gives the
	// next free session to an urgent request before any other waiting
	// one, so that a phone's allow waits for at most the request a
	// session is busy with, not behind a sync's queue of reads. It is
	// scheduling, not part of the frame.
	Urgent bool `json:"-"`
}

// Call is one cmdlet with its parameters.
type Call struct {
	Cmdlet string `json:"cmdlet"`
	Params Params `json:"params,omitempty"`
	// Select, when set, limits the properties serialised per object.
	Select []string `json:"select,omitempty"`
	// causes are the spans of what asked for the call (Change.Cause): the
	// request that carries it is traced in the first one's trace, linked
	// to the others. Not part of the frame.
	causes []trace.SpanContext
}

// Params maps parameter names to values: string, bool, integer, nil,
// []string, or MultiValued for @{Add=…;Remove=…}.
type Params map[string]any

// MultiValued changes a multi-valued parameter incrementally, as
// -ActiveSyncAllowedDeviceIDs @{Add='a';Remove='b'} does.
type MultiValued struct {
	Add    []string `json:"Add,omitempty"`
	Remove []string `json:"Remove,omitempty"`
}

// Response is one frame from the worker. A request is answered by zero or
// more page frames (Page set, Done false) and one final frame (Done true).
type Response struct {
	ID       int64    `json:"id"`
	Done     bool     `json:"done"`
	OK       bool     `json:"ok"`
	Page     *int     `json:"page,omitempty"`
	Count    int      `json:"count"`
	Objects  []Object `json:"objects"`
	Errors   []Error  `json:"errors"`
	Warnings []string `json:"warnings"`
	Results  []Result `json:"results"`
	// The ready frame (ID 0) sent when the worker has started.
	Op       string `json:"op,omitempty"`
	Protocol int    `json:"protocol,omitempty"`
	PS       string `json:"ps,omitempty"`
	PID      int    `json:"pid,omitempty"`
	Host     string `json:"host,omitempty"`
}

// Result is the outcome of one call of a batch.
type Result struct {
	OK       bool     `json:"ok"`
	Count    int      `json:"count"`
	Objects  []Object `json:"objects"`
	Errors   []Error  `json:"errors"`
	Warnings []string `json:"warnings"`
}

// Object is one serialised output object: property names to values, where
// dates are ISO 8601 UTC strings, enums their names, multi-valued
// properties arrays and identities strings.
type Object map[string]any

// Error is one PowerShell error record as the worker reports it.
type Error struct {
	Message  string `json:"message"`
	Category string `json:"category"`
	// Reason is the exception type name, e.g. ManagementObjectNotFoundException.
	Reason string `json:"reason"`
	// FQID is the FullyQualifiedErrorId.
	FQID   string  `json:"fqid"`
	Target *string `json:"target"`
}

// Error implements error, so an Error can be wrapped and classified.
func (e Error) Error() string {
	if e.Reason != "" {
		return e.Message + " (" + e.Reason + ")"
	}
	return e.Message
}

// ErrBadFrame is returned for a line that is not a valid frame.
var ErrBadFrame = errors.New("bad frame")

// EncodeRequest returns the stdin line for a request.
func EncodeRequest(r Request) ([]byte, error) {
	r.V = ProtocolVersion
	js, err := json.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("encode request %d: %w", r.ID, err)
	}
	return []byte(base64.StdEncoding.EncodeToString(js) + "\n"), nil
}

// DecodeRequest parses a stdin line as the worker does. Numbers stay
// json.Number so integers keep their exact value.
func DecodeRequest(line []byte) (Request, error) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(line)))
	if err != nil {
		return Request{}, fmt.Errorf("%w: %w", ErrBadFrame, err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var r Request
	if err := dec.Decode(&r); err != nil {
		return Request{}, fmt.Errorf("%w: %w", ErrBadFrame, err)
	}
	return r, nil
}

// EncodeFrame returns the stdout line for a frame value (a Response, or any
// value shaped like one).
func EncodeFrame(v any) ([]byte, error) {
	js, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode frame: %w", err)
	}
	return []byte(FrameSentinel + base64.StdEncoding.EncodeToString(js) + "\n"), nil
}

// DecodeFrame parses one stdout line. ok is false for a line that is not a
// frame (no sentinel), which callers skip.
func DecodeFrame(line string) (r Response, ok bool, err error) {
	var d frameDecoder
	return d.decode([]byte(line))
}

// frameDecoder decodes the frames of one worker's stdout, reusing one
// buffer for their JSON.
type frameDecoder struct {
	raw []byte
	// src hands dec one frame's JSON at a time, so that dec keeps its
	// buffer from frame to frame: a decoder made for each frame grew its
	// own from 512 bytes to the frame's size, doubling, which was a third
	// of the bytes decoding a listing allocated (BenchmarkListingDecode).
	src bytes.Reader
	dec *json.Decoder
}

// maxFrameBuffer is the largest buffer a frameDecoder keeps for the next
// frame; a page of 500 partnerships is about 450 kB of JSON.
const maxFrameBuffer = 4 << 20

// decode is DecodeFrame for a line of a worker's stdout. The objects are
// decoded as plain JSON values (wireResponse) and then made Objects: the
// same maps encoding/json builds for a []Object, built a third faster, as
// it fills a map[string]any without reflection.
func (d *frameDecoder) decode(line []byte) (Response, bool, error) {
	line = bytes.TrimRight(line, "\r\n")
	if !bytes.HasPrefix(line, []byte(FrameSentinel)) {
		return Response{}, false, nil
	}
	raw, err := base64.StdEncoding.AppendDecode(d.raw[:0], line[len(FrameSentinel):])
	if cap(raw) <= maxFrameBuffer {
		d.raw = raw
	} else {
		d.raw = nil
	}
	if err != nil {
		return Response{}, true, fmt.Errorf("%w: %w", ErrBadFrame, err)
	}
	var w wireResponse
	if err := d.decodeWire(raw, &w); err == nil {
		if r, ok := w.response(); ok {
			return r, true, nil
		}
	}
	// Not a Response: decoded as one, for encoding/json's own error.
	var r Response
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&r); err != nil {
		return Response{}, true, fmt.Errorf("%w: %w", ErrBadFrame, err)
	}
	return r, true, nil
}

// decodeWire decodes one frame's JSON into w with the decoder the frames
// share. Whatever could carry into the next frame ends the decoder, and
// the next frame gets a new one: an error (encoding/json keeps a syntax
// error and returns it again), anything but white space after the
// frame's value (a decoder made for each frame ignored it, so this one
// must not read it as the next frame's start), or a frame larger than the
// buffer a frameDecoder keeps.
func (d *frameDecoder) decodeWire(raw []byte, w *wireResponse) error {
	d.src.Reset(raw)
	if d.dec == nil {
		d.dec = json.NewDecoder(&d.src)
		d.dec.UseNumber()
	}
	err := d.dec.Decode(w)
	if err != nil || len(raw) > maxFrameBuffer || !blank(raw[len(raw)-d.src.Len():]) || !blankReader(d.dec.Buffered()) {
		d.dec = nil
	}
	return err
}

// blank reports whether b holds only JSON white space.
func blank(b []byte) bool {
	return len(bytes.TrimLeft(b, " \t\r\n")) == 0
}

// blankReader reports whether r holds only JSON white space.
func blankReader(r io.Reader) bool {
	var buf [512]byte
	for {
		n, err := r.Read(buf[:])
		if !blank(buf[:n]) {
			return false
		}
		if err != nil {
			return err == io.EOF
		}
	}
}

// wireResponse is a frame as decoded: a Response whose objects, and those
// of its results, are still plain JSON values (these fields hide the
// embedded ones from encoding/json).
type wireResponse struct {
	Response
	Objects []any        `json:"objects"`
	Results []wireResult `json:"results"`
}

// wireResult is a Result as decoded, like wireResponse.
type wireResult struct {
	Result
	Objects []any `json:"objects"`
}

// response returns the Response; ok is false when an object is not a JSON
// object (or null), which a Response cannot hold.
func (w *wireResponse) response() (r Response, ok bool) {
	r = w.Response
	if r.Objects, ok = objectsOf(w.Objects); !ok {
		return Response{}, false
	}
	if w.Results != nil {
		r.Results = make([]Result, len(w.Results))
		for i, res := range w.Results {
			r.Results[i] = res.Result
			if r.Results[i].Objects, ok = objectsOf(res.Objects); !ok {
				return Response{}, false
			}
		}
	}
	return r, true
}

// objectsOf makes decoded JSON values Objects, as encoding/json would have
// decoded them into a []Object: null is a nil Object.
func objectsOf(values []any) ([]Object, bool) {
	if values == nil {
		return nil, true
	}
	out := make([]Object, len(values))
	for i, v := range values {
		switch v := v.(type) {
		case nil:
		case map[string]any:
			out[i] = v
		default:
			return nil, false
		}
	}
	return out, true
}
