package intunesim_test

import (
	"runtime"
	"testing"
	"time"

	"github.com/easguard/easguard/tests/intunesim"
)

const select50k = "$select=id,userPrincipalName,easDeviceId,complianceState,managementState,lastSyncDateTime&$top=1000"

// Test50k starts a 50,000-device tenant and lists it the way easguard
// does (every page, with $select).
func Test50k(t *testing.T) {
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	start := time.Now()
	s := intunesim.StartTest(t, intunesim.Config{Extra: 50_000})
	took := time.Since(start)
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	heapMB := float64(after.HeapAlloc-min(before.HeapAlloc, after.HeapAlloc)) / (1 << 20)
	c, tok := s.HTTPClient(), token(t, s)
	start = time.Now()
	all, pages := listAll(t, c, s.GraphURL()+"/deviceManagement/managedDevices?"+select50k, tok)
	list := time.Since(start)
	if len(all) != 50_000 || pages != 50 {
		t.Fatalf("listed %d devices in %d pages", len(all), pages)
	}
	t.Logf("start %v (heap +%.0f MB), list with $select %v", took, heapMB, list)
}

func BenchmarkStart50k(b *testing.B) {
	var total time.Duration
	for i := 0; i < b.N; i++ {
		start := time.Now()
		s, err := intunesim.Start(intunesim.Config{Extra: 50_000})
		if err != nil {
			b.Fatal(err)
		}
		total += time.Since(start)
		s.Close()
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "intunesim_start_50k:s")
}

func BenchmarkList50k(b *testing.B) {
	s := intunesim.StartTest(b, intunesim.Config{Extra: 50_000})
	c, tok := s.HTTPClient(), token(b, s)
	b.ResetTimer()
	var total time.Duration
	for i := 0; i < b.N; i++ {
		start := time.Now()
		all, _ := listAll(b, c, s.GraphURL()+"/deviceManagement/managedDevices?"+select50k, tok)
		total += time.Since(start)
		if len(all) != 50_000 {
			b.Fatalf("listed %d", len(all))
		}
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "intunesim_list_50k:s")
}
