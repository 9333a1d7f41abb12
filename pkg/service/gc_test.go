package service

import (
	"runtime/debug"
	"testing"
)

func TestCollectorOf(t *testing.T) {
	for _, tc := range []struct {
		name     string
		settings []debug.BuildSetting
		want     string
	}{
		{"no experiment", []debug.BuildSetting{{Key: "CGO_ENABLED", Value: "0"}}, "greentea"},
		{"opted out", []debug.BuildSetting{{Key: "GOEXPERIMENT", Value: "nogreenteagc"}}, "classic"},
		{"among others", []debug.BuildSetting{{Key: "GOEXPERIMENT", Value: "jsonv2,nogreenteagc"}}, "classic"},
		{"last wins", []debug.BuildSetting{{Key: "GOEXPERIMENT", Value: "nogreenteagc,greenteagc"}}, "greentea"},
		{"another experiment", []debug.BuildSetting{{Key: "GOEXPERIMENT", Value: "jsonv2"}}, "greentea"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := collectorOf(tc.settings); got != tc.want {
				t.Fatalf("collectorOf(%v) = %q, want %q", tc.settings, got, tc.want)
			}
		})
	}
}
