package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/easguard/easguard/pkg/config"
	"github.com/easguard/easguard/pkg/exchange"
)

// CheckConfig is what `easguard check exchange` reads: the Exchange
// settings the workers use.
type CheckConfig struct {
	Exchange exchange.Config
	// Collector holds the collector settings that decide which
	// permissions the account needs.
	Collector CheckCollector
}

// CheckCollector is the part of the collector's configuration that
// enables a feature with cmdlets of its own; check requires those cmdlets
// only when the feature is on. Its default is the collector's
// (collector.Config), which a test holds it to.
type CheckCollector struct {
	EnforceSettings bool `split_words:"true" default:"true" desc:"Set as for the collector: whether it enforces the organisation's ActiveSync settings, and so whether the account needs Set-ActiveSyncOrganizationSettings."`
}

// features returns the features this configuration enables.
func (c *CheckConfig) features() []exchange.Feature {
	fs := []exchange.Feature{exchange.FeatureCore}
	if c.Collector.EnforceSettings {
		fs = append(fs, exchange.FeatureOrgSettings)
	}
	return fs
}

// Validate checks the Exchange settings.
func (c *CheckConfig) Validate() error { return c.Exchange.Validate() }

// checkExchange connects with the configured settings and reports what an
// administrator needs to know before easguard touches anything: the
// servers, the size of the organisation, the ActiveSync settings, and
// whether the account may run the cmdlets of the enabled features (and
// which the optional ones would need). It returns an error with the action
// to take when anything fails.
func checkExchange(ctx context.Context, cfg exchange.Config, features []exchange.Feature, deep bool, out io.Writer) error {
	mode := "remote session to " + strings.ReplaceAll(cfg.PowershellURL, "{server}", cfg.Server)
	scheme := "http"
	if cfg.HTTPS {
		scheme = "https"
	}
	fmt.Fprintf(out, "Exchange check: %s (WinRM %s, %s authentication, %s)\n", cfg.Server, scheme, strings.ToUpper(cfg.Auth), mode)
	cfg.Workers = 1
	start := time.Now()
	pool, err := exchange.NewPool(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		return explain(cfg, err)
	}
	defer pool.Close(context.Background())
	fmt.Fprintf(out, "  %-14s ok, worker started in %s\n", "connection", time.Since(start).Round(time.Millisecond))
	c := exchange.NewClient(pool, cfg)

	servers, err := c.Servers(ctx)
	if err != nil {
		return explain(cfg, err)
	}
	for i, s := range servers {
		label := "servers"
		if i > 0 {
			label = ""
		}
		fmt.Fprintf(out, "  %-14s %s (%s) %s, roles %s\n", label, s.Name, s.FQDN, s.Version, s.Roles)
	}
	if cfg.CASFailover {
		fmt.Fprintf(out, "  %-14s %s\n", "failover", strings.Join(pool.Servers(), ", "))
	} else {
		fmt.Fprintf(out, "  %-14s off (EASGUARD_EXCHANGE_CAS_FAILOVER=false)\n", "failover")
	}
	if err := checkPermissions(ctx, c, cfg, features, out); err != nil {
		return err
	}
	mailboxes, err := c.Count(ctx, "Get-CASMailbox", exchange.Params{"ResultSize": "Unlimited"})
	if err != nil {
		return explain(cfg, err)
	}
	partnerships, err := c.CountPartnerships(ctx)
	if err != nil {
		return explain(cfg, err)
	}
	fmt.Fprintf(out, "  %-14s %d\n", "mailboxes", mailboxes)
	fmt.Fprintf(out, "  %-14s %d ActiveSync\n", "partnerships", partnerships)
	st, err := c.GetOrgSettings(ctx)
	if err != nil {
		return explain(cfg, err)
	}
	admins := strings.Join(st.AdminMailRecipients, ", ")
	if admins == "" {
		admins = "(none)"
	}
	insert := "(none)"
	if st.UserMailInsert != "" {
		insert = fmt.Sprintf("%q", st.UserMailInsert)
	}
	fmt.Fprintf(out, "  %-14s DefaultAccessLevel %s; AdminMailRecipients %s; UserMailInsert %s\n", "activesync", st.DefaultAccessLevel, admins, insert)
	if deep {
		if err := checkDeep(ctx, c, cfg, out); err != nil {
			return err
		}
	}
	fmt.Fprintln(out, "OK")
	return nil
}

