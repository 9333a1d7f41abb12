package winauth

import (
	"bytes"
	"crypto/hmac"
	"crypto/md5"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf16"

	"golang.org/x/crypto/md4"
)

// NEGOTIATE flags from MS-NLMP 2.2.2.5 that the server sets or inspects.
const (
	flagUnicode                 uint32 = 0x00000001
	flagRequestTarget           uint32 = 0x00000004
	flagLMKey                   uint32 = 0x00000080
	flagNTLM                    uint32 = 0x00000200
	flagAnonymous               uint32 = 0x00000800
	flagAlwaysSign              uint32 = 0x00008000
	flagTargetTypeDomain        uint32 = 0x00010000
	flagExtendedSessionSecurity uint32 = 0x00080000
	flagTargetInfo              uint32 = 0x00800000
	flagVersion                 uint32 = 0x02000000
	flag128                     uint32 = 0x20000000
	flagKeyExch                 uint32 = 0x40000000
	flag56                      uint32 = 0x80000000
)

// challengeFlags are the flags of every CHALLENGE. LM_KEY is never offered, and
// SIGN, SEAL and KEY_EXCH only when the client's NEGOTIATE asks for them (see
// offeredFlags), as Windows does: Azure/go-ntlmssp, which does no session security,
// refuses a CHALLENGE carrying KEY_EXCH or LM_KEY.
const challengeFlags = flagUnicode | flagRequestTarget | flagNTLM | flagAlwaysSign |
	flagExtendedSessionSecurity | flagTargetTypeDomain | flagTargetInfo | flagVersion |
	flag128 | flag56

// Message types from MS-NLMP 2.2.1.
const (
	msgNegotiate    uint32 = 1
	msgChallenge    uint32 = 2
	msgAuthenticate uint32 = 3
)

// AV_PAIR identifiers from MS-NLMP 2.2.2.1.
const (
	avEOL             uint16 = 0
	avNbComputerName  uint16 = 1
	avNbDomainName    uint16 = 2
	avDNSComputerName uint16 = 3
	avDNSDomainName   uint16 = 4
	avTimestamp       uint16 = 7
)

// Sizes from MS-NLMP 2.2.1.2, 2.2.1.3 and 2.2.2.7.
const (
	challengeHeaderLen    = 56 // including the 8-byte VERSION
	authenticateHeaderLen = 64 // without VERSION and MIC, which are optional
	ntProofLen            = 16
	ntlmV1ResponseLen     = 24
	// minBlobLen covers RespType, HiRespType, Reserved1, Reserved2, TimeStamp,
	// ChallengeFromClient and Reserved3 of the NTLMv2_CLIENT_CHALLENGE.
	minBlobLen = 28
)

// windowsEpochOffset is the number of 100ns intervals between 1601-01-01 (FILETIME
// epoch) and 1970-01-01 (Unix epoch).
const windowsEpochOffset = 116444736000000000

// ntlmSignature starts every NTLMSSP message.
var ntlmSignature = []byte("NTLMSSP\x00")

// serverVersion is the VERSION structure of Windows Server 2019 (10.0.17763), the
// platform Exchange 2019 runs on, with NTLMSSP_REVISION_W2K3.
var serverVersion = [8]byte{10, 0, 0x63, 0x45, 0, 0, 0, 0x0f}

// Reasons for rejecting NTLM messages. They never carry user input beyond lengths
// and types, and never carry secrets, so they are safe for Options.OnFailure.
var (
	errNotNTLMSSP     = errors.New("token is not a raw NTLMSSP message (SPNEGO is not supported)")
	errMalformed      = errors.New("malformed NTLMSSP message")
	errUnexpectedType = errors.New("unexpected NTLMSSP message type")
	errNoChallenge    = errors.New("AUTHENTICATE without a pending CHALLENGE on this connection")
	errAnonymous      = errors.New("anonymous AUTHENTICATE rejected")
	errNTLMv1         = errors.New("NTLMv1/LM response rejected, NTLMv2 required")
	errBadProof       = errors.New("NTLMv2 proof does not match")
)

// messageType returns the type of an NTLMSSP message, which also tells a raw
// NTLMSSP token apart from a SPNEGO-wrapped one.
func messageType(msg []byte) (uint32, error) {
	if len(msg) < 12 || !bytes.Equal(msg[:8], ntlmSignature) {
		return 0, errNotNTLMSSP
	}
	return binary.LittleEndian.Uint32(msg[8:12]), nil
}

// serverIdentity is what the CHALLENGE tells the client about the server. The
// client hashes TargetName as the domain, so it must be stable for a server.
type serverIdentity struct {
	nbDomain, dnsDomain, nbComputer, dnsComputer string
}

