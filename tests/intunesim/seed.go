package intunesim

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/easguard/easguard/tests/exchangesim"
)

// Mix says which share of an organisation's partnerships the MDM knows,
// and how. Shares are of all eligible partnerships (every partnership
// except OWA clients and the monitoring mailbox's probe); the rest, 1 minus
// the sum, have no MDM record ("not enrolled").
type Mix struct {
	// Compliant: enrolled, complianceState compliant, easDeviceId set.
	Compliant float64 `json:"compliant"`
	// Noncompliant: enrolled, complianceState noncompliant, easDeviceId set.
	Noncompliant float64 `json:"noncompliant"`
	// Retired: a retire was issued (managementState retireIssued, a
	// pending "retire" in deviceActionResults), complianceState still
	// compliant, easDeviceId set — a client must not take it as managed.
	Retired float64 `json:"retired"`
	// NoEASID: enrolled and compliant but without easDeviceId (easActivated
	// false), as Android Enterprise devices report; it cannot be matched
	// by EAS id.
	NoEASID float64 `json:"no_eas_id"`
}

// DefaultMix is 70% compliant, 10% noncompliant, 3% retired, 2% without
// an EAS id and 15% not enrolled.
func DefaultMix() Mix { return Mix{Compliant: 0.70, Noncompliant: 0.10, Retired: 0.03, NoEASID: 0.02} }

func (m Mix) validate() error {
	for _, v := range []float64{m.Compliant, m.Noncompliant, m.Retired, m.NoEASID} {
		if v < 0 || v > 1 {
			return fmt.Errorf("intunesim: mix shares must be between 0 and 1: %+v", m)
		}
	}
	if m.Compliant+m.Noncompliant+m.Retired+m.NoEASID > 1+1e-9 {
		return fmt.Errorf("intunesim: mix shares add up to more than 1: %+v", m)
	}
	return nil
}

// Kind is what the seed makes of one partnership.
type Kind string

// The kinds of Classify.
const (
	KindCompliant    Kind = "compliant"
	KindNoncompliant Kind = "noncompliant"
	KindRetired      Kind = "retired"
	KindNoEASID      Kind = "no_eas_id"
	KindNotEnrolled  Kind = "not_enrolled"
)

// kind maps u in [0,1) to a kind: the shares are laid out in the order
// compliant, noncompliant, retired, no EAS id, not enrolled.
func (m Mix) kind(u float64) Kind {
	switch {
	case u < m.Compliant:
		return KindCompliant
	case u < m.Compliant+m.Noncompliant:
		return KindNoncompliant
	case u < m.Compliant+m.Noncompliant+m.Retired:
		return KindRetired
	case u < m.Compliant+m.Noncompliant+m.Retired+m.NoEASID:
		return KindNoEASID
	}
	return KindNotEnrolled
}

// partnershipHash is the seed's randomness for one partnership: a pure
// function of the seed, the user and the device, so a partnership's fate
// does not depend on the others (a larger organisation keeps the smaller
// one's choices for the partnerships they share).
func partnershipHash(seed uint64, upn, deviceType, deviceID string) [32]byte {
	h := sha256.New()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], seed)
	h.Write(b[:])
	h.Write([]byte(strings.ToLower(upn)))
	h.Write([]byte{0})
	h.Write([]byte(strings.ToLower(deviceType)))
	h.Write([]byte{0})
	h.Write([]byte(deviceID))
	var out [32]byte
	h.Sum(out[:0])
	return out
}

func unitFloat(b []byte) float64 {
	return float64(binary.BigEndian.Uint64(b)>>11) / (1 << 53)
}

// Classify returns what a seed with this seed number and mix makes of the
// partnership of device (deviceType, deviceID) in the mailbox with this
// UPN. The simulator's seeded records follow it exactly, so a test or the
// demo can predict them without starting a simulator.
func Classify(seed uint64, mix Mix, upn, deviceType, deviceID string) Kind {
	h := partnershipHash(seed, upn, deviceType, deviceID)
	return mix.kind(unitFloat(h[:8]))
}

