package exchange

import (
	"strings"
	"testing"
)

// Every part but the remainder groups distinct characters, together all
// of partitionChars, each letter in both cases in its filter; an id that
// ends in an ASCII character belongs to exactly one part by mayHold, the
// one whose filter matches it; a non-ASCII ending is not judged.
func TestPartitionFiltersAndMayHold(t *testing.T) {
	for _, groups := range []int{2, 3, 8, 16, 36, 50} {
		parts := partitionFilters("DeviceId", "", groups, deviceIDWeight)
		if want := min(groups, MaxListPartitions) + 1; len(parts) != want {
			t.Fatalf("%d groups: %d parts, want %d", groups, len(parts), want)
		}
		seen := map[byte]int{}
		for i, p := range parts[:len(parts)-1] {
			if p.rest || p.whole || p.chars == "" {
				t.Fatalf("%d groups: part %d is %+v", groups, i, p)
			}
			for _, c := range []byte(p.chars) {
				seen[c]++
				for _, v := range []string{string(c), strings.ToUpper(string(c))} {
					if !strings.Contains(p.filter, "DeviceId -like '*"+v+"'") {
						t.Errorf("%d groups: part %d groups %q but its filter lacks '*%s': %s", groups, i, p.chars, v, p.filter)
					}
				}
			}
		}
		if len(seen) != len(partitionChars) {
			t.Fatalf("%d groups: the groups hold %d characters, want %d", groups, len(seen), len(partitionChars))
		}
		for c, n := range seen {
			if n != 1 {
				t.Fatalf("%d groups: %q is in %d groups", groups, c, n)
			}
		}
		rest := parts[len(parts)-1]
		if !rest.rest || !strings.HasPrefix(rest.filter, "-not (") {
			t.Fatalf("%d groups: the last part is not the remainder: %+v", groups, rest)
		}
		for _, v := range []string{"ApplF17LTTCGFFG8", "androidc0123456789", "lowerenda", "UPPERENDA", "7", "", "ends-", "it's'", "$(x)", "a b "} {
			holders := 0
			for _, p := range parts {
				if p.mayHold(v) {
					holders++
				}
			}
			if holders != 1 {
				t.Errorf("%d groups: %q may be in %d parts, want exactly one", groups, v, holders)
			}
		}
		for _, v := range []string{"endsé", "ends\u212A", "\u2018curly\u2019"} {
			for _, p := range parts {
				if !p.mayHold(v) {
					t.Errorf("%d groups: %q judged out of %s although its ending is not ASCII", groups, v, p.what)
				}
			}
		}
	}
	if one := partitionFilters("Alias", recipientsFilter, 1, evenWeight); len(one) != 1 || !one[0].whole || one[0].filter != recipientsFilter || !one[0].mayHold("x") {
		t.Fatalf("one group: %+v", one)
	}
	if parts := partitionFilters("Alias", recipientsFilter, 4, evenWeight); !strings.HasPrefix(parts[0].filter, "("+recipientsFilter+") -and (") {
		t.Fatalf("the base filter is not kept: %s", parts[0].filter)
	}
}
