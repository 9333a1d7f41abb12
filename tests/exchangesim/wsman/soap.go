package wsman

import (
	"bytes"
	"crypto/rand"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Namespace URIs. Requests are matched against these URIs, never against prefixes, because WS-Man clients choose
// their own prefixes (env/s/soap, a/wsa, rsp/shell, or default namespaces).
const (
	NamespaceSOAP       = "http://www.w3.org/2003/05/soap-envelope"
	NamespaceAddressing = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
	NamespaceWSMan      = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
	NamespaceMSWSMan    = "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd"
	NamespaceShell      = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
	NamespaceTransfer   = "http://schemas.xmlsoap.org/ws/2004/09/transfer"
	NamespaceFault      = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault"
	namespaceEventing   = "http://schemas.xmlsoap.org/ws/2004/08/eventing"
	namespaceEnum       = "http://schemas.xmlsoap.org/ws/2004/09/enumeration"
	namespaceXML        = "http://www.w3.org/XML/1998/namespace"
)

// ResourceURICmd is the only resource this server hosts: the WinRS cmd shell. PowerShell remoting (PSRP) uses other
// resource URIs and is deliberately answered with the "resource not found" fault.
const ResourceURICmd = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd"

// Request actions the server implements, as they appear in a:Action.
const (
	ActionCreate  = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create"
	ActionDelete  = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete"
	ActionCommand = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Command"
	ActionSend    = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Send"
	ActionReceive = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Receive"
	ActionSignal  = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Signal"
)

// Signal codes defined by MS-WSMV for rsp:Signal/rsp:Code.
const (
	SignalTerminate = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/terminate"
	SignalCtrlC     = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/ctrl_c"
	SignalCtrlBreak = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/ctrl_break"
)

// Command states reported in rsp:CommandState/@State; masterzen/winrm ends its receive loop on Done.
const (
	CommandStateRunning = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Running"
	CommandStateDone    = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done"
)

const (
	actionCreateResponse  = "http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse"
	actionDeleteResponse  = "http://schemas.xmlsoap.org/ws/2004/09/transfer/DeleteResponse"
	actionCommandResponse = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandResponse"
	actionSendResponse    = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/SendResponse"
	actionReceiveResponse = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/ReceiveResponse"
	actionSignalResponse  = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/SignalResponse"
	anonymousRole         = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous"
)

// envelope is the decoded request. Every element tag names its namespace URI, so encoding/xml matches by URI and
// ignores prefixes.
type envelope struct {
	XMLName xml.Name
	Header  *soapHeader `xml:"http://www.w3.org/2003/05/soap-envelope Header"`
	Body    *soapBody   `xml:"http://www.w3.org/2003/05/soap-envelope Body"`
}

type textElem struct {
	Value string `xml:",chardata"`
}

type soapHeader struct {
	To               *textElem    `xml:"http://schemas.xmlsoap.org/ws/2004/08/addressing To"`
	ReplyTo          *replyTo     `xml:"http://schemas.xmlsoap.org/ws/2004/08/addressing ReplyTo"`
	MessageID        *textElem    `xml:"http://schemas.xmlsoap.org/ws/2004/08/addressing MessageID"`
	Action           *textElem    `xml:"http://schemas.xmlsoap.org/ws/2004/08/addressing Action"`
	FaultTo          *replyTo     `xml:"http://schemas.xmlsoap.org/ws/2004/08/addressing FaultTo"`
	MaxEnvelopeSize  *textElem    `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd MaxEnvelopeSize"`
	OperationTimeout *textElem    `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd OperationTimeout"`
	Locale           *textElem    `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd Locale"`
	DataLocale       *textElem    `xml:"http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd DataLocale"`
	ResourceURI      *textElem    `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd ResourceURI"`
	SelectorSet      *selectorSet `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd SelectorSet"`
	OptionSet        *optionSet   `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd OptionSet"`
	Other            []anyHeader  `xml:",any"`
}

type replyTo struct {
	Address string `xml:"http://schemas.xmlsoap.org/ws/2004/08/addressing Address"`
}

type selectorSet struct {
	Selectors []nameValue `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd Selector"`
}

type optionSet struct {
	Options []nameValue `xml:"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd Option"`
}

type nameValue struct {
	Name  string `xml:"Name,attr"`
	Value string `xml:",chardata"`
}

// anyHeader captures header blocks the server does not know, so that one marked s:mustUnderstand can be refused the
// way SOAP 1.2 requires instead of being silently ignored.
type anyHeader struct {
	XMLName xml.Name
	Attrs   []xml.Attr `xml:",any,attr"`
}

type soapBody struct {
	Shell       *shellBody   `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Shell"`
	CommandLine *commandLine `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell CommandLine"`
	Send        *sendBody    `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Send"`
	Receive     *receiveBody `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Receive"`
	Signal      *signalBody  `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Signal"`
}

type shellBody struct {
	InputStreams  string `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell InputStreams"`
	OutputStreams string `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell OutputStreams"`
}

type commandLine struct {
	Command   *textElem  `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Command"`
	Arguments []textElem `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Arguments"`
}

type sendBody struct {
	Streams []sendStream `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Stream"`
}

type sendStream struct {
	Name      string `xml:"Name,attr"`
	CommandID string `xml:"CommandId,attr"`
	End       string `xml:"End,attr"`
	Data      string `xml:",chardata"`
}

type receiveBody struct {
	DesiredStream *desiredStream `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell DesiredStream"`
}

type desiredStream struct {
	CommandID *string `xml:"CommandId,attr"`
	Streams   string  `xml:",chardata"`
}

type signalBody struct {
	CommandID string    `xml:"CommandId,attr"`
	Code      *textElem `xml:"http://schemas.microsoft.com/wbem/wsman/1/windows/shell Code"`
}

var errNotSOAP12 = errors.New("root element is not a SOAP 1.2 envelope")

// decodeEnvelope parses a request strictly: one root element, no DTD, nothing but comments, processing instructions
// and whitespace around it. Windows rejects such documents as invalid XML, so the simulator must too.
func decodeEnvelope(data []byte) (*envelope, error) {
	d := xml.NewDecoder(bytes.NewReader(data))
	var start xml.StartElement
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, fmt.Errorf("reading prolog: %w", err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			start = t
		case xml.Directive:
			return nil, errors.New("DTDs are not allowed")
		case xml.CharData:
			if len(bytes.TrimSpace(t)) > 0 {
				return nil, errors.New("text before the root element")
			}
			continue
		default:
			continue
		}
		break
	}
	if start.Name.Local != "Envelope" {
		return nil, fmt.Errorf("root element %q is not an Envelope", start.Name.Local)
	}
	var env envelope
	if err := d.DecodeElement(&env, &start); err != nil {
		return nil, fmt.Errorf("decoding envelope: %w", err)
	}
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("reading after the root element: %w", err)
		}
		switch t := tok.(type) {
		case xml.Comment, xml.ProcInst:
		case xml.CharData:
			if len(bytes.TrimSpace(t)) > 0 {
				return nil, errors.New("text after the root element")
			}
		default:
			return nil, errors.New("content after the root element")
		}
	}
	if start.Name.Space != NamespaceSOAP {
		return &env, errNotSOAP12
	}
	return &env, nil
}

