# Runs the real worker.ps1 in this powershell.exe the way the bootstrap
# does: with a StreamReader of request lines as -In, writing its frames to
# this process's stdout. The Pester tests start this script in a child
# powershell.exe (Invoke-WorkerScenario in Helpers.ps1) with stdout
# redirected, and read the frames from there.
#
# Before the worker starts it loads the stubs (Stubs.ps1), then the test's
# setup script (-Setup), then sets the thread culture (-Culture, to show
# that the worker pins its own). The requests come from a file of request
# lines (base64 of UTF-8 JSON, one a line, as exchange.EncodeRequest writes
# them) read into a MemoryStream: its end is the end of stdin. The stubs'
# log goes to -Log; this script writes nothing to stdout itself.
#
# Exit code: the worker's (its exit 0), or 99 if an error escaped it.
param(
    [Parameter(Mandatory = $true)][string]$Worker,
    [Parameter(Mandatory = $true)][string]$Requests,
    [Parameter(Mandatory = $true)][string]$Log,
    [string]$Setup = '',
    [string]$Culture = ''
)

$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$global:StubLogPath = $Log

. (Join-Path $PSScriptRoot 'Stubs.ps1')
if ($Setup -ne '') { . $Setup }

if ($Culture -ne '') {
    $c = [System.Globalization.CultureInfo]::GetCultureInfo($Culture)
    [System.Threading.Thread]::CurrentThread.CurrentCulture = $c
    [System.Threading.Thread]::CurrentThread.CurrentUICulture = $c
}
Write-StubLog ([ordered]@{
        ev        = 'start'
        culture   = [System.Threading.Thread]::CurrentThread.CurrentCulture.Name
        uiculture = [System.Threading.Thread]::CurrentThread.CurrentUICulture.Name
    })

$bytes = [System.IO.File]::ReadAllBytes($Requests)
$stream = New-Object System.IO.MemoryStream -ArgumentList (, $bytes)
$reader = New-Object System.IO.StreamReader -ArgumentList $stream, (New-Object System.Text.UTF8Encoding $false)

$code = 0
try {
    & $Worker -In $reader
    $code = $LASTEXITCODE
}
catch {
    Write-StubLog ([ordered]@{ ev = 'escaped'; message = $_.Exception.Message; fqid = $_.FullyQualifiedErrorId })
    $code = 99
}
Write-StubLog ([ordered]@{ ev = 'end'; code = $code })
exit $code
