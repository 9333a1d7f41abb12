# Stand-ins for PowerShell remoting and the Exchange cmdlets, for the Pester
# tests of worker.ps1 (see worker.Tests.ps1). Harness.ps1 dot-sources this
# file in the child powershell.exe that runs the real worker script, before
# the test's setup script, which may replace a stub.
#
# Objects cross a real implicit-remoting session as CLIXML and come back
# deserialised: property bags whose enums are integers typed
# Deserialized.System.Enum, whose dates are live DateTime values that keep
# their kind, and to which remoting adds PSComputerName, RunspaceId and
# PSShowComputerName. ConvertTo-RemotingObject makes them the same way,
# through PowerShell's own serializer, so the worker meets what a remote
# Exchange session hands it, not a hand-made imitation.
#
# Every stub writes what it was called with to the log file the harness
# names ($global:StubLogPath), one JSON object a line, never to stdout:
# stdout belongs to the worker's frames.

# Exchange's enums, with Exchange's names and numbers (reference
# exchange.md §1.5); the namespace is the stubs' own.
if (-not ('EasguardStub.DeviceAccessState' -as [type])) {
    Add-Type -TypeDefinition @'
namespace EasguardStub {
    public enum DeviceAccessState { Unknown = 0, Allowed = 1, Blocked = 2, Quarantined = 3, DeviceDiscovery = 4 }
    public enum DeviceAccessStateReason { Unknown = 0, Global = 1, Individual = 2, DeviceRule = 3, Upgrade = 4, Policy = 5 }
    public enum DeviceAccessLevel { Allow = 0, Block = 1, Quarantine = 2 }
}
'@
}

# The stub session's state; a setup script or a stub changes it to break the
# session the way an app-pool recycle does (Broken, availability None).
$global:StubSessionState = 'Opened'
$global:StubSessionAvailability = 'Available'

function Write-StubLog {
    param([System.Collections.IDictionary]$Entry)
    $path = Get-Variable -Name StubLogPath -Scope Global -ValueOnly -ErrorAction SilentlyContinue
    if ($null -eq $path) { return }
    $json = ConvertTo-Json -InputObject $Entry -Compress -Depth 6
    [System.IO.File]::AppendAllText($path, $json + "`n", (New-Object System.Text.UTF8Encoding $false))
}

# ConvertTo-StubLogValue turns a parameter value into something the log can
# hold: strings, booleans, numbers, string arrays, and hashtables of string
# arrays (@{Add=...;Remove=...}).
function ConvertTo-StubLogValue {
    param($Value)
    if ($null -eq $Value) { return $null }
    if ($Value -is [System.Management.Automation.SwitchParameter]) { return $Value.IsPresent }
    if ($Value -is [bool] -or $Value -is [int] -or $Value -is [long]) { return $Value }
    if ($Value -is [System.Collections.IDictionary]) {
        $h = [ordered]@{}
        foreach ($k in $Value.Keys) {
            $items = New-Object System.Collections.ArrayList
            foreach ($item in @($Value[$k])) { [void]$items.Add([string]$item) }
            $h[[string]$k] = $items.ToArray()
            if ($null -ne $Value[$k]) { $h[[string]$k + '.type'] = $Value[$k].GetType().FullName }
        }
        return $h
    }
    if ($Value -is [array]) {
        $items = New-Object System.Collections.ArrayList
        foreach ($item in $Value) { [void]$items.Add([string]$item) }
        return , $items.ToArray()
    }
    return [string]$Value
}

# Write-StubCall logs one call of a stub Exchange cmdlet: its name, the
# parameters it was bound with (common parameters included, so the tests
# see -WarningAction and -ErrorAction as the worker passes them), and the
# culture of the thread it runs on.
function Write-StubCall {
    param([string]$Cmdlet, [System.Collections.IDictionary]$Bound)
    $params = [ordered]@{}
    foreach ($k in $Bound.Keys) { $params[[string]$k] = ConvertTo-StubLogValue $Bound[$k] }
    Write-StubLog ([ordered]@{
            ev        = 'call'
            cmdlet    = $Cmdlet
            params    = $params
            culture   = [System.Threading.Thread]::CurrentThread.CurrentCulture.Name
            uiculture = [System.Threading.Thread]::CurrentThread.CurrentUICulture.Name
            session   = [string]$global:StubSessionState
        })
}

