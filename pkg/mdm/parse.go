package mdm

import (
	"bufio"
	"bytes"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strconv"
	"strings"

	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// Inventory formats understood by the file source (FileOptions.Format).
const (
	// FormatAuto picks JSON or CSV by the file's extension, so the common
	// case needs no setting.
	FormatAuto = "auto"
	// FormatJSON is an array of managedDevice objects or Graph's
	// {"value": [...]} envelope, as Graph Explorer and scripts save it.
	FormatJSON = "json"
	// FormatCSV is a header row of managedDevice field names and a device
	// per row, as spreadsheets and other MDMs' exports produce it.
	FormatCSV = "csv"
)

// utf8BOM is what Windows tools put in front of UTF-8 exports.
var utf8BOM = []byte{0xEF, 0xBB, 0xBF}

// parseInventory reads a whole inventory in format (json or csv) from r
// and normalises every record. Any bad record fails the whole read: a
// partial inventory would look like devices disappearing. The file is
// streamed, a record at a time: an organisation's inventory of 100,000
// devices is never held as bytes, as decoded JSON and as records at once.
func parseInventory(source, format string, r io.Reader) (*inventory, error) {
	var (
		devices []*ev.MDMDevice
		err     error
	)
	br := bufio.NewReader(r)
	// Windows tools put a byte order mark in front of UTF-8 exports.
	if head, _ := br.Peek(len(utf8BOM)); bytes.Equal(head, utf8BOM) {
		_, _ = br.Discard(len(utf8BOM))
	}
	switch format {
	case FormatJSON:
		devices, err = parseJSON(source, br)
	case FormatCSV:
		devices, err = parseCSV(source, br)
	default:
		return nil, fmt.Errorf("parse inventory: %w: unknown format %q", ErrConfig, format)
	}
	if err != nil {
		return nil, err
	}
	return newInventory(devices)
}

// parseJSON accepts an array of managedDevice objects or Graph's
// {"value": [...]} envelope, and nothing after it. The array is decoded an
// element at a time, each normalised as it comes.
func parseJSON(source string, r io.Reader) ([]*ev.MDMDevice, error) {
	dec := json.NewDecoder(r)
	tok, err := dec.Token()
	if errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("parse JSON inventory: %w: the file is empty", ErrInvalidInventory)
	}
	if err != nil {
		// Not JSON at all: an HTML error page, a half-written file.
		return nil, fmt.Errorf("parse JSON inventory: %w: expected an array or an object with \"value\": %w", ErrInvalidInventory, err)
	}
	var devices []*ev.MDMDevice
	switch tok {
	case json.Delim('['):
		if devices, err = parseJSONArray(source, dec); err != nil {
			return nil, err
		}
	case json.Delim('{'):
		if devices, err = parseJSONEnvelope(source, dec); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("parse JSON inventory: %w: expected an array or an object with \"value\"", ErrInvalidInventory)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("parse JSON inventory: %w: data after the inventory", ErrInvalidInventory)
	}
	return devices, nil
}

// parseJSONEnvelope decodes Graph's {"value": [...]} envelope, whose
// opening brace dec has read, and its closing one. Other keys (OData
// annotations such as @odata.context or a next link) are skipped wherever
// they stand; "value": null is no array.
func parseJSONEnvelope(source string, dec *json.Decoder) ([]*ev.MDMDevice, error) {
	bad := func(err error) error {
		return fmt.Errorf("parse JSON inventory: %w: %w", ErrInvalidInventory, err)
	}
	var devices []*ev.MDMDevice // nil until a "value" array (even an empty one) is read
	for dec.More() {
		key, err := dec.Token()
		if err != nil {
			return nil, bad(err)
		}
		if key != "value" {
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return nil, bad(err)
			}
			continue
		}
		tok, err := dec.Token()
		switch {
		case err != nil:
			return nil, bad(err)
		case tok == nil:
			continue
		case tok != json.Delim('['):
			return nil, fmt.Errorf("parse JSON inventory: %w: \"value\" is not an array", ErrInvalidInventory)
		case devices != nil:
			return nil, fmt.Errorf("parse JSON inventory: %w: two \"value\" arrays", ErrInvalidInventory)
		}
		if devices, err = parseJSONArray(source, dec); err != nil {
			return nil, err
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, bad(err)
	}
	if devices == nil {
		return nil, fmt.Errorf("parse JSON inventory: %w: object without a \"value\" array", ErrInvalidInventory)
	}
	return devices, nil
}

