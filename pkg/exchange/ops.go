package exchange

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"go.opentelemetry.io/otel/trace"
)

// Client offers the typed operations the rest of easguard uses. It works
// on any Runner: the pool in production, the one-shot mode for diagnostics.
type Client struct {
	r Runner
	// BatchSize is how many Set-CASMailbox calls go in one round trip.
	BatchSize int
	// Parallel is how many batches run at once (the pool's size).
	Parallel int
	// PageSize is how many objects a listing streams per frame.
	PageSize int
	// ListPartitions is how many parts a full listing (ListRecipients, and
	// ListPartnerships without options) is split into besides its
	// remainder, read Parallel at a time (partition.go); 1 reads it as one
	// listing, 0 derives it from Parallel (listGroups).
	ListPartitions int

	devMu sync.Mutex
	dev   *deviceCmdlets // nil until known
	devAt time.Time
	// unpartitioned is set once Exchange refused the filters of a
	// partitioned listing: full listings are read as one from then on.
	unpartitioned atomic.Bool
	// MailboxReadLimit is how many changed mailboxes a listing with
	// ChangedSince reads one by one (zero: DefaultMailboxReadLimit).
	MailboxReadLimit int
}

// NewClient returns a client over r.
func NewClient(r Runner, cfg Config) *Client {
	c := &Client{r: r, BatchSize: cfg.BatchSize, Parallel: cfg.Workers, PageSize: 500, ListPartitions: cfg.ListPartitions}
	if c.BatchSize < 1 {
		c.BatchSize = 100
	}
	if c.Parallel < 1 {
		c.Parallel = 1
	}
	return c
}

// Invoke runs one cmdlet and returns all its objects and warnings; the
// first error Exchange reported is returned classified.
func (c *Client) Invoke(ctx context.Context, call Call) ([]Object, []string, error) {
	return c.invoke(ctx, call, false)
}