// sessionSecurityFlags are the flags a client may ask for to get session security.
const sessionSecurityFlags = flagSign | flagSeal | flagKeyExch

// offeredFlags answers a NEGOTIATE: the fixed flags plus the session security the
// client asked for.
func offeredFlags(negotiate []byte) uint32 {
	if len(negotiate) < 16 {
		return challengeFlags
	}
	return challengeFlags | binary.LittleEndian.Uint32(negotiate[12:16])&sessionSecurityFlags
}

// buildChallenge encodes a CHALLENGE_MESSAGE (MS-NLMP 2.2.1.2) with challengeFlags.
func buildChallenge(serverChallenge [8]byte, id serverIdentity, now time.Time) []byte {
	return buildChallengeFlags(serverChallenge, id, now, challengeFlags)
}

// buildChallengeFlags encodes a CHALLENGE_MESSAGE offering flags.
func buildChallengeFlags(serverChallenge [8]byte, id serverIdentity, now time.Time, flags uint32) []byte {
	targetName := utf16le(id.nbDomain)

	var info bytes.Buffer
	putAV := func(avID uint16, value []byte) {
		var hdr [4]byte
		binary.LittleEndian.PutUint16(hdr[0:2], avID)
		binary.LittleEndian.PutUint16(hdr[2:4], uint16(len(value)))
		info.Write(hdr[:])
		info.Write(value)
	}
	putAV(avNbDomainName, utf16le(id.nbDomain))
	putAV(avNbComputerName, utf16le(id.nbComputer))
	putAV(avDNSDomainName, utf16le(id.dnsDomain))
	putAV(avDNSComputerName, utf16le(id.dnsComputer))
	var ts [8]byte
	binary.LittleEndian.PutUint64(ts[:], fileTime(now))
	putAV(avTimestamp, ts[:])
	putAV(avEOL, nil)

	msg := make([]byte, challengeHeaderLen, challengeHeaderLen+len(targetName)+info.Len())
	copy(msg[0:8], ntlmSignature)
	binary.LittleEndian.PutUint32(msg[8:12], msgChallenge)
	putVarField(msg[12:20], len(targetName), challengeHeaderLen)
	binary.LittleEndian.PutUint32(msg[20:24], flags)
	copy(msg[24:32], serverChallenge[:])
	// msg[32:40] is Reserved and stays zero.
	putVarField(msg[40:48], info.Len(), challengeHeaderLen+len(targetName))
	copy(msg[48:56], serverVersion[:])
	msg = append(msg, targetName...)
	msg = append(msg, info.Bytes()...)
	return msg
}

// putVarField writes the Len, MaxLen and BufferOffset of a payload field.
func putVarField(dst []byte, length, offset int) {
	binary.LittleEndian.PutUint16(dst[0:2], uint16(length))
	binary.LittleEndian.PutUint16(dst[2:4], uint16(length))
	binary.LittleEndian.PutUint32(dst[4:8], uint32(offset))
}

// authenticateMessage holds the fields of an AUTHENTICATE_MESSAGE the server uses.
type authenticateMessage struct {
	flags      uint32
	lmResponse []byte
	ntResponse []byte
	domain     string
	user       string
	// sessionKey is the EncryptedRandomSessionKey, set with KEY_EXCH.
	sessionKey []byte
}

// parseAuthenticate decodes an AUTHENTICATE_MESSAGE (MS-NLMP 2.2.1.3), checking
// every payload reference against the message bounds because the bytes come
// straight from the network.
func parseAuthenticate(msg []byte) (*authenticateMessage, error) {
	typ, err := messageType(msg)
	if err != nil {
		return nil, err
	}
	if typ != msgAuthenticate {
		return nil, fmt.Errorf("got type %d, want AUTHENTICATE: %w", typ, errUnexpectedType)
	}
	if len(msg) < authenticateHeaderLen {
		return nil, fmt.Errorf("AUTHENTICATE is %d bytes: %w", len(msg), errMalformed)
	}
	field := func(at int) ([]byte, error) {
		length := int(binary.LittleEndian.Uint16(msg[at : at+2]))
		offset := int(binary.LittleEndian.Uint32(msg[at+4 : at+8]))
		if length == 0 {
			return nil, nil
		}
		if offset > len(msg) || length > len(msg)-offset {
			return nil, fmt.Errorf("field at %d points outside the message: %w", at, errMalformed)
		}
		return msg[offset : offset+length], nil
	}
	am := &authenticateMessage{flags: binary.LittleEndian.Uint32(msg[60:64])}
	if am.lmResponse, err = field(12); err != nil {
		return nil, err
	}
	if am.ntResponse, err = field(20); err != nil {
		return nil, err
	}
	rawDomain, err := field(28)
	if err != nil {
		return nil, err
	}
	rawUser, err := field(36)
	if err != nil {
		return nil, err
	}
	if am.sessionKey, err = field(52); err != nil {
		return nil, err
	}
	if am.domain, err = decodeString(rawDomain, am.flags); err != nil {
		return nil, fmt.Errorf("domain name: %w", err)
	}
	if am.user, err = decodeString(rawUser, am.flags); err != nil {
		return nil, fmt.Errorf("user name: %w", err)
	}
	return am, nil
}