# ConvertTo-RemotingObject returns what an implicit-remoting proxy hands its
# caller for $InputObject: the object after a round trip through
# PowerShell's serializer (the CLIXML that crosses the wire), with the note
# properties remoting adds.
function ConvertTo-RemotingObject {
    param($InputObject)
    $xml = [System.Management.Automation.PSSerializer]::Serialize($InputObject, 2)
    $o = [System.Management.Automation.PSSerializer]::Deserialize($xml)
    Add-Member -InputObject $o -NotePropertyName 'PSComputerName' -NotePropertyValue 'ex01.contoso.com'
    Add-Member -InputObject $o -NotePropertyName 'RunspaceId' -NotePropertyValue ([guid]'3f2504e0-4f89-11d3-9a0c-0305e82c3301')
    Add-Member -InputObject $o -NotePropertyName 'PSShowComputerName' -NotePropertyValue $false
    return $o
}

# New-StubDevice returns a live mobile-device object as Exchange holds it,
# before remoting; the Get-MobileDevice stub sends it through
# ConvertTo-RemotingObject.
function New-StubDevice {
    param([string]$DeviceId, [string]$User = 'alice', [string]$State = 'Allowed', [string]$Reason = 'Global')
    $o = New-Object PSObject
    Add-Member -InputObject $o -NotePropertyName 'DeviceId' -NotePropertyValue $DeviceId
    Add-Member -InputObject $o -NotePropertyName 'DeviceAccessState' -NotePropertyValue ([EasguardStub.DeviceAccessState]$State)
    Add-Member -InputObject $o -NotePropertyName 'DeviceAccessStateReason' -NotePropertyValue ([EasguardStub.DeviceAccessStateReason]$Reason)
    Add-Member -InputObject $o -NotePropertyName 'DeviceModel' -NotePropertyValue 'iPhone15C2'
    Add-Member -InputObject $o -NotePropertyName 'UserDisplayName' -NotePropertyValue "contoso.com/Users/$User"
    Add-Member -InputObject $o -NotePropertyName 'Identity' -NotePropertyValue "$User\ExchangeActiveSyncDevices\iPhone$([char]0xA7)$DeviceId"
    Add-Member -InputObject $o -NotePropertyName 'Guid' -NotePropertyValue ([guid]'9d3f1c2a-6b1e-4f7e-a5c0-2b8d9e4f1a77')
    Add-Member -InputObject $o -NotePropertyName 'FirstSyncTime' -NotePropertyValue (New-Object -TypeName DateTime -ArgumentList 2026, 11, 26, 19, 55, 57, ([DateTimeKind]::Utc))
    $o.pstypenames.Insert(0, 'Microsoft.Exchange.Data.Directory.Management.MobileDevice')
    return $o
}

# The dates of the date-kind tests: one of each DateTimeKind, with seven
# fractional digits. Which Exchange property has which kind is not what is
# tested here; that the worker keeps each kind is.
function New-StubDates {
    $utc = (New-Object -TypeName DateTime -ArgumentList 2026, 11, 26, 19, 55, 57, ([DateTimeKind]::Utc)).AddTicks(1234567)
    $local = (New-Object -TypeName DateTime -ArgumentList 2026, 11, 26, 19, 55, 57, ([DateTimeKind]::Local)).AddTicks(1234567)
    $unspecified = (New-Object -TypeName DateTime -ArgumentList 2026, 11, 26, 19, 55, 57, ([DateTimeKind]::Unspecified)).AddTicks(1234567)
    $o = New-Object PSObject
    Add-Member -InputObject $o -NotePropertyName 'DeviceId' -NotePropertyValue 'ApplF17XK0J1HG7F'
    Add-Member -InputObject $o -NotePropertyName 'LastSuccessSync' -NotePropertyValue $utc
    Add-Member -InputObject $o -NotePropertyName 'WhenChanged' -NotePropertyValue $local
    Add-Member -InputObject $o -NotePropertyName 'LastSyncAttemptTime' -NotePropertyValue $unspecified
    $o.pstypenames.Insert(0, 'Microsoft.Exchange.Data.Mapi.MobileDeviceConfiguration')
    return $o
}

$global:StubDevices = @(
    (New-StubDevice -DeviceId 'ApplF17XK0J1HG7F' -User 'alice' -State 'Quarantined' -Reason 'Individual'),
    (New-StubDevice -DeviceId 'androidc1234567' -User 'bob' -State 'Blocked' -Reason 'Global')
)

# --- PowerShell remoting --------------------------------------------------