// deepSample is how many mailboxes (owners of the first partnerships
// listed) the per-mailbox reads of a deep check read.
const deepSample = 20

// checkDeep runs every read easguard makes and reports, read by read, the
// objects it returned and every shape problem in them (exchange.DeepCheck).
// It fails naming the reads that failed or came back with problems.
func checkDeep(ctx context.Context, c *exchange.Client, cfg exchange.Config, out io.Writer) error {
	reports, err := c.DeepCheck(ctx, deepSample)
	label := "reads"
	var failed []string
	for _, r := range reports {
		verdict := "ok"
		switch {
		case r.Skipped != "":
			fmt.Fprintf(out, "  %-14s %s: skipped, %s\n", label, r.Name, r.Skipped)
			label = ""
			continue
		case r.Err != nil:
			verdict = "FAILED: " + r.Err.Error()
		case len(r.Problems) > 0:
			verdict = fmt.Sprintf("%d PROBLEMS", len(r.Problems))
		}
		fmt.Fprintf(out, "  %-14s %s: %d objects, %s\n", label, r.Name, r.Count, verdict)
		label = ""
		for _, p := range r.Problems {
			fmt.Fprintf(out, "  %-14s   %s\n", "", p)
		}
		if r.Failed() {
			failed = append(failed, r.Name)
		}
	}
	if err != nil {
		return explain(cfg, err)
	}
	if len(failed) > 0 {
		return fmt.Errorf("easguard does not read this organisation correctly: %s (see the report above; a value or date it cannot read is a bug to report with the report attached)", strings.Join(failed, "; "))
	}
	ran := 0
	for _, r := range reports {
		if r.Skipped == "" {
			ran++
		}
	}
	fmt.Fprintf(out, "  %-14s all %d reads came back complete and readable\n", "", ran)
	return nil
}

// featureNotes says, for each feature, what enables it.
var featureNotes = map[exchange.Feature]string{
	exchange.FeatureCore:               "reads, allow and block lists",
	exchange.FeatureOrgSettings:        "EASGUARD_COLLECTOR_ENFORCE_SETTINGS",
	exchange.FeatureRemoteWipe:         "nothing enables it yet",
	exchange.FeaturePartnershipRemoval: "nothing enables it yet",
}

// checkPermissions reports, feature by feature, which cmdlets the account
// may not run, and fails when an enabled feature lacks one. Optional
// features (those the configuration leaves off) are reported, never
// required.
func checkPermissions(ctx context.Context, c *exchange.Client, cfg exchange.Config, features []exchange.Feature, out io.Writer) error {
	byFeature, err := c.MissingByFeature(ctx)
	if err != nil {
		return explain(cfg, err)
	}
	enabled := map[exchange.Feature]bool{}
	for _, f := range features {
		enabled[f] = true
	}
	var missing []string
	label := "permissions"
	for _, f := range exchange.Features() {
		state := "optional"
		if enabled[f] {
			state = "enabled"
		}
		m := byFeature[f]
		verdict := fmt.Sprintf("ok, %d cmdlets", len(exchange.FeatureCmdlets(f)))
		if len(exchange.FeatureCmdlets(f)) == 1 {
			verdict = "ok, " + exchange.FeatureCmdlets(f)[0]
		}
		if len(m) > 0 {
			verdict = "MISSING " + describeCmdlets(m)
			if !enabled[f] {
				verdict = "not granted (only needed when enabled): " + describeCmdlets(m)
			}
		}
		fmt.Fprintf(out, "  %-14s %s (%s, %s): %s\n", label, f, state, featureNotes[f], verdict)
		label = ""
		if enabled[f] {
			missing = append(missing, m...)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: the account %s may not run %s; give it the role group deploy/exchange/New-EasguardRole.ps1 creates (or an RBAC role that includes them), then run this check again",
			exchange.ErrPermission, cfg.User, describeCmdlets(missing))
	}
	fmt.Fprintf(out, "  %-14s all %d cmdlets easguard needs are available\n", "", len(exchange.RequiredCmdlets(features...)))
	return nil
}

