if($ExecutionContext.SessionState.LanguageMode -ne 'FullLanguage'){Write-Output ('EGF1-FATAL language mode: PowerShell on this host runs in '+$ExecutionContext.SessionState.LanguageMode+' mode (AppLocker or WDAC); the easguard worker needs FullLanguage for the service account');exit 4}
$ErrorActionPreference='Stop';$ProgressPreference='SilentlyContinue'
$i=New-Object IO.StreamReader([Console]::OpenStandardInput(),(New-Object Text.UTF8Encoding $false))
$b=[Convert]::FromBase64String($i.ReadLine())
$h=-join([Security.Cryptography.SHA256]::Create().ComputeHash($b)|ForEach-Object{$_.ToString('x2')})
if($h -ne '@@SHA256@@'){[Console]::Out.WriteLine('EGF1-FATAL worker script hash mismatch');exit 3}
&([ScriptBlock]::Create([Text.Encoding]::UTF8.GetString($b))) $i