# New-PSSessionOption: the real cmdlet, called with what the worker passed
# (it needs no server), so the tests see both the arguments and how Windows
# PowerShell reads them.
function global:New-PSSessionOption {
    [CmdletBinding()]
    param([switch]$SkipCACheck, [switch]$SkipCNCheck, [switch]$SkipRevocationCheck,
        [System.Globalization.CultureInfo]$Culture, [System.Globalization.CultureInfo]$UICulture, [int]$IdleTimeout)
    $o = Microsoft.PowerShell.Core\New-PSSessionOption @PSBoundParameters
    $bound = [ordered]@{}
    foreach ($k in $PSBoundParameters.Keys) { $bound[[string]$k] = ConvertTo-StubLogValue $PSBoundParameters[$k] }
    Write-StubLog ([ordered]@{
            ev                  = 'New-PSSessionOption'
            params              = $bound
            Culture             = [string]$o.Culture.Name
            UICulture           = [string]$o.UICulture.Name
            IdleTimeoutMs       = [long]$o.IdleTimeout.TotalMilliseconds
            SkipCACheck         = [bool]$o.SkipCACheck
            SkipCNCheck         = [bool]$o.SkipCNCheck
            SkipRevocationCheck = [bool]$o.SkipRevocationCheck
        })
    return $o
}

# New-StubSession is a PSSession as far as the worker looks at one: State
# and Availability, typed as the real ones are, read from the globals above.
function New-StubSession {
    $s = New-Object PSObject
    Add-Member -InputObject $s -NotePropertyName 'Id' -NotePropertyValue 1
    Add-Member -InputObject $s -NotePropertyName 'Name' -NotePropertyValue 'WinRM1'
    Add-Member -InputObject $s -NotePropertyName 'ComputerName' -NotePropertyValue 'ex01.contoso.com'
    Add-Member -InputObject $s -NotePropertyName 'ConfigurationName' -NotePropertyValue 'Microsoft.Exchange'
    Add-Member -InputObject $s -MemberType ScriptProperty -Name 'State' -Value { [System.Management.Automation.Runspaces.RunspaceState]$global:StubSessionState }
    Add-Member -InputObject $s -MemberType ScriptProperty -Name 'Availability' -Value { [System.Management.Automation.Runspaces.RunspaceAvailability]$global:StubSessionAvailability }
    $s.pstypenames.Insert(0, 'System.Management.Automation.Runspaces.PSSession')
    return $s
}

function global:New-PSSession {
    [CmdletBinding()]
    param([string]$ConfigurationName, [uri]$ConnectionUri, [System.Management.Automation.PSCredential]$Credential,
        [System.Management.Automation.Runspaces.AuthenticationMechanism]$Authentication,
        [System.Management.Automation.Remoting.PSSessionOption]$SessionOption)
    Write-StubLog ([ordered]@{
            ev                = 'New-PSSession'
            ConfigurationName = $ConfigurationName
            ConnectionUri     = [string]$ConnectionUri
            User              = $Credential.UserName
            Password          = $Credential.GetNetworkCredential().Password
            Authentication    = [string]$Authentication
            IdleTimeoutMs     = [long]$SessionOption.IdleTimeout.TotalMilliseconds
            Culture           = [string]$SessionOption.Culture.Name
            ErrorAction       = [string]$PSBoundParameters['ErrorAction']
        })
    return New-StubSession
}

function global:Import-PSSession {
    [CmdletBinding()]
    param([Parameter(Mandatory = $true)] $Session, [string[]]$CommandName, [switch]$DisableNameChecking, [switch]$AllowClobber)
    Write-StubLog ([ordered]@{ ev = 'Import-PSSession'; CommandName = $CommandName; SessionId = $Session.Id })
    return New-Object PSObject -Property @{ Name = 'tmp_easguard_stub.psm1' }
}

function global:Remove-PSSession {
    [CmdletBinding()]
    param([Parameter(Mandatory = $true)] $Session)
    Write-StubLog ([ordered]@{ ev = 'Remove-PSSession'; SessionId = $Session.Id; ErrorAction = [string]$PSBoundParameters['ErrorAction'] })
}

# --- Exchange cmdlets (implicit-remoting proxies) -------------------------

function global:Set-ADServerSettings {
    [CmdletBinding()]
    param([bool]$ViewEntireForest)
    Write-StubCall 'Set-ADServerSettings' $PSBoundParameters
}

