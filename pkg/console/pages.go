package console

import (
	"net/http"
	"strconv"
)

func (s *Server) devices(r *request) (any, error) {
	q := r.URL.Query()
	page, _ := strconv.Atoi(q.Get("page"))
	size, _ := strconv.Atoi(q.Get("size"))
	return DevicesView{Query: q.Get("q"), State: q.Get("state"),
		DevicePage: s.index[r.org].query(DeviceQuery{Search: q.Get("q"), State: q.Get("state"), Page: page, Size: size})}, nil
}

// DevicesView is the devices page: a page of partnerships and the query.
type DevicesView struct {
	DevicePage
	Query string `json:"query,omitempty"`
	State string `json:"state,omitempty"`
}

// DeviceView is one device: its partnerships and its journey.
type DeviceView struct {
	DeviceID     string   `json:"device_id"`
	Partnerships []Device `json:"partnerships"`
	History      []Step   `json:"history"`
}

func (s *Server) device(r *request) (any, error) {
	id := r.PathValue("id")
	parts := s.index[r.org].byDevice(id)
	steps, err := history(r.Context(), s.js, r.org, id)
	if err != nil {
		return nil, err
	}
	if len(parts) == 0 && len(steps) == 0 {
		return nil, fail(http.StatusNotFound, "%s knows no device %q", r.org, id)
	}
	if parts == nil {
		parts = []Device{}
	}
	return DeviceView{DeviceID: id, Partnerships: parts, History: steps}, nil
}
