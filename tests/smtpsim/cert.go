package smtpsim

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"time"
)

// serverTLS returns the TLS configuration to serve and its certificate in
// PEM: the caller's configuration when given, else a fresh self-signed one.
func serverTLS(cfg *tls.Config) (*tls.Config, []byte, error) {
	if cfg != nil {
		p, err := certPEMOf(cfg)
		if err != nil {
			return nil, nil, err
		}
		return cfg, p, nil
	}
	return SelfSignedTLS("localhost", "127.0.0.1", "::1")
}

// SelfSignedTLS returns a server TLS configuration with a fresh self-signed
// certificate for hosts (names or IP addresses) and that certificate in
// PEM. The default relay uses it for the loopback names; a test passes
// other names as Config.TLS to prove a client checks the host name. The
// certificate is its own CA, so a client that trusts the PEM verifies it
// like a real chain and a client that trusts only the system roots
// rejects it.
func SelfSignedTLS(hosts ...string) (*tls.Config, []byte, error) {
	cert, p, err := selfSigned(hosts)
	if err != nil {
		return nil, nil, fmt.Errorf("self-signed certificate: %w", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, p, nil
}

func selfSigned(hosts []string) (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("generate serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "smtpsim", Organization: []string{"easguard smtpsim"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("create certificate: %w", err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}
