package main

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// waitAPIServerReady polls /readyz as the admin until it answers "ok".
func waitAPIServerReady(ctx context.Context, server string, p *pki, apiDone <-chan error) error {
	cfg := &rest.Config{Host: server, TLSClientConfig: rest.TLSClientConfig{
		CAData: p.CA.CertPEM, CertData: p.Admin.CertPEM, KeyData: p.Admin.KeyPEM}}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	var last error
	return poll(ctx, apiDone, "kube-apiserver /readyz", func() (bool, error) {
		_, last = client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return last == nil, last
	})
}

// waitControllersWorking waits for the "default" ServiceAccount of namespace "default": the service-account
// controller makes it, so its presence shows the controller manager is up, authenticated and authorized.
func waitControllersWorking(ctx context.Context, kubeconfig string, kcmDone <-chan error) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	return poll(ctx, kcmDone, "ServiceAccount default/default from kube-controller-manager", func() (bool, error) {
		_, err := client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err == nil, err
	})
}

// poll calls check until it succeeds, the component exits, or ctx ends; the error names what was awaited.
func poll(ctx context.Context, exited <-chan error, what string, check func() (bool, error)) error {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := check()
		if ok {
			return nil
		}
		select {
		case exitErr := <-exited:
			return fmt.Errorf("waiting for %s: component exited: %v", what, exitErr)
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %v (last error: %v)", what, ctx.Err(), err)
		case <-tick.C:
		}
	}
}
