package exchangesim

import (
	"strings"
	"testing"
)

// The fast path of -like for '*literal' patterns matches exactly what the
// general matcher does, case-insensitively (lower-casing both sides) and
// case-sensitively, on ids with quotes, multi-byte letters and the Kelvin
// sign (which lower-cases to k).
func TestLikeSuffixMatchesWildcard(t *testing.T) {
	values := []string{"", "a", "A", "ApplF17LTTCGFFG8", "androidc1234567890", "it's'; $(Stop-Computer)", "endsé", "ENDSÉ", "ends\u212A", "endsk",
		"endsK", "ß", "x*", "dq\"\u201C\u201D\u201Eid", "0123456789ABCDEFGHIJKLMNOPQRSTUV"}
	patterns := []string{"*a", "*A", "*8", "*0", "*é", "*É", "*k", "*K", "*)", "*'", "*ß", "*v", "*id", "*\u201Eid", "*"}
	for _, caseSensitive := range []bool{false, true} {
		for _, p := range patterns {
			for _, v := range values {
				want := wildcard(p, v)
				if !caseSensitive {
					want = wildcard(strings.ToLower(p), strings.ToLower(v))
				}
				if got := like(p, v, caseSensitive); got != want {
					t.Errorf("like(%q, %q, case-sensitive %v) = %v, the general matcher says %v", p, v, caseSensitive, got, want)
				}
			}
		}
	}
}
