package service

import (
	"runtime/debug"
	"strings"
)

// GarbageCollector names the garbage collector this binary was built with,
// for the start-up log: "classic", or "greentea", Go 1.26's default. On
// easguard's heap Green Tea took about a fifth more CPU, so the Makefile
// builds with GOEXPERIMENT=nogreenteagc; a plain `go build` does not, and
// an operator comparing figures should see which one ran.
func GarbageCollector() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	return collectorOf(info.Settings)
}

// collectorOf reads the collector from a binary's build settings: the last
// of greenteagc and nogreenteagc in GOEXPERIMENT wins, as it does for the
// go command, and neither means Go 1.26's default.
func collectorOf(settings []debug.BuildSetting) string {
	gc := "greentea"
	for _, s := range settings {
		if s.Key != "GOEXPERIMENT" {
			continue
		}
		for _, e := range strings.Split(s.Value, ",") {
			switch strings.TrimSpace(e) {
			case "nogreenteagc":
				gc = "classic"
			case "greenteagc":
				gc = "greentea"
			}
		}
	}
	return gc
}
