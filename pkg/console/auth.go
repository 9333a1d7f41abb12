package console

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/oauth2"
)

// Role is what a signed-in user may do. Each role includes the ones below it.
type Role int

// Roles, weakest first.
const (
	RoleNone Role = iota
	// RoleViewer reads everything and changes nothing.
	RoleViewer
	// RoleOperator runs syncs, approves or discards held revocations,
	// judges devices again, handles dead letters and previews policies.
	RoleOperator
	// RoleDeviceAdmin is an operator who may also remove partnerships and
	// wipe devices: actions that cannot be taken back get their own role.
	RoleDeviceAdmin
)

// ParseRole reads a role's name as the users and tokens files write it.
func ParseRole(s string) (Role, error) {
	switch strings.ToLower(s) {
	case "viewer":
		return RoleViewer, nil
	case "operator":
		return RoleOperator, nil
	case "device-admin":
		return RoleDeviceAdmin, nil
	}
	return RoleNone, fmt.Errorf("%w %q: use viewer, operator or device-admin", ErrBadRole, s)
}

// ErrBadRole is returned for a role name that is not one of easguard's.
var ErrBadRole = errors.New("unknown role")

// String returns the role's name.
func (r Role) String() string {
	switch r {
	case RoleViewer:
		return "viewer"
	case RoleOperator:
		return "operator"
	case RoleDeviceAdmin:
		return "device-admin"
	}
	return "none"
}

// MarshalJSON writes the role's name.
func (r Role) MarshalJSON() ([]byte, error) { return json.Marshal(r.String()) }

// UnmarshalJSON reads a role's name.
func (r *Role) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	if s == "none" {
		*r = RoleNone
		return nil
	}
	v, err := ParseRole(s)
	*r = v
	return err
}

// Principal is who is asking: a signed-in user or an API token's name.
type Principal struct {
	Name string `json:"name"`
	Role Role   `json:"role"`
	// Via says how they proved it: oidc, local or token.
	Via string `json:"via"`
}

// session is a console sign-in, kept in the session bucket under the hash
// of its id, so that reading the bucket does not hand out sessions.
type session struct {
	Principal
	CSRF    string    `json:"csrf"`
	Created time.Time `json:"created"`
	Expires time.Time `json:"expires"`
}

// pendingLogin is an OpenID Connect sign-in between the redirect to the
// provider and its answer: the PKCE verifier and the nonce stay here, not
// in the browser.
type pendingLogin struct {
	Verifier string    `json:"verifier"`
	Nonce    string    `json:"nonce"`
	Return   string    `json:"return"`
	Expires  time.Time `json:"expires"`
}

// loginTTL is how long a user may take at the identity provider.
const loginTTL = 10 * time.Minute

// sessionStore keeps sessions and pending sign-ins in a KV bucket shared
// by every console replica.
type sessionStore struct {
	kv  jetstream.KeyValue
	ttl time.Duration
	now func() time.Time
}

func randomToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

func hashed(prefix, secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return prefix + "." + hex.EncodeToString(sum[:])
}

func (s *sessionStore) create(ctx context.Context, p Principal) (string, session, error) {
	id := randomToken()
	now := s.now()
	sess := session{Principal: p, CSRF: randomToken(), Created: now, Expires: now.Add(s.ttl)}
	b, _ := json.Marshal(sess)
	if _, err := s.kv.Create(ctx, hashed("s", id), b); err != nil {
		return "", session{}, fmt.Errorf("create session: %w", err)
	}
	return id, sess, nil
}

// get returns the live session with this id; ok is false for an unknown
// or expired one.
func (s *sessionStore) get(ctx context.Context, id string) (session, bool, error) {
	if id == "" {
		return session{}, false, nil
	}
	e, err := s.kv.Get(ctx, hashed("s", id))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return session{}, false, nil
	}
	if err != nil {
		return session{}, false, fmt.Errorf("read session: %w", err)
	}
	var sess session
	if err := json.Unmarshal(e.Value(), &sess); err != nil || !s.now().Before(sess.Expires) {
		return session{}, false, nil
	}
	return sess, true, nil
}

func (s *sessionStore) end(ctx context.Context, id string) error {
	if id == "" {
		return nil
	}
	if err := s.kv.Purge(ctx, hashed("s", id)); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("end session: %w", err)
	}
	return nil
}

