# easguard Exchange worker, frame protocol v1 (PROTOCOL.md next to this file).
#
# Runs inside one long-lived powershell.exe (Windows PowerShell 5.1) on a
# Windows host that easguard reaches over WinRM. It reads one request per
# line from stdin and answers with framed lines on stdout. It never turns
# data into code: a request names a cmdlet from the allow-list below and
# carries its parameters as JSON data, which are converted to typed values
# and splatted.
#
# Rules this script keeps, each checked where it can be:
# - Strict mode is on, so reading a property a request lacks is a terminating
#   error. The Go side omits false and empty values; every field that is not
#   always sent is read through Get-WireField. .ci/pssyntax/contract.mjs
#   checks this on the syntax tree and writes worker_contract.json, which the
#   Go tests and the simulator use.
# - Values leave as data Go interprets: enums as their names (also when they
#   arrive deserialised from the remote session as numbers), dates in the
#   round-trip format that keeps their kind, everything else as JSON values.
# - The remote session is opened with en-US culture, an idle timeout of two
#   minutes (a session left behind by a killed worker expires instead of
#   counting against Exchange's 18 sessions per user), and its health is
#   checked before every request, so a broken session is reported
#   (reason SessionBroken) and the worker replaced rather than left to
#   prompt for credentials.
param([System.IO.StreamReader]$In)

Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'

# en-US for this process: parsing and formatting here, and the culture the
# remote session is opened with, never depend on the host's regional settings.
$script:Culture = [System.Globalization.CultureInfo]::GetCultureInfo('en-US')
[System.Threading.Thread]::CurrentThread.CurrentCulture = $script:Culture
[System.Threading.Thread]::CurrentThread.CurrentUICulture = $script:Culture

$script:ProtocolVersion = 1
$script:Sentinel = 'EGF1 '
# A remote session idle this long (ms) is closed by the server; heartbeats
# (ping) keep a live worker's session busier than that.
$script:IdleTimeoutMs = 120000

# The cmdlets easguard may run, and nothing else. Keys are matched
# case-insensitively; values are the canonical names.
$script:Allowed = @{}
foreach ($name in @(
        'Get-ActiveSyncOrganizationSettings', 'Set-ActiveSyncOrganizationSettings',
        'Get-CASMailbox', 'Set-CASMailbox',
        'Get-ActiveSyncMailboxPolicy', 'Set-ActiveSyncMailboxPolicy', 'New-ActiveSyncMailboxPolicy', 'Remove-ActiveSyncMailboxPolicy',
        'Get-ActiveSyncDeviceAccessRule', 'Set-ActiveSyncDeviceAccessRule', 'New-ActiveSyncDeviceAccessRule', 'Remove-ActiveSyncDeviceAccessRule',
        'Get-ActiveSyncDeviceStatistics', 'Get-ActiveSyncDevice', 'Get-ActiveSyncDeviceClass',
        'Get-MobileDevice', 'Get-MobileDeviceStatistics',
        'Get-ExchangeServer', 'Get-ClientAccessService', 'Get-Recipient',
        'Clear-ActiveSyncDevice', 'Remove-ActiveSyncDevice',
        'Set-ADServerSettings', 'Get-Command')) {
    $script:Allowed[$name] = $name
}
# Properties PowerShell remoting adds to every object; they say nothing about Exchange.
$script:Noise = @{ 'PSComputerName' = 1; 'RunspaceId' = 1; 'PSShowComputerName' = 1 }

$utf8 = New-Object System.Text.UTF8Encoding $false
$script:Out = New-Object System.IO.StreamWriter([Console]::OpenStandardOutput(), $utf8)
$script:Out.AutoFlush = $true
$script:Out.NewLine = "`n"
$script:Session = $null
$script:Module = $null
$script:Mode = 'none'

function Send-Frame([System.Collections.IDictionary]$Frame) {
    $json = ConvertTo-Json -InputObject $Frame -Compress -Depth 8
    $script:Out.WriteLine($script:Sentinel + [Convert]::ToBase64String([System.Text.Encoding]::UTF8.GetBytes($json)))
}

