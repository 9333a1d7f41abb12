package exchangesim

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/easguard/easguard/pkg/exchange"
)

// kind is the .NET type of a cmdlet parameter, as far as binding cares.
type kind int

const (
	kString    kind = iota // [string]
	kSwitch                // [switch]
	kBool                  // [bool]
	kInt                   // [int]
	kUnlimited             // Unlimited<uint>: a number or "Unlimited"
	kEnum                  // an enum; param.enum lists the names
	kMulti                 // MultiValuedProperty<string>: value, array, @{Add;Remove} or $null
	kStrings               // [string[]]
	kIdentity              // an identity parameter: a non-null string
)

// param describes one parameter of a cmdlet.
type param struct {
	name      string
	kind      kind
	enum      []string
	enumType  string // .NET type name in conversion errors
	mandatory bool
	// set names the parameter set; parameters of different non-empty sets
	// cannot be combined.
	set string
}

// multi is a bound multi-valued parameter.
type multi struct {
	replace    bool
	values     []string // when replace
	add, rmove []string
}

// args are bound parameters by canonical name.
type args map[string]any

func (a args) has(name string) bool { _, ok := a[name]; return ok }

func (a args) str(name string) string {
	s, _ := a[name].(string)
	return s
}

func (a args) boolean(name string) bool {
	b, _ := a[name].(bool)
	return b
}

// common are the common parameters every cmdlet accepts, with aliases.
var common = []struct {
	name    string
	aliases []string
	kind    kind
}{
	{"Verbose", []string{"vb"}, kSwitch}, {"Debug", []string{"db"}, kSwitch},
	{"ErrorAction", []string{"ea"}, kString}, {"WarningAction", []string{"wa"}, kString},
	{"InformationAction", []string{"infa"}, kString}, {"ErrorVariable", []string{"ev"}, kString},
	{"WarningVariable", []string{"wv"}, kString}, {"InformationVariable", []string{"iv"}, kString},
	{"OutVariable", []string{"ov"}, kString}, {"OutBuffer", []string{"ob"}, kInt},
	{"PipelineVariable", []string{"pv"}, kString},
}

// addedByWorker are the common parameters worker.ps1 itself passes; a
// request that passes them too makes PowerShell bind them twice.
var addedByWorker = map[string]bool{"ErrorAction": true, "ErrorVariable": true, "WarningAction": true, "WarningVariable": true}

// bind binds request parameters to a cmdlet's parameters the way
// PowerShell's binder does: names case-insensitive, any unambiguous prefix
// accepted, values converted to the parameter's type or refused with
// PowerShell's error.
func (c *cmdlet) bind(p exchange.Params) (args, *exchange.Error) {
	type cand struct {
		canon string
		kind  kind
		spec  *param
	}
	var all []cand
	for i := range c.params {
		all = append(all, cand{c.params[i].name, c.params[i].kind, &c.params[i]})
	}
	if c.shouldProcess {
		all = append(all, cand{"Confirm", kSwitch, nil}, cand{"WhatIf", kSwitch, nil})
	}
	all = append(all, cand{"DomainController", kString, nil})
	for _, cp := range common {
		all = append(all, cand{cp.name, cp.kind, nil})
	}
	aliases := map[string]string{"cf": "Confirm", "wi": "WhatIf", "dc": "DomainController"}
	for _, cp := range common {
		for _, a := range cp.aliases {
			aliases[a] = cp.name
		}
	}
	out := args{}
	for key, raw := range p {
		lk := strings.ToLower(key)
		var match []cand
		for _, cd := range all {
			if strings.ToLower(cd.canon) == lk {
				match = []cand{cd}
				break
			}
		}
		if len(match) == 0 {
			if canon, ok := aliases[lk]; ok {
				for _, cd := range all {
					if cd.canon == canon {
						match = []cand{cd}
					}
				}
			}
		}
		if len(match) == 0 {
			for _, cd := range all {
				if strings.HasPrefix(strings.ToLower(cd.canon), lk) {
					match = append(match, cd)
				}
			}
		}
		switch {
		case len(match) == 0:
			e := bindNotFound(c.name, key)
			return nil, &e
		case len(match) > 1:
			var names []string
			for _, m := range match {
				names = append(names, m.canon)
			}
			e := bindAmbiguous(c.name, key, names)
			return nil, &e
		}
		m := match[0]
		if addedByWorker[m.canon] {
			e := newError(fmt.Sprintf("Cannot bind parameter because parameter '%s' is specified more than once. To provide multiple values to parameters that can accept multiple values, use the array syntax. For example, \"-parameter value1,value2,value3\".", m.canon),
				"InvalidArgument", "ParameterBindingException", "ParameterAlreadyBound,"+c.name, "")
			return nil, &e
		}
		if _, dup := out[m.canon]; dup {
			e := newError(fmt.Sprintf("Cannot bind parameter because parameter '%s' is specified more than once.", m.canon),
				"InvalidArgument", "ParameterBindingException", "ParameterAlreadyBound,"+c.name, "")
			return nil, &e
		}
		v, err := convert(c.name, m.canon, m.kind, m.spec, raw)
		if err != nil {
			return nil, err
		}
		out[m.canon] = v
	}
	// Parameter sets: parameters of two different named sets cannot mix.
	set := ""
	for i := range c.params {
		pp := &c.params[i]
		if pp.set == "" || !out.has(pp.name) {
			continue
		}
		if set != "" && set != pp.set {
			e := bindSetConflict(c.name)
			return nil, &e
		}
		set = pp.set
	}
	for i := range c.params {
		pp := &c.params[i]
		if pp.mandatory && !out.has(pp.name) && (pp.set == "" || pp.set == set || (set == "" && pp.set == c.defaultSet)) {
			e := bindMissing(c.name, pp.name)
			return nil, &e
		}
	}
	return out, nil
}

