package policy

import (
	"testing"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

func TestPlatformOf(t *testing.T) {
	const (
		ios     = ev.Platform_PLATFORM_IOS
		ipados  = ev.Platform_PLATFORM_IPADOS
		android = ev.Platform_PLATFORM_ANDROID
		windows = ev.Platform_PLATFORM_WINDOWS
		macos   = ev.Platform_PLATFORM_MACOS
		other   = ev.Platform_PLATFORM_OTHER
	)
	tests := []struct {
		deviceType, deviceOS string
		want                 ev.Platform
	}{
		{"iPhone", "iOS 17.4 21E219", ios},
		{"iPhone", "", ios},
		{"iphone", "", ios},
		{"iPod", "iOS 12.5", ios},
		{"iPad", "iOS 16.1 20B82", ipados},
		{"iPad", "iPadOS 17.0", ipados},
		{"Outlook", "iOS 17.4", ios},
		{"Outlook", "iPadOS 17.4", ipados},
		{"Outlook", "Android 14", android},
		{"Outlook", "", other},
		{"Android", "Android 13.0.0", android},
		{"Android", "", android},
		{"SAMSUNGSMG991B", "Android 13.0.0", android},
		{"Gmail", "", android},
		{"WindowsMail", "Windows 10.0.19045", windows},
		{"WindowsPhone", "Windows Phone 8.1", windows},
		{"WP8", "", windows},
		{"Windows", "", windows},
		{"", "macOS 14.2", macos},
		{"", "Mac OS X 10.15", macos},
		{"Apple", "iPhone OS 3.1", ios},
		{"EASProbeDeviceType", "", other},
		{"BlackBerry", "BlackBerry 10", other},
		{"Kiosk", "BIOS 1.0", other},
		{"", "", other},
	}
	for _, tc := range tests {
		t.Run(tc.deviceType+"/"+tc.deviceOS, func(t *testing.T) {
			if got := PlatformOf(tc.deviceType, tc.deviceOS); got != tc.want {
				t.Errorf("PlatformOf(%q, %q) = %v, want %v", tc.deviceType, tc.deviceOS, got, tc.want)
			}
		})
	}
}

func TestPlatformName(t *testing.T) {
	for p := range ev.Platform_name {
		pl := ev.Platform(p)
		t.Run(pl.String(), func(t *testing.T) {
			name := PlatformName(pl)
			if pl == ev.Platform_PLATFORM_UNSPECIFIED {
				if name != "" {
					t.Errorf("PlatformName(UNSPECIFIED) = %q", name)
				}
				return
			}
			back, ok := platformByName(name)
			if !ok || back != pl {
				t.Errorf("PlatformName(%v) = %q does not map back", pl, name)
			}
		})
	}
}
