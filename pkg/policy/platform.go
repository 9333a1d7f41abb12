package policy

import (
	"strings"
	"unicode"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// PlatformOf guesses a device's platform from what Exchange knows of it, for
// partnerships without an MDM record: allowed_platforms must still work for
// devices the MDM has never seen. Device types that name one platform
// decide first (iPhone and iPod → IOS, iPad → IPADOS, WindowsMail and
// WindowsPhone → WINDOWS). Every other type, above all Outlook for iOS and
// Android (DeviceType "Outlook") and vendor mail apps ("SAMSUNGSMG991B"),
// is decided by the words of DeviceOS ("iOS 17.4 21E219", "Android 14").
// Only when DeviceOS says nothing does the type decide again (Android,
// Gmail → ANDROID). Anything else is PLATFORM_OTHER, never UNSPECIFIED, so
// that an allow-list of platforms fails closed on unknown devices.
func PlatformOf(deviceType, deviceOS string) ev.Platform {
	t := strings.ToLower(strings.TrimSpace(deviceType))
	switch {
	case strings.HasPrefix(t, "iphone"), strings.HasPrefix(t, "ipod"):
		return ev.Platform_PLATFORM_IOS
	case strings.HasPrefix(t, "ipad"):
		return ev.Platform_PLATFORM_IPADOS
	case strings.HasPrefix(t, "windows"), t == "wp", t == "wp8", t == "winphone":
		return ev.Platform_PLATFORM_WINDOWS
	}
	if p := platformOfOS(deviceOS); p != ev.Platform_PLATFORM_OTHER {
		return p
	}
	switch {
	case strings.Contains(t, "android"), strings.HasPrefix(t, "gmail"):
		return ev.Platform_PLATFORM_ANDROID
	case strings.HasPrefix(t, "mac"):
		return ev.Platform_PLATFORM_MACOS
	}
	return ev.Platform_PLATFORM_OTHER
}

// platformOfOS reads the platform from the words of an EAS DeviceOS string.
// Words, not substrings, so that "BIOS" or "Kios" are not taken for iOS.
func platformOfOS(os string) ev.Platform {
	words := strings.FieldsFunc(strings.ToLower(os), func(r rune) bool {
		return !unicode.IsLetter(r) && !unicode.IsDigit(r)
	})
	for i, w := range words {
		next := ""
		if i+1 < len(words) {
			next = words[i+1]
		}
		switch {
		case w == "ipados":
			return ev.Platform_PLATFORM_IPADOS
		case w == "ios", w == "iphone" && next == "os":
			return ev.Platform_PLATFORM_IOS
		case w == "android":
			return ev.Platform_PLATFORM_ANDROID
		case w == "windows":
			return ev.Platform_PLATFORM_WINDOWS
		case w == "macos", w == "osx", w == "mac" && next == "os":
			return ev.Platform_PLATFORM_MACOS
		}
	}
	return ev.Platform_PLATFORM_OTHER
}
