package wsman

import (
	"fmt"
	"net/http"
)

// WSManFault codes the server emits. They are the HRESULTs Windows puts in f:WSManFault/@Code; clients (WinRb, winrm4j,
// pypsrp, easguard's cmdlet executor) branch on them, so the simulator must use the same numbers.
const (
	CodeResourceNotFound     uint32 = 2150858752 // 0x80338000 ERROR_WSMAN_RESOURCE_NOT_FOUND
	CodeSOAPVersionMismatch  uint32 = 2150858765 // 0x8033800D ERROR_WSMAN_SOAP_VERSION_MISMATCH
	CodeMustUnderstand       uint32 = 2150858768 // 0x80338010 ERROR_WSMAN_SOAP_FAULT_MUST_UNDERSTAND
	CodeHeaderRequired       uint32 = 2150858769 // 0x80338011 ERROR_WSMAN_MESSAGE_INFORMATION_HEADER_REQUIRED
	CodeActionNotSupported   uint32 = 2150858771 // 0x80338013 ERROR_WSMAN_ACTION_NOT_SUPPORTED
	CodeOperationTimedOut    uint32 = 2150858793 // 0x80338029 ERROR_WSMAN_OPERATION_TIMEDOUT
	CodeEncodingLimit        uint32 = 2150858805 // 0x80338035 ERROR_WSMAN_ENCODING_LIMIT
	CodeInvalidXML           uint32 = 2150858819 // 0x80338043 ERROR_WSMAN_INVALID_XML
	CodeShellNotFound        uint32 = 2150858843 // 0x8033805B ERROR_WSMAN_UNEXPECTED_SELECTORS
	CodeMinEnvelopeSize      uint32 = 2150858878 // 0x8033807E ERROR_WSMAN_MIN_ENVELOPE_SIZE
	CodeInvalidTimeoutHeader uint32 = 2150858881 // 0x80338081 ERROR_WSMAN_INVALID_TIMEOUT_HEADER
	CodeShellQuotaExceeded   uint32 = 2150859174 // 0x803381A6, per-user shell quota exceeded
	CodeInvalidParameter     uint32 = 87         // ERROR_INVALID_PARAMETER, as Windows reports a bad shell body
	CodeBrokenPipe           uint32 = 2147942509 // 0x8007006D HRESULT_FROM_WIN32(ERROR_BROKEN_PIPE)
)

const (
	defaultInternalErrorCode uint32 = 2147500037 // 0x80004005 E_FAIL
	// minClientEnvelopeSize is the smallest w:MaxEnvelopeSize a client may ask for (DSP0226 6.2, MS-WSMAN 3.1.4.1.9).
	minClientEnvelopeSize = 8192

	actionWSManFault      = "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault"
	actionAddressingFault = "http://schemas.xmlsoap.org/ws/2004/08/addressing/fault"

	faultCodeReceiver                  = "s:Receiver"
	faultCodeSender                    = "s:Sender"
	faultSubcodeTimedOut               = "w:TimedOut"
	faultSubcodeInvalidSelectors       = "w:InvalidSelectors"
	faultSubcodeInternalError          = "w:InternalError"
	faultSubcodeInvalidParameter       = "w:InvalidParameter"
	faultSubcodeEncodingLimit          = "w:EncodingLimit"
	faultSubcodeActionNotSupported     = "a:ActionNotSupported"
	faultSubcodeDestinationUnreachable = "a:DestinationUnreachable"
	faultSubcodeInvalidHeader          = "a:InvalidMessageInformationHeader"
	faultSubcodeHeaderRequired         = "a:MessageInformationHeaderRequired"
)