function global:Get-ActiveSyncOrganizationSettings {
    [CmdletBinding()]
    param($Identity)
    Write-StubCall 'Get-ActiveSyncOrganizationSettings' $PSBoundParameters
    $o = New-Object PSObject
    Add-Member -InputObject $o -NotePropertyName 'Name' -NotePropertyValue 'Mobile Mailbox Settings'
    Add-Member -InputObject $o -NotePropertyName 'DefaultAccessLevel' -NotePropertyValue ([EasguardStub.DeviceAccessLevel]::Quarantine)
    Add-Member -InputObject $o -NotePropertyName 'AdminMailRecipients' -NotePropertyValue ([string[]]@('admin@contoso.com'))
    Add-Member -InputObject $o -NotePropertyName 'UserMailInsert' -NotePropertyValue ''
    $o.pstypenames.Insert(0, 'Microsoft.Exchange.Data.Directory.SystemConfiguration.ActiveSyncOrganizationSettings')
    ConvertTo-RemotingObject $o
}

function global:Get-ExchangeServer {
    [CmdletBinding()]
    param($Identity)
    Write-StubCall 'Get-ExchangeServer' $PSBoundParameters
    $o = New-Object PSObject
    Add-Member -InputObject $o -NotePropertyName 'Name' -NotePropertyValue 'EX01'
    Add-Member -InputObject $o -NotePropertyName 'Fqdn' -NotePropertyValue 'ex01.contoso.com'
    Add-Member -InputObject $o -NotePropertyName 'AdminDisplayVersion' -NotePropertyValue 'Version 15.2 (Build 1118.7)'
    $o.pstypenames.Insert(0, 'Microsoft.Exchange.Data.Directory.Management.ExchangeServer')
    ConvertTo-RemotingObject $o
}

function global:Get-MobileDevice {
    [CmdletBinding()]
    param($Identity, $Mailbox, [string]$Filter, $ResultSize)
    Write-StubCall 'Get-MobileDevice' $PSBoundParameters
    foreach ($d in $global:StubDevices) { ConvertTo-RemotingObject $d }
}

function global:Get-MobileDeviceStatistics {
    [CmdletBinding()]
    param($Identity, $Mailbox)
    Write-StubCall 'Get-MobileDeviceStatistics' $PSBoundParameters
    ConvertTo-RemotingObject (New-StubDates)
}

# Get-CASMailbox writes Exchange's truncation warning before its objects, as
# a listing cut at its ResultSize does. It stands for an implicit-remoting
# proxy, which passes -WarningAction to the server: there a warning told to
# be SilentlyContinue (or Ignore) is dropped and never crosses back, so the
# local -WarningVariable never sees it. (A local function would still fill
# -WarningVariable under SilentlyContinue; that is exactly the difference
# that hid the loss.)
function global:Get-CASMailbox {
    [CmdletBinding()]
    param($Identity, [string]$Filter, $ResultSize)
    Write-StubCall 'Get-CASMailbox' $PSBoundParameters
    $serverWarningAction = [string]$WarningPreference
    if ($serverWarningAction -ne 'SilentlyContinue' -and $serverWarningAction -ne 'Ignore') {
        Write-StubLog ([ordered]@{ ev = 'warning-sent'; action = $serverWarningAction })
        Write-Warning 'By default, only the first 1000 items are returned. Use the ResultSize parameter to specify the number of items returned. To return all items, specify "-ResultSize Unlimited". Be aware that, depending on the actual number of items, returning all items can take a long time and consume a large amount of memory. Also, we don''t recommend storing the results in a variable. Instead, pipe the results to another task or script to perform batch changes.'
    }
    foreach ($user in @('alice', 'bob')) {
        $o = New-Object PSObject
        Add-Member -InputObject $o -NotePropertyName 'SamAccountName' -NotePropertyValue $user
        Add-Member -InputObject $o -NotePropertyName 'ActiveSyncAllowedDeviceIDs' -NotePropertyValue ([string[]]@('ApplF17XK0J1HG7F', 'androidc1234567'))
        ConvertTo-RemotingObject $o
    }
}

function global:Set-CASMailbox {
    [CmdletBinding()]
    param($Identity, $ActiveSyncAllowedDeviceIDs, $ActiveSyncBlockedDeviceIDs)
    Write-StubCall 'Set-CASMailbox' $PSBoundParameters
}

# Get-ActiveSyncDeviceAccessRule returns a live object (no remoting round
# trip), so its enum is a real [enum].
function global:Get-ActiveSyncDeviceAccessRule {
    [CmdletBinding()]
    param($Identity)
    Write-StubCall 'Get-ActiveSyncDeviceAccessRule' $PSBoundParameters
    $o = New-Object PSObject
    Add-Member -InputObject $o -NotePropertyName 'Name' -NotePropertyValue 'iPhone (DeviceModel)'
    Add-Member -InputObject $o -NotePropertyName 'AccessLevel' -NotePropertyValue ([EasguardStub.DeviceAccessLevel]::Block)
    return $o
}
