package exchange

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sort"
	"strings"
	"sync"

	"golang.org/x/sync/errgroup"
)

// A full listing (every partnership, every recipient with one) is read as
// several filtered listings at once over the client's sessions (two parts
// a session, so that one that ends early takes another), so that its time
// approaches objects × per-object cost ÷ sessions instead of one session
// reading everything while the others sit idle: the parallel reads the
// original connector's parallel command support did for writes.
//
// The collector marks a partnership gone when a complete listing misses
// it, so the parts must together be exactly the whole listing whatever
// Exchange does with a filter. Each part but the last selects the objects
// whose property ends in one of a group of characters, every letter in
// both cases (Prop -like '*a' -or Prop -like '*A' -or Prop -like '*7'); the
// last is the literal negation of all those terms together. So an object
// is in the last part exactly when it is in no other, whether Exchange's
// -like compares case-sensitively or not (UNCONFIRMED; both cases of a
// letter are always in the same group), and whatever characters a value
// holds: quotes, non-ASCII, an empty or missing value all fall in the
// last part. No two groups share a character, and a value has one last
// character, so no object is in two parts. An object that arrives in a
// part that cannot hold it (an ASCII ending of another group: Exchange did
// not apply the filter as written) fails the listing.
//
// The last character, not the first, is what the parts split on: device
// ids begin with a platform's fixed prefix (Appl… on every iPhone and
// iPad, android… on Android's own mail app), so splitting on the first
// character would leave most partnerships in one part; the last character
// is a serial number's or a random id's, spread evenly. Exchange turns a
// -like with a leading wildcard into an LDAP final-substring match
// (attribute=*a), which Active Directory answers for any string attribute;
// the reference has no source for it on these cmdlets (UNCONFIRMED), so
// where Exchange refuses the parts' filters the listing is read as one
// (streamPartitioned).

// partitionChars are the last characters the parts group, in lower case.
const partitionChars = "0123456789abcdefghijklmnopqrstuvwxyz"

// MaxListPartitions is the most parts a partitioned listing is split into
// besides its remainder: one per character of partitionChars.
const MaxListPartitions = len(partitionChars)

// deviceIDWeight is how likely a device id is to end in c, with ids drawn
// in equal shares from the alphabets device ids use: decimal digits
// (android…), hexadecimal (Outlook, Gmail, Windows) and letters and digits
// (Apple's). Digits are in all three, so groups of equal weight hold fewer
// of them.
func deviceIDWeight(c byte) float64 {
	w := 1.0 / 36
	if c >= '0' && c <= '9' {
		w += 1.0/10 + 1.0/16
	} else if c >= 'a' && c <= 'f' {
		w += 1.0 / 16
	}
	return w
}

// evenWeight weighs every character the same (recipient aliases, which
// end in letters of names or in digits).
func evenWeight(byte) float64 { return 1 }

// part is one filtered listing of a partitioned one.
type part struct {
	// filter is the OPATH filter; empty for an unpartitioned listing.
	filter string
	// what says which objects the part holds, for errors.
	what string
	// chars are the last characters (lower case) of a group's objects;
	// rest marks the remainder, whole the one part of an unpartitioned
	// listing.
	chars       string
	rest, whole bool
}

// mayHold reports whether an object whose property is v can be in the
// part however Exchange's -like treats case: false when v ends in an
// ASCII letter or digit the group does not hold (for the remainder: one
// any group holds), or in any other ASCII character, or is empty, and the
// part is a group. A non-ASCII ending is not judged (case folding may
// take it to a group's letter, as the Kelvin sign to k). An object the
// part cannot hold shows that Exchange did not apply the filter as
// written (it ignored it, or read '*a' as something else), so the parts
// may overlap or leave objects out.
func (p part) mayHold(v string) bool {
	if p.whole {
		return true
	}
	if v == "" {
		return p.rest
	}
	c := v[len(v)-1]
	if c >= 0x80 {
		return true
	}
	if c >= 'A' && c <= 'Z' {
		c += 'a' - 'A'
	}
	if p.rest {
		return strings.IndexByte(partitionChars, c) < 0
	}
	return strings.IndexByte(p.chars, c) >= 0
}