// trimmed returns the whitespace-collapsed value of an optional element; URIs, ids and numbers are xs:anyURI or
// xs:token in the schemas, so surrounding whitespace is not significant for them.
func (t *textElem) trimmed() string {
	if t == nil {
		return ""
	}
	return strings.TrimSpace(t.Value)
}

// mustUnderstand reports whether an unknown header block is marked s:mustUnderstand="true" (SOAP 1.2 also allows
// "1"). Only the attribute in the SOAP namespace counts: masterzen/winrm puts an unqualified mustUnderstand on its
// headers, which SOAP ignores and Windows accepts.
func (h anyHeader) mustUnderstand() bool {
	for _, a := range h.Attrs {
		if a.Name.Space == NamespaceSOAP && a.Name.Local == "mustUnderstand" {
			v := strings.TrimSpace(a.Value)
			return v == "true" || v == "1"
		}
	}
	return false
}

// newGUID returns an upper-case random (version 4) GUID, the format Windows uses for ShellId, CommandId and
// MessageID values.
func newGUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("wsman: reading random bytes: %v", err))
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%X-%X-%X-%X-%X", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// xmlText writes s escaped for element content or a double-quoted attribute.
func xmlText(buf *bytes.Buffer, s string) {
	// EscapeText only fails when the writer fails; bytes.Buffer never does.
	_ = xml.EscapeText(buf, []byte(s))
}

