package policy

import (
	"fmt"
	"strings"
)

// globMatch reports whether s matches pattern, where '*' matches any run of
// characters (including none) and everything else matches itself, ignoring
// case. It runs in O(len(s)·len(pattern)) at worst and never recurses, so a
// pattern full of stars cannot make evaluation slow or deep.
func globMatch(pattern, s string) bool {
	pattern, s = strings.ToLower(pattern), strings.ToLower(s)
	p, i := 0, 0
	star, mark := -1, 0
	for i < len(s) {
		switch {
		case p < len(pattern) && pattern[p] == '*':
			star, mark = p, i
			p++
		case p < len(pattern) && pattern[p] == s[i]:
			p++
			i++
		case star >= 0:
			p = star + 1
			mark++
			i = mark
		default:
			return false
		}
	}
	for p < len(pattern) && pattern[p] == '*' {
		p++
	}
	return p == len(pattern)
}

// domainOf returns the part of an address after its last '@'.
func domainOf(addr string) string {
	if i := strings.LastIndexByte(addr, '@'); i >= 0 {
		return addr[i+1:]
	}
	return ""
}

// match reports whether any of addrs matches the selector, and which entry
// matched, as "<list> <entry>" for reasons.
func (s Selector) match(addrs []string, groups map[string][]string) (string, bool) {
	for _, a := range addrs {
		for _, m := range s.Mailboxes {
			if globMatch(m, a) {
				return fmt.Sprintf("mailboxes entry %q", m), true
			}
		}
		for _, d := range s.Domains {
			if dom := domainOf(a); dom != "" && globMatch(d, dom) {
				return fmt.Sprintf("domains entry %q", d), true
			}
		}
		for _, g := range s.Groups {
			for _, m := range groups[g] {
				if globMatch(m, a) {
					return fmt.Sprintf("group %q", g), true
				}
			}
		}
	}
	return "", false
}
