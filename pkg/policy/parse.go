package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// ErrInvalid is wrapped by every error that says a policy is wrong (as
// opposed to unreadable), so that a caller can tell an administrator's
// mistake from an I/O failure with errors.Is.
var ErrInvalid = errors.New("invalid policy")

// Problem is one thing wrong with a policy.
type Problem struct {
	// Path names the value, for example "scope.include.domains[1]"; it is
	// empty for problems of the file as a whole, such as YAML syntax.
	Path string
	// Line is the 1-based line of the value in the file, 0 if unknown.
	Line int
	// Message says what is wrong, without the path.
	Message string
	// at is the path whose line is reported, when it is not Path (a group
	// used but not defined is reported at "groups" but found where used).
	at string
}

// String formats the problem as "path: message (line n)".
func (p Problem) String() string {
	s := p.Message
	if p.Path != "" {
		s = p.Path + ": " + s
	}
	if p.Line > 0 {
		s += fmt.Sprintf(" (line %d)", p.Line)
	}
	return s
}

// Error lists every problem of a policy at once, so that an administrator
// fixes a file in one pass instead of one error per attempt. It wraps
// ErrInvalid.
type Error struct {
	// File is the file name when the policy came from Load.
	File string
	// Problems are in the order of the file where possible.
	Problems []Problem
}

// Error joins the problems into one line.
func (e *Error) Error() string {
	var b strings.Builder
	if e.File != "" {
		b.WriteString(e.File)
		b.WriteString(": ")
	}
	b.WriteString(ErrInvalid.Error())
	b.WriteString(": ")
	for i, p := range e.Problems {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(p.String())
	}
	return b.String()
}

// Unwrap makes errors.Is(err, ErrInvalid) true.
func (e *Error) Unwrap() error { return ErrInvalid }

// Load reads and parses the policy file at path. Errors name the file; an
// unreadable file gives the os error (errors.Is(err, fs.ErrNotExist) works),
// a wrong one an *Error wrapping ErrInvalid.
func Load(path string) (*Policy, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	p, err := Parse(data)
	if err != nil {
		var pe *Error
		if errors.As(err, &pe) {
			pe.File = path
			return nil, pe
		}
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	return p, nil
}

// Parse reads a policy file strictly (see the package documentation) and
// returns it validated and normalised. Every error is an *Error that wraps
// ErrInvalid and names the path of each wrong value.
func Parse(data []byte) (*Policy, error) {
	root, prob := parseDocument(data)
	if prob != nil {
		return nil, &Error{Problems: []Problem{*prob}}
	}
	d := &decoder{p: Default(""), lines: map[string]int{}, failed: map[string]bool{}}
	d.p.SchemaVersion = 0
	d.root(root)
	probs := d.probs
	if !d.exhausted {
		for _, vp := range d.p.problems() {
			if d.related(vp.Path) || (vp.at != "" && d.related(vp.at)) {
				continue // the decoder already reported the cause
			}
			vp.Line = d.lineOf(vp.at)
			if vp.Line == 0 {
				vp.Line = d.lineOf(vp.Path)
			}
			probs = append(probs, vp)
		}
	}
	if len(probs) > 0 {
		// In file order; problems of the file as a whole (line 0) first.
		sort.SliceStable(probs, func(i, j int) bool { return probs[i].Line < probs[j].Line })
		return nil, &Error{Problems: probs}
	}
	d.p.normalise()
	return d.p, nil
}

// parseDocument parses exactly one YAML document. The YAML library is
// guarded with recover because Parse promises never to panic on any input,
// including ones the library has not been hardened against.
func parseDocument(data []byte) (root *yaml.Node, prob *Problem) {
	defer func() {
		if r := recover(); r != nil {
			root, prob = nil, &Problem{Message: fmt.Sprintf("YAML parser failed: %v", r)}
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, &Problem{Message: "the file is empty"}
		}
		return nil, &Problem{Message: err.Error()}
	}
	var extra yaml.Node
	switch err := dec.Decode(&extra); {
	case errors.Is(err, io.EOF):
	case err != nil:
		return nil, &Problem{Message: err.Error()}
	default:
		return nil, &Problem{Line: extra.Line, Message: "the file holds more than one YAML document ('---'); a policy is one document"}
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) == 0 {
		return nil, &Problem{Message: "the file is empty"}
	}
	return doc.Content[0], nil
}

// maxNodes bounds the nodes the decoder visits, counting every use of an
// alias, so that a small file of aliases cannot make Parse work for ever.
const maxNodes = 1 << 18

// decoder walks the YAML node tree along the schema. Walking nodes instead
// of unmarshalling into tagged structs is what lets every error carry its
// path and line, and lets null mean "absent".
type decoder struct {
	p         *Policy
	probs     []Problem
	lines     map[string]int
	failed    map[string]bool
	visited   int
	exhausted bool
}

// fail records a problem of the value at path, and that validation must
// not report the consequences of the value being missing.
func (d *decoder) fail(path string, n *yaml.Node, format string, args ...any) {
	d.failed[path] = true
	d.report(path, n, format, args...)
}

// report records a problem at path that leaves the decoded value intact
// (an unknown or repeated key), so that validation still checks the value.
func (d *decoder) report(path string, n *yaml.Node, format string, args ...any) {
	line := 0
	if n != nil {
		line = n.Line
	}
	d.probs = append(d.probs, Problem{Path: path, Line: line, Message: fmt.Sprintf(format, args...)})
}

// related reports whether path is, contains or is inside a path the
// decoder already reported.
func (d *decoder) related(path string) bool {
	if d.failed[path] {
		return true
	}
	for f := range d.failed {
		if under(f, path) || under(path, f) {
			return true
		}
	}
	return false
}

// under reports whether path lies inside parent.
func under(path, parent string) bool {
	if parent == "" {
		return true
	}
	return strings.HasPrefix(path, parent+".") || strings.HasPrefix(path, parent+"[")
}

// lineOf finds the line of path or of its nearest ancestor with one.
func (d *decoder) lineOf(path string) int {
	for path != "" {
		if l, ok := d.lines[path]; ok {
			return l
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			return 0
		}
		path = path[:i]
	}
	return 0
}

// deref follows aliases and counts the visit; it returns nil once the node
// budget is spent.
func (d *decoder) deref(n *yaml.Node) *yaml.Node {
	for i := 0; n != nil && n.Kind == yaml.AliasNode && i < 16; i++ {
		n = n.Alias
	}
	d.visited++
	if d.visited > maxNodes {
		if !d.exhausted {
			d.exhausted = true
			d.probs = append(d.probs, Problem{Message: fmt.Sprintf("the policy has more than %d values once aliases are expanded", maxNodes)})
		}
		return nil
	}
	if n == nil || n.Kind == yaml.AliasNode {
		return nil
	}
	return n
}

// isNull reports a YAML null (~, null or nothing), which means "absent".
func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// describe names a node's kind for error messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		switch n.ShortTag() {
		case "!!str":
			return "a string"
		case "!!int", "!!float":
			return "a number"
		case "!!bool":
			return "true or false"
		case "!!null":
			return "empty"
		case "!!timestamp":
			return "a time"
		}
		return "a scalar"
	}
	return "not a value"
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// field decodes the value of one known key; its path is already joined.
type field func(path string, v *yaml.Node)

