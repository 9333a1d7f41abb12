// Package simrecord keeps what a simulator answered, so a test can assert
// what really reached it: the most recent records in a ring, and a count
// of every record under the keys the simulator files it by (all of them,
// also those the ring has dropped).
package simrecord

import (
	"maps"
	"sync"
)

// Log is a bounded, concurrency-safe log of records of type T.
type Log[T any] struct {
	mu      sync.Mutex
	max     int
	records []T
	start   int
	counts  map[string]int
}

// New keeps at most max records; older ones are dropped, counts stay.
func New[T any](max int) *Log[T] {
	return &Log[T]{max: max, counts: map[string]int{}}
}

// Add keeps rec and counts it once under each key.
func (l *Log[T]) Add(rec T, keys ...string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range keys {
		l.counts[k]++
	}
	if l.max <= 0 {
		return
	}
	if len(l.records) < l.max {
		l.records = append(l.records, rec)
		return
	}
	l.records[l.start] = rec
	l.start = (l.start + 1) % l.max
}

// Select returns the kept records that keep accepts (all, when keep is
// nil), oldest first.
func (l *Log[T]) Select(keep func(T) bool) []T {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]T, 0, len(l.records))
	for i := range l.records {
		rec := l.records[(l.start+i)%len(l.records)]
		if keep == nil || keep(rec) {
			out = append(out, rec)
		}
	}
	return out
}

// Count returns how many records were counted under key.
func (l *Log[T]) Count(key string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.counts[key]
}

// Counts returns a copy of every counter.
func (l *Log[T]) Counts() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return maps.Clone(l.counts)
}

// Reset forgets all records and counts.
func (l *Log[T]) Reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.records, l.start, l.counts = nil, 0, map[string]int{}
}
