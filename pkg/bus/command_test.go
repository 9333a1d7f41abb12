package bus_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// A command goes to the worker that carries it out, on a subject keyed by
// the device, and the same operator's same command within a moment (a
// double click) has the same message id, which the stream stores once.
func TestCommandOutbound(t *testing.T) {
	at := time.Date(2025, 3, 4, 10, 20, 30, 0, time.UTC)
	tests := []struct {
		name          string
		action        string
		device        string
		partnership   string
		notify        []string
		subject       string
		wantErr       bool
		errorMentions string
	}{
		{name: "remove", action: ev.CommandRemove, device: "ApplDEV1", partnership: "g1", subject: "easguard.contoso.device.command.appldev1"},
		{name: "wipe", action: ev.CommandWipe, device: "ApplDEV1", partnership: "g1", notify: []string{"helpdesk@contoso.com"}, subject: "easguard.contoso.device.command.appldev1"},
		{name: "rejudge a device", action: ev.CommandRejudge, device: "ApplDEV1", subject: "easguard.contoso.device.rejudge.appldev1"},
		{name: "hostile device id", action: ev.CommandRemove, device: "a.b*>", partnership: "g1"},
		{name: "unknown action", action: "format", device: "ApplDEV1", partnership: "g1", wantErr: true, errorMentions: `"format"`},
		{name: "remove without partnership", action: ev.CommandRemove, device: "ApplDEV1", wantErr: true, errorMentions: "partnership_id is empty"},
		{name: "device id too long", action: ev.CommandWipe, device: strings.Repeat("x", 33), partnership: "g1", wantErr: true, errorMentions: "longer than 32"},
		{name: "notify on a removal", action: ev.CommandRemove, device: "ApplDEV1", partnership: "g1", notify: []string{"a@b.c"}, wantErr: true, errorMentions: "only for a wipe"},
		{name: "notify not an address", action: ev.CommandWipe, device: "ApplDEV1", partnership: "g1", notify: []string{"helpdesk\r\nBcc: x@y.z"}, wantErr: true, errorMentions: "not a mail address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := bus.CommandOutbound(org, tt.action, tt.device, tt.partnership, "contoso.com/Users/alice", "alice", "192.0.2.7", "lost", tt.notify, at)
			if tt.wantErr {
				if !errors.Is(err, bus.ErrBadCommand) || !strings.Contains(err.Error(), tt.errorMentions) {
					t.Fatalf("err = %v, want ErrBadCommand mentioning %q", err, tt.errorMentions)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.subject == "" {
				// A hostile id travels as KeyToken's base32 key, never raw.
				tok, _ := bus.KeyToken(tt.device)
				if !strings.HasPrefix(tok, "_") {
					t.Fatalf("key %q", tok)
				}
				tt.subject = "easguard.contoso.device.command." + tok
			}
			if out.Subject != tt.subject {
				t.Errorf("subject %q, want %q", out.Subject, tt.subject)
			}
			c := out.Message.(*ev.DeviceCommand)
			if c.GetDeviceId() != tt.device || c.GetAction() != tt.action || c.GetRequestedBy() != "alice" || !c.GetRequestedAt().AsTime().Equal(at) || out.MsgID != "command:"+c.GetCommandId() {
				t.Errorf("command %v, msg id %q", c, out.MsgID)
			}
			again, err := bus.CommandOutbound(org, tt.action, strings.ToUpper(tt.device), tt.partnership, "", "alice", "192.0.2.8", "lost!", tt.notify, at.Add(300*time.Millisecond))
			if err != nil || again.MsgID != out.MsgID {
				t.Errorf("a double click: msg id %q, %v; want %q", again.MsgID, err, out.MsgID)
			}
			for _, o := range []struct {
				what, by string
				at       time.Time
			}{{"another operator", "bob", at}, {"a minute later", "alice", at.Add(bus.CommandRepeatWindow)}} {
				other, err := bus.CommandOutbound(org, tt.action, tt.device, tt.partnership, "", o.by, "", "", tt.notify, o.at)
				if err != nil || other.MsgID == out.MsgID {
					t.Errorf("%s: msg id %q, %v; want a new command", o.what, other.MsgID, err)
				}
			}
		})
	}
}

// Commands are consumed once: their stream is a work queue, kept and
// replicated like the other streams.
func TestCommandStream(t *testing.T) {
	top := bus.DefaultTopology()
	top.Replicas = 3
	top.FactsMaxAge = 72 * time.Hour
	for _, cfg := range top.StreamConfigs() {
		if cfg.Name != bus.StreamCommands {
			continue
		}
		if cfg.Retention != jetstream.WorkQueuePolicy || cfg.Replicas != 3 || cfg.MaxAge != 72*time.Hour || cfg.Duplicates != top.DuplicateWindow {
			t.Errorf("stream %+v", cfg)
		}
		want := []string{"easguard.*.device.command.>", "easguard.*.device.rejudge.>"}
		if strings.Join(cfg.Subjects, " ") != strings.Join(want, " ") {
			t.Errorf("subjects %q, want %q", cfg.Subjects, want)
		}
		return
	}
	t.Fatalf("no stream %s", bus.StreamCommands)
}
