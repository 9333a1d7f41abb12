package exchange

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/masterzen/winrm"
)

// receiveBody is a ReceiveResponse with the given body content, declaring
// the shell namespace under prefix.
func receiveBody(prefix, content string) []byte {
	return []byte(`<s:Envelope xml:lang="en-US" xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" xmlns:` +
		prefix + `="` + nsShell + `"><s:Header><a:Action>` + nsShell + `/ReceiveResponse</a:Action></s:Header><s:Body><` + prefix + `:ReceiveResponse>` +
		strings.ReplaceAll(content, "rsp:", prefix+":") + `</` + prefix + `:ReceiveResponse></s:Body></s:Envelope>`)
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// Every Receive answer reads as the winrm library reads it: the same
// stdout, stderr, state and exit code, whatever the prefixes, however the
// output is split into streams and whatever else the answer holds.
func TestReceiveDecodeMatchesLibrary(t *testing.T) {
	long := strings.Repeat("EGF1 "+b64(`{"id":1,"objects":[{"DeviceId":"it's'; $(Stop-Computer)"}]}`)+"\n", 40)
	running := `<rsp:CommandState CommandId="C" State="` + nsShell + `/CommandState/Running"></rsp:CommandState>`
	done := func(code string) string {
		return `<rsp:Stream Name="stdout" CommandId="C" End="true"></rsp:Stream><rsp:Stream Name="stderr" CommandId="C" End="true"></rsp:Stream>` +
			`<rsp:CommandState CommandId="C" State="` + nsShell + `/CommandState/Done">` + code + `</rsp:CommandState>`
	}
	stream := func(name, data string) string {
		return `<rsp:Stream Name="` + name + `" CommandId="C">` + b64(data) + `</rsp:Stream>`
	}
	cases := map[string][]byte{
		"long stdout":              receiveBody("rsp", stream("stdout", long)+running),
		"other prefix":             receiveBody("sh", stream("stdout", long)+running),
		"stdout and stderr":        receiveBody("rsp", stream("stdout", long)+stream("stderr", "oops\n")+stream("stdout", "short\n")+running),
		"done":                     receiveBody("rsp", stream("stdout", long)+done(`<rsp:ExitCode>3</rsp:ExitCode>`)),
		"done without exit code":   receiveBody("rsp", done("")),
		"done, exit code not int":  receiveBody("rsp", done(`<rsp:ExitCode>x</rsp:ExitCode>`)),
		"empty":                    receiveBody("rsp", running),
		"comment and CDATA":        receiveBody("rsp", `<!-- >`+b64(long)+`< -->`+`<rsp:Stream Name="stdout" CommandId="C"><![CDATA[`+b64(long)+`]]></rsp:Stream>`+running),
		"stream in other ns":       receiveBody("rsp", `<x:Stream xmlns:x="urn:other" Name="stdout">`+b64(long)+`</x:Stream>`+stream("stdout", "mine\n")+running),
		"a star in the answer":     receiveBody("rsp", stream("stdout", long)+`<rsp:Stream Name="other">*0*</rsp:Stream>`+stream("stdout", long)+running),
		"entity in the text":       receiveBody("rsp", `<rsp:Stream Name="stdout" CommandId="C">`+b64(long)[:400]+`&#65;&#65;&#61;&#61;</rsp:Stream>`+running),
		"processing instruction":   append([]byte(`<?xml version="1.0" encoding="utf-8"?>`), receiveBody("rsp", stream("stdout", long)+running)...),
		"named stream not in list": receiveBody("rsp", stream("stdin", long)+stream("stdout", "x\n")+running),
	}
	for name, body := range cases {
		t.Run(name, func(t *testing.T) {
			var wantOut, wantErr bytes.Buffer
			wantDone, wantCode, err := winrm.ParseSlurpOutputErrResponse(string(body), &wantOut, &wantErr)
			if err != nil {
				t.Fatalf("library: %v", err)
			}
			var o receiveOutput
			// Twice: the buffers are reused from one answer to the next.
			for range 2 {
				if err := o.decode(body); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(o.stdout, wantOut.Bytes()) || !bytes.Equal(o.stderr, wantErr.Bytes()) || o.done != wantDone || o.exitCode != wantCode {
					t.Fatalf("got stdout %d bytes, stderr %q, done %v, exit %d; the library %d bytes, %q, %v, %d",
						len(o.stdout), o.stderr, o.done, o.exitCode, wantOut.Len(), wantErr.Bytes(), wantDone, wantCode)
				}
			}
		})
	}
}

// Output that is not base64, and an answer that is not XML, fail the
// command's output (the library kept what it could decode).
func TestReceiveDecodeRefusesWhatIsNotOutput(t *testing.T) {
	for name, body := range map[string][]byte{
		"not base64": receiveBody("rsp", `<rsp:Stream Name="stdout" CommandId="C">`+strings.Repeat("QUJD", 50)+`!!!!</rsp:Stream>`),
		"not XML":    []byte(`<s:Envelope><rsp:Stream Name="stdout">` + strings.Repeat("QUJD", 50) + `</rsp:Stream>`),
		"a marker":   receiveBody("rsp", `<rsp:Stream Name="stdout" CommandId="C">`+strings.Repeat("QUJD", 50)+`</rsp:Stream><rsp:Stream Name="stdout" CommandId="C">*0*</rsp:Stream>`),
	} {
		var o receiveOutput
		if err := o.decode(body); !errors.Is(err, ErrTransient) {
			t.Errorf("%s: %v, want ErrTransient", name, err)
		}
	}
}

// decodeFrameAsBefore decodes a frame as DecodeFrame did before the
// objects were decoded as plain values: straight into a Response.
func decodeFrameAsBefore(line string) (Response, error) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(strings.TrimRight(line, "\r\n"), FrameSentinel))
	if err != nil {
		return Response{}, err
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var r Response
	err = dec.Decode(&r)
	return r, err
}

