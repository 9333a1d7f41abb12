package exchangesim

import (
	"strings"
	"time"

	"github.com/easguard/easguard/pkg/exchange"
)

func wireStrings(v []string) []any {
	out := make([]any, len(v))
	for i, s := range v {
		out[i] = s
	}
	return out
}

const exchangeVersion = "0.10 (14.0.100.0)"

func (o *Org) schema(class string) string {
	return o.defaultDomain().DNS + "/Configuration/Schema/" + class
}

// configDN is the DN of an object in the Exchange configuration container.
func (o *Org) configDN(rdn string) string {
	return rdn + ",CN=" + escapeDN(o.Name) + ",CN=Microsoft Exchange,CN=Services,CN=Configuration," + o.defaultDomain().dn()
}

// mobileDeviceObject is Get-MobileDevice / Get-ActiveSyncDevice output.
func (o *Org) mobileDeviceObject(d *Device) exchange.Object {
	var rule any
	if d.Rule != nil {
		rule = d.Rule.Name()
	}
	managed := false
	obj := exchange.Object{
		"FriendlyName": d.FriendlyName, "DeviceId": d.DeviceID, "DeviceImei": d.IMEI, "DeviceMobileOperator": d.MobileOperator,
		"DeviceOS": d.DeviceOS, "DeviceOSLanguage": d.OSLanguage, "DeviceTelephoneNumber": d.TelephoneNumber,
		"DeviceType": d.DeviceType, "DeviceUserAgent": d.UserAgent, "DeviceModel": d.DeviceModel,
		"FirstSyncTime": wireTime(d.FirstSyncTime), "UserDisplayName": d.Mailbox.Canonical(),
		"DeviceAccessState": enumOf(d.State, d.State.String()), "DeviceAccessStateReason": enumOf(d.Reason, d.Reason.String()), "DeviceAccessControlRule": rule,
		"DeviceActiveSyncVersion": d.ActiveSyncVersion, "ClientVersion": d.ActiveSyncVersion, "ClientType": enumNamed(clientTypeNums, d.ClientType),
		"IsManaged": managed, "IsCompliant": managed, "IsDisabled": false, "AdminDisplayName": "", "ExchangeVersion": exchangeVersion,
		"Name": d.Name(), "DistinguishedName": d.DN(), "Identity": d.Identity(), "Guid": d.GUID,
		"ObjectCategory": o.schema("ms-Exch-Active-Sync-Device"), "ObjectClass": []any{"top", "msExchActiveSyncDevice"},
		"WhenChanged": localTime(d.WhenChanged), "WhenCreated": localTime(d.WhenCreated),
		"WhenChangedUTC": wireTime(d.WhenChanged), "WhenCreatedUTC": wireTime(d.WhenCreated),
		"OrganizationId": "", "Id": d.Identity(), "OriginatingServer": d.Mailbox.Domain.DC, "IsValid": true, "ObjectState": "Unchanged",
	}
	if !o.Keep2013Properties {
		o.Version.shapeDevice(obj)
	}
	return obj
}

