package exchange_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/easguard/easguard/pkg/exchange"
	"github.com/easguard/easguard/tests/exchangesim"
)

// listModes are the ways Exchange may treat an @{Add=} of an id already on
// a device list and an @{Remove=} of one that is not (UNCONFIRMED): the
// simulator's lenient default, and a strict Exchange refusing either.
var listModes = []struct {
	name        string
	add, remove bool
}{
	{"lenient", false, false},
	{"strict add", true, false},
	{"strict add and remove", true, true},
}

// The simulator's strict switch is real: a duplicate add (and, when set,
// the remove of an absent id) is refused as Exchange would refuse a
// parameter, and the lenient default warns that nothing was modified.
func TestStrictListsSwitch(t *testing.T) {
	for _, mode := range listModes {
		t.Run(mode.name, func(t *testing.T) {
			s := startSim(t, exchangesim.Config{})
			if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: "alice"}); err != nil {
				t.Fatal(err)
			}
			s.Org.SetStrictLists(mode.add, mode.remove)
			set := func(mv exchange.MultiValued) ([]string, error) {
				_, warnings, err := s.Org.AdminInvoke(exchange.Call{Cmdlet: "Set-CASMailbox", Params: exchange.Params{"Identity": "alice", "ActiveSyncAllowedDeviceIDs": mv}})
				return warnings, err
			}
			if _, err := set(exchange.MultiValued{Add: []string{"Dev1"}}); err != nil {
				t.Fatal(err)
			}
			warnings, err := set(exchange.MultiValued{Add: []string{"DEV1"}})
			if mode.add != (err != nil) || (err != nil && !errors.Is(err, exchange.ErrInvalid)) {
				t.Fatalf("duplicate add: %v", err)
			}
			if err == nil && (len(warnings) != 1 || !strings.Contains(warnings[0], "no settings of") || !strings.Contains(warnings[0], "have been modified")) {
				t.Fatalf("duplicate add accepted without Exchange's no-change warning: %q", warnings)
			}
			_, err = set(exchange.MultiValued{Remove: []string{"Dev9"}})
			if mode.remove != (err != nil) {
				t.Fatalf("remove of an absent id: %v", err)
			}
		})
	}
}