// partitionFilters returns the parts of a listing of prop split into
// groups and the remainder (the remainder last), each filter combined with
// base (an OPATH filter, or empty). The characters go to groups by weight,
// heaviest first into the lightest group, so the parts are of similar
// size when values end as weight expects. groups is capped at
// MaxListPartitions; below 2 the one part is the whole listing (base).
func partitionFilters(prop, base string, groups int, weight func(byte) float64) []part {
	groups = min(groups, MaxListPartitions)
	if groups < 2 {
		return []part{{filter: base, what: "the whole listing", whole: true}}
	}
	chars := []byte(partitionChars)
	sort.SliceStable(chars, func(i, j int) bool { return weight(chars[i]) > weight(chars[j]) })
	sets := make([][]byte, groups)
	load := make([]float64, groups)
	for _, c := range chars {
		k := 0
		for i := range load {
			if load[i] < load[k] {
				k = i
			}
		}
		sets[k] = append(sets[k], c)
		load[k] += weight(c)
	}
	terms := func(cs []byte) []string {
		sort.Slice(cs, func(i, j int) bool { return cs[i] < cs[j] })
		var out []string
		for _, c := range cs {
			out = append(out, prop+" -like '*"+string(c)+"'")
			if u := strings.ToUpper(string(c)); u != string(c) {
				out = append(out, prop+" -like '*"+u+"'")
			}
		}
		return out
	}
	with := func(f string) string {
		if base == "" {
			return f
		}
		return "(" + base + ") -and (" + f + ")"
	}
	out := make([]part, 0, groups+1)
	for _, cs := range sets {
		f := with(strings.Join(terms(cs), " -or "))
		out = append(out, part{filter: f, what: prop + " ending in one of " + string(cs), chars: string(cs)})
	}
	rest := with("-not (" + strings.Join(terms([]byte(partitionChars)), " -or ") + ")")
	return append(out, part{filter: rest, what: prop + " ending in none of " + partitionChars, rest: true})
}

// listGroups is how many parts (besides the remainder) a full listing is
// split into: ListPartitions when set, else two per session, so that a
// session that finishes a small part takes another while a large one is
// still read; 1 (one unfiltered listing) on a single session.
func (c *Client) listGroups() int {
	switch {
	case c.ListPartitions > 0:
		return c.ListPartitions
	case c.Parallel < 2:
		return 1
	}
	return min(2*c.Parallel, MaxListPartitions)
}

// streamPartitioned runs a full listing, call with base as its filter, in
// parts split on prop (partitionFilters, listGroups of them, weighed by
// weight), at most Parallel at once (each on a session of its own, through
// the same Runner as every other request), and hands fn their objects page
// by page, each made a T by convert in its part's own goroutine. fn is
// called for one page at a time, never concurrently, so a
// caller written for one listing needs no locking; pages of different
// parts arrive interleaved, in no particular order. The listing is
// complete only if every part is (stream): the first part to fail ends the
// others and is the error, and fn is not called after it.
//
// Whether Exchange accepts -like with a leading wildcard on these
// properties is UNCONFIRMED. If it refuses the parts' filters (ErrInvalid:
// the filter could not be bound) before any page reached fn, the listing
// is read as one, and so is every later full listing of this client. If it
// lists an object in a part that cannot hold it (part.mayHold: the filter
// was not applied as written), the listing fails (ErrIncomplete) and later
// full listings are read as one. call must select prop.
func streamPartitioned[T any](ctx context.Context, c *Client, call Call, prop, base string, weight func(byte) float64, convert func(Object) T, fn func([]T) error) error {
	pages := func(objs []Object) []T {
		page := make([]T, 0, len(objs))
		for _, o := range objs {
			page = append(page, convert(o))
		}
		return page
	}
	withFilter := func(f string) Call {
		call := call
		call.Params = maps.Clone(call.Params)
		if f == "" {
			delete(call.Params, "Filter")
		} else {
			call.Params["Filter"] = f
		}
		return call
	}
	groups := c.listGroups()
	if c.unpartitioned.Load() {
		groups = 1
	}
	parts := partitionFilters(prop, base, groups, weight)
	if len(parts) == 1 {
		return c.stream(ctx, withFilter(parts[0].filter), func(objs []Object) error { return fn(pages(objs)) })
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(max(1, c.Parallel))
	var (
		mu        sync.Mutex
		delivered bool
	)
	for i, p := range parts {
		call := withFilter(p.filter)
		g.Go(func() error {
			if err := gctx.Err(); err != nil {
				return err // another part failed before this one started
			}
			err := c.stream(gctx, call, func(objs []Object) error {
				for _, o := range objs {
					if v := str(o, prop); !p.mayHold(v) {
						// Read the next full listing as one.
						c.unpartitioned.Store(true)
						return fmt.Errorf("%w: Exchange listed %s %q among those %s: it did not apply the part's filter as written",
							ErrIncomplete, prop, v, p.what)
					}
				}
				page := pages(objs)
				mu.Lock()
				defer mu.Unlock()
				if err := gctx.Err(); err != nil {
					return fmt.Errorf("%w: another part of the listing failed", err)
				}
				delivered = true
				return fn(page)
			})
			if err != nil {
				return fmt.Errorf("part %d of %d of the listing (%s): %w", i+1, len(parts), p.what, err)
			}
			return nil
		})
	}
	perr := g.Wait()
	if perr != nil && errors.Is(perr, ErrInvalid) && !delivered && ctx.Err() == nil {
		c.unpartitioned.Store(true)
		if err := c.stream(ctx, withFilter(base), func(objs []Object) error { return fn(pages(objs)) }); err != nil {
			return fmt.Errorf("%w (read as one listing after Exchange refused its parts: %v)", err, perr)
		}
		return nil
	}
	return perr
}
