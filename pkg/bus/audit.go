package bus

import (
	"crypto/sha256"
	"encoding/hex"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// AuditOutbound records an operator action on easguard.<org>.audit.<action>
// (kept AuditMaxAge): who (actor) did what (action, to target), from
// where (source), when, and how it ended (outcome). The action is a
// subject token: lower-case words joined by hyphens.
func AuditOutbound(org Org, action, actor, source, target, outcome string, detail map[string]string, at time.Time) (Outbound, error) {
	subject, err := AuditRecorded.Subject(org, action)
	if err != nil {
		return Outbound{}, err
	}
	sum := sha256.Sum256([]byte(action + "\x00" + actor + "\x00" + target + "\x00" + at.UTC().Format(time.RFC3339Nano)))
	id := hex.EncodeToString(sum[:12])
	return Outbound{Subject: subject, MsgID: "audit:" + id, Message: &ev.AuditEvent{
		Org: string(org), AuditId: id, Action: action, Actor: actor, Source: source, Target: target, Outcome: outcome, Detail: detail, At: timestamppb.New(at),
	}}, nil
}