// Fault is a SOAP 1.2 fault in the shape Windows WinRM produces: s:Code/s:Value with an optional s:Subcode, an
// s:Reason text and an s:Detail/f:WSManFault carrying the numeric code, the machine name and a message. Hooks return
// Faults to inject failures, so every field has a usable default.
//
// Code and Subcode are QNames written verbatim; the prefixes s, a, x, e, n, w and p are declared on the fault envelope
// (as on Windows), other prefixes would produce a response the client cannot resolve.
type Fault struct {
	// HTTPStatus is the status line; 0 means 500, which is what Windows uses for every WS-Man fault.
	HTTPStatus int
	// Code is "s:Receiver" (server-side failure) or "s:Sender" (bad request); "" means "s:Receiver".
	Code string
	// Subcode is the WS-Man or WS-Addressing subcode such as "w:TimedOut"; "" omits s:Subcode.
	Subcode string
	// Reason is the s:Reason text; "" reuses Message.
	Reason string
	// WSManCode is f:WSManFault/@Code; 0 together with an empty Message omits s:Detail.
	WSManCode uint32
	// Message is f:WSManFault/f:Message; "" reuses Reason.
	Message string
	// Action is the wsa:Action of the fault message; "" means the WS-Management fault action. Windows uses the
	// WS-Addressing fault action for addressing-level faults such as a:DestinationUnreachable.
	Action string
}

// Error makes a Fault usable as an error, so a Launcher can return one (possibly wrapped) to answer Command with
// exactly that fault instead of a generic internal error.
func (f *Fault) Error() string {
	msg := f.Message
	if msg == "" {
		msg = f.Reason
	}
	return fmt.Sprintf("wsman fault %s %s (code %d): %s", f.code(), f.Subcode, f.WSManCode, msg)
}

func (f *Fault) status() int {
	if f.HTTPStatus == 0 {
		return http.StatusInternalServerError
	}
	return f.HTTPStatus
}

func (f *Fault) code() string {
	if f.Code == "" {
		return faultCodeReceiver
	}
	return f.Code
}

func (f *Fault) action() string {
	if f.Action == "" {
		return actionWSManFault
	}
	return f.Action
}

// windowsText appends the trailing blank that Windows leaves on every FormatMessage text in faults ("… retry the
// operation. </f:Message>"); a client that compares texts without trimming must fail here as it would in production.
func windowsText(s string) string { return s + " " }

func windowsFault(code, subcode string, wsmanCode uint32, text string) Fault {
	t := windowsText(text)
	return Fault{Code: code, Subcode: subcode, WSManCode: wsmanCode, Reason: t, Message: t}
}

// TimedOutFault is the answer to a Receive that saw no output within its OperationTimeout. Clients treat it as "poll
// again" (masterzen/winrm looks for "OperationTimeout" in the text), so the Reason must keep that word.
func TimedOutFault() Fault {
	return windowsFault(faultCodeReceiver, faultSubcodeTimedOut, CodeOperationTimedOut,
		"The WS-Management service cannot complete the operation within the time specified in OperationTimeout.")
}

// ShellNotFoundFault is what Windows answers for a ShellId (or a CommandId inside it) it does not know, e.g. after
// the shell was deleted, reaped or lost with its host process. Clients use code 2150858843 to decide to open a new
// shell, which makes it the most useful fault to inject.
func ShellNotFoundFault(shellID string) Fault {
	return windowsFault(faultCodeSender, faultSubcodeInvalidSelectors, CodeShellNotFound,
		"The request for the Windows Remote Shell with ShellId "+shellID+" failed because the shell was not found on the "+
			"server. Possible causes are: the specified ShellId is incorrect or the shell no longer exists on the server. "+
			"Provide the correct ShellId or create a new shell and retry the operation.")
}

// DefaultShellQuotaFault is the default answer to a Create beyond Options.MaxShellsPerUser, with the Windows text that
// names the limit, so a client's quota handling can be exercised without a Windows host.
func DefaultShellQuotaFault(_ string, limit int) Fault {
	return windowsFault(faultCodeReceiver, faultSubcodeInternalError, CodeShellQuotaExceeded,
		fmt.Sprintf("The WS-Management service cannot process the request. This user is allowed a maximum number of %d "+
			"concurrent shells, which has been exceeded. Close existing shells or raise the quota for this user.", limit))
}

