# Pester 5 tests of pkg/exchange/worker.ps1 under Windows PowerShell 5.1.
#
# Each context starts the real worker script in a child powershell.exe
# (Harness.ps1) with stub remoting and Exchange cmdlets (Stubs.ps1) that
# return objects as an implicit-remoting session returns them, feeds it
# request lines as easguard encodes them, and checks the frames it writes on
# stdout and what the stubs were called with. The numbers refer to the items
# of issue 9; each checks on Windows what tests/exchangesim models.
#
# Run: powershell.exe -NoProfile -ExecutionPolicy Bypass -File pkg\exchange\pester\run.ps1

BeforeAll {
    . (Join-Path $PSScriptRoot 'Helpers.ps1')
    $TruncationWarning = 'By default, only the first 1000 items are returned. Use the ResultSize parameter to specify the number of items returned. To return all items, specify "-ResultSize Unlimited". Be aware that, depending on the actual number of items, returning all items can take a long time and consume a large amount of memory. Also, we don''t recommend storing the results in a variable. Instead, pipe the results to another task or script to perform batch changes.'
}

Describe 'worker.ps1' {

    Context 'strict mode meets omitted fields (item 1)' {
        BeforeAll {
            $run = Invoke-WorkerScenario -Requests @(
                [ordered]@{ id = 1; op = 'ping' },
                (Get-ConnectRequest 2),
                [ordered]@{ id = 3; op = 'invoke'; call = [ordered]@{ cmdlet = 'Get-ExchangeServer' } },
                [ordered]@{ id = 4; op = 'invoke'; call = [ordered]@{ select = @('Name') } },
                [ordered]@{ id = 5; op = 'batch'; calls = @([ordered]@{ cmdlet = 'Get-ExchangeServer' }, [ordered]@{ cmdlet = 'Get-ActiveSyncOrganizationSettings' }) },
                [ordered]@{ id = 6; op = 'invoke'; call = [ordered]@{ cmdlet = 'Get-ExchangeServer'; select = @('Name', 'Fqdn') } }
            )
        }

        It 'writes nothing but frames on stdout, and nothing on stderr' {
            $run.Other | Should -BeNullOrEmpty
            $run.Stderr | Should -BeNullOrEmpty
        }

        It 'starts with the ready frame of Windows PowerShell 5.1' {
            $ready = $run.Frames[0].Value
            $ready.id | Should -Be 0
            $ready.op | Should -BeExactly 'ready'
            $ready.protocol | Should -Be 1
            $ready.ps | Should -Match '^5\.1\.'
        }

        It 'answers a ping before connect without calling Exchange' {
            (Get-Final $run 1).ok | Should -BeTrue
            # The one call is the batch's (request 5).
            @(Get-Calls $run 'Get-ActiveSyncOrganizationSettings').Count | Should -Be 1
        }

        It 'connects when skip_ca_check and skip_cn_check are omitted' {
            $f = Get-Final $run 2
            $f.ok | Should -BeTrue
            $f.objects[0].mode | Should -BeExactly 'remote'
            $f.objects[0].idle_timeout_ms | Should -Be 120000
            $f.objects[0].cmdlets | Should -Contain 'Get-MobileDevice'
            $f.objects[0].cmdlets | Should -Not -Contain 'Get-Command'
            $o = @(Get-LogEvents $run 'New-PSSessionOption')
            @($o).Count | Should -Be 1
            $o[0].SkipCACheck | Should -BeFalse
            $o[0].SkipCNCheck | Should -BeFalse
            $o[0].SkipRevocationCheck | Should -BeFalse
        }

        It 'opens the session with the connect request''s settings and imports only allow-listed cmdlets' {
            $s = @(Get-LogEvents $run 'New-PSSession')
            @($s).Count | Should -Be 1
            $s[0].ConfigurationName | Should -BeExactly 'Microsoft.Exchange'
            $s[0].ConnectionUri | Should -BeExactly 'https://ex01.contoso.com/PowerShell/'
            $s[0].Authentication | Should -BeExactly 'Basic'
            $s[0].User | Should -BeExactly 'CONTOSO\svc-easguard'
            $s[0].Password | Should -BeExactly 'Pa$$w0rd"`;'
            $s[0].ErrorAction | Should -BeExactly 'Stop'
            $i = @(Get-LogEvents $run 'Import-PSSession')
            @($i).Count | Should -Be 1
            $i[0].CommandName | Should -Contain 'Set-CASMailbox'
            $i[0].CommandName | Should -Contain 'Get-MobileDevice'
            $i[0].CommandName | Should -Not -Contain 'Get-Command'
        }

        It 'sets the forest-wide scope after connecting' {
            $c = @(Get-Calls $run 'Set-ADServerSettings')
            @($c).Count | Should -Be 1
            $c[0].params.ViewEntireForest | Should -BeTrue
        }

        It 'runs a call that has neither params nor select' {
            $f = Get-Final $run 3
            $f.ok | Should -BeTrue
            $f.count | Should -Be 1
            $f.objects[0].Name | Should -BeExactly 'EX01'
            $f.objects[0].Fqdn | Should -BeExactly 'ex01.contoso.com'
        }

        It 'leaves out the properties remoting adds' {
            $names = @((Get-Final $run 3).objects[0].PSObject.Properties | ForEach-Object { $_.Name })
            $names | Should -Not -Contain 'PSComputerName'
            $names | Should -Not -Contain 'RunspaceId'
            $names | Should -Not -Contain 'PSShowComputerName'
        }

        It 'fails a call without its cmdlet with strict mode''s PropertyNotFoundException, as the simulator models' {
            $f = Get-Final $run 4
            $f.ok | Should -BeFalse
            @($f.errors).Count | Should -Be 1
            $f.errors[0].reason | Should -BeExactly 'PropertyNotFoundException'
            $f.errors[0].fqid | Should -BeExactly 'PropertyNotFoundStrict'
            $f.errors[0].category | Should -BeExactly 'NotSpecified'
            $f.errors[0].message | Should -BeExactly "The property 'cmdlet' cannot be found on this object. Verify that the property exists."
        }

        It 'runs a batch of parameterless calls' {
            $f = Get-Final $run 5
            $f.ok | Should -BeTrue
            @($f.results).Count | Should -Be 2
            $f.results[0].ok | Should -BeTrue
            $f.results[1].ok | Should -BeTrue
            $f.results[1].objects[0].DefaultAccessLevel | Should -BeExactly 'Quarantine'
        }

        It 'sends only the selected properties' {
            $names = @((Get-Final $run 6).objects[0].PSObject.Properties | ForEach-Object { $_.Name })
            @($names).Count | Should -Be 2
            $names | Should -Contain 'Name'
            $names | Should -Contain 'Fqdn'
        }

        It 'removes the session when stdin ends, and exits 0' {
            @(Get-LogEvents $run 'Remove-PSSession').Count | Should -Be 1
            $run.ExitCode | Should -Be 0
            @(Get-LogEvents $run 'escaped').Count | Should -Be 0
        }
    }

    Context 'enums arrive as numbers (item 2)' {
        BeforeAll {
            $run = Invoke-WorkerScenario -Setup {
                # The fixture itself: what the stub's remoting round trip
                # makes of an enum, logged from the process the worker runs in.
                $v = (ConvertTo-RemotingObject (New-StubDevice -DeviceId 'probe' -State 'Quarantined')).DeviceAccessState
                Write-StubLog ([ordered]@{
                        ev               = 'shape'
                        isEnum           = ($v -is [enum])
                        isInt            = ($v -is [int])
                        deserializedEnum = ($v.pstypenames -contains 'Deserialized.System.Enum')
                        number           = [int]$v
                        text             = $v.ToString()
                    })
            } -Requests @(
                [ordered]@{ id = 1; op = 'connect'; mode = 'remote'; uri = 'https://ex01.contoso.com/PowerShell/'; auth = 'Negotiate'; user = 'CONTOSO\svc-easguard'; password = 'x'; skip_ca_check = $true; skip_cn_check = $true },
                [ordered]@{ id = 2; op = 'invoke'; call = [ordered]@{ cmdlet = 'Get-MobileDevice'; params = [ordered]@{ ResultSize = 'Unlimited' } } },
                [ordered]@{ id = 3; op = 'invoke'; call = [ordered]@{ cmdlet = 'Get-ActiveSyncDeviceAccessRule' } },
                [ordered]@{ id = 4; op = 'invoke'; call = [ordered]@{ cmdlet = 'Get-ActiveSyncOrganizationSettings'; select = @('DefaultAccessLevel', 'AdminMailRecipients') } }
            )
        }

        It 'meets deserialised enums as remoting makes them: integers typed Deserialized.System.Enum whose ToString is the name' {
            $shape = @(Get-LogEvents $run 'shape')
            @($shape).Count | Should -Be 1
            $shape[0].isEnum | Should -BeFalse
            $shape[0].isInt | Should -BeTrue
            $shape[0].deserializedEnum | Should -BeTrue
            $shape[0].number | Should -Be 3
            $shape[0].text | Should -BeExactly 'Quarantined'
        }

        It 'sends a deserialised enum as its name' {
            $f = Get-Final $run 2
            $f.ok | Should -BeTrue
            @($f.objects).Count | Should -Be 2
            $f.objects[0].DeviceAccessState | Should -BeExactly 'Quarantined'
            $f.objects[0].DeviceAccessStateReason | Should -BeExactly 'Individual'
            $f.objects[1].DeviceAccessState | Should -BeExactly 'Blocked'
            $f.objects[1].DeviceAccessStateReason | Should -BeExactly 'Global'
            Get-FinalJson $run 2 | Should -Not -Match '"DeviceAccessState(Reason)?":\d'
            (Get-Final $run 4).objects[0].DefaultAccessLevel | Should -BeExactly 'Quarantine'
        }

        It 'sends a live enum as its name' {
            $f = Get-Final $run 3
            $f.ok | Should -BeTrue
            $f.objects[0].AccessLevel | Should -BeExactly 'Block'
        }

        It 'sends a deserialised multi-valued property as an array, an identity and a GUID as strings' {
            Get-FinalJson $run 4 | Should -Match '"AdminMailRecipients":\["admin@contoso.com"\]'
            $d = (Get-Final $run 2).objects[0]
            $d.Guid | Should -BeExactly '9d3f1c2a-6b1e-4f7e-a5c0-2b8d9e4f1a77'
            $d.Identity | Should -BeExactly ('alice\ExchangeActiveSyncDevices\iPhone' + [char]0xA7 + 'ApplF17XK0J1HG7F')
        }

        It 'passes ResultSize through as the string Unlimited' {
            $c = @(Get-Calls $run 'Get-MobileDevice')
            @($c).Count | Should -Be 1
            $c[0].params.ResultSize | Should -BeExactly 'Unlimited'
        }

        It 'skips the certificate checks only when the connect request says so' {
            $o = @(Get-LogEvents $run 'New-PSSessionOption')
            $o[0].SkipCACheck | Should -BeTrue
            $o[0].SkipCNCheck | Should -BeTrue
            $o[0].SkipRevocationCheck | Should -BeTrue
            (Get-LogEvents $run 'New-PSSession')[0].Authentication | Should -BeExactly 'Negotiate'
        }
    }

    Context 'an open session: ping is a heartbeat (item 3)' {
        BeforeAll {
            $run = Invoke-WorkerScenario -Requests @(
                (Get-ConnectRequest 1),
                [ordered]@{ id = 2; op = 'ping' },
                [ordered]@{ id = 3; op = 'ping' }
            )
        }

        It 'answers each ping with one call through the session' {
            (Get-Final $run 2).ok | Should -BeTrue
            (Get-Final $run 3).ok | Should -BeTrue
            $c = @(Get-Calls $run 'Get-ActiveSyncOrganizationSettings')
            @($c).Count | Should -Be 2
            $c[0].session | Should -BeExactly 'Opened'
            $c[0].params.ErrorAction | Should -BeExactly 'Stop'
        }
    }

    Context 'a heartbeat call that fails while the session still looks open (item 3)' {
        BeforeAll {
            $run = Invoke-WorkerScenario -Setup {
                function global:Get-ActiveSyncOrganizationSettings {
                    [CmdletBinding()]
                    param($Identity)
                    Write-StubCall 'Get-ActiveSyncOrganizationSettings' $PSBoundParameters
                    throw 'The session is no longer known to the server (stub).'
                }
            } -Requests @(
                (Get-ConnectRequest 1),
                [ordered]@{ id = 2; op = 'ping' }
            )
        }

        It 'answers the ping with SessionBroken, saying the heartbeat failed' {
            $f = Get-Final $run 2
            $f.ok | Should -BeFalse
            $f.errors[0].reason | Should -BeExactly 'SessionBroken'
            $f.errors[0].message | Should -BeExactly 'the heartbeat call failed: The session is no longer known to the server (stub).'
            @(Get-Calls $run 'Get-ActiveSyncOrganizationSettings').Count | Should -Be 1
        }
    }

    Context 'a session that breaks, as after an app-pool recycle (item 3)' {
        BeforeAll {
            $run = Invoke-WorkerScenario -Setup {
                # The recycle happens during this call: the session turns
                # Broken and the proxy's call fails.
                function global:Get-ExchangeServer {
                    [CmdletBinding()]
                    param($Identity)
                    Write-StubCall 'Get-ExchangeServer' $PSBoundParameters
                    $global:StubSessionState = 'Broken'
                    $global:StubSessionAvailability = 'None'
                    throw 'Processing data from remote server ex01.contoso.com failed: the session was closed (stub).'
                }
            } -Requests @(
                (Get-ConnectRequest 1),
                [ordered]@{ id = 2; op = 'invoke'; call = [ordered]@{ cmdlet = 'Get-ExchangeServer' } },
                [ordered]@{ id = 3; op = 'invoke'; call = [ordered]@{ cmdlet = 'Get-MobileDevice' } },
                [ordered]@{ id = 4; op = 'ping' },
                [ordered]@{ id = 5; op = 'batch'; calls = @([ordered]@{ cmdlet = 'Get-MobileDevice' }) },
                [ordered]@{ id = 6; op = 'bye' }
            )
        }

        It 'adds SessionBroken to the errors of the call during which the session broke' {
            $f = Get-Final $run 2
            $f.ok | Should -BeFalse
            @($f.errors | ForEach-Object { $_.reason }) | Should -Contain 'SessionBroken'
        }

        It 'answers an invoke on a Broken session with SessionBroken without calling the cmdlet' {
            $f = Get-Final $run 3
            $f.ok | Should -BeFalse
            @($f.errors).Count | Should -Be 1
            $f.errors[0].reason | Should -BeExactly 'SessionBroken'
            $f.errors[0].fqid | Should -BeExactly 'SessionBroken'
            $f.errors[0].category | Should -BeExactly 'ResourceUnavailable'
            $f.errors[0].message | Should -BeExactly 'the Exchange session is Broken (None)'
            @(Get-Calls $run 'Get-MobileDevice').Count | Should -Be 0
        }

        It 'answers ping on a Broken session with SessionBroken without a heartbeat call' {
            $f = Get-Final $run 4
            $f.ok | Should -BeFalse
            $f.errors[0].reason | Should -BeExactly 'SessionBroken'
            @(Get-Calls $run 'Get-ActiveSyncOrganizationSettings').Count | Should -Be 0
        }

        It 'answers each call of a batch on a Broken session with SessionBroken' {
            $f = Get-Final $run 5
            $f.ok | Should -BeFalse
            $f.results[0].errors[0].reason | Should -BeExactly 'SessionBroken'
        }

        It 'still says bye: removes the session once and exits 0' {
            (Get-Final $run 6).ok | Should -BeTrue
            @(Get-LogEvents $run 'Remove-PSSession').Count | Should -Be 1
            $run.ExitCode | Should -Be 0
        }
    }

    Context 'warnings reach easguard (item 6)' {
        BeforeAll {
            $run = Invoke-WorkerScenario -Requests @(
                (Get-ConnectRequest 1),
                [ordered]@{ id = 2; op = 'invoke'; call = [ordered]@{ cmdlet = 'Get-CASMailbox'; params = [ordered]@{ Filter = "HasActiveSyncDevicePartnership -eq `$true" } } },
                [ordered]@{ id = 3; op = 'batch'; calls = @([ordered]@{ cmdlet = 'Get-CASMailbox' }) }
            )
        }

        It 'puts a warning the cmdlet writes in the frame''s warnings' {
            $f = Get-Final $run 2
            $f.ok | Should -BeTrue
            $f.count | Should -Be 2
            @($f.warnings).Count | Should -Be 1
            $f.warnings[0] | Should -BeExactly $TruncationWarning
            (@((Get-Final $run 3).results[0].warnings) -join '|') | Should -BeExactly $TruncationWarning
        }

        It 'writes nothing but frames on stdout' {
            $run.Other | Should -BeNullOrEmpty
            $run.Stdout | Should -Not -Match 'WARNING'
            $run.Stderr | Should -BeNullOrEmpty
        }

        It 'asks for warnings with -WarningAction Continue, which an implicit-remoting proxy passes to the server' {
            $c = @(Get-Calls $run 'Get-CASMailbox')
            $c[0].params.WarningAction | Should -BeExactly 'Continue'
            $c[0].params.ErrorAction | Should -BeExactly 'Continue'
            $c[0].params.Filter | Should -BeExactly 'HasActiveSyncDevicePartnership -eq $true'
        }

        It 'sends a deserialised string array as an array' {
            Get-FinalJson $run 2 | Should -Match '"ActiveSyncAllowedDeviceIDs":\["ApplF17XK0J1HG7F","androidc1234567"\]'
        }
    }

    Context 'culture: a de-DE host (item 7)' {
        BeforeAll {
            $run = Invoke-WorkerScenario -Culture 'de-DE' -Requests @(
                (Get-ConnectRequest 1),
                [ordered]@{ id = 2; op = 'invoke'; call = [ordered]@{ cmdlet = 'Get-MobileDevice' } },
                [ordered]@{ id = 3; op = 'ping' }
            )
        }

        It 'ran on a thread whose culture was de-DE when the script started' {
            $start = @(Get-LogEvents $run 'start')
            $start[0].culture | Should -BeExactly 'de-DE'
            $start[0].uiculture | Should -BeExactly 'de-DE'
        }

        It 'pins en-US for the calls it makes' {
            $calls = @(Get-Calls $run 'Get-MobileDevice') + @(Get-Calls $run 'Get-ActiveSyncOrganizationSettings')
            @($calls).Count | Should -Be 2
            foreach ($c in $calls) {
                $c.culture | Should -BeExactly 'en-US'
                $c.uiculture | Should -BeExactly 'en-US'
            }
        }

        It 'opens the session with en-US culture and UI culture and a two-minute idle timeout' {
            $o = @(Get-LogEvents $run 'New-PSSessionOption')
            @($o).Count | Should -Be 1
            $o[0].params.Culture | Should -BeExactly 'en-US'
            $o[0].params.UICulture | Should -BeExactly 'en-US'
            $o[0].params.IdleTimeout | Should -Be 120000
            # As Windows PowerShell's own New-PSSessionOption reads them:
            $o[0].Culture | Should -BeExactly 'en-US'
            $o[0].UICulture | Should -BeExactly 'en-US'
            $o[0].IdleTimeoutMs | Should -Be 120000
            $s = @(Get-LogEvents $run 'New-PSSession')
            $s[0].IdleTimeoutMs | Should -Be 120000
            $s[0].Culture | Should -BeExactly 'en-US'
        }
    }

    Context 'dates keep their kind (item 8)' {
        BeforeAll {
            $run = Invoke-WorkerScenario -Requests @(
                (Get-ConnectRequest 1),
                [ordered]@{ id = 2; op = 'invoke'; call = [ordered]@{ cmdlet = 'Get-MobileDeviceStatistics'; params = [ordered]@{ Mailbox = 'alice' } } }
            )
            $json = Get-FinalJson $run 2
        }

        It 'sends a UTC date in the round-trip format with Z' {
            $json | Should -Match '"LastSuccessSync":"2026-11-26T19:55:57\.1234567Z"'
        }

        It 'sends a Local date in the round-trip format with the host''s offset' {
            $local = (New-Object -TypeName DateTime -ArgumentList 2026, 11, 26, 19, 55, 57, ([DateTimeKind]::Local)).AddTicks(1234567)
            $expected = $local.ToString('o', [System.Globalization.CultureInfo]::InvariantCulture)
            $expected | Should -Match '[+-]\d\d:\d\d$'
            $json | Should -Match ('"WhenChanged":"' + [regex]::Escape($expected) + '"')
        }

        It 'sends an Unspecified date in the round-trip format without a zone' {
            $json | Should -Match '"LastSyncAttemptTime":"2026-11-26T19:55:57\.1234567"'
        }
    }

    Context 'the allow-list, parameters as data, pages, and bye' {
        BeforeAll {
            $identity = 'alice''; Remove-Item C:\ -Recurse; $(throw "x") `n | & "y"' + "`n" + 'second line'
            $run = Invoke-WorkerScenario -Setup {
                # Were the worker to run them, these would show in the log.
                function global:Get-Process {
                    [CmdletBinding()]
                    param($Name)
                    Write-StubCall 'Get-Process' $PSBoundParameters
                }
                function global:Invoke-Expression {
                    [CmdletBinding()]
                    param($Command)
                    Write-StubCall 'Invoke-Expression' $PSBoundParameters
                }
            } -Requests @(
                (Get-ConnectRequest 1),
                [ordered]@{ id = 2; op = 'invoke'; call = [ordered]@{ cmdlet = 'Get-Process' } },
                [ordered]@{ id = 3; op = 'invoke'; call = [ordered]@{ cmdlet = 'Invoke-Expression'; params = [ordered]@{ Command = 'exit 5' } } },
                [ordered]@{ id = 4; op = 'invoke'; page = 1; call = [ordered]@{ cmdlet = 'get-mobiledevice'; select = @('DeviceId') } },
                [ordered]@{ id = 5; op = 'invoke'; call = [ordered]@{ cmdlet = 'Set-CASMailbox'; params = [ordered]@{
                            Identity                   = $identity
                            ActiveSyncAllowedDeviceIDs = [ordered]@{ Add = @('ApplF17XK0J1HG7F'); Remove = @('androidc1234567') }
                            ActiveSyncBlockedDeviceIDs = @('a', 'b')
                        }
                    }
                },
                [ordered]@{ id = 6; op = 'bye' },
                [ordered]@{ id = 7; op = 'ping' }
            )
        }

        It 'refuses cmdlets that are not on the allow-list without running them' {
            foreach ($case in @(@{ Id = 2; Name = 'Get-Process' }, @{ Id = 3; Name = 'Invoke-Expression' })) {
                $f = Get-Final $run $case.Id
                $f.ok | Should -BeFalse
                $f.errors[0].reason | Should -BeExactly 'ProtocolError'
                $f.errors[0].message | Should -BeExactly "cmdlet '$($case.Name)' is not on the easguard allow-list"
                @(Get-Calls $run $case.Name).Count | Should -Be 0
            }
        }

        It 'matches allow-listed names case-insensitively and streams pages' {
            $pages = @($run.Frames | Where-Object { $_.Value.id -eq 4 -and $_.Value.done -ne $true })
            @($pages).Count | Should -Be 2
            $pages[0].Value.page | Should -Be 0
            $pages[0].Value.objects[0].DeviceId | Should -BeExactly 'ApplF17XK0J1HG7F'
            $pages[1].Value.page | Should -Be 1
            $f = Get-Final $run 4
            $f.ok | Should -BeTrue
            $f.count | Should -Be 2
            @($f.objects).Count | Should -Be 0
            @(Get-Calls $run 'Get-MobileDevice').Count | Should -Be 1
        }

        It 'passes parameter values as data, byte for byte, and Add/Remove as string arrays' {
            (Get-Final $run 5).ok | Should -BeTrue
            $c = @(Get-Calls $run 'Set-CASMailbox')
            @($c).Count | Should -Be 1
            $c[0].params.Identity | Should -BeExactly $identity
            (@($c[0].params.ActiveSyncAllowedDeviceIDs.Add) -join ',') | Should -BeExactly 'ApplF17XK0J1HG7F'
            (@($c[0].params.ActiveSyncAllowedDeviceIDs.Remove) -join ',') | Should -BeExactly 'androidc1234567'
            $c[0].params.ActiveSyncAllowedDeviceIDs.'Add.type' | Should -BeExactly 'System.String[]'
            (@($c[0].params.ActiveSyncBlockedDeviceIDs) -join ',') | Should -BeExactly 'a,b'
        }

        It 'answers bye, removes the session once, exits 0 and reads nothing after it' {
            (Get-Final $run 6).ok | Should -BeTrue
            @(Get-LogEvents $run 'Remove-PSSession').Count | Should -Be 1
            @($run.Frames | Where-Object { $_.Value.id -eq 7 }).Count | Should -Be 0
            $run.ExitCode | Should -Be 0
            $run.Other | Should -BeNullOrEmpty
        }
    }
}
