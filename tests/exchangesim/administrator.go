package exchangesim

import (
	"encoding/json"
	"fmt"

	"github.com/easguard/easguard/pkg/exchange"
)

// AdminInvoke runs one cmdlet as an Exchange administrator would in the
// Exchange Management Shell on a server of the organisation, out of band
// for easguard: with the snap-in, every cmdlet, the whole forest in view.
// It is how tests change Exchange behind easguard's back (an administrator
// allowing a quarantined phone, editing a mailbox's lists by hand) with the
// same semantics as the cmdlet easguard would run. Nothing is recorded:
// easguard's own cmdlets are what the recorder counts.
func (o *Org) AdminInvoke(call exchange.Call) ([]exchange.Object, []string, error) {
	o.mu.RLock()
	server := o.Servers[0].Name
	o.mu.RUnlock()
	// The parameters take the form they have on the wire, as a worker gets them.
	if b, err := json.Marshal(call.Params); err == nil {
		call.Params = nil
		if err := json.Unmarshal(b, &call.Params); err != nil {
			return nil, nil, fmt.Errorf("admin invoke %s: %w", call.Cmdlet, err)
		}
	}
	s := o.NewSession(server, "Administrator", nil)
	s.mode, s.viewEntireForest = "snapin", true
	var objs []exchange.Object
	warnings, errs := s.Invoke(call, func(obj exchange.Object) { objs = append(objs, obj) })
	return objs, warnings, exchange.ResultError(call.Cmdlet, errs)
}

// KillWorkerAfterWrites arms a fault: the worker process that runs the
// n-th write cmdlet from now (Set-CASMailbox and the like, counted across
// every worker) dies right after that cmdlet has changed the organisation,
// before it answers: a worker killed in the middle of a batch, whose
// earlier calls took effect and whose later ones never ran. Zero disarms.
func (s *Sim) KillWorkerAfterWrites(n int) { s.killAfterWrites.Store(int64(n)) }
