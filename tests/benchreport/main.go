// Command benchreport turns `go test -bench` output into the lines
// `make bench` promises: one `bench <name> <value> <unit>` per metric.
//
// A metric reported with a unit of the form "<name>:<unit>" (for example
// b.ReportMetric(x, "exchange_wall_time_ratio:ratio")) is printed under
// exactly that name; every other metric is named after its benchmark
// (lower case, '/' and '-' as '_'), e.g. "bench hop_runner 8658 msgs/s".
// Benchmark output lines are passed through to stderr so the raw figures
// stay visible.
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
)

var benchLine = regexp.MustCompile(`^Benchmark(\S+?)(-\d+)?\s+\d+\s+(.*)$`)

func main() {
	n, err := report(os.Stdin, os.Stdout, os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
	if n == 0 {
		fmt.Fprintln(os.Stderr, "benchreport: no benchmark results in the input")
		os.Exit(1)
	}
}

// report converts every benchmark line of in and returns how many metrics it printed.
func report(in io.Reader, out, echo io.Writer) (int, error) {
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	n := 0
	failed := false
	for sc.Scan() {
		line := sc.Text()
		fmt.Fprintln(echo, line)
		if strings.HasPrefix(line, "FAIL") || strings.HasPrefix(line, "--- FAIL") {
			failed = true
		}
		m := benchLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		name := strings.NewReplacer("/", "_", "-", "_").Replace(strings.ToLower(m[1]))
		fields := strings.Fields(m[3])
		for i := 0; i+1 < len(fields); i += 2 {
			value, unit := fields[i], fields[i+1]
			metric := name
			if k, u, ok := strings.Cut(unit, ":"); ok {
				metric, unit = k, u
			}
			fmt.Fprintf(out, "bench %s %s %s\n", metric, value, unit)
			n++
		}
	}
	if err := sc.Err(); err != nil {
		return n, err
	}
	if failed {
		return n, fmt.Errorf("a benchmark failed")
	}
	return n, nil
}
