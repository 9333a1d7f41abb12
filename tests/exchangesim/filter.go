package exchangesim

import (
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// filterNode is a parsed OPATH filter.
type filterNode interface {
	eval(get func(prop string) any) bool
}

type andNode struct{ l, r filterNode }
type orNode struct{ l, r filterNode }
type notNode struct{ x filterNode }
type cmpNode struct {
	prop string
	op   string
	val  any // string, bool, nil, int64
	// dayFirst reads date literals the way a session whose culture puts the
	// day first (de-DE and most of Europe) converts them.
	dayFirst bool
	// caseSensitive makes -like and -notlike compare case by case
	// (Org.SetCaseSensitiveLike).
	caseSensitive bool
}

func (n andNode) eval(g func(string) any) bool { return n.l.eval(g) && n.r.eval(g) }
func (n orNode) eval(g func(string) any) bool  { return n.l.eval(g) || n.r.eval(g) }
func (n notNode) eval(g func(string) any) bool { return !n.x.eval(g) }

func (n cmpNode) eval(g func(string) any) bool {
	v := g(n.prop)
	switch n.op {
	case "-eq":
		return opathEqual(v, n.val, n.dayFirst)
	case "-ne":
		return !opathEqual(v, n.val, n.dayFirst)
	case "-like", "-notlike":
		pat, _ := n.val.(string)
		m := false
		if s, ok := v.(string); ok {
			m = like(pat, s, n.caseSensitive)
		} else {
			for _, s := range asStrings(v) {
				if like(pat, s, n.caseSensitive) {
					m = true
				}
			}
		}
		return m == (n.op == "-like")
	default:
		return compareOrdered(v, n.val, n.op, n.dayFirst)
	}
}

// lastProp remembers the last property get read, so that a filter
// comparing one property many times (a partitioned listing's dozens of
// DeviceId -like '*a') reads and boxes it once per object.
func lastProp(get func(string) any) func(string) any {
	var (
		name string
		val  any
		read bool
	)
	return func(p string) any {
		if !read || p != name {
			name, val, read = p, get(p), true
		}
		return val
	}
}

// asStrings flattens a property value to the strings it holds; multi-valued
// properties match when any value matches, as in OPATH.
func asStrings(v any) []string {
	switch x := v.(type) {
	case nil:
		return nil
	case string:
		return []string{x}
	case []string:
		return x
	case bool:
		return []string{strconv.FormatBool(x)}
	case time.Time:
		return []string{x.UTC().Format(time.RFC3339)}
	case int64:
		return []string{strconv.FormatInt(x, 10)}
	}
	return []string{fmt.Sprint(v)}
}

func opathEqual(v, want any, dayFirst bool) bool {
	if want == nil {
		switch x := v.(type) {
		case nil:
			return true
		case string:
			return x == ""
		case []string:
			return len(x) == 0
		case time.Time:
			return x.IsZero()
		}
		return false
	}
	if b, ok := want.(bool); ok {
		vb, isBool := v.(bool)
		return isBool && vb == b
	}
	ws := fmt.Sprint(want)
	if t, ok := v.(time.Time); ok {
		wt, err := parseOPATHTime(ws, dayFirst)
		return err == nil && t.Equal(wt)
	}
	for _, s := range asStrings(v) {
		if strings.EqualFold(s, ws) {
			return true
		}
	}
	return false
}

func compareOrdered(v, want any, op string, dayFirst bool) bool {
	cmp := 0
	switch x := v.(type) {
	case time.Time:
		wt, err := parseOPATHTime(fmt.Sprint(want), dayFirst)
		if err != nil || x.IsZero() {
			return false
		}
		cmp = x.Compare(wt)
	case int64:
		w, err := strconv.ParseInt(fmt.Sprint(want), 10, 64)
		if err != nil {
			return false
		}
		cmp = compareInt(x, w)
	default:
		cmp = strings.Compare(strings.ToLower(fmt.Sprint(v)), strings.ToLower(fmt.Sprint(want)))
	}
	switch op {
	case "-gt":
		return cmp > 0
	case "-ge":
		return cmp >= 0
	case "-lt":
		return cmp < 0
	case "-le":
		return cmp <= 0
	}
	return false
}

func compareInt(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// parseOPATHTime accepts the forms Exchange accepts in filters: ISO 8601,
// and the session culture's date order (MM/dd/yyyy HH:mm:ss for en-US; day
// first, dd/MM/yyyy or dd.MM.yyyy, for a culture such as de-DE, where
// 12/25/2026 is refused and 05/12/2026 is the 5th of December). Times
// without a zone are UTC here. UNCONFIRMED: Exchange interprets zone-less
// times in the server's local time zone.
func parseOPATHTime(s string, dayFirst bool) (time.Time, error) {
	layouts := []string{time.RFC3339Nano, "2006-01-02T15:04:05", "2006-01-02 15:04:05", "01/02/2006 15:04:05", "1/2/2006 3:04:05 PM", "01/02/2006", "2006-01-02"}
	if dayFirst {
		layouts = []string{time.RFC3339Nano, "2006-01-02T15:04:05", "2006-01-02 15:04:05", "02/01/2006 15:04:05", "02.01.2006 15:04:05", "02/01/2006", "02.01.2006", "2006-01-02"}
	}
	for _, layout := range layouts {
		if t, err := time.Parse(layout, s); err == nil {
			return t.UTC(), nil
		}
	}
	return time.Time{}, fmt.Errorf("%q is not a date", s)
}

// like matches s against a -like pattern, by rune after lower-casing both
// unless caseSensitive. A pattern that is a literal after one leading *
// (a partitioned listing's '*a') is matched from the end without copying
// s, as a full listing evaluates dozens of them on every object.
func like(pat, s string, caseSensitive bool) bool {
	if len(pat) > 1 && pat[0] == '*' && !strings.ContainsAny(pat[1:], "*?") {
		lit := pat[1:]
		if caseSensitive {
			return strings.HasSuffix(s, lit)
		}
		for lit != "" {
			pr, pn := utf8.DecodeLastRuneInString(lit)
			sr, sn := utf8.DecodeLastRuneInString(s)
			if sn == 0 || unicode.ToLower(pr) != unicode.ToLower(sr) {
				return false
			}
			lit, s = lit[:len(lit)-pn], s[:len(s)-sn]
		}
		return true
	}
	if caseSensitive {
		return wildcard(pat, s)
	}
	return wildcard(strings.ToLower(pat), strings.ToLower(s))
}

// wildcard matches PowerShell -like patterns with * and ?.
func wildcard(pat, s string) bool {
	if pat == "" {
		return s == ""
	}
	switch pat[0] {
	case '*':
		for i := 0; i <= len(s); i++ {
			if wildcard(pat[1:], s[i:]) {
				return true
			}
		}
		return false
	case '?':
		return s != "" && wildcard(pat[1:], s[1:])
	}
	return s != "" && s[0] == pat[0] && wildcard(pat[1:], s[1:])
}

// filterError reports an invalid filter the way Exchange's parameter
// setter does.
type filterError struct {
	msg string
}

func (e *filterError) Error() string { return e.msg }

// withDayFirst returns the filter with its date literals read day first.
func withDayFirst(n filterNode) filterNode {
	switch x := n.(type) {
	case andNode:
		return andNode{withDayFirst(x.l), withDayFirst(x.r)}
	case orNode:
		return orNode{withDayFirst(x.l), withDayFirst(x.r)}
	case notNode:
		return notNode{withDayFirst(x.x)}
	case cmpNode:
		x.dayFirst = true
		return x
	}
	return n
}

// withCaseSensitiveLike returns the filter with its -like and -notlike
// comparisons made case by case.
func withCaseSensitiveLike(n filterNode) filterNode {
	switch x := n.(type) {
	case andNode:
		return andNode{withCaseSensitiveLike(x.l), withCaseSensitiveLike(x.r)}
	case orNode:
		return orNode{withCaseSensitiveLike(x.l), withCaseSensitiveLike(x.r)}
	case notNode:
		return notNode{withCaseSensitiveLike(x.x)}
	case cmpNode:
		x.caseSensitive = true
		return x
	}
	return n
}

// leadingWildcard returns the property of the first -like or -notlike
// whose value begins with *.
func leadingWildcard(n filterNode) (string, bool) {
	switch x := n.(type) {
	case andNode:
		if p, ok := leadingWildcard(x.l); ok {
			return p, ok
		}
		return leadingWildcard(x.r)
	case orNode:
		if p, ok := leadingWildcard(x.l); ok {
			return p, ok
		}
		return leadingWildcard(x.r)
	case notNode:
		return leadingWildcard(x.x)
	case cmpNode:
		if s, ok := x.val.(string); ok && (x.op == "-like" || x.op == "-notlike") && strings.HasPrefix(s, "*") {
			return x.prop, true
		}
	}
	return "", false
}

// dateLiterals returns the literals a filter compares date properties with.
func dateLiterals(n filterNode, isDate func(prop string) bool) []string {
	switch x := n.(type) {
	case andNode:
		return append(dateLiterals(x.l, isDate), dateLiterals(x.r, isDate)...)
	case orNode:
		return append(dateLiterals(x.l, isDate), dateLiterals(x.r, isDate)...)
	case notNode:
		return dateLiterals(x.x, isDate)
	case cmpNode:
		if s, ok := x.val.(string); ok && isDate(x.prop) {
			return []string{s}
		}
	}
	return nil
}

// parseFilter parses an OPATH filter, allowing only the given properties.
func parseFilter(src string, props map[string]string) (filterNode, error) {
	p := &filterParser{src: src, props: props}
	p.toks, p.err = lexFilter(src)
	if p.err != nil {
		return nil, p.err
	}
	n := p.or()
	if p.err == nil && p.pos < len(p.toks) {
		p.fail(p.toks[p.pos].pos)
	}
	if p.err != nil {
		return nil, p.err
	}
	return n, nil
}

type filterTok struct {
	kind string // word, op, str, lp, rp, var
	text string
	pos  int
}

func lexFilter(src string) ([]filterTok, error) {
	s := strings.TrimSpace(src)
	off := len(src) - len(strings.TrimLeft(src, " \t\r\n"))
	if strings.HasPrefix(s, "{") && strings.HasSuffix(s, "}") {
		s = s[1 : len(s)-1]
		off++
	}
	var toks []filterTok
	rs := []rune(s)
	for i := 0; i < len(rs); {
		r := rs[i]
		switch {
		case unicode.IsSpace(r):
			i++
		case r == '(':
			toks = append(toks, filterTok{"lp", "(", off + i})
			i++
		case r == ')':
			toks = append(toks, filterTok{"rp", ")", off + i})
			i++
		case r == '\'' || r == '"':
			start := i
			var b strings.Builder
			i++
			closed := false
			for i < len(rs) {
				if rs[i] == r {
					if i+1 < len(rs) && rs[i+1] == r {
						b.WriteRune(r)
						i += 2
						continue
					}
					i++
					closed = true
					break
				}
				b.WriteRune(rs[i])
				i++
			}
			if !closed {
				return nil, filterSyntax(src, off+start)
			}
			toks = append(toks, filterTok{"str", b.String(), off + start})
		case r == '-':
			start := i
			i++
			for i < len(rs) && unicode.IsLetter(rs[i]) {
				i++
			}
			toks = append(toks, filterTok{"op", strings.ToLower(string(rs[start:i])), off + start})
		case r == '$':
			start := i
			i++
			for i < len(rs) && (unicode.IsLetter(rs[i]) || unicode.IsDigit(rs[i])) {
				i++
			}
			toks = append(toks, filterTok{"var", strings.ToLower(string(rs[start:i])), off + start})
		default:
			start := i
			for i < len(rs) && !unicode.IsSpace(rs[i]) && rs[i] != '(' && rs[i] != ')' {
				i++
			}
			toks = append(toks, filterTok{"word", string(rs[start:i]), off + start})
		}
	}
	return toks, nil
}

func filterSyntax(src string, pos int) error {
	return &filterError{fmt.Sprintf("Invalid filter syntax. For a description of the filter parameter syntax see the command help.\r\n\"%s\" at position %d.", src, pos+1)}
}

type filterParser struct {
	src   string
	toks  []filterTok
	pos   int
	err   error
	props map[string]string
}

func (p *filterParser) fail(pos int) {
	if p.err == nil {
		p.err = filterSyntax(p.src, pos)
	}
}

func (p *filterParser) peek() *filterTok {
	if p.pos < len(p.toks) {
		return &p.toks[p.pos]
	}
	return nil
}

func (p *filterParser) or() filterNode {
	l := p.and()
	for t := p.peek(); p.err == nil && t != nil && t.kind == "op" && t.text == "-or"; t = p.peek() {
		p.pos++
		l = orNode{l, p.and()}
	}
	return l
}

func (p *filterParser) and() filterNode {
	l := p.not()
	for t := p.peek(); p.err == nil && t != nil && t.kind == "op" && t.text == "-and"; t = p.peek() {
		p.pos++
		l = andNode{l, p.not()}
	}
	return l
}

func (p *filterParser) not() filterNode {
	if t := p.peek(); t != nil && t.kind == "op" && t.text == "-not" {
		p.pos++
		return notNode{p.not()}
	}
	return p.primary()
}

func (p *filterParser) primary() filterNode {
	t := p.peek()
	if t == nil {
		p.fail(len(p.src))
		return nil
	}
	if t.kind == "lp" {
		p.pos++
		n := p.or()
		if c := p.peek(); c == nil || c.kind != "rp" {
			p.fail(len(p.src))
			return nil
		}
		p.pos++
		return n
	}
	if t.kind != "word" {
		p.fail(t.pos)
		return nil
	}
	canon, ok := p.props[strings.ToLower(t.text)]
	if !ok {
		if p.err == nil {
			p.err = &filterError{fmt.Sprintf("\"%s\" is not a recognized filterable property. For a list of filterable properties, see the command help.", t.text)}
		}
		return nil
	}
	p.pos++
	op := p.peek()
	if op == nil || op.kind != "op" {
		p.fail(t.pos)
		return nil
	}
	switch op.text {
	case "-eq", "-ne", "-like", "-notlike", "-gt", "-ge", "-lt", "-le":
	default:
		p.fail(op.pos)
		return nil
	}
	p.pos++
	v := p.peek()
	if v == nil {
		p.fail(len(p.src))
		return nil
	}
	p.pos++
	var val any
	switch v.kind {
	case "str", "word":
		val = v.text
	case "var":
		switch v.text {
		case "$true":
			val = true
		case "$false":
			val = false
		case "$null":
			val = nil
		default:
			// Variables are not expanded: a filter is data, not script.
			p.fail(v.pos)
			return nil
		}
	default:
		p.fail(v.pos)
		return nil
	}
	return cmpNode{prop: canon, op: op.text, val: val}
}
