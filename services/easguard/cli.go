package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/easguard/easguard/pkg/console"
)

// cliCommands are the commands that talk to a running easguard through
// its console API.
var cliCommands = map[string]bool{"status": true, "sync": true, "devices": true, "device": true, "approve": true, "discard": true, "wipe": true, "remove": true, "rejudge": true, "audit": true}

const cliSummary = `The CLI talks to a running easguard's console API (/api/v1) with an API
token from its tokens file (EASGUARD_CONSOLE_TOKENS_FILE):

  EASGUARD_URL         the console, e.g. https://easguard.contoso.com (default http://127.0.0.1:8443)
  EASGUARD_TOKEN       the API token (or EASGUARD_TOKEN_FILE, a file holding it)
  EASGUARD_CA_BUNDLE   PEM bundle the console's certificate chains to (a lab CA)
  EASGUARD_ORG         the organisation (default: the console's first)

  easguard status                       syncs, guard, MDM sources, workers, alerts
  easguard sync [quick|full]            ask for a sync (one of a kind at a time)
  easguard devices [-q text] [-state s] [-page n]
  easguard device <device-id>           its partnerships and its history
  easguard approve <key> -reason text [-yes]   release the mass revocation the guard holds
  easguard discard <key> [-reason text] keep the held devices' mail
  easguard rejudge <device-id>          judge a device again now
  easguard wipe <device-id> -reason text [-partnership id] [-yes]
  easguard remove <device-id> -reason text [-partnership id] [-yes]
  easguard audit [-format jsonl|csv] [-since RFC3339]
  easguard hash-password [--token]      read a password (or make a token) for the console's files

Add -json to print the API's answer as it came.
`

// runCLI runs one CLI command; exit codes as run's.
func runCLI(cmd string, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("easguard "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print the API's JSON answer")
	q := fs.String("q", "", "search: user, device id, model")
	state := fs.String("state", "", "filter: Allowed, Blocked, Quarantined, held, dry-run, unmatched")
	page := fs.Int("page", 1, "page of devices")
	reason := fs.String("reason", "", "why (kept in the audit trail)")
	yes := fs.Bool("yes", false, "confirm an action that takes mail away or cannot be undone")
	partnership := fs.String("partnership", "", "the partnership, when the device has several")
	format := fs.String("format", "jsonl", "audit export format: jsonl or csv")
	since := fs.String("since", "", "audit entries from this time on (RFC 3339)")
	// Flags may follow the positional arguments (easguard approve KEY -reason x).
	var pos []string
	for len(args) > 0 {
		if err := fs.Parse(args); err != nil {
			return 2
		}
		args = fs.Args()
		if len(args) > 0 {
			pos, args = append(pos, args[0]), args[1:]
		}
	}
	need := map[string]int{"device": 1, "approve": 1, "discard": 1, "wipe": 1, "remove": 1, "rejudge": 1}[cmd]
	if cmd == "sync" {
		need = len(pos)
		if need > 1 {
			need = -1
		}
	}
	if len(pos) != need {
		fmt.Fprintf(stderr, "easguard %s: wrong arguments %q; see easguard help\n", cmd, pos)
		return 2
	}
	c, err := cliClient()
	if err != nil {
		fmt.Fprintln(stderr, "easguard:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	org := os.Getenv("EASGUARD_ORG")
	if org == "" {
		var orgs []string
		if err := c.Get(ctx, "/orgs", nil, &orgs); err != nil {
			fmt.Fprintln(stderr, "easguard:", err)
			return 1
		}
		if len(orgs) == 0 {
			fmt.Fprintln(stderr, "easguard: the console serves no organisation")
			return 1
		}
		org = orgs[0]
	}
	base := "/orgs/" + url.PathEscape(org)
	var out any
	var raw json.RawMessage
	form := url.Values{}
	if *reason != "" {
		form.Set("reason", *reason)
	}
	if *yes {
		form.Set("confirm", "yes")
	}
	if *partnership != "" {
		form.Set("partnership", *partnership)
	}
	switch cmd {
	case "status":
		err = c.Get(ctx, base, nil, &raw)
		out = printStatus
	case "sync":
		kind := "quick"
		if len(pos) == 1 {
			kind = pos[0]
		}
		form.Set("kind", kind)
		err = c.Post(ctx, base+"/sync", form, &raw)
	case "devices":
		err = c.Get(ctx, base+"/devices", url.Values{"q": {*q}, "state": {*state}, "page": {fmt.Sprint(*page)}}, &raw)
		out = printDevices
	case "device":
		err = c.Get(ctx, base+"/devices/"+url.PathEscape(pos[0]), nil, &raw)
		out = printDevice
	case "approve", "discard":
		form.Set("key", pos[0])
		err = c.Post(ctx, base+"/guard/"+cmd, form, &raw)
	case "wipe", "remove", "rejudge":
		err = c.Post(ctx, base+"/devices/"+url.PathEscape(pos[0])+"/"+cmd, form, &raw)
	case "audit":
		var b []byte
		b, err = c.Raw(ctx, base+"/audit", url.Values{"format": {*format}, "since": {*since}})
		if err == nil {
			_, _ = stdout.Write(b)
			return 0
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "easguard %s: %v\n", cmd, err)
		var ae *console.APIError
		if errors.As(err, &ae) && ae.Status == 428 {
			fmt.Fprintln(stderr, "(add -yes to confirm)")
		}
		return 1
	}
	if *asJSON || out == nil {
		if out == nil {
			var o console.Outcome
			if json.Unmarshal(raw, &o) == nil && o.Done != "" && !*asJSON {
				fmt.Fprintln(stdout, o.Done, o.ID)
				return 0
			}
		}
		_, _ = stdout.Write(raw)
		fmt.Fprintln(stdout)
		return 0
	}
	if err := out.(func(io.Writer, json.RawMessage) error)(stdout, raw); err != nil {
		fmt.Fprintln(stderr, "easguard:", err)
		return 1
	}
	return 0
}

func cliClient() (*console.Client, error) {
	u := os.Getenv("EASGUARD_URL")
	if u == "" {
		u = "http://127.0.0.1:8443"
	}
	tok := os.Getenv("EASGUARD_TOKEN")
	if f := os.Getenv("EASGUARD_TOKEN_FILE"); f != "" && tok == "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("EASGUARD_TOKEN_FILE: %w", err)
		}
		tok = strings.TrimSpace(string(b))
	}
	return console.NewClient(u, tok, os.Getenv("EASGUARD_CA_BUNDLE"))
}

func printStatus(w io.Writer, raw json.RawMessage) error {
	var o console.Overview
	if err := json.Unmarshal(raw, &o); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "organisation\t%s\n", o.Org)
	for _, k := range []string{"quick", "full"} {
		last, ok := o.Status.Last[k]
		if !ok {
			fmt.Fprintf(tw, "%s sync\tnever\n", k)
			continue
		}
		res := "ok"
		if !last.Success {
			res = "FAILED: " + strings.Join(last.Errors, "; ")
		}
		fmt.Fprintf(tw, "%s sync\t%s, finished %s (%s), %d observed\n", k, res, last.FinishedAt.UTC().Format(time.RFC3339), last.FinishedAt.Sub(last.StartedAt).Round(time.Millisecond), last.Counts["observed"])
		if okS, ok := o.Status.OK[k]; ok {
			fmt.Fprintf(tw, "last successful %s sync\t%s\n", k, okS.FinishedAt.UTC().Format(time.RFC3339))
		}
	}
	if g := o.Status.Guard; g != nil {
		fmt.Fprintf(tw, "guard\t%s %s\n", g.State, g.Key)
		if g.Detail != "" {
			fmt.Fprintf(tw, "\t%s\n", g.Detail)
		}
	} else {
		fmt.Fprintf(tw, "guard\tok\n")
	}
	if p := o.Status.Policy; p != nil {
		fmt.Fprintf(tw, "policy\t%s (dry run %v)\n", p.Version, p.DryRun)
	}
	kinds := make([]string, 0, len(o.Status.MDM))
	for k := range o.Status.MDM {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		m := o.Status.MDM[k]
		fmt.Fprintf(tw, "MDM %s\t%s, %s %s\n", k, m.State, m.At.UTC().Format(time.RFC3339), m.Summary)
	}
	states := make([]string, 0, len(o.Counts))
	for k, n := range o.Counts {
		states = append(states, fmt.Sprintf("%s %d", k, n))
	}
	sort.Strings(states)
	fmt.Fprintf(tw, "partnerships\t%d (%s), %d held by the guard\n", o.Total, strings.Join(states, ", "), o.Held)
	fmt.Fprintf(tw, "dead letters\t%d\n", o.DeadLetters)
	for _, a := range o.Alerts {
		fmt.Fprintf(tw, "alert\t%s %s %s: %s\n", a.At.UTC().Format(time.RFC3339), a.Severity, a.Kind, a.Summary)
	}
	for _, wk := range o.Workers {
		st := ""
		if wk.Stalled {
			st = " STALLED"
		}
		fmt.Fprintf(tw, "worker %s/%s\t%d waiting, %d in hand%s\n", wk.Service, wk.Route, wk.Pending, wk.AckPending, st)
	}
	return tw.Flush()
}

