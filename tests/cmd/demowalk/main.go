// Command demowalk walks one phone through easguard's seed flow against a
// running demo (deploy/demo.sh): it creates a mailbox on the Exchange
// simulator, lets a new phone sync (Exchange quarantines it), prints every
// event easguard publishes about the phone as it arrives (observed,
// matched, decided BLOCK, applied, notified), reads the mail the user got
// from the SMTP simulator, lets the phone sync again (Blocked), enrols the
// phone in the MDM as compliant, prints the events that follow (MDM
// change, match, ALLOW, applied), and lets the phone sync a last time
// (Allowed, it gets mail).
//
// The MDM is Intune, simulated by intunesim, when -intune names its admin
// API: the phone is enrolled there and easguard's Graph source sees it with
// its next poll. With -inventory instead, the phone is written into the
// MDM inventory file easguard reads.
//
// Every step has a deadline; demowalk exits 1 with the step and what it
// was waiting for when one passes, and 0 when the phone got mail.
//
// Usage:
//
//	demowalk -exchange URL -smtp URL (-intune URL | -inventory FILE) [-mailbox ADDR] [flags]
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/status"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

func main() {
	var o options
	flag.StringVar(&o.org, "org", "contoso", "easguard organisation (the subject token)")
	flag.StringVar(&o.natsURL, "nats", "nats://127.0.0.1:4222", "NATS server of easguard")
	flag.StringVar(&o.easguard, "easguard", "http://127.0.0.1:8443", "easguard's console (its API's status of the organisation)")
	flag.StringVar(&o.token, "token", os.Getenv("EASGUARD_TOKEN"), "an API token of the console (default $EASGUARD_TOKEN)")
	flag.StringVar(&o.exchange, "exchange", "", "exchangesim's admin API URL (required)")
	flag.StringVar(&o.smtp, "smtp", "", "smtpsim's HTTP API URL (or -mailpit)")
	flag.StringVar(&o.mailpit, "mailpit", "", "Mailpit's URL (its API /api/v1), when easguard mails through Mailpit instead of smtpsim")
	flag.StringVar(&o.intune, "intune", "", "intunesim's admin API URL: the user enrols in Intune, which easguard reads through Graph")
	flag.StringVar(&o.inventory, "inventory", "", "the MDM inventory file easguard reads (EASGUARD_MDM_FILE), instead of -intune")
	flag.StringVar(&o.mailbox, "mailbox", "demo.user@contoso.com", "the user's mailbox; created if it does not exist")
	flag.StringVar(&o.deviceID, "device-id", "", "the phone's ActiveSync device id (default: a new one per run)")
	flag.StringVar(&o.enrolURL, "enrol-url", "", "the enrolment link the mail must carry (EASGUARD_MAILER_ENROL_URL)")
	flag.DurationVar(&o.step, "step-timeout", 60*time.Second, "deadline of each step")
	flag.DurationVar(&o.fullSync, "full-sync-timeout", 2*time.Minute, "deadline of easguard's first full sync")
	flag.Parse()
	if o.exchange == "" || (o.smtp == "") == (o.mailpit == "") || (o.intune == "") == (o.inventory == "") || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "demowalk: -exchange, one of -smtp and -mailpit, and one of -intune and -inventory are required (deploy/demo.sh passes them)")
		flag.Usage()
		os.Exit(2)
	}
	if o.deviceID == "" {
		o.deviceID = fmt.Sprintf("ApplDEMO%08X", uint32(time.Now().Unix()))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o, os.Stdout)
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "\ndemowalk: FAILED: %v\n", err)
		os.Exit(1)
	}
}

// options are the command line.
type options struct {
	org, natsURL, easguard, exchange, smtp string
	mailpit                                string // Mailpit's URL, instead of smtpsim's (smtp)
	token                                  string
	intune, inventory                      string // the MDM: intunesim's admin API, or the inventory file
	mailbox, deviceID, enrolURL            string
	step, fullSync                         time.Duration
}

// graph tells whether the MDM is Intune (through Graph), not a file.
func (o options) graph() bool { return o.intune != "" }

// mdmKind is the MDM source's kind, which names its status key
// (status.MDMSourceKey).
func (o options) mdmKind() string {
	if o.graph() {
		return "graph"
	}
	return "file"
}

// phone is a simulated phone as exchangesim's POST /api/phones/sync takes it.
type phone struct {
	Mailbox      string `json:"mailbox"`
	DeviceID     string `json:"device_id"`
	DeviceType   string `json:"device_type"`
	DeviceModel  string `json:"device_model"`
	DeviceOS     string `json:"device_os"`
	UserAgent    string `json:"user_agent"`
	FriendlyName string `json:"friendly_name"`
}

// syncResult is what the phone saw.
type syncResult struct {
	Created    bool   `json:"created"`
	HTTPStatus int    `json:"http_status"`
	State      string `json:"access_state"`
	Reason     string `json:"access_state_reason"`
	GetsMail   bool   `json:"gets_mail"`
	Error      string `json:"error"`
}

// mail is one message as smtpsim's GET /api/messages lists it.
type mail struct {
	ID        int      `json:"id"`
	From      string   `json:"from"`
	To        []string `json:"to"`
	Subject   string   `json:"subject"`
	MessageID string   `json:"message_id"`
	Text      string   `json:"text"`
	TLS       bool     `json:"tls"`
}