func (s *sessionStore) putLogin(ctx context.Context, state string, l pendingLogin) error {
	b, _ := json.Marshal(l)
	if _, err := s.kv.Create(ctx, hashed("l", state), b); err != nil {
		return fmt.Errorf("store sign-in: %w", err)
	}
	return nil
}

// takeLogin returns the pending sign-in of state and forgets it: a state
// is good for one answer of the provider.
func (s *sessionStore) takeLogin(ctx context.Context, state string) (pendingLogin, bool, error) {
	key := hashed("l", state)
	e, err := s.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return pendingLogin{}, false, nil
	}
	if err != nil {
		return pendingLogin{}, false, fmt.Errorf("read sign-in: %w", err)
	}
	// Deleting with the revision read makes a replayed answer lose the race.
	if err := s.kv.Purge(ctx, key, jetstream.LastRevision(e.Revision())); err != nil {
		return pendingLogin{}, false, nil
	}
	var l pendingLogin
	if err := json.Unmarshal(e.Value(), &l); err != nil || !s.now().Before(l.Expires) {
		return pendingLogin{}, false, nil
	}
	return l, true, nil
}

// localUser is a break-glass account of the users file.
type localUser struct {
	role Role
	hash []byte
}

// loadLocalUsers reads lines of "name role bcrypt-hash"; # starts a comment.
func loadLocalUsers(path string) (map[string]localUser, error) {
	users := map[string]localUser{}
	err := readFields(path, func(n int, f []string) error {
		if len(f) != 3 {
			return fmt.Errorf("line %d: want 'name role bcrypt-hash'", n)
		}
		role, err := ParseRole(f[1])
		if err != nil {
			return fmt.Errorf("line %d: %w", n, err)
		}
		if _, err := bcrypt.Cost([]byte(f[2])); err != nil {
			return fmt.Errorf("line %d: the hash of %s is not a bcrypt hash (easguard hash-password makes one): %w", n, f[0], err)
		}
		if _, dup := users[strings.ToLower(f[0])]; dup {
			return fmt.Errorf("line %d: %s is listed twice", n, f[0])
		}
		users[strings.ToLower(f[0])] = localUser{role: role, hash: []byte(f[2])}
		return nil
	})
	return users, err
}

// apiToken is an automation token of the tokens file.
type apiToken struct {
	name string
	role Role
	hash [sha256.Size]byte
}

// loadTokens reads lines of "name role sha256-hex-of-token".
func loadTokens(path string) ([]apiToken, error) {
	var tokens []apiToken
	err := readFields(path, func(n int, f []string) error {
		if len(f) != 3 {
			return fmt.Errorf("line %d: want 'name role sha256-hex-of-token'", n)
		}
		role, err := ParseRole(f[1])
		if err != nil {
			return fmt.Errorf("line %d: %w", n, err)
		}
		raw, err := hex.DecodeString(f[2])
		if err != nil || len(raw) != sha256.Size {
			return fmt.Errorf("line %d: the token of %s must be given as the hex SHA-256 of the token (easguard hash-password --token makes one)", n, f[0])
		}
		t := apiToken{name: f[0], role: role}
		copy(t.hash[:], raw)
		tokens = append(tokens, t)
		return nil
	})
	return tokens, err
}

func readFields(path string, line func(n int, fields []string) error) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		if err := line(n, strings.Fields(text)); err != nil {
			return err
		}
	}
	return sc.Err()
}

// HashToken returns what the tokens file holds for token.
func HashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// HashPassword returns what the users file holds for password.
func HashPassword(password string) (string, error) {
	if len(password) < 12 {
		return "", errors.New("a break-glass password needs at least 12 characters")
	}
	h, err := bcrypt.GenerateFromPassword([]byte(password), 12)
	return string(h), err
}

// authenticator checks the three ways in: OpenID Connect, the break-glass
// users file and API tokens. The files are read at start; a change needs
// a restart, as every other setting does.
type authenticator struct {
	cfg      Config
	redirect string
	users    map[string]localUser
	tokens   []apiToken
	// dummy is compared against when a user is unknown, so that the time
	// an answer takes does not tell which names exist.
	dummy []byte

	mu       sync.Mutex
	provider *oidc.Provider
	verifier *oidc.IDTokenVerifier
	oauth    *oauth2.Config
}