// deviceStatisticsObject is Get-MobileDeviceStatistics output.
func (o *Org) deviceStatisticsObject(d *Device) exchange.Object {
	var rule any
	if d.Rule != nil {
		rule = d.Rule.Name()
	}
	pol := o.policyOf(d.Mailbox)
	status := "AppliedInFull"
	if d.LastPolicyUpdateTime.IsZero() {
		status = "NotApplied"
	}
	var heartbeat any
	if !d.LastSuccessSync.IsZero() {
		heartbeat = int64(540)
	}
	obj := exchange.Object{
		"FirstSyncTime": wireTime(d.FirstSyncTime), "LastPolicyUpdateTime": wireTime(d.LastPolicyUpdateTime),
		"LastSyncAttemptTime": wireTime(d.LastSyncAttemptTime), "LastSuccessSync": wireTime(d.LastSuccessSync),
		"DeviceType": d.DeviceType, "DeviceID": d.DeviceID, "DeviceUserAgent": d.UserAgent,
		"DeviceWipeSentTime": wireTime(d.WipeSentTime), "DeviceWipeRequestTime": wireTime(d.WipeRequestTime),
		"DeviceWipeAckTime": wireTime(d.WipeAckTime), "AccountOnlyDeviceWipeSentTime": nil, "AccountOnlyDeviceWipeRequestTime": nil,
		"AccountOnlyDeviceWipeAckTime": nil, "LastPingHeartbeat": heartbeat, "RecoveryPassword": "********",
		"DeviceModel": d.DeviceModel, "DeviceImei": d.IMEI, "DeviceFriendlyName": d.FriendlyName, "DeviceOS": d.DeviceOS,
		"DeviceOSLanguage": d.OSLanguage, "DevicePhoneNumber": d.TelephoneNumber, "MailboxLogReport": nil,
		"DeviceEnableOutboundSMS": false, "DeviceMobileOperator": d.MobileOperator, "Identity": d.Identity(), "Guid": d.GUID,
		"IsRemoteWipeSupported": true, "Status": enumNamed(wipeStatusNums, d.wipeStatus()), "StatusNote": nil,
		"DeviceAccessState": enumOf(d.State, d.State.String()), "DeviceAccessStateReason": enumOf(d.Reason, d.Reason.String()), "DeviceAccessControlRule": rule,
		"DevicePolicyApplied": pol.Name, "DevicePolicyApplicationStatus": enumNamed(policyStatusNums, status), "LastDeviceWipeRequestor": nilIfEmpty(d.WipeRequestor),
		"LastAccountOnlyDeviceWipeRequestor": nil, "ClientVersion": d.ActiveSyncVersion, "NumberOfFoldersSynced": int64(d.FoldersSynced),
		"SyncStateUpgradeTime": nil, "ClientType": enumNamed(clientTypeNums, d.ClientType), "IsValid": true, "ObjectState": "New",
	}
	if !o.Keep2013Properties {
		o.Version.shapeStatistics(obj)
	}
	return obj
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// casMailboxObject is Get-CASMailbox output.
func (o *Org) casMailboxObject(m *Mailbox) exchange.Object {
	pol := o.policyOf(m)
	return exchange.Object{
		"Identity": m.Canonical(), "Name": m.Name, "DisplayName": m.DisplayName, "PrimarySmtpAddress": m.PrimarySMTP,
		"SamAccountName": m.SamAccountName, "ServerName": strings.ToLower(o.Servers[0].Name), "Guid": m.GUID,
		"DistinguishedName": m.DN(), "LegacyExchangeDN": legacyDN(o, m), "EmailAddresses": wireStrings(m.EmailAddresses),
		"ActiveSyncEnabled": m.ActiveSyncEnabled, "ActiveSyncDebugLogging": m.ActiveSyncDebugLogging,
		"ActiveSyncAllowedDeviceIDs": wireStrings(m.Allowed), "ActiveSyncBlockedDeviceIDs": wireStrings(m.Blocked),
		"ActiveSyncMailboxPolicy": pol.Name, "ActiveSyncMailboxPolicyIsDefaulted": m.Policy == nil,
		"HasActiveSyncDevicePartnership": m.hasPartnershipFlag(), "ActiveSyncSuppressReadReceipt": false,
		"OWAEnabled": m.OWAEnabled, "EwsEnabled": m.EwsEnabled, "MAPIEnabled": m.MAPIEnabled, "PopEnabled": m.PopEnabled,
		"ImapEnabled": m.ImapEnabled, "ExchangeVersion": o.Version.recipientExchangeVersion(), "IsValid": true,
		"WhenChanged": localTime(m.WhenChanged), "WhenCreated": localTime(m.WhenCreated),
		"WhenChangedUTC": wireTime(m.WhenChanged), "WhenCreatedUTC": wireTime(m.WhenCreated), "OriginatingServer": m.Domain.DC,
	}
}

// recipientObject is Get-Recipient output. UNCONFIRMED: whether on-premises
// Get-Recipient shows UserPrincipalName; reference/exchange.md §10 expects
// it for matching, so it is included, and consumers should fall back to
// PrimarySmtpAddress when it is empty.
func (o *Org) recipientObject(m *Mailbox) exchange.Object {
	return exchange.Object{
		"Identity": m.Canonical(), "Name": m.Name, "Alias": m.Alias, "DisplayName": m.DisplayName,
		"PrimarySmtpAddress": m.PrimarySMTP, "EmailAddresses": wireStrings(m.EmailAddresses), "SamAccountName": m.SamAccountName,
		"UserPrincipalName": m.UPN, "RecipientType": "UserMailbox", "RecipientTypeDetails": "UserMailbox",
		"OrganizationalUnit": m.Domain.DNS + "/" + m.OU, "Guid": m.GUID, "ExchangeGuid": m.GUID, "DistinguishedName": m.DN(),
		"HasActiveSyncDevicePartnership": m.hasPartnershipFlag(), "WhenChanged": localTime(m.WhenChanged),
		"WhenCreated": localTime(m.WhenCreated), "WhenChangedUTC": wireTime(m.WhenChanged), "WhenCreatedUTC": wireTime(m.WhenCreated), "IsValid": true,
	}
}

func (o *Org) orgSettingsObject() exchange.Object {
	s := o.Settings
	return exchange.Object{
		"Name": "Mobile Mailbox Settings", "Identity": "Mobile Mailbox Settings", "DefaultAccessLevel": enumOf(s.DefaultAccessLevel, s.DefaultAccessLevel.String()),
		"UserMailInsert": nilIfEmpty(s.UserMailInsert), "AdminMailRecipients": wireStrings(s.AdminMailRecipients),
		"OtaNotificationMailInsert": nilIfEmpty(s.OtaNotificationMailInsert), "AllowAccessForUnSupportedPlatform": s.AllowAccessForUnSupportedPlatform,
		"DeviceFiltering": nil, "IsIntuneManaged": false, "HostedTenantEmailMailbox": nil, "TenantAdminPreference": nil,
		"EnableMobileMailboxPolicyWhenCAInplace": false, "AllowRMSSupportForUnenlightenedApps": false,
		"DistinguishedName": o.configDN("CN=Mobile Mailbox Settings"), "Guid": s.GUID,
		"WhenChanged": localTime(s.WhenChanged), "WhenChangedUTC": wireTime(s.WhenChanged), "IsValid": true, "ExchangeVersion": exchangeVersion,
	}
}

func (o *Org) policyObject(p *MailboxPolicy) exchange.Object {
	return exchange.Object{
		"Name": p.Name, "Identity": p.Name, "IsDefault": p.IsDefault, "IsDefaultPolicy": p.IsDefault,
		"AllowNonProvisionableDevices": p.AllowNonProvisionableDevices, "AllowExternalDeviceManagement": p.AllowExternalDeviceManagement,
		"DevicePasswordEnabled": p.DevicePasswordEnabled, "AlphanumericDevicePasswordRequired": p.AlphanumericPasswordRequired,
		"AllowSimpleDevicePassword": p.AllowSimpleDevicePassword, "MinDevicePasswordLength": int64(p.MinDevicePasswordLength),
		"RequireDeviceEncryption": p.RequireDeviceEncryption, "DeviceEncryptionEnabled": p.RequireDeviceEncryption,
		"MaxInactivityTimeDeviceLock": p.MaxInactivityTimeDeviceLock, "DevicePolicyRefreshInterval": p.DevicePolicyRefreshInterval,
		"Guid": p.GUID, "DistinguishedName": o.configDN("CN=" + escapeDN(p.Name) + ",CN=Mobile Mailbox Policies"),
		"WhenChanged": localTime(p.WhenChanged), "WhenCreated": localTime(p.WhenCreated), "IsValid": true, "ExchangeVersion": exchangeVersion,
	}
}

func (o *Org) ruleObject(r *DeviceAccessRule) exchange.Object {
	return exchange.Object{
		"Name": r.Name(), "Identity": r.Name(), "QueryString": r.QueryString, "Characteristic": enumOf(r.Characteristic, r.Characteristic.String()),
		"AccessLevel": enumOf(r.AccessLevel, r.AccessLevel.String()), "Guid": r.GUID,
		"DistinguishedName": o.configDN("CN=" + escapeDN(r.Name()) + ",CN=Mobile Mailbox Settings"),
		"WhenChanged":       localTime(r.WhenChanged), "WhenCreated": localTime(r.WhenCreated), "IsValid": true, "ExchangeVersion": exchangeVersion,
	}
}

func (o *Org) serverObject(s *Server) exchange.Object {
	return exchange.Object{
		"Name": s.Name, "Identity": s.Name, "Fqdn": s.FQDN, "Domain": o.defaultDomain().DNS, "Edition": s.Edition,
		"AdminDisplayVersion": s.Version, "ServerRole": s.Roles, "Site": s.Site, "IsClientAccessServer": strings.Contains(s.Roles, "ClientAccess"),
		"IsMailboxServer": strings.Contains(s.Roles, "Mailbox"), "IsExchange2007OrLater": true, "IsE14OrLater": true, "IsE15OrLater": o.Version.e15(),
		"Guid": s.GUID, "DistinguishedName": o.configDN("CN=" + s.Name + ",CN=Servers,CN=Exchange Administrative Group (FYDIBOHF23SPDLT),CN=Administrative Groups"),
		"IsValid": true,
	}
}

func (o *Org) casServiceObject(s *Server) exchange.Object {
	return exchange.Object{
		"Name": s.Name, "Identity": s.Name, "Fqdn": s.FQDN, "Guid": s.GUID,
		"AutoDiscoverServiceInternalUri": "https://" + s.FQDN + "/Autodiscover/Autodiscover.xml",
		"AutoDiscoverSiteScope":          []any{"Default-First-Site-Name"}, "IsValid": true,
	}
}

func (o *Org) deviceClassObject(key string, last time.Time) exchange.Object {
	typ, model, _ := strings.Cut(key, "§")
	return exchange.Object{
		"Name": key, "Identity": key, "DeviceType": typ, "DeviceModel": model, "LastUpdateTime": wireTime(last), "IsValid": true,
	}
}
