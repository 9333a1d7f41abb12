package exchange

import (
	"context"
	"fmt"
	"sort"
	"strings"
)

// ReadReport is the outcome of one of easguard's reads in a deep check:
// how many objects came back and what in them easguard could not read.
type ReadReport struct {
	// Name says which read it was (the typed read and the cmdlet).
	Name string
	// Count is the number of objects the read returned.
	Count int
	// Problems are the shape problems found, one line per property and
	// kind of problem, with how often it occurred and a first example.
	Problems []string
	// Err is the read's failure: a listing cut short (ErrIncomplete) or
	// refused. A failed read has no count or problems to trust.
	Err error
	// Skipped says why the read did not run: the account may not run its
	// cmdlet, which no enabled feature needs (the statistics). A skipped
	// read is not a failure.
	Skipped string
}

// Failed reports whether the read failed or came back with problems.
func (r ReadReport) Failed() bool { return r.Err != nil || len(r.Problems) > 0 }

// shapeRules are what the typed reads need from the properties of one kind
// of object: enums they read through a table, dates they parse, ids they
// act on. Kinds are the names CheckShapes accepts.
type shapeRules struct {
	enums map[string]enumTable
	dates []string
	ids   []string
}

var shapeKinds = map[string]shapeRules{
	"partnership": {
		enums: map[string]enumTable{"ClientType": enumClientType, "DeviceAccessState": enumAccessState, "DeviceAccessStateReason": enumAccessReason},
		dates: []string{"FirstSyncTime", "WhenChanged", "WhenChangedUTC"},
		ids:   []string{"Identity", "Guid", "DeviceId"},
	},
	"statistics": {
		enums: map[string]enumTable{"Status": enumWipeStatus, "DevicePolicyApplicationStatus": enumPolicyStatus,
			"DeviceAccessState": enumAccessState, "DeviceAccessStateReason": enumAccessReason},
		dates: []string{"LastSuccessSync", "LastSyncAttemptTime", "DeviceWipeRequestTime", "DeviceWipeAckTime"},
		ids:   []string{"Identity", "DeviceID"},
	},
	"recipient": {ids: []string{"Identity", "Guid"}},
	"mailbox":   {ids: []string{"Identity", "Guid"}},
	"orgsettings": {
		enums: map[string]enumTable{"DefaultAccessLevel": enumAccessLevel},
	},
	"server": {ids: []string{"Name"}},
}

// problems collects shape problems by property and kind, so that a fault
// repeated on every object of a large organisation is one line.
type problems struct {
	order []string
	count map[string]int
	first map[string]string
}

func (p *problems) add(key, example string) {
	if p.count == nil {
		p.count, p.first = map[string]int{}, map[string]string{}
	}
	if p.count[key] == 0 {
		p.order = append(p.order, key)
		p.first[key] = example
	}
	p.count[key]++
}

func (p *problems) lines() []string {
	out := make([]string, 0, len(p.order))
	for _, k := range p.order {
		out = append(out, fmt.Sprintf("%s: %d×, e.g. %s", k, p.count[k], p.first[k]))
	}
	return out
}

// CheckShapes checks raw objects of one kind (partnership, statistics,
// recipient, mailbox, orgsettings, server) as the worker sent them against
// what the typed reads need: an enum value must be a name or number the
// enum tables know (anything else reads as its raw text and would compare
// unequal to every name), a non-empty date must parse (the typed reads
// read an unparseable one as "not set"), and the ids easguard acts on must
// not be empty. An absent or null enum or date is not a problem: Exchange
// leaves some unset. It returns one line per property and kind of
// problem.
func CheckShapes(kind string, objs []Object) []string {
	var p problems
	checkShapes(&p, kind, objs)
	return p.lines()
}

