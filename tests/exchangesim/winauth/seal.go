package winauth

import (
	"bytes"
	"crypto/md5"
	"crypto/rc4"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"mime"
	"strconv"
	"strings"
	"sync"
)

// The server side of NTLM session security (MS-NLMP 3.4) and of MS-WSMV
// session-encrypted messages (reference/winrm.md §4.6): what a Windows WinRM
// listener does over plain HTTP when a client negotiated NTLM with sealing.
// It is written from the specifications, not from a client library, so that
// the real clients under test are checked against an independent peer.

// Flags of session security (MS-NLMP 2.2.2.5).
const (
	flagSign uint32 = 0x00000010
	flagSeal uint32 = 0x00000020
)

// Wire names of session-encrypted messages.
const (
	sealProtocol    = "application/HTTP-SPNEGO-session-encrypted"
	sealBoundary    = "Encrypted Boundary"
	sealContentType = `multipart/encrypted;protocol="` + sealProtocol + `";boundary="` + sealBoundary + `"`
	signatureLen    = 16
)

// Magic constants of MS-NLMP 3.4.5.2 and 3.4.5.3, NUL-terminated.
var (
	clientSignMagic = []byte("session key to client-to-server signing key magic constant\x00")
	serverSignMagic = []byte("session key to server-to-client signing key magic constant\x00")
	clientSealMagic = []byte("session key to client-to-server sealing key magic constant\x00")
	serverSealMagic = []byte("session key to server-to-client sealing key magic constant\x00")
)

// Reasons a sealed message is refused.
var (
	errNotSealable  = errors.New("session security needs NTLMv2 extended session security with sealing")
	errSealFormat   = errors.New("malformed session-encrypted message")
	errBadSignature = errors.New("NTLM message signature does not match")
	errBadSequence  = errors.New("NTLM message sequence number out of order")
	errBadLength    = errors.New("unsealed length differs from OriginalContent")
	errNoSession    = errors.New("sealed message on a connection without an NTLM security context")
	errUnencrypted  = errors.New("unencrypted message over HTTP refused (AllowUnencrypted=false)")
)

// sealSession is the server's security context of one connection: a
// continuous RC4 stream and a sequence number per direction.
type sealSession struct {
	mu               sync.Mutex
	keyExch          bool
	sendSign         []byte
	recvSign         []byte
	send, recv       *rc4.Cipher
	sendSeq, recvSeq uint32
}

// sessionBaseKey is the NTLMv2 SessionBaseKey (MS-NLMP 3.3.2):
// HMAC-MD5(ResponseKeyNT, NTProofStr).
func sessionBaseKey(responseKeyNT, ntResponse []byte) []byte {
	return hmacMD5(responseKeyNT, ntResponse[:ntProofLen])
}

// exportedSessionKey recovers the key both sides derive their session keys
// from (MS-NLMP 3.2.5.1.2): with KEY_EXCH the client chose it and sent it
// RC4-encrypted under the key exchange key (the SessionBaseKey for NTLMv2).
func exportedSessionKey(flags uint32, baseKey, encryptedRandomKey []byte) ([]byte, error) {
	if flags&flagKeyExch == 0 {
		return baseKey, nil
	}
	if len(encryptedRandomKey) != 16 {
		return nil, fmt.Errorf("EncryptedRandomSessionKey is %d bytes: %w", len(encryptedRandomKey), errMalformed)
	}
	c, err := rc4.NewCipher(baseKey)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 16)
	c.XORKeyStream(out, encryptedRandomKey)
	return out, nil
}

// newSealSession derives the server's keys (MS-NLMP 3.4.5.2, 3.4.5.3). Only
// NTLMv2-style session security with sealing is accepted: that is what
// WinRM clients negotiate, and anything weaker must not pass for "encrypted".
func newSealSession(flags uint32, exported []byte) (*sealSession, error) {
	if flags&flagExtendedSessionSecurity == 0 || flags&flagSeal == 0 {
		return nil, errNotSealable
	}
	sealKey := func(magic []byte) []byte {
		k := exported
		switch {
		case flags&flag128 != 0:
		case flags&flag56 != 0:
			k = exported[:7]
		default:
			k = exported[:5]
		}
		sum := md5.Sum(append(append([]byte{}, k...), magic...))
		return sum[:]
	}
	signKey := func(magic []byte) []byte {
		sum := md5.Sum(append(append([]byte{}, exported...), magic...))
		return sum[:]
	}
	send, err := rc4.NewCipher(sealKey(serverSealMagic))
	if err != nil {
		return nil, err
	}
	recv, err := rc4.NewCipher(sealKey(clientSealMagic))
	if err != nil {
		return nil, err
	}
	return &sealSession{
		keyExch:  flags&flagKeyExch != 0,
		sendSign: signKey(serverSignMagic), recvSign: signKey(clientSignMagic),
		send: send, recv: recv,
	}, nil
}

