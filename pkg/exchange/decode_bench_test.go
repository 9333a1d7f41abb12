package exchange

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"runtime"
	"testing"
	"time"

	"github.com/easguard/easguard/pkg/telemetry/telemetrytest"
)

// decodeBenchPartnerships is how many partnerships one run of
// BenchmarkListingDecode decodes: four pages of 500 and a final frame of
// 250, as a worker streams a listing with the client's PageSize.
const decodeBenchPartnerships = 2250

// benchPartnershipObjects returns n partnerships as Get-MobileDevice
// reports them with partnershipProps selected (the simulator's shapes:
// iPhones, Android, Outlook), some with hostile device ids and non-ASCII
// owners, which must stay data.
func benchPartnershipObjects(n int) []Object {
	base := time.Date(2026, 1, 5, 6, 21, 3, 225475500, time.UTC)
	owners := []string{"Hugo Koch", "O'Brien, Seán", "İbrahim Yılmaz", "Anna Wagner", "Greta Hoffmann"}
	out := make([]Object, n)
	for i := range out {
		kind, model, os, agent := "iPhone", "iPhone15C2", "iOS 17.4 21F89", "Apple-iPhone14C3/2104.27"
		id := fmt.Sprintf("Appl%012X", i*7919)
		switch i % 3 {
		case 1:
			kind, model, os, agent = "Android", "SM-S918B", "Android 14.0.0", "Android-SAMSUNG-SM-S918B/101.10001"
			id = fmt.Sprintf("androidc%010d", i*104729)
		case 2:
			kind, model, os, agent = "Outlook", "Outlook for iOS and Android", "iOS 17.4", "Outlook-iOS-Android/1.0"
			id = fmt.Sprintf("%032X", i*2654435761)
		}
		if i%97 == 0 {
			id = "it's'; $(Stop-Computer)"
		}
		owner := fmt.Sprintf("contoso.com/Users/%s %d", owners[i%len(owners)], i/2)
		changed := base.Add(time.Duration(i) * time.Hour)
		out[i] = Object{"ClientType": "EAS", "DeviceAccessControlRule": nil, "DeviceAccessState": "Allowed", "DeviceAccessStateReason": "Global",
			"DeviceActiveSyncVersion": "16.1", "DeviceId": id, "DeviceImei": "", "DeviceModel": model, "DeviceOS": os,
			"DeviceType": kind, "DeviceUserAgent": agent, "FirstSyncTime": base.Add(time.Duration(i) * time.Minute).Format("2006-01-02T15:04:05.0000000Z"),
			"FriendlyName": fmt.Sprintf("%s's %s", owner[len("contoso.com/Users/"):], kind), "Guid": fmt.Sprintf("6df7ddce-0000-402e-8005-%012x", i),
			"Identity": owner + "/ExchangeActiveSyncDevices/" + kind + "§" + id, "UserDisplayName": owner,
			"WhenChanged": changed.Format("2006-01-02T15:04:05.0000000+00:00"), "WhenChangedUTC": changed.Format("2006-01-02T15:04:05.0000000Z")}
		if i%5 == 0 {
			out[i]["DeviceAccessState"], out[i]["DeviceAccessStateReason"] = "Blocked", "Individual"
		}
	}
	return out
}

// benchListingOutput is the worker's stdout for a listing of objs
// (request id 7): page frames of page objects, then the final frame.
func benchListingOutput(tb testing.TB, objs []Object, page int) []byte {
	tb.Helper()
	var out bytes.Buffer
	out.WriteString("a line of host noise\n")
	count := len(objs)
	for n := 1; len(objs) > page; n++ {
		line, err := EncodeFrame(Response{ID: 7, Page: &n, Objects: objs[:page]})
		if err != nil {
			tb.Fatal(err)
		}
		out.Write(line)
		objs = objs[page:]
	}
	line, err := EncodeFrame(Response{ID: 7, Done: true, OK: true, Count: count, Objects: objs})
	if err != nil {
		tb.Fatal(err)
	}
	out.Write(line)
	return out.Bytes()
}

