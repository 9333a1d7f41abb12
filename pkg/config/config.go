// Package config loads a worker's settings from EASGUARD_* environment
// variables through github.com/kelseyhightower/envconfig, adds what
// envconfig lacks for containers — secrets from <NAME>_FILE, validation
// that names the variable, usage text for --help — and keeps secrets out of
// every log line and error message.
package config

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"reflect"
	"strings"
	"text/tabwriter"
	"text/template"
	"time"

	"github.com/kelseyhightower/envconfig"
)

// Prefix is the prefix of every easguard environment variable.
const Prefix = "EASGUARD"

// Secret is a setting that must never be printed: passwords, tokens, keys.
// Every way of formatting it prints [redacted]; Reveal gives the value to
// the one place that needs it.
type Secret string

const redacted = "[redacted]"

// Reveal returns the secret's value.
func (s Secret) Reveal() string { return string(s) }

// String redacts the secret for fmt's %s and %v.
func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return redacted
}

// GoString redacts the secret for fmt's %#v.
func (s Secret) GoString() string { return fmt.Sprintf("config.Secret(%q)", s.String()) }

// LogValue redacts the secret in slog records.
func (s Secret) LogValue() slog.Value { return slog.StringValue(s.String()) }

// MarshalJSON redacts the secret in JSON.
func (s Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + s.String() + `"`), nil }

// Var describes one environment variable of a configuration struct.
type Var struct {
	Key         string
	Type        string
	Default     string
	Required    bool
	Secret      bool
	Description string
	field       reflect.Value
}

// ErrConfig is wrapped by every configuration error.
var ErrConfig = errors.New("configuration")

// FieldError reports a value that parsed but makes no sense. Validate
// methods return it for a field; Load turns it into a message naming the
// environment variable.
type FieldError struct {
	field   uintptr
	Problem string
}

func (e *FieldError) Error() string { return e.Problem }

// Invalid reports a problem with the field ptr points to, e.g.
// config.Invalid(&c.Org, "…"). The problem text must not contain a secret.
func Invalid(ptr any, format string, args ...any) error {
	v := reflect.ValueOf(ptr)
	if v.Kind() != reflect.Pointer {
		panic("config.Invalid needs a pointer to the field")
	}
	return &FieldError{field: v.Pointer(), Problem: fmt.Sprintf(format, args...)}
}

// Vars lists the variables of spec (a pointer to a struct), in field order,
// using envconfig's own naming so the list cannot disagree with Load.
func Vars(spec any) ([]Var, error) {
	var out []Var
	tmpl, err := template.New("vars").Funcs(template.FuncMap{
		"collect": func(key string, tags reflect.StructTag, field reflect.Value) string {
			out = append(out, Var{
				Key: key, Type: typeName(field.Type()), Default: tags.Get("default"),
				Required: tags.Get("required") == "true", Secret: tags.Get("secret") == "true",
				Description: tags.Get("desc"), field: field,
			})
			return ""
		},
	}).Parse(`{{range .}}{{collect .Key .Tags .Field}}{{end}}`)
	if err != nil {
		return nil, err
	}
	if err := envconfig.Usaget(Prefix, spec, io.Discard, tmpl); err != nil {
		return nil, fmt.Errorf("%w: describe %T: %w", ErrConfig, spec, err)
	}
	for _, v := range out {
		if v.Description == "" {
			return nil, fmt.Errorf("%w: %s has no desc tag; every variable is documented", ErrConfig, v.Key)
		}
	}
	return out, nil
}

func typeName(t reflect.Type) string {
	switch {
	case t == reflect.TypeFor[Secret]():
		return "secret"
	case t == reflect.TypeFor[time.Duration]():
		return "duration"
	}
	switch t.Kind() {
	case reflect.Bool:
		return "bool"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64, reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "integer"
	case reflect.Float32, reflect.Float64:
		return "number"
	case reflect.Slice:
		return "list of " + typeName(t.Elem())
	case reflect.Map:
		return "map"
	}
	return "string"
}

