package intunesim

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Handler serves the HTTPS side: the identity endpoints and Graph. Every
// request is recorded.
//
//	GET  /{tenant}/v2.0/.well-known/openid-configuration
//	GET  /{tenant}/discovery/v2.0/keys
//	POST /{tenant}/oauth2/v2.0/token
//	GET  /{v1.0|beta}/deviceManagement/managedDevices[?$select=&$top=&$filter=&$count=&$skiptoken=]
//	GET  /{v1.0|beta}/deviceManagement/managedDevices/{id}[?$select=]
//
// Graph's path segments are matched case-insensitively, as Graph does.
func (s *Sim) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := Record{Time: start, Method: r.Method, Path: r.URL.RequestURI(), Kind: "other"}
		sw := &statusWriter{ResponseWriter: w}
		s.route(sw, r, &rec)
		rec.Status = sw.status
		if rec.Status == 0 {
			rec.Status = http.StatusOK
		}
		rec.RetryAfter = sw.Header().Get("Retry-After")
		rec.Duration = time.Since(start)
		s.Recorder.Add(rec)
	})
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (s *Sim) route(w http.ResponseWriter, r *http.Request, rec *Record) {
	segs := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	if len(segs) == 4 {
		tail := strings.ToLower(strings.Join(segs[1:], "/"))
		switch tail {
		case "v2.0/.well-known/openid-configuration":
			rec.Kind = "discovery"
			s.discovery(w, r, rec, segs[0])
			return
		case "discovery/v2.0/keys":
			rec.Kind = "keys"
			s.keys(w, r, rec, segs[0])
			return
		case "oauth2/v2.0/token":
			rec.Kind = "token"
			s.tokenEndpoint(w, r, rec, segs[0])
			return
		}
	}
	if v := strings.ToLower(segs[0]); v == "v1.0" || v == "beta" {
		rec.Kind = "graph"
		s.graph(w, r, rec, v, segs[1:])
		return
	}
	http.NotFound(w, r)
}

// baseURL is https:// and the host the client addressed.
func (s *Sim) baseURL(r *http.Request) string {
	if r.Host == "" {
		return s.url
	}
	return "https://" + r.Host
}

// graphError writes Graph's error body.
func (s *Sim) graphError(w http.ResponseWriter, r *http.Request, rec *Record, status int, code, message string) {
	reqID := newGUID()
	clientReq := r.Header.Get("client-request-id")
	if clientReq == "" {
		clientReq = reqID
	}
	rec.Error = code
	w.Header().Set("request-id", reqID)
	w.Header().Set("client-request-id", clientReq)
	writeJSON(w, status, map[string]any{"error": map[string]any{
		"code": code, "message": message,
		"innerError": map[string]string{"date": s.now().Format("2006-01-02T15:04:05"), "request-id": reqID, "client-request-id": clientReq},
	}})
}

const graphContentType = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"

// listQuery is a parsed managedDevices query.
type listQuery struct {
	sel     []int  // property indexes, in the type's order
	selText string // $select as given, for @odata.context
	top     int
	page    int    // 1 = first page
	after   string // id of the last device served; "" = from the start
	count   bool
}

