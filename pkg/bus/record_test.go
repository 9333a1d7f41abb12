package bus

import (
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// TestRecordsDecodeAsProtoUnmarshalDoes: state records decode through
// their generated code (DecodeRecord), and must come out exactly as
// proto.Unmarshal makes them: maps, nested messages, timestamps, a field
// of a newer version kept as unknown, and a message decoded into after an
// earlier use left nothing behind.
func TestRecordsDecodeAsProtoUnmarshalDoes(t *testing.T) {
	at := timestamppb.New(time.Date(2026, 12, 7, 8, 30, 15, 123456789, time.UTC))
	phone := &ev.EASPartnership{DeviceId: "ApplF17XK2", DeviceType: "iPhone", DeviceAccessState: ev.DeviceAccessState_DEVICE_ACCESS_STATE_ALLOWED,
		Mailbox: &ev.Mailbox{Identity: "contoso.com/Users/Seán O'Brien", PrimarySmtpAddress: "sean@contoso.com"}, FirstSyncTime: at, Identity: "it's'; $(Stop-Computer)"}
	mdm := &ev.MDMDevice{MdmDeviceId: "4f1c", EasDeviceId: "ApplF17XK2", ComplianceState: ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT}
	observed := &ev.EASPartnershipObserved{Org: "contoso", Partnership: phone, ObservedAt: at, Change: ev.ObservationChange_OBSERVATION_CHANGE_NEW}
	newer := protowire.AppendTag(nil, 999, protowire.BytesType)
	newer = protowire.AppendBytes(newer, []byte("a field of a later version"))
	tests := []struct {
		name  string
		rec   proto.Message
		extra []byte // appended to the encoded record
		into  func() proto.Message
	}{
		{"device record", &ev.PartnershipIndex{ById: map[string]*ev.EASPartnershipObserved{"ApplF17XK2@sean": observed, "empty": {}},
			TraceparentById: map[string]string{"ApplF17XK2@sean": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
			MdmById:         map[string]*ev.MDMDevice{"4f1c": mdm}}, nil, func() proto.Message { return &ev.PartnershipIndex{} }},
		{"memory of mdm reports", &ev.MDMIndex{ById: map[string]*ev.MDMDevice{"4f1c": mdm}, ObservedAtById: map[string]*timestamppb.Timestamp{"4f1c": at},
			RemovedById: map[string]bool{"4f1c": true, "9a": false}}, nil, func() proto.Message { return &ev.MDMIndex{} }},
		{"decision with a field of a later version", &ev.DecisionRecord{Desired: ev.DesiredAccess_DESIRED_ACCESS_BLOCK, DecisionId: "d-1", DecidedAt: at,
			LastMatched: &ev.DeviceMatched{Org: "contoso", Observed: observed, Mdm: mdm, MatchedAt: at}, Held: true}, newer,
			func() proto.Message { return &ev.DecisionRecord{} }},
		{"decoded into a record in use", &ev.DecisionRecord{DecisionId: "d-2"}, nil,
			func() proto.Message {
				return &ev.DecisionRecord{Staged: true, Rule: "left over", LastMatched: &ev.DeviceMatched{Org: "x"}}
			}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := proto.Marshal(tc.rec)
			if err != nil {
				t.Fatal(err)
			}
			b = append(b, tc.extra...)
			want, got := tc.rec.ProtoReflect().New().Interface(), tc.into()
			if err := proto.Unmarshal(b, want); err != nil {
				t.Fatal(err)
			}
			if _, ok := got.(vtDecoder); !ok {
				t.Fatalf("%T has no generated decoder: run make proto", got)
			}
			if err := DecodeRecord(b, got); err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(got, want) {
				t.Fatalf("decoded\n%v\nproto.Unmarshal made\n%v", got, want)
			}
			if len(tc.extra) > 0 && len(got.ProtoReflect().GetUnknown()) == 0 {
				t.Fatal("the field of a later version was dropped; it must be kept, so that writing the record back keeps it")
			}
		})
	}
	if err := DecodeRecord([]byte{0xff}, &ev.DecisionRecord{}); err == nil {
		t.Fatal("decoding a truncated record succeeded")
	}
}