// A frame decodes to the Response encoding/json makes of it, and a frame
// that is not one fails with encoding/json's error. One decoder reads
// every frame, as one worker's are read, so what a frame leaves behind
// (trailing text, an error) must not reach the next.
func TestFrameDecoderMatchesJSON(t *testing.T) {
	frames := []string{
		`{"id":3,"page":1,"objects":[{"DeviceId":"a\"b$(x)","n":12345678901234567890,"f":1.5,"l":["x",null,{"k":true}],"o":{"p":null}},null,{}]}`,
		`{"id":3,"done":true,"ok":false,"count":2,"objects":[],"errors":[{"message":"m","category":"c","reason":"r","fqid":"f","target":null}],"warnings":["w"]}`,
		`{"id":4,"done":true,"ok":true,"results":[{"ok":true,"count":1,"objects":[{"Identity":"İbrahim"}]},null,{"objects":null}]}`,
		`{"id":0,"done":true,"ok":true,"op":"ready","protocol":1,"ps":"5.1","pid":7,"host":"EX01"} trailing`,
		`{"ID":5,"Objects":[{"a":1}],"unknown":[1,2]}`,
	}
	bad := []string{
		`{"id":3,"objects":["x"]}`,
		`{"id":3,"objects":[{"a":1},7]}`,
		`{"id":4,"results":[{"objects":[true]}]}`,
		`{"id":"x","objects":[{}]}`,
		`{"id":3,"objects":{}}`,
		`{"id":3,"objects":[{}]`,
		`not json`,
	}
	var d frameDecoder
	for _, js := range slices.Concat(frames, bad, frames) {
		line := FrameSentinel + b64(js) + "\r\n"
		want, wantErr := decodeFrameAsBefore(line)
		got, ok, err := d.decode([]byte(line))
		if !ok {
			t.Fatalf("%s: not a frame", js)
		}
		if (err == nil) != (wantErr == nil) || err != nil && (!errors.Is(err, ErrBadFrame) || !strings.HasSuffix(err.Error(), wantErr.Error())) {
			t.Fatalf("%s: error %v, want %v", js, err, wantErr)
		}
		if err == nil && !deepEqualJSON(t, got, want) {
			t.Fatalf("%s: got %#v, want %#v", js, got, want)
		}
	}
	if _, ok, err := d.decode([]byte("a line of noise")); ok || err != nil {
		t.Fatalf("noise: %v %v", ok, err)
	}
	if _, _, err := d.decode([]byte(FrameSentinel + "!!")); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("bad base64: %v", err)
	}
}