// walker is one walk: its options, its view of easguard's events, and the
// start time every printed line is relative to.
type walker struct {
	o      options
	out    io.Writer
	feed   *feed
	start  time.Time
	client *http.Client
	phone  phone
	traces map[string][]string // trace id → the families of the phone's events in it
	order  []string            // trace ids in the order first seen

	nc                *nats.Conn
	enrolled, allowed time.Time // when the phone was enrolled in the MDM, when easguard applied the allow
}

func run(ctx context.Context, o options, out io.Writer) error {
	w := &walker{o: o, out: out, feed: newFeed(o.org), start: time.Now(), client: &http.Client{Timeout: 10 * time.Second},
		traces: map[string][]string{}}
	user := o.mailbox
	if i := strings.IndexByte(user, '@'); i > 0 {
		user = user[:i]
	}
	w.phone = phone{Mailbox: o.mailbox, DeviceID: o.deviceID, DeviceType: "iPhone", DeviceModel: "iPhone15C2",
		DeviceOS: "iOS 17.4 21E219", UserAgent: "Apple-iPhone15C2/2104.219", FriendlyName: user + "'s iPhone"}

	nc, err := nats.Connect(o.natsURL, nats.Name("demowalk"))
	if err != nil {
		return fmt.Errorf("connect to easguard's NATS server %s: %w", o.natsURL, err)
	}
	defer nc.Close()
	w.nc = nc
	sub, err := nc.Subscribe("easguard."+o.org+".>", w.feed.add)
	if err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.Flush(); err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}

	fmt.Fprintf(out, "== The seed flow: phone %s of %s\n", o.deviceID, o.mailbox)
	fmt.Fprintf(out, "   (events from nats %s, subjects easguard.%s.>; times since the walk started)\n\n", o.natsURL, o.org)
	enrolTitle := "E. The user enrols: the MDM inventory now lists the phone as compliant"
	if o.graph() {
		enrolTitle = "E. The user enrols: Intune now lists the phone as compliant; easguard reads it through Graph"
	}
	steps := []struct {
		title   string
		timeout time.Duration
		do      func(context.Context) error
	}{
		{"easguard's first full sync (Exchange's DefaultAccessLevel is Quarantine) and first MDM read", o.fullSync, w.waitStart},
		{"A. A new mailbox on Exchange", o.step, w.createMailbox},
		{"B. The phone syncs for the first time", o.step, w.firstSync},
		{"C. easguard sees the phone, knows no MDM record for it, blocks it and mails its user", o.step, w.blockAndMail},
		{"D. The phone syncs again", o.step, w.blockedSync},
		{enrolTitle, o.step, w.enrol},
		{"F. The phone syncs", o.step, w.allowedSync},
	}
	for _, s := range steps {
		fmt.Fprintf(out, "%s\n", s.title)
		sctx, cancel := context.WithTimeout(ctx, s.timeout)
		err := s.do(sctx)
		cancel()
		if err != nil {
			return fmt.Errorf("%s: %w", s.title, err)
		}
		fmt.Fprintln(out)
	}
	w.printTraces()
	return nil
}

// at is the time since the walk started, for the start of a line.
func (w *walker) at(t time.Time) string {
	return fmt.Sprintf("[%5.1fs]", t.Sub(w.start).Seconds())
}

func (w *walker) printf(format string, args ...any) {
	fmt.Fprintf(w.out, "%s %s\n", w.at(time.Now()), fmt.Sprintf(format, args...))
}

// waitStart waits for easguard's first full sync and its MDM source's
// first read.
func (w *walker) waitStart(ctx context.Context) error {
	if err := w.waitFullSync(ctx); err != nil {
		return err
	}
	return w.waitMDM(ctx)
}

// waitMDM waits until easguard's status shows that its MDM source has read
// the MDM, and says how many mdm.changed events easguard had published by
// then: with Intune, one for each device of the seeded organisation that
// Intune knows, before the walk's phone exists.
func (w *walker) waitMDM(ctx context.Context) error {
	key := status.MDMSourceKey(w.o.mdmKind())
	var last error
	for {
		var st struct {
			Status map[string]json.RawMessage `json:"status"`
		}
		code, err := w.getJSON(ctx, w.statusURL(), &st)
		switch {
		case err != nil:
			last = err
		case code != http.StatusOK:
			last = fmt.Errorf("GET status: HTTP %d", code)
		case st.Status[key] != nil:
			var src status.MDMSource
			if err := json.Unmarshal(st.Status[key], &src); err != nil {
				return fmt.Errorf("status %s: %w", key, err)
			}
			if src.State != status.MDMOK {
				return fmt.Errorf("status %s: %s is %s: %s", key, src.Source, src.State, src.Summary)
			}
			held, err := w.mdmEvents(ctx)
			if err != nil {
				return err
			}
			read := ""
			switch {
			case src.Devices != nil:
				read = ", " + plural(*src.Devices, "device")
			case src.LastChanges != nil:
				read = ", " + plural(*src.LastChanges, "change")
			}
			w.printf("done: status %s: %s, %s at %s%s; easguard has published %s",
				key, src.Source, src.State, src.At.Local().Format(time.TimeOnly), read, plural(held, "mdm.changed event"))
			return nil
		default:
			last = fmt.Errorf("no %s in the status yet", key)
		}
		if err := pause(ctx, 250*time.Millisecond); err != nil {
			return fmt.Errorf("the MDM source has not read the MDM (%v): %w", last, err)
		}
	}
}