// describeCmdlets names cmdlets with what stands in for them on Exchange
// 2010, where that differs.
func describeCmdlets(names []string) string {
	parts := make([]string, len(names))
	for i, n := range names {
		parts[i] = n
		if alt := exchange.CmdletAlternatives(n); len(alt) > 0 {
			parts[i] += " (or " + strings.Join(alt, ", ") + ")"
		}
	}
	return strings.Join(parts, ", ")
}

// explain turns an error into the action an administrator can take.
func explain(cfg exchange.Config, err error) error {
	port := cfg.Port
	if port == 0 {
		port = map[bool]int{true: 5986, false: 5985}[cfg.HTTPS]
	}
	switch {
	case errors.Is(err, exchange.ErrAuth) && strings.Contains(err.Error(), "New-PSSession"):
		return fmt.Errorf("the account %s opened a WinRM shell but Exchange refused its session: it needs remote PowerShell enabled (Set-User -RemotePowerShellEnabled $true) and an Exchange role; check EASGUARD_EXCHANGE_POWERSHELL_URL and EASGUARD_EXCHANGE_POWERSHELL_AUTH too (%w)", cfg.User, err)
	case errors.Is(err, exchange.ErrAuth):
		return fmt.Errorf("authentication failed for %s with %s: check EASGUARD_EXCHANGE_PASSWORD, that the account is not locked out, and that the WinRM service allows %s authentication (winrm get winrm/config/service/auth) (%w)",
			cfg.User, strings.ToUpper(cfg.Auth), strings.ToUpper(cfg.Auth), err)
	case errors.Is(err, exchange.ErrTLS):
		return fmt.Errorf("the certificate of %s is not trusted: set EASGUARD_EXCHANGE_CA_BUNDLE to a PEM file with the CA that issued it (only in a test lab: EASGUARD_EXCHANGE_INSECURE_SKIP_VERIFY=true) (%w)", cfg.Server, err)
	case errors.Is(err, exchange.ErrUnreachable):
		return fmt.Errorf("WinRM on %s port %d is not reachable: check the name, the port (5986 for HTTPS, 5985 for HTTP), firewalls and proxies, and that the server has a WinRM listener (winrm enumerate winrm/config/listener) (%w)", cfg.Server, port, err)
	case errors.Is(err, exchange.ErrPermission) && strings.Contains(err.Error(), "'Set-ADServerSettings' is not recognized"):
		// Every worker session runs it first, so without it no session
		// starts and the per-feature report is never reached.
		return fmt.Errorf("the account %s may not run Set-ADServerSettings, which every easguard session runs first (-ViewEntireForest); give it the role group deploy/exchange/New-EasguardRole.ps1 creates, then run this check again (%w)", cfg.User, err)
	case errors.Is(err, exchange.ErrPermission):
		return fmt.Errorf("the account %s lacks a permission easguard needs: %w", cfg.User, err)
	case errors.Is(err, exchange.ErrThrottled):
		return fmt.Errorf("Exchange is throttling %s: close its other remote PowerShell sessions (at most 18 per user) and try again (%w)", cfg.User, err)
	}
	return fmt.Errorf("exchange check failed: %w", err)
}

// runCheck is `easguard check <what>`.
func runCheck(args []string, stdout, stderr io.Writer) int {
	deep := len(args) == 2 && args[1] == "--deep"
	if len(args) < 1 || len(args) > 2 || args[0] != "exchange" || len(args) == 2 && !deep {
		fmt.Fprintln(stderr, "easguard check: usage: easguard check exchange [--deep]")
		return 2
	}
	var cfg CheckConfig
	if err := config.Load(&cfg); err != nil {
		fmt.Fprintf(stderr, "easguard: %v\n(easguard help lists every variable)\n", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Exchange.StartTimeout+10*time.Minute)
	defer cancel()
	if err := checkExchange(ctx, cfg.Exchange, cfg.features(), deep, stdout); err != nil {
		fmt.Fprintln(stdout, "FAIL")
		fmt.Fprintln(stderr, "easguard check exchange:", err)
		return 1
	}
	return 0
}
