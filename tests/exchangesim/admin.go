package exchangesim

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
)

// AdminHandler serves the simulator's admin API, for tests, benchmarks and
// the demo:
//
//	GET    /api/org                      organisation summary and endpoints
//	GET    /api/partnerships[?mailbox=]  partnerships with state and list membership
//	POST   /api/phones/sync              a phone syncs (body: Phone) → SyncResult
//	POST   /api/mailboxes                create a mailbox (body: MailboxSpec)
//	GET    /api/mailboxes/lists?mailbox= ActiveSyncAllowed/BlockedDeviceIDs of a mailbox
//	GET    /api/notices?mailbox=         the mails Exchange itself sent about devices
//	GET    /api/requests[?kind=&limit=]  recorded WS-Man requests and cmdlet calls, with counts
//	DELETE /api/requests                 forget the records
//	POST   /api/faults                   inject a fault (body: Fault)
//	POST   /api/role                     set the cmdlets the role grants (body: {"cmdlets":[…]})
//	POST   /api/admin/invoke             run a cmdlet as an administrator, out of band (body: exchange.Call)
func (s *Sim) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/org", func(w http.ResponseWriter, r *http.Request) {
		o := s.Org
		o.mu.RLock()
		type ep struct {
			Name string `json:"name"`
			FQDN string `json:"fqdn"`
			URL  string `json:"wsman"`
			Down bool   `json:"down"`
		}
		out := map[string]any{
			"name": o.Name, "domain": o.defaultDomain().DNS, "mailboxes": len(o.mailboxes), "partnerships": o.deviceCount,
			"default_access_level": o.Settings.DefaultAccessLevel.String(), "admin_mail_recipients": o.Settings.AdminMailRecipients,
			"rules": len(o.Rules),
		}
		o.mu.RUnlock()
		var eps []ep
		for _, e := range s.endpoints {
			eps = append(eps, ep{e.Name, e.FQDN, e.URL(), e.Down()})
		}
		out["endpoints"] = eps
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("GET /api/partnerships", func(w http.ResponseWriter, r *http.Request) {
		list, err := s.Org.Partnerships(r.URL.Query().Get("mailbox"))
		if err != nil {
			writeError(w, http.StatusNotFound, err)
			return
		}
		if list == nil {
			list = []Partnership{}
		}
		writeJSON(w, http.StatusOK, list)
	})
	mux.HandleFunc("POST /api/phones/sync", func(w http.ResponseWriter, r *http.Request) {
		var p Phone
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&p); err != nil {
			writeError(w, http.StatusBadRequest, err)
			return
		}
		res, err := s.Org.Sync(p)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]any{"error": err.Error(), "result": res})
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
	mux.HandleFunc("POST /api/mailboxes", func(w http.ResponseWriter, r *http.Request) {
		var spec MailboxSpec
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&spec); err != nil {
			writeError(w, http.StatusBadRequest, err)
			return
		}
		m, err := s.Org.AddMailbox(spec)
		if err != nil {
			writeError(w, http.StatusConflict, err)
			return
		}
		writeJSON(w, http.StatusCreated, map[string]string{"alias": m.Alias, "primary_smtp": m.PrimarySMTP, "upn": m.UPN, "guid": m.GUID, "identity": m.Canonical()})
	})
	mux.HandleFunc("GET /api/mailboxes/lists", func(w http.ResponseWriter, r *http.Request) {
		allowed, blocked, err := s.Org.Lists(r.URL.Query().Get("mailbox"))
		if err != nil {
			writeError(w, http.StatusNotFound, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string][]string{"allowed": nonNil(allowed), "blocked": nonNil(blocked)})
	})
	mux.HandleFunc("GET /api/notices", func(w http.ResponseWriter, r *http.Request) {
		notices, err := s.Org.Notices(r.URL.Query().Get("mailbox"))
		if err != nil {
			writeError(w, http.StatusNotFound, err)
			return
		}
		writeJSON(w, http.StatusOK, notices)
	})
	mux.HandleFunc("GET /api/requests", func(w http.ResponseWriter, r *http.Request) {
		recs := s.Recorder.Records(r.URL.Query().Get("kind"))
		if l, err := strconv.Atoi(r.URL.Query().Get("limit")); err == nil && l >= 0 && l < len(recs) {
			recs = recs[len(recs)-l:]
		}
		writeJSON(w, http.StatusOK, map[string]any{"counts": s.Recorder.Counts(), "records": recs})
	})
	mux.HandleFunc("DELETE /api/requests", func(w http.ResponseWriter, r *http.Request) {
		s.Recorder.Reset()
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /api/faults", func(w http.ResponseWriter, r *http.Request) {
		var f Fault
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&f); err != nil {
			writeError(w, http.StatusBadRequest, err)
			return
		}
		n, err := s.Inject(f)
		if err != nil {
			code := http.StatusBadRequest
			if errors.Is(err, ErrUnknownEndpoint) {
				code = http.StatusNotFound
			}
			writeError(w, code, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]int{"affected": n})
	})
	mux.HandleFunc("POST /api/role", func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Cmdlets []string `json:"cmdlets"`
		}
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&body); err != nil {
			writeError(w, http.StatusBadRequest, err)
			return
		}
		s.Org.Grant(body.Cmdlets)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /api/admin/invoke", func(w http.ResponseWriter, r *http.Request) {
		var call exchange.Call
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&call); err != nil {
			writeError(w, http.StatusBadRequest, err)
			return
		}
		objs, warnings, err := s.Org.AdminInvoke(call)
		if err != nil {
			writeJSON(w, http.StatusUnprocessableEntity, map[string]any{"error": err.Error(), "objects": objs, "warnings": warnings})
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"objects": objs, "warnings": warnings})
	})
	return mux
}