// mdmEvents counts the org's mdm.changed events in easguard's stream.
func (w *walker) mdmEvents(ctx context.Context) (int, error) {
	js, err := jetstream.New(w.nc)
	if err != nil {
		return 0, fmt.Errorf("JetStream: %w", err)
	}
	s, err := js.Stream(ctx, bus.StreamMDM)
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", bus.StreamMDM, err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter("easguard."+w.o.org+".mdm.changed.>"))
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", bus.StreamMDM, err)
	}
	n := 0
	for _, c := range info.State.Subjects {
		n += int(c)
	}
	return n, nil
}

// waitFullSync waits until easguard's status shows a successful full sync.
func (w *walker) waitFullSync(ctx context.Context) error {
	key := status.SyncOKKey("full")
	var last error
	for {
		var st struct {
			Status map[string]json.RawMessage `json:"status"`
		}
		code, err := w.getJSON(ctx, w.statusURL(), &st)
		switch {
		case err != nil:
			last = err
		case code != http.StatusOK:
			last = fmt.Errorf("GET status: HTTP %d", code)
		case st.Status[key] != nil:
			var full status.Sync
			if err := json.Unmarshal(st.Status[key], &full); err != nil {
				return fmt.Errorf("status %s: %w", key, err)
			}
			w.printf("done: status %s: %s on %s finished %s, %d partnerships observed, settings enforced: %s",
				key, full.SyncID, full.Server, full.FinishedAt.Local().Format(time.TimeOnly), full.Counts["observed"], strings.Join(full.Settings, ", "))
			return nil
		default:
			last = fmt.Errorf("no %s in the status yet", key)
		}
		if err := pause(ctx, 250*time.Millisecond); err != nil {
			return fmt.Errorf("no successful full sync within %s (%v): %w", w.o.fullSync, last, err)
		}
	}
}

// createMailbox creates the user's mailbox, or finds it from an earlier walk.
func (w *walker) createMailbox(ctx context.Context) error {
	alias, domain, _ := strings.Cut(w.o.mailbox, "@")
	spec := map[string]string{"Alias": alias, "Domain": domain, "DisplayName": displayName(alias)}
	var created struct {
		Identity    string `json:"identity"`
		PrimarySMTP string `json:"primary_smtp"`
		Error       string `json:"error"`
	}
	code, err := w.postJSON(ctx, w.o.exchange+"/api/mailboxes", spec, &created)
	if err != nil {
		return err
	}
	switch code {
	case http.StatusCreated:
		w.printf("POST %s/api/mailboxes → %d: %s (%s)", w.o.exchange, code, created.PrimarySMTP, created.Identity)
		return nil
	case http.StatusConflict:
		var list []json.RawMessage
		if c, err := w.getJSON(ctx, w.o.exchange+"/api/partnerships?mailbox="+url.QueryEscape(w.o.mailbox), &list); err == nil && c == http.StatusOK {
			w.printf("%s exists already (from an earlier walk), with %d phone(s)", w.o.mailbox, len(list))
			return nil
		}
	}
	return fmt.Errorf("POST /api/mailboxes: HTTP %d: %s", code, created.Error)
}

// firstSync lets the new phone sync: Exchange must hold it in quarantine.
func (w *walker) firstSync(ctx context.Context) error {
	r, err := w.sync(ctx)
	if err != nil {
		return err
	}
	w.printf("POST %s/api/phones/sync (%s, %s) → %s", w.o.exchange, w.phone.DeviceType, w.phone.FriendlyName, describe(r))
	if !r.Created || r.State != "Quarantined" || r.GetsMail {
		return fmt.Errorf("Exchange gave the new phone %+v; want a new partnership, Quarantined (Exchange's DefaultAccessLevel is Quarantine)", r)
	}
	return nil
}

// blockAndMail waits for the block and the mail, and reads the mail.
func (w *walker) blockAndMail(ctx context.Context) error {
	var sent *ev.NotificationSent
	err := w.await(ctx,
		want("eas.observed NEW", func(m *ev.EASPartnershipObserved) bool {
			return m.GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_NEW
		}),
		want("device.matched without an MDM record", func(m *ev.DeviceMatched) bool { return m.GetMdm() == nil }),
		want("access.decided BLOCK", func(m *ev.AccessDecided) bool {
			return m.GetDesired() == ev.DesiredAccess_DESIRED_ACCESS_BLOCK
		}),
		want("access.applied BLOCK", w.applied(ev.DesiredAccess_DESIRED_ACCESS_BLOCK)),
		want("notify.sent", func(m *ev.NotificationSent) bool { sent = m; return true }),
	)
	if err != nil {
		return err
	}
	if w.o.mailpit != "" {
		return w.mailpitMail(ctx, sent)
	}
	var got mail
	for {
		var mails []mail
		code, err := w.getJSON(ctx, w.o.smtp+"/api/messages", &mails)
		if err == nil && code == http.StatusOK {
			for _, m := range mails {
				if strings.Trim(m.MessageID, "<>") == strings.Trim(sent.GetMessageId(), "<>") {
					got = m
				}
			}
		}
		if got.ID != 0 {
			break
		}
		if err := pause(ctx, 200*time.Millisecond); err != nil {
			return fmt.Errorf("smtpsim has no mail with the Message-ID %s of notify.sent after %s: %w", sent.GetMessageId(), w.o.step, err)
		}
	}
	w.printf("mail in smtpsim #%d, to %s, from %s (TLS %v)", got.ID, strings.Join(got.To, ", "), got.From, got.TLS)
	fmt.Fprintf(w.out, "          subject: %s\n", got.Subject)
	if err := w.printEnrolLink(got.Text); err != nil {
		return err
	}
	fmt.Fprintf(w.out, "          read it: %s/messages/%d/html (or /text)\n", w.o.smtp, got.ID)
	return nil
}