// Load fills spec (a pointer to a struct) from the environment and
// validates it. A secret may come from the file named by <KEY>_FILE, as
// container secrets are mounted. Errors name the variable and never quote a
// secret.
func Load(spec any) error {
	if err := checkTags(reflect.TypeOf(spec)); err != nil {
		return err
	}
	vars, err := Vars(spec)
	if err != nil {
		return err
	}
	// envconfig reads only the environment, so a secret read from its file
	// is placed there for the duration of Process and removed afterwards,
	// where no child process can inherit it.
	var cleanup []string
	defer func() {
		for _, k := range cleanup {
			_ = os.Unsetenv(k)
		}
	}()
	for _, v := range vars {
		_, set := os.LookupEnv(v.Key)
		if v.Secret {
			path, fromFile := os.LookupEnv(v.Key + "_FILE")
			if fromFile && set {
				return fmt.Errorf("%w: set %s or %s_FILE, not both", ErrConfig, v.Key, v.Key)
			}
			if fromFile {
				b, err := os.ReadFile(path)
				if err != nil {
					return fmt.Errorf("%w: %s_FILE: %w", ErrConfig, v.Key, err)
				}
				val := strings.TrimRight(string(b), "\r\n")
				if val == "" {
					return fmt.Errorf("%w: %s_FILE: %s is empty", ErrConfig, v.Key, path)
				}
				if err := os.Setenv(v.Key, val); err != nil {
					return fmt.Errorf("%w: %s: %w", ErrConfig, v.Key, err)
				}
				cleanup = append(cleanup, v.Key)
				set = true
			}
		}
		if v.Required && !set && v.Default == "" {
			hint := ""
			if v.Secret {
				hint = " (or " + v.Key + "_FILE)"
			}
			return fmt.Errorf("%w: %s%s is required: %s", ErrConfig, v.Key, hint, v.Description)
		}
	}
	if err := envconfig.Process(Prefix, spec); err != nil {
		var pe *envconfig.ParseError
		if errors.As(err, &pe) {
			for _, v := range vars {
				if v.Key != pe.KeyName {
					continue
				}
				if v.Secret {
					return fmt.Errorf("%w: %s: not a valid %s", ErrConfig, v.Key, v.Type)
				}
				return fmt.Errorf("%w: %s: %q is not a valid %s: %v", ErrConfig, v.Key, pe.Value, v.Type, pe.Err)
			}
		}
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if val, ok := spec.(interface{ Validate() error }); ok {
		if err := val.Validate(); err != nil {
			var fe *FieldError
			if errors.As(err, &fe) {
				for _, v := range vars {
					if v.field.CanAddr() && v.field.Addr().Pointer() == fe.field {
						return fmt.Errorf("%w: %s: %s", ErrConfig, v.Key, fe.Problem)
					}
				}
			}
			return fmt.Errorf("%w: %w", ErrConfig, err)
		}
	}
	return nil
}

// checkTags refuses the envconfig struct tag: with it, envconfig falls back
// to the unprefixed variable (NATS_URL for EASGUARD_NATS_URL), so a stray
// variable in a container could configure easguard. Name fields so that
// split_words produces the key instead.
func checkTags(t reflect.Type) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return fmt.Errorf("%w: spec must be a pointer to a struct, not %s", ErrConfig, t)
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if _, ok := f.Tag.Lookup("envconfig"); ok {
			return fmt.Errorf("%w: field %s.%s uses the envconfig tag; use split_words", ErrConfig, t.Name(), f.Name)
		}
		if f.Type.Kind() == reflect.Struct && f.Type != reflect.TypeFor[time.Time]() {
			if err := checkTags(f.Type); err != nil {
				return err
			}
		}
	}
	return nil
}

// help is a variable's description as --help and the README show it.
func (v Var) help(code func(string) string) string {
	if v.Secret {
		return v.Description + " Or put it in a file named by " + code(v.Key+"_FILE") + "."
	}
	return v.Description
}

// Usage writes a table of every variable of spec, for --help.
func Usage(w io.Writer, spec any) error {
	vars, err := Vars(spec)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 2, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "VARIABLE\tTYPE\tDEFAULT\tDESCRIPTION")
	for _, v := range vars {
		def := v.Default
		if v.Required {
			def = "(required)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", v.Key, v.Type, def, v.help(func(s string) string { return s }))
	}
	return tw.Flush()
}

// Markdown writes the variables of spec as a Markdown table, for the README.
func Markdown(w io.Writer, spec any) error {
	vars, err := Vars(spec)
	if err != nil {
		return err
	}
	fmt.Fprintln(w, "| Variable | Type | Default | Description |")
	fmt.Fprintln(w, "|---|---|---|---|")
	for _, v := range vars {
		def := "`" + v.Default + "`"
		switch {
		case v.Required:
			def = "**required**"
		case v.Default == "":
			def = ""
		}
		desc := v.help(func(s string) string { return "`" + s + "`" })
		fmt.Fprintf(w, "| `%s` | %s | %s | %s |\n", v.Key, v.Type, def, strings.ReplaceAll(desc, "|", `\|`))
	}
	return nil
}
