package intunesim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Errors of the device operations.
var (
	ErrNotFound = errors.New("intunesim: no such device")
	ErrExists   = errors.New("intunesim: a device with this id exists")
)

var guidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// Devices returns a copy of every device, sorted by id (the listing order).
func (s *Sim) Devices() []Device {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]Device, len(s.sorted))
	for i, d := range s.sorted {
		out[i] = d.clone()
	}
	return out
}

// DeviceCount is the number of devices.
func (s *Sim) DeviceCount() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.sorted)
}

// Device returns one device by id.
func (s *Sim) Device(id string) (Device, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	d := s.byID[strings.ToLower(id)]
	if d == nil {
		return Device{}, false
	}
	return d.clone(), true
}

// DevicesByEASID returns the devices whose easDeviceId is easID (compared
// case-insensitively, as Exchange compares device ids).
func (s *Sim) DevicesByEASID(easID string) []Device {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []Device
	for _, d := range s.byEAS[strings.ToLower(easID)] {
		out = append(out, d.clone())
	}
	return out
}

// Enrol adds a device as Intune would record a fresh enrolment. Unset
// fields get defaults: a random id, complianceState compliant (the
// convenient case for a test; a real enrolment may start unknown),
// managementState managed, easActivated when easDeviceId is set,
// enrolledDateTime and easActivationDateTime now, emailAddress the UPN,
// an Entra device id, owner personal, managementAgent easMdm or mdm.
// lastSyncDateTime is now.
func (s *Sim) Enrol(d Device) (Device, error) {
	now := s.now()
	d.ID = strings.ToLower(d.ID)
	if d.ID == "" {
		d.ID = newGUID()
	}
	def := func(v *string, x string) {
		if *v == "" {
			*v = x
		}
	}
	def(&d.ComplianceState, "compliant")
	def(&d.ManagementState, "managed")
	if d.EASDeviceID != "" {
		d.EASActivated = true
	}
	if d.EnrolledDateTime.IsZero() {
		d.EnrolledDateTime = now
	}
	if d.EASActivated && d.EASActivationDateTime.IsZero() {
		d.EASActivationDateTime = now
	}
	if d.AzureADDeviceID == "" {
		d.AzureADDeviceID, d.AzureADRegistered = newGUID(), true
	}
	local, _, _ := strings.Cut(d.UserPrincipalName, "@")
	if d.UserPrincipalName != "" {
		def(&d.UserID, userID(s.userSeed, d.UserPrincipalName))
		def(&d.EmailAddress, d.UserPrincipalName)
		def(&d.UserDisplayName, local)
	}
	def(&d.OperatingSystem, "Unknown")
	def(&d.DeviceName, strings.TrimSpace(local+" "+d.OperatingSystem))
	def(&d.ManagedDeviceName, local+"_"+d.OperatingSystem+"_"+d.EnrolledDateTime.UTC().Format("1/2/2006_3:04 PM"))
	def(&d.ManagedDeviceOwnerType, "personal")
	if d.EASActivated {
		def(&d.ManagementAgent, "easMdm")
	} else {
		def(&d.ManagementAgent, "mdm")
	}
	def(&d.JailBroken, "False")
	def(&d.DeviceEnrollmentType, "userEnrollment")
	def(&d.DeviceRegistrationState, "registered")
	def(&d.ExchangeAccessState, "none")
	def(&d.ExchangeAccessStateReason, "none")
	def(&d.PartnerReportedThreatState, "unknown")
	if d.ComplianceGracePeriodExpirationDateTime.IsZero() {
		d.ComplianceGracePeriodExpirationDateTime = noGracePeriod
	}
	if d.DeviceActionResults == nil {
		d.DeviceActionResults = []DeviceActionResult{}
	}
	d.LastSyncDateTime = now
	if err := validate(&d); err != nil {
		return Device{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byID[d.ID] != nil {
		return Device{}, fmt.Errorf("%w: %s", ErrExists, d.ID)
	}
	nd := d.clone()
	s.insertLocked(&nd)
	return nd.clone(), nil
}

func validate(d *Device) error {
	if !guidRE.MatchString(d.ID) {
		return fmt.Errorf("intunesim: id %q is not a GUID", d.ID)
	}
	if !oneOf(d.ComplianceState, ComplianceStates) {
		return fmt.Errorf("intunesim: complianceState %q is not one of %s", d.ComplianceState, strings.Join(ComplianceStates, ", "))
	}
	if !oneOf(d.ManagementState, ManagementStates) {
		return fmt.Errorf("intunesim: managementState %q is not one of %s", d.ManagementState, strings.Join(ManagementStates, ", "))
	}
	return nil
}

// Update changes a device with change (which gets a copy) and stamps
// lastSyncDateTime, as every change in Intune follows a device check-in.
// The id cannot change.
func (s *Sim) Update(id string, change func(d *Device)) (Device, error) {
	return s.apply(id, func(d *Device) error { change(d); return nil })
}

func (s *Sim) apply(id string, change func(d *Device) error) (Device, error) {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.byID[strings.ToLower(id)]
	if old == nil {
		return Device{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	nd := old.clone()
	if err := change(&nd); err != nil {
		return Device{}, err
	}
	if nd.ID != old.ID {
		return Device{}, fmt.Errorf("intunesim: the id of device %s cannot change", old.ID)
	}
	if err := validate(&nd); err != nil {
		return Device{}, err
	}
	nd.LastSyncDateTime = now
	s.removeLocked(old)
	s.insertLocked(&nd)
	return nd.clone(), nil
}

// SetCompliance sets complianceState. inGracePeriod also sets the grace
// period's end to now + 72 h (UNCONFIRMED: a policy's grace period is
// configurable in Intune); any other state resets it to Intune's
// "no grace period" value, 9999-12-31T23:59:59Z.
func (s *Sim) SetCompliance(id, state string) (Device, error) {
	now := s.now()
	return s.apply(id, func(d *Device) error {
		if !oneOf(state, ComplianceStates) {
			return fmt.Errorf("intunesim: complianceState %q is not one of %s", state, strings.Join(ComplianceStates, ", "))
		}
		d.ComplianceState = state
		d.ComplianceGracePeriodExpirationDateTime = noGracePeriod
		if state == "inGracePeriod" {
			d.ComplianceGracePeriodExpirationDateTime = now.Add(72 * time.Hour)
		}
		return nil
	})
}

// Retire issues a retire, as the retire action does: managementState
// retireIssued and a pending "retire" in deviceActionResults. The record
// stays (with its complianceState) until deleted.
func (s *Sim) Retire(id string) (Device, error) {
	now := s.now()
	return s.apply(id, func(d *Device) error {
		d.ManagementState = "retireIssued"
		d.DeviceActionResults = append(d.DeviceActionResults, DeviceActionResult{ActionName: "retire", ActionState: "pending", StartDateTime: now, LastUpdatedDateTime: now})
		return nil
	})
}

// Delete removes a device.
func (s *Sim) Delete(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.byID[strings.ToLower(id)]
	if d == nil {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	s.removeLocked(d)
	return nil
}

func (s *Sim) insertLocked(d *Device) {
	i := sort.Search(len(s.sorted), func(i int) bool { return s.sorted[i].ID >= d.ID })
	s.sorted = slices.Insert(s.sorted, i, d)
	s.byID[d.ID] = d
	if d.EASDeviceID != "" {
		k := strings.ToLower(d.EASDeviceID)
		s.byEAS[k] = append(s.byEAS[k], d)
	}
}

func (s *Sim) removeLocked(d *Device) {
	i := sort.Search(len(s.sorted), func(i int) bool { return s.sorted[i].ID >= d.ID })
	if i < len(s.sorted) && s.sorted[i] == d {
		s.sorted = slices.Delete(s.sorted, i, i+1)
	}
	delete(s.byID, d.ID)
	if d.EASDeviceID != "" {
		k := strings.ToLower(d.EASDeviceID)
		list := slices.DeleteFunc(s.byEAS[k], func(x *Device) bool { return x == d })
		if len(list) == 0 {
			delete(s.byEAS, k)
		} else {
			s.byEAS[k] = list
		}
	}
}

// AdminHandler serves the admin API, for tests, benchmarks and the demo:
//
//	GET    /api/info                           tenant, application, URLs, counts
//	GET    /api/devices[?easDeviceId=&userPrincipalName=]  devices (Graph's shape)
//	POST   /api/devices                        enrol (body: a managedDevice; see Enrol) → 201
//	GET    /api/devices/{id}                   one device
//	PATCH  /api/devices/{id}                   change the given properties (Graph names)
//	POST   /api/devices/{id}/compliance        {"state":"noncompliant"}
//	POST   /api/devices/{id}/retire            managementState retireIssued
//	DELETE /api/devices/{id}                   remove → 204
//	GET    /api/requests[?kind=&limit=]        recorded HTTPS requests, with counts
//	DELETE /api/requests                       forget them
//	GET    /api/faults                         active faults
//	POST   /api/faults                         inject a fault (body: Fault)
//	DELETE /api/faults                         clear the faults
//	POST   /api/tokens/expire                  expire every access token issued
//
// Every change stamps lastSyncDateTime, as Intune does when a device checks in.
func (s *Sim) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/info", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{
			"url": s.url, "authority": s.Authority(), "graph": s.GraphURL(), "token_endpoint": s.TokenURL(), "scope": s.Scope(),
			"tenant": s.cfg.Tenant, "client_id": s.cfg.ClientID, "devices": s.DeviceCount(), "tokens_issued": s.TokensIssued(),
			"page_size": s.cfg.PageSize, "max_page_size": s.cfg.MaxPageSize, "strict_v1": s.cfg.StrictV1,
			"certificate_credential": len(s.clientCerts) > 0,
		})
	})
	mux.HandleFunc("GET /api/devices", func(w http.ResponseWriter, r *http.Request) {
		eas, upn := r.URL.Query().Get("easDeviceId"), r.URL.Query().Get("userPrincipalName")
		var list []Device
		if eas != "" {
			list = s.DevicesByEASID(eas)
		} else {
			list = s.Devices()
		}
		out := make([]Device, 0, len(list))
		for _, d := range list {
			if upn == "" || strings.EqualFold(d.UserPrincipalName, upn) {
				out = append(out, d)
			}
		}
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("POST /api/devices", func(w http.ResponseWriter, r *http.Request) {
		var d Device
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
		dec.DisallowUnknownFields() // a misspelt property would otherwise vanish
		if err := dec.Decode(&d); err != nil {
			writeAdminError(w, http.StatusBadRequest, err)
			return
		}
		nd, err := s.Enrol(d)
		if err != nil {
			writeAdminError(w, adminStatus(err), err)
			return
		}
		writeJSON(w, http.StatusCreated, nd)
	})
	mux.HandleFunc("GET /api/devices/{id}", func(w http.ResponseWriter, r *http.Request) {
		d, ok := s.Device(r.PathValue("id"))
		if !ok {
			writeAdminError(w, http.StatusNotFound, fmt.Errorf("%w: %s", ErrNotFound, r.PathValue("id")))
			return
		}
		writeJSON(w, http.StatusOK, d)
	})
	mux.HandleFunc("PATCH /api/devices/{id}", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
		if err != nil {
			writeAdminError(w, http.StatusBadRequest, err)
			return
		}
		d, err := s.apply(r.PathValue("id"), func(d *Device) error {
			dec := json.NewDecoder(bytes.NewReader(body))
			dec.DisallowUnknownFields()
			return dec.Decode(d)
		})
		if err != nil {
			writeAdminError(w, adminStatus(err), err)
			return
		}
		writeJSON(w, http.StatusOK, d)
	})
	mux.HandleFunc("POST /api/devices/{id}/compliance", func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			State string `json:"state"`
		}
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&body); err != nil {
			writeAdminError(w, http.StatusBadRequest, err)
			return
		}
		d, err := s.SetCompliance(r.PathValue("id"), body.State)
		if err != nil {
			writeAdminError(w, adminStatus(err), err)
			return
		}
		writeJSON(w, http.StatusOK, d)
	})
	mux.HandleFunc("POST /api/devices/{id}/retire", func(w http.ResponseWriter, r *http.Request) {
		d, err := s.Retire(r.PathValue("id"))
		if err != nil {
			writeAdminError(w, adminStatus(err), err)
			return
		}
		writeJSON(w, http.StatusOK, d)
	})
	mux.HandleFunc("DELETE /api/devices/{id}", func(w http.ResponseWriter, r *http.Request) {
		if err := s.Delete(r.PathValue("id")); err != nil {
			writeAdminError(w, adminStatus(err), err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /api/requests", func(w http.ResponseWriter, r *http.Request) {
		recs := s.Recorder.Records(r.URL.Query().Get("kind"))
		if l, err := strconv.Atoi(r.URL.Query().Get("limit")); err == nil && l >= 0 && l < len(recs) {
			recs = recs[len(recs)-l:]
		}
		writeJSON(w, http.StatusOK, map[string]any{"counts": s.Recorder.Counts(), "tokens_issued": s.TokensIssued(), "records": recs})
	})
	mux.HandleFunc("DELETE /api/requests", func(w http.ResponseWriter, r *http.Request) {
		s.Recorder.Reset()
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /api/faults", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Faults())
	})
	mux.HandleFunc("POST /api/faults", func(w http.ResponseWriter, r *http.Request) {
		var f Fault
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&f); err != nil {
			writeAdminError(w, http.StatusBadRequest, err)
			return
		}
		if err := s.Inject(f); err != nil {
			writeAdminError(w, http.StatusBadRequest, err)
			return
		}
		writeJSON(w, http.StatusOK, s.Faults())
	})
	mux.HandleFunc("DELETE /api/faults", func(w http.ResponseWriter, r *http.Request) {
		s.ClearFaults()
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /api/tokens/expire", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]int{"expired": s.ExpireTokens()})
	})
	return mux
}

func adminStatus(err error) int {
	switch {
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, ErrExists):
		return http.StatusConflict
	}
	return http.StatusBadRequest
}

func writeAdminError(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, map[string]string{"error": err.Error()})
}
