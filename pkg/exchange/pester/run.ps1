# Runs the Pester tests of worker.ps1 and bootstrap.ps1. Windows only, and
# under Windows PowerShell 5.1, the PowerShell the workers run in:
#
#   powershell.exe -NoProfile -ExecutionPolicy Bypass -File pkg\exchange\pester\run.ps1 [-ResultPath results.xml]
#
# Needs Pester 5 (Windows ships 3.4):
#   Install-Module Pester -MinimumVersion 5 -MaximumVersion 5.99.99 -Force -SkipPublisherCheck -Scope CurrentUser
# The tests start further powershell.exe processes themselves, so they test
# Windows PowerShell 5.1 even when Pester runs elsewhere; this script insists
# on it anyway, so that a run says plainly what it ran under.
param([string]$ResultPath = '')

$ErrorActionPreference = 'Stop'
if ($PSVersionTable.PSEdition -ne 'Desktop' -or $PSVersionTable.PSVersion.Major -ne 5) {
    throw "run these tests with powershell.exe (Windows PowerShell 5.1), not PowerShell $($PSVersionTable.PSVersion)"
}
Import-Module Pester -MinimumVersion 5.0.0 -ErrorAction Stop
Write-Host "Windows PowerShell $($PSVersionTable.PSVersion), Pester $((Get-Module Pester).Version)"

$config = New-PesterConfiguration
$config.Run.Path = $PSScriptRoot
$config.Run.Exit = $true
$config.Output.Verbosity = 'Detailed'
if ($ResultPath -ne '') {
    $config.TestResult.Enabled = $true
    $config.TestResult.OutputFormat = 'NUnitXml'
    $config.TestResult.OutputPath = $ResultPath
}
Invoke-Pester -Configuration $config