// printEnrolLink prints the line of a mail's text with the enrolment link
// (EASGUARD_MAILER_ENROL_URL, or any https link without -enrol-url).
func (w *walker) printEnrolLink(text string) error {
	for _, line := range strings.Split(text, "\n") {
		if line = strings.TrimSpace(line); (w.o.enrolURL != "" && strings.Contains(line, w.o.enrolURL)) ||
			(w.o.enrolURL == "" && strings.Contains(line, "https://")) {
			fmt.Fprintf(w.out, "          enrol:   %s\n", line)
			return nil
		}
	}
	return fmt.Errorf("the mail's text has no line with the enrolment link %q:\n%s", w.o.enrolURL, text)
}

// mailpitMail finds the mail of notify.sent in Mailpit (its API: the latest
// messages, then the one with the Message-ID) and checks its enrolment link.
func (w *walker) mailpitMail(ctx context.Context, sent *ev.NotificationSent) error {
	type address struct {
		Address string `json:"Address"`
	}
	type message struct {
		ID        string    `json:"ID"`
		MessageID string    `json:"MessageID"`
		From      *address  `json:"From"`
		To        []address `json:"To"`
		Subject   string    `json:"Subject"`
		Text      string    `json:"Text"`
	}
	want := strings.Trim(sent.GetMessageId(), "<>")
	var got message
	for got.ID == "" {
		var list struct {
			Messages []message `json:"messages"`
		}
		code, err := w.getJSON(ctx, w.o.mailpit+"/api/v1/search?limit=50&query="+url.QueryEscape("message-id:"+want), &list)
		if err == nil && code == http.StatusOK {
			for _, m := range list.Messages {
				if strings.Trim(m.MessageID, "<>") == want {
					got = m
				}
			}
		}
		if got.ID != "" {
			break
		}
		if err := pause(ctx, 200*time.Millisecond); err != nil {
			return fmt.Errorf("mailpit has no mail with the Message-ID %s of notify.sent after %s: %w", sent.GetMessageId(), w.o.step, err)
		}
	}
	if code, err := w.getJSON(ctx, w.o.mailpit+"/api/v1/message/"+url.PathEscape(got.ID), &got); err != nil || code != http.StatusOK {
		return fmt.Errorf("mailpit message %s: HTTP %d: %v", got.ID, code, err)
	}
	var to []string
	for _, a := range got.To {
		to = append(to, a.Address)
	}
	from := ""
	if got.From != nil {
		from = got.From.Address
	}
	w.printf("mail in mailpit %s, to %s, from %s", got.ID, strings.Join(to, ", "), from)
	fmt.Fprintf(w.out, "          subject: %s\n", got.Subject)
	if err := w.printEnrolLink(got.Text); err != nil {
		return err
	}
	fmt.Fprintf(w.out, "          read it: %s/view/%s\n", w.o.mailpit, got.ID)
	return nil
}

// blockedSync: the phone's next sync is refused.
func (w *walker) blockedSync(ctx context.Context) error {
	r, err := w.syncUntil(ctx, "Blocked")
	if err != nil {
		return err
	}
	if r.GetsMail {
		return fmt.Errorf("a blocked phone gets mail: %+v", r)
	}
	return nil
}

// enrol enrols the phone in the MDM as compliant (in Intune, or in the
// inventory file) and waits for easguard to allow it.
func (w *walker) enrol(ctx context.Context) error {
	if w.o.graph() {
		if err := w.enrolIntune(ctx); err != nil {
			return err
		}
	} else {
		n, err := w.writeInventory()
		if err != nil {
			return err
		}
		w.enrolled = time.Now()
		w.printf("wrote %s (%d records): intune-%s, %s, easDeviceId %s, compliant, managed", w.o.inventory, n, w.o.deviceID, w.o.mailbox, w.o.deviceID)
	}
	applied := want("access.applied ALLOW", w.applied(ev.DesiredAccess_DESIRED_ACCESS_ALLOW))
	err := w.await(ctx,
		want("mdm.changed", func(m *ev.MDMDeviceChanged) bool {
			return m.GetDevice().GetComplianceState() == ev.ComplianceState_COMPLIANCE_STATE_COMPLIANT
		}),
		want("device.matched with the MDM record", func(m *ev.DeviceMatched) bool { return m.GetMdm() != nil }),
		want("access.decided ALLOW", func(m *ev.AccessDecided) bool {
			return m.GetDesired() == ev.DesiredAccess_DESIRED_ACCESS_ALLOW
		}),
		applied,
	)
	w.allowed = applied.at
	return err
}

