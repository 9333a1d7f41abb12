package exchangesim

import (
	"fmt"
	"hash/fnv"
	"strings"
	"sync/atomic"

	"github.com/easguard/easguard/pkg/exchange"
)

// taskClass maps a cmdlet to the .NET task class that appears in Exchange's
// FullyQualifiedErrorId.
func taskClass(cmdlet string) string {
	ns := "Microsoft.Exchange.Management.Tasks."
	switch strings.ToLower(cmdlet) {
	case "get-casmailbox", "set-casmailbox", "get-recipient":
		ns = "Microsoft.Exchange.Management.RecipientTasks."
	case "get-exchangeserver", "get-clientaccessservice":
		ns = "Microsoft.Exchange.Management.SystemConfigurationTasks."
	}
	return ns + strings.ReplaceAll(cmdlet, "-", "")
}

// exchangeError builds an error as Exchange's remote PowerShell reports a
// task failure: the category, the exception type as the reason, and the
// FullyQualifiedErrorId with the server, request id, time and failure
// category in brackets.
func (s *Session) exchangeError(cmdlet, category, exception, target, format string, args ...any) exchange.Error {
	msg := fmt.Sprintf(format, args...)
	h := fnv.New32a()
	h.Write([]byte(cmdlet + msg))
	now := s.org.now()
	fqid := fmt.Sprintf("[Server=%s,RequestId=%s,TimeStamp=%s] [FailureCategory=Cmdlet-%s] %08X,%s",
		s.server, s.org.requestID(), now.Format("1/2/2006 3:04:05 PM"), exception, h.Sum32(), taskClass(cmdlet))
	return newError(msg, category, exception, fqid, target)
}

func newError(msg, category, reason, fqid, target string) exchange.Error {
	e := exchange.Error{Message: msg, Category: category, Reason: reason, FQID: fqid}
	if target != "" {
		t := target
		e.Target = &t
	}
	return e
}

var requestSeq atomic.Uint64

// requestID returns a GUID-shaped id, unique per error, like the RequestId
// Exchange puts in its error ids.
func (o *Org) requestID() string {
	n := requestSeq.Add(1)
	return fmt.Sprintf("%08x-%04x-4%03x-a%03x-%012x", uint32(n*2246822519), uint16(n>>9), uint16(n)&0xfff, uint16(n>>5)&0xfff, n*0xC2B2AE3D27D4EB4F&0xffffffffffff)
}

func (s *Session) notFound(cmdlet, id string) exchange.Error {
	return s.exchangeError(cmdlet, "NotSpecified", "ManagementObjectNotFoundException", "",
		"The operation couldn't be performed because object '%s' couldn't be found on '%s'.", id, s.dc())
}

func (s *Session) ambiguous(cmdlet, id string) exchange.Error {
	return s.exchangeError(cmdlet, "NotSpecified", "ManagementObjectAmbiguousException", "",
		"The operation couldn't be performed because '%s' matches multiple entries.", id)
}

func (s *Session) tooLong(cmdlet string, max, got int) exchange.Error {
	return s.exchangeError(cmdlet, "NotSpecified", "DataValidationException", "",
		"The length of the property is too long. The maximum length is %d and the length of the value provided is %d.", max, got)
}

// Binding errors are raised by PowerShell's parameter binder before the
// cmdlet runs; they carry PowerShell's own ids, not Exchange's.

func bindNotFound(cmdlet, param string) exchange.Error {
	return newError(fmt.Sprintf("A parameter cannot be found that matches parameter name '%s'.", param),
		"InvalidArgument", "ParameterBindingException", "NamedParameterNotFound,"+cmdlet, "")
}

func bindAmbiguous(cmdlet, param string, matches []string) exchange.Error {
	return newError(fmt.Sprintf("Parameter cannot be processed because the parameter name '%s' is ambiguous. Possible matches include: -%s.", param, strings.Join(matches, " -")),
		"InvalidArgument", "ParameterBindingException", "AmbiguousParameter,"+cmdlet, "")
}

func bindMissing(cmdlet, param string) exchange.Error {
	return newError(fmt.Sprintf("Cannot process command because of one or more missing mandatory parameters: %s.", param),
		"InvalidArgument", "ParameterBindingException", "MissingMandatoryParameter,"+cmdlet, "")
}

func bindConvert(cmdlet, param, detail string) exchange.Error {
	return newError(fmt.Sprintf("Cannot process argument transformation on parameter '%s'. %s", param, detail),
		"InvalidData", "ParameterBindingArgumentTransformationException", "ParameterArgumentTransformationError,"+cmdlet, "")
}

func bindSetConflict(cmdlet string) exchange.Error {
	return newError("Parameter set cannot be resolved using the specified named parameters.",
		"InvalidArgument", "ParameterBindingException", "AmbiguousParameterSet,"+cmdlet, "")
}

func bindNull(cmdlet, param string) exchange.Error {
	return newError(fmt.Sprintf("Cannot validate argument on parameter '%s'. The argument is null or empty. Provide an argument that is not null or empty, and then try the command again.", param),
		"InvalidData", "ParameterBindingValidationException", "ParameterArgumentValidationError,"+cmdlet, "")
}

// commandNotFound is what a session without the cmdlet (RBAC did not
// grant it, so Import-PSSession did not import it) reports.
func commandNotFound(name string) exchange.Error {
	return newError(fmt.Sprintf("The term '%s' is not recognized as the name of a cmdlet, function, script file, or operable program. Check the spelling of the name, or if a path was included, verify that the path is correct and try again.", name),
		"ObjectNotFound", "CommandNotFoundException", "CommandNotFoundException,Microsoft.PowerShell.Commands.GetCommandCommand", name)
}

// nonInteractive is what a cmdlet that wants confirmation reports in
// powershell.exe -NonInteractive when -Confirm:$false was not passed.
func nonInteractive(cmdlet string) exchange.Error {
	return newError("PowerShell is in NonInteractive mode. Read and Prompt functionality is not available.",
		"InvalidOperation", "PSInvalidOperationException", "HostFunctionNotImplemented,"+taskClass(cmdlet), "")
}