func printDevices(w io.Writer, raw json.RawMessage) error {
	var p console.DevicesView
	if err := json.Unmarshal(raw, &p); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "USER\tDEVICE ID\tMODEL\tEXCHANGE\tDECISION\tRULE\tMDM")
	for _, d := range p.Devices {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.User, d.DeviceID, d.Model, d.ExchangeState, d.Decision, d.Rule, d.Match)
	}
	fmt.Fprintf(tw, "page %d of %d, %d partnerships\n", p.Page, p.Pages, p.Total)
	return tw.Flush()
}

func printDevice(w io.Writer, raw json.RawMessage) error {
	var d console.DeviceView
	if err := json.Unmarshal(raw, &d); err != nil {
		return err
	}
	for _, p := range d.Partnerships {
		fmt.Fprintf(w, "%s on %s: Exchange %s, decision %s (%s), %s\n", d.DeviceID, p.User, p.ExchangeState, p.Decision, p.Rule, p.Match)
	}
	for _, s := range d.History {
		fmt.Fprintf(w, "%s  %-8s  %s\n", s.At.UTC().Format(time.RFC3339), s.Kind, s.Summary)
		for _, l := range s.Details {
			fmt.Fprintf(w, "%30s%s\n", "", l)
		}
	}
	return nil
}

// hashPassword prints a users-file hash of a password read from stdin, or
// a new API token and its tokens-file hash.
func hashPassword(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 1 && args[0] == "--token" {
		b := make([]byte, 32)
		_, _ = rand.Read(b)
		tok := base64.RawURLEncoding.EncodeToString(b)
		fmt.Fprintf(stdout, "token: %s\ntokens file: <name> <role> %s\n", tok, console.HashToken(tok))
		return 0
	}
	if len(args) != 0 {
		fmt.Fprintln(stderr, "easguard hash-password [--token]")
		return 2
	}
	line, err := bufio.NewReader(stdin).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		fmt.Fprintln(stderr, "easguard:", err)
		return 1
	}
	h, err := console.HashPassword(strings.TrimRight(line, "\r\n"))
	if err != nil {
		fmt.Fprintln(stderr, "easguard:", err)
		return 2
	}
	fmt.Fprintln(stdout, h)
	return 0
}
