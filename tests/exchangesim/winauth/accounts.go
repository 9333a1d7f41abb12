package winauth

import "strings"

// Accounts maps user names to passwords. Lookups are case-insensitive on the user name
// and accept "user", "DOMAIN\user" and "user@domain" forms for the same account.
//
// It is an interface rather than a map so that a simulator can rotate or revoke
// credentials while it runs (to exercise a client's reaction to a changed
// password) without restarting the HTTP server. The simulator needs the clear-text
// password because NTLMv2 is a challenge-response protocol: the server must derive
// the same NT hash the client derived in order to check the proof.
type Accounts interface {
	Password(user string) (password string, ok bool)
}

// CanonicalNamer is an optional interface an Accounts implementation can provide so
// that User reports the account name exactly as it is stored, whatever spelling the
// client logged on with. Without it, User reports the bare user name the client sent
// (domain prefix or suffix removed, case preserved), which is enough for most
// simulators but makes "ALICE" and "alice" look like two different callers.
type CanonicalNamer interface {
	CanonicalName(user string) (name string, ok bool)
}

// StaticAccounts is a map-backed Accounts (keys are plain user names).
//
// It exists because almost every test only needs a fixed set of accounts; it also
// implements CanonicalNamer so that handlers see the key spelling, not the client's.
type StaticAccounts map[string]string

// Password returns the password of the account that user names, in any of the
// accepted forms, so that Basic and NTLM logons resolve to the same account.
func (a StaticAccounts) Password(user string) (string, bool) {
	key, ok := a.lookup(user)
	if !ok {
		return "", false
	}
	return a[key], true
}

// CanonicalName returns the map key of the account that user names, so that the
// handler behind Middleware can compare callers with a simple string equality.
func (a StaticAccounts) CanonicalName(user string) (string, bool) {
	return a.lookup(user)
}

// lookup finds the key for user. An exact key match wins; otherwise the smallest
// case-insensitive match is returned so that the result does not depend on map
// iteration order when keys differ only in case.
func (a StaticAccounts) lookup(user string) (string, bool) {
	bare := bareUserName(user)
	if bare == "" {
		return "", false
	}
	if _, ok := a[bare]; ok {
		return bare, true
	}
	found := ""
	for key := range a {
		if strings.EqualFold(key, bare) && (found == "" || key < found) {
			found = key
		}
	}
	return found, found != ""
}

// bareUserName strips the domain from the "DOMAIN\user" and "user@domain" forms.
// The domain is not checked: the simulator has a single domain, and a real client
// that mistypes it would still have to prove knowledge of the password.
func bareUserName(user string) string {
	if i := strings.LastIndexByte(user, '\\'); i >= 0 {
		return user[i+1:]
	}
	if i := strings.LastIndexByte(user, '@'); i >= 0 {
		return user[:i]
	}
	return user
}