func (s *Sim) graph(w http.ResponseWriter, r *http.Request, rec *Record, version string, segs []string) {
	t, msg := s.authenticate(r)
	if t == nil {
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="", authorization_uri="%s/common/oauth2/authorize", client_id="%s"`, s.baseURL(r), GraphAppID))
		s.graphError(w, r, rec, http.StatusUnauthorized, "InvalidAuthenticationToken", msg)
		return
	}
	bad := ""
	switch {
	case len(segs) == 0 || segs[0] == "":
		bad = version
	case !strings.EqualFold(segs[0], "deviceManagement"):
		bad = segs[0]
	case len(segs) < 2:
		bad = segs[0] // the simulator serves only managedDevices below deviceManagement
	case !strings.EqualFold(segs[1], "managedDevices"):
		bad = segs[1]
	case len(segs) > 3:
		bad = segs[3]
	case len(segs) == 3 && segs[2] == "":
		bad = "managedDevices"
	}
	if bad != "" {
		s.graphError(w, r, rec, http.StatusBadRequest, "BadRequest", fmt.Sprintf("Resource not found for the segment '%s'.", bad))
		return
	}
	if r.Method != http.MethodGet {
		s.graphError(w, r, rec, http.StatusMethodNotAllowed, "BadRequest", fmt.Sprintf("The simulator serves only GET on managedDevices, not %s.", r.Method))
		return
	}
	if !slices.Contains(t.roles, RoleRead) && !slices.Contains(t.roles, RoleReadWrite) {
		s.graphError(w, r, rec, http.StatusForbidden, "Forbidden",
			"Application is not authorized to perform this operation. Application must have one of the following scopes: "+RoleRead+", "+RoleReadWrite+".")
		return
	}
	q, status, code, emsg := s.parseQuery(r, rec, version, len(segs) == 2)
	if status != 0 {
		s.graphError(w, r, rec, status, code, emsg)
		return
	}
	page := 0
	if len(segs) == 2 {
		page = q.page
		rec.Page = page
	}
	delay, f := s.takeFaults("graph", page)
	if delay > 0 {
		rec.Fault = "slow"
		timer := time.NewTimer(delay)
		select {
		case <-timer.C:
		case <-r.Context().Done():
			timer.Stop()
			return
		}
	}
	malformed := false
	if f != nil {
		rec.Fault = f.Kind
		retry := func() {
			if f.RetryAfter > 0 {
				w.Header().Set("Retry-After", strconv.Itoa(f.RetryAfter))
			}
		}
		switch f.Kind {
		case "throttle":
			retry()
			s.graphError(w, r, rec, http.StatusTooManyRequests, "TooManyRequests", "Too many requests. Please retry after the time given in Retry-After. (injected fault)")
			return
		case "unavailable":
			retry()
			s.graphError(w, r, rec, http.StatusServiceUnavailable, "ServiceUnavailable", "The service is temporarily unavailable. (injected fault)")
			return
		case "error":
			s.graphError(w, r, rec, http.StatusInternalServerError, "InternalServerError", "An internal server error occurred. (injected fault)")
			return
		case "malformed":
			malformed = true
		}
	}
	bp := bufPool.Get().(*[]byte)
	defer func() {
		if cap(*bp) <= 16<<20 {
			bufPool.Put(bp)
		}
	}()
	var body []byte
	if len(segs) == 3 {
		var ok bool
		body, ok = s.appendEntity((*bp)[:0], r, version, q, segs[2])
		if !ok {
			s.graphError(w, r, rec, http.StatusNotFound, "ResourceNotFound", fmt.Sprintf("Resource not found: no managedDevice with id '%s'.", segs[2]))
			return
		}
		rec.Items = 1
	} else {
		body, rec.Items = s.appendPage((*bp)[:0], r, version, q)
	}
	*bp = body
	if malformed {
		body = body[:len(body)/2]
	}
	reqID := newGUID()
	w.Header().Set("Content-Type", graphContentType)
	w.Header().Set("request-id", reqID)
	if c := r.Header.Get("client-request-id"); c != "" {
		w.Header().Set("client-request-id", c)
	} else {
		w.Header().Set("client-request-id", reqID)
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

// parseQuery reads the OData query options. It returns a status for a 400.
func (s *Sim) parseQuery(r *http.Request, rec *Record, version string, list bool) (listQuery, int, string, string) {
	q := listQuery{top: s.cfg.PageSize, page: 1}
	vals, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return q, http.StatusBadRequest, "BadRequest", "The query specified in the URI is not valid: " + err.Error()
	}
	var notes []string
	for key, vs := range vals {
		if !strings.HasPrefix(key, "$") {
			continue // Graph ignores parameters that are not query options
		}
		v := vs[0]
		switch strings.ToLower(key) {
		case "$select":
			q.selText = v
			for _, name := range strings.Split(v, ",") {
				name = strings.TrimSpace(name)
				if name == "" {
					continue
				}
				// UNCONFIRMED: property names are matched case-insensitively.
				i, ok := propertyIndex[strings.ToLower(name)]
				if !ok || (properties[i].beta && version == "v1.0" && s.cfg.StrictV1) {
					return q, http.StatusBadRequest, "BadRequest", fmt.Sprintf("Could not find a property named '%s' on type 'microsoft.graph.managedDevice'.", name)
				}
				if !slices.Contains(q.sel, i) {
					q.sel = append(q.sel, i)
				}
			}
		case "$top":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return q, http.StatusBadRequest, "BadRequest", fmt.Sprintf("Invalid value '%s' for query option '$top': it must be a non-negative integer.", v)
			}
			if list {
				q.top = min(n, s.cfg.MaxPageSize)
			}
		case "$skiptoken":
			page, after, ok := decodeSkipToken(v)
			if !ok {
				return q, http.StatusBadRequest, "BadRequest", "The $skiptoken is not valid."
			}
			q.page, q.after = page, after
		case "$count":
			q.count = strings.EqualFold(v, "true")
		case "$filter":
			notes = append(notes, "$filter ignored: "+v)
		case "$orderby", "$search", "$expand":
			notes = append(notes, key+" ignored: "+v)
		default:
			return q, http.StatusBadRequest, "BadRequest", fmt.Sprintf("Query option '%s' is not allowed.", key)
		}
	}
	slices.Sort(q.sel)
	if len(q.sel) == 0 {
		for i, p := range properties {
			if !(p.beta && version == "v1.0" && s.cfg.StrictV1) {
				q.sel = append(q.sel, i)
			}
		}
	}
	slices.Sort(notes)
	rec.Note = strings.Join(notes, "; ")
	return q, 0, "", ""
}

func encodeSkipToken(page int, after string) string {
	return base64.RawURLEncoding.EncodeToString([]byte("1|" + strconv.Itoa(page) + "|" + after))
}

func decodeSkipToken(tok string) (int, string, bool) {
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil {
		return 0, "", false
	}
	parts := strings.SplitN(string(b), "|", 3)
	if len(parts) != 3 || parts[0] != "1" {
		return 0, "", false
	}
	page, err := strconv.Atoi(parts[1])
	if err != nil || page < 2 || parts[2] == "" {
		return 0, "", false
	}
	return page, parts[2], true
}

func (s *Sim) context(r *http.Request, version string, q listQuery, entity bool) string {
	c := s.baseURL(r) + "/" + version + "/$metadata#deviceManagement/managedDevices"
	if q.selText != "" {
		c += "(" + q.selText + ")"
	}
	if entity {
		c += "/$entity"
	}
	return c
}

// appendPage writes one page of the listing: the devices whose id sorts
// after q.after, at most q.top of them.
func (s *Sim) appendPage(b []byte, r *http.Request, version string, q listQuery) ([]byte, int) {
	b = append(b, `{"@odata.context":`...)
	b = appendJSONString(b, s.context(r, version, q, false))
	s.mu.RLock()
	defer s.mu.RUnlock()
	start := 0
	if q.after != "" {
		start = sort.Search(len(s.sorted), func(i int) bool { return s.sorted[i].ID > q.after })
	}
	end := min(start+q.top, len(s.sorted))
	if q.count {
		b = append(b, `,"@odata.count":`...)
		b = strconv.AppendInt(b, int64(len(s.sorted)), 10)
	}
	if end < len(s.sorted) && end > start {
		b = append(b, `,"@odata.nextLink":`...)
		b = appendJSONString(b, s.nextLink(r, q.page+1, s.sorted[end-1].ID))
	}
	b = append(b, `,"value":[`...)
	for i := start; i < end; i++ {
		if i > start {
			b = append(b, ',')
		}
		b = appendDevice(b, s.sorted[i], q.sel)
	}
	b = append(b, "]}"...)
	return b, end - start
}

// nextLink is the request's URL with its query options and a new $skiptoken.
func (s *Sim) nextLink(r *http.Request, page int, after string) string {
	var kept []string
	for _, piece := range strings.Split(r.URL.RawQuery, "&") {
		if piece == "" {
			continue
		}
		k, _, _ := strings.Cut(piece, "=")
		if key, err := url.QueryUnescape(k); err == nil && strings.EqualFold(key, "$skiptoken") {
			continue
		}
		kept = append(kept, piece)
	}
	kept = append(kept, "$skiptoken="+encodeSkipToken(page, after))
	return s.baseURL(r) + r.URL.EscapedPath() + "?" + strings.Join(kept, "&")
}

// appendEntity writes one device, or reports that there is none.
func (s *Sim) appendEntity(b []byte, r *http.Request, version string, q listQuery, id string) ([]byte, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	d := s.byID[strings.ToLower(id)]
	if d == nil {
		return b, false
	}
	b = append(b, `{"@odata.context":`...)
	b = appendJSONString(b, s.context(r, version, q, true))
	obj := appendDevice(nil, d, q.sel)
	if len(obj) > 2 {
		b = append(b, ',')
		b = append(b, obj[1:]...)
	} else {
		b = append(b, '}')
	}
	return b, true
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
