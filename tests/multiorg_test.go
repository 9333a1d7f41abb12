package tests

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/easguard/easguard/pkg/bus"
	ev "github.com/easguard/easguard/proto/easguard/v1"
	"github.com/easguard/easguard/tests/exchangesim"
)

// Two organisations share one NATS server, each with its own worker set,
// its own Exchange and its own MDM. The same phone (one EAS device id) is
// enrolled and compliant in contoso's MDM but unknown to fabrikam's: it is
// allowed on contoso's Exchange and blocked on fabrikam's. Neither worker
// set touches the other's Exchange, mails the other's users, consumes the
// other's subjects or writes a state key outside its own organisation.
func TestTwoOrganisationsOnOneNATSNeverMeet(t *testing.T) {
	a := startStack(t, stackOptions{})
	b := startStack(t, stackOptions{natsURL: a.natsAddr, org: "fabrikam",
		sim: func(c *exchangesim.Config) { c.OrgName, c.Domain = "Fabrikam", "fabrikam.com" }})
	a.waitFullSync()
	b.waitFullSync()

	const shared, other = "ApplTWOORG00001", "ApplTWOORG00002"
	aliceA, bobA := iPhone("alice@contoso.com", shared), iPhone("bob@contoso.com", other)
	aliceB, carolB := iPhone("alice@fabrikam.com", shared), iPhone("carol@fabrikam.com", "ApplTWOORG00003")
	a.writeInventory(compliant("mdm-a-1", "alice@contoso.com", shared))
	b.writeInventory(compliant("mdm-b-3", "carol@fabrikam.com", carolB.DeviceID))
	waitEvent(t, a.events, "contoso's MDM record", func(m *ev.MDMDeviceChanged) bool { return m.GetDevice().GetEasDeviceId() == shared })
	waitEvent(t, b.events, "fabrikam's MDM record", func(m *ev.MDMDeviceChanged) bool { return m.GetDevice().GetEasDeviceId() == carolB.DeviceID })
	for _, p := range []struct {
		s *stack
		p exchangesim.Phone
	}{{a, aliceA}, {a, bobA}, {b, aliceB}, {b, carolB}} {
		p.s.phoneSync(p.p)
	}
	a.waitPhone(aliceA, "Allowed", 60*time.Second)
	a.waitPhone(bobA, "Blocked", 60*time.Second)
	b.waitPhone(aliceB, "Blocked", 60*time.Second)
	b.waitPhone(carolB, "Allowed", 60*time.Second)
	waitEvent(t, a.events, "bob mailed", func(m *ev.NotificationSent) bool { return m.GetDeviceId() == other })
	waitEvent(t, b.events, "fabrikam's alice mailed", func(m *ev.NotificationSent) bool { return m.GetDeviceId() == shared })
	a.settle()
	b.settle()

	// Exchange: each simulator saw only its own organisation's mailboxes.
	for _, tt := range []struct {
		name         string
		s            *stack
		domain, not  string
		allow, block []string
	}{
		{"contoso", a, "@contoso.com", "fabrikam", []string{shared}, []string{other}},
		{"fabrikam", b, "@fabrikam.com", "contoso", []string{carolB.DeviceID}, []string{shared}},
	} {
		t.Run(tt.name+" Exchange", func(t *testing.T) {
			writes := 0
			for _, r := range tt.s.sim.Recorder.Records("cmdlet") {
				if strings.Contains(strings.ToLower(string(r.Params)), tt.not) {
					t.Errorf("%s's Exchange got %s %s", tt.name, r.Cmdlet, r.Params)
				}
				if r.Cmdlet == "Set-CASMailbox" && r.OK {
					writes++
				}
			}
			if writes != len(tt.allow)+len(tt.block) {
				t.Errorf("%d Set-CASMailbox calls, want %d", writes, len(tt.allow)+len(tt.block))
			}
			var allowed, blocked []string
			for _, mb := range tt.s.sim.Org.Mailboxes() {
				al, bl, err := tt.s.sim.Org.Lists(mb.PrimarySMTP)
				if err != nil {
					t.Fatal(err)
				}
				allowed, blocked = append(allowed, al...), append(blocked, bl...)
			}
			if strings.Join(allowed, ",") != strings.Join(tt.allow, ",") || strings.Join(blocked, ",") != strings.Join(tt.block, ",") {
				t.Errorf("allowed %v, blocked %v; want %v and %v", allowed, blocked, tt.allow, tt.block)
			}
			for _, m := range tt.s.smtp.Messages() {
				for _, to := range m.To {
					if !strings.HasSuffix(strings.ToLower(to), tt.domain) {
						t.Errorf("%s's mailer wrote to %s", tt.name, to)
					}
				}
			}
		})
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	js := a.svc.JS

	// Subjects: every message in the pipeline's streams is on its own
	// organisation's subject and says so inside; both organisations
	// published; every consumer of an organisation filters on its subjects.
	t.Run("subjects", func(t *testing.T) {
		for _, stream := range []string{bus.StreamEAS, bus.StreamMDM, bus.StreamMatch, bus.StreamDecisions, bus.StreamApplied, bus.StreamNotify} {
			s, err := js.Stream(ctx, stream)
			if err != nil {
				t.Fatal(err)
			}
			perOrg := map[string]int{}
			for seq := s.CachedInfo().State.FirstSeq; seq <= s.CachedInfo().State.LastSeq; seq++ {
				m, err := s.GetMsg(ctx, seq)
				if err != nil {
					continue // deleted
				}
				org := strings.Split(m.Subject, ".")[1]
				perOrg[org]++
				if inside := orgInside(t, m); inside != "" && inside != org {
					t.Errorf("%s: %s carries an event of %s", stream, m.Subject, inside)
				}
			}
			if perOrg["contoso"] == 0 || perOrg["fabrikam"] == 0 || len(perOrg) != 2 {
				t.Errorf("%s: messages per organisation %v", stream, perOrg)
			}
			cons := s.ListConsumers(ctx)
			for ci := range cons.Info() {
				org := ci.Config.Metadata["easguard.org"]
				if org == "" {
					continue // a consumer of every organisation, such as the dead-letter mover's
				}
				for _, f := range append([]string{ci.Config.FilterSubject}, ci.Config.FilterSubjects...) {
					if f != "" && !strings.HasPrefix(f, "easguard."+org+".") {
						t.Errorf("%s: consumer %s of %s filters on %s", stream, ci.Name, org, f)
					}
				}
			}
			if err := cons.Err(); err != nil {
				t.Fatal(err)
			}
		}
	})

	// State: every key of every state bucket belongs to one organisation,
	// both have keys, and the shared device id has a state of its own in
	// each: allowed in contoso, blocked in fabrikam.
	t.Run("state", func(t *testing.T) {
		for _, bucket := range bus.StateBuckets {
			kv, err := js.KeyValue(ctx, bucket)
			if err != nil {
				t.Fatal(err)
			}
			keys, err := kv.ListKeys(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for k := range keys.Keys() {
				if !strings.HasPrefix(k, "contoso.") && !strings.HasPrefix(k, "fabrikam.") {
					t.Errorf("%s: key %s belongs to no organisation", bucket, k)
				}
			}
		}
		decisions, err := js.KeyValue(ctx, bus.BucketDecisions)
		if err != nil {
			t.Fatal(err)
		}
		for org, want := range map[string]ev.DesiredAccess{"contoso": ev.DesiredAccess_DESIRED_ACCESS_ALLOW, "fabrikam": ev.DesiredAccess_DESIRED_ACCESS_BLOCK} {
			keys, err := decisions.ListKeys(ctx, jetstream.MetaOnly())
			if err != nil {
				t.Fatal(err)
			}
			found := 0
			for k := range keys.Keys() {
				if !strings.HasPrefix(k, org+"."+strings.ToLower(shared)) && !strings.HasPrefix(k, org+"."+shared) {
					continue
				}
				rec, ok, err := bus.Load[ev.DecisionRecord](ctx, decisions, k)
				if err != nil || !ok {
					t.Fatalf("%s: %v %v", k, ok, err)
				}
				if rec.GetDesired() != want {
					t.Errorf("%s: %s, want %s", k, rec.GetDesired(), want)
				}
				found++
			}
			if found != 1 {
				t.Errorf("%d decisions of %s for the shared device id", found, org)
			}
		}
		leases, err := js.KeyValue(ctx, bus.BucketLeases)
		if err != nil {
			t.Fatal(err)
		}
		for _, org := range []string{"contoso", "fabrikam"} {
			if _, err := leases.Get(ctx, "collector."+org); err != nil {
				t.Errorf("collector lease of %s: %v", org, err)
			}
		}
	})
}

// orgInside returns the org an event names in its payload, if it names one.
func orgInside(t *testing.T, m *jetstream.RawStreamMsg) string {
	t.Helper()
	mt, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(m.Header.Get(bus.HeaderType)))
	if err != nil {
		return ""
	}
	msg := mt.New().Interface()
	if err := proto.Unmarshal(m.Data, msg); err != nil {
		t.Errorf("%s: %v", m.Subject, err)
		return ""
	}
	if o, ok := msg.(interface{ GetOrg() string }); ok {
		return o.GetOrg()
	}
	return ""
}
