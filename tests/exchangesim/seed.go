package exchangesim

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"time"
)

// SeedSpec describes a generated organisation.
type SeedSpec struct {
	Mailboxes    int
	Partnerships int
	// Seed makes the organisation reproducible.
	Seed uint64
	// NoHostile leaves out the hostile values (quotes of every kind,
	// backticks, $(...), ';', '|') that are otherwise mixed into display
	// names, friendly names and device ids.
	NoHostile bool
	// ChildDomainShare is the share of mailboxes in a child domain, visible
	// only with Set-ADServerSettings -ViewEntireForest $true.
	ChildDomainShare float64
}

// platform is one kind of phone in the generated mix.
type platform struct {
	weight     int
	deviceType string
	models     []string
	os         func(r *rand.Rand) string
	userAgent  func(r *rand.Rand, os string) string
	id         func(r *rand.Rand) string
}

const alnumUpper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
const hexLower = "0123456789abcdef"

func randString(r *rand.Rand, alphabet string, n int) string {
	b := make([]byte, n)
	for i := range b {
		b[i] = alphabet[r.IntN(len(alphabet))]
	}
	return string(b)
}

var platforms = []platform{
	{40, "iPhone", []string{"iPhone14C3", "iPhone15C2", "iPhone16C1", "iPhone13C2", "iPhone12C8"},
		func(r *rand.Rand) string {
			return fmt.Sprintf("iOS 17.%d %dF%d", r.IntN(6), 21+r.IntN(3), 60+r.IntN(40))
		},
		func(r *rand.Rand, os string) string { return "Apple-iPhone14C3/2104." + fmt.Sprint(r.IntN(300)) },
		func(r *rand.Rand) string { return "Appl" + randString(r, alnumUpper, 12) }},
	{30, "Outlook", []string{"Outlook for iOS and Android"},
		func(r *rand.Rand) string {
			if r.IntN(2) == 0 {
				return "iOS 17.4"
			}
			return "Android 14.0.0"
		},
		func(r *rand.Rand, os string) string { return "Outlook-iOS-Android/1.0" },
		func(r *rand.Rand) string { return strings.ToUpper(randString(r, hexLower, 32)) }},
	{15, "Android", []string{"SM-S918B", "SM-G991B", "Pixel 8", "SM-A546B", "GT-I9300"},
		func(r *rand.Rand) string { return fmt.Sprintf("Android %d.0.0", 11+r.IntN(4)) },
		func(r *rand.Rand, os string) string { return "Android-SAMSUNG-SM-S918B/101.10001" },
		func(r *rand.Rand) string { return "androidc" + randString(r, "0123456789", 10) }},
	{7, "iPad", []string{"iPad13C1", "iPad14C2"},
		func(r *rand.Rand) string { return "iPadOS 17.3" },
		func(r *rand.Rand, os string) string { return "Apple-iPad13C1/2103.61" },
		func(r *rand.Rand) string { return "Appl" + randString(r, alnumUpper, 12) }},
	{6, "Gmail", []string{"Pixel 7", "Pixel 6a"},
		func(r *rand.Rand) string { return "Android 13.0.0" },
		func(r *rand.Rand, os string) string { return "Android-Gmail/2024.01" },
		func(r *rand.Rand) string { return "android" + randString(r, hexLower, 16) }},
	{2, "WindowsMail", []string{"Surface Laptop 5"},
		func(r *rand.Rand) string { return "Windows 11" },
		func(r *rand.Rand, os string) string { return "MSFT-WIN-3/10.0.22631" },
		func(r *rand.Rand) string { return strings.ToUpper(randString(r, hexLower, 32)) }},
}

// hostile values every layer must carry as data: all PowerShell quote
// characters, backticks, subexpressions, statement separators and pipes.
var hostileNames = []string{
	"O'Brien, Seán", "Zoë ‘Quotes’ Müller", "Ann ‚Low‛ Quote", "Bob \"Double\" “Curly” „Low”", "Eve `tick` $(Get-Date)",
	"Mallory; Remove-Mailbox -Confirm:$false", "Trent | Out-File x", "Peggy $env:USERNAME", "Victor @{a=1}", "Walter -WhatIf",
}
var hostileIDs = []string{
	"it's'; $(Stop-Computer)", "\u2018curly\u2019\u201Aid\u201B", "dq\"\u201C\u201D\u201Eid", "`backtick`id", "$(Get-Process)",
	"a;b|c&d>e<f", "ends-with-dollar$", "--Identity", "@{Add='x'}", "0123456789ABCDEFGHIJKLMNOPQRSTUV",
}