// parseJSONArray decodes the elements of an array whose opening bracket
// dec has read, and its closing one; an empty array gives an empty slice,
// never nil.
func parseJSONArray(source string, dec *json.Decoder) ([]*ev.MDMDevice, error) {
	devices := []*ev.MDMDevice{}
	for i := 0; dec.More(); i++ {
		var m ManagedDevice
		if err := dec.Decode(&m); err != nil {
			return nil, fmt.Errorf("parse JSON inventory: %w: device %d: %w", ErrInvalidInventory, i, err)
		}
		d, err := Normalize(source, m)
		if err != nil {
			return nil, fmt.Errorf("parse JSON inventory: device %d: %w", i, err)
		}
		devices = append(devices, d)
	}
	if _, err := dec.Token(); err != nil { // the closing bracket
		return nil, fmt.Errorf("parse JSON inventory: %w: %w", ErrInvalidInventory, err)
	}
	return devices, nil
}

// csvColumns maps a lower-cased Graph field name to the index of the
// ManagedDevice field it fills, derived from the struct so the two cannot
// drift apart.
var csvColumns = func() map[string]int {
	cols := map[string]int{}
	t := reflect.TypeFor[ManagedDevice]()
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		cols[strings.ToLower(name)] = i
	}
	return cols
}()

// parseCSV reads a header row of Graph field names (case-insensitive;
// unknown columns ignored; id required) and one device per row. Every row
// must have as many cells as the header, which also catches most truncated
// files.
func parseCSV(source string, in io.Reader) ([]*ev.MDMDevice, error) {
	r := csv.NewReader(in)
	r.ReuseRecord = true
	header, err := r.Read()
	if errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("parse CSV inventory: %w: no header row", ErrInvalidInventory)
	}
	if err != nil {
		return nil, fmt.Errorf("parse CSV inventory: header: %w: %w", ErrInvalidInventory, err)
	}
	fieldOf := make([]int, len(header)) // column -> ManagedDevice field, -1 to ignore
	seen := map[int]string{}
	for c, name := range header {
		key := strings.ToLower(strings.TrimSpace(name))
		f, ok := csvColumns[key]
		if !ok {
			fieldOf[c] = -1
			continue
		}
		if prev, dup := seen[f]; dup {
			return nil, fmt.Errorf("parse CSV inventory: header: %w: columns %q and %q both name %s", ErrInvalidInventory, prev, name, key)
		}
		seen[f] = name
		fieldOf[c] = f
	}
	if _, ok := seen[csvColumns["id"]]; !ok {
		return nil, fmt.Errorf("parse CSV inventory: header: %w: required column id is missing", ErrInvalidInventory)
	}

	var devices []*ev.MDMDevice
	for {
		row, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("parse CSV inventory: %w: %w", ErrInvalidInventory, err)
		}
		line, _ := r.FieldPos(0)
		var m ManagedDevice
		v := reflect.ValueOf(&m).Elem()
		for c, cell := range row {
			if fieldOf[c] < 0 {
				continue
			}
			if err := setField(v.Field(fieldOf[c]), cell); err != nil {
				return nil, fmt.Errorf("parse CSV inventory: line %d: column %s: %w: %w", line, header[c], ErrInvalidRecord, err)
			}
		}
		d, err := Normalize(source, m)
		if err != nil {
			return nil, fmt.Errorf("parse CSV inventory: line %d: %w", line, err)
		}
		devices = append(devices, d)
	}
	return devices, nil
}

// setField fills one ManagedDevice field from a CSV cell: strings as they
// are, booleans as true/false, yes/no or 1/0 (empty is false, or absent for
// *bool).
func setField(f reflect.Value, cell string) error {
	switch f.Kind() {
	case reflect.String:
		f.SetString(cell)
		return nil
	case reflect.Bool:
		b, err := parseBool(cell)
		if err != nil {
			return err
		}
		f.SetBool(b)
		return nil
	case reflect.Pointer:
		if strings.TrimSpace(cell) == "" {
			return nil
		}
		b, err := parseBool(cell)
		if err != nil {
			return err
		}
		f.Set(reflect.ValueOf(&b))
		return nil
	default:
		return fmt.Errorf("unsupported field kind %s", f.Kind())
	}
}

func parseBool(s string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "false", "no", "0":
		return false, nil
	case "true", "yes", "1":
		return true, nil
	}
	return false, fmt.Errorf("%s is not a boolean", strconv.Quote(s))
}
