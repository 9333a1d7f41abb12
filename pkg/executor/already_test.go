package executor_test

import (
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// A decision whose change Exchange already holds (the worker that applied
// it died before the outcome was recorded, or an administrator did the same
// by hand) is reported ALREADY_IN_STATE without a Set-CASMailbox, and a new
// change in the same mailbox is still APPLIED, whichever way Exchange
// treats a repeated list change (UNCONFIRMED: the simulator's strict switch).
func TestDecisionAlreadyHeld(t *testing.T) {
	for _, strict := range []bool{false, true} {
		name := "lenient"
		if strict {
			name = "strict"
		}
		t.Run(name, func(t *testing.T) {
			h := start(t, options{})
			h.sim.Org.SetStrictLists(strict, strict)
			m := h.boxes[0]
			held := h.phone(t, m, "ApplHELD")
			fresh := h.phone(t, m, "ApplFRESH")
			if _, _, err := h.sim.Org.AdminInvoke(exchange.Call{Cmdlet: "Set-CASMailbox", Params: exchange.Params{
				"Identity": m.PrimarySMTP, "ActiveSyncBlockedDeviceIDs": exchange.MultiValued{Add: []string{"ApplHELD"}}}}); err != nil {
				t.Fatal(err)
			}
			calls := h.setCAS()
			d := decision(held, ev.DesiredAccess_DESIRED_ACCESS_BLOCK, time.Now())
			h.publish(t, d, "")
			a := h.await(t, d)
			if outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_ALREADY_IN_STATE || a.GetItems()[0].GetError() != "" || len(a.GetCmdlets()) != 0 {
				t.Fatalf("held change: %s %q, cmdlets %v", outcome(a), a.GetItems()[0].GetError(), a.GetCmdlets())
			}
			if n := h.setCAS() - calls; n != 0 {
				t.Fatalf("a change Exchange held ran Set-CASMailbox %d times", n)
			}
			d2 := decision(fresh, ev.DesiredAccess_DESIRED_ACCESS_ALLOW, time.Now())
			h.publish(t, d2, "")
			if a := h.await(t, d2); outcome(a) != ev.ApplyOutcome_APPLY_OUTCOME_APPLIED || len(a.GetCmdlets()) != 1 {
				t.Fatalf("fresh change: %s, cmdlets %v", outcome(a), a.GetCmdlets())
			}
			if allowed, blocked := h.lists(t, m); len(allowed) != 1 || allowed[0] != "ApplFRESH" || len(blocked) != 1 || blocked[0] != "ApplHELD" {
				t.Fatalf("lists: allowed %q blocked %q", allowed, blocked)
			}
		})
	}
}