// Seed fills an empty organisation with a reproducible population: a
// realistic mix of platforms, partnerships whose first syncs are spread
// over two years, some devices individually allowed or blocked, one
// device access rule, a monitoring mailbox with its probe, and (unless
// NoHostile) hostile values.
func Seed(o *Org, spec SeedSpec) error {
	if spec.Mailboxes <= 0 || spec.Partnerships < 0 {
		return fmt.Errorf("seed: need at least one mailbox")
	}
	r := rand.New(rand.NewPCG(spec.Seed, spec.Seed^0x9E3779B97F4A7C15))
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.mailboxes) > 0 {
		return fmt.Errorf("seed: the organisation is not empty")
	}
	root := o.defaultDomain()
	var child *Domain
	if spec.ChildDomainShare > 0 {
		child = &Domain{DNS: "emea." + root.DNS, NetBIOS: "EMEA", DC: "DC01.emea." + root.DNS}
		o.Domains = append(o.Domains, child)
	}
	now := o.now()
	first := []string{"Anna", "Ben", "Chloé", "David", "Emma", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Klara", "Leon", "Mia", "Noah", "Olga", "Paul"}
	last := []string{"Schmidt", "Meyer", "Weber", "Fischer", "Wagner", "Becker", "Hoffmann", "Schulz", "Koch", "Richter"}
	boxes := make([]*Mailbox, 0, spec.Mailboxes)
	for i := 0; i < spec.Mailboxes; i++ {
		f, l := first[r.IntN(len(first))], last[r.IntN(len(last))]
		alias := fmt.Sprintf("%s.%s%d", strings.ToLower(asciiOnly(f)), strings.ToLower(l), i)
		display := f + " " + l
		if !spec.NoHostile && i%97 == 13 {
			display = hostileNames[(i/97)%len(hostileNames)]
		}
		ms := MailboxSpec{Alias: alias, DisplayName: fmt.Sprintf("%s %d", display, i)}
		if child != nil && r.Float64() < spec.ChildDomainShare {
			ms.Domain = child.DNS
		}
		m, err := o.addMailboxLocked(ms)
		if err != nil {
			return fmt.Errorf("seed mailbox %d: %w", i, err)
		}
		m.WhenCreated = now.Add(-time.Duration(r.IntN(5*365*24)) * time.Hour)
		boxes = append(boxes, m)
	}
	total := 0
	for _, p := range platforms {
		total += p.weight
	}
	pick := func() platform {
		n := r.IntN(total)
		for _, p := range platforms {
			if n < p.weight {
				return p
			}
			n -= p.weight
		}
		return platforms[0]
	}
	for i := 0; i < spec.Partnerships; i++ {
		m := boxes[r.IntN(len(boxes))]
		if len(m.Devices) >= o.MaxDevicesPerMailbox {
			m = boxes[i%len(boxes)]
			if len(m.Devices) >= o.MaxDevicesPerMailbox {
				return fmt.Errorf("seed: too many partnerships for %d mailboxes", spec.Mailboxes)
			}
		}
		p := pick()
		id := p.id(r)
		if !spec.NoHostile && i%211 == 7 {
			id = hostileIDs[(i/211)%len(hostileIDs)]
		}
		for taken(m, id, p.deviceType) {
			// One partnership per device type and id in a mailbox, as the
			// AD object name <type>§<id> is unique under the user.
			id = p.id(r)
		}
		os := p.os(r)
		firstSync := now.Add(-time.Duration(r.IntN(2*365*24*60)) * time.Minute)
		d := &Device{
			GUID: o.newGUID(), Mailbox: m, DeviceID: id, DeviceType: p.deviceType, DeviceModel: p.models[r.IntN(len(p.models))],
			DeviceOS: os, UserAgent: p.userAgent(r, os), FriendlyName: m.DisplayName + "'s " + p.deviceType, OSLanguage: "de-DE",
			ActiveSyncVersion: "16.1", ClientType: "EAS", FirstSyncTime: firstSync, WhenCreated: firstSync,
			SentDeviceInfo: true, Provisionable: true,
			LastSyncAttemptTime: now.Add(-time.Duration(r.IntN(72*60)) * time.Minute),
		}
		if o.Version == Version2010 {
			d.ActiveSyncVersion = "14.1" // the newest EAS version 2010 speaks
		}
		// OWA for Devices partnerships came with Exchange 2013.
		if r.IntN(100) == 0 && o.Version != Version2010 {
			d.ClientType = "MOWA"
			d.DeviceType = "OWA"
		}
		m.Devices = append(m.Devices, d)
		o.byGUID[strings.ToLower(d.GUID)] = d
		o.deviceCount++
		switch n := r.IntN(100); {
		case n < 5:
			m.Blocked = append(m.Blocked, id)
		case n < 15:
			m.Allowed = append(m.Allowed, id)
		}
		o.classes[d.DeviceType+"§"+d.DeviceModel] = d.LastSyncAttemptTime
	}
	o.Rules = append(o.Rules, &DeviceAccessRule{GUID: o.newGUID(), QueryString: "GT-I9300", Characteristic: CharDeviceModel,
		AccessLevel: LevelBlock, WhenCreated: now.Add(-400 * 24 * time.Hour), WhenChanged: now.Add(-400 * 24 * time.Hour)})
	health, err := o.addMailboxLocked(MailboxSpec{Alias: "HealthMailbox0a1b2c", DisplayName: "HealthMailbox0a1b2c", OU: "Microsoft Exchange System Objects/Monitoring Mailboxes"})
	if err != nil {
		return fmt.Errorf("seed monitoring mailbox: %w", err)
	}
	health.Monitoring = true
	probe := &Device{GUID: o.newGUID(), Mailbox: health, DeviceID: "EASProbeDevice1", DeviceType: "EASProbeDeviceType", DeviceModel: "EASProbeDeviceType",
		ClientType: "EAS", ActiveSyncVersion: "14.1", FirstSyncTime: now.Add(-30 * 24 * time.Hour), WhenCreated: now.Add(-30 * 24 * time.Hour),
		SentDeviceInfo: true, Provisionable: true, LastSyncAttemptTime: now}
	health.Devices = append(health.Devices, probe)
	o.byGUID[strings.ToLower(probe.GUID)] = probe
	o.deviceCount++
	for _, m := range o.mailboxes {
		for _, d := range m.Devices {
			d.State, d.Reason, d.Rule = o.evaluate(d, d.LastSyncAttemptTime)
			d.WhenChanged = d.LastSyncAttemptTime
			if d.State == StateAllowed {
				d.LastSuccessSync, d.LastPolicyUpdateTime, d.FoldersSynced = d.LastSyncAttemptTime, d.LastSyncAttemptTime, 12
			}
		}
	}
	// A seeded organisation has been there a while: each mailbox last
	// changed between its creation and two days ago (drawn last, so the
	// rest of the seed is as it always was).
	health.WhenCreated = now.Add(-30 * 24 * time.Hour)
	health.WhenChanged = health.WhenCreated
	for _, m := range boxes {
		span := now.Add(-48 * time.Hour).Sub(m.WhenCreated)
		m.WhenChanged = m.WhenCreated
		if span > 0 {
			m.WhenChanged = m.WhenCreated.Add(time.Duration(r.Int64N(int64(span))))
		} else {
			m.WhenCreated, m.WhenChanged = now.Add(-48*time.Hour), now.Add(-48*time.Hour)
		}
	}
	return nil
}

func asciiOnly(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r < 128 {
			b.WriteRune(r)
		} else {
			b.WriteByte('e')
		}
	}
	return b.String()
}

func taken(m *Mailbox, id, deviceType string) bool {
	for _, d := range m.Devices {
		if strings.EqualFold(d.DeviceID, id) && strings.EqualFold(d.DeviceType, deviceType) {
			return true
		}
	}
	return false
}