// The decoder the frames share reads each frame's value whatever the frame
// before left: trailing text, a truncated value, a syntax error or a value
// that is not a Response. (decode would still answer right through its
// second decoding, so this asks decodeWire itself.)
func TestFrameDecoderRecoversBetweenFrames(t *testing.T) {
	good := `{"id":7,"page":2,"objects":[{"DeviceId":"d1"}]}`
	for _, before := range []string{
		good + " trailing",
		good + "\n {\"id\":8}",
		`{"id":3,"objects":[{}]`,
		`not json`,
		`{"id":"x"}`,
		good + "  \r\n",
		`{"id":1,"objects":[{"big":"` + strings.Repeat("x", maxFrameBuffer) + `"}]}`,
	} {
		var d frameDecoder
		var w wireResponse
		_ = d.decodeWire([]byte(before), &w)
		for i := range 2 {
			w = wireResponse{}
			if err := d.decodeWire([]byte(good), &w); err != nil {
				t.Fatalf("after %.40q, frame %d: %v", before, i+1, err)
			}
			if w.ID != 7 || len(w.Objects) != 1 {
				t.Fatalf("after %.40q, frame %d: decoded %+v", before, i+1, w)
			}
		}
	}
}

// deepEqualJSON compares two Responses, nil and empty slices apart.
func deepEqualJSON(t *testing.T, a, b Response) bool {
	t.Helper()
	ja, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	jb, err := json.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	nilsA := (a.Objects == nil) == (b.Objects == nil) && (a.Results == nil) == (b.Results == nil)
	return bytes.Equal(ja, jb) && nilsA
}

// A partnership's mailbox is the part of its identity before the devices
// container, byte for byte, whatever characters the owner's name holds.
func TestMailboxOf(t *testing.T) {
	for identity, want := range map[string]string{
		"contoso.com/Users/Alice/ExchangeActiveSyncDevices/iPhone§ApplX":                            "contoso.com/Users/Alice",
		"contoso.com/Users/İbrahim Yılmaz/ExchangeActiveSyncDevices/iPhone§ApplX":                   "contoso.com/Users/İbrahim Yılmaz",
		"contoso.com/Users/" + strings.Repeat("Ⱥ", 40) + "/ExchangeActiveSyncDevices/x":             "contoso.com/Users/" + strings.Repeat("Ⱥ", 40),
		"contoso.com/Users/Bob/exchangeactivesyncdevices/Android§android1":                          "contoso.com/Users/Bob",
		"contoso.com/Users/A/ExchangeActiveSyncDevices/B/EXCHANGEACTIVESYNCDEVICES/x":               "contoso.com/Users/A/ExchangeActiveSyncDevices/B",
		"contoso.com/Users/O'Brien, Seán/ExchangeActiveSyncDevices/Outlook§it's'; $(Stop-Computer)": "contoso.com/Users/O'Brien, Seán",
		"/ExchangeActiveSyncDevices/x":                      "",
		"contoso.com/Users/Carol/iPhone":                    "",
		"contoso.com/Users/Dan/ExchangeActiveSyncDevices":   "",
		"contoso.com/Users/Eve/ExchangeActiveSyncDeviceſ/x": "",
	} {
		got, ok := mailboxOf(identity)
		if got != want || ok != (want != "") {
			t.Errorf("mailboxOf(%q) = %q, %v; want %q", identity, got, ok, want)
		}
		if p := toPartnership(Object{"Identity": identity, "UserDisplayName": "shown"}); want != "" && p.Mailbox != want || want == "" && p.Mailbox != "shown" {
			t.Errorf("toPartnership(%q).Mailbox = %q", identity, p.Mailbox)
		}
	}
}