// allowedSync: the phone's next sync gets mail.
func (w *walker) allowedSync(ctx context.Context) error {
	r, err := w.syncUntil(ctx, "Allowed")
	if err != nil {
		return err
	}
	took := time.Since(w.enrolled)
	if !r.GetsMail {
		return fmt.Errorf("an allowed phone gets no mail: %+v", r)
	}
	from := "the inventory write"
	if w.o.graph() {
		from = "the enrolment in Intune"
	}
	fmt.Fprintf(w.out, "          time to allow: %.1fs from %s to the phone getting mail (easguard applied the allow after %.1fs)\n",
		took.Seconds(), from, w.allowed.Sub(w.enrolled).Seconds())
	return nil
}

// intuneDevice is a managedDevice as intunesim's admin API takes and
// returns it (the properties the walk sets or prints).
type intuneDevice struct {
	ID                string `json:"id,omitempty"`
	UserPrincipalName string `json:"userPrincipalName"`
	EmailAddress      string `json:"emailAddress"`
	EASDeviceID       string `json:"easDeviceId"`
	EASActivated      bool   `json:"easActivated"`
	ComplianceState   string `json:"complianceState"`
	ManagementState   string `json:"managementState"`
	OperatingSystem   string `json:"operatingSystem"`
	OSVersion         string `json:"osVersion"`
	Model             string `json:"model"`
	Manufacturer      string `json:"manufacturer"`
}

// enrolIntune enrols the phone in the simulated Intune as a managed,
// compliant iPhone with Exchange's device id, as the Company Portal would
// once the user has enrolled. A record that an earlier walk with the same
// device id left is made compliant instead.
func (w *walker) enrolIntune(ctx context.Context) error {
	var found []intuneDevice
	u := w.o.intune + "/api/devices?easDeviceId=" + url.QueryEscape(w.o.deviceID)
	if code, err := w.getJSON(ctx, u, &found); err != nil {
		return err
	} else if code != http.StatusOK {
		return fmt.Errorf("GET %s: HTTP %d", u, code)
	}
	var got struct {
		intuneDevice
		Error string `json:"error"`
	}
	if len(found) > 0 {
		u = w.o.intune + "/api/devices/" + url.PathEscape(found[0].ID) + "/compliance"
		code, err := w.postJSON(ctx, u, map[string]string{"state": "compliant"}, &got)
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("POST %s: HTTP %d: %s", u, code, got.Error)
		}
		w.enrolled = time.Now()
		w.printf("POST %s → %d: Intune device %s (from an earlier walk) is compliant again", u, code, got.ID)
		return nil
	}
	d := intuneDevice{UserPrincipalName: w.o.mailbox, EmailAddress: w.o.mailbox, EASDeviceID: w.o.deviceID, EASActivated: true,
		ComplianceState: "compliant", ManagementState: "managed", OperatingSystem: "iOS", OSVersion: "17.4", Model: "iPhone 15", Manufacturer: "Apple"}
	u = w.o.intune + "/api/devices"
	code, err := w.postJSON(ctx, u, d, &got)
	if err != nil {
		return err
	}
	if code != http.StatusCreated {
		return fmt.Errorf("POST %s: HTTP %d: %s", u, code, got.Error)
	}
	w.enrolled = time.Now()
	w.printf("POST %s → %d: Intune device %s, %s, easDeviceId %s, %s, %s", u, code, got.ID, got.UserPrincipalName, got.EASDeviceID,
		got.ComplianceState, got.ManagementState)
	fmt.Fprintf(w.out, "          (easguard's Graph source sees it with its next read of deviceManagement/managedDevices)\n")
	return nil
}

