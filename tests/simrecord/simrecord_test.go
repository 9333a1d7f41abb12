package simrecord

import (
	"slices"
	"testing"
)

// The ring keeps the newest records in order while every record stays
// counted, and Reset forgets both.
func TestLog(t *testing.T) {
	cases := []struct {
		name  string
		max   int
		add   []int
		want  []int
		even  int
		total int
	}{
		{name: "under the bound", max: 5, add: []int{1, 2, 3}, want: []int{1, 2, 3}, even: 1, total: 3},
		{name: "wrapped twice", max: 3, add: []int{1, 2, 3, 4, 5, 6, 7}, want: []int{5, 6, 7}, even: 3, total: 7},
		{name: "keeps none", max: 0, add: []int{1, 2}, want: []int{}, even: 1, total: 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := New[int](tc.max)
			for _, v := range tc.add {
				keys := []string{"all"}
				if v%2 == 0 {
					keys = append(keys, "even")
				}
				l.Add(v, keys...)
			}
			if got := l.Select(nil); !slices.Equal(got, tc.want) {
				t.Fatalf("records: %v, want %v", got, tc.want)
			}
			if got := l.Select(func(v int) bool { return v%2 == 1 }); slices.ContainsFunc(got, func(v int) bool { return v%2 == 0 }) {
				t.Fatalf("odd records: %v", got)
			}
			if l.Count("all") != tc.total || l.Count("even") != tc.even || l.Counts()["all"] != tc.total {
				t.Fatalf("counts: %v", l.Counts())
			}
			l.Reset()
			if len(l.Select(nil)) != 0 || l.Count("all") != 0 {
				t.Fatalf("after reset: %v %v", l.Select(nil), l.Counts())
			}
		})
	}
}
