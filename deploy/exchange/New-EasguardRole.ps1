<#
.SYNOPSIS
Creates the least-privilege Exchange role group for easguard's service account.

.DESCRIPTION
Run once, by an Exchange administrator (a member of Organization Management),
in the Exchange Management Shell. For every built-in role that holds one of
the cmdlets easguard runs, it creates a custom child role
(New-ManagementRole -Parent) and removes every role entry easguard does not
use; it puts those roles into one role group whose only member is the
service account, and enables remote PowerShell for the account. A second
run changes only what differs, so it also repairs a role group someone
widened. -WhatIf shows every change without making it.

The cmdlets are those of easguard's default features: reading partnerships,
mailboxes, recipients, servers and the ActiveSync organisation settings,
writing the mailboxes' allow and block lists, and enforcing the ActiveSync
organisation settings (EASGUARD_COLLECTOR_ENFORCE_SETTINGS). Remote wipe
and partnership removal are not granted: nothing in easguard enables them.
`easguard check exchange` then confirms the grant.

Which built-in role holds which cmdlet is looked up in the organisation
(Get-ManagementRoleEntry), not assumed: the first role of -ParentRoles that
has an entry for a cmdlet becomes its parent. The default list comes from
Microsoft's tooling: Microsoft365DSC names Mail Recipients and View-Only
Recipients for the CAS mailbox cmdlets, and Organization Client Access and
View-Only Configuration for the ActiveSync configuration cmdlets (its
settings.json files, written for Exchange Online). Which of them holds each
cmdlet here (Get-MobileDevice, Get-Recipient, Get-ExchangeServer,
Set-ADServerSettings, the ActiveSync organisation settings) on each version
from 2010 SP3 to 2019 is UNCONFIRMED, hence the look-up and the error that
names a cmdlet no role of the list holds.

.PARAMETER Account
The service account (EASGUARD_EXCHANGE_USER), e.g. CONTOSO\svc-easguard.

.PARAMETER RoleGroup
Name of the role group to create or update.

.PARAMETER RolePrefix
Prefix of the custom roles' names: "<prefix> <parent role>".

.PARAMETER ParentRoles
Built-in roles to take the cmdlets from, in order of preference.

.EXAMPLE
.\New-EasguardRole.ps1 -Account 'CONTOSO\svc-easguard' -WhatIf
.\New-EasguardRole.ps1 -Account 'CONTOSO\svc-easguard'
#>
[CmdletBinding(SupportsShouldProcess = $true)]
param(
    [Parameter(Mandatory = $true)]
    [string]$Account,
    [string]$RoleGroup = 'easguard',
    [string]$RolePrefix = 'easguard',
    [string[]]$ParentRoles = @('Mail Recipients', 'Organization Client Access', 'View-Only Configuration', 'View-Only Recipients')
)

Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'

# The cmdlets easguard's default features run: one entry per cmdlet, or
# 'Cmdlet|Alternative' where Exchange 2010 has only the alternative (the
# first name the organisation has is granted). This list is read by the Go
# test TestRoleScriptGrantsDefaultFeatures (pkg/exchange): every quoted
# string between the BEGIN and END lines below is one entry, so keep one
# entry per line and no other quotes between them.
# BEGIN easguard cmdlets
$Cmdlets = @(
    'Get-MobileDevice|Get-ActiveSyncDevice'
    'Get-CASMailbox'
    'Set-CASMailbox'
    'Get-Recipient'
    'Get-ActiveSyncOrganizationSettings'
    'Get-ExchangeServer'
    'Set-ADServerSettings'
    'Set-ActiveSyncOrganizationSettings'
)
# END easguard cmdlets

# The account must exist before anything is created for it.
$user = Get-User -Identity $Account

# Plan: the parent role of each cmdlet, and the cmdlets each parent gives.
$plan = [ordered]@{}
foreach ($entry in $Cmdlets) {
    $found = $null
    foreach ($name in $entry.Split('|')) {
        foreach ($parent in $ParentRoles) {
            if (@(Get-ManagementRoleEntry -Identity "$parent\$name" -ErrorAction SilentlyContinue).Count -gt 0) {
                $found = @($parent, $name)
                break
            }
        }
        if ($null -ne $found) { break }
    }
    if ($null -eq $found) {
        $first = $entry.Split('|')[0]
        throw "No role of '$($ParentRoles -join "', '")' holds $($entry.Replace('|', ' or ')). Find the built-in role that does with Get-ManagementRoleEntry '*\$first' and pass it in -ParentRoles."
    }
    if (-not $plan.Contains($found[0])) { $plan[$found[0]] = New-Object System.Collections.ArrayList }
    [void]$plan[$found[0]].Add($found[1])
}