// mapping decodes a mapping with a fixed set of keys. Unknown keys,
// duplicate keys and merge keys are errors; a null value is skipped as if
// the key were absent. It returns the keys that were present.
func (d *decoder) mapping(path string, n *yaml.Node, fields map[string]field, order string) map[string]bool {
	seen := map[string]bool{}
	if n.Kind != yaml.MappingNode {
		d.fail(path, n, "must be a mapping (%s), not %s", order, describe(n))
		return seen
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := d.deref(n.Content[i]), d.deref(n.Content[i+1])
		if k == nil || v == nil {
			return seen
		}
		name, ok := d.key(path, k)
		if !ok {
			continue
		}
		p := join(path, name)
		if seen[name] {
			d.report(p, k, "is given twice")
			continue
		}
		seen[name] = true
		f, known := fields[name]
		if !known {
			d.report(p, k, "unknown key (known here: %s)", order)
			continue
		}
		d.lines[p] = v.Line
		if isNull(v) {
			continue
		}
		f(p, v)
	}
	return seen
}

// key checks a mapping key: a plain string, not a merge key.
func (d *decoder) key(path string, k *yaml.Node) (string, bool) {
	if k.Kind != yaml.ScalarNode {
		d.fail(path, k, "has a key that is %s; keys must be strings", describe(k))
		return "", false
	}
	if k.ShortTag() == "!!merge" {
		d.fail(join(path, k.Value), k, "merge keys are not supported; write the keys out")
		return "", false
	}
	return k.Value, true
}

// str decodes a scalar as its text. Numbers, booleans and times are taken
// as written, so device ids such as 0123 keep their leading zero.
func (d *decoder) str(path string, n *yaml.Node) (string, bool) {
	if n.Kind != yaml.ScalarNode {
		d.fail(path, n, "must be a string, not %s", describe(n))
		return "", false
	}
	return n.Value, true
}