// Fault is an injected fault on one CAS.
type Fault struct {
	// Endpoint names the CAS (EX01 or its FQDN).
	Endpoint string `json:"endpoint"`
	// Kind is down, up, refuse_auth, accept_auth, slow_receive (DelayMS),
	// slow_create (DelayMS), stall_receive, stall (every request),
	// drop_shells, recycle (the /PowerShell app pool: every remote session
	// on the CAS breaks), or clear (all off).
	Kind    string `json:"kind"`
	DelayMS int    `json:"delay_ms,omitempty"`
}

// Inject applies a fault and returns how many shells it affected (for drop_shells).
func (s *Sim) Inject(f Fault) (int, error) {
	e := s.Endpoint(f.Endpoint)
	if e == nil {
		return 0, fmt.Errorf("%w: %q", ErrUnknownEndpoint, f.Endpoint)
	}
	switch f.Kind {
	case "down":
		return 0, e.SetDown(true)
	case "up":
		return 0, e.SetDown(false)
	case "recycle":
		return e.Recycle(), nil
	case "refuse_auth":
		e.SetRefuseAuth(true)
	case "accept_auth":
		e.SetRefuseAuth(false)
	case "slow_receive":
		e.SetSlowReceive(time.Duration(f.DelayMS) * time.Millisecond)
	case "slow_create":
		e.SetSlowCreate(time.Duration(f.DelayMS) * time.Millisecond)
	case "stall_receive":
		e.SetStallReceive(true)
	case "stall":
		e.SetStall(true)
	case "drop_shells":
		return e.DropShells(), nil
	case "clear":
		e.SetRefuseAuth(false)
		e.SetSlowReceive(0)
		e.SetSlowCreate(0)
		e.SetStallReceive(false)
		e.SetStall(false)
		if e.Down() {
			return 0, e.SetDown(false)
		}
	default:
		return 0, fmt.Errorf("unknown fault kind %q", f.Kind)
	}
	return 0, nil
}

// Notices returns the mails Exchange sent about a mailbox's devices.
func (o *Org) Notices(mailbox string) ([]Notice, error) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	var list []*Mailbox
	if mailbox == "" {
		list = o.mailboxes
	} else if ms := o.byKey[strings.ToLower(mailbox)]; len(ms) == 1 {
		list = ms
	} else {
		return nil, fmt.Errorf("no single mailbox %q", mailbox)
	}
	out := []Notice{}
	for _, m := range list {
		out = append(out, m.Notices...)
	}
	return out, nil
}

func nonNil(v []string) []string {
	if v == nil {
		return []string{}
	}
	return v
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, map[string]string{"error": err.Error()})
}