func newAuthenticator(cfg Config, redirect string) (*authenticator, error) {
	a := &authenticator{cfg: cfg, redirect: redirect}
	var err error
	if cfg.LocalUsersFile != "" {
		if a.users, err = loadLocalUsers(cfg.LocalUsersFile); err != nil {
			return nil, fmt.Errorf("console users file: %w", err)
		}
		// Only a console with local users compares passwords (a quarter
		// of a second to make, so not made for nothing).
		a.dummy, _ = bcrypt.GenerateFromPassword([]byte(randomToken()), 12)
	}
	if cfg.TokensFile != "" {
		if a.tokens, err = loadTokens(cfg.TokensFile); err != nil {
			return nil, fmt.Errorf("console tokens file: %w", err)
		}
	}
	return a, nil
}

// oidcClient discovers the provider on first use, so that a provider down
// while easguard starts delays sign-ins, not the workers.
func (a *authenticator) oidcClient(ctx context.Context) (*oauth2.Config, *oidc.IDTokenVerifier, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.oauth != nil {
		return a.oauth, a.verifier, nil
	}
	p, err := oidc.NewProvider(ctx, a.cfg.OIDCIssuer)
	if err != nil {
		return nil, nil, fmt.Errorf("discover OpenID provider %s: %w", a.cfg.OIDCIssuer, err)
	}
	a.provider = p
	a.verifier = p.Verifier(&oidc.Config{ClientID: a.cfg.OIDCClientID})
	a.oauth = &oauth2.Config{ClientID: a.cfg.OIDCClientID, ClientSecret: a.cfg.OIDCClientSecret.Reveal(),
		Endpoint: p.Endpoint(), RedirectURL: a.redirect, Scopes: a.cfg.OIDCScopes}
	return a.oauth, a.verifier, nil
}

// ErrNoRole is returned when a user proved who they are but holds none of
// easguard's roles.
var ErrNoRole = errors.New("signed in, but without an easguard role")

// oidcPrincipal turns a verified ID token into a principal, its role the
// strongest its roles claim grants.
func (a *authenticator) oidcPrincipal(tok *oidc.IDToken) (Principal, error) {
	var claims map[string]any
	if err := tok.Claims(&claims); err != nil {
		return Principal{}, fmt.Errorf("read ID token claims: %w", err)
	}
	name := tok.Subject
	for _, k := range []string{"preferred_username", "email", "upn"} {
		if v, ok := claims[k].(string); ok && v != "" {
			name = v
			break
		}
	}
	var values []string
	switch v := claims[a.cfg.OIDCRolesClaim].(type) {
	case string:
		values = []string{v}
	case []any:
		for _, x := range v {
			if s, ok := x.(string); ok {
				values = append(values, s)
			}
		}
	}
	role := RoleNone
	for _, v := range values {
		switch {
		case slices.Contains(a.cfg.OIDCDeviceAdminRoles, v):
			role = max(role, RoleDeviceAdmin)
		case slices.Contains(a.cfg.OIDCOperatorRoles, v):
			role = max(role, RoleOperator)
		case slices.Contains(a.cfg.OIDCViewerRoles, v):
			role = max(role, RoleViewer)
		}
	}
	if role == RoleNone {
		return Principal{Name: name, Via: "oidc"}, fmt.Errorf("%w: %s's %q claim holds none of the configured values", ErrNoRole, name, a.cfg.OIDCRolesClaim)
	}
	return Principal{Name: name, Role: role, Via: "oidc"}, nil
}

// ErrBadCredentials is returned for a wrong user name, password or token.
var ErrBadCredentials = errors.New("wrong user name or password")

// local checks a break-glass sign-in.
func (a *authenticator) local(name, password string) (Principal, error) {
	u, ok := a.users[strings.ToLower(name)]
	hash := u.hash
	if !ok {
		hash = a.dummy
	}
	if bcrypt.CompareHashAndPassword(hash, []byte(password)) != nil || !ok {
		return Principal{}, ErrBadCredentials
	}
	return Principal{Name: strings.ToLower(name), Role: u.role, Via: "local"}, nil
}

// token checks an API token.
func (a *authenticator) token(tok string) (Principal, bool) {
	sum := sha256.Sum256([]byte(tok))
	var found *apiToken
	for i := range a.tokens {
		if subtle.ConstantTimeCompare(sum[:], a.tokens[i].hash[:]) == 1 {
			found = &a.tokens[i]
		}
	}
	if found == nil {
		return Principal{}, false
	}
	return Principal{Name: "token:" + found.name, Role: found.role, Via: "token"}, true
}
