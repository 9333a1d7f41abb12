package evaluator

import (
	"bytes"
	"sync"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// equalExcept reports whether two messages of one type are equal in every
// field but those named in skip (top-level field names), as proto.Equal
// would compare the rest. It compares in place: a full sync judges every
// partnership, and cloning two records to blank the skipped fields was a
// large share of what a pass allocated.
func equalExcept(a, b proto.Message, skip ...protoreflect.Name) bool {
	ma, mb := a.ProtoReflect(), b.ProtoReflect()
	if ma.IsValid() != mb.IsValid() || ma.Descriptor() != mb.Descriptor() {
		return false
	}
	if !ma.IsValid() {
		return true
	}
	fields := ma.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		if skipped(fd.Name(), skip) {
			continue
		}
		if ma.Has(fd) != mb.Has(fd) {
			return false
		}
		if ma.Has(fd) && !ma.Get(fd).Equal(mb.Get(fd)) {
			return false
		}
	}
	return len(ma.GetUnknown()) == len(mb.GetUnknown()) && string(ma.GetUnknown()) == string(mb.GetUnknown())
}

func skipped(name protoreflect.Name, skip []protoreflect.Name) bool {
	for _, s := range skip {
		if s == name {
			return true
		}
	}
	return false
}

// shallowCopy returns a new message whose fields are m's: nested messages,
// lists and maps are shared, not copied. It keeps a record as read for a
// comparison after a callback that only assigns fields, never changes a
// nested message in place, at the cost of a few pointers rather than a
// deep clone of the record's last verdict and decision.
func shallowCopy[M proto.Message](m M) M {
	src := m.ProtoReflect()
	dst := src.New()
	src.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		dst.Set(fd, v)
		return true
	})
	if u := src.GetUnknown(); len(u) > 0 {
		dst.SetUnknown(append(protoreflect.RawFields(nil), u...))
	}
	return dst.Interface().(M)
}

// sameEncoding reports whether two messages of one type are both absent,
// or both present and encoded to the same bytes (deterministically: map
// entries in order). For messages without floating-point fields, as
// easguard's are, that is proto.Equal, at a fraction of its cost: the
// generated encoder against a walk through protoreflect.
func sameEncoding[M proto.Message](a, b M) bool {
	ra, rb := a.ProtoReflect(), b.ProtoReflect()
	if ra.IsValid() != rb.IsValid() {
		return false
	}
	if !ra.IsValid() {
		return true
	}
	ba, bb := encodings.Get().(*[]byte), encodings.Get().(*[]byte)
	defer encodings.Put(ba)
	defer encodings.Put(bb)
	var err error
	if *ba, err = deterministic.MarshalAppend((*ba)[:0], a); err != nil {
		return false
	}
	if *bb, err = deterministic.MarshalAppend((*bb)[:0], b); err != nil {
		return false
	}
	return bytes.Equal(*ba, *bb)
}

// deterministic encodes maps in key order, so that equal messages encode
// alike.
var deterministic = proto.MarshalOptions{Deterministic: true}

// encodings holds sameEncoding's buffers between calls.
var encodings = sync.Pool{New: func() any { return new([]byte) }}

// sameUnknown reports whether two messages carry the same unknown fields.
func sameUnknown(a, b proto.Message) bool {
	return bytes.Equal(a.ProtoReflect().GetUnknown(), b.ProtoReflect().GetUnknown())
}
