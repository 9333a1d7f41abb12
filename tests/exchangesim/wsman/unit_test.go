package wsman

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestParseDuration(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   string
		want time.Duration
		bad  bool
	}{
		{in: "PT60S", want: 60 * time.Second},
		{in: "PT20S", want: 20 * time.Second},
		{in: "PT0.5S", want: 500 * time.Millisecond},
		{in: "PT1M30S", want: 90 * time.Second},
		{in: "PT7200.000S", want: 2 * time.Hour},
		{in: "P0DT0H1M0S", want: time.Minute},
		{in: "P1D", want: 24 * time.Hour},
		{in: "PT0S", want: 0},
		{in: "60", bad: true},
		{in: "PT", bad: true},
		{in: "P", bad: true},
		{in: "PT1.5M", bad: true},
		{in: "PT1S1M", bad: true},
		{in: "P1Y", bad: true},
		{in: "-PT1S", bad: true},
		{in: "PTxS", bad: true},
		{in: "PT1", bad: true},
	} {
		got, err := parseDuration(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("parseDuration(%q) = %v, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("parseDuration(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
	if got := formatDHMS(26*time.Hour + 3*time.Minute + 4*time.Second); got != "P1DT2H3M4S" {
		t.Errorf("formatDHMS = %q", got)
	}
}

func TestOutputQueue(t *testing.T) {
	t.Parallel()
	q := NewOutputQueue()
	select {
	case <-q.Ready():
		t.Fatal("empty queue is ready")
	default:
	}
	if c, done, _ := q.ReadOutput(10); len(c.Data) != 0 || done {
		t.Fatalf("empty read = %+v done %v", c, done)
	}
	_, _ = q.Stdout().Write([]byte("ab"))
	_, _ = q.Stdout().Write([]byte("cd")) // merged with the previous write
	_, _ = q.Stderr().Write([]byte("E"))
	_, _ = q.Stdout().Write([]byte("ef"))
	select {
	case <-q.Ready():
	default:
		t.Fatal("queue with output is not ready")
	}
	var got []string
	for {
		c, done, _ := q.ReadOutput(3)
		if len(c.Data) == 0 {
			if done {
				t.Fatal("done before Exit")
			}
			break
		}
		got = append(got, c.Stream+":"+string(c.Data))
	}
	if want := "stdout:abc stdout:d stderr:E stdout:ef"; strings.Join(got, " ") != want {
		t.Errorf("reads %v, want %s", got, want)
	}
	select {
	case <-q.Ready():
		t.Fatal("drained queue is still ready")
	default:
	}
	_, _ = q.Stdout().Write([]byte("last"))
	q.Exit(7)
	q.Exit(9) // ignored
	if _, err := q.Stdout().Write([]byte("late")); err == nil {
		t.Error("write after Exit succeeded")
	}
	c, done, code := q.ReadOutput(100)
	if string(c.Data) != "last" || !done || code != 7 {
		t.Errorf("final read %q done %v code %d", c.Data, done, code)
	}
	// The returned slice cannot be used to overwrite queued data.
	q2 := NewOutputQueue()
	_, _ = q2.Stdout().Write([]byte("0123456789"))
	first, _, _ := q2.ReadOutput(4)
	_ = append(first.Data, 'X')
	rest, _, _ := q2.ReadOutput(100)
	if !bytes.Equal(rest.Data, []byte("456789")) {
		t.Errorf("rest = %q", rest.Data)
	}
	if _, err := q2.Write("stdin", []byte("x")); err == nil {
		t.Error("write to an unknown stream succeeded")
	}
}

func TestDrainOutputBudget(t *testing.T) {
	t.Parallel()
	q := NewOutputQueue()
	_, _ = q.Stdout().Write(bytes.Repeat([]byte("x"), 100000))
	q.Exit(0)
	const budget = 10000
	chunks, done, _ := drainOutput(q, budget, 36)
	size := 0
	for _, c := range chunks {
		size += streamElementOverhead + 36 + (len(c.Data)+2)/3*4
	}
	if done || len(chunks) != 1 || size > budget || size < budget-200 {
		t.Errorf("chunks %d, encoded size %d of budget %d, done %v", len(chunks), size, budget, done)
	}
}
