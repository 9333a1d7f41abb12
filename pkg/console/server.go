// Package console is easguard's operator console and API: a server-rendered
// web console (Go templates, embedded assets, no JavaScript needed to read
// it) and the same data and actions as JSON under /api/v1, behind sign-in
// with OpenID Connect, a break-glass users file, or API tokens.
//
// The console is a reader of what the workers keep in JetStream (the
// status bucket, the decision records, the event streams) and a publisher
// of commands (sync requests, device commands, guard approvals); it never
// talks to Exchange or the MDM itself, so any process can serve it and
// several replicas serve the same thing.
package console

import (
	"context"
	"crypto/tls"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/health"
)

//go:embed templates/*.html static/*
var assets embed.FS

// sessionCookie names the console's session cookie.
const sessionCookie = "easguard_session"

// maxForm bounds a request body: forms and JSON actions are small; a
// candidate policy is the largest.
const maxForm = 256 << 10

// Server serves the console and the API for one or more organisations.
type Server struct {
	cfg      Config
	log      *slog.Logger
	js       jetstream.JetStream
	pub      *bus.Publisher
	orgs     []bus.Org
	auth     *authenticator
	sessions *sessionStore
	index    map[bus.Org]*deviceIndex
	status   jetstream.KeyValue
	tmpl     *template.Template
	public   string
	secure   bool
	now      func() time.Time
	mux      *http.ServeMux
}

// New builds the console. bound is the address the listener got (for the
// default public URL); the session bucket is provisioned by bus.Provision.
func New(ctx context.Context, cfg Config, defaultOrg string, bound string, js jetstream.JetStream, pub *bus.Publisher, log *slog.Logger) (*Server, error) {
	s := &Server{cfg: cfg, log: log, js: js, pub: pub, index: map[bus.Org]*deviceIndex{}, now: time.Now,
		secure: cfg.TLSCertFile != "" || cfg.BehindProxy}
	s.public = cfg.publicURL(bound)
	for _, o := range cfg.orgNames(defaultOrg) {
		org, err := bus.ParseOrg(o)
		if err != nil {
			return nil, fmt.Errorf("console: %w", err)
		}
		s.orgs = append(s.orgs, org)
		s.index[org] = newDeviceIndex(org)
	}
	var err error
	if s.auth, err = newAuthenticator(cfg, s.public+"/auth/callback"); err != nil {
		return nil, err
	}
	kv, err := js.KeyValue(ctx, bus.BucketConsoleSessions)
	if err != nil {
		return nil, fmt.Errorf("console: session bucket: %w", err)
	}
	s.sessions = &sessionStore{kv: kv, ttl: cfg.SessionTTL, now: time.Now}
	if s.status, err = js.KeyValue(ctx, bus.BucketStatus); err != nil {
		return nil, fmt.Errorf("console: status bucket: %w", err)
	}
	if s.tmpl, err = template.New("").Funcs(funcs).ParseFS(assets, "templates/*.html"); err != nil {
		return nil, fmt.Errorf("console: templates: %w", err)
	}
	s.routes()
	return s, nil
}

// Run keeps the device indexes current until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	decisions, err := s.js.KeyValue(ctx, bus.BucketDecisions)
	if err != nil {
		return fmt.Errorf("console: %w", err)
	}
	collector, err := s.js.KeyValue(ctx, bus.BucketCollector)
	if err != nil {
		return fmt.Errorf("console: %w", err)
	}
	errs := make(chan error, len(s.index))
	for _, x := range s.index {
		go func() { errs <- x.watch(ctx, decisions, collector) }()
	}
	for range s.index {
		if err := <-errs; err != nil && ctx.Err() == nil {
			return err
		}
	}
	return nil
}

// Handler is the console's HTTP handler, every route behind sign-in but
// the sign-in pages themselves.
func (s *Server) Handler() http.Handler {
	// Browsers say where a request comes from; a form posted from another
	// site is refused before any handler sees it.
	cop := http.NewCrossOriginProtection()
	if err := cop.AddTrustedOrigin(s.public); err != nil {
		s.log.Warn("console: public URL not usable as an origin", "url", s.public, "error", err)
	}
	return securityHeaders(cop.Handler(s.mux))
}

// Serve listens on the console's address (TLS when configured) until ctx
// ends. The listener is opened by Listen.
func Listen(cfg Config) (net.Listener, error) {
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("console: listen %s: %w", cfg.Addr, err)
	}
	if cfg.TLSCertFile == "" {
		return ln, nil
	}
	cert, err := tls.LoadX509KeyPair(cfg.TLSCertFile, cfg.TLSKeyFile)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("console: TLS certificate: %w", err)
	}
	return tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}), nil
}

// Serve serves the console on ln until ctx ends, with the same time and
// size limits as every other listener of easguard.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := health.NewHTTPServer(s.Handler(), maxForm)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("console: %w", err)
	}
	return nil
}

func securityHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Content-Security-Policy", "default-src 'self'; script-src 'none'; frame-ancestors 'none'; form-action 'self' https: http:")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("Referrer-Policy", "same-origin")
		hd.Set("X-Frame-Options", "DENY")
		h.ServeHTTP(w, r)
	})
}

// request is one authenticated request: who asks, for which org, and
// whether the answer is JSON (the API) or a page.
type request struct {
	*http.Request
	who  Principal
	sess session
	api  bool
	org  bus.Org
}

// source is where a request came from, for the audit trail.
func (s *Server) source(r *http.Request) string {
	if s.cfg.BehindProxy {
		if f := r.Header.Get("X-Forwarded-For"); f != "" {
			return strings.TrimSpace(strings.Split(f, ",")[0])
		}
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// httpError is an error with the status it answers with.
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func fail(status int, format string, args ...any) error {
	return &httpError{status: status, msg: fmt.Sprintf(format, args...)}
}

// handler is a console or API handler: it returns what to show (a page's
// data, or the API's JSON), or an error.
type handler func(r *request) (any, error)

// page serves a handler both as a page (template tmpl) and under /api/v1.
func (s *Server) page(pattern, tmpl string, need Role, h handler) {
	method, path, _ := strings.Cut(pattern, " ")
	s.mux.Handle(method+" "+path, s.wrap(tmpl, need, false, h))
	s.mux.Handle(method+" /api/v1"+path, s.wrap(tmpl, need, true, h))
}

// action serves a state-changing handler: from a page it redirects back
// (to the page the form named) with the outcome; under /api/v1 it answers
// JSON.
func (s *Server) action(path string, need Role, h handler) {
	s.mux.Handle("POST "+path, s.wrapAction(need, false, h))
	s.mux.Handle("POST /api/v1"+path, s.wrapAction(need, true, h))
}

// auditName names the action of a request for the audit trail, and what
// it was done to: /orgs/o/guard/approve is guard-approve, and
// /orgs/o/devices/X/wipe is device-wipe of X.
func auditName(r *request) (action, target string) {
	parts := strings.Split(strings.TrimPrefix(strings.TrimPrefix(r.URL.Path, "/api/v1"), "/"), "/")
	if len(parts) < 3 {
		return "console", r.URL.Path
	}
	rest := parts[2:]
	switch {
	case len(rest) == 3: // devices/{id}/wipe, deadletters/{seq}/replay
		return strings.TrimSuffix(rest[0], "s") + "-" + rest[2], rest[1]
	case len(rest) == 2: // guard/approve, policy/preview
		return rest[0] + "-" + rest[1], r.form("key")
	}
	return rest[0], r.form("kind")
}

func (s *Server) wrap(tmpl string, need Role, api bool, h handler) http.Handler {
	return s.handle(tmpl, need, api, false, h)
}

// wrapAction is wrap for an operator action, whose refusal for want of a
// role is audited too: who tried matters most when it was refused.
func (s *Server) wrapAction(need Role, api bool, h handler) http.Handler {
	return s.handle("", need, api, true, h)
}

func (s *Server) handle(tmpl string, need Role, api, audited bool, h handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, hr *http.Request) {
		r := &request{Request: hr, api: api}
		var ok bool
		if r.who, r.sess, ok = s.authenticate(w, hr, api); !ok {
			return
		}
		if name := hr.PathValue("org"); name != "" {
			org, err := s.orgOf(name)
			if err != nil {
				s.answerError(w, r, err)
				return
			}
			r.org = org
		}
		if r.who.Role < need {
			err := fail(http.StatusForbidden, "%s (%s) may not do this: it needs the %s role", r.who.Name, r.who.Role, need)
			if audited && r.org != "" {
				action, target := auditName(r)
				if aerr := s.record(hr.Context(), r, action, target, "refused: "+err.Error(), nil); aerr != nil {
					s.log.Warn("console: refusal not audited", "error", aerr)
				}
			}
			s.answerError(w, r, err)
			return
		}
		if hr.Method == http.MethodPost && r.who.Via != "token" {
			// A session's form must carry the session's own token.
			if err := hr.ParseForm(); err != nil {
				s.answerError(w, r, fail(http.StatusBadRequest, "%v", err))
				return
			}
			got := hr.PostForm.Get("csrf")
			if got == "" {
				got = hr.Header.Get("X-CSRF-Token")
			}
			if got == "" || got != r.sess.CSRF {
				s.answerError(w, r, fail(http.StatusForbidden, "the form is stale or came from elsewhere (CSRF token missing or wrong): reload the page"))
				return
			}
		}
		out, err := h(r)
		if err != nil {
			s.answerError(w, r, err)
			return
		}
		if d, ok := out.(download); ok {
			w.Header().Set("Content-Type", d.ContentType)
			w.Header().Set("Content-Disposition", `attachment; filename="`+d.Filename+`"`)
			_, _ = w.Write(d.Body)
			return
		}
		if rd, ok := out.(redirect); ok {
			http.Redirect(w, hr, string(rd), http.StatusSeeOther)
			return
		}
		switch {
		case api:
			writeJSON(w, http.StatusOK, out)
		case hr.Method == http.MethodPost:
			if v, ok := out.(view); ok && v.Template != "" {
				s.render(w, r, v.Template, v.Data)
				return
			}
			back := hr.PostForm.Get("back")
			if back == "" || !strings.HasPrefix(back, "/") || strings.HasPrefix(back, "//") {
				back = "/"
			}
			u, _ := url.Parse(back)
			q := u.Query()
			q.Set("done", fmt.Sprint(outcomeText(out)))
			u.RawQuery = q.Encode()
			http.Redirect(w, hr, u.String(), http.StatusSeeOther)
		default:
			s.render(w, r, tmpl, out)
		}
	})
}

