package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// keyPair is a certificate and its key, both as files (for the components' flags) and as PEM (for kubeconfigs).
type keyPair struct {
	CertFile, KeyFile string
	CertPEM, KeyPEM   []byte
}

// pki is everything the control plane authenticates with. It is made fresh on every start: the data dir
// belongs to one test session, and nothing outside the process trusts these keys.
type pki struct {
	CA                keyPair
	Serving           keyPair
	Admin             keyPair // in system:masters: the test harness is the cluster admin
	ControllerManager keyPair // system:kube-controller-manager, bound by the bootstrap RBAC policy
	// ServiceAccountKey signs service-account tokens (apiserver TokenRequest and the token controller).
	ServiceAccountKey string
}

// serviceIP is the first address of --service-cluster-ip-range; in-cluster clients reach the apiserver there.
const serviceIP = "10.96.0.1"

func writePKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "semipd-controlplane-ca"},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	ca, caCert, err := issue(dir, "ca", caTmpl, caKey, nil, nil)
	if err != nil {
		return nil, err
	}
	p := &pki{CA: ca}

	serving := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1"), net.ParseIP(serviceIP)},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
	}
	if p.Serving, err = issueLeaf(dir, "apiserver", serving, caCert, caKey); err != nil {
		return nil, err
	}
	if p.Admin, err = issueLeaf(dir, "admin", client("semipd-admin", "system:masters"), caCert, caKey); err != nil {
		return nil, err
	}
	if p.ControllerManager, err = issueLeaf(dir, "controller-manager", client("system:kube-controller-manager"), caCert, caKey); err != nil {
		return nil, err
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	p.ServiceAccountKey = filepath.Join(dir, "service-account.key")
	if err := writeKey(p.ServiceAccountKey, saKey); err != nil {
		return nil, err
	}
	return p, nil
}

func client(user string, groups ...string) *x509.Certificate {
	return &x509.Certificate{
		Subject:     pkix.Name{CommonName: user, Organization: groups},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
}

func issueLeaf(dir, name string, tmpl, caCert *x509.Certificate, caKey crypto.Signer) (keyPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return keyPair{}, err
	}
	kp, _, err := issue(dir, name, tmpl, key, caCert, caKey)
	return kp, err
}

// issue signs tmpl for key with the CA (self-signed when caCert is nil) and writes NAME.crt and NAME.key.
func issue(dir, name string, tmpl *x509.Certificate, key *ecdsa.PrivateKey, caCert *x509.Certificate, caKey crypto.Signer) (keyPair, *x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return keyPair{}, nil, err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Hour) // tolerate small clock skew
	tmpl.NotAfter = time.Now().Add(365 * 24 * time.Hour)
	parent, signer := tmpl, crypto.Signer(key)
	if caCert != nil {
		parent, signer = caCert, caKey
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), signer)
	if err != nil {
		return keyPair{}, nil, fmt.Errorf("sign %s: %w", name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return keyPair{}, nil, err
	}
	kp := keyPair{CertFile: filepath.Join(dir, name+".crt"), KeyFile: filepath.Join(dir, name+".key")}
	kp.CertPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.WriteFile(kp.CertFile, kp.CertPEM, 0o644); err != nil {
		return keyPair{}, nil, err
	}
	if err := writeKey(kp.KeyFile, key); err != nil {
		return keyPair{}, nil, err
	}
	if kp.KeyPEM, err = os.ReadFile(kp.KeyFile); err != nil {
		return keyPair{}, nil, err
	}
	return kp, cert, nil
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}
