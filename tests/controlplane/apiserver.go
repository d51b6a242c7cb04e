package main

import (
	"context"
	"fmt"
	"net"
	"strconv"

	"github.com/spf13/pflag"
	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/rest"
	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	apiserveroptions "k8s.io/kubernetes/cmd/kube-apiserver/app/options"
)

// serviceAccountIssuer is what a real cluster would use; tokens are only ever checked by this apiserver.
const serviceAccountIssuer = "https://kubernetes.default.svc.cluster.local"

// apiserverArgs are kube-apiserver's own command-line flags, so this reads like any cluster's manifest.
// admissionPlugins, when not empty, is passed as --enable-admission-plugins (added to the default set), so a test
// can run the API server the way stricter distributions do (OpenShift enables OwnerReferencesPermissionEnforcement).
func apiserverArgs(port int, etcdURL string, p *pki, admissionPlugins string) []string {
	args := []string{
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--etcd-servers=" + etcdURL,
		"--tls-cert-file=" + p.Serving.CertFile,
		"--tls-private-key-file=" + p.Serving.KeyFile,
		"--client-ca-file=" + p.CA.CertFile,
		"--authorization-mode=RBAC",
		"--service-account-issuer=" + serviceAccountIssuer,
		"--service-account-key-file=" + p.ServiceAccountKey,
		"--service-account-signing-key-file=" + p.ServiceAccountKey,
		"--service-cluster-ip-range=10.96.0.0/16",
		// The endpoints of the "kubernetes" Service may not be a loopback address, and no pod could use them.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
	}
	if admissionPlugins != "" {
		args = append(args, "--enable-admission-plugins="+admissionPlugins)
	}
	return args
}

// startAPIServer runs kube-apiserver in this process on ln until ctx ends; the channel gets its exit error.
func startAPIServer(ctx context.Context, ln net.Listener, etcdURL string, p *pki, admissionPlugins string) (<-chan error, error) {
	// The apiserver's own loopback client would otherwise log every deprecation warning it triggers.
	rest.SetDefaultWarningHandler(rest.NoWarnings{})

	s := apiserveroptions.NewServerRunOptions()
	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	for _, f := range s.Flags().FlagSets {
		fs.AddFlagSet(f)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	if err := fs.Parse(apiserverArgs(port, etcdURL, p, admissionPlugins)); err != nil {
		return nil, err
	}
	s.SecureServing.Listener = ln
	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return nil, err
	}
	completed, err := s.Complete(ctx)
	if err != nil {
		return nil, err
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return nil, utilerrors.NewAggregate(errs)
	}
	done := make(chan error, 1)
	go func() {
		err := apiserverapp.Run(ctx, completed)
		if err == nil && ctx.Err() == nil {
			err = fmt.Errorf("exited without being asked to")
		}
		done <- err
	}()
	return done, nil
}
