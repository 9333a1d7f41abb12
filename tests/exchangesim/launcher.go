package exchangesim

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"
	"unicode/utf16"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim/wsman"
)

// launcher decides what a WinRS Command runs on a simulated CAS. WinRS
// runs the command line through cmd.exe (WINRS_SKIP_CMD_SHELL=FALSE), so an
// unknown program gets cmd's error; powershell.exe runs only the easguard
// worker bootstrap, which it recognises byte for byte. The simulator
// cannot interpret arbitrary PowerShell, and it refuses to pretend it can.
type launcher struct {
	ep *Endpoint
}

var _ wsman.Launcher = launcher{}

// Launch starts the process a command line names.
func (l launcher) Launch(ctx context.Context, user, commandLine string, args []string) (wsman.Process, error) {
	full := commandLine
	if len(args) > 0 {
		full += " " + strings.Join(args, " ")
	}
	toks := splitCommandLine(full)
	if len(toks) == 0 {
		return exited(1, "", "The syntax of the command is incorrect.\r\n"), nil
	}
	exe := strings.ToLower(toks[0])
	if i := strings.LastIndexAny(exe, `\/`); i >= 0 {
		exe = exe[i+1:]
	}
	if exe != "powershell.exe" && exe != "powershell" {
		return exited(1, "", fmt.Sprintf("'%s' is not recognized as an internal or external command,\r\noperable program or batch file.\r\n", toks[0])), nil
	}
	script, problem := encodedCommand(toks[1:])
	if problem != "" {
		return exited(1, "", problem), nil
	}
	if script != exchange.Bootstrap() {
		return exited(1, "", "exchangesim: this simulated Exchange server runs only the easguard worker bootstrap (exchange.CommandLine); any other PowerShell is refused.\r\n"), nil
	}
	if m := l.ep.sim.cfg.WorkerHost.LanguageMode; m != "" && !strings.EqualFold(m, "FullLanguage") {
		stdout, stderr, code := languageModeRefusal(m)
		return exited(code, stdout, stderr), nil
	}
	return l.ep.sim.startWorker(ctx, l.ep, user), nil
}

// splitCommandLine splits like cmd.exe and the C runtime: whitespace
// separates arguments, double quotes group them.
func splitCommandLine(s string) []string {
	var out []string
	var cur strings.Builder
	inQuote, have := false, false
	for _, r := range s {
		switch {
		case r == '"':
			inQuote, have = !inQuote, true
		case (r == ' ' || r == '\t') && !inQuote:
			if have {
				out = append(out, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteRune(r)
			have = true
		}
	}
	if have {
		out = append(out, cur.String())
	}
	return out
}

// encodedCommand finds -EncodedCommand (or an unambiguous prefix such as
// -enc, -e, -ec) and decodes its UTF-16LE base64 value, as powershell.exe
// does. Other ways of passing a script (-Command, -File, a bare script)
// are reported as not the bootstrap.
func encodedCommand(args []string) (string, string) {
	for i := 0; i < len(args); i++ {
		a := strings.ToLower(args[i])
		if !strings.HasPrefix(a, "-") && !strings.HasPrefix(a, "/") {
			return "", "exchangesim: powershell.exe was given a script that is not the easguard worker bootstrap.\r\n"
		}
		name := a[1:]
		switch {
		case name == "nologo" || name == "noprofile" || name == "noninteractive" || name == "noexit" || name == "mta" || name == "sta":
		case strings.HasPrefix("executionpolicy", name) && len(name) >= 2 && name != "e", strings.HasPrefix("inputformat", name), strings.HasPrefix("outputformat", name),
			strings.HasPrefix("windowstyle", name), strings.HasPrefix("version", name):
			i++
		case strings.HasPrefix("encodedcommand", name) || name == "ec" || name == "e":
			if i+1 >= len(args) {
				return "", "Cannot process the command because of a missing parameter. A command must follow -EncodedCommand.\r\n"
			}
			raw, err := base64.StdEncoding.DecodeString(args[i+1])
			if err != nil || len(raw)%2 != 0 {
				return "", "Cannot process the command because the value specified with -EncodedCommand is not properly encoded. The value must be Base64 encoded.\r\n"
			}
			u := make([]uint16, len(raw)/2)
			for j := range u {
				u[j] = uint16(raw[2*j]) | uint16(raw[2*j+1])<<8
			}
			return string(utf16.Decode(u)), ""
		default:
			return "", "exchangesim: powershell.exe was not started with the easguard worker bootstrap.\r\n"
		}
	}
	return "", "exchangesim: powershell.exe was started without a command; an interactive PowerShell is not simulated.\r\n"
}

// exited is a process that wrote its output and exited at once.
func exited(code int, stdout, stderr string) wsman.Process {
	p := &endedProcess{OutputQueue: wsman.NewOutputQueue()}
	if stdout != "" {
		p.Write(wsman.StreamStdout, []byte(stdout))
	}
	if stderr != "" {
		p.Write(wsman.StreamStderr, []byte(stderr))
	}
	p.Exit(code)
	return p
}

type endedProcess struct {
	*wsman.OutputQueue
}

func (p *endedProcess) WriteStdin([]byte) error { return wsman.ErrProcessExited }
func (p *endedProcess) CloseStdin() error       { return nil }
func (p *endedProcess) Terminate()              {}
