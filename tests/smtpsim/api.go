package smtpsim

import (
	"encoding/json"
	"html/template"
	"net/http"
	"strconv"
	"time"
)

// APIMessage is how GET /api/messages shows a Message: everything but the
// raw bytes, which GET /api/messages/{id}/raw returns as received.
type APIMessage struct {
	ID        int                 `json:"id"`
	From      string              `json:"from"`
	To        []string            `json:"to"`
	Subject   string              `json:"subject"`
	MessageID string              `json:"message_id"`
	Headers   map[string][]string `json:"headers"`
	Text      string              `json:"text"`
	HTML      string              `json:"html"`
	Received  time.Time           `json:"received"`
	TLS       bool                `json:"tls"`
	AuthUser  string              `json:"auth_user,omitempty"`
	Size      int                 `json:"size"`
}

func apiMessage(m Message) APIMessage {
	return APIMessage{
		ID: m.ID, From: m.From, To: m.To, Subject: validUTF8(m.Subject), MessageID: m.MessageID,
		Headers: m.Headers, Text: m.Text, HTML: m.HTML, Received: m.Received, TLS: m.TLS,
		AuthUser: m.AuthUser, Size: len(m.Raw),
	}
}

func (s *Server) apiHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/messages", func(w http.ResponseWriter, _ *http.Request) {
		msgs := s.Messages()
		out := make([]APIMessage, 0, len(msgs))
		for _, m := range msgs {
			out = append(out, apiMessage(m))
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(out)
	})
	mux.HandleFunc("DELETE /api/messages", func(w http.ResponseWriter, _ *http.Request) {
		s.Reset()
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /api/messages/{n}/raw", s.withMessage(func(w http.ResponseWriter, m Message) {
		w.Header().Set("Content-Type", "message/rfc822")
		_, _ = w.Write(m.Raw)
	}))
	mux.HandleFunc("GET /messages/{n}/text", s.withMessage(func(w http.ResponseWriter, m Message) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte(m.Text))
	}))
	mux.HandleFunc("GET /messages/{n}/html", s.withMessage(func(w http.ResponseWriter, m Message) {
		// The HTML part came from a mail client; a sandbox keeps its
		// scripts and remote content away from the API's origin.
		w.Header().Set("Content-Security-Policy", "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:")
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = w.Write([]byte(m.HTML))
	}))
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
		msgs := s.Messages()
		rows := make([]APIMessage, 0, len(msgs))
		for i := len(msgs) - 1; i >= 0; i-- { // newest first for a person
			rows = append(rows, apiMessage(msgs[i]))
		}
		_ = indexPage.Execute(w, struct {
			Addr     string
			Messages []APIMessage
		}{s.Addr(), rows})
	})
	return mux
}

// withMessage resolves {n} to a stored message or answers 400/404.
func (s *Server) withMessage(h func(http.ResponseWriter, Message)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.Atoi(r.PathValue("n"))
		if err != nil {
			http.Error(w, "message id must be a number", http.StatusBadRequest)
			return
		}
		m, ok := s.message(id)
		if !ok {
			http.Error(w, "no such message", http.StatusNotFound)
			return
		}
		h(w, m)
	}
}

var indexPage = template.Must(template.New("index").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>smtpsim: {{len .Messages}} mail(s)</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.4em .6em;border-bottom:1px solid #ddd;vertical-align:top}
th{background:#f4f4f4}
.muted{color:#777}
</style></head><body>
<h1>smtpsim</h1>
<p class="muted">SMTP on {{.Addr}} &middot; {{len .Messages}} mail(s), newest first &middot; reload to refresh &middot; <a href="/api/messages">JSON</a></p>
{{if .Messages}}<table>
<tr><th>#</th><th>Received</th><th>To</th><th>From</th><th>Subject</th><th>View</th></tr>
{{range .Messages}}<tr>
<td>{{.ID}}</td>
<td>{{.Received.Format "2006-01-02 15:04:05"}}</td>
<td>{{range $i, $t := .To}}{{if $i}}, {{end}}{{$t}}{{end}}</td>
<td>{{.From}}</td>
<td>{{.Subject}}{{if .TLS}} <span class="muted">(TLS)</span>{{end}}</td>
<td>{{if .HTML}}<a href="/messages/{{.ID}}/html">html</a> {{end}}{{if .Text}}<a href="/messages/{{.ID}}/text">text</a> {{end}}<a href="/api/messages/{{.ID}}/raw">raw</a></td>
</tr>
{{end}}</table>{{else}}<p>No mail yet.</p>{{end}}
</body></html>
`))