// envelopeOpen starts a response envelope with the prefixes Windows uses. Fault envelopes also declare e and n, as
// Windows does, and leave rsp out.
func envelopeOpen(buf *bytes.Buffer, fault bool) {
	buf.WriteString(`<s:Envelope xml:lang="en-US" xmlns:s="` + NamespaceSOAP + `" xmlns:a="` + NamespaceAddressing +
		`" xmlns:x="` + NamespaceTransfer)
	if fault {
		buf.WriteString(`" xmlns:e="` + namespaceEventing + `" xmlns:n="` + namespaceEnum)
	}
	buf.WriteString(`" xmlns:w="` + NamespaceWSMan)
	if !fault {
		buf.WriteString(`" xmlns:rsp="` + NamespaceShell)
	}
	buf.WriteString(`" xmlns:p="` + NamespaceMSWSMan + `">`)
}

// buildEnvelope renders a complete response: header (Action, MessageID, To, RelatesTo) and the given body content.
func buildEnvelope(action, relatesTo string, fault bool, body func(*bytes.Buffer)) []byte {
	var buf bytes.Buffer
	envelopeOpen(&buf, fault)
	buf.WriteString(`<s:Header><a:Action>`)
	xmlText(&buf, action)
	buf.WriteString(`</a:Action><a:MessageID>uuid:`)
	buf.WriteString(newGUID())
	buf.WriteString(`</a:MessageID><a:To>` + anonymousRole + `</a:To>`)
	if relatesTo != "" {
		buf.WriteString(`<a:RelatesTo>`)
		xmlText(&buf, relatesTo)
		buf.WriteString(`</a:RelatesTo>`)
	}
	buf.WriteString(`</s:Header><s:Body>`)
	if body != nil {
		body(&buf)
	}
	buf.WriteString(`</s:Body></s:Envelope>`)
	return buf.Bytes()
}

// faultBody renders s:Fault for f; machine goes into f:WSManFault/@Machine.
func faultBody(f *Fault, machine string) func(*bytes.Buffer) {
	return func(buf *bytes.Buffer) {
		buf.WriteString(`<s:Fault><s:Code><s:Value>`)
		xmlText(buf, f.code())
		buf.WriteString(`</s:Value>`)
		if f.Subcode != "" {
			buf.WriteString(`<s:Subcode><s:Value>`)
			xmlText(buf, f.Subcode)
			buf.WriteString(`</s:Value></s:Subcode>`)
		}
		reason, message := f.Reason, f.Message
		if reason == "" {
			reason = message
		}
		if message == "" {
			message = reason
		}
		buf.WriteString(`</s:Code><s:Reason><s:Text xml:lang="en-US">`)
		xmlText(buf, reason)
		buf.WriteString(`</s:Text></s:Reason>`)
		if f.WSManCode != 0 || message != "" {
			buf.WriteString(`<s:Detail><f:WSManFault xmlns:f="` + NamespaceFault + `" Code="`)
			fmt.Fprintf(buf, "%d", f.WSManCode)
			buf.WriteString(`" Machine="`)
			xmlText(buf, machine)
			buf.WriteString(`"><f:Message>`)
			xmlText(buf, message)
			buf.WriteString(`</f:Message></f:WSManFault></s:Detail>`)
		}
		buf.WriteString(`</s:Fault>`)
	}
}