# One custom child role per parent, holding only the planned cmdlets.
$roles = New-Object System.Collections.ArrayList
foreach ($parent in $plan.Keys) {
    $roleName = "$RolePrefix $parent"
    $keep = @($plan[$parent])
    Write-Verbose "$roleName keeps $($keep -join ', ')"
    $role = Get-ManagementRole -Identity $roleName -ErrorAction SilentlyContinue
    if ($null -eq $role) {
        if ($PSCmdlet.ShouldProcess($roleName, "New-ManagementRole -Parent '$parent'")) {
            $role = New-ManagementRole -Name $roleName -Parent $parent
        }
    }
    if ($null -ne $role) {
        foreach ($roleEntry in @(Get-ManagementRoleEntry -Identity "$roleName\*")) {
            if ($keep -notcontains $roleEntry.Name) {
                if ($PSCmdlet.ShouldProcess("$roleName\$($roleEntry.Name)", 'Remove-ManagementRoleEntry')) {
                    Remove-ManagementRoleEntry -Identity "$roleName\$($roleEntry.Name)" -Confirm:$false
                }
            }
        }
    }
    [void]$roles.Add($roleName)
}

# The role group: exactly these roles, with the service account as member.
$group = Get-RoleGroup -Identity $RoleGroup -ErrorAction SilentlyContinue
if ($null -eq $group) {
    if ($PSCmdlet.ShouldProcess($RoleGroup, "New-RoleGroup -Roles $($roles -join ', ') -Members $Account")) {
        New-RoleGroup -Name $RoleGroup -Roles @($roles) -Members $Account -Description 'easguard service account: least-privilege ActiveSync access (deploy/exchange/New-EasguardRole.ps1)' | Out-Null
    }
} else {
    # An assignment's Role may show as the role's name or its
    # distinguished name (which, in which version's remote session, is
    # UNCONFIRMED); Get-ManagementRole accepts either and gives the name.
    $assignments = @(Get-ManagementRoleAssignment -RoleAssignee $RoleGroup -Delegating $false)
    $assigned = @($assignments | ForEach-Object { [string](Get-ManagementRole -Identity ([string]$_.Role)).Name })
    foreach ($roleName in $roles) {
        if ($assigned -notcontains $roleName) {
            if ($PSCmdlet.ShouldProcess($RoleGroup, "New-ManagementRoleAssignment -Role '$roleName'")) {
                New-ManagementRoleAssignment -SecurityGroup $RoleGroup -Role $roleName | Out-Null
            }
        }
    }
    for ($i = 0; $i -lt $assignments.Count; $i++) {
        if ($roles -notcontains $assigned[$i]) {
            if ($PSCmdlet.ShouldProcess([string]$assignments[$i].Name, "Remove-ManagementRoleAssignment (role '$($assigned[$i])' is not easguard's)")) {
                Remove-ManagementRoleAssignment -Identity ([string]$assignments[$i].Identity) -Confirm:$false
            }
        }
    }
    $members = @(Get-RoleGroupMember -Identity $RoleGroup | ForEach-Object { [string]$_.DistinguishedName })
    if ($members -notcontains [string]$user.DistinguishedName) {
        if ($PSCmdlet.ShouldProcess($RoleGroup, "Add-RoleGroupMember -Member $Account")) {
            Add-RoleGroupMember -Identity $RoleGroup -Member $Account
        }
    }
}

# Exchange's remote PowerShell endpoint admits only accounts allowed to use it.
if (-not $user.RemotePowerShellEnabled) {
    if ($PSCmdlet.ShouldProcess($Account, 'Set-User -RemotePowerShellEnabled $true')) {
        Set-User -Identity $Account -RemotePowerShellEnabled $true
    }
}

Write-Output "Role group '$RoleGroup' grants $Account the roles $($roles -join ', '). Run 'easguard check exchange' to confirm."
