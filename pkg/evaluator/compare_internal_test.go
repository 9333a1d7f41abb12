package evaluator

import (
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

func TestEqualExceptAndShallowCopy(t *testing.T) {
	base := func() *ev.DecisionRecord {
		return &ev.DecisionRecord{DecisionId: "d1", Desired: ev.DesiredAccess_DESIRED_ACCESS_ALLOW, Rule: "compliant",
			ConfirmedAt: timestamppb.New(time.Unix(100, 0)), Traceparent: "tp",
			LastMatched: &ev.DeviceMatched{Org: "contoso", Detail: "x", Mdm: &ev.MDMDevice{MdmDeviceId: "m1"}}}
	}
	skip := []string{"last_matched", "confirmed_at", "traceparent"}
	for _, tc := range []struct {
		name  string
		edit  func(*ev.DecisionRecord)
		equal bool
	}{
		{"the same", func(*ev.DecisionRecord) {}, true},
		{"skipped fields differ", func(r *ev.DecisionRecord) {
			r.ConfirmedAt, r.Traceparent, r.LastMatched = nil, "other", &ev.DeviceMatched{Detail: "y"}
		}, true},
		{"a scalar differs", func(r *ev.DecisionRecord) { r.Rule = "unknown_device" }, false},
		{"an enum differs", func(r *ev.DecisionRecord) { r.Desired = ev.DesiredAccess_DESIRED_ACCESS_BLOCK }, false},
		{"a message set on one side", func(r *ev.DecisionRecord) { r.DecidedAt = timestamppb.New(time.Unix(5, 0)) }, false},
		{"a nested field differs", func(r *ev.DecisionRecord) { r.LastDecision = &ev.AccessDecided{DecisionId: "d1"} }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := base(), base()
			tc.edit(b)
			names := make([]protoreflect.Name, len(skip))
			for i, s := range skip {
				names[i] = protoreflect.Name(s)
			}
			if got := equalExcept(a, b, names...); got != tc.equal {
				t.Fatalf("equalExcept = %v, want %v", got, tc.equal)
			}
		})
	}
	t.Run("a shallow copy keeps the record as read", func(t *testing.T) {
		r := base()
		before := shallowCopy(r)
		r.Rule, r.LastMatched = "changed", nil
		if before.GetRule() != "compliant" || before.GetLastMatched().GetDetail() != "x" || before.GetConfirmedAt().AsTime() != time.Unix(100, 0).UTC() {
			t.Fatalf("copy %v", before)
		}
	})
	t.Run("verdicts equal but for when and why", func(t *testing.T) {
		a := &ev.DeviceMatched{Org: "contoso", Detail: "x", MatchedAt: timestamppb.New(time.Unix(1, 0)), Trigger: "eas",
			Observed: &ev.EASPartnershipObserved{Partnership: &ev.EASPartnership{DeviceId: "d"}, ObservedAt: timestamppb.New(time.Unix(1, 0)),
				Change: ev.ObservationChange_OBSERVATION_CHANGE_NEW, Sync: &ev.SyncRef{SyncId: "s1"}}}
		b := &ev.DeviceMatched{Org: "contoso", Detail: "x", MatchedAt: timestamppb.New(time.Unix(2, 0)), Trigger: "mdm",
			Observed: &ev.EASPartnershipObserved{Partnership: &ev.EASPartnership{DeviceId: "d"}, ObservedAt: timestamppb.New(time.Unix(2, 0)),
				Change: ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED, Sync: &ev.SyncRef{SyncId: "s2"}}}
		if !sameVerdictInput(a, b) {
			t.Fatal("same verdict input reported different")
		}
		b.Observed.Partnership.DeviceOs = "iOS 18"
		if sameVerdictInput(a, b) {
			t.Fatal("a changed partnership reported the same")
		}
	})
}

// sameVerdictInputReference is sameVerdictInput as first written, through
// protoreflect: the oracle the faster one is held to.
func sameVerdictInputReference(a, b *ev.DeviceMatched) bool {
	if a == nil || b == nil {
		return false
	}
	if !equalExcept(a, b, "matched_at", "trigger", "observed") {
		return false
	}
	oa, ob := a.GetObserved(), b.GetObserved()
	if (oa == nil) != (ob == nil) {
		return false
	}
	return oa == nil || equalExcept(oa, ob, "observed_at", "sync", "change")
}

// TestSameVerdictInputMatchesReflection varies every field of a verdict in
// turn, down to its partnership's, mailbox's and MDM record's own (cleared,
// or given another value), and unknown fields at each level, and checks
// that sameVerdictInput says of each pair what the reflective comparison
// says. A field added to any of these messages is varied too.
func TestSameVerdictInputMatchesReflection(t *testing.T) {
	base := &ev.DeviceMatched{}
	populate(base.ProtoReflect(), 0)
	if !sameVerdictInput(base, proto.Clone(base).(*ev.DeviceMatched)) {
		t.Fatal("a verdict and its clone reported different")
	}
	same, different := 0, 0
	for _, v := range verdictVariants(base) {
		want := sameVerdictInputReference(base, v.m)
		if got, back := sameVerdictInput(base, v.m), sameVerdictInput(v.m, base); got != want || back != want {
			t.Errorf("%s: sameVerdictInput %v (and the other way round %v), the reflective comparison %v", v.name, got, back, want)
		}
		if want {
			same++
		} else {
			different++
		}
	}
	// The skipped fields (when and why) make pairs that are the same; the
	// rest, different ones.
	if same < 6 || different < 40 {
		t.Fatalf("%d variants the same and %d different: the variants do not reach the fields", same, different)
	}
}