// decodeString decodes a payload string, UTF-16LE when NEGOTIATE_UNICODE is set and
// the OEM code page otherwise (treated as Latin-1, which covers the ASCII names a
// simulator deals with).
func decodeString(raw []byte, flags uint32) (string, error) {
	if flags&flagUnicode == 0 {
		runes := make([]rune, len(raw))
		for i, b := range raw {
			runes[i] = rune(b)
		}
		return string(runes), nil
	}
	if len(raw)%2 != 0 {
		return "", fmt.Errorf("odd-length UTF-16 string: %w", errMalformed)
	}
	units := make([]uint16, len(raw)/2)
	for i := range units {
		units[i] = binary.LittleEndian.Uint16(raw[2*i:])
	}
	return string(utf16.Decode(units)), nil
}

// checkNTLMv2Shape rejects the AUTHENTICATE messages the simulator must not accept
// whatever the password: anonymous logons, and NTLMv1 or LM-only responses, which
// Exchange servers disable and whose acceptance would hide a downgraded client.
func checkNTLMv2Shape(am *authenticateMessage) error {
	if am.flags&flagAnonymous != 0 || am.user == "" {
		return errAnonymous
	}
	if len(am.ntResponse) == 0 {
		if len(am.lmResponse) > 1 {
			return errNTLMv1 // LM-only
		}
		return errAnonymous
	}
	if len(am.ntResponse) <= ntlmV1ResponseLen {
		return errNTLMv1
	}
	if len(am.ntResponse) < ntProofLen+minBlobLen {
		return fmt.Errorf("NTLMv2 response is %d bytes: %w", len(am.ntResponse), errMalformed)
	}
	blob := am.ntResponse[ntProofLen:]
	if blob[0] != 1 || blob[1] != 1 {
		return fmt.Errorf("NTLMv2 response version %d.%d: %w", blob[0], blob[1], errMalformed)
	}
	return nil
}

// ntowfv2 computes the NTLMv2 response key (MS-NLMP 3.3.2):
// HMAC-MD5(MD4(UTF-16LE(password)), UTF-16LE(UPPER(user) + domain)).
// The domain keeps its case, exactly as the client sent it.
func ntowfv2(password, user, domain string) []byte {
	return hmacMD5(ntHash(password), utf16le(strings.ToUpper(user)+domain))
}

// ntHash is NTOWFv1, MD4(UTF-16LE(password)), the secret both sides derive.
func ntHash(password string) []byte {
	h := md4.New()
	h.Write(utf16le(password))
	return h.Sum(nil)
}

// verifyNTLMv2 checks NTProofStr = HMAC-MD5(key, serverChallenge || blob), where the
// NtChallengeResponse is NTProofStr followed by blob.
func verifyNTLMv2(responseKeyNT []byte, serverChallenge [8]byte, ntResponse []byte) error {
	if len(ntResponse) < ntProofLen+minBlobLen {
		return fmt.Errorf("NTLMv2 response is %d bytes: %w", len(ntResponse), errMalformed)
	}
	want := hmacMD5(responseKeyNT, serverChallenge[:], ntResponse[ntProofLen:])
	if !hmac.Equal(want, ntResponse[:ntProofLen]) {
		return errBadProof
	}
	return nil
}

// hmacMD5 is HMAC_MD5 over the concatenation of data.
func hmacMD5(key []byte, data ...[]byte) []byte {
	mac := hmac.New(md5.New, key)
	for _, d := range data {
		mac.Write(d)
	}
	return mac.Sum(nil)
}

// utf16le encodes s the way NTLM encodes every Unicode string.
func utf16le(s string) []byte {
	units := utf16.Encode([]rune(s))
	out := make([]byte, 2*len(units))
	for i, u := range units {
		binary.LittleEndian.PutUint16(out[2*i:], u)
	}
	return out
}

// fileTime converts t to a Windows FILETIME (100ns intervals since 1601), the
// encoding of MsvAvTimestamp.
func fileTime(t time.Time) uint64 {
	return uint64(t.Unix()*10_000_000 + int64(t.Nanosecond())/100 + windowsEpochOffset)
}