func convert(cmdlet, name string, k kind, spec *param, raw any) (any, *exchange.Error) {
	fail := func(detail string) (any, *exchange.Error) {
		e := bindConvert(cmdlet, name, detail)
		return nil, &e
	}
	typeName := func(v any) string {
		switch v.(type) {
		case []any:
			return "System.Object[]"
		case map[string]any:
			return "System.Collections.Hashtable"
		case bool:
			return "System.Boolean"
		case json.Number:
			return "System.Int32"
		}
		return "System.String"
	}
	switch k {
	case kString, kIdentity:
		switch v := raw.(type) {
		case nil:
			if k == kIdentity {
				e := bindNull(cmdlet, name)
				return nil, &e
			}
			return nil, nil
		case string:
			if k == kIdentity && v == "" {
				e := bindNull(cmdlet, name)
				return nil, &e
			}
			return v, nil
		case json.Number:
			return v.String(), nil
		case bool:
			if v {
				return "True", nil
			}
			return "False", nil
		default:
			return fail(fmt.Sprintf("Cannot convert the \"%s\" value of type \"%s\" to type \"System.String\".", typeName(raw), typeName(raw)))
		}
	case kSwitch, kBool:
		target := "System.Management.Automation.SwitchParameter"
		if k == kBool {
			target = "System.Boolean"
		}
		switch v := raw.(type) {
		case bool:
			return v, nil
		case json.Number:
			f, err := v.Float64()
			if err == nil {
				return f != 0, nil
			}
		}
		return fail(fmt.Sprintf("Cannot convert value \"%s\" to type \"%s\". Boolean parameters accept only Boolean values and numbers, such as $True, $False, 1 or 0.", typeName(raw), target))
	case kInt:
		switch v := raw.(type) {
		case json.Number:
			if n, err := v.Int64(); err == nil && n >= math.MinInt32 && n <= math.MaxInt32 {
				return n, nil
			}
		case string:
			if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 32); err == nil {
				return n, nil
			}
			return fail(fmt.Sprintf("Cannot convert value \"%s\" to type \"System.Int32\". Error: \"Input string was not in a correct format.\"", v))
		}
		return fail(fmt.Sprintf("Cannot convert value \"%v\" to type \"System.Int32\".", raw))
	case kUnlimited:
		switch v := raw.(type) {
		case json.Number:
			if n, err := v.Int64(); err == nil && n >= 0 && n <= math.MaxUint32 {
				return n, nil
			}
		case string:
			if strings.EqualFold(strings.TrimSpace(v), "Unlimited") {
				return int64(-1), nil
			}
			if n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32); err == nil {
				return int64(n), nil
			}
		}
		return fail(fmt.Sprintf("Cannot convert value \"%v\" to type \"Microsoft.Exchange.Data.Unlimited`1[System.UInt32]\". Error: \"The value must be a non-negative number or \"Unlimited\".\"", raw))
	case kEnum:
		s, ok := raw.(string)
		if n, isNum := raw.(json.Number); isNum {
			if i, err := n.Int64(); err == nil && i >= 0 && int(i) < len(spec.enum) {
				return spec.enum[i], nil
			}
		}
		if ok {
			for _, e := range spec.enum {
				if strings.EqualFold(e, strings.TrimSpace(s)) {
					return e, nil
				}
			}
		}
		return fail(fmt.Sprintf("Cannot convert value \"%v\" to type \"%s\". Error: \"Unable to match the identifier name %v to a valid enumerator name. Specify one of the following enumerator names and try again:\r\n%s\"",
			raw, spec.enumType, raw, strings.Join(spec.enum, ", ")))
	case kMulti, kStrings:
		switch v := raw.(type) {
		case nil:
			return &multi{replace: true}, nil
		case string:
			return &multi{replace: true, values: []string{v}}, nil
		case json.Number:
			return &multi{replace: true, values: []string{v.String()}}, nil
		case []any:
			vals, err := stringList(v)
			if err != "" {
				return fail(err)
			}
			return &multi{replace: true, values: vals}, nil
		case map[string]any:
			if k == kStrings {
				return fail("Cannot convert the \"System.Collections.Hashtable\" value of type \"System.Collections.Hashtable\" to type \"System.String[]\".")
			}
			mv := &multi{}
			for key, val := range v {
				var list []string
				switch x := val.(type) {
				case string:
					list = []string{x}
				case []any:
					var err string
					if list, err = stringList(x); err != "" {
						return fail(err)
					}
				case nil:
				default:
					return fail("Cannot convert the hash table value to type \"System.String\".")
				}
				switch strings.ToLower(key) {
				case "add":
					mv.add = append(mv.add, list...)
				case "remove":
					mv.rmove = append(mv.rmove, list...)
				default:
					// UNCONFIRMED wording; Exchange accepts only Add and Remove.
					return fail(fmt.Sprintf("Cannot convert the \"System.Collections.Hashtable\" value of type \"System.Collections.Hashtable\" to type \"Microsoft.Exchange.Data.MultiValuedProperty`1[System.String]\". The hash table may contain only the keys 'Add' and 'Remove', not '%s'.", key))
				}
			}
			return mv, nil
		}
	}
	return fail(fmt.Sprintf("Cannot convert value \"%v\".", raw))
}

func stringList(v []any) ([]string, string) {
	out := make([]string, 0, len(v))
	for _, x := range v {
		switch s := x.(type) {
		case string:
			out = append(out, s)
		case json.Number:
			out = append(out, s.String())
		case nil:
		default:
			return nil, "Cannot convert the \"System.Object[]\" value to type \"System.String[]\"."
		}
	}
	return out, ""
}
