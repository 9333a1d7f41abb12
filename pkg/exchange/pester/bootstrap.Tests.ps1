# Pester 5 tests of pkg/exchange/bootstrap.ps1 under Windows PowerShell 5.1:
# powershell.exe started exactly as exchange.CommandLine() starts it
# (-NoLogo -NoProfile -NonInteractive -ExecutionPolicy Bypass
# -EncodedCommand <the bootstrap with the worker's SHA-256>), fed on stdin
# as easguard feeds it (the worker script in base64, then request lines).
# No stubs: the real worker answers ping and bye without an Exchange
# session.
#
# Run: powershell.exe -NoProfile -ExecutionPolicy Bypass -File pkg\exchange\pester\run.ps1

BeforeAll {
    . (Join-Path $PSScriptRoot 'Helpers.ps1')
    $workerBytes = [System.IO.File]::ReadAllBytes($global:EasguardPester.Worker)
}

Describe 'bootstrap.ps1' {

    It 'runs the worker whose SHA-256 it carries, with the same stdin' {
        $run = Invoke-Bootstrap -EncodedCommand (Get-WorkerCommand) -Lines @(
            (Get-ScriptLine $workerBytes),
            (ConvertTo-RequestLine ([ordered]@{ id = 1; op = 'ping' })),
            (ConvertTo-RequestLine ([ordered]@{ id = 2; op = 'bye' }))
        )
        $run.Other | Should -BeNullOrEmpty
        $run.Stderr | Should -BeNullOrEmpty
        $ready = $run.Frames[0].Value
        $ready.id | Should -Be 0
        $ready.op | Should -BeExactly 'ready'
        $ready.ps | Should -Match '^5\.1\.'
        (Get-Final $run 1).ok | Should -BeTrue
        (Get-Final $run 2).ok | Should -BeTrue
        $run.ExitCode | Should -Be 0
    }

    It 'refuses a script whose SHA-256 differs, with its EGF1-FATAL line and exit code 3, before running any of it' {
        $marker = Join-Path $TestDrive 'tampered-script-ran.txt'
        $tampered = [System.Text.Encoding]::UTF8.GetBytes("[System.IO.File]::WriteAllText('$marker', 'ran')`n") + $workerBytes
        $run = Invoke-Bootstrap -EncodedCommand (Get-WorkerCommand) -Lines @(
            (Get-ScriptLine $tampered),
            (ConvertTo-RequestLine ([ordered]@{ id = 1; op = 'ping' }))
        )
        $run.ExitCode | Should -Be 3
        (@($run.Other) -join '|') | Should -BeExactly 'EGF1-FATAL worker script hash mismatch'
        @($run.Frames).Count | Should -Be 0
        Test-Path -LiteralPath $marker | Should -BeFalse
    }

    It 'refuses to run in Constrained Language Mode, with its EGF1-FATAL line and exit code 4' {
        # The language mode is set in the same powershell.exe before the
        # bootstrap runs, as an AppLocker or WDAC policy would have it.
        $prefix = "`$ExecutionContext.SessionState.LanguageMode = 'ConstrainedLanguage'`n"
        $run = Invoke-Bootstrap -EncodedCommand (Get-WorkerCommand -Prefix $prefix) -Lines @(
            (Get-ScriptLine $workerBytes),
            (ConvertTo-RequestLine ([ordered]@{ id = 1; op = 'ping' }))
        )
        $run.ExitCode | Should -Be 4
        (@($run.Other) -join '|') | Should -BeExactly 'EGF1-FATAL language mode: PowerShell on this host runs in ConstrainedLanguage mode (AppLocker or WDAC); the easguard worker needs FullLanguage for the service account'
        @($run.Frames).Count | Should -Be 0
    }

    It 'is refused by Constrained Language Mode only because of the mode: the same prefix with FullLanguage starts the worker' {
        $prefix = "`$ExecutionContext.SessionState.LanguageMode = 'FullLanguage'`n"
        $run = Invoke-Bootstrap -EncodedCommand (Get-WorkerCommand -Prefix $prefix) -Lines @(
            (Get-ScriptLine $workerBytes),
            (ConvertTo-RequestLine ([ordered]@{ id = 1; op = 'bye' }))
        )
        $run.Other | Should -BeNullOrEmpty
        (Get-Final $run 1).ok | Should -BeTrue
        $run.ExitCode | Should -Be 0
    }
}