// boolean decodes true or false.
func (d *decoder) boolean(path string, n *yaml.Node) (bool, bool) {
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!bool" {
		switch strings.ToLower(n.Value) {
		case "true":
			return true, true
		case "false":
			return false, true
		}
	}
	if n.Kind == yaml.ScalarNode {
		d.fail(path, n, "%q is not true or false", n.Value)
	} else {
		d.fail(path, n, "must be true or false, not %s", describe(n))
	}
	return false, false
}

// listItem is one decoded entry of a list, with its index in the file.
type listItem struct {
	index int
	value string
	node  *yaml.Node
}

// items decodes a list of non-empty scalars, reporting the others.
func (d *decoder) items(path string, n *yaml.Node) []listItem {
	if n.Kind != yaml.SequenceNode {
		hint := ""
		if n.Kind == yaml.ScalarNode {
			hint = fmt.Sprintf(" (write [%s] for one entry)", n.Value)
		}
		d.fail(path, n, "must be a list, not %s%s", describe(n), hint)
		return nil
	}
	out := make([]listItem, 0, len(n.Content))
	for i, item := range n.Content {
		item = d.deref(item)
		if item == nil {
			return out
		}
		p := fmt.Sprintf("%s[%d]", path, i)
		d.lines[p] = item.Line
		if isNull(item) {
			d.fail(p, item, "is empty")
			continue
		}
		if s, ok := d.str(p, item); ok {
			out = append(out, listItem{index: i, value: s, node: item})
		}
	}
	return out
}

// list decodes a list of non-empty scalars as strings.
func (d *decoder) list(path string, n *yaml.Node) []string {
	items := d.items(path, n)
	out := make([]string, len(items))
	for i, it := range items {
		out[i] = it.value
	}
	return out
}

// action decodes block or quarantine; Validate reports other words.
func (d *decoder) action(dst *Action) field {
	return func(path string, n *yaml.Node) {
		if s, ok := d.str(path, n); ok {
			*dst = Action(s)
		}
	}
}

const (
	rootKeys      = "version, org, dry_run, scope, groups, unknown_device, noncompliant, allowed_platforms, platform_not_allowed, grace_period, exemptions, notify, trust_mdm_records_without_user, default_access_level"
	scopeKeys     = "include, exclude"
	selectorKeys  = "mailboxes, domains, groups"
	exemptionKeys = "mailbox, device_id, device_type, reason, until, trust_client_reported"
)

// root decodes the top-level mapping into d.p.
func (d *decoder) root(n *yaml.Node) {
	p := d.p
	if n.Kind != yaml.MappingNode {
		d.fail("", n, "a policy must be a mapping of keys (%s), not %s", rootKeys, describe(n))
		return
	}
	seen := d.mapping("", n, map[string]field{
		"version": func(path string, v *yaml.Node) {
			if v.Kind != yaml.ScalarNode || v.ShortTag() != "!!int" {
				what := describe(v)
				if v.Kind == yaml.ScalarNode {
					what = strconv.Quote(v.Value)
				}
				d.fail(path, v, "must be the number %d, not %s", SchemaVersion, what)
				return
			}
			i, err := strconv.ParseInt(strings.ReplaceAll(v.Value, "_", ""), 0, 32)
			if err != nil {
				d.fail(path, v, "%q is not a supported version (only %d is)", v.Value, SchemaVersion)
				return
			}
			p.SchemaVersion = int(i)
		},
		"org": func(path string, v *yaml.Node) {
			if s, ok := d.str(path, v); ok {
				p.Org = s
			}
		},
		"dry_run": func(path string, v *yaml.Node) {
			if b, ok := d.boolean(path, v); ok {
				p.DryRun = b
			}
		},
		"notify": func(path string, v *yaml.Node) {
			if b, ok := d.boolean(path, v); ok {
				p.Notify = b
			}
		},
		"trust_mdm_records_without_user": func(path string, v *yaml.Node) {
			if b, ok := d.boolean(path, v); ok {
				p.TrustMDMRecordsWithoutUser = b
			}
		},
		"default_access_level": func(path string, v *yaml.Node) {
			if s, ok := d.str(path, v); ok {
				p.DefaultAccessLevel = DefaultLevel(strings.ToLower(s))
			}
		},
		"scope": func(path string, v *yaml.Node) {
			d.mapping(path, v, map[string]field{
				"include": d.selector(&p.Scope.Include),
				"exclude": d.selector(&p.Scope.Exclude),
			}, scopeKeys)
		},
		"groups":               d.groups,
		"unknown_device":       d.action(&p.UnknownDevice),
		"noncompliant":         d.action(&p.Noncompliant),
		"platform_not_allowed": d.action(&p.PlatformNotAllowed),
		"allowed_platforms":    d.platforms,
		"grace_period": func(path string, v *yaml.Node) {
			s, ok := d.str(path, v)
			if !ok {
				return
			}
			g, err := parseGrace(s)
			if err != nil {
				d.fail(path, v, "%q is not a duration (for example 36h, 90m or 7d)", s)
				return
			}
			p.GracePeriod = g
		},
		"exemptions": d.exemptions,
	}, rootKeys)
	if !seen["version"] && !d.exhausted {
		d.fail("version", n, "is missing (write version: %d)", SchemaVersion)
	}
}