# Get-WireField reads a field of a request (or a call) that the Go side may
# omit: it returns $Default when the field is missing or null. Arrays come
# back as arrays (the leading comma stops PowerShell unrolling them).
function Get-WireField($Object, [string]$Name, $Default = $null) {
    $p = $Object.PSObject.Properties[$Name]
    if ($null -eq $p -or $null -eq $p.Value) { return , $Default }
    return , $p.Value
}

# Get-RequiredField reads a field a request must carry, with a clear error
# instead of strict mode's.
function Get-RequiredField($Object, [string]$Name) {
    $v = Get-WireField $Object $Name
    if ($null -eq $v -or ($v -is [string] -and $v.Length -eq 0)) { throw "request field '$Name' is required" }
    return , $v
}

# ConvertTo-Wire turns one property value into JSON-ready data with explicit
# conversions: dates in the round-trip format ('o', which keeps the kind:
# Z for UTC, an offset for local time, nothing for unspecified, which Go reads
# as UTC); enums to their names, whether live or deserialised from the remote
# session (a Deserialized.System.Enum is an integer whose ToString() is the
# name); multi-valued properties to arrays; identities and anything else to
# strings.
function ConvertTo-Wire($Value, [int]$Depth) {
    if ($null -eq $Value) { return $null }
    if ($Value -is [string] -or $Value -is [bool]) { return $Value }
    if ($Value -is [datetime]) { return $Value.ToString('o', [System.Globalization.CultureInfo]::InvariantCulture) }
    if ($Value -is [enum]) { return $Value.ToString() }
    if ($Value.pstypenames -contains 'Deserialized.System.Enum') { return $Value.ToString() }
    if ($Value -is [int] -or $Value -is [long] -or $Value -is [int16] -or $Value -is [byte] -or $Value -is [uint32] -or $Value -is [uint64] -or $Value -is [double] -or $Value -is [decimal] -or $Value -is [single]) { return $Value }
    if ($Value -is [System.Collections.IEnumerable] -and $Depth -eq 0) {
        $list = New-Object System.Collections.ArrayList
        foreach ($item in $Value) { [void]$list.Add((ConvertTo-Wire $item 1)) }
        return , $list.ToArray()
    }
    return $Value.ToString()
}

function ConvertTo-WireObject($Object, $Select) {
    $h = [ordered]@{}
    if ($null -ne $Select) {
        foreach ($name in $Select) {
            $p = $Object.PSObject.Properties[$name]
            if ($null -ne $p) { $h[$p.Name] = ConvertTo-Wire $p.Value 0 }
        }
        return $h
    }
    foreach ($p in $Object.PSObject.Properties) {
        if ($script:Noise.ContainsKey($p.Name)) { continue }
        if ($p.MemberType -ne 'Property' -and $p.MemberType -ne 'NoteProperty') { continue }
        $v = $null
        try { $v = $p.Value } catch { continue }
        $h[$p.Name] = ConvertTo-Wire $v 0
    }
    return $h
}

function ConvertTo-WireError($Err) {
    if ($Err -is [System.Management.Automation.ErrorRecord]) {
        $target = $null
        if ($null -ne $Err.TargetObject) { $target = [string]$Err.TargetObject }
        return [ordered]@{
            message  = $Err.Exception.Message
            category = $Err.CategoryInfo.Category.ToString()
            reason   = $Err.CategoryInfo.Reason
            fqid     = $Err.FullyQualifiedErrorId
            target   = $target
        }
    }
    return [ordered]@{ message = [string]$Err; category = 'NotSpecified'; reason = 'WorkerError'; fqid = 'WorkerError'; target = $null }
}

function New-ProtocolError([string]$Message) {
    return [ordered]@{ message = $Message; category = 'InvalidArgument'; reason = 'ProtocolError'; fqid = 'ProtocolError'; target = $null }
}

# New-SessionBrokenError says the Exchange session can no longer be used:
# easguard then replaces the worker (a new process, session, import and
# forest scope) and runs the request again.
function New-SessionBrokenError([string]$Message) {
    return [ordered]@{ message = $Message; category = 'ResourceUnavailable'; reason = 'SessionBroken'; fqid = 'SessionBroken'; target = $null }
}