// InternalErrorFault reports a server-side failure (for example a Launcher error) the way Windows wraps plug-in
// errors: s:Receiver with w:InternalError. code 0 means E_FAIL.
func InternalErrorFault(code uint32, message string) Fault {
	if code == 0 {
		code = defaultInternalErrorCode
	}
	return windowsFault(faultCodeReceiver, faultSubcodeInternalError, code, message)
}

func invalidXMLFault() Fault {
	return windowsFault(faultCodeSender, faultSubcodeInvalidHeader, CodeInvalidXML,
		"The WS-Management service cannot process the request because the XML is invalid.")
}

func versionMismatchFault() Fault {
	return windowsFault("s:VersionMismatch", "", CodeSOAPVersionMismatch,
		"The WS-Management service does not support the SOAP version specified in the request.")
}

func mustUnderstandFault(name string) Fault {
	return windowsFault("s:MustUnderstand", "", CodeMustUnderstand,
		"The WS-Management service cannot process a SOAP header in the request that is marked as mustUnderstand by "+
			"the client. This could be caused by the use of a version of the protocol which is not supported, or may be "+
			"an incompatibility between the client and server implementations. Header: "+name+".")
}

func headerRequiredFault(header string) Fault {
	return windowsFault(faultCodeSender, faultSubcodeHeaderRequired, CodeHeaderRequired,
		"The WS-Management service cannot process the request. The request does not have all the expected SOAP headers. "+
			"Missing header: "+header+".")
}

func invalidTimeoutFault() Fault {
	return windowsFault(faultCodeSender, faultSubcodeInvalidHeader, CodeInvalidTimeoutHeader,
		"The WS-Management service cannot process the request because the timeout header in the request is invalid.")
}

func envelopeTooSmallFault() Fault {
	return windowsFault(faultCodeSender, faultSubcodeEncodingLimit, CodeMinEnvelopeSize,
		"The WS-Management service cannot process the request because the envelope size in the request is too small.")
}

func encodingLimitFault() Fault {
	return windowsFault(faultCodeSender, faultSubcodeEncodingLimit, CodeEncodingLimit,
		"The WS-Management service cannot process the request because the encoding of the request exceeds an internal "+
			"encoding limit. Reconfigure the client to send messages which fit the encoding limits of the service.")
}

// resourceNotFoundFault answers an unknown resource URI (PSRP, WMI, …). A captured Windows response (microsoft/omi
// issue 254) shows this fault under the WS-Addressing fault action, unlike the WS-Management faults.
func resourceNotFoundFault() Fault {
	f := windowsFault(faultCodeSender, faultSubcodeDestinationUnreachable, CodeResourceNotFound,
		"The WS-Management service cannot process the request. The service cannot find the resource identified by the "+
			"resource URI and selectors.")
	f.Action = actionAddressingFault
	return f
}

func actionNotSupportedFault() Fault {
	return windowsFault(faultCodeSender, faultSubcodeActionNotSupported, CodeActionNotSupported,
		"The WS-Management service does not support the action specified in the request.")
}

func missingShellSelectorFault() Fault {
	f := windowsFault(faultCodeSender, faultSubcodeInvalidSelectors, CodeShellNotFound,
		"The WS-Management service cannot process the request because the request contained invalid selectors for the "+
			"resource.")
	f.Message = windowsText("The Windows Remote Shell cannot process the request because it requires the following " +
		"selector: ShellId. Retry with the correct selector.")
	return f
}

func invalidParameterFault() Fault {
	return windowsFault(faultCodeSender, faultSubcodeInvalidParameter, CodeInvalidParameter, "The parameter is incorrect.")
}

func brokenPipeFault() Fault {
	return windowsFault(faultCodeReceiver, faultSubcodeInternalError, CodeBrokenPipe, "The pipe has been ended.")
}