// guidFrom formats 16 bytes as a lower-case version-4 GUID.
func guidFrom(b []byte) string {
	var g [16]byte
	copy(g[:], b)
	g[6] = g[6]&0x0f | 0x40
	g[8] = g[8]&0x3f | 0x80
	var out [36]byte
	hex.Encode(out[0:8], g[0:4])
	out[8] = '-'
	hex.Encode(out[9:13], g[4:6])
	out[13] = '-'
	hex.Encode(out[14:18], g[6:8])
	out[18] = '-'
	hex.Encode(out[19:23], g[8:10])
	out[23] = '-'
	hex.Encode(out[24:36], g[10:16])
	return string(out[:])
}

// userID is the Entra object id the simulator gives a user.
func userID(seed uint64, upn string) string {
	h := sha256.Sum256([]byte("user|" + strconv.FormatUint(seed, 10) + "|" + strings.ToLower(upn)))
	return guidFrom(h[:16])
}

// splitOS turns Exchange's DeviceOS ("iOS 17.4 21F61", "Android 14.0.0")
// into Intune's operatingSystem and osVersion.
func splitOS(deviceOS string) (string, string) {
	f := strings.Fields(deviceOS)
	switch len(f) {
	case 0:
		return "Unknown", ""
	case 1:
		return f[0], ""
	}
	return f[0], f[1]
}

func manufacturerOf(os, model string) string {
	switch {
	case os == "iOS" || os == "iPadOS" || strings.HasPrefix(model, "iPhone") || strings.HasPrefix(model, "iPad"):
		return "Apple"
	case strings.HasPrefix(model, "SM-") || strings.HasPrefix(model, "GT-"):
		return "samsung"
	case strings.HasPrefix(model, "Pixel"):
		return "Google"
	case os == "Windows":
		return "Microsoft Corporation"
	}
	return "Unknown"
}

// seedPartner is the part of a partnership the seed needs.
type seedPartner struct {
	upn, smtp, display, alias       string
	deviceType, deviceID, model, os string
	friendly                        string
	firstSync                       time.Time
}

// seedOrg builds the organisation exchangesim builds for spec (same
// generator, same seed, same domain) and returns its eligible
// partnerships in the organisation's order.
func seedOrg(spec exchangesim.SeedSpec, domain string) ([]seedPartner, error) {
	org := exchangesim.NewOrg("Contoso", domain)
	if err := exchangesim.Seed(org, spec); err != nil {
		return nil, err
	}
	var out []seedPartner
	for _, m := range org.Mailboxes() {
		if m.Monitoring {
			continue
		}
		for _, d := range m.Devices {
			if d.ClientType != "EAS" || strings.EqualFold(d.DeviceType, "OWA") {
				continue
			}
			out = append(out, seedPartner{
				upn: m.UPN, smtp: m.PrimarySMTP, display: m.DisplayName, alias: m.Alias,
				deviceType: d.DeviceType, deviceID: d.DeviceID, model: d.DeviceModel, os: d.DeviceOS,
				friendly: d.FriendlyName, firstSync: d.FirstSyncTime,
			})
		}
	}
	return out, nil
}

// recordFor makes the MDM record of one partnership of the given kind.
func recordFor(seed uint64, p seedPartner, kind Kind, h [32]byte, now time.Time) *Device {
	h2 := sha256.Sum256(h[:])
	os, ver := splitOS(p.os)
	model := p.model
	if strings.HasPrefix(model, "Outlook") {
		if os == "iOS" {
			model = "iPhone 15"
		} else {
			model = "Pixel 8"
		}
	}
	enrolled := p.firstSync.Add(-time.Duration(binary.BigEndian.Uint16(h2[0:2])%720) * time.Hour)
	lastSync := now.Add(-time.Duration(binary.BigEndian.Uint16(h2[2:4])%480) * time.Minute)
	d := &Device{
		ID: guidFrom(h[8:24]), UserID: userID(seed, p.upn), DeviceName: p.friendly, ManagedDeviceOwnerType: "personal",
		DeviceActionResults: []DeviceActionResult{}, EnrolledDateTime: enrolled.UTC(), LastSyncDateTime: lastSync.UTC(),
		OperatingSystem: os, ComplianceState: "compliant", JailBroken: "False", ManagementAgent: "easMdm", OSVersion: ver,
		EASActivated: true, EASDeviceID: p.deviceID, EASActivationDateTime: enrolled.UTC(), AzureADRegistered: true,
		DeviceEnrollmentType: "userEnrollment", EmailAddress: p.smtp, AzureADDeviceID: guidFrom(h2[4:20]),
		DeviceRegistrationState: "registered", ExchangeAccessState: "none", ExchangeAccessStateReason: "none",
		IsEncrypted: true, UserPrincipalName: p.upn, Model: model, Manufacturer: manufacturerOf(os, model),
		ComplianceGracePeriodExpirationDateTime: noGracePeriod, SerialNumber: strings.ToUpper(hex.EncodeToString(h2[20:26])),
		UserDisplayName: p.display, TotalStorageSpaceInBytes: 128 << 30, FreeStorageSpaceInBytes: int64(h2[26]) << 28,
		ManagedDeviceName:          p.alias + "_" + os + "_" + enrolled.UTC().Format("1/2/2006_3:04 PM"),
		PartnerReportedThreatState: "unknown", ManagementState: "managed",
	}
	switch kind {
	case KindNoncompliant:
		d.ComplianceState = "noncompliant"
	case KindRetired:
		d.ManagementState = "retireIssued"
		d.DeviceActionResults = []DeviceActionResult{{ActionName: "retire", ActionState: "pending", StartDateTime: lastSync.UTC(), LastUpdatedDateTime: lastSync.UTC()}}
	case KindNoEASID:
		d.EASActivated, d.EASDeviceID, d.EASActivationDateTime, d.ManagementAgent = false, "", time.Time{}, "mdm"
	}
	return d
}