// download is an answer that is a file (an audit export), not a page.
type download struct {
	ContentType string
	Filename    string
	Body        []byte
}

// redirect sends the browser elsewhere.
type redirect string

// view asks an action to show a page instead of redirecting: a
// confirmation, or a result worth reading (a policy preview).
type view struct {
	Template string `json:"-"`
	Data     any    `json:"result"`
}

// MarshalJSON answers the API with the data alone.
func (v view) MarshalJSON() ([]byte, error) { return json.Marshal(v.Data) }

// Outcome is what an action answers: what it did, in words.
type Outcome struct {
	Done   string `json:"done"`
	ID     string `json:"id,omitempty"`
	Detail string `json:"detail,omitempty"`
}

func outcomeText(v any) string {
	if o, ok := v.(Outcome); ok {
		return o.Done
	}
	return "done"
}

func (s *Server) orgOf(name string) (bus.Org, error) {
	for _, o := range s.orgs {
		if string(o) == name {
			return o, nil
		}
	}
	return "", fail(http.StatusNotFound, "this console does not serve organisation %q", name)
}

// authenticate finds who is asking. A page without a session is sent to
// sign in; the API answers 401.
func (s *Server) authenticate(w http.ResponseWriter, r *http.Request, api bool) (Principal, session, bool) {
	if h := r.Header.Get("Authorization"); h != "" {
		tok, ok := strings.CutPrefix(h, "Bearer ")
		if ok {
			if p, ok := s.auth.token(strings.TrimSpace(tok)); ok {
				return p, session{}, true
			}
		}
		w.Header().Set("WWW-Authenticate", `Bearer realm="easguard"`)
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "unknown API token"})
		return Principal{}, session{}, false
	}
	if c, err := r.Cookie(sessionCookie); err == nil {
		sess, ok, err := s.sessions.get(r.Context(), c.Value)
		if err != nil {
			http.Error(w, "sessions unavailable: "+err.Error(), http.StatusServiceUnavailable)
			return Principal{}, session{}, false
		}
		if ok {
			return sess.Principal, sess, true
		}
	}
	if api {
		w.Header().Set("WWW-Authenticate", `Bearer realm="easguard"`)
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "sign in or send an API token"})
		return Principal{}, session{}, false
	}
	next := r.URL.RequestURI()
	if r.Method != http.MethodGet {
		next = "/"
	}
	http.Redirect(w, r, "/login?next="+url.QueryEscape(next), http.StatusSeeOther)
	return Principal{}, session{}, false
}

