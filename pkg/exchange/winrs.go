package exchange

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"
	"sync"

	"github.com/masterzen/winrm"
	"golang.org/x/net/html/charset"
)

// A worker's powershell.exe runs in a WinRS shell (the cmd resource of
// WS-Man). winrsShell and winrsCommand drive it with the winrm library's
// request builders over the worker's own transport, and do what the
// library's Shell and Command do, with one difference: how the command's
// output is read. The library parses every Receive answer into an XPath
// tree, byte by byte through encoding/xml, and a listing's answers are
// almost all base64 text (about 1.5 kB of it per partnership), so that
// parse was the largest part of easguard's CPU per listed partnership.
// receiveOutput.decode takes the base64 text out before it parses the
// rest.

// winrsShell is one WinRS shell on a worker's endpoint.
type winrsShell struct {
	tp     *transport
	params *winrm.Parameters
	id     string
}

// openShell creates a shell (WS-Man Create).
func openShell(tp *transport, params *winrm.Parameters) (*winrsShell, error) {
	body, err := tp.send(winrm.NewOpenShellRequest(tp.url, params))
	if err != nil {
		return nil, err
	}
	id, err := winrm.ParseOpenShellResponse(string(body))
	if err != nil {
		return nil, err
	}
	return &winrsShell{tp: tp, params: params, id: id}, nil
}

// close deletes the shell, which ends whatever still runs in it.
func (s *winrsShell) close() error {
	_, err := s.tp.send(winrm.NewDeleteShellRequest(s.tp.url, s.id, s.params))
	return err
}

// start runs command in the shell. Its stdout is read from the returned
// command's stdout, its stderr goes to stderr; both are read until the
// command exits, the shell fails or ctx ends.
func (s *winrsShell) start(ctx context.Context, command string, stderr io.Writer) (*winrsCommand, error) {
	body, err := s.tp.send(winrm.NewExecuteCommandRequest(s.tp.url, s.id, command, nil, s.params))
	if err != nil {
		return nil, err
	}
	id, err := winrm.ParseExecuteCommandResponse(string(body))
	if err != nil {
		return nil, err
	}
	r, w := io.Pipe()
	c := &winrsCommand{shell: s, id: id, stdout: r, out: w, stderr: stderr, done: make(chan struct{})}
	go c.receive(ctx)
	return c, nil
}

// winrsCommand is a command running in a WinRS shell.
type winrsCommand struct {
	shell *winrsShell
	id    string
	// stdout is the command's standard output; it ends with io.EOF when the
	// command exits and with the failure when its output cannot be read.
	stdout *io.PipeReader
	out    *io.PipeWriter
	stderr io.Writer

	inMu  sync.Mutex
	inEOF bool

	// exitCode is set before done is closed.
	exitCode int
	done     chan struct{}
}