func checkShapes(p *problems, kind string, objs []Object) {
	rules, ok := shapeKinds[kind]
	if !ok {
		p.add("kind "+kind, "no shape rules for it")
		return
	}
	enumNames := make([]string, 0, len(rules.enums))
	for k := range rules.enums {
		enumNames = append(enumNames, k)
	}
	sort.Strings(enumNames)
	for _, o := range objs {
		who := str(o, "Identity")
		if who == "" {
			who = str(o, "Name")
		}
		for _, k := range enumNames {
			v, _ := o.Get(k)
			if v == nil {
				continue
			}
			if raw, ok := rules.enums[k].name(v); !ok {
				if raw == "" {
					raw = fmt.Sprint(v)
				}
				p.add(k+" not a known value", fmt.Sprintf("%q on %q", raw, who))
			}
		}
		for _, k := range rules.dates {
			v, _ := o.Get(k)
			switch s, isStr := v.(string); {
			case v == nil || s == "" && isStr:
			case !isStr:
				p.add(k+" not a date", fmt.Sprintf("%v on %q", v, who))
			case when(o, k).IsZero():
				p.add(k+" does not parse", fmt.Sprintf("%q on %q", s, who))
			}
		}
		for _, k := range rules.ids {
			if strings.TrimSpace(str(o, k)) == "" {
				p.add(k+" empty", fmt.Sprintf("on %q", who))
			}
		}
	}
}