// writeInventory adds the phone's record to the inventory, keeping the
// records there, and replaces the file at once, as an export job would.
func (w *walker) writeInventory() (int, error) {
	raw, err := os.ReadFile(w.o.inventory)
	if err != nil {
		return 0, fmt.Errorf("read the inventory: %w", err)
	}
	var records []json.RawMessage
	if len(bytes.TrimSpace(raw)) > 0 {
		if err := json.Unmarshal(raw, &records); err != nil {
			return 0, fmt.Errorf("the inventory %s is not a JSON array: %w", w.o.inventory, err)
		}
	}
	rec, err := json.Marshal(map[string]string{
		"id": "intune-" + w.o.deviceID, "userPrincipalName": w.o.mailbox, "easDeviceId": w.o.deviceID,
		"complianceState": "compliant", "managementState": "managed", "operatingSystem": "iOS", "osVersion": "17.4",
		"model": "iPhone 15", "lastSyncDateTime": time.Now().UTC().Format(time.RFC3339),
	})
	if err != nil {
		return 0, fmt.Errorf("inventory record: %w", err)
	}
	records = append(records, rec)
	b, err := json.MarshalIndent(records, "", "  ")
	if err != nil {
		return 0, fmt.Errorf("inventory: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(w.o.inventory), ".inventory-*.json")
	if err != nil {
		return 0, fmt.Errorf("write the inventory: %w", err)
	}
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return 0, fmt.Errorf("write the inventory: %w", err)
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return 0, fmt.Errorf("write the inventory: %w", err)
	}
	if err := os.Rename(tmp.Name(), w.o.inventory); err != nil {
		os.Remove(tmp.Name())
		return 0, fmt.Errorf("replace the inventory: %w", err)
	}
	return len(records), nil
}

// sync is one ActiveSync request of the phone.
func (w *walker) sync(ctx context.Context) (syncResult, error) {
	var r syncResult
	code, err := w.postJSON(ctx, w.o.exchange+"/api/phones/sync", w.phone, &r)
	if err != nil {
		return r, err
	}
	if code != http.StatusOK {
		return r, fmt.Errorf("POST /api/phones/sync: HTTP %d %+v", code, r)
	}
	return r, nil
}

// syncUntil lets the phone sync until Exchange gives it the state want.
func (w *walker) syncUntil(ctx context.Context, want string) (syncResult, error) {
	var last syncResult
	for i := 0; ; i++ {
		r, err := w.sync(ctx)
		if err != nil {
			return r, err
		}
		if i == 0 || r != last {
			w.printf("POST %s/api/phones/sync → %s", w.o.exchange, describe(r))
		}
		last = r
		if r.State == want {
			return r, nil
		}
		if err := pause(ctx, 250*time.Millisecond); err != nil {
			return r, fmt.Errorf("the phone is still %s after %s, not %s: %w", r.State, w.o.step, want, err)
		}
	}
}

func describe(r syncResult) string {
	s := fmt.Sprintf("HTTP %d, %s (%s)", r.HTTPStatus, r.State, r.Reason)
	switch {
	case r.Error != "":
		s += ", error " + r.Error
	case r.GetsMail:
		s += ": the phone gets mail"
	case r.State == "Quarantined":
		s += ": a limited sync that shows only Exchange's quarantine notice, no mail"
	default:
		s += ": no mail"
	}
	return s
}

// applied matches an access.applied that applied desired to the phone.
func (w *walker) applied(desired ev.DesiredAccess) func(*ev.AccessApplied) bool {
	return func(m *ev.AccessApplied) bool {
		for _, it := range m.GetItems() {
			if strings.EqualFold(it.GetDeviceId(), w.o.deviceID) && it.GetDesired() == desired && it.GetOutcome() == ev.ApplyOutcome_APPLY_OUTCOME_APPLIED {
				return true
			}
		}
		return false
	}
}

// expectation is one event a step waits for.
type expectation struct {
	name  string
	match func(proto.Message) bool
	seen  bool
	at    time.Time // when the event that met it arrived
}

// want is an expectation of an event of type T.
func want[T proto.Message](name string, match func(T) bool) *expectation {
	return &expectation{name: name, match: func(m proto.Message) bool {
		t, ok := m.(T)
		return ok && match(t)
	}}
}

// await prints the phone's events as they arrive until each expectation
// has been met (in any order), or ctx ends. Only the events describeEvent
// prints are matched, so an expectation need not check the device id.
func (w *walker) await(ctx context.Context, wants ...*expectation) error {
	for {
		var missing []string
		for _, x := range wants {
			if !x.seen {
				missing = append(missing, x.name)
			}
		}
		if len(missing) == 0 {
			return nil
		}
		e, err := w.feed.next(ctx)
		if err != nil {
			return fmt.Errorf("no %s within %s: %w", strings.Join(missing, ", "), w.o.step, err)
		}
		line, ok := w.describeEvent(e)
		if !ok {
			continue
		}
		fmt.Fprintf(w.out, "%s %-15s %s\n", w.at(e.at), e.family, line)
		// Alerts have traces of their own ("alert.sync-overdue" and the
		// like): one that came first is not the phone's journey.
		if e.trace != "" && !strings.HasPrefix(e.family, "alert") {
			if _, ok := w.traces[e.trace]; !ok {
				w.order = append(w.order, e.trace)
			}
			w.traces[e.trace] = append(w.traces[e.trace], e.family)
		}
		for _, x := range wants {
			if !x.seen && x.match(e.msg) {
				x.seen, x.at = true, e.at
				break
			}
		}
	}
}

// describeEvent is the line printed for an event about the phone (or an
// alert); ok is false for every other event, and for the routine
// re-observation of an unchanged partnership.
func (w *walker) describeEvent(e event) (line string, ok bool) {
	mine := func(id string) bool { return strings.EqualFold(id, w.o.deviceID) }
	switch m := e.msg.(type) {
	case *ev.EASPartnershipObserved:
		p := m.GetPartnership()
		if !mine(p.GetDeviceId()) || m.GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED {
			return "", false
		}
		return fmt.Sprintf("%s: %s of %s is %s (%s) on Exchange [%s sync %s]", short(m.GetChange()), p.GetDeviceId(),
			p.GetMailbox().GetPrimarySmtpAddress(), camel(short(p.GetDeviceAccessState())), camel(short(p.GetDeviceAccessStateReason())),
			strings.ToLower(short(m.GetSync().GetKind())), m.GetSync().GetSyncId()), true
	case *ev.DeviceMatched:
		o := m.GetObserved()
		if !mine(o.GetPartnership().GetDeviceId()) || (o.GetChange() == ev.ObservationChange_OBSERVATION_CHANGE_UNCHANGED && m.GetTrigger() == "eas") {
			return "", false
		}
		if d := m.GetMdm(); d != nil {
			return fmt.Sprintf("matched MDM device %s (%s, %s) by %s [after %s]", d.GetMdmDeviceId(), lower(d.GetComplianceState()),
				lower(d.GetEnrollmentState()), short(m.GetMethod()), m.GetTrigger()), true
		}
		s := "no match: " + short(m.GetNoMatchReason())
		if m.GetDetail() != "" {
			s += " (" + m.GetDetail() + ")"
		}
		return s + " [after " + m.GetTrigger() + "]", true
	case *ev.AccessDecided:
		if !mine(m.GetPartnership().GetDeviceId()) {
			return "", false
		}
		s := fmt.Sprintf("%s by rule %s: %s", short(m.GetDesired()), m.GetRule(), m.GetReason())
		if m.GetNotifyUser() {
			s += " (the user is to be told: " + m.GetNotifyReason() + ")"
		}
		if m.GetDryRun() {
			s += " [dry run]"
		}
		return s, true
	case *ev.AccessApplied:
		var items []string
		for _, it := range m.GetItems() {
			if mine(it.GetDeviceId()) {
				s := short(it.GetDesired()) + " " + short(it.GetOutcome())
				if it.GetError() != "" {
					s += ": " + it.GetError()
				}
				items = append(items, s)
			}
		}
		if items == nil {
			return "", false
		}
		var cmdlets []string
		for _, c := range m.GetCmdlets() {
			if strings.Contains(cmdletText(c), w.o.deviceID) {
				cmdlets = append(cmdlets, cmdletText(c))
			}
		}
		s := fmt.Sprintf("%s on %s in %s", strings.Join(items, ", "), m.GetCasServer(), m.GetDuration().AsDuration().Round(time.Millisecond))
		for _, c := range cmdlets {
			s += "\n" + strings.Repeat(" ", 24) + c
		}
		return s, true
	case *ev.NotificationSent:
		if !mine(m.GetDeviceId()) {
			return "", false
		}
		return fmt.Sprintf("mail %q (%s) to %s, Message-ID %s", m.GetTemplate(), m.GetLocale(), m.GetRecipient(), m.GetMessageId()), true
	case *ev.MDMDeviceChanged:
		d := m.GetDevice()
		if !mine(d.GetEasDeviceId()) && !mine(m.GetPreviousEasDeviceId()) {
			return "", false
		}
		return fmt.Sprintf("%s from %s: %s, %s, %s %s %s, EAS id %s", d.GetMdmDeviceId(), d.GetSource(), lower(d.GetComplianceState()),
			lower(d.GetEnrollmentState()), platforms[d.GetPlatform()], d.GetOsVersion(), d.GetModel(), d.GetEasDeviceId()), true
	case *ev.Alert:
		return fmt.Sprintf("ALERT %s: %s", short(m.GetKind()), m.GetSummary()), true
	}
	return "", false
}

// cmdletText shows an invocation as PowerShell would read it.
func cmdletText(c *ev.CmdletInvocation) string {
	var b strings.Builder
	b.WriteString(c.GetName())
	for _, p := range c.GetParameters() {
		vals := make([]string, len(p.GetValues()))
		for i, v := range p.GetValues() {
			vals[i] = "'" + strings.ReplaceAll(v, "'", "''") + "'"
		}
		v := strings.Join(vals, ",")
		if p.GetOperation() != "" {
			v = "@{" + p.GetOperation() + "=" + v + "}"
		}
		fmt.Fprintf(&b, " -%s %s", p.GetName(), v)
	}
	if c.GetError() != "" {
		b.WriteString("  → error: " + c.GetError())
	}
	return b.String()
}

// printTraces says which trace each of the phone's events belonged to:
// the journey is the trace of its first observation.
func (w *walker) printTraces() {
	if len(w.order) == 0 {
		fmt.Fprintln(w.out, "Trace: the events carried no traceparent header.")
		return
	}
	journey := w.order[0]
	fmt.Fprintf(w.out, "Trace: the phone's journey is trace %s, carried by the traceparent header of\n", journey)
	fmt.Fprintf(w.out, "       %s\n", strings.Join(w.traces[journey], ", "))
	for _, id := range w.order[1:] {
		fmt.Fprintf(w.out, "       and trace %s by %s\n", id, strings.Join(w.traces[id], ", "))
	}
	fmt.Fprintln(w.out, "       (set EASGUARD_OTEL_ENDPOINT to an OTLP/HTTP collector, e.g. Jaeger's, to see the spans)")
}

// event is one decoded message of the org.
type event struct {
	at     time.Time
	family string // the subject without easguard.<org>. and the device key, e.g. access.decided
	msg    proto.Message
	trace  string // trace id of the traceparent header, or ""
}

// feed queues the org's events in arrival order.
type feed struct {
	prefix string
	mu     sync.Mutex
	queue  []event
	wake   chan struct{}
}

func newFeed(org string) *feed {
	return &feed{prefix: "easguard." + org + ".", wake: make(chan struct{}, 1)}
}

// add decodes a message by its type header and queues it.
func (f *feed) add(m *nats.Msg) {
	e := event{at: time.Now()}
	mt, err := protoregistry.GlobalTypes.FindMessageByName(protoreflect.FullName(m.Header.Get(bus.HeaderType)))
	if err != nil {
		return
	}
	e.msg = mt.New().Interface()
	if proto.Unmarshal(m.Data, e.msg) != nil {
		return
	}
	parts := strings.Split(strings.TrimPrefix(m.Subject, f.prefix), ".")
	if len(parts) > 2 {
		parts = parts[:2]
	}
	e.family = strings.Join(parts, ".")
	tp := m.Header.Get("traceparent")
	if tp == "" {
		tp = m.Header.Get("Traceparent")
	}
	if fs := strings.Split(tp, "-"); len(fs) == 4 && strings.Trim(fs[1], "0") != "" {
		e.trace = fs[1]
	}
	f.mu.Lock()
	f.queue = append(f.queue, e)
	f.mu.Unlock()
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// next returns the oldest queued event, waiting for one until ctx ends.
func (f *feed) next(ctx context.Context) (event, error) {
	for {
		f.mu.Lock()
		if len(f.queue) > 0 {
			e := f.queue[0]
			f.queue = f.queue[1:]
			f.mu.Unlock()
			return e, nil
		}
		f.mu.Unlock()
		select {
		case <-ctx.Done():
			return event{}, ctx.Err()
		case <-f.wake:
		}
	}
}

// statusURL is the console API's record of the organisation's status.
func (w *walker) statusURL() string {
	return strings.TrimRight(w.o.easguard, "/") + "/api/v1/orgs/" + url.PathEscape(w.o.org) + "/status"
}

func (w *walker) getJSON(ctx context.Context, u string, out any) (int, error) {
	return w.do(ctx, http.MethodGet, u, nil, out)
}

func (w *walker) postJSON(ctx context.Context, u string, in, out any) (int, error) {
	b, err := json.Marshal(in)
	if err != nil {
		return 0, fmt.Errorf("POST %s: %w", u, err)
	}
	return w.do(ctx, http.MethodPost, u, bytes.NewReader(b), out)
}

// do sends a request and decodes a JSON answer of any status into out.
func (w *walker) do(ctx context.Context, method, u string, body io.Reader, out any) (int, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return 0, fmt.Errorf("%s %s: %w", method, u, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if strings.HasPrefix(u, w.o.easguard) {
		req.Header.Set("Authorization", "Bearer "+w.o.token)
	}
	resp, err := w.client.Do(req)
	if err != nil {
		return 0, fmt.Errorf("%s %s: %w", method, u, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return resp.StatusCode, fmt.Errorf("%s %s: %w", method, u, err)
	}
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(raw, out); err != nil {
			return resp.StatusCode, fmt.Errorf("%s %s: HTTP %d: %w", method, u, resp.StatusCode, err)
		}
	}
	return resp.StatusCode, nil
}

// pause waits d, or until ctx ends: the interval of a poll with a deadline.
func pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// short is an enum value's name without its type's prefix:
// DESIRED_ACCESS_BLOCK → BLOCK.
func short(e protoreflect.Enum) string {
	v := e.Descriptor().Values().ByNumber(e.Number())
	if v == nil {
		return fmt.Sprint(e.Number())
	}
	name := string(v.Name())
	var prefix strings.Builder
	for i, r := range string(e.Descriptor().Name()) {
		if i > 0 && r >= 'A' && r <= 'Z' {
			prefix.WriteByte('_')
		}
		prefix.WriteString(strings.ToUpper(string(r)))
	}
	return strings.TrimPrefix(name, prefix.String()+"_")
}

// lower is short in lower case: COMPLIANCE_STATE_IN_GRACE_PERIOD → in grace period.
func lower(e protoreflect.Enum) string {
	return strings.ReplaceAll(strings.ToLower(short(e)), "_", " ")
}

// platforms names the platforms as their makers write them.
var platforms = map[ev.Platform]string{
	ev.Platform_PLATFORM_UNSPECIFIED: "unknown platform", ev.Platform_PLATFORM_OTHER: "other platform", ev.Platform_PLATFORM_IOS: "iOS",
	ev.Platform_PLATFORM_IPADOS: "iPadOS", ev.Platform_PLATFORM_ANDROID: "Android", ev.Platform_PLATFORM_WINDOWS: "Windows", ev.Platform_PLATFORM_MACOS: "macOS",
}

// camel writes an upper-case enum name as Exchange does: DEVICE_DISCOVERY → DeviceDiscovery.
func camel(s string) string {
	var b strings.Builder
	for _, w := range strings.Split(strings.ToLower(s), "_") {
		if w != "" {
			b.WriteString(strings.ToUpper(w[:1]) + w[1:])
		}
	}
	return b.String()
}

// plural is "1 device", "2 devices".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// displayName makes "Demo User" of demo.user.
func displayName(alias string) string {
	var words []string
	for _, w := range strings.FieldsFunc(alias, func(r rune) bool { return r == '.' || r == '_' || r == '-' }) {
		words = append(words, strings.ToUpper(w[:1])+w[1:])
	}
	return strings.Join(words, " ")
}

// compact shortens a JSON document to n bytes for a line.
func compact(raw json.RawMessage, n int) string {
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		b.Reset()
		b.Write(raw)
	}
	s := b.String()
	if len(s) > n {
		s = s[:n] + "…"
	}
	return s
}