// invoke is Invoke, urgent for the changes someone waits for (see
// Request.Urgent).
func (c *Client) invoke(ctx context.Context, call Call, urgent bool) ([]Object, []string, error) {
	var objs []Object
	r, err := c.r.Do(ctx, Request{Op: "invoke", Call: &call, Page: c.PageSize, Urgent: urgent}, func(page []Object) error {
		objs = append(objs, page...)
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", call.Cmdlet, err)
	}
	objs = append(objs, r.Objects...)
	return objs, r.Warnings, ResultError(call.Cmdlet, r.Errors)
}

// stream runs a listing and hands its objects to fn page by page. A
// listing is complete only when Exchange reported no error, did not say it
// cut the result short (the ResultSize warning), and every object it
// counted arrived; otherwise the objects already handed over are all the
// caller gets, and the error (ErrIncomplete) tells it not to conclude
// anything from what is missing.
func (c *Client) stream(ctx context.Context, call Call, fn func([]Object) error) error {
	got := 0
	r, err := c.r.Do(ctx, Request{Op: "invoke", Call: &call, Page: c.PageSize}, func(objs []Object) error {
		got += len(objs)
		return fn(objs)
	})
	if err != nil {
		return fmt.Errorf("%s: %w", call.Cmdlet, err)
	}
	if len(r.Objects) > 0 {
		got += len(r.Objects)
		if err := fn(r.Objects); err != nil {
			return err
		}
	}
	if err := ResultError(call.Cmdlet, r.Errors); err != nil {
		return err
	}
	for _, w := range r.Warnings {
		if truncated(w) {
			return fmt.Errorf("%s: %w: Exchange cut the result short: %s", call.Cmdlet, ErrIncomplete, w)
		}
	}
	if got < r.Count {
		return fmt.Errorf("%s: %w: %d of the %d objects Exchange listed arrived", call.Cmdlet, ErrIncomplete, got, r.Count)
	}
	return nil
}

// truncated reports Exchange's warning that a listing stopped at its
// ResultSize ("By default, only the first 1000 items are returned...").
func truncated(warning string) bool {
	w := strings.ToLower(warning)
	return strings.Contains(w, "resultsize") || strings.Contains(w, "only the first")
}

// Partnership is one ActiveSync partnership as Get-MobileDevice reports it.
type Partnership struct {
	Identity          string
	GUID              string
	DeviceID          string
	DeviceType        string
	DeviceModel       string
	DeviceOS          string
	UserAgent         string
	IMEI              string
	FriendlyName      string
	ClientType        string
	ActiveSyncVersion string
	AccessState       string
	AccessReason      string
	AccessRule        string
	FirstSyncTime     time.Time
	WhenChanged       time.Time
	// Mailbox is the owner's identity as Exchange prints it (the canonical
	// name, e.g. contoso.com/Users/Alice), usable as -Identity.
	Mailbox string
}

var partnershipProps = []string{"Identity", "Guid", "DeviceId", "DeviceType", "DeviceModel", "DeviceOS", "DeviceUserAgent", "DeviceImei",
	"FriendlyName", "ClientType", "DeviceActiveSyncVersion", "DeviceAccessState", "DeviceAccessStateReason", "DeviceAccessControlRule",
	"FirstSyncTime", "WhenChanged", "WhenChangedUTC", "UserDisplayName"}

func toPartnership(o Object) Partnership {
	p := Partnership{
		Identity: str(o, "Identity"), GUID: str(o, "Guid"), DeviceID: str(o, "DeviceId"), DeviceType: str(o, "DeviceType"),
		DeviceModel: str(o, "DeviceModel"), DeviceOS: str(o, "DeviceOS"), UserAgent: str(o, "DeviceUserAgent"), IMEI: str(o, "DeviceImei"),
		FriendlyName: str(o, "FriendlyName"), ClientType: enum(o, "ClientType", enumClientType), ActiveSyncVersion: str(o, "DeviceActiveSyncVersion"),
		AccessState: enum(o, "DeviceAccessState", enumAccessState), AccessReason: enum(o, "DeviceAccessStateReason", enumAccessReason),
		AccessRule: str(o, "DeviceAccessControlRule"), FirstSyncTime: when(o, "FirstSyncTime"), WhenChanged: whenUTC(o, "WhenChanged"),
		Mailbox: str(o, "UserDisplayName"),
	}
	if m, ok := mailboxOf(p.Identity); ok {
		p.Mailbox = m
	}
	return p
}

// devicesContainer separates a partnership's mailbox from its name in its
// identity: contoso.com/Users/Alice/ExchangeActiveSyncDevices/iPhone§….
const devicesContainer = "/ExchangeActiveSyncDevices/"

// mailboxOf returns what precedes the last devicesContainer, in any casing
// of its letters, in a partnership's identity. It compares byte for byte
// in the identity itself: the index of a lower-cased copy is not an index
// into a name whose lower case has another length in UTF-8 (İ, Ⱥ), and
// cutting the name there lost its last characters or panicked.
func mailboxOf(identity string) (string, bool) {
	for i := len(identity) - len(devicesContainer); i > 0; i-- {
		if identity[i] == '/' && strings.EqualFold(identity[i:i+len(devicesContainer)], devicesContainer) {
			return identity[:i], true
		}
	}
	return "", false
}

// ListOptions narrows a partnership listing.
type ListOptions struct {
	// NewSince lists only partnerships first synced at or after this time
	// (quick sync). Exchange filters on FirstSyncTime (filterable on
	// Get-MobileDevice) with a day of slack, because it reads zone-less
	// filter times in the server's time zone; the exact cut is made here.
	NewSince time.Time
	// ChangedSince also lists the partnerships whose access may have
	// changed at or after this time: an administrator allowing or blocking
	// a device, or editing a mailbox's ActiveSyncAllowed/BlockedDeviceIDs.
	// A partnership's own WhenChanged is not filterable on Get-MobileDevice
	// (reference/exchange.md §1.2), but a mailbox's is on Get-CASMailbox,
	// and every list edit is a write to the mailbox's user object, which
	// Active Directory stamps (UNCONFIRMED that Exchange's WhenChanged shows
	// it; the simulator can be told otherwise). So the mailboxes changed
	// since (with the same day of slack, cut exactly here) are read, and the
	// partnerships of each are listed with Get-MobileDevice -Mailbox, many
	// per round trip; above MailboxReadLimit mailboxes one listing of every
	// partnership is cheaper. A change Exchange makes without writing the
	// mailbox (a device access rule, the organisation's default level, a
	// device re-evaluated on its next sync) shows only in a partnership's
	// own WhenChanged: it is kept when a listing read here returns it, and
	// otherwise waits for the full sync.
	ChangedSince time.Time
	// Mailbox lists one mailbox's partnerships.
	Mailbox string
}

// filterSince formats t for an OPATH filter in the invariant form
// MM/dd/yyyy HH:mm:ss (the session's culture is pinned to en-US), a day
// early: Exchange reads a zone-less time in the server's time zone, which
// may be up to 14 hours off UTC, so callers cut exactly on what comes back.
func filterSince(t time.Time) string {
	return t.Add(-24 * time.Hour).UTC().Format("01/02/2006 15:04:05")
}

// listCall is the partnership listing with params through the cmdlet this
// organisation has (Get-ActiveSyncDevice on Exchange 2010, which has no
// -ActiveSync switch).
func (d deviceCmdlets) listCall(params Params) Call {
	p := maps.Clone(params)
	if !d.listActiveSync {
		delete(p, "ActiveSync")
	}
	return Call{Cmdlet: d.list, Params: p, Select: partnershipProps}
}

// probeDeviceType is the device type of managed availability's probe
// partnerships, which listings hide unless asked for (-Monitoring).
const probeDeviceType = "EASProbeDeviceType"

// ListPartnerships streams ActiveSync partnerships page by page. Large
// organisations never become one giant frame.
//
// The full listing (no options) is read in parts at once, over as many
// sessions as the client has (partition.go): fn still gets one page at a
// time, never two concurrently, but pages of different parts interleave,
// and if any part fails the listing fails (never a listing that looks
// complete with a part missing). Quick and per-mailbox listings are one
// listing, or many small ones batched, as before.
func (c *Client) ListPartnerships(ctx context.Context, opt ListOptions, fn func([]Partnership) error) error {
	params := Params{"ResultSize": "Unlimited", "ActiveSync": true}
	if opt.Mailbox != "" {
		if err := checkIdentity(opt.Mailbox); err != nil {
			return err
		}
		params = Params{"Mailbox": opt.Mailbox, "ActiveSync": true}
	}
	dc, err := c.deviceCmdlets(ctx)
	if err != nil {
		return err
	}
	deviceCall := dc.listCall
	isNew := func(p Partnership) bool { return !opt.NewSince.IsZero() && !p.FirstSyncTime.Before(opt.NewSince) }
	changed := func(p Partnership) bool { return !opt.ChangedSince.IsZero() && !p.WhenChanged.Before(opt.ChangedSince) }
	if opt.Mailbox == "" && opt.NewSince.IsZero() && opt.ChangedSince.IsZero() {
		// The full listing, in parts read at once (partition.go).
		return streamPartitioned(ctx, c, deviceCall(params), "DeviceId", "", deviceIDWeight, toPartnership, fn)
	}
	if opt.Mailbox != "" || opt.ChangedSince.IsZero() {
		if !opt.NewSince.IsZero() && opt.ChangedSince.IsZero() {
			params["Filter"] = "FirstSyncTime -ge '" + filterSince(opt.NewSince) + "'"
		}
		return c.streamPartnerships(ctx, deviceCall(params), func(p Partnership) bool {
			return (opt.NewSince.IsZero() && opt.ChangedSince.IsZero()) || isNew(p) || changed(p)
		}, fn)
	}

	mailboxes, err := c.changedMailboxes(ctx, opt.ChangedSince)
	if err != nil {
		return err
	}
	limit := c.MailboxReadLimit
	if limit <= 0 {
		limit = DefaultMailboxReadLimit
	}
	if len(mailboxes) > limit {
		return c.streamPartnerships(ctx, deviceCall(params), func(p Partnership) bool {
			return isNew(p) || changed(p) || mailboxes[strings.ToLower(p.Mailbox)] != ""
		}, fn)
	}
	seen := map[string]bool{}
	if !opt.NewSince.IsZero() {
		params["Filter"] = "FirstSyncTime -ge '" + filterSince(opt.NewSince) + "'"
		if err := c.streamPartnerships(ctx, deviceCall(params), func(p Partnership) bool {
			if isNew(p) || changed(p) {
				seen[strings.ToLower(p.GUID)+"\x00"+p.Identity] = true
				return true
			}
			return false
		}, fn); err != nil {
			return err
		}
	}
	if len(mailboxes) == 0 {
		return nil
	}
	keys := make([]string, 0, len(mailboxes))
	for k := range mailboxes {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	calls := make([]Call, len(keys))
	for i, k := range keys {
		calls[i] = deviceCall(Params{"Mailbox": mailboxes[k], "ActiveSync": true})
	}
	var failed error
	fatal := c.runBatches(ctx, calls, false, func(i int, r Result, err error) {
		if err == nil && !r.OK {
			err = ResultError(dc.list, r.Errors)
		}
		switch {
		case errors.Is(err, ErrNotFound):
			return // the mailbox went away since it was listed
		case err != nil:
			if failed == nil {
				failed = fmt.Errorf("partnerships of %s: %w", mailboxes[keys[i]], err)
			}
			return
		case failed != nil:
			return
		}
		var page []Partnership
		for _, o := range r.Objects {
			p := toPartnership(o)
			// Probes are not phones; the org-wide listing hides them, and
			// whether -Mailbox does too is UNCONFIRMED.
			if strings.EqualFold(p.DeviceType, probeDeviceType) || seen[strings.ToLower(p.GUID)+"\x00"+p.Identity] {
				continue
			}
			page = append(page, p)
		}
		if len(page) > 0 {
			failed = fn(page)
		}
	})
	if fatal != nil {
		return fatal
	}
	return failed
}

// DefaultMailboxReadLimit is how many changed mailboxes a quick listing
// reads one by one (Get-MobileDevice -Mailbox, batched) before one listing
// of every partnership is the cheaper way: a cmdlet costs about as much as
// thirty listed objects (tests/exchangesim profile), and an organisation
// averages one to three partnerships a mailbox.
const DefaultMailboxReadLimit = 1000

// changedMailboxes lists the mailboxes whose object changed at or after
// since: lower-cased identity (as Get-MobileDevice names a partnership's
// mailbox) → what -Mailbox gets (the GUID, never ambiguous).
func (c *Client) changedMailboxes(ctx context.Context, since time.Time) (map[string]string, error) {
	out := map[string]string{}
	err := c.stream(ctx, Call{Cmdlet: "Get-CASMailbox", Params: Params{"ResultSize": "Unlimited", "Filter": "WhenChanged -ge '" + filterSince(since) + "'"},
		Select: []string{"Identity", "Guid", "WhenChanged", "WhenChangedUTC"}}, func(objs []Object) error {
		for _, o := range objs {
			at := when(o, "WhenChangedUTC")
			if at.IsZero() {
				at = when(o, "WhenChanged")
			}
			id := str(o, "Identity")
			if at.Before(since) || id == "" {
				continue
			}
			arg := str(o, "Guid")
			if arg == "" {
				arg = id
			}
			out[strings.ToLower(id)] = arg
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// streamPartnerships runs a listing and hands fn, page by page, the
// partnerships keep accepts.
func (c *Client) streamPartnerships(ctx context.Context, call Call, keep func(Partnership) bool, fn func([]Partnership) error) error {
	return c.stream(ctx, call, func(objs []Object) error {
		page := make([]Partnership, 0, len(objs))
		for _, o := range objs {
			if p := toPartnership(o); keep(p) {
				page = append(page, p)
			}
		}
		if len(page) == 0 {
			return nil
		}
		return fn(page)
	})
}

// Statistics is the sync state of a partnership (Get-MobileDeviceStatistics).
type Statistics struct {
	Identity        string
	DeviceID        string
	LastSuccessSync time.Time
	LastSyncAttempt time.Time
	Status          string
	PolicyApplied   string
	PolicyStatus    string
	WipeRequestTime time.Time
	WipeAckTime     time.Time
	AccessState     string
	AccessReason    string
	FoldersSynced   int64
}

// DeviceStatistics reads the statistics of a mailbox's partnerships. It
// never passes an empty identity: Exchange would return every device.
func (c *Client) DeviceStatistics(ctx context.Context, mailbox string) ([]Statistics, error) {
	if err := checkIdentity(mailbox); err != nil {
		return nil, err
	}
	dc, err := c.deviceCmdlets(ctx)
	if err != nil {
		return nil, err
	}
	params := Params{"Mailbox": mailbox}
	if dc.statsActiveSync {
		params["ActiveSync"] = true
	}
	objs, _, err := c.Invoke(ctx, Call{Cmdlet: dc.stats, Params: params})
	if err != nil {
		return nil, err
	}
	out := make([]Statistics, 0, len(objs))
	for _, o := range objs {
		nv, _ := o.Get("NumberOfFoldersSynced")
		n, _ := nv.(interface{ Int64() (int64, error) })
		var folders int64
		if n != nil {
			folders, _ = n.Int64()
		}
		out = append(out, Statistics{
			Identity: str(o, "Identity"), DeviceID: str(o, "DeviceID"), LastSuccessSync: when(o, "LastSuccessSync"),
			LastSyncAttempt: when(o, "LastSyncAttemptTime"), Status: enum(o, "Status", enumWipeStatus), PolicyApplied: str(o, "DevicePolicyApplied"),
			PolicyStatus: enum(o, "DevicePolicyApplicationStatus", enumPolicyStatus), WipeRequestTime: when(o, "DeviceWipeRequestTime"),
			WipeAckTime: when(o, "DeviceWipeAckTime"), AccessState: enum(o, "DeviceAccessState", enumAccessState),
			AccessReason:  enum(o, "DeviceAccessStateReason", enumAccessReason),
			FoldersSynced: folders,
		})
	}
	return out, nil
}

// Mailbox is a CAS mailbox with its device lists.
type Mailbox struct {
	Identity           string
	GUID               string
	PrimarySmtpAddress string
	DisplayName        string
	Allowed            []string
	Blocked            []string
	ActiveSyncEnabled  bool
	HasPartnership     bool
}

func toMailbox(o Object) Mailbox {
	enabled, has := boolean(o, "ActiveSyncEnabled"), boolean(o, "HasActiveSyncDevicePartnership")
	return Mailbox{Identity: str(o, "Identity"), GUID: str(o, "Guid"), PrimarySmtpAddress: str(o, "PrimarySmtpAddress"),
		DisplayName: str(o, "DisplayName"), Allowed: strs(o, "ActiveSyncAllowedDeviceIDs"), Blocked: strs(o, "ActiveSyncBlockedDeviceIDs"),
		ActiveSyncEnabled: enabled, HasPartnership: has}
}

var mailboxProps = []string{"Identity", "Guid", "PrimarySmtpAddress", "DisplayName", "ActiveSyncAllowedDeviceIDs", "ActiveSyncBlockedDeviceIDs", "ActiveSyncEnabled", "HasActiveSyncDevicePartnership"}

// CASMailbox reads one mailbox's device lists.
func (c *Client) CASMailbox(ctx context.Context, identity string) (Mailbox, error) {
	if err := checkIdentity(identity); err != nil {
		return Mailbox{}, err
	}
	objs, _, err := c.Invoke(ctx, Call{Cmdlet: "Get-CASMailbox", Params: Params{"Identity": identity}, Select: mailboxProps})
	if err != nil {
		return Mailbox{}, err
	}
	if len(objs) != 1 {
		return Mailbox{}, fmt.Errorf("Get-CASMailbox %q: %w: %d objects", identity, ErrTransient, len(objs))
	}
	return toMailbox(objs[0]), nil
}

// ListMailboxes streams the mailboxes that have ActiveSync partnerships.
func (c *Client) ListMailboxes(ctx context.Context, fn func([]Mailbox) error) error {
	return c.stream(ctx, Call{Cmdlet: "Get-CASMailbox", Params: Params{"ResultSize": "Unlimited", "Filter": "HasActiveSyncDevicePartnership -eq $true"}, Select: mailboxProps},
		func(objs []Object) error {
			page := make([]Mailbox, 0, len(objs))
			for _, o := range objs {
				page = append(page, toMailbox(o))
			}
			return fn(page)
		})
}

// OrgSettings are the ActiveSync organisation settings easguard owns.
type OrgSettings struct {
	DefaultAccessLevel  string
	AdminMailRecipients []string
	UserMailInsert      string
}

// GetOrgSettings reads the organisation settings.
func (c *Client) GetOrgSettings(ctx context.Context) (OrgSettings, error) {
	objs, _, err := c.Invoke(ctx, Call{Cmdlet: "Get-ActiveSyncOrganizationSettings", Select: []string{"DefaultAccessLevel", "AdminMailRecipients", "UserMailInsert"}})
	if err != nil {
		return OrgSettings{}, err
	}
	if len(objs) != 1 {
		return OrgSettings{}, fmt.Errorf("Get-ActiveSyncOrganizationSettings: %w: %d objects", ErrTransient, len(objs))
	}
	return OrgSettings{DefaultAccessLevel: enum(objs[0], "DefaultAccessLevel", enumAccessLevel), AdminMailRecipients: strs(objs[0], "AdminMailRecipients"), UserMailInsert: str(objs[0], "UserMailInsert")}, nil
}

// EnforceOrgSettings makes the organisation settings what want says and
// returns them as it found them, with the names of the settings that
// differed (none when they already agreed). An empty field of want is left
// as Exchange has it, so that an administrator's own recipients or mail
// insert are never wiped by a setting easguard was not given. Admin
// recipients are compared case-insensitively as addresses. With apply
// false nothing is changed: the names say what would be (a dry run).
//
// The collector gives it no DefaultAccessLevel: a changed default reaches
// every partnership no list entry or rule covers, so the evaluator plans it
// as a mass revocation and the executor applies it (SetDefaultAccessLevel).
func (c *Client) EnforceOrgSettings(ctx context.Context, want OrgSettings, apply bool) (OrgSettings, []string, error) {
	have, err := c.GetOrgSettings(ctx)
	if err != nil {
		return OrgSettings{}, nil, err
	}
	params := Params{}
	var changed []string
	if want.DefaultAccessLevel != "" && !strings.EqualFold(want.DefaultAccessLevel, have.DefaultAccessLevel) {
		params["DefaultAccessLevel"] = want.DefaultAccessLevel
		changed = append(changed, "DefaultAccessLevel")
	}
	if len(want.AdminMailRecipients) > 0 {
		var add, remove []string
		for _, a := range want.AdminMailRecipients {
			if !containsFold(have.AdminMailRecipients, a) {
				add = append(add, a)
			}
		}
		for _, a := range have.AdminMailRecipients {
			if !containsFold(want.AdminMailRecipients, a) {
				remove = append(remove, a)
			}
		}
		if len(add)+len(remove) > 0 {
			params["AdminMailRecipients"] = MultiValued{Add: add, Remove: remove}
			changed = append(changed, "AdminMailRecipients")
		}
	}
	if want.UserMailInsert != "" && want.UserMailInsert != have.UserMailInsert {
		params["UserMailInsert"] = want.UserMailInsert
		changed = append(changed, "UserMailInsert")
	}
	if len(changed) == 0 || !apply {
		return have, changed, nil
	}
	if _, _, err := c.Invoke(ctx, Call{Cmdlet: "Set-ActiveSyncOrganizationSettings", Params: params}); err != nil {
		return OrgSettings{}, nil, err
	}
	return have, changed, nil
}

// SetDefaultAccessLevel changes the organisation's DefaultAccessLevel to
// to, but only while it is still from: the change was planned (and judged
// by the blast-radius guard) against from, and an administrator who set
// another level since must not be overruled by a stale plan. It returns the
// level it found; the change was made when that equals from (compared
// case-insensitively) and from differs from to.
func (c *Client) SetDefaultAccessLevel(ctx context.Context, from, to string) (string, error) {
	have, err := c.GetOrgSettings(ctx)
	if err != nil {
		return "", err
	}
	if !strings.EqualFold(have.DefaultAccessLevel, from) || strings.EqualFold(from, to) {
		return have.DefaultAccessLevel, nil
	}
	if _, _, err := c.Invoke(ctx, Call{Cmdlet: "Set-ActiveSyncOrganizationSettings", Params: Params{"DefaultAccessLevel": to}}); err != nil {
		return "", err
	}
	return have.DefaultAccessLevel, nil
}

func containsFold(list []string, v string) bool {
	for _, x := range list {
		if strings.EqualFold(x, v) {
			return true
		}
	}
	return false
}

// Access is the list placement a change asks for.
type Access int

// Access placements. Unlist takes the id off both lists, so Exchange's
// device rules and DefaultAccessLevel decide (Quarantine, when easguard
// enforces it).
const (
	AccessAllow Access = iota + 1
	AccessBlock
	AccessUnlist
)

func (a Access) String() string {
	switch a {
	case AccessAllow:
		return "allow"
	case AccessBlock:
		return "block"
	case AccessUnlist:
		return "unlist"
	}
	return fmt.Sprintf("Access(%d)", int(a))
}

// Change asks for one device id of one mailbox to be allowed, blocked or unlisted.
type Change struct {
	Mailbox  string
	DeviceID string
	Access   Access
	// Cause is the span of the decision that asks for the change (zero:
	// none). Exchange's requests for it (the read of the mailbox's lists,
	// the Set-CASMailbox) are then client spans in that device's trace, so
	// one trace shows a phone's journey down to the server that changed
	// it, although the change went out in a batch with others.
	Cause trace.SpanContext
}

// ChangeResult is the outcome of one change: Err is nil when Exchange
// applied it, classified otherwise.
type ChangeResult struct {
	Change
	Err error
	// Unchanged is true when Exchange already held the change (the id was
	// on the list it must be on and on no other), so nothing was sent for
	// it: a retry or redelivery of a change that was applied.
	Unchanged bool
	// Server is the CAS worker's host that applied it (empty when refused locally).
	Server string
}

// checkDeviceID refuses, before anything is sent, what Exchange would
// refuse or what cannot travel byte for byte: empty, over 32 characters,
// invalid UTF-8, NUL or other control characters.
func checkDeviceID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("%w: empty device id", ErrInvalid)
	case !utf8.ValidString(id):
		return fmt.Errorf("%w: device id %q is not valid UTF-8", ErrInvalid, id)
	case utf8.RuneCountInString(id) > MaxDeviceIDLen:
		return fmt.Errorf("%w: device id %q has %d characters, Exchange allows %d", ErrInvalid, id, utf8.RuneCountInString(id), MaxDeviceIDLen)
	case strings.IndexFunc(id, unicode.IsControl) >= 0:
		return fmt.Errorf("%w: device id %q contains a control character", ErrInvalid, id)
	}
	return nil
}

// checkIdentity refuses identities that cannot be an Exchange identity or
// cannot travel byte for byte. An empty one is refused because several
// cmdlets read a missing identity as "everything".
func checkIdentity(id string) error {
	switch {
	case strings.TrimSpace(id) == "":
		return fmt.Errorf("%w: empty identity", ErrInvalid)
	case !utf8.ValidString(id):
		return fmt.Errorf("%w: identity %q is not valid UTF-8", ErrInvalid, id)
	case strings.ContainsRune(id, 0):
		return fmt.Errorf("%w: identity %q contains NUL", ErrInvalid, id)
	case len(id) > 1024:
		return fmt.Errorf("%w: identity of %d bytes", ErrInvalid, len(id))
	}
	return nil
}

// ApplyAccess applies changes the way Exchange handles them best: one
// Set-CASMailbox per mailbox carrying all of that mailbox's adds and
// removes, many mailboxes per round trip, batches on all workers at once.
// Each change says where its id must end up. When one batch holds several
// changes for the same device of a mailbox, the last wins. The error
// return is for the whole batch (a fatal error: authentication,
// permission); item errors are in the results.
//
// Retries and redeliveries apply the same change again, and whether
// Exchange accepts @{Add=id} for an id already on the list, or
// @{Remove=id} for one that is not, is UNCONFIRMED: the lists are
// MultiValuedProperty values, and a strict one would refuse the whole
// Set-CASMailbox. So the mailboxes' lists are read first (one
// Get-CASMailbox per mailbox, batched like the writes) and only what
// differs is sent: an id is added only where it is missing and removed
// only where it is present, naming both lists where both change, so the
// outcome depends neither on Exchange's duplicate handling nor on its
// implicit cross-list removal. A change Exchange already holds gets no
// Set-CASMailbox and its result says Unchanged; that is also what a
// lenient Exchange does with a change that modifies nothing (it warns that
// no settings were modified and writes nothing). A call Exchange refuses is
// checked by reading its mailbox again: when the pool repeated a batch
// whose worker died after the call took effect, Exchange holds the change
// and it is done. The read costs one more round trip per batch, of reads
// that cost a fraction of a write (see README, Exchange access).
func (c *Client) ApplyAccess(ctx context.Context, changes []Change) ([]ChangeResult, error) {
	results := make([]ChangeResult, len(changes))
	type group struct {
		mailbox string
		ids     map[string]int // lower-case id → index of the change that wins
		order   []string
	}
	groups := map[string]*group{}
	var order []string
	for i, ch := range changes {
		results[i] = ChangeResult{Change: ch}
		if err := checkIdentity(ch.Mailbox); err != nil {
			results[i].Err = err
			continue
		}
		if err := checkDeviceID(ch.DeviceID); err != nil {
			results[i].Err = err
			continue
		}
		if ch.Access < AccessAllow || ch.Access > AccessUnlist {
			results[i].Err = fmt.Errorf("%w: unknown access %d", ErrInvalid, int(ch.Access))
			continue
		}
		key := strings.ToLower(ch.Mailbox)
		g := groups[key]
		if g == nil {
			g = &group{mailbox: ch.Mailbox, ids: map[string]int{}}
			groups[key] = g
			order = append(order, key)
		}
		lid := strings.ToLower(ch.DeviceID)
		if prev, ok := g.ids[lid]; ok {
			results[prev].Err = ErrSuperseded
		} else {
			g.order = append(g.order, lid)
		}
		g.ids[lid] = i
	}

	// Read the lists of every mailbox touched.
	reads := make([]Call, len(order))
	for i, key := range order {
		g := groups[key]
		reads[i] = Call{Cmdlet: "Get-CASMailbox", Params: Params{"Identity": g.mailbox},
			Select: []string{"Identity", "ActiveSyncAllowedDeviceIDs", "ActiveSyncBlockedDeviceIDs"}, causes: causesOf(changes, g.ids, g.order)}
	}
	have := make([]Mailbox, len(order))
	readErr := make([]error, len(order))
	fatal := c.runBatches(ctx, reads, true, func(i int, r Result, err error) {
		switch {
		case err != nil:
			readErr[i] = err
		case !r.OK:
			readErr[i] = ResultError("Get-CASMailbox", r.Errors)
		case len(r.Objects) != 1:
			readErr[i] = fmt.Errorf("Get-CASMailbox %q: %w: %d objects", groups[order[i]].mailbox, ErrTransient, len(r.Objects))
		default:
			have[i] = toMailbox(r.Objects[0])
		}
	})

	type item struct {
		call    Call
		members []int
	}
	var items []item
	for gi, key := range order {
		g := groups[key]
		if readErr[gi] != nil {
			for _, lid := range g.order {
				results[g.ids[lid]].Err = readErr[gi]
			}
			continue
		}
		var allowAdd, allowRemove, blockAdd, blockRemove []string
		var members []int
		for _, lid := range g.order {
			i := g.ids[lid]
			id := changes[i].DeviceID
			inAllowed, inBlocked := containsFold(have[gi].Allowed, id), containsFold(have[gi].Blocked, id)
			wantAllowed, wantBlocked := changes[i].Access == AccessAllow, changes[i].Access == AccessBlock
			if inAllowed == wantAllowed && inBlocked == wantBlocked {
				results[i].Unchanged = true
				continue
			}
			members = append(members, i)
			switch {
			case wantAllowed && !inAllowed:
				allowAdd = append(allowAdd, id)
			case !wantAllowed && inAllowed:
				allowRemove = append(allowRemove, id)
			}
			switch {
			case wantBlocked && !inBlocked:
				blockAdd = append(blockAdd, id)
			case !wantBlocked && inBlocked:
				blockRemove = append(blockRemove, id)
			}
		}
		if len(members) == 0 {
			continue
		}
		params := Params{"Identity": g.mailbox}
		if len(allowAdd)+len(allowRemove) > 0 {
			params["ActiveSyncAllowedDeviceIDs"] = MultiValued{Add: allowAdd, Remove: allowRemove}
		}
		if len(blockAdd)+len(blockRemove) > 0 {
			params["ActiveSyncBlockedDeviceIDs"] = MultiValued{Add: blockAdd, Remove: blockRemove}
		}
		var causes []trace.SpanContext
		for _, m := range members {
			causes = append(causes, changes[m].Cause)
		}
		items = append(items, item{call: Call{Cmdlet: "Set-CASMailbox", Params: params, causes: causes}, members: members})
	}
	if fatal != nil || len(items) == 0 {
		return results, fatal
	}
	writes := make([]Call, len(items))
	for i, it := range items {
		writes[i] = it.call
	}
	var refused []int // items Exchange refused
	fatal = c.runBatches(ctx, writes, true, func(i int, r Result, err error) {
		if err == nil && !r.OK {
			err = ResultError("Set-CASMailbox", r.Errors)
		}
		for _, m := range items[i].members {
			results[m].Err = err
		}
		if err != nil && !IsFatal(err) && !errors.Is(err, ErrNotFound) {
			refused = append(refused, i)
		}
	})
	if fatal != nil || len(refused) == 0 {
		return results, fatal
	}
	// The pool repeats a batch whose worker died before answering, so a
	// call that took effect the first time is sent again, and a strict
	// Exchange refuses it. A refused call whose change Exchange now holds
	// is done; the others keep their error.
	checks := make([]Call, len(refused))
	for k, i := range refused {
		checks[k] = Call{Cmdlet: "Get-CASMailbox", Params: Params{"Identity": items[i].call.Params["Identity"]},
			Select: []string{"Identity", "ActiveSyncAllowedDeviceIDs", "ActiveSyncBlockedDeviceIDs"}, causes: items[i].call.causes}
	}
	fatal = c.runBatches(ctx, checks, true, func(k int, r Result, err error) {
		if err != nil || !r.OK || len(r.Objects) != 1 {
			return
		}
		mb := toMailbox(r.Objects[0])
		for _, m := range items[refused[k]].members {
			id := changes[m].DeviceID
			if containsFold(mb.Allowed, id) == (changes[m].Access == AccessAllow) && containsFold(mb.Blocked, id) == (changes[m].Access == AccessBlock) {
				results[m].Err = nil
			}
		}
	})
	return results, fatal
}

// causesOf is the causes of a mailbox's changes, in the group's order.
func causesOf(changes []Change, ids map[string]int, order []string) []trace.SpanContext {
	out := make([]trace.SpanContext, 0, len(order))
	for _, lid := range order {
		out = append(out, changes[ids[lid]].Cause)
	}
	return out
}

// readBatch is the most calls of a batch that is not urgent: about 40 ms
// of Exchange's time at a read's 10 ms, while a round trip costs 2.
const readBatch = 4

// runBatches runs calls in batches spread over every worker: Exchange runs
// the cmdlets of one session one after the other, so a batch is as slow as
// its length, and a round trip costs far less than a cmdlet. fn gets each
// call's result, or the error of its whole batch; calls to fn are
// serialised. It returns the first fatal error (authentication,
// permission). urgent marks the batches of a change (Request.Urgent).
func (c *Client) runBatches(ctx context.Context, calls []Call, urgent bool, fn func(i int, r Result, err error)) error {
	parallel := c.Parallel
	if p, ok := c.r.(interface{ MaxSessions() int }); ok {
		// Split as many ways as the pool may open sessions under a
		// backlog: the requests that wait are what make it grow.
		parallel = max(parallel, p.MaxSessions())
	}
	// Chunks of near-equal length (none over BatchSize), so that the
	// sessions finish a round of them together. A chunk of reads no change
	// waits for is short: a change that arrives while they keep every
	// session busy takes the next one free (Request.Urgent), after at most
	// readBatch cmdlets.
	size := c.BatchSize
	if !urgent {
		size = min(size, readBatch)
	}
	chunks := max(min(len(calls), parallel), (len(calls)+size-1)/size)
	var (
		mu    sync.Mutex
		fatal error
		wg    sync.WaitGroup
		sem   = make(chan struct{}, parallel)
	)
	for k := range chunks {
		start, end := k*len(calls)/chunks, (k+1)*len(calls)/chunks
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r, err := c.r.Do(ctx, Request{Op: "batch", Calls: calls[start:end], Urgent: urgent}, nil)
			mu.Lock()
			defer mu.Unlock()
			if err == nil && len(r.Results) != end-start {
				err = fmt.Errorf("%w: batch of %d calls answered with %d results", ErrTransient, end-start, len(r.Results))
			}
			for i := start; i < end; i++ {
				var res Result
				if err == nil {
					res = r.Results[i-start]
				}
				fn(i, res, err)
			}
			if err != nil && IsFatal(err) && fatal == nil {
				fatal = err
			}
		}()
	}
	wg.Wait()
	return fatal
}

// RemovePartnership deletes a partnership (Remove-ActiveSyncDevice); the
// device is evaluated as new on its next sync.
func (c *Client) RemovePartnership(ctx context.Context, identity string) error {
	if err := checkIdentity(identity); err != nil {
		return err
	}
	_, _, err := c.invoke(ctx, Call{Cmdlet: "Remove-ActiveSyncDevice", Params: Params{"Identity": identity, "Confirm": false}}, true)
	return err
}

// WipePartnership requests a remote wipe (Clear-ActiveSyncDevice), carried
// out at the device's next sync.
func (c *Client) WipePartnership(ctx context.Context, identity string, notify []string) error {
	if err := checkIdentity(identity); err != nil {
		return err
	}
	params := Params{"Identity": identity, "Confirm": false}
	if len(notify) > 0 {
		params["NotificationEmailAddresses"] = notify
	}
	_, _, err := c.invoke(ctx, Call{Cmdlet: "Clear-ActiveSyncDevice", Params: params}, true)
	return err
}

// Server is an Exchange server of the organisation.
type Server struct {
	Name    string
	FQDN    string
	Version string
	Roles   string
	Site    string
}

// Servers lists the organisation's Exchange servers.
func (c *Client) Servers(ctx context.Context) ([]Server, error) {
	objs, _, err := c.Invoke(ctx, Call{Cmdlet: "Get-ExchangeServer", Select: []string{"Name", "Fqdn", "AdminDisplayVersion", "ServerRole", "Site"}})
	if err != nil {
		return nil, err
	}
	out := make([]Server, 0, len(objs))
	for _, o := range objs {
		out = append(out, Server{Name: str(o, "Name"), FQDN: str(o, "Fqdn"), Version: str(o, "AdminDisplayVersion"), Roles: str(o, "ServerRole"), Site: str(o, "Site")})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Count runs a listing with one small property and counts the objects.
func (c *Client) Count(ctx context.Context, cmdlet string, params Params) (int, error) {
	n := 0
	err := c.stream(ctx, Call{Cmdlet: cmdlet, Params: params, Select: []string{"Guid"}}, func(objs []Object) error {
		n += len(objs)
		return nil
	})
	return n, err
}

// QuoteFilterValue quotes a value for an OPATH -Filter, the one place
// where Exchange parses text: single quotes, with every ' doubled. Curly
// single quotes are refused, because whether Exchange's OPATH parser treats
// them as quotes is unconfirmed (reference/exchange.md §13), and so are
// control characters.
func QuoteFilterValue(v string) (string, error) {
	if !utf8.ValidString(v) || strings.IndexFunc(v, unicode.IsControl) >= 0 {
		return "", fmt.Errorf("%w: filter value %q holds invalid UTF-8 or a control character", ErrInvalid, v)
	}
	if strings.ContainsAny(v, "\u2018\u2019\u201A\u201B") {
		return "", fmt.Errorf("%w: filter value %q holds a typographic single quote", ErrInvalid, v)
	}
	return "'" + strings.ReplaceAll(v, "'", "''") + "'", nil
}

// Recipient is a mailbox as Get-Recipient reports it: the addresses the
// MDM knows its user by.
type Recipient struct {
	// Identity is the canonical name (contoso.com/Users/Alice), the form
	// Get-MobileDevice names a partnership's mailbox with.
	Identity           string
	GUID               string
	PrimarySmtpAddress string
	// UserPrincipalName may be empty: whether on-premises Get-Recipient
	// returns it is unconfirmed; callers fall back to PrimarySmtpAddress.
	UserPrincipalName string
	DisplayName       string
}

var recipientProps = []string{"Identity", "Guid", "PrimarySmtpAddress", "UserPrincipalName", "DisplayName"}

func toRecipient(o Object) Recipient {
	return Recipient{Identity: str(o, "Identity"), GUID: str(o, "Guid"), PrimarySmtpAddress: str(o, "PrimarySmtpAddress"),
		UserPrincipalName: str(o, "UserPrincipalName"), DisplayName: str(o, "DisplayName")}
}

// ListRecipients streams the recipients that have ActiveSync partnerships.
// Like the full partnership listing it is read in parts at once, split on
// the recipients' Alias (partition.go); fn gets one page at a time, and
// the listing fails if any part does.
func (c *Client) ListRecipients(ctx context.Context, fn func([]Recipient) error) error {
	call := Call{Cmdlet: "Get-Recipient", Params: Params{"ResultSize": "Unlimited"}, Select: slices.Concat(recipientProps, []string{"Alias"})}
	return streamPartitioned(ctx, c, call, "Alias", recipientsFilter, evenWeight, toRecipient, fn)
}

// recipientsFilter selects the recipients with ActiveSync partnerships.
const recipientsFilter = "HasActiveSyncDevicePartnership -eq $true"

// GetRecipient reads one recipient.
func (c *Client) GetRecipient(ctx context.Context, identity string) (Recipient, error) {
	if err := checkIdentity(identity); err != nil {
		return Recipient{}, err
	}
	objs, _, err := c.Invoke(ctx, Call{Cmdlet: "Get-Recipient", Params: Params{"Identity": identity}, Select: recipientProps})
	if err != nil {
		return Recipient{}, err
	}
	if len(objs) != 1 {
		return Recipient{}, fmt.Errorf("Get-Recipient %q: %w: %d objects", identity, ErrTransient, len(objs))
	}
	return toRecipient(objs[0]), nil
}