// checksum is the first 8 bytes of HMAC-MD5(key, seq || msg), RC4-encrypted
// with the direction's stream when keys were exchanged (MS-NLMP 3.4.4.2).
func (s *sealSession) checksum(key []byte, stream *rc4.Cipher, seq uint32, msg []byte) []byte {
	var seqBytes [4]byte
	binary.LittleEndian.PutUint32(seqBytes[:], seq)
	sum := hmacMD5(key, seqBytes[:], msg)[:8]
	if s.keyExch {
		stream.XORKeyStream(sum, sum)
	}
	return sum
}

// seal encrypts msg for the client and signs it (GSS_WrapEx).
func (s *sealSession) seal(msg []byte) (signature, sealed []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sealed = make([]byte, len(msg))
	s.send.XORKeyStream(sealed, msg)
	signature = make([]byte, signatureLen)
	binary.LittleEndian.PutUint32(signature[0:4], 1)
	copy(signature[4:12], s.checksum(s.sendSign, s.send, s.sendSeq, msg))
	binary.LittleEndian.PutUint32(signature[12:16], s.sendSeq)
	s.sendSeq++
	return signature, sealed
}

// unseal decrypts a client message and checks its signature and sequence
// number (GSS_UnwrapEx). A failure leaves the streams out of step, so the
// caller must drop the session.
func (s *sealSession) unseal(signature, sealed []byte) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(signature) != signatureLen || binary.LittleEndian.Uint32(signature[0:4]) != 1 {
		return nil, fmt.Errorf("signature version: %w", errBadSignature)
	}
	msg := make([]byte, len(sealed))
	s.recv.XORKeyStream(msg, sealed)
	want := s.checksum(s.recvSign, s.recv, s.recvSeq, msg)
	if subtle.ConstantTimeCompare(want, signature[4:12]) != 1 {
		return nil, errBadSignature
	}
	if binary.LittleEndian.Uint32(signature[12:16]) != s.recvSeq {
		return nil, errBadSequence
	}
	s.recvSeq++
	return msg, nil
}

// isSealedContent reports whether a Content-Type announces a
// session-encrypted body.
func isSealedContent(ctype string) bool {
	mt, params, err := mime.ParseMediaType(ctype)
	return err == nil && strings.EqualFold(mt, "multipart/encrypted") && strings.EqualFold(params["protocol"], sealProtocol)
}

// parseSealed takes an MS-WSMV session-encrypted body apart: a header part
// whose OriginalContent names the plaintext length, then an octet-stream
// part with a 4-byte little-endian signature length, the signature and the
// sealed bytes, then the closing boundary. The binary part is taken by
// position, never line by line.
func parseSealed(raw []byte) (signature, sealed []byte, length int, err error) {
	open := []byte("--" + sealBoundary + "\r\n")
	end := []byte("--" + sealBoundary + "--\r\n")
	rest, ok := bytes.CutPrefix(raw, open)
	if !ok {
		return nil, nil, 0, fmt.Errorf("no opening boundary: %w", errSealFormat)
	}
	header, rest, ok := bytes.Cut(rest, open)
	if !ok {
		return nil, nil, 0, fmt.Errorf("no second part: %w", errSealFormat)
	}
	if !bytes.Contains(header, []byte("Content-Type: "+sealProtocol+"\r\n")) {
		return nil, nil, 0, fmt.Errorf("first part is not %s: %w", sealProtocol, errSealFormat)
	}
	_, lenText, ok := bytes.Cut(header, []byte("Length="))
	if !ok {
		return nil, nil, 0, fmt.Errorf("no OriginalContent length: %w", errSealFormat)
	}
	if length, err = strconv.Atoi(string(bytes.TrimSpace(lenText))); err != nil || length < 0 {
		return nil, nil, 0, fmt.Errorf("OriginalContent length %q: %w", bytes.TrimSpace(lenText), errSealFormat)
	}
	rest, ok = bytes.CutPrefix(rest, []byte("\tContent-Type: application/octet-stream\r\n"))
	if !ok {
		return nil, nil, 0, fmt.Errorf("second part is not application/octet-stream: %w", errSealFormat)
	}
	rest, ok = bytes.CutSuffix(rest, end)
	if !ok {
		return nil, nil, 0, fmt.Errorf("no closing boundary: %w", errSealFormat)
	}
	if len(rest) < 4 || binary.LittleEndian.Uint32(rest[:4]) != signatureLen || len(rest) < 4+signatureLen {
		return nil, nil, 0, fmt.Errorf("signature length: %w", errSealFormat)
	}
	return rest[4 : 4+signatureLen], rest[4+signatureLen:], length, nil
}

// frameSealed builds a session-encrypted body the way Windows does.
func frameSealed(signature, sealed []byte, length int) []byte {
	var b bytes.Buffer
	b.WriteString("--" + sealBoundary + "\r\n")
	b.WriteString("\tContent-Type: " + sealProtocol + "\r\n")
	b.WriteString("\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=" + strconv.Itoa(length) + "\r\n")
	b.WriteString("--" + sealBoundary + "\r\n")
	b.WriteString("\tContent-Type: application/octet-stream\r\n")
	var n [4]byte
	binary.LittleEndian.PutUint32(n[:], uint32(len(signature)))
	b.Write(n[:])
	b.Write(signature)
	b.Write(sealed)
	b.WriteString("--" + sealBoundary + "--\r\n")
	return b.Bytes()
}