# Get-SessionProblem returns why the remote Exchange session is unusable, or
# $null. After an app-pool recycle or iisreset the session turns Broken; an
# implicit-remoting proxy would then try to rebuild it by prompting for
# credentials, which fails under -NonInteractive, so no call is made on a
# session that is not Opened.
function Get-SessionProblem {
    if ($script:Mode -ne 'remote') { return $null }
    $s = $script:Session
    if ($null -eq $s) { return 'no Exchange session' }
    if ($s.State -ne 'Opened' -or $s.Availability -ne 'Available') {
        return "the Exchange session is $($s.State) ($($s.Availability))"
    }
    return $null
}

# Test-ExchangeSession is the heartbeat: it checks the session's state and
# makes one cheap call through it, which both proves the server still
# knows the session and keeps it from reaching its idle timeout.
function Test-ExchangeSession {
    $problem = Get-SessionProblem
    if ($null -ne $problem -or $script:Mode -ne 'remote') { return $problem }
    try {
        $null = Get-ActiveSyncOrganizationSettings -ErrorAction Stop -WarningAction SilentlyContinue
    }
    catch {
        $problem = Get-SessionProblem
        if ($null -eq $problem) { $problem = "the heartbeat call failed: $($_.Exception.Message)" }
    }
    return $problem
}

# ConvertFrom-WireValue turns a JSON parameter value into a typed value:
# strings, numbers and booleans as they are, arrays as string arrays, and
# {"Add":[..],"Remove":[..]} as the hashtable Exchange's multi-valued
# parameters take. Anything else is refused.
function ConvertFrom-WireValue($Value, [string]$Name) {
    if ($null -eq $Value) { return $null }
    if ($Value -is [string] -or $Value -is [bool] -or $Value -is [int] -or $Value -is [long] -or $Value -is [double] -or $Value -is [decimal]) { return $Value }
    if ($Value -is [array]) {
        $list = New-Object System.Collections.Generic.List[string]
        foreach ($item in $Value) {
            if ($null -ne $item -and -not ($item -is [string] -or $item -is [int] -or $item -is [long])) { throw "parameter ${Name}: arrays may hold only strings" }
            $list.Add([string]$item)
        }
        return , $list.ToArray()
    }
    if ($Value -is [System.Management.Automation.PSCustomObject]) {
        $ht = @{}
        foreach ($p in $Value.PSObject.Properties) {
            if ($p.Name -cne 'Add' -and $p.Name -cne 'Remove') { throw "parameter ${Name}: only Add and Remove may change a multi-valued parameter" }
            $list = New-Object System.Collections.Generic.List[string]
            foreach ($item in @($p.Value)) { if ($null -ne $item) { $list.Add([string]$item) } }
            $ht[$p.Name] = $list.ToArray()
        }
        return $ht
    }
    throw "parameter ${Name}: unsupported value"
}

function ConvertFrom-WireParams($Params) {
    $splat = @{}
    if ($null -eq $Params) { return $splat }
    foreach ($p in $Params.PSObject.Properties) {
        if ($p.Name -notmatch '^[A-Za-z][A-Za-z0-9]{0,63}$') { throw "invalid parameter name" }
        $splat[$p.Name] = ConvertFrom-WireValue $p.Value $p.Name
    }
    return $splat
}

