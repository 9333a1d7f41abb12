package exchangesim_test

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

var (
	simBinOnce sync.Once
	simBin     string
	simBinErr  error
)

// exchangesimBinary builds tests/cmd/exchangesim once per run.
func exchangesimBinary(tb testing.TB) string {
	tb.Helper()
	simBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "exchangesim-bin-")
		if err != nil {
			simBinErr = err
			return
		}
		simBin = filepath.Join(dir, "exchangesim")
		out, err := exec.Command("go", "build", "-o", simBin, "github.com/easguard/easguard/tests/cmd/exchangesim").CombinedOutput()
		if err != nil {
			simBinErr = err
			tb.Logf("%s", out)
		}
	})
	if simBinErr != nil {
		tb.Fatal(simBinErr)
	}
	return simBin
}

type simStarted struct {
	WSMan []struct {
		Name, FQDN, URL string
	} `json:"wsman"`
	Admin        string `json:"admin"`
	Mailboxes    int    `json:"mailboxes"`
	Partnerships int    `json:"partnerships"`
}

// rssMB reads a process's resident set size.
func rssMB(tb testing.TB, pid int) float64 {
	tb.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			kb, _ := strconv.ParseFloat(strings.Fields(line)[1], 64)
			return kb / 1024
		}
	}
	tb.Fatal("no VmRSS")
	return 0
}

// BenchmarkExchangesimStart10k starts the exchangesim binary with 10,000
// mailboxes and 20,000 partnerships, measures the time until it has
// printed its URLs, lists every partnership over WinRM once, and reports
// the resident memory after that listing. Targets: under 5 s, under 200 MB.
func BenchmarkExchangesimStart10k(b *testing.B) {
	bin := exchangesimBinary(b)
	var startTotal time.Duration
	var rssMax float64
	for i := 0; i < b.N; i++ {
		start := time.Now()
		cmd := exec.Command(bin, "-mailboxes", "10000", "-partnerships", "20000", "-profile", "none")
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			b.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err != nil {
			_ = cmd.Process.Kill()
			b.Fatalf("no start line: %v", err)
		}
		startTotal += time.Since(start)
		var st simStarted
		if err := json.Unmarshal([]byte(line), &st); err != nil || st.Partnerships < 20000 {
			_ = cmd.Process.Kill()
			b.Fatalf("start line %q: %v", line, err)
		}
		w, err := startWorkerClient(b, newClientURL(b, st.WSMan[0].URL, nil, conn{}))
		if err != nil {
			_ = cmd.Process.Kill()
			b.Fatal(err)
		}
		_, r := w.request(exchange.Request{Op: "connect", Mode: "remote", URI: "https://" + st.WSMan[0].FQDN + "/PowerShell/", Auth: "Kerberos",
			User: exchangesim.DefaultUser, Password: exchangesim.DefaultPassword})
		if !r.OK {
			b.Fatalf("connect: %+v", r.Errors)
		}
		pages, final := w.request(exchange.Request{Op: "invoke", Page: 500, Call: &exchange.Call{Cmdlet: "Get-MobileDevice", Params: exchange.Params{"ResultSize": "Unlimited", "ActiveSync": true}}})
		if n := len(pages)*500 + len(final.Objects); !final.OK || n < 19000 {
			b.Fatalf("listed %d partnerships", n)
		}
		if m := rssMB(b, cmd.Process.Pid); m > rssMax {
			rssMax = m
		}
		w.close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	b.ReportMetric(startTotal.Seconds()/float64(b.N), "exchangesim_start_10k:s")
	b.ReportMetric(rssMax, "exchangesim_rss_10k:MB")
}
