package intunesim

import (
	"fmt"
	"time"
)

// Fault is an injected failure. Graph faults apply to authenticated Graph
// requests (after the token and permission checks, as a throttled request
// still carries a good token); token_error applies to token requests.
type Fault struct {
	// Kind is one of
	//   throttle     429 TooManyRequests with Retry-After
	//   unavailable  503 ServiceUnavailable with Retry-After
	//   error        500 InternalServerError
	//   malformed    200 with a page cut in half (invalid JSON)
	//   slow         each page delayed by DelayMS, then served normally
	//   token_error  the token endpoint answers Status (default 500)
	//   clear        removes every fault
	Kind string `json:"kind"`
	// Count is how many matching requests the fault applies to; 0 means
	// until cleared.
	Count int `json:"count,omitempty"`
	// RetryAfter is the Retry-After in seconds of throttle, unavailable and
	// token_error with status 429 or 503: 0 means 1, negative means no header.
	RetryAfter int `json:"retry_after,omitempty"`
	// DelayMS is the delay of slow.
	DelayMS int `json:"delay_ms,omitempty"`
	// AtPage limits a Graph fault to page k (1 = the first page, the
	// request without $skiptoken) of listings, so a listing can fail
	// midway; 0 means every Graph request.
	AtPage int `json:"at_page,omitempty"`
	// Status is token_error's HTTP status: 400, 401, 429, 500 or 503.
	Status int `json:"status,omitempty"`
}

type activeFault struct {
	Fault
	left int // remaining requests; -1 = until cleared
}

// Inject adds a fault (or, for kind clear, removes them all).
func (s *Sim) Inject(f Fault) error {
	switch f.Kind {
	case "clear":
		s.ClearFaults()
		return nil
	case "throttle", "unavailable", "error", "malformed":
	case "slow":
		if f.DelayMS <= 0 {
			return fmt.Errorf("intunesim: fault slow needs delay_ms > 0")
		}
	case "token_error":
		if f.Status == 0 {
			f.Status = 500
		}
		switch f.Status {
		case 400, 401, 429, 500, 503:
		default:
			return fmt.Errorf("intunesim: token_error status must be 400, 401, 429, 500 or 503, not %d", f.Status)
		}
		if f.AtPage != 0 {
			return fmt.Errorf("intunesim: at_page applies to Graph faults, not token_error")
		}
	default:
		return fmt.Errorf("intunesim: unknown fault kind %q (throttle, unavailable, error, malformed, slow, token_error, clear)", f.Kind)
	}
	if f.Count < 0 || f.AtPage < 0 || f.DelayMS < 0 {
		return fmt.Errorf("intunesim: fault count, at_page and delay_ms must not be negative")
	}
	if f.RetryAfter == 0 {
		f.RetryAfter = 1
	}
	left := f.Count
	if left == 0 {
		left = -1
	}
	s.faultMu.Lock()
	s.faults = append(s.faults, &activeFault{Fault: f, left: left})
	s.faultMu.Unlock()
	return nil
}

// ClearFaults removes every fault.
func (s *Sim) ClearFaults() {
	s.faultMu.Lock()
	s.faults = nil
	s.faultMu.Unlock()
}

// Faults returns the active faults, Count being what is left of each (0:
// until cleared).
func (s *Sim) Faults() []Fault {
	s.faultMu.Lock()
	defer s.faultMu.Unlock()
	out := make([]Fault, 0, len(s.faults))
	for _, f := range s.faults {
		c := f.Fault
		c.Count = max(f.left, 0)
		out = append(out, c)
	}
	return out
}

// takeFaults consumes the faults that apply to one request: target is
// "graph" or "token"; page is the listing page (0 for a single GET). It
// returns the total delay of matching slow faults and the first matching
// other fault, if any.
func (s *Sim) takeFaults(target string, page int) (time.Duration, *Fault) {
	s.faultMu.Lock()
	defer s.faultMu.Unlock()
	var delay time.Duration
	var hit *Fault
	kept := s.faults[:0]
	for _, f := range s.faults {
		applies := (target == "token") == (f.Kind == "token_error") && (f.AtPage == 0 || f.AtPage == page)
		if applies && f.Kind != "slow" && hit != nil {
			applies = false // one failure per request; the next fault waits its turn
		}
		if applies {
			if f.Kind == "slow" {
				delay += time.Duration(f.DelayMS) * time.Millisecond
			} else {
				c := f.Fault
				hit = &c
			}
			if f.left > 0 {
				f.left--
			}
		}
		if f.left != 0 {
			kept = append(kept, f)
		}
	}
	clear(s.faults[len(kept):])
	s.faults = kept
	return delay, hit
}
