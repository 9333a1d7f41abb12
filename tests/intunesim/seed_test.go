package intunesim_test

import (
	"math"
	"strings"
	"testing"

	"github.com/easguard/easguard/tests/exchangesim"
	"github.com/easguard/easguard/tests/intunesim"
)

// kindOf reads back what the seed made of a record.
func kindOf(d intunesim.Device) intunesim.Kind {
	switch {
	case d.ManagementState == "retireIssued":
		return intunesim.KindRetired
	case d.EASDeviceID == "":
		return intunesim.KindNoEASID
	case d.ComplianceState == "noncompliant":
		return intunesim.KindNoncompliant
	}
	return intunesim.KindCompliant
}

// TestSeedMatchesExchange starts exchangesim and intunesim with the same
// SeedSpec: every MDM record belongs to a partnership of the same user,
// and which partnerships got which record is exactly Classify's choice.
func TestSeedMatchesExchange(t *testing.T) {
	spec := exchangesim.SeedSpec{Mailboxes: 200, Partnerships: 300, Seed: 7, ChildDomainShare: 0.1}
	ex := exchangesim.StartTest(t, exchangesim.Config{Seed: &spec, CAS: []string{"EX01", "EX02"}})
	in := intunesim.StartTest(t, intunesim.Config{Seed: &spec})
	parts, err := ex.Org.Partnerships("")
	if err != nil {
		t.Fatal(err)
	}
	type key struct{ upn, easID string }
	exchange := map[key]bool{}
	want := map[intunesim.Kind]int{}
	wantNoEAS := map[string]int{} // per UPN
	for _, p := range parts {
		if p.DeviceType == "OWA" || strings.HasPrefix(p.Mailbox, "HealthMailbox") {
			continue
		}
		exchange[key{strings.ToLower(p.UPN), p.DeviceID}] = true
		k := intunesim.Classify(spec.Seed, intunesim.DefaultMix(), p.UPN, p.DeviceType, p.DeviceID)
		want[k]++
		if k == intunesim.KindNoEASID {
			wantNoEAS[strings.ToLower(p.UPN)]++
		}
	}
	got := map[intunesim.Kind]int{}
	gotNoEAS := map[string]int{}
	for _, d := range in.Devices() {
		k := kindOf(d)
		got[k]++
		if k == intunesim.KindNoEASID {
			gotNoEAS[strings.ToLower(d.UserPrincipalName)]++
			continue
		}
		if !exchange[key{strings.ToLower(d.UserPrincipalName), d.EASDeviceID}] {
			t.Errorf("MDM record %s (%s, %s) has no partnership of that user in Exchange", d.ID, d.UserPrincipalName, d.EASDeviceID)
		}
		if d.EmailAddress == "" || !d.EASActivated || d.ManagementAgent != "easMdm" {
			t.Errorf("record %+v", d)
		}
	}
	for _, k := range []intunesim.Kind{intunesim.KindCompliant, intunesim.KindNoncompliant, intunesim.KindRetired, intunesim.KindNoEASID} {
		if got[k] != want[k] {
			t.Errorf("%s: %d records, Classify says %d", k, got[k], want[k])
		}
	}
	for upn, n := range wantNoEAS {
		if gotNoEAS[upn] != n {
			t.Errorf("%s: %d records without EAS id, want %d", upn, gotNoEAS[upn], n)
		}
	}
	if got[intunesim.KindCompliant] == 0 || want[intunesim.KindNotEnrolled] == 0 {
		t.Fatalf("a degenerate seed: %v", want)
	}
	t.Logf("partnerships %d: %v", len(exchange), want)

	// The same spec gives the same records.
	again := intunesim.StartTest(t, intunesim.Config{Seed: &spec})
	a, b := in.Devices(), again.Devices()
	if len(a) != len(b) {
		t.Fatalf("%d vs %d records", len(a), len(b))
	}
	for i := range a {
		if a[i].ID != b[i].ID || a[i].EASDeviceID != b[i].EASDeviceID || a[i].ComplianceState != b[i].ComplianceState || a[i].UserID != b[i].UserID {
			t.Fatalf("record %d differs: %+v vs %+v", i, a[i], b[i])
		}
	}
	// A device enrolled later for a seeded user has that user's userId.
	nd, err := in.Enrol(intunesim.Device{UserPrincipalName: a[0].UserPrincipalName, EASDeviceID: "NewPhone1"})
	if err != nil || nd.UserID != a[0].UserID {
		t.Fatalf("enrolled %+v (%v), want userId %s", nd, err, a[0].UserID)
	}
	// Retired records carry the pending retire.
	for _, d := range a {
		if d.ManagementState == "retireIssued" && (len(d.DeviceActionResults) != 1 || d.DeviceActionResults[0].ActionName != "retire") {
			t.Fatalf("retired record %+v", d)
		}
	}
}

func TestMixShares(t *testing.T) {
	spec := exchangesim.SeedSpec{Mailboxes: 3000, Partnerships: 6000, Seed: 3, NoHostile: true}
	s := intunesim.StartTest(t, intunesim.Config{Seed: &spec})
	n := map[intunesim.Kind]int{}
	for _, d := range s.Devices() {
		n[kindOf(d)]++
	}
	eligible := 0
	for _, v := range []int{n[intunesim.KindCompliant], n[intunesim.KindNoncompliant], n[intunesim.KindRetired], n[intunesim.KindNoEASID]} {
		eligible += v
	}
	// About 6000 partnerships less OWA clients; 85% of them enrolled.
	if share := float64(eligible) / 6000; math.Abs(share-0.85*0.99) > 0.03 {
		t.Errorf("enrolled share %.3f", share)
	}
	mix := intunesim.DefaultMix()
	for k, want := range map[intunesim.Kind]float64{intunesim.KindCompliant: mix.Compliant, intunesim.KindNoncompliant: mix.Noncompliant,
		intunesim.KindRetired: mix.Retired, intunesim.KindNoEASID: mix.NoEASID} {
		if got := float64(n[k]) / float64(eligible) * 0.85; math.Abs(got-want) > 0.02 {
			t.Errorf("%s: share %.3f, want %.2f", k, got, want)
		}
	}

	// A custom mix: everyone compliant.
	all := intunesim.StartTest(t, intunesim.Config{Seed: &exchangesim.SeedSpec{Mailboxes: 10, Partnerships: 40, Seed: 3, NoHostile: true}, Mix: &intunesim.Mix{Compliant: 1}})
	for _, d := range all.Devices() {
		if kindOf(d) != intunesim.KindCompliant {
			t.Fatalf("record %+v", d)
		}
	}
	if _, err := intunesim.Start(intunesim.Config{Mix: &intunesim.Mix{Compliant: 0.9, Noncompliant: 0.2}}); err == nil {
		t.Fatal("a mix over 1 accepted")
	}
	// EASIDCase spells the ids as asked.
	up := intunesim.StartTest(t, intunesim.Config{Seed: &exchangesim.SeedSpec{Mailboxes: 10, Partnerships: 40, Seed: 3, NoHostile: true}, EASIDCase: "upper"})
	for _, d := range up.Devices() {
		if d.EASDeviceID != strings.ToUpper(d.EASDeviceID) {
			t.Fatalf("EAS id %q not upper case", d.EASDeviceID)
		}
	}
}
