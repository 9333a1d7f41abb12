# Helpers of the Pester tests of worker.ps1 and bootstrap.ps1: they start
# Windows PowerShell 5.1 (powershell.exe, whoever runs Pester) in a child
# process, feed it requests, and decode what it writes on stdout.

# Global, so that the helpers find these wherever Pester runs them.
$global:EasguardPester = @{
    Dir               = $PSScriptRoot
    Worker            = (Resolve-Path (Join-Path $PSScriptRoot '..\worker.ps1')).Path
    Bootstrap         = (Resolve-Path (Join-Path $PSScriptRoot '..\bootstrap.ps1')).Path
    WindowsPowerShell = (Join-Path $env:SystemRoot 'System32\WindowsPowerShell\v1.0\powershell.exe')
}

# ConvertTo-RequestLine encodes a request as exchange.EncodeRequest does:
# base64 of the UTF-8 JSON, with "v":1 unless -NoVersion.
function ConvertTo-RequestLine {
    param([Parameter(Mandatory = $true)][System.Collections.IDictionary]$Request, [switch]$NoVersion)
    $r = [ordered]@{}
    if (-not $NoVersion) { $r['v'] = 1 }
    foreach ($k in $Request.Keys) { $r[$k] = $Request[$k] }
    $json = ConvertTo-Json -InputObject $r -Compress -Depth 10
    return [Convert]::ToBase64String([System.Text.Encoding]::UTF8.GetBytes($json))
}

# Invoke-PowerShellProcess starts powershell.exe with these arguments,
# writes $Stdin to its stdin (then closes it), and returns its exit code,
# stdout and stderr. A child that does not exit within the timeout is
# killed and the test fails with what it wrote.
function Invoke-PowerShellProcess {
    param([string[]]$Arguments, [string]$Stdin = '', [int]$TimeoutSeconds = 120)
    $psi = New-Object System.Diagnostics.ProcessStartInfo
    $psi.FileName = $global:EasguardPester.WindowsPowerShell
    $psi.Arguments = ($Arguments | ForEach-Object { if ($_ -match '[\s"]') { '"' + $_ + '"' } else { $_ } }) -join ' '
    $psi.UseShellExecute = $false
    $psi.CreateNoWindow = $true
    $psi.RedirectStandardInput = $true
    $psi.RedirectStandardOutput = $true
    $psi.RedirectStandardError = $true
    $psi.StandardOutputEncoding = New-Object System.Text.UTF8Encoding $false
    $psi.StandardErrorEncoding = New-Object System.Text.UTF8Encoding $false
    $p = [System.Diagnostics.Process]::Start($psi)
    try {
        $out = $p.StandardOutput.ReadToEndAsync()
        $err = $p.StandardError.ReadToEndAsync()
        $stdinError = $null
        if ($Stdin.Length -gt 0) {
            $bytes = [System.Text.Encoding]::ASCII.GetBytes($Stdin)
            $write = $p.StandardInput.BaseStream.WriteAsync($bytes, 0, $bytes.Length)
            $written = $false
            try { $written = $write.Wait($TimeoutSeconds * 1000) }
            catch {
                # The child may exit before it reads everything (a refusal):
                # the write fails with a broken pipe.
                $written = $true
                $stdinError = $_.Exception.Message
            }
            if (-not $written) {
                $p.Kill()
                $p.WaitForExit()
                throw "powershell.exe did not read its stdin within $TimeoutSeconds s; stdout: $($out.Result); stderr: $($err.Result)"
            }
        }
        try { $p.StandardInput.Close() } catch { if ($null -eq $stdinError) { $stdinError = $_.Exception.Message } }
        if (-not $p.WaitForExit($TimeoutSeconds * 1000)) {
            $p.Kill()
            $p.WaitForExit()
            throw "powershell.exe did not exit within $TimeoutSeconds s; stdout: $($out.Result); stderr: $($err.Result)"
        }
        $p.WaitForExit() # lets the asynchronous reads finish
        return [pscustomobject]@{ ExitCode = $p.ExitCode; Stdout = $out.Result; Stderr = $err.Result; StdinError = $stdinError }
    }
    finally {
        $p.Dispose()
    }
}

# Read-Frames splits stdout into frames (EGF1 lines, decoded) and any other
# non-blank lines, which must not be there: easguard ignores them, but the
# worker promises to write nothing else.
function Read-Frames {
    param([string]$Stdout)
    $frames = New-Object System.Collections.ArrayList
    $other = New-Object System.Collections.ArrayList
    foreach ($raw in ($Stdout -split "`n")) {
        $line = $raw.TrimEnd("`r")
        if ($line.Trim().Length -eq 0) { continue }
        if ($line.StartsWith('EGF1 ')) {
            $json = [System.Text.Encoding]::UTF8.GetString([Convert]::FromBase64String($line.Substring(5)))
            [void]$frames.Add([pscustomobject]@{ Json = $json; Value = (ConvertFrom-Json -InputObject $json) })
        }
        else {
            [void]$other.Add($line)
        }
    }
    return [pscustomobject]@{ Frames = $frames.ToArray(); Other = $other.ToArray() }
}

