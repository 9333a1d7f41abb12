package wsman

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// parseDuration parses the xs:duration subset WS-Management clients send in w:OperationTimeout (PT60S, PT0.5S,
// PT1M30S, P0DT0H1M0.000S). Years and months are rejected because their length is calendar dependent and no WS-Man
// client uses them for timeouts; a negative duration is rejected as Windows does not accept one either.
func parseDuration(s string) (time.Duration, error) {
	orig := s
	if !strings.HasPrefix(s, "P") {
		return 0, fmt.Errorf("duration %q: missing leading P", orig)
	}
	s = s[1:]
	var total float64
	inTime := false
	seen := false
	lastUnit := -1
	for len(s) > 0 {
		if s[0] == 'T' {
			if inTime {
				return 0, fmt.Errorf("duration %q: repeated T", orig)
			}
			inTime = true
			s = s[1:]
			if len(s) == 0 {
				return 0, fmt.Errorf("duration %q: T without a time part", orig)
			}
			continue
		}
		i := 0
		for i < len(s) && (s[i] >= '0' && s[i] <= '9' || s[i] == '.') {
			i++
		}
		if i == 0 || i == len(s) {
			return 0, fmt.Errorf("duration %q: malformed number", orig)
		}
		num := s[:i]
		v, err := strconv.ParseFloat(num, 64)
		if err != nil {
			return 0, fmt.Errorf("duration %q: %w", orig, err)
		}
		unit := s[i]
		s = s[i+1:]
		var order int
		var scale float64
		switch {
		case !inTime && unit == 'D':
			order, scale = 0, 24*3600
		case inTime && unit == 'H':
			order, scale = 1, 3600
		case inTime && unit == 'M':
			order, scale = 2, 60
		case inTime && unit == 'S':
			order, scale = 3, 1
		default:
			return 0, fmt.Errorf("duration %q: unsupported designator %q", orig, unit)
		}
		if order <= lastUnit {
			return 0, fmt.Errorf("duration %q: designators out of order", orig)
		}
		if unit != 'S' && strings.Contains(num, ".") {
			return 0, fmt.Errorf("duration %q: only seconds may have a fraction", orig)
		}
		lastUnit = order
		seen = true
		total += v * scale
	}
	if !seen {
		return 0, fmt.Errorf("duration %q: no components", orig)
	}
	if total*float64(time.Second) > math.MaxInt64 {
		return 0, fmt.Errorf("duration %q: too large", orig)
	}
	return time.Duration(total * float64(time.Second)), nil
}

// formatSeconds renders d the way Windows reports shell timeouts in a CreateResponse (PT7200.000S).
func formatSeconds(d time.Duration) string {
	return fmt.Sprintf("PT%.3fS", d.Seconds())
}

// formatDHMS renders d the way Windows reports ShellRunTime and ShellInactivity (P0DT0H0M1S).
func formatDHMS(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	secs := int64(d / time.Second)
	return fmt.Sprintf("P%dDT%dH%dM%dS", secs/86400, secs%86400/3600, secs%3600/60, secs%60)
}
