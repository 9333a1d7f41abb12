package smtpsim

import (
	"bytes"
	"encoding/base64"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"net/textproto"
	"strings"
	"unicode/utf8"
)

// maxDepth bounds multipart nesting so a hostile mail cannot recurse
// without end; real mails nest two or three levels.
const maxDepth = 8

// decode fills what can be read from the message's bytes. A mail that does
// not parse is still stored (with Raw only), because a test wants to see
// what a broken client sent rather than lose it.
func decode(raw []byte) Message {
	var m Message
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		return m
	}
	m.Headers = map[string][]string(msg.Header)
	dec := mime.WordDecoder{CharsetReader: charsetReader}
	m.Subject = msg.Header.Get("Subject")
	if s, err := dec.DecodeHeader(m.Subject); err == nil {
		m.Subject = s
	}
	m.MessageID = strings.TrimSpace(msg.Header.Get("Message-Id"))
	walk(&m, textproto.MIMEHeader(msg.Header), msg.Body, 0)
	return m
}

// walk finds the first text/plain and text/html bodies, descending into
// multipart containers and skipping attachments.
func walk(m *Message, h textproto.MIMEHeader, body io.Reader, depth int) {
	ct := h.Get("Content-Type")
	if ct == "" {
		ct = "text/plain"
	}
	mediaType, params, err := mime.ParseMediaType(ct)
	if err != nil {
		return
	}
	if strings.HasPrefix(mediaType, "multipart/") {
		if depth >= maxDepth || params["boundary"] == "" {
			return
		}
		mr := multipart.NewReader(body, params["boundary"])
		for {
			p, err := mr.NextRawPart()
			if err != nil {
				return
			}
			walk(m, p.Header, p, depth+1)
		}
	}
	if disp, _, _ := mime.ParseMediaType(h.Get("Content-Disposition")); disp == "attachment" {
		return
	}
	switch {
	case mediaType == "text/plain" && m.Text == "":
		m.Text = bodyText(h, body, params["charset"])
	case mediaType == "text/html" && m.HTML == "":
		m.HTML = bodyText(h, body, params["charset"])
	}
}

// bodyText undoes the transfer encoding and converts the charset to UTF-8.
func bodyText(h textproto.MIMEHeader, body io.Reader, charset string) string {
	switch strings.ToLower(strings.TrimSpace(h.Get("Content-Transfer-Encoding"))) {
	case "quoted-printable":
		body = quotedprintable.NewReader(body)
	case "base64":
		body = base64.NewDecoder(base64.StdEncoding, body) // skips line breaks itself
	}
	b, err := io.ReadAll(body)
	if err != nil && len(b) == 0 {
		return ""
	}
	if r, err := charsetReader(charset, bytes.NewReader(b)); err == nil {
		if conv, err := io.ReadAll(r); err == nil {
			b = conv
		}
	}
	return strings.ReplaceAll(validUTF8(string(b)), "\r\n", "\n")
}

// charsetReader converts the charsets a mail sender plausibly uses with the
// standard library alone: UTF-8 and US-ASCII as they are, Latin-1 by
// mapping bytes to code points. Others are passed through unchanged.
func charsetReader(charset string, input io.Reader) (io.Reader, error) {
	switch strings.ToLower(strings.TrimSpace(charset)) {
	case "iso-8859-1", "latin1", "iso_8859-1", "windows-1252":
		b, err := io.ReadAll(input)
		if err != nil {
			return nil, err
		}
		var sb strings.Builder
		for _, c := range b {
			sb.WriteRune(rune(c))
		}
		return strings.NewReader(sb.String()), nil
	}
	return input, nil
}

// validUTF8 replaces invalid bytes so JSON and HTML output stay well formed.
func validUTF8(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}
