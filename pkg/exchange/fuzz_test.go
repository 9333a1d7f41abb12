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
		// The identity reaches Exchange (the read of its lists) byte for
		// byte, or is refused before sending.
		before := fuzzSim.Recorder.Count("cmdlet:Get-CASMailbox")
		res, err := fuzzClient.ApplyAccess(context.Background(), []exchange.Change{{Mailbox: mailbox, DeviceID: "FuzzDev0001", Access: exchange.AccessAllow}})
		if err != nil {
			t.Fatalf("batch error: %v", err)
		}
		if !errors.Is(res[0].Err, exchange.ErrInvalid) || errors.Is(res[0].Err, exchange.ErrNotFound) {
			if n := fuzzSim.Recorder.Count("cmdlet:Get-CASMailbox") - before; n < 1 {
				t.Fatalf("%q: %d reads recorded, result %v", mailbox, n, res[0].Err)
			}
			if p := lastParams(t, "Get-CASMailbox"); p.Identity != mailbox {
				t.Fatalf("%q did not arrive byte for byte: %+v", mailbox, p)
			}
		} else if fuzzSim.Recorder.Count("cmdlet:Get-CASMailbox") != before {
			t.Fatalf("refused %q but it was sent", mailbox)
		}
		if res[0].Err == nil {
			unlist(t, mailbox, "FuzzDev0001")
		}
		// The device id reaches Set-CASMailbox byte for byte in a mailbox
		// that exists, or is refused: nothing in between, never as code.
		before = fuzzSim.Recorder.Count("cmdlet:Set-CASMailbox")
		res, err = fuzzClient.ApplyAccess(context.Background(), []exchange.Change{{Mailbox: "alice", DeviceID: deviceID, Access: exchange.AccessAllow}})
		if err != nil {
			t.Fatalf("batch error: %v", err)
		}
		after := fuzzSim.Recorder.Count("cmdlet:Set-CASMailbox")
		if errors.Is(res[0].Err, exchange.ErrInvalid) {
			if after != before && !sameParams(t, lastParams(t, "Set-CASMailbox"), "alice", deviceID) {
				t.Fatalf("refused %q but something else was sent", deviceID)
			}
			return
		}
		if res[0].Err != nil || after != before+1 {
			t.Fatalf("%q: %d calls recorded, result %v", deviceID, after-before, res[0].Err)
		}
		if !sameParams(t, lastParams(t, "Set-CASMailbox"), "alice", deviceID) {
			t.Fatalf("%q did not arrive byte for byte: %+v", deviceID, lastParams(t, "Set-CASMailbox"))
		}
		unlist(t, "alice", deviceID)
	})
}

// fuzzCall is the part of a recorded call the fuzz checks.
type fuzzCall struct {
	Identity string
	Allowed  struct {
		Add []string
	} `json:"ActiveSyncAllowedDeviceIDs"`
}

// lastParams returns the parameters of the last recorded call of cmdlet.
func lastParams(t *testing.T, cmdlet string) fuzzCall {
	t.Helper()
	recs := fuzzSim.Recorder.Records("cmdlet")
	for i := len(recs) - 1; i >= 0; i-- {
		if recs[i].Cmdlet == cmdlet {
			var p fuzzCall
			if err := json.Unmarshal(recs[i].Params, &p); err != nil {
				t.Fatalf("recorded params %s: %v", recs[i].Params, err)
			}
			return p
		}
	}
	t.Fatalf("no %s recorded", cmdlet)
	return fuzzCall{}
}

// unlist takes an id the fuzz allowed off the list again, so that the next
// input with the same id (in any case) is a change again.
func unlist(t *testing.T, mailbox, deviceID string) {
	t.Helper()
	res, err := fuzzClient.ApplyAccess(context.Background(), []exchange.Change{{Mailbox: mailbox, DeviceID: deviceID, Access: exchange.AccessUnlist}})
	if err != nil || res[0].Err != nil {
		t.Fatalf("unlist %q/%q: %v %v", mailbox, deviceID, err, res[0].Err)
	}
}

func sameParams(t *testing.T, p fuzzCall, mailbox, deviceID string) bool {
	t.Helper()
	return p.Identity == mailbox && len(p.Allowed.Add) == 1 && p.Allowed.Add[0] == deviceID
}