// write sends data to the command's stdin in pieces of at most
// EnvelopeSize-1000 bytes, as the library's Command does.
func (c *winrsCommand) write(data []byte) error {
	c.inMu.Lock()
	defer c.inMu.Unlock()
	if c.inEOF {
		return io.ErrClosedPipe
	}
	for len(data) > 0 {
		n := min(c.shell.params.EnvelopeSize-1000, len(data))
		if err := c.send(data[:n], false); err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

// closeInput ends the command's stdin.
func (c *winrsCommand) closeInput() error {
	c.inMu.Lock()
	defer c.inMu.Unlock()
	if c.inEOF {
		return io.ErrClosedPipe
	}
	c.inEOF = true
	return c.send(nil, true)
}

func (c *winrsCommand) send(data []byte, eof bool) error {
	s := c.shell
	_, err := s.tp.send(winrm.NewSendInputRequest(s.tp.url, s.id, c.id, data, eof, s.params))
	return err
}

// wait blocks until the command's output has ended and returns its exit
// code (16001 when the connection ended mid-answer, as the library has it).
func (c *winrsCommand) wait() int {
	<-c.done
	return c.exitCode
}

// receive reads the command's output until it exits (WS-Man Receive, a
// long poll): a poll that timed out without output is repeated, any other
// failure ends stdout with it.
func (c *winrsCommand) receive(ctx context.Context) {
	defer close(c.done)
	s := c.shell
	var out receiveOutput
	for {
		if err := ctx.Err(); err != nil {
			c.out.CloseWithError(err)
			return
		}
		body, err := s.tp.send(winrm.NewGetOutputRequest(s.tp.url, s.id, c.id, "stdout stderr", s.params))
		if err != nil {
			if pollAgain(err) {
				continue
			}
			if strings.Contains(err.Error(), "EOF") {
				c.exitCode = 16001
			}
			c.out.CloseWithError(err)
			return
		}
		done, err := c.output(&out, body)
		if err != nil {
			c.out.CloseWithError(err)
			return
		}
		if done {
			_ = c.out.Close()
			return
		}
	}
}

// output hands on the output of one Receive answer, stdout to the stdout
// pipe (which returns once it has been read) and stderr to stderr, and
// reports whether the command is done, its exitCode then set.
func (c *winrsCommand) output(out *receiveOutput, body []byte) (bool, error) {
	if err := out.decode(body); err != nil {
		return false, err
	}
	if len(out.stdout) > 0 {
		_, _ = c.out.Write(out.stdout)
	}
	if len(out.stderr) > 0 {
		_, _ = c.stderr.Write(out.stderr)
	}
	if out.done {
		c.exitCode = out.exitCode
	}
	return out.done, nil
}

// pollAgain reports a Receive that ended without output and is to be
// repeated: the HTTP request timed out, or WS-Man's OperationTimeout.
func pollAgain(err error) bool {
	var uerr *url.Error
	if errors.As(err, &uerr) && uerr.Timeout() {
		return true
	}
	return strings.Contains(err.Error(), "OperationTimeout")
}

// Names in a Receive answer (MS-WSMV).
const (
	nsShell          = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
	commandStateDone = nsShell + "/CommandState/Done"
)

// receiveOutput is what one Receive answer says: output of the command's
// two streams, and whether it is done and with which exit code. Its
// buffers are reused from one answer to the next.
type receiveOutput struct {
	stdout, stderr []byte
	done           bool
	exitCode       int

	// skeleton, runs and text are decode's scratch space.
	skeleton, text []byte
	runs           [][]byte
}

// payloadMin is the shortest text decode cuts out of an answer before it
// is parsed; the command's output comes in runs of up to 150 kB.
const payloadMin = 128

// decode reads a Receive answer as the winrm library does (the text of
// every shell Stream named stdout or stderr, whether an element's State is
// Done, the first ExitCode), but parses only a skeleton of it: every run
// of base64 text of at least payloadMin bytes between a '>' and a '<' is
// replaced by a marker, *index*, and the run is decoded straight from the
// answer. Nothing is cut from an answer that holds a '*' (so every marker
// is one of decode's) or "<!" (a comment, CDATA section or DOCTYPE). In any
// other answer such a run is a whole text node, as the '<' that ends it
// starts a tag (it can be in no tag or attribute value), or it is inside a
// processing instruction, which is ignored. So the text nodes that are
// exactly a marker are the runs, and encoding/xml reads a document of
// about a kilobyte instead of 150 kB of base64 one byte at a time. Unlike
// the library, output that is not base64 is an error, not silently cut
// short.
func (o *receiveOutput) decode(body []byte) error {
	o.stdout, o.stderr, o.done, o.exitCode = o.stdout[:0], o.stderr[:0], false, 0
	o.cut(body)
	dec := xml.NewDecoder(bytes.NewReader(o.skeleton))
	dec.CharsetReader = charset.NewReaderLabel
	exitCode, haveExit := "", false
	for first := true; ; first = false {
		tok, err := dec.Token()
		if err == io.EOF && !first {
			break
		}
		if err != nil {
			return fmt.Errorf("%w: %w", ErrTransient, err)
		}
		se, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		if attr(se, "State") == commandStateDone {
			o.done = true
		}
		if se.Name.Space != nsShell {
			continue
		}
		switch se.Name.Local {
		case "Stream":
			name := attr(se, "Name")
			text, err := o.elementText(dec)
			if err != nil {
				return err
			}
			switch name {
			case "stdout":
				o.stdout, err = base64.StdEncoding.AppendDecode(o.stdout, text)
			case "stderr":
				o.stderr, err = base64.StdEncoding.AppendDecode(o.stderr, text)
			}
			if err != nil {
				return fmt.Errorf("%w: the %s of the worker's process is not base64: %w", ErrTransient, name, err)
			}
		case "ExitCode":
			text, err := o.elementText(dec)
			if err != nil {
				return err
			}
			if !haveExit {
				exitCode, haveExit = string(text), true
			}
		}
	}
	if o.done {
		o.exitCode, _ = strconv.Atoi(exitCode)
	}
	return nil
}

// attr returns the value of an element's attribute without a namespace.
func attr(se xml.StartElement, name string) string {
	for _, a := range se.Attr {
		if a.Name.Space == "" && a.Name.Local == name {
			return a.Value
		}
	}
	return ""
}

// cut sets skeleton to body with its runs of base64 text replaced by
// markers, and runs to those runs (slices of body); see decode. A body
// with '*' or "<!" in it, or in UTF-16, is left whole.
func (o *receiveOutput) cut(body []byte) {
	o.skeleton, o.runs = o.skeleton[:0], o.runs[:0]
	if len(body) < 2 || body[0] == 0 || body[1] == 0 || bytes.HasPrefix(body, []byte{0xFE, 0xFF}) || bytes.HasPrefix(body, []byte{0xFF, 0xFE}) ||
		bytes.IndexByte(body, '*') >= 0 || bytes.Contains(body, []byte("<!")) {
		o.skeleton = append(o.skeleton, body...)
		return
	}
	last := 0
	for i := 0; ; {
		gt := bytes.IndexByte(body[i:], '>')
		if gt < 0 {
			break
		}
		start := i + gt + 1
		lt := bytes.IndexByte(body[start:], '<')
		if lt < 0 {
			break
		}
		end := start + lt
		if end-start >= payloadMin && isBase64Text(body[start:end]) {
			o.skeleton = append(o.skeleton, body[last:start]...)
			o.skeleton = append(o.skeleton, '*')
			o.skeleton = strconv.AppendInt(o.skeleton, int64(len(o.runs)), 10)
			o.skeleton = append(o.skeleton, '*')
			o.runs = append(o.runs, body[start:end])
			last = end
		}
		i = end
	}
	o.skeleton = append(o.skeleton, body[last:]...)
}

// elementText returns the text of the element whose start dec has just
// read (with its descendants', as XPath's string value), a marker read as
// its run, and leaves dec after the element's end. The slice is valid
// until the next call.
func (o *receiveOutput) elementText(dec *xml.Decoder) ([]byte, error) {
	o.text = o.text[:0]
	for depth := 1; depth > 0; {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrTransient, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			depth++
		case xml.EndElement:
			depth--
		case xml.CharData:
			if run, ok := o.run(t); ok {
				o.text = append(o.text, run...)
			} else {
				o.text = append(o.text, t...)
			}
		}
	}
	return o.text, nil
}

// run returns the run a text node that is a marker stands for.
func (o *receiveOutput) run(text []byte) ([]byte, bool) {
	if len(text) < 3 || text[0] != '*' || text[len(text)-1] != '*' {
		return nil, false
	}
	n, err := strconv.Atoi(string(text[1 : len(text)-1]))
	if err != nil || n < 0 || n >= len(o.runs) || text[1] == '+' || text[1] == '-' {
		return nil, false
	}
	return o.runs[n], true
}

// base64Text marks the bytes of base64 text (the standard alphabet and
// its padding).
var base64Text = func() (t [256]bool) {
	for _, c := range []byte("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=") {
		t[c] = true
	}
	return t
}()

func isBase64Text(b []byte) bool {
	for _, c := range b {
		if !base64Text[c] {
			return false
		}
	}
	return true
}