// An enum value reads the same through the exact spelling as through any
// other casing or its number.
func TestEnumNames(t *testing.T) {
	for _, v := range []any{"Quarantined", "quarantined", "QUARANTINED", "3", json.Number("3"), float64(3)} {
		if n, ok := enumAccessState.name(v); !ok || n != "Quarantined" {
			t.Errorf("%#v: %q, %v", v, n, ok)
		}
	}
	if n, ok := enumAccessState.name("Sideways"); ok || n != "Sideways" {
		t.Errorf("unknown name: %q, %v", n, ok)
	}
}

// The benchmark's recorded listing decodes to every partnership it holds,
// and encoding/xml sees none of its output.
func TestListingDecodeFixture(t *testing.T) {
	objs := benchPartnershipObjects(1100)
	bodies := benchReceiveBodies(benchListingOutput(t, objs, 500))
	var got []Partnership
	decodeListingTo(t, bodies, func(p Partnership) { got = append(got, p) })
	if len(got) != len(objs) {
		t.Fatalf("decoded %d partnerships, want %d", len(got), len(objs))
	}
	for i, p := range got {
		if p.DeviceID != objs[i]["DeviceId"] || p.Mailbox != objs[i]["UserDisplayName"] || p.Identity != objs[i]["Identity"] || p.AccessState != objs[i]["DeviceAccessState"] {
			t.Fatalf("partnership %d decoded as %+v from %v", i, p, objs[i])
		}
	}
	var o receiveOutput
	for _, body := range bodies {
		if o.cut(body); len(o.runs) != 1 || len(o.skeleton) > 2048 {
			t.Fatalf("an answer of %d bytes left a skeleton of %d bytes and %d runs", len(body), len(o.skeleton), len(o.runs))
		}
	}
}

// FuzzReceiveDecode feeds arbitrary Receive answers to decode: whatever it
// reads without an error is what the winrm library reads.
func FuzzReceiveDecode(f *testing.F) {
	long := b64(strings.Repeat("EGF1 "+b64(`{"id":1,"objects":[{"DeviceId":"x"}]}`)+"\n", 8))
	for _, content := range []string{
		`<rsp:Stream Name="stdout" CommandId="C">` + long + `</rsp:Stream><rsp:CommandState CommandId="C" State="` + nsShell + `/CommandState/Running"></rsp:CommandState>`,
		`<rsp:Stream Name="stderr">` + long + `</rsp:Stream><rsp:CommandState State="` + nsShell + `/CommandState/Done"><rsp:ExitCode>1</rsp:ExitCode></rsp:CommandState>`,
		`<rsp:Stream Name="stdout"><![CDATA[` + long + `]]></rsp:Stream>`,
		`<rsp:Stream Name="stdout">*0*</rsp:Stream><rsp:Stream Name="stdout">` + long + `</rsp:Stream>`,
		`<rsp:Stream Name="stdout"><?pi >` + long + `<?></rsp:Stream>`,
	} {
		f.Add(receiveBody("rsp", content))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var o receiveOutput
		if err := o.decode(body); err != nil {
			return
		}
		var stdout, stderr bytes.Buffer
		done, code, err := winrm.ParseSlurpOutputErrResponse(string(body), &stdout, &stderr)
		if err != nil {
			t.Fatalf("decoded an answer the library refuses (%v)", err)
		}
		if !bytes.Equal(o.stdout, stdout.Bytes()) || !bytes.Equal(o.stderr, stderr.Bytes()) || o.done != done || o.exitCode != code {
			t.Fatalf("got %q, %q, %v, %d; the library %q, %q, %v, %d", o.stdout, o.stderr, o.done, o.exitCode, stdout.Bytes(), stderr.Bytes(), done, code)
		}
	})
}