func (d *decoder) selector(dst *Selector) field {
	return func(path string, n *yaml.Node) {
		d.mapping(path, n, map[string]field{
			"mailboxes": func(path string, v *yaml.Node) { dst.Mailboxes = d.list(path, v) },
			"domains":   func(path string, v *yaml.Node) { dst.Domains = d.list(path, v) },
			"groups":    func(path string, v *yaml.Node) { dst.Groups = d.list(path, v) },
		}, selectorKeys)
	}
}

// groups decodes the mapping of group names to member patterns, whose keys
// are the administrator's, not the schema's.
func (d *decoder) groups(path string, n *yaml.Node) {
	if n.Kind != yaml.MappingNode {
		d.fail(path, n, "must be a mapping of group names to address lists, not %s", describe(n))
		return
	}
	groups := map[string][]string{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := d.deref(n.Content[i]), d.deref(n.Content[i+1])
		if k == nil || v == nil {
			break
		}
		name, ok := d.key(path, k)
		if !ok {
			continue
		}
		p := join(path, name)
		if _, dup := groups[name]; dup {
			d.report(p, k, "is defined twice")
			continue
		}
		d.lines[p] = k.Line
		if isNull(v) {
			groups[name] = nil
			continue
		}
		groups[name] = d.list(p, v)
	}
	d.p.Groups = groups
}

func (d *decoder) platforms(path string, n *yaml.Node) {
	for _, it := range d.items(path, n) {
		pl, ok := platformByName(strings.ToLower(it.value))
		if !ok {
			p := fmt.Sprintf("%s[%d]", path, it.index)
			d.fail(p, it.node, "%q is not a platform (%s)", it.value, platformList)
			continue
		}
		d.p.AllowedPlatforms = append(d.p.AllowedPlatforms, pl)
	}
}

func (d *decoder) exemptions(path string, n *yaml.Node) {
	if n.Kind != yaml.SequenceNode {
		d.fail(path, n, "must be a list of exemptions, not %s", describe(n))
		return
	}
	for i, item := range n.Content {
		item = d.deref(item)
		if item == nil {
			return
		}
		p := fmt.Sprintf("%s[%d]", path, i)
		d.lines[p] = item.Line
		var e Exemption
		str := func(dst *string) field {
			return func(path string, v *yaml.Node) {
				if s, ok := d.str(path, v); ok {
					*dst = s
				}
			}
		}
		if isNull(item) {
			d.fail(p, item, "is empty")
			continue
		}
		d.mapping(p, item, map[string]field{
			"device_id":   str(&e.DeviceID),
			"device_type": str(&e.DeviceType),
			"mailbox":     str(&e.Mailbox),
			"reason":      str(&e.Reason),
			"trust_client_reported": func(path string, v *yaml.Node) {
				if b, ok := d.boolean(path, v); ok {
					e.TrustClientReported = b
				}
			},
			"until": func(path string, v *yaml.Node) {
				s, ok := d.str(path, v)
				if !ok {
					return
				}
				t, err := time.Parse(time.RFC3339, s)
				if err != nil {
					d.fail(path, v, "%q is not an RFC 3339 time (for example 2026-12-31T00:00:00Z)", s)
					return
				}
				e.Until = t
			},
		}, exemptionKeys)
		d.p.Exemptions = append(d.p.Exemptions, e)
	}
}

// parseGrace accepts Go durations and a leading number of whole days
// ("7d", "2d12h"), because grace periods are thought of in days and Go
// durations stop at hours.
func parseGrace(s string) (time.Duration, error) {
	var days int64
	rest := s
	if i := strings.IndexByte(s, 'd'); i >= 0 {
		n, err := strconv.ParseUint(s[:i], 10, 16)
		if err != nil {
			return 0, fmt.Errorf("bad day count %q: %w", s[:i], err)
		}
		days, rest = int64(n), s[i+1:]
		if rest == "" {
			return time.Duration(days) * 24 * time.Hour, nil
		}
		if rest[0] < '0' || rest[0] > '9' {
			return 0, fmt.Errorf("bad duration after the days: %q", rest)
		}
	}
	d, err := time.ParseDuration(rest)
	if err != nil {
		return 0, err
	}
	total := time.Duration(days)*24*time.Hour + d
	if total < d {
		return 0, errors.New("duration overflows")
	}
	return total, nil
}
