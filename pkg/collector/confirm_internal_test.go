package collector

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Partnerships confirmed from many reports at once go out in full pages
// numbered from 1, the rest in a last page at flush, each partnership in
// exactly one page.
func TestConfirmationsFillPages(t *testing.T) {
	const n = 2*confirmPage + 44
	var mu sync.Mutex
	sent := map[uint32][]*ev.EASPartnership{}
	f := &confirmations{send: func(_ context.Context, page []*ev.EASPartnership, no uint32) error {
		mu.Lock()
		defer mu.Unlock()
		if _, dup := sent[no]; dup {
			t.Errorf("page %d sent twice", no)
		}
		sent[no] = page
		return nil
	}}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if err := f.add(context.Background(), &ev.EASPartnership{DeviceId: fmt.Sprint("dev", i)}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if err := f.flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := f.flush(context.Background()); err != nil { // nothing left: no empty page
		t.Fatal(err)
	}
	var sizes []int
	seen := map[string]bool{}
	for no := uint32(1); no <= uint32(len(sent)); no++ {
		page, ok := sent[no]
		if !ok {
			t.Fatalf("pages %v: %d missing", sent, no)
		}
		sizes = append(sizes, len(page))
		for _, p := range page {
			if seen[p.GetDeviceId()] {
				t.Fatalf("%s in two pages", p.GetDeviceId())
			}
			seen[p.GetDeviceId()] = true
		}
	}
	sort.Sort(sort.Reverse(sort.IntSlice(sizes)))
	if fmt.Sprint(sizes) != fmt.Sprint([]int{confirmPage, confirmPage, 44}) || len(seen) != n {
		t.Fatalf("page sizes %v holding %d partnerships, want %d, %d and 44", sizes, len(seen), confirmPage, confirmPage)
	}
}