func (s *Server) answerError(w http.ResponseWriter, r *request, err error) {
	status := http.StatusInternalServerError
	var he *httpError
	if errors.As(err, &he) {
		status = he.status
	}
	if status >= 500 {
		s.log.Error("console", "path", r.URL.Path, "who", r.who.Name, "error", err)
	}
	if r.api {
		writeJSON(w, status, map[string]string{"error": err.Error()})
		return
	}
	w.WriteHeader(status)
	s.render(w, r, "error.html", map[string]any{"Status": status, "Message": err.Error()})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// pageData is what every page template gets.
type pageData struct {
	Who   Principal
	CSRF  string
	Orgs  []bus.Org
	Org   bus.Org
	Done  string
	Path  string
	Data  any
	Trace string
}

func (s *Server) render(w http.ResponseWriter, r *request, name string, data any) {
	pd := pageData{Who: r.who, CSRF: r.sess.CSRF, Orgs: s.orgs, Org: r.org, Done: r.URL.Query().Get("done"), Path: r.URL.RequestURI(), Data: data, Trace: s.cfg.TraceURL}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	if err := s.tmpl.ExecuteTemplate(w, name, pd); err != nil {
		s.log.Error("console: render", "template", name, "error", err)
	}
}

var funcs = template.FuncMap{
	"when": func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return t.UTC().Format("2006-01-02 15:04:05 UTC")
	},
	"ago": func(t time.Time) string {
		if t.IsZero() {
			return ""
		}
		return time.Since(t).Round(time.Second).String() + " ago"
	},
	"dur": func(a, b time.Time) string {
		if a.IsZero() || b.IsZero() {
			return ""
		}
		return b.Sub(a).Round(time.Millisecond).String()
	},
	"traceURL": func(tmpl, id string) string {
		if tmpl == "" || id == "" {
			return ""
		}
		return strings.ReplaceAll(tmpl, "{trace_id}", url.PathEscape(id))
	},
	"pages": func(p DevicePage) []int {
		var out []int
		for i := max(1, p.Page-3); i <= min(p.Pages, p.Page+3); i++ {
			out = append(out, i)
		}
		return out
	},
	"role": func(p Principal, need string) bool {
		r, err := ParseRole(need)
		return err == nil && p.Role >= r
	},
	"pathEscape":  url.PathEscape,
	"states":      func() []string { return []string{"Allowed", "Blocked", "Quarantined", "held", "dry-run", "unmatched"} },
	"queryEscape": url.QueryEscape,
	"itoa":        strconv.Itoa,
}

func (s *Server) routes() {
	s.mux = http.NewServeMux()
	static, _ := fs.Sub(assets, "static")
	s.mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(static)))
	s.mux.HandleFunc("GET /login", s.loginPage)
	s.mux.HandleFunc("GET /login/oidc", s.loginOIDC)
	s.mux.HandleFunc("GET /auth/callback", s.callback)
	s.mux.HandleFunc("POST /login/local", s.loginLocal)
	s.mux.Handle("POST /logout", s.wrap("", RoleNone, false, s.logout))
	s.mux.Handle("GET /{$}", s.wrap("", RoleViewer, false, func(r *request) (any, error) { return redirect("/orgs/" + string(s.orgs[0])), nil }))
	s.mux.Handle("GET /api/v1/whoami", s.wrap("", RoleViewer, true, func(r *request) (any, error) { return r.who, nil }))
	s.mux.Handle("GET /api/v1/orgs", s.wrap("", RoleViewer, true, func(r *request) (any, error) { return s.orgs, nil }))

	s.page("GET /orgs/{org}", "overview.html", RoleViewer, s.overview)
	s.page("GET /orgs/{org}/devices", "devices.html", RoleViewer, s.devices)
	s.page("GET /orgs/{org}/devices/{id}", "device.html", RoleViewer, s.device)
	s.page("GET /orgs/{org}/deadletters", "deadletters.html", RoleViewer, s.deadLetters)
	s.page("GET /orgs/{org}/policy", "policy.html", RoleViewer, s.policyPage)
	s.mux.Handle("GET /orgs/{org}/audit", s.wrap("", RoleViewer, false, s.audit))
	s.mux.Handle("GET /api/v1/orgs/{org}/audit", s.wrap("", RoleViewer, true, s.audit))
	s.mux.Handle("GET /api/v1/orgs/{org}/status", s.wrap("", RoleViewer, true, s.records))

	s.action("/orgs/{org}/sync", RoleOperator, s.sync)
	s.action("/orgs/{org}/guard/approve", RoleOperator, s.approve)
	s.action("/orgs/{org}/guard/discard", RoleOperator, s.discard)
	s.action("/orgs/{org}/deadletters/{seq}/replay", RoleOperator, s.replay)
	s.action("/orgs/{org}/deadletters/{seq}/discard", RoleOperator, s.dropDeadLetter)
	s.action("/orgs/{org}/policy/preview", RoleOperator, s.preview)
	s.deviceActions()
}

// URL is where users reach the console.
func (s *Server) URL() string { return s.public }

// records serves the status bucket's records of an organisation as they
// are stored, by key: the contract of pkg/status, for scripts and tests
// that read one record.
func (s *Server) records(r *request) (any, error) {
	l, err := s.status.ListKeysFiltered(r.Context(), string(r.org)+".>")
	if err != nil {
		return nil, fmt.Errorf("status of %s: %w", r.org, err)
	}
	out := map[string]json.RawMessage{}
	for k := range l.Keys() {
		e, err := s.status.Get(r.Context(), k)
		if err != nil {
			continue // deleted meanwhile
		}
		v := json.RawMessage(e.Value())
		if !json.Valid(v) {
			// A record that is not JSON (an alert's time stamp) as a string.
			v, _ = json.Marshal(string(e.Value()))
		}
		out[strings.TrimPrefix(k, string(r.org)+".")] = v
	}
	return map[string]any{"org": r.org, "status": out}, nil
}
