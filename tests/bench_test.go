package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/executor"
	"github.com/easguard/easguard/pkg/mdm"
	"github.com/easguard/easguard/pkg/natsembed/natstest"
	"github.com/easguard/easguard/pkg/pipeline"
	"github.com/easguard/easguard/tests/exchangesim"
)

const (
	benchDevices  = 200
	webhookSecret = "bench-webhook-secret-0123456789"
)

// BenchmarkTimeToAllow measures what a user waits for once the MDM says
// the phone is compliant: from the MDM change reaching easguard to the
// simulated Exchange (default latency profile, the default 4 PowerShell
// workers, which grow into the shared session budget of 12 under a
// backlog) answering Allowed to the phone. Each phone syncs every 5 ms
// while it waits, so a figure is at most 5 ms pessimistic. The wave of
// blocks before the enrolments is a backlog too: the sessions it opens
// stay for EASGUARD_EXCHANGE_BURST_IDLE, so the enrolments find them open.
//
//   - webhook: 200 blocked phones enrol 10 ms apart (200 in 2 s, more than
//     4 Exchange sessions can write at 40 ms a Set-CASMailbox), the changes
//     arriving on the webhook. The target: p99 under 1 s.
//   - webhook_idle: the same, 100 ms apart: the latency of the path itself.
//   - file_burst: an export job rewrites the inventory file once with all
//     200 phones compliant (say, after a compliance policy was fixed): the
//     file source's 200 ms settle time, then 200 allows at once.
func BenchmarkTimeToAllow(b *testing.B) {
	for _, r := range []struct {
		name, source, metric string
		every                time.Duration
	}{
		{"webhook", "webhook", "time_to_allow", 10 * time.Millisecond},
		{"webhook_idle", "webhook", "time_to_allow_idle", 100 * time.Millisecond},
		{"file_burst", "file", "time_to_allow_file_burst", 0},
	} {
		b.Run(r.name, func(b *testing.B) {
			var all []time.Duration
			for range b.N {
				all = append(all, timeToAllow(b, r.source, r.every)...)
			}
			slices.Sort(all)
			b.ReportMetric(ms(percentile(all, 0.50)), r.metric+"_p50:ms")
			b.ReportMetric(ms(percentile(all, 0.99)), r.metric+"_p99:ms")
			b.ReportMetric(ms(all[len(all)-1]), r.metric+"_max:ms")
		})
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// percentile of sorted durations, nearest rank.
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(p*float64(len(sorted))+0.5) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// timeToAllow runs one round: 200 phones blocked, then enrolled one every
// tick; it returns each phone's wait.
func timeToAllow(b *testing.B, source string, every time.Duration) []time.Duration {
	b.Helper()
	hook := ""
	o := stackOptions{
		seed:    &exchangesim.SeedSpec{Mailboxes: benchDevices, Seed: 7, NoHostile: true},
		profile: exchangesim.DefaultProfile(),
		executor: func(c *executor.Config) {
			*c = executor.Config{Window: 10 * time.Millisecond, MaxBatch: 500, Parallel: 64}
		}, // the defaults
	}
	if source == "webhook" {
		hook = natstest.FreeAddr(b)
		o.mdm = func(c *pipeline.MDMConfig) { c.WebhookAddr, c.WebhookSecret = hook, config.Secret(webhookSecret) }
	}
	s := startStack(b, o)
	s.waitFullSync()

	var phones []exchangesim.Phone
	var devices []managedDevice
	for i, mb := range s.sim.Org.Mailboxes() {
		if len(phones) == benchDevices {
			break
		}
		p := iPhone(mb.PrimarySMTP, fmt.Sprintf("ApplBENCH%07d", i))
		phones = append(phones, p)
		d := compliant(fmt.Sprintf("m-%d", i), mb.UPN, p.DeviceID)
		d.LastSyncDateTime = time.Now().UTC().Format(time.RFC3339)
		devices = append(devices, d)
	}
	for _, p := range phones {
		s.phoneSync(p)
	}
	natstest.Eventually(b, 5*time.Minute, "every phone blocked", func() bool {
		for _, p := range phones {
			if s.phoneSync(p).State != "Blocked" {
				return false
			}
		}
		return true
	})
	s.settle()

	// Enrol: one MDM change per tick; the phones sync while they wait.
	sent := make([]atomic.Int64, len(phones)) // unix nanoseconds; 0: not yet
	done := make(chan struct{})
	go func() {
		defer close(done)
		if every == 0 { // all at once
			now := time.Now().UnixNano()
			for i := range sent {
				sent[i].Store(now)
			}
			if err := s.tryWriteInventory(devices...); err != nil {
				b.Error(err)
			}
			return
		}
		tick := time.NewTicker(every)
		defer tick.Stop()
		for i := range devices {
			<-tick.C
			sent[i].Store(time.Now().UnixNano())
			if source == "webhook" {
				postWebhook(b, hook, i, devices[i])
			} else if err := s.tryWriteInventory(devices[:i+1]...); err != nil {
				b.Error(err)
			}
		}
	}()
	waits := make([]time.Duration, 0, len(phones))
	allowed := make([]bool, len(phones))
	poll := time.NewTicker(5 * time.Millisecond)
	defer poll.Stop()
	deadline := time.Now().Add(2 * time.Minute)
	for len(waits) < len(phones) {
		<-poll.C
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d phones allowed within 2 minutes", len(waits), len(phones))
		}
		for i, p := range phones {
			at := sent[i].Load()
			if allowed[i] || at == 0 {
				continue
			}
			if r := s.phoneSync(p); r.State == "Allowed" {
				allowed[i] = true
				waits = append(waits, time.Since(time.Unix(0, at)))
			}
		}
	}
	<-done
	return waits
}

// postWebhook sends one signed device change, as an MDM integration would.
func postWebhook(b *testing.B, addr string, n int, d managedDevice) {
	body, err := json.Marshal(map[string]any{"devices": []managedDevice{d}})
	if err != nil {
		b.Error(err)
		return
	}
	ts, id := strconv.FormatInt(time.Now().Unix(), 10), "bench-"+strconv.Itoa(n)+"-"+strconv.FormatInt(time.Now().UnixNano(), 36)
	req, err := http.NewRequest(http.MethodPost, "http://"+addr+"/mdm/webhook", bytes.NewReader(body))
	if err != nil {
		b.Error(err)
		return
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(mdm.HeaderTimestamp, ts)
	req.Header.Set(mdm.HeaderEventID, id)
	req.Header.Set(mdm.HeaderSignature, mdm.WebhookSignature([]byte(webhookSecret), ts, id, body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		b.Error(err)
		return
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		b.Errorf("webhook answered %d", resp.StatusCode)
	}
}
