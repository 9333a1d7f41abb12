package exchange_test

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"testing"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

var (
	fuzzOnce   sync.Once
	fuzzSim    *exchangesim.Sim
	fuzzClient *exchange.Client
	fuzzErr    error
)

// FuzzValuesReachExchangeByteForByte sends arbitrary strings as a device id
// and a mailbox identity through the pool. Each either reaches the
// simulator's Set-CASMailbox parameters byte for byte, or is refused
// before sending with ErrInvalid; nothing in between, and never as code.
func FuzzValuesReachExchangeByteForByte(f *testing.F) {
	for _, seed := range [][2]string{
		{"alice@contoso.com", "ApplF17LTTCGFFG8"},
		{"o'brien@contoso.com", "it's'; $(Stop-Computer)"},
		{"\u2018q\u2019@contoso.com", "\u201Ccurly\u201D\u201E\u201A\u201B"},
		{"a`b$(c)", "`whoami`"},
		{"x;y|z", "a;b|c&d"},
		{"line\nbreak", "tab\there"},
		{"nul\x00", "nul\x00"},
		{"", ""},
		{"alice", "0123456789abcdefghij0123456789ABC"},
		{"\xff\xfe", "\xc3\x28"},
		{"@{Add='x'}", "-Identity"},
		{"$env:PATH", "${x}"},
	} {
		f.Add(seed[0], seed[1])
	}
	f.Fuzz(func(t *testing.T, mailbox, deviceID string) {
		fuzzOnce.Do(func() {
			fuzzSim, fuzzErr = exchangesim.Start(exchangesim.Config{Profile: exchangesim.TestProfile()})
			if fuzzErr != nil {
				return
			}
			if _, fuzzErr = fuzzSim.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice"}); fuzzErr != nil {
				return
			}
			cfg := simConfig(t, fuzzSim)
			cfg.CABundle = ""
			var p *exchange.Pool
			p, fuzzErr = exchange.NewPool(context.Background(), cfg, quiet())
			fuzzClient = exchange.NewClient(p, cfg)
		})
		if fuzzErr != nil {
			t.Fatal(fuzzErr)
		}
		before := fuzzSim.Recorder.Count("cmdlet:Set-CASMailbox")
		res, err := fuzzClient.ApplyAccess(context.Background(), []exchange.Change{{Mailbox: mailbox, DeviceID: deviceID, Access: exchange.AccessAllow}})
		if err != nil {
			t.Fatalf("batch error: %v", err)
		}
		after := fuzzSim.Recorder.Count("cmdlet:Set-CASMailbox")
		if errors.Is(res[0].Err, exchange.ErrInvalid) && !errors.Is(res[0].Err, exchange.ErrNotFound) {
			if after != before {
				// Refused: must not have been sent. (An Exchange-side
				// ErrInvalid would also be recorded; see below.)
				recs := fuzzSim.Recorder.Records("cmdlet")
				if !sameParams(t, recs[len(recs)-1].Params, mailbox, deviceID) {
					t.Fatalf("refused %q/%q but something else was sent", mailbox, deviceID)
				}
			}
			return
		}
		if after != before+1 {
			t.Fatalf("%q/%q: %d calls recorded, result %v", mailbox, deviceID, after-before, res[0].Err)
		}
		recs := fuzzSim.Recorder.Records("cmdlet")
		if !sameParams(t, recs[len(recs)-1].Params, mailbox, deviceID) {
			t.Fatalf("%q/%q did not arrive byte for byte: %s", mailbox, deviceID, recs[len(recs)-1].Params)
		}
	})
}

func sameParams(t *testing.T, raw json.RawMessage, mailbox, deviceID string) bool {
	t.Helper()
	var p struct {
		Identity string
		Allowed  struct {
			Add []string
		} `json:"ActiveSyncAllowedDeviceIDs"`
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		t.Fatalf("recorded params %s: %v", raw, err)
	}
	return p.Identity == mailbox && len(p.Allowed.Add) == 1 && p.Allowed.Add[0] == deviceID
}
