# easguard Exchange worker, frame protocol v1 (PROTOCOL.md next to this file).
#
# Runs inside one long-lived powershell.exe on a Windows host that easguard
# reaches over WinRM. It reads one request per line from stdin and answers
# with framed lines on stdout. It never turns data into code: a request
# names a cmdlet from the allow-list below and carries its parameters as
# JSON data, which are converted to typed values and splatted.
param([System.IO.StreamReader]$In)

Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'

$script:ProtocolVersion = 1
$script:Sentinel = 'EGF1 '

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

# ConvertTo-Wire turns one property value into JSON-ready data with explicit
# conversions: dates to ISO 8601 UTC, enums to their names, multi-valued
# properties to arrays, identities and anything else to strings.
function ConvertTo-Wire($Value, [int]$Depth) {
    if ($null -eq $Value) { return $null }
    if ($Value -is [string] -or $Value -is [bool]) { return $Value }
    if ($Value -is [datetime]) { return $Value.ToUniversalTime().ToString('yyyy-MM-ddTHH:mm:ss.fffffffZ', [Globalization.CultureInfo]::InvariantCulture) }
    if ($Value -is [enum]) { return $Value.ToString() }
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
function Invoke-Allowed($Call, [long]$Id, [int]$Page) {
    $result = [ordered]@{ ok = $false; count = 0; objects = @(); errors = @(); warnings = @() }
    $name = [string]$Call.cmdlet
    if (-not $script:Allowed.ContainsKey($name)) {
        $result.errors = @(New-ProtocolError "cmdlet '$name' is not on the easguard allow-list")
        return $result
    }
    $canonical = $script:Allowed[$name]
    $select = $null
    if ($null -ne $Call.PSObject.Properties['select'] -and $null -ne $Call.select) { $select = @($Call.select) }
    try {
        $splat = ConvertFrom-WireParams $Call.params
    }
    catch {
        $result.errors = @(New-ProtocolError $_.Exception.Message)
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
        & $command @splat -ErrorAction Continue -ErrorVariable +cmdErrors -WarningAction SilentlyContinue -WarningVariable +cmdWarnings |
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
    $result.ok = ($errs.Count -eq 0)
    $result.count = $state.count
    $result.objects = $buffer.ToArray()
    $result.errors = $errs.ToArray()
    $result.warnings = $warns.ToArray()
    return $result
}

function Connect-Exchange($Req) {
    $names = [string[]]@($script:Allowed.Values | Where-Object { $_ -ne 'Get-Command' })
    switch ([string]$Req.mode) {
        'snapin' {
            Add-PSSnapin Microsoft.Exchange.Management.PowerShell.SnapIn -ErrorAction SilentlyContinue
            if (-not (Get-PSSnapin Microsoft.Exchange.Management.PowerShell.SnapIn -ErrorAction SilentlyContinue)) {
                Add-PSSnapin Microsoft.Exchange.Management.PowerShell.E2010 -ErrorAction Stop
            }
        }
        'remote' {
            $secure = ConvertTo-SecureString -String ([string]$Req.password) -AsPlainText -Force
            $cred = New-Object System.Management.Automation.PSCredential([string]$Req.user, $secure)
            $options = New-PSSessionOption -SkipCACheck:([bool]$Req.skip_ca_check) -SkipCNCheck:([bool]$Req.skip_cn_check) -SkipRevocationCheck:([bool]$Req.skip_ca_check)
            $script:Session = New-PSSession -ConfigurationName Microsoft.Exchange -ConnectionUri ([string]$Req.uri) -Credential $cred -Authentication ([string]$Req.auth) -SessionOption $options -ErrorAction Stop
            $script:Module = Import-PSSession -Session $script:Session -CommandName $names -DisableNameChecking -AllowClobber -ErrorAction Stop -WarningAction SilentlyContinue
        }
        default { throw "connect: mode must be snapin or remote" }
    }
    $script:Mode = [string]$Req.mode
    Set-ADServerSettings -ViewEntireForest $true
    $available = @(Get-Command -Name $names -ErrorAction SilentlyContinue | ForEach-Object { $_.Name })
    return [ordered]@{ mode = $script:Mode; cmdlets = $available }
}

Send-Frame ([ordered]@{ id = 0; done = $true; ok = $true; op = 'ready'; protocol = $script:ProtocolVersion; ps = $PSVersionTable.PSVersion.ToString(); pid = $PID; host = [Environment]::MachineName })

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
            'ping' { Send-Frame ([ordered]@{ id = $id; done = $true; ok = $true }) }
            'connect' {
                $info = Connect-Exchange $req
                Send-Frame ([ordered]@{ id = $id; done = $true; ok = $true; objects = @($info) })
            }
            'invoke' {
                $page = 0
                if ($null -ne $req.PSObject.Properties['page']) { $page = [int]$req.page }
                $r = Invoke-Allowed $req.call $id $page
                Send-Frame ([ordered]@{ id = $id; done = $true; ok = $r.ok; count = $r.count; objects = $r.objects; errors = $r.errors; warnings = $r.warnings })
            }
            'batch' {
                $results = New-Object System.Collections.ArrayList
                $ok = $true
                foreach ($call in @($req.calls)) {
                    $r = Invoke-Allowed $call $id 0
                    if (-not $r.ok) { $ok = $false }
                    [void]$results.Add($r)
                }
                Send-Frame ([ordered]@{ id = $id; done = $true; ok = $ok; results = $results.ToArray() })
            }
            'bye' {
                if ($null -ne $script:Session) { Remove-PSSession -Session $script:Session -ErrorAction SilentlyContinue }
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
if ($null -ne $script:Session) { Remove-PSSession -Session $script:Session -ErrorAction SilentlyContinue }
exit 0