// Retries and redeliveries apply the same change again; whichever way
// Exchange treats duplicates, they converge, report success, and a change
// Exchange already holds costs no Set-CASMailbox.
func TestApplyAccessRepeats(t *testing.T) {
	for _, mode := range listModes {
		t.Run(mode.name, func(t *testing.T) {
			s := startSim(t, exchangesim.Config{})
			for _, a := range []string{"alice", "bob"} {
				if _, err := s.Org.AddMailbox(exchangesim.MailboxSpec{Alias: a}); err != nil {
					t.Fatal(err)
				}
			}
			s.Org.SetStrictLists(mode.add, mode.remove)
			cfg := simConfig(t, s)
			c := exchange.NewClient(newPool(t, cfg), cfg)
			ctx := context.Background()
			steps := []struct {
				name      string
				changes   []exchange.Change
				unchanged []bool // per change
				sets      int    // Set-CASMailbox calls the step costs
				allowed   string // alice's lists afterwards
				blocked   string
			}{
				{"allow", []exchange.Change{{Mailbox: "alice", DeviceID: "Dev1", Access: exchange.AccessAllow}},
					[]bool{false}, 1, "[Dev1]", "[]"},
				{"the same allow again", []exchange.Change{{Mailbox: "alice", DeviceID: "Dev1", Access: exchange.AccessAllow}},
					[]bool{true}, 0, "[Dev1]", "[]"},
				{"the same allow, id in another case", []exchange.Change{{Mailbox: "ALICE", DeviceID: "DEV1", Access: exchange.AccessAllow}},
					[]bool{true}, 0, "[Dev1]", "[]"},
				{"a block after the allow", []exchange.Change{{Mailbox: "alice", DeviceID: "Dev1", Access: exchange.AccessBlock}},
					[]bool{false}, 1, "[]", "[Dev1]"},
				{"one of two already held", []exchange.Change{{Mailbox: "alice", DeviceID: "Dev1", Access: exchange.AccessBlock}, {Mailbox: "alice", DeviceID: "Dev2", Access: exchange.AccessAllow}},
					[]bool{true, false}, 1, "[Dev2]", "[Dev1]"},
				{"unlist", []exchange.Change{{Mailbox: "alice", DeviceID: "Dev1", Access: exchange.AccessUnlist}, {Mailbox: "alice", DeviceID: "Dev2", Access: exchange.AccessUnlist}},
					[]bool{false, false}, 1, "[]", "[]"},
				{"unlist again", []exchange.Change{{Mailbox: "alice", DeviceID: "Dev1", Access: exchange.AccessUnlist}},
					[]bool{true}, 0, "[]", "[]"},
			}
			for _, st := range steps {
				before := s.Recorder.Count("cmdlet:Set-CASMailbox")
				res, err := c.ApplyAccess(ctx, st.changes)
				if err != nil {
					t.Fatalf("%s: %v", st.name, err)
				}
				for i, r := range res {
					if r.Err != nil || r.Unchanged != st.unchanged[i] {
						t.Fatalf("%s: change %d: err %v, unchanged %t, want unchanged %t", st.name, i, r.Err, r.Unchanged, st.unchanged[i])
					}
				}
				if n := s.Recorder.Count("cmdlet:Set-CASMailbox") - before; n != st.sets {
					t.Fatalf("%s: %d Set-CASMailbox, want %d", st.name, n, st.sets)
				}
				allowed, blocked, _ := s.Org.Lists("alice")
				if fmt.Sprint(nonNil(allowed)) != st.allowed || fmt.Sprint(nonNil(blocked)) != st.blocked {
					t.Fatalf("%s: alice allowed %v blocked %v, want %s %s", st.name, allowed, blocked, st.allowed, st.blocked)
				}
			}
		})
	}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// A worker dies in the middle of a batch of writes, after some of them took
// effect: the pool sends the batch again on a fresh worker, and the
// executor's redelivery then applies the whole change set once more. Every
// change ends as asked and reports success, whichever way Exchange treats
// a repeated list change, and the redelivery writes nothing.
func TestApplyAccessAfterWorkerDiedMidBatch(t *testing.T) {
	for _, mode := range listModes {
		t.Run(mode.name, func(t *testing.T) {
			s := startSim(t, exchangesim.Config{Seed: &exchangesim.SeedSpec{Mailboxes: 12, Partnerships: 0, Seed: 7, NoHostile: true}})
			s.Org.SetStrictLists(mode.add, mode.remove)
			cfg := simConfig(t, s)
			cfg.Workers, cfg.BatchSize = 1, 20
			c := exchange.NewClient(newPool(t, cfg), cfg)
			ctx := context.Background()
			var changes []exchange.Change
			for i, m := range s.Org.Mailboxes() {
				if m.Monitoring {
					continue
				}
				acc := exchange.AccessAllow
				if i%2 == 1 {
					acc = exchange.AccessBlock
				}
				changes = append(changes, exchange.Change{Mailbox: m.PrimarySMTP, DeviceID: fmt.Sprintf("Dev%02d", i), Access: acc})
			}
			s.KillWorkerAfterWrites(5)
			res, err := c.ApplyAccess(ctx, changes)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range res {
				if r.Err != nil {
					t.Fatalf("%s/%s: %v", r.Mailbox, r.DeviceID, r.Err)
				}
			}
			// The kill did happen: more Set-CASMailbox ran than mailboxes changed.
			if n := s.Recorder.Count("cmdlet:Set-CASMailbox"); n <= len(changes) {
				t.Fatalf("%d Set-CASMailbox for %d mailboxes: the worker was not killed mid-batch", n, len(changes))
			}
			check := func() {
				t.Helper()
				for _, ch := range changes {
					allowed, blocked, _ := s.Org.Lists(ch.Mailbox)
					want := []string{ch.DeviceID}
					if ch.Access == exchange.AccessAllow && (!slices.Equal(allowed, want) || len(blocked) != 0) ||
						ch.Access == exchange.AccessBlock && (!slices.Equal(blocked, want) || len(allowed) != 0) {
						t.Fatalf("%s: allowed %v blocked %v, want %s %s", ch.Mailbox, allowed, blocked, ch.Access, ch.DeviceID)
					}
				}
			}
			check()

			// The executor's redelivery: nothing left to write.
			before := s.Recorder.Count("cmdlet:Set-CASMailbox")
			res, err = c.ApplyAccess(ctx, changes)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range res {
				if r.Err != nil || !r.Unchanged {
					t.Fatalf("redelivered %s/%s: err %v, unchanged %t", r.Mailbox, r.DeviceID, r.Err, r.Unchanged)
				}
			}
			if n := s.Recorder.Count("cmdlet:Set-CASMailbox") - before; n != 0 {
				t.Fatalf("the redelivery sent %d Set-CASMailbox", n)
			}
			check()
		})
	}
}