// seedDevices returns the MDM records for the organisation of spec.
func seedDevices(spec exchangesim.SeedSpec, domain string, mix Mix, now time.Time) ([]*Device, error) {
	partners, err := seedOrg(spec, domain)
	if err != nil {
		return nil, err
	}
	out := make([]*Device, 0, len(partners))
	for _, p := range partners {
		h := partnershipHash(spec.Seed, p.upn, p.deviceType, p.deviceID)
		kind := mix.kind(unitFloat(h[:8]))
		if kind == KindNotEnrolled {
			continue
		}
		out = append(out, recordFor(spec.Seed, p, kind, h, now))
	}
	return out, nil
}

const alnumUpper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

// extraDevices makes n synthetic records for users outside the seeded
// organisation (intune.extraN@domain), for load: every one enrolled, the
// kinds in the proportions of mix's enrolled shares (all compliant when
// those are all zero), iPhones and Android phones 4:1.
func extraDevices(n int, seed uint64, domain string, mix Mix, now time.Time) []*Device {
	r := rand.New(rand.NewPCG(seed, 0x1A7E5E1D))
	enrolled := mix.Compliant + mix.Noncompliant + mix.Retired + mix.NoEASID
	if enrolled <= 0 {
		mix, enrolled = Mix{Compliant: 1}, 1
	}
	out := make([]*Device, 0, n)
	idBuf := make([]byte, 8)
	for i := 0; i < n; i++ {
		var h [32]byte
		binary.LittleEndian.PutUint64(h[0:], r.Uint64())
		binary.LittleEndian.PutUint64(h[8:], r.Uint64())
		binary.LittleEndian.PutUint64(h[16:], r.Uint64())
		binary.LittleEndian.PutUint64(h[24:], r.Uint64())
		alias := "intune.extra" + strconv.Itoa(i)
		p := seedPartner{upn: alias + "@" + domain, smtp: alias + "@" + domain, display: "Extra User " + strconv.Itoa(i), alias: alias,
			firstSync: now.Add(-time.Duration(r.IntN(2*365*24)) * time.Hour)}
		if r.IntN(5) == 0 {
			for j := range idBuf {
				idBuf[j] = byte('0' + r.IntN(10))
			}
			p.deviceType, p.deviceID, p.model, p.os = "Android", "androidc"+string(idBuf)+"00", "SM-S918B", "Android 14.0.0"
		} else {
			b := make([]byte, 12)
			for j := range b {
				b[j] = alnumUpper[r.IntN(len(alnumUpper))]
			}
			p.deviceType, p.deviceID, p.model, p.os = "iPhone", "Appl"+string(b), "iPhone15C2", "iOS 17.4 21E219"
		}
		p.friendly = p.display + "'s " + p.deviceType
		kind := mix.kind(r.Float64() * enrolled)
		if kind == KindNotEnrolled {
			kind = KindCompliant
		}
		out = append(out, recordFor(seed, p, kind, h, now))
	}
	return out
}
