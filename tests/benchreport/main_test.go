package main

import (
	"bytes"
	"io"
	"strings"
	"testing"
)

func TestReport(t *testing.T) {
	in := `goos: linux
BenchmarkHop/runner-2         	    2000	    115466 ns/op	      8658 msgs/s
BenchmarkExchange-2   1   123 exchange_wall_time_ratio:ratio   456 B/op
PASS
`
	var out bytes.Buffer
	n, err := report(strings.NewReader(in), &out, io.Discard)
	if err != nil || n != 4 {
		t.Fatalf("n=%d err=%v", n, err)
	}
	want := "bench hop_runner 115466 ns/op\nbench hop_runner 8658 msgs/s\nbench exchange_wall_time_ratio 123 ratio\nbench exchange 456 B/op\n"
	if out.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", out.String(), want)
	}
	if _, err := report(strings.NewReader("--- FAIL: BenchmarkX\nFAIL\n"), io.Discard, io.Discard); err == nil {
		t.Fatal("a failed benchmark run was reported as success")
	}
}
