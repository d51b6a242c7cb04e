package main

import (
	"os"
	"path/filepath"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// writeKubeconfig writes a self-contained kubeconfig (certificates inline) for user kp.
func writeKubeconfig(path, server string, p *pki, kp keyPair) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["semipd"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: p.CA.CertPEM}
	cfg.AuthInfos["semipd"] = &clientcmdapi.AuthInfo{ClientCertificateData: kp.CertPEM, ClientKeyData: kp.KeyPEM}
	cfg.Contexts["semipd"] = &clientcmdapi.Context{Cluster: "semipd", AuthInfo: "semipd", Namespace: "default"}
	cfg.CurrentContext = "semipd"
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	// WriteToFile keeps 0600 on new files: the file holds the admin's private key.
	return clientcmd.WriteToFile(*cfg, path)
}