# Invoke-WorkerScenario runs the real worker.ps1 through Harness.ps1 in a
# child powershell.exe. Requests are hashtables (encoded with
# ConvertTo-RequestLine) or ready request lines. -Setup is a script block
# whose text the harness dot-sources after the stubs, before the worker
# starts (to replace a stub or change the stubs' state). Returns the exit
# code, the frames, any other stdout lines, stderr and the stubs' log.
function Invoke-WorkerScenario {
    param([object[]]$Requests, [scriptblock]$Setup = $null, [string]$Culture = '')
    $dir = Join-Path $TestDrive ([guid]::NewGuid().ToString('n'))
    [void](New-Item -ItemType Directory -Path $dir)
    $requestFile = Join-Path $dir 'requests.txt'
    $logFile = Join-Path $dir 'stub-log.jsonl'
    $text = New-Object System.Text.StringBuilder
    foreach ($r in $Requests) {
        if ($r -is [string]) { [void]$text.Append($r).Append("`n") }
        else { [void]$text.Append((ConvertTo-RequestLine $r)).Append("`n") }
    }
    [System.IO.File]::WriteAllText($requestFile, $text.ToString(), [System.Text.Encoding]::ASCII)
    $arguments = @('-NoLogo', '-NoProfile', '-NonInteractive', '-ExecutionPolicy', 'Bypass',
        '-File', (Join-Path $global:EasguardPester.Dir 'Harness.ps1'),
        '-Worker', $global:EasguardPester.Worker, '-Requests', $requestFile, '-Log', $logFile)
    if ($null -ne $Setup) {
        $setupFile = Join-Path $dir 'setup.ps1'
        [System.IO.File]::WriteAllText($setupFile, $Setup.ToString(), (New-Object System.Text.UTF8Encoding $true))
        $arguments += @('-Setup', $setupFile)
    }
    if ($Culture -ne '') { $arguments += @('-Culture', $Culture) }
    $run = Invoke-PowerShellProcess -Arguments $arguments
    $read = Read-Frames $run.Stdout
    $log = @()
    if (Test-Path $logFile) {
        $log = @(Get-Content -LiteralPath $logFile -Encoding UTF8 | Where-Object { $_.Trim().Length -gt 0 } | ForEach-Object { ConvertFrom-Json -InputObject $_ })
    }
    return [pscustomobject]@{
        ExitCode = $run.ExitCode
        Frames   = $read.Frames
        Other    = $read.Other
        Stdout   = $run.Stdout
        Stderr   = $run.Stderr
        Log      = $log
    }
}

# Get-Final returns the final frame (done) of request $Id, as decoded JSON.
function Get-Final {
    param($Run, [long]$Id)
    $found = @($Run.Frames | Where-Object { $_.Value.id -eq $Id -and $_.Value.done -eq $true })
    if ($found.Count -ne 1) { throw "request $Id has $($found.Count) final frames; stdout: $($Run.Stdout) stderr: $($Run.Stderr)" }
    return $found[0].Value
}

# Get-FinalJson returns the final frame of request $Id as the JSON text the
# worker wrote (for checks of exact value forms such as dates).
function Get-FinalJson {
    param($Run, [long]$Id)
    $found = @($Run.Frames | Where-Object { $_.Value.id -eq $Id -and $_.Value.done -eq $true })
    if ($found.Count -ne 1) { throw "request $Id has $($found.Count) final frames" }
    return $found[0].Json
}

# Get-Calls returns the logged calls of one stub Exchange cmdlet.
function Get-Calls {
    param($Run, [string]$Cmdlet)
    return @($Run.Log | Where-Object { $_.ev -eq 'call' -and $_.cmdlet -eq $Cmdlet })
}

# Get-LogEvents returns the log entries of one kind (New-PSSession, ...).
function Get-LogEvents {
    param($Run, [string]$Kind)
    return @($Run.Log | Where-Object { $_.ev -eq $Kind })
}

# Get-ConnectRequest is a connect request as easguard sends it with
# certificate checks on: skip_ca_check and skip_cn_check are omitted.
function Get-ConnectRequest {
    param([long]$Id)
    return [ordered]@{ id = $Id; op = 'connect'; mode = 'remote'; uri = 'https://ex01.contoso.com/PowerShell/'; auth = 'Basic'; user = 'CONTOSO\svc-easguard'; password = 'Pa$$w0rd"`;' }
}

# Get-WorkerCommand returns the bootstrap as exchange.Bootstrap() makes it
# (its placeholder replaced by the SHA-256 of worker.ps1's bytes) encoded
# for -EncodedCommand as exchange.EncodeCommand does, optionally after a
# prefix (a statement run before the bootstrap).
function Get-WorkerCommand {
    param([string]$Prefix = '')
    $bytes = [System.IO.File]::ReadAllBytes($global:EasguardPester.Worker)
    $sha = New-Object System.Security.Cryptography.SHA256Managed
    $hash = -join ($sha.ComputeHash($bytes) | ForEach-Object { $_.ToString('x2') })
    $bootstrap = [System.IO.File]::ReadAllText($global:EasguardPester.Bootstrap).Replace('@@SHA256@@', $hash)
    return [Convert]::ToBase64String([System.Text.Encoding]::Unicode.GetBytes($Prefix + $bootstrap))
}

# Get-ScriptLine is the first stdin line easguard sends: the script in base64.
function Get-ScriptLine {
    param([byte[]]$Bytes)
    return [Convert]::ToBase64String($Bytes)
}

# Invoke-Bootstrap starts powershell.exe exactly as exchange.CommandLine()
# does and writes these stdin lines.
function Invoke-Bootstrap {
    param([string]$EncodedCommand, [string[]]$Lines)
    $stdin = ($Lines | ForEach-Object { $_ + "`n" }) -join ''
    $run = Invoke-PowerShellProcess -Arguments @('-NoLogo', '-NoProfile', '-NonInteractive', '-ExecutionPolicy', 'Bypass', '-EncodedCommand', $EncodedCommand) -Stdin $stdin
    $read = Read-Frames $run.Stdout
    return [pscustomobject]@{ ExitCode = $run.ExitCode; Frames = $read.Frames; Other = $read.Other; Stdout = $run.Stdout; Stderr = $run.Stderr }
}