# Invoke-Allowed runs one allow-listed cmdlet and returns its result. With
# Page > 0, objects are sent in page frames as they stream out of the
# pipeline, so a large result never becomes one giant frame.
#
# Warnings: an implicit-remoting proxy passes -WarningAction to the server,
# so SilentlyContinue would drop them there, before -WarningVariable could
# see them; Continue brings them back (Exchange's "only the first 1000 items
# are returned" must reach easguard) and 3>$null keeps them off stdout.
function Invoke-Allowed($Call, [long]$Id, [int]$Page) {
    $result = [ordered]@{ ok = $false; count = 0; objects = @(); errors = @(); warnings = @() }
    $name = [string]$Call.cmdlet
    if (-not $script:Allowed.ContainsKey($name)) {
        $result.errors = @(New-ProtocolError "cmdlet '$name' is not on the easguard allow-list")
        return $result
    }
    $canonical = $script:Allowed[$name]
    $select = $null
    $wanted = Get-WireField $Call 'select'
    if ($null -ne $wanted) { $select = @($wanted) }
    try {
        $splat = ConvertFrom-WireParams (Get-WireField $Call 'params')
    }
    catch {
        $result.errors = @(New-ProtocolError $_.Exception.Message)
        return $result
    }
    $problem = Get-SessionProblem
    if ($null -ne $problem) {
        $result.errors = @(New-SessionBrokenError $problem)
        return $result
    }
    $buffer = New-Object System.Collections.ArrayList
    $errs = New-Object System.Collections.ArrayList
    $warns = New-Object System.Collections.ArrayList
    $state = @{ count = 0; page = 0 }
    $cmdErrors = New-Object System.Collections.ArrayList
    $cmdWarnings = New-Object System.Collections.ArrayList
    try {
        $command = Get-Command -Name $canonical -CommandType 'Cmdlet', 'Function' -ErrorAction Stop
        if ($canonical -eq 'Get-Command' -and $null -ne $script:Module) { $splat['Module'] = $script:Module.Name }
        & $command @splat -ErrorAction Continue -ErrorVariable +cmdErrors -WarningAction Continue -WarningVariable +cmdWarnings 3>$null |
            ForEach-Object {
                [void]$buffer.Add((ConvertTo-WireObject $_ $select))
                $state.count++
                if ($Page -gt 0 -and $buffer.Count -ge $Page) {
                    Send-Frame ([ordered]@{ id = $Id; page = $state.page; objects = $buffer.ToArray() })
                    $state.page++
                    $buffer.Clear()
                }
            }
        foreach ($e in @($cmdErrors)) { if ($null -ne $e) { [void]$errs.Add((ConvertTo-WireError $e)) } }
        foreach ($w in @($cmdWarnings)) { if ($null -ne $w) { [void]$warns.Add([string]$w.Message) } }
    }
    catch {
        foreach ($e in @($cmdErrors)) { if ($null -ne $e -and $e -ne $_) { [void]$errs.Add((ConvertTo-WireError $e)) } }
        [void]$errs.Add((ConvertTo-WireError $_))
    }
    # A session that broke during the call makes its errors meaningless (or a
    # credential prompt); say so, so that easguard replaces the worker.
    $problem = Get-SessionProblem
    if ($null -ne $problem) { [void]$errs.Add((New-SessionBrokenError $problem)) }
    $result.ok = ($errs.Count -eq 0)
    $result.count = $state.count
    $result.objects = $buffer.ToArray()
    $result.errors = $errs.ToArray()
    $result.warnings = $warns.ToArray()
    return $result
}

function Close-Exchange {
    if ($null -ne $script:Session) { Remove-PSSession -Session $script:Session -ErrorAction SilentlyContinue }

# Connect-Exchange opens the explicit-credential remote session to the
# Exchange /PowerShell endpoint and imports only the allow-listed cmdlets,
# so Exchange's RBAC decides what is available. Loading the Exchange
# snap-in is not offered: over WinRS the snap-in's calls to Active
# Directory are a second hop that NTLM and Kerberos logons cannot make.
function Connect-Exchange($Req) {
    $names = [string[]]@($script:Allowed.Values | Where-Object { $_ -ne 'Get-Command' })
    $mode = [string](Get-RequiredField $Req 'mode')
    if ($mode -ne 'remote') { throw "connect: mode must be remote, not '$mode' (the Exchange snap-in cannot reach Active Directory over WinRM)" }
    $skipCA = [bool](Get-WireField $Req 'skip_ca_check' $false)
    $skipCN = [bool](Get-WireField $Req 'skip_cn_check' $false)
    $secure = ConvertTo-SecureString -String ([string](Get-RequiredField $Req 'password')) -AsPlainText -Force
    $cred = New-Object System.Management.Automation.PSCredential([string](Get-RequiredField $Req 'user'), $secure)
    Close-Exchange # a second connect replaces the session, never leaks it
    $options = New-PSSessionOption -SkipCACheck:$skipCA -SkipCNCheck:$skipCN -SkipRevocationCheck:$skipCA -Culture 'en-US' -UICulture 'en-US' -IdleTimeout 120000
    $script:Session = New-PSSession -ConfigurationName Microsoft.Exchange -ConnectionUri ([string](Get-RequiredField $Req 'uri')) -Credential $cred -Authentication ([string](Get-RequiredField $Req 'auth')) -SessionOption $options -ErrorAction Stop
    $script:Module = Import-PSSession -Session $script:Session -CommandName $names -DisableNameChecking -AllowClobber -ErrorAction Stop -WarningAction SilentlyContinue
    $script:Mode = $mode
    Set-ADServerSettings -ViewEntireForest $true
    $available = @(Get-Command -Name $names -ErrorAction SilentlyContinue | ForEach-Object { $_.Name })
    return [ordered]@{ mode = $script:Mode; cmdlets = $available; idle_timeout_ms = $script:IdleTimeoutMs }
}

    $script:Session = $null
}

