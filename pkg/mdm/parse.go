package mdm

import (
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

// parseInventory reads a whole inventory in format (json or csv) and
// normalises every record. Any bad record fails the whole read: a partial
// inventory would look like devices disappearing.
func parseInventory(source, format string, data []byte) (*inventory, error) {
	var (
		devices []*ev.MDMDevice
		err     error
	)
	switch format {
	case FormatJSON:
		devices, err = parseJSON(source, data)
	case FormatCSV:
		devices, err = parseCSV(source, data)
	default:
		return nil, fmt.Errorf("parse inventory: %w: unknown format %q", ErrConfig, format)
	}
	if err != nil {
		return nil, err
	}
	return newInventory(devices)
}

// parseJSON accepts an array of managedDevice objects or Graph's
// {"value": [...]} envelope, and nothing after it.
func parseJSON(source string, data []byte) ([]*ev.MDMDevice, error) {
	data = bytes.TrimPrefix(data, utf8BOM)
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) == 0 {
		return nil, fmt.Errorf("parse JSON inventory: %w: the file is empty", ErrInvalidInventory)
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	var records []ManagedDevice
	switch trimmed[0] {
	case '[':
		if err := dec.Decode(&records); err != nil {
			return nil, fmt.Errorf("parse JSON inventory: %w: %w", ErrInvalidInventory, err)
		}
	case '{':
		var env struct {
			Value *[]ManagedDevice `json:"value"`
		}
		if err := dec.Decode(&env); err != nil {
			return nil, fmt.Errorf("parse JSON inventory: %w: %w", ErrInvalidInventory, err)
		}
		if env.Value == nil {
			return nil, fmt.Errorf("parse JSON inventory: %w: object without a \"value\" array", ErrInvalidInventory)
		}
		records = *env.Value
	default:
		return nil, fmt.Errorf("parse JSON inventory: %w: expected an array or an object with \"value\"", ErrInvalidInventory)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("parse JSON inventory: %w: data after the inventory", ErrInvalidInventory)
	}
	devices := make([]*ev.MDMDevice, 0, len(records))
	for i, m := range records {
		d, err := Normalize(source, m)
		if err != nil {
			return nil, fmt.Errorf("parse JSON inventory: device %d: %w", i, err)
		}
		devices = append(devices, d)
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
func parseCSV(source string, data []byte) ([]*ev.MDMDevice, error) {
	r := csv.NewReader(bytes.NewReader(bytes.TrimPrefix(data, utf8BOM)))
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