type verdictVariant struct {
	name string
	m    *ev.DeviceMatched
}

// verdictVariants returns copies of base that each differ in one field or
// in their unknown fields, to three levels of nesting.
func verdictVariants(base *ev.DeviceMatched) []verdictVariant {
	var out []verdictVariant
	vary := func(name string, path []protoreflect.FieldDescriptor, edit func(parent protoreflect.Message)) {
		c := proto.Clone(base).(*ev.DeviceMatched)
		parent := c.ProtoReflect()
		for _, f := range path {
			parent = parent.Mutable(f).Message()
		}
		edit(parent)
		out = append(out, verdictVariant{name, c})
	}
	var walk func(path []protoreflect.FieldDescriptor, md protoreflect.MessageDescriptor, depth int)
	walk = func(path []protoreflect.FieldDescriptor, md protoreflect.MessageDescriptor, depth int) {
		prefix := ""
		for _, f := range path {
			prefix += string(f.Name()) + "."
		}
		vary(prefix+"unknown fields", path, func(m protoreflect.Message) {
			m.SetUnknown(protowire.AppendVarint(protowire.AppendTag(nil, 999, protowire.VarintType), 1))
		})
		fields := md.Fields()
		for i := range fields.Len() {
			fd := fields.Get(i)
			vary(prefix+string(fd.Name())+" cleared", path, func(m protoreflect.Message) { m.Clear(fd) })
			vary(prefix+string(fd.Name())+" changed", path, func(m protoreflect.Message) { change(m, fd) })
			if fd.Message() != nil && !fd.IsList() && !fd.IsMap() && depth < 3 {
				walk(append(slices.Clone(path), fd), fd.Message(), depth+1)
			}
		}
	}
	walk(nil, base.ProtoReflect().Descriptor(), 0)
	return out
}

// populate sets every field of m, to three levels of nesting.
func populate(m protoreflect.Message, depth int) {
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		switch {
		case fd.IsList():
			l := m.Mutable(fd).List()
			l.Append(value(fd, fd.Kind(), "1", depth, l.NewElement))
		case fd.IsMap():
			mp := m.Mutable(fd).Map()
			mp.Set(value(fd.MapKey(), fd.MapKey().Kind(), "k1", depth, nil).MapKey(), value(fd.MapValue(), fd.MapValue().Kind(), "1", depth, mp.NewValue))
		case fd.Message() != nil && depth >= 3:
		default:
			m.Set(fd, value(fd, fd.Kind(), "1", depth, func() protoreflect.Value { return m.NewField(fd) }))
		}
	}
}

// value is a value of kind for fd, one of a few told apart by v; a
// message is made by fresh and populated.
func value(fd protoreflect.FieldDescriptor, kind protoreflect.Kind, v string, depth int, fresh func() protoreflect.Value) protoreflect.Value {
	n := int64(len(v) + 6)
	switch kind {
	case protoreflect.StringKind:
		return protoreflect.ValueOfString(string(fd.Name()) + "-" + v)
	case protoreflect.BytesKind:
		return protoreflect.ValueOfBytes([]byte(v))
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(true)
	case protoreflect.EnumKind:
		vals := fd.Enum().Values()
		return protoreflect.ValueOfEnum(vals.Get(min(len(v), vals.Len()-1)).Number())
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return protoreflect.ValueOfInt32(int32(n))
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return protoreflect.ValueOfInt64(n)
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return protoreflect.ValueOfUint32(uint32(n))
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return protoreflect.ValueOfUint64(uint64(n))
	case protoreflect.FloatKind:
		return protoreflect.ValueOfFloat32(float32(n))
	case protoreflect.DoubleKind:
		return protoreflect.ValueOfFloat64(float64(n))
	}
	nested := fresh()
	populate(nested.Message(), depth+1)
	return nested
}

// change gives fd in m another value: another scalar, one element more,
// or an empty message in place of a populated one.
func change(m protoreflect.Message, fd protoreflect.FieldDescriptor) {
	switch {
	case fd.IsList():
		l := m.Mutable(fd).List()
		l.Append(value(fd, fd.Kind(), "22", 3, l.NewElement))
	case fd.IsMap():
		mp := m.Mutable(fd).Map()
		mp.Set(value(fd.MapKey(), fd.MapKey().Kind(), "k22", 3, nil).MapKey(), value(fd.MapValue(), fd.MapValue().Kind(), "22", 3, mp.NewValue))
	case fd.Message() != nil:
		m.Set(fd, m.NewField(fd))
	case fd.Kind() == protoreflect.BoolKind:
		m.Clear(fd)
	default:
		m.Set(fd, value(fd, fd.Kind(), "22", 3, nil))
	}
}

// BenchmarkSameVerdictInput compares a verdict with an equal one, as a
// steady full sync does for every partnership: through protoreflect (the
// reference) and as sameVerdictInput does.
func BenchmarkSameVerdictInput(b *testing.B) {
	a := &ev.DeviceMatched{}
	populate(a.ProtoReflect(), 0)
	c := proto.Clone(a).(*ev.DeviceMatched)
	for _, bc := range []struct {
		name string
		same func(a, b *ev.DeviceMatched) bool
	}{{"reflection", sameVerdictInputReference}, {"encoding", sameVerdictInput}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for range b.N {
				if !bc.same(a, c) {
					b.Fatal("equal verdicts reported different")
				}
			}
		})
	}
}