// benchReceiveBodies splits stdout into WS-Man ReceiveResponse bodies as
// the Windows host (and the simulator) sends them to a client whose
// MaxEnvelopeSize is 153,600 bytes; the last one ends the command.
func benchReceiveBodies(stdout []byte) [][]byte {
	const envelope = `<s:Envelope xml:lang="en-US" xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer" xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd" xmlns:rsp="http://schemas.microsoft.com/wbem/wsman/1/windows/shell" xmlns:p="http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd"><s:Header><a:Action>http://schemas.microsoft.com/wbem/wsman/1/windows/shell/ReceiveResponse</a:Action><a:MessageID>uuid:7F3D8A4C-1B2E-4F60-9A7B-2C4D6E8F0A1B</a:MessageID><a:To>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:To><a:RelatesTo>uuid:0A1B2C3D-4E5F-6071-8293-A4B5C6D7E8F9</a:RelatesTo></s:Header><s:Body><rsp:ReceiveResponse>`
	const id = "1A6B8C2D-3E4F-5061-7283-94A5B6C7D8E9"
	var bodies [][]byte
	room := (153600 - 2048 - 200) / 4 * 3
	for len(stdout) > 0 {
		n := min(room, len(stdout))
		var b bytes.Buffer
		b.WriteString(envelope)
		b.WriteString(`<rsp:Stream Name="stdout" CommandId="` + id + `">` + base64.StdEncoding.EncodeToString(stdout[:n]) + `</rsp:Stream>`)
		if stdout = stdout[n:]; len(stdout) == 0 {
			b.WriteString(`<rsp:Stream Name="stdout" CommandId="` + id + `" End="true"></rsp:Stream><rsp:Stream Name="stderr" CommandId="` + id + `" End="true"></rsp:Stream>`)
			b.WriteString(`<rsp:CommandState CommandId="` + id + `" State="http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done"><rsp:ExitCode>0</rsp:ExitCode></rsp:CommandState>`)
		} else {
			b.WriteString(`<rsp:CommandState CommandId="` + id + `" State="http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Running"></rsp:CommandState>`)
		}
		b.WriteString(`</rsp:ReceiveResponse></s:Body></s:Envelope>`)
		bodies = append(bodies, b.Bytes())
	}
	return bodies
}

// decodeListing runs recorded Receive answers through the client's side
// of a listing as a worker reads it (winrsCommand.receive and
// worker.readFrames): the answers' output into the worker's stdout,
// stdout into frames, frames' objects into partnerships. It returns how
// many partnerships have a device id.
func decodeListing(tb testing.TB, bodies [][]byte) int {
	got := 0
	decodeListingTo(tb, bodies, func(p Partnership) {
		if p.DeviceID != "" {
			got++
		}
	})
	return got
}

// decodeListingTo is decodeListing handing each partnership to fn.
func decodeListingTo(tb testing.TB, bodies [][]byte, fn func(Partnership)) {
	r, w := io.Pipe()
	c := &winrsCommand{out: w, stderr: io.Discard}
	go func() {
		var out receiveOutput
		for _, body := range bodies {
			done, err := c.output(&out, body)
			if err != nil {
				w.CloseWithError(err)
				return
			}
			if done {
				break
			}
		}
		w.Close()
	}()
	err := scanFrames(r, func(line string) { tb.Errorf("fatal line %q", line) }, func(f frame) {
		if f.err != nil {
			tb.Fatal(f.err)
		}
		for _, o := range f.r.Objects {
			fn(toPartnership(o))
		}
	})
	if err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkListingDecode measures the client's CPU and allocations per
// partnership of a listing, from the WS-Man Receive answers (as received,
// after the transport) to Partnership values: everything easguard's own
// side does with a listing's output, without the network. Lines:
// listing_decode_ns_per_partnership (elapsed), _cpu_ns_per_partnership
// (this process's CPU: the decoding runs on two goroutines, and the
// elapsed time depends on what else the machine runs),
// _allocs_per_partnership and _bytes_per_partnership (allocated).
func BenchmarkListingDecode(b *testing.B) {
	bodies := benchReceiveBodies(benchListingOutput(b, benchPartnershipObjects(decodeBenchPartnerships), 500))
	if got := decodeListing(b, bodies); got != decodeBenchPartnerships {
		b.Fatalf("decoded %d partnerships, want %d", got, decodeBenchPartnerships)
	}
	b.ReportAllocs()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	cpu := telemetrytest.ProcessCPU(b)
	for b.Loop() {
		decodeListing(b, bodies)
	}
	cpu = telemetrytest.ProcessCPU(b) - cpu
	runtime.ReadMemStats(&after)
	n := float64(b.N) * decodeBenchPartnerships
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/n, "listing_decode_ns_per_partnership:ns")
	b.ReportMetric(float64(cpu.Nanoseconds())/n, "listing_decode_cpu_ns_per_partnership:ns")
	b.ReportMetric(float64(after.Mallocs-before.Mallocs)/n, "listing_decode_allocs_per_partnership:allocs")
	b.ReportMetric(float64(after.TotalAlloc-before.TotalAlloc)/n, "listing_decode_bytes_per_partnership:B")
}
