package console

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Overview is an organisation at a glance: its workers, syncs, MDM
// sources, policy, guard, alerts, dead letters and devices.
type Overview struct {
	Org    bus.Org    `json:"org"`
	Status status.Org `json:"status"`
	// Workers is every durable consumer of the organisation: how much
	// waits for it and when it last took something.
	Workers []Worker `json:"workers"`
	// Duties is who holds each singleton duty (collector, MDM pollers,
	// the guard) right now.
	Duties []bus.LeaseHolder `json:"duties"`
	// Alerts is the newest alerts raised, newest first.
	Alerts      []RecentAlert  `json:"alerts"`
	DeadLetters int            `json:"dead_letters"`
	Counts      map[string]int `json:"counts"`
	Total       int            `json:"partnerships"`
	Held        int            `json:"held"`
	// Syncs lists the kinds with their last pass and last success, for
	// the page.
	Syncs []SyncLine `json:"-"`
}

// SyncLine is one sync kind on the overview page.
type SyncLine struct {
	Kind string
	Last *status.Sync
	OK   *status.Sync
}

// Worker is one consumer of the organisation, as health.
type Worker struct {
	Service     string    `json:"service"`
	Route       string    `json:"route"`
	Pending     uint64    `json:"pending"`
	AckPending  int       `json:"ack_pending"`
	Redelivered int       `json:"redelivered"`
	LastActive  time.Time `json:"last_active,omitzero"`
	// Stalled: messages wait and none was taken for two minutes.
	Stalled bool `json:"stalled"`
}

// RecentAlert is an alert as the overview lists it.
type RecentAlert struct {
	Kind     string    `json:"kind"`
	Severity string    `json:"severity"`
	Summary  string    `json:"summary"`
	At       time.Time `json:"at"`
}

func (s *Server) readStatus(ctx context.Context, org bus.Org) (status.Org, error) {
	st, err := status.Read(ctx, s.status, org)
	// A corrupt record hides only itself (Read names it); the rest shows.
	if err != nil && !errors.Is(err, status.ErrCorrupt) {
		return st, fmt.Errorf("status of %s: %w", org, err)
	}
	return st, nil
}

func (s *Server) overview(r *request) (any, error) {
	ctx := r.Context()
	st, err := s.readStatus(ctx, r.org)
	if err != nil {
		return nil, err
	}
	o := Overview{Org: r.org, Status: st}
	for _, k := range []string{"quick", "full"} {
		line := SyncLine{Kind: k}
		if v, ok := st.Last[k]; ok {
			line.Last = &v
		}
		if v, ok := st.OK[k]; ok {
			line.OK = &v
		}
		o.Syncs = append(o.Syncs, line)
	}
	if o.Workers, err = s.workers(ctx, r.org); err != nil {
		return nil, err
	}
	if kv, err := s.js.KeyValue(ctx, bus.BucketLeases); err == nil {
		o.Duties, _ = bus.Holders(ctx, kv, r.org)
	}
	if dl, err := s.js.Stream(ctx, bus.StreamDLQ); err == nil {
		if info, err := dl.Info(ctx, jetstream.WithSubjectFilter(bus.DeadLetter.Filter(r.org))); err == nil {
			for _, n := range info.State.Subjects {
				o.DeadLetters += int(n)
			}
		}
	}
	alerts, err := readStream(ctx, s.js, bus.StreamAlerts, []string{bus.AlertRaised.Filter(r.org)}, 20)
	if err != nil {
		return nil, err
	}
	for i := len(alerts) - 1; i >= 0; i-- {
		var a ev.Alert
		if proto.Unmarshal(alerts[i].data, &a) == nil {
			o.Alerts = append(o.Alerts, RecentAlert{Kind: bus.AlertToken(a.GetKind()), Severity: word(a.GetSeverity().String(), "ALERT_SEVERITY_"),
				Summary: a.GetSummary(), At: a.GetRaisedAt().AsTime()})
		}
	}
	page := s.index[r.org].query(DeviceQuery{State: "held", Size: 1})
	o.Counts, o.Held = page.Counts, page.Total
	for _, n := range o.Counts {
		o.Total += n
	}
	return o, nil
}

// workers reads the organisation's durable consumers from every stream.
func (s *Server) workers(ctx context.Context, org bus.Org) ([]Worker, error) {
	var out []Worker
	streams := s.js.ListStreams(ctx)
	for si := range streams.Info() {
		st, err := s.js.Stream(ctx, si.Config.Name)
		if err != nil {
			continue
		}
		cons := st.ListConsumers(ctx)
		for ci := range cons.Info() {
			md := ci.Config.Metadata
			if md["easguard.org"] != string(org) {
				continue
			}
			w := Worker{Service: md["easguard.service"], Route: md["easguard.route"], Pending: ci.NumPending,
				AckPending: ci.NumAckPending, Redelivered: ci.NumRedelivered}
			if ci.Delivered.Last != nil {
				w.LastActive = *ci.Delivered.Last
			}
			w.Stalled = (w.Pending > 0 || w.AckPending > 0) && s.now().Sub(w.LastActive) > 2*time.Minute
			out = append(out, w)
		}
		if err := cons.Err(); err != nil {
			return nil, fmt.Errorf("list consumers of %s: %w", si.Config.Name, err)
		}
	}
	if err := streams.Err(); err != nil {
		return nil, fmt.Errorf("list streams: %w", err)
	}
	slices.SortFunc(out, func(a, b Worker) int {
		return strings.Compare(a.Service+"/"+a.Route, b.Service+"/"+b.Route)
	})
	return out, nil
}