Send-Frame ([ordered]@{ id = 0; done = $true; ok = $true; op = 'ready'; protocol = $script:ProtocolVersion; ps = $PSVersionTable.PSVersion.ToString(); pid = $PID; host = [Environment]::MachineName })

try {
    while ($true) {
        $line = $In.ReadLine()
        if ($null -eq $line) { break }
        $line = $line.Trim()
        if ($line.Length -eq 0) { continue }
        $id = 0
        try {
            $req = ConvertFrom-Json -InputObject ([System.Text.Encoding]::UTF8.GetString([Convert]::FromBase64String($line)))
            $id = [long]$req.id
            if ([int]$req.v -ne $script:ProtocolVersion) { throw "protocol version $($req.v) is not $($script:ProtocolVersion)" }
        }
        catch {
            Send-Frame ([ordered]@{ id = $id; done = $true; ok = $false; errors = @(New-ProtocolError "bad request frame: $($_.Exception.Message)") })
            continue
        }
        try {
            switch ([string]$req.op) {
                'ping' {
                    $problem = Test-ExchangeSession
                    if ($null -eq $problem) { Send-Frame ([ordered]@{ id = $id; done = $true; ok = $true }) }
                    else { Send-Frame ([ordered]@{ id = $id; done = $true; ok = $false; errors = @(New-SessionBrokenError $problem) }) }
                }
                'connect' {
                    $info = Connect-Exchange $req
                    Send-Frame ([ordered]@{ id = $id; done = $true; ok = $true; objects = @($info) })
                }
                'invoke' {
                    $page = [int](Get-WireField $req 'page' 0)
                    $r = Invoke-Allowed (Get-RequiredField $req 'call') $id $page
                    Send-Frame ([ordered]@{ id = $id; done = $true; ok = $r.ok; count = $r.count; objects = $r.objects; errors = $r.errors; warnings = $r.warnings })
                }
                'batch' {
                    $results = New-Object System.Collections.ArrayList
                    $ok = $true
                    foreach ($call in @(Get-WireField $req 'calls' @())) {
                        $r = Invoke-Allowed $call $id 0
                        if (-not $r.ok) { $ok = $false }
                        [void]$results.Add($r)
                    }
                    Send-Frame ([ordered]@{ id = $id; done = $true; ok = $ok; results = $results.ToArray() })
                }
                'bye' {
                    Close-Exchange
                    Send-Frame ([ordered]@{ id = $id; done = $true; ok = $true })
                    exit 0
                }
                default { Send-Frame ([ordered]@{ id = $id; done = $true; ok = $false; errors = @(New-ProtocolError "unknown op '$($req.op)'") }) }
            }
        }
        catch {
            Send-Frame ([ordered]@{ id = $id; done = $true; ok = $false; errors = @(ConvertTo-WireError $_) })
        }
    }
}
finally {
    # Stdin closed, an exception, or Ctrl+C: the Exchange session must not
    # outlive this process and count against the user's session limit.
    Close-Exchange
}
exit 0
