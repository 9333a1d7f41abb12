package exchange

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Error kinds. Every error this package returns wraps exactly one of them,
// so callers branch with errors.Is, not on message text:
//
//   - ErrTransient, ErrUnreachable: retry later (IsTransient reports both,
//     and ErrThrottled).
//   - ErrThrottled: Exchange asked to back off; RetryAfterOf says how long.
//   - ErrNotFound, ErrInvalid: terminal for the item; report it with the item.
//   - ErrAuth, ErrPermission, ErrTLS: stop and tell an administrator.
//   - ErrIncomplete: a listing that may lack objects; nothing may be
//     concluded from what it does not hold (a full sync must not report
//     partnerships gone).
var (
	ErrTransient   = errors.New("exchange: transient failure")
	ErrUnreachable = errors.New("exchange: WinRM not reachable")
	ErrThrottled   = errors.New("exchange: throttled")
	ErrNotFound    = errors.New("exchange: not found")
	ErrInvalid     = errors.New("exchange: invalid request")
	ErrAuth        = errors.New("exchange: authentication failed")
	ErrPermission  = errors.New("exchange: permission denied")
	ErrTLS         = errors.New("exchange: certificate not trusted")
	ErrIncomplete  = errors.New("exchange: listing incomplete")
	// ErrSuperseded marks a change that a later change for the same device
	// in the same batch replaced; nothing was sent for it.
	ErrSuperseded = errors.New("exchange: superseded by a later change in the same batch")
	// ErrSessionBroken says a worker's remote Exchange session broke (an
	// app-pool recycle, an iisreset, the server's idle timeout): the worker
	// reported it instead of letting an implicit-remoting proxy prompt for
	// credentials. The pool replaces the worker and runs the request again.
	ErrSessionBroken = fmt.Errorf("%w: Exchange session broken", ErrWorkerDead)
)

// IsTransient reports whether retrying later may succeed.
func IsTransient(err error) bool {
	return errors.Is(err, ErrTransient) || errors.Is(err, ErrUnreachable) || errors.Is(err, ErrThrottled)
}

// IsFatal reports whether an administrator must act before anything works:
// wrong credentials, a missing role, an untrusted certificate.
func IsFatal(err error) bool {
	return errors.Is(err, ErrAuth) || errors.Is(err, ErrPermission) || errors.Is(err, ErrTLS)
}

// CmdletError is an error Exchange (or the worker) reported for one cmdlet.
type CmdletError struct {
	Cmdlet string
	Record Error
	kind   error
	after  time.Duration
}

func (e *CmdletError) Error() string {
	return fmt.Sprintf("%s: %s", e.Cmdlet, e.Record.Error())
}

// Unwrap returns the error's kind.
func (e *CmdletError) Unwrap() error { return e.kind }

// RetryAfter is how long Exchange asked to wait (throttling), else 0. The
// name matches what pkg/bus looks for, so a throttled handler is naked
// for exactly that long.
func (e *CmdletError) RetryAfter() time.Duration { return e.after }

// RetryAfterOf returns the back-off an error asks for, if any.
func RetryAfterOf(err error) (time.Duration, bool) {
	var ra interface{ RetryAfter() time.Duration }
	if errors.As(err, &ra) && ra.RetryAfter() > 0 {
		return ra.RetryAfter(), true
	}
	return 0, false
}

var (
	waitSeconds = regexp.MustCompile(`(?i)wait (?:for )?(\d+) seconds?`)
	waitMillis  = regexp.MustCompile(`(?i)(\d+) milliseconds?`)
)

// classify maps an error record to its kind, from the exception type
// (CategoryInfo.Reason), the category and the error id — never from
// free-text alone except to read a back-off.
func classify(cmdlet string, rec Error) *CmdletError {
	e := &CmdletError{Cmdlet: cmdlet, Record: rec}
	switch {
	case rec.Reason == "SessionBroken":
		e.kind = ErrSessionBroken
	case rec.Reason == "CommandNotFoundException":
		// The cmdlet is not in the session: RBAC did not grant it.
		e.kind = ErrPermission
	case rec.Reason == "ManagementObjectNotFoundException":
		e.kind = ErrNotFound
	case rec.Reason == "OverBudgetException" || rec.Category == "ResourceUnavailable" || strings.Contains(rec.FQID, "MaxConcurrency") || strings.Contains(rec.Message, "concurrent shells"):
		e.kind = ErrThrottled
		e.after = 30 * time.Second
		if m := waitSeconds.FindStringSubmatch(rec.Message); m != nil {
			n, _ := strconv.Atoi(m[1])
			e.after = time.Duration(n) * time.Second
		} else if m := waitMillis.FindStringSubmatch(rec.Message); m != nil {
			n, _ := strconv.Atoi(m[1])
			e.after = time.Duration(n) * time.Millisecond
		}
	case rec.Reason == "PSRemotingTransportException" && strings.Contains(rec.FQID, "AccessDenied"):
		e.kind = ErrAuth
	case rec.Reason == "PSRemotingTransportException":
		e.kind = ErrUnreachable
	case strings.HasPrefix(rec.Reason, "ParameterBinding"), rec.Reason == "DataValidationException", rec.Reason == "ArgumentException",
		rec.Reason == "ProtocolError", rec.Reason == "PSInvalidOperationException", rec.Reason == "ManagementObjectAmbiguousException",
		rec.Reason == "ADObjectAlreadyExistsException", rec.Reason == "InvalidOperationException", rec.Category == "InvalidArgument", rec.Category == "InvalidData":
		e.kind = ErrInvalid
	case rec.Category == "PermissionDenied" || rec.Reason == "UnauthorizedAccessException":
		e.kind = ErrPermission
	default:
		// Directory or server trouble without a more specific id: Exchange
		// may well succeed on the next attempt.
		e.kind = ErrTransient
	}
	return e
}

// ResultError returns the first error of a cmdlet result, classified, or nil.
func ResultError(cmdlet string, errs []Error) error {
	if len(errs) == 0 {
		return nil
	}
	return classify(cmdlet, errs[0])
}