// DeepCheck runs every read easguard makes against the organisation, with
// the cmdlets, parameters and Select lists of the typed reads, and checks
// the shapes that come back (CheckShapes). Listings must be complete. The
// per-mailbox reads (Get-Recipient and Get-CASMailbox by identity, the
// device statistics) run for the mailboxes of the first sample
// partnerships' owners. It also reports partnerships whose mailbox is not
// among the recipients listed: the matcher could not name their user. A
// fatal error (authentication, permission) stops it and is returned; a
// read that fails otherwise is reported in its ReadReport. The statistics
// are read only where the account may run their cmdlet: easguard's
// features do not use them, and the least-privilege role does not grant it.
func (c *Client) DeepCheck(ctx context.Context, sample int) ([]ReadReport, error) {
	var reports []ReadReport
	list := func(name, kind string, call Call, keep func(Object)) ReadReport {
		r := ReadReport{Name: name}
		var p problems
		r.Err = c.stream(ctx, call, func(objs []Object) error {
			r.Count += len(objs)
			checkShapes(&p, kind, objs)
			for _, o := range objs {
				if keep != nil {
					keep(o)
				}
			}
			return nil
		})
		r.Problems = p.lines()
		return r
	}

	objs, _, err := c.Invoke(ctx, Call{Cmdlet: "Get-ExchangeServer", Select: []string{"Name", "Fqdn", "AdminDisplayVersion", "ServerRole", "Site"}})
	if IsFatal(err) {
		return reports, err
	}
	reports = append(reports, ReadReport{Name: "Servers (Get-ExchangeServer)", Count: len(objs), Problems: CheckShapes("server", objs), Err: err})

	dc, err := c.deviceCmdlets(ctx)
	if err != nil {
		return reports, err
	}
	var partnerships []Partnership
	pr := list("ListPartnerships ("+dc.list+")", "partnership", dc.listCall(Params{"ResultSize": "Unlimited", "ActiveSync": true}), func(o Object) {
		partnerships = append(partnerships, toPartnership(o))
	})
	if IsFatal(pr.Err) {
		return reports, pr.Err
	}

	recipients := map[string]bool{}
	rr := list("ListRecipients (Get-Recipient)", "recipient",
		Call{Cmdlet: "Get-Recipient", Params: Params{"ResultSize": "Unlimited", "Filter": "HasActiveSyncDevicePartnership -eq $true"}, Select: recipientProps},
		func(o Object) { recipients[strings.ToLower(str(o, "Identity"))] = true })
	if IsFatal(rr.Err) {
		return reports, rr.Err
	}
	var p problems
	var owners []string
	seen := map[string]bool{}
	for _, x := range partnerships {
		key := strings.ToLower(x.Mailbox)
		if x.Mailbox == "" {
			p.add("mailbox identity empty", fmt.Sprintf("on %q", x.Identity))
			continue
		}
		if pr.Err == nil && rr.Err == nil && !recipients[key] {
			p.add("mailbox not among the recipients listed", fmt.Sprintf("%q of %q", x.Mailbox, x.Identity))
		}
		if !seen[key] && len(owners) < sample {
			seen[key] = true
			owners = append(owners, x.Mailbox)
		}
	}
	pr.Problems = append(pr.Problems, p.lines()...)
	reports = append(reports, pr, rr)

	mr := list("ListMailboxes (Get-CASMailbox)", "mailbox",
		Call{Cmdlet: "Get-CASMailbox", Params: Params{"ResultSize": "Unlimited", "Filter": "HasActiveSyncDevicePartnership -eq $true"}, Select: mailboxProps}, nil)
	if IsFatal(mr.Err) {
		return reports, mr.Err
	}
	reports = append(reports, mr)

	objs, _, err = c.Invoke(ctx, Call{Cmdlet: "Get-ActiveSyncOrganizationSettings", Select: []string{"DefaultAccessLevel", "AdminMailRecipients", "UserMailInsert"}})
	if IsFatal(err) {
		return reports, err
	}
	or := ReadReport{Name: "GetOrgSettings (Get-ActiveSyncOrganizationSettings)", Count: len(objs), Problems: CheckShapes("orgsettings", objs), Err: err}
	if err == nil && len(objs) != 1 {
		or.Problems = append(or.Problems, fmt.Sprintf("%d objects, GetOrgSettings needs exactly 1", len(objs)))
	}
	reports = append(reports, or)

	statsParams := func(m string) Params {
		if dc.statsActiveSync {
			return Params{"Mailbox": m, "ActiveSync": true}
		}
		return Params{"Mailbox": m}
	}
	perMailbox := []struct {
		name, kind string
		call       func(m string) Call
		one        bool
	}{
		{"GetRecipient (Get-Recipient -Identity)", "recipient", func(m string) Call {
			return Call{Cmdlet: "Get-Recipient", Params: Params{"Identity": m}, Select: recipientProps}
		}, true},
		{"CASMailbox (Get-CASMailbox -Identity)", "mailbox", func(m string) Call {
			return Call{Cmdlet: "Get-CASMailbox", Params: Params{"Identity": m}, Select: mailboxProps}
		}, true},
		{"DeviceStatistics (" + dc.stats + ")", "statistics", func(m string) Call { return Call{Cmdlet: dc.stats, Params: statsParams(m)} }, false},
	}
	have, err := c.sessionCmdlets(ctx, dc.stats)
	if err != nil {
		return reports, err
	}
	for _, pm := range perMailbox {
		r := ReadReport{Name: fmt.Sprintf("%s, %d mailboxes", pm.name, len(owners))}
		if pm.kind == "statistics" && !have[strings.ToLower(dc.stats)] {
			r.Skipped = "the account may not run " + dc.stats + ", which no feature of easguard's needs"
			reports = append(reports, r)
			continue
		}
		calls := make([]Call, len(owners))
		for i, m := range owners {
			calls[i] = pm.call(m)
		}
		var p problems
		fatal := c.runBatches(ctx, calls, false, func(i int, res Result, err error) {
			if err == nil && !res.OK {
				err = ResultError(calls[i].Cmdlet, res.Errors)
			}
			if err != nil {
				if r.Err == nil {
					r.Err = fmt.Errorf("%s: %w", owners[i], err)
				}
				return
			}
			r.Count += len(res.Objects)
			if pm.one && len(res.Objects) != 1 {
				p.add("not exactly one object", fmt.Sprintf("%d for %q", len(res.Objects), owners[i]))
			}
			checkShapes(&p, pm.kind, res.Objects)
		})
		if fatal != nil {
			return reports, fatal
		}
		r.Problems = p.lines()
		reports = append(reports, r)
	}
	return reports, nil
}
