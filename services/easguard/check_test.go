package main

import (
	"bytes"
	"reflect"
	"strings"
	"testing"

	"github.com/easguard/easguard/pkg/collector"
)

// check decides from EASGUARD_COLLECTOR_ENFORCE_SETTINGS whether the
// org-settings cmdlets are required, so its reading of the variable must
// be the collector's: same name, type and default.
func TestCheckReadsEnforceSettingsAsTheCollector(t *testing.T) {
	got, ok := reflect.TypeOf(CheckCollector{}).FieldByName("EnforceSettings")
	want, ok2 := reflect.TypeOf(collector.Config{}).FieldByName("EnforceSettings")
	if !ok || !ok2 || got.Type != want.Type ||
		got.Tag.Get("default") != want.Tag.Get("default") || got.Tag.Get("split_words") != want.Tag.Get("split_words") {
		t.Fatalf("CheckCollector.EnforceSettings %v %q, collector.Config's %v %q", got.Type, got.Tag, want.Type, want.Tag)
	}
	f, ok := reflect.TypeOf(CheckConfig{}).FieldByName("Collector")
	if !ok || f.Tag != "" {
		t.Fatalf("CheckConfig.Collector must exist untagged, so its variables are EASGUARD_COLLECTOR_*: %q", f.Tag)
	}
}

// check takes exchange and, optionally, --deep; anything else is a usage
// error (exit 2) before any configuration is read or connection made.
func TestCheckUsage(t *testing.T) {
	for _, args := range [][]string{{"check"}, {"check", "mailbox"}, {"check", "exchange", "--deeper"}, {"check", "exchange", "--deep", "x"}, {"check", "--deep", "exchange"}} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(args, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), "usage: easguard check exchange [--deep]") {
				t.Fatalf("exit %d, stderr %q", code, stderr.String())
			}
		})
	}
}
