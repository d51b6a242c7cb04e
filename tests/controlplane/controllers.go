package main

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/spf13/pflag"
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kcmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
)

func controllerManagerArgs(kubeconfig, dataDir string, p *pki) []string {
	return []string{
		"--kubeconfig=" + kubeconfig,
		// One instance, and its HTTPS endpoint would only be another port to collide on.
		"--leader-elect=false",
		"--secure-port=0",
		"--controllers=*",
		// Each controller acts as its own service account, as in a real cluster, so RBAC is exercised.
		"--use-service-account-credentials=true",
		"--service-account-private-key-file=" + p.ServiceAccountKey,
		"--root-ca-file=" + p.CA.CertFile,
		"--cluster-signing-cert-file=" + p.CA.CertFile,
		"--cluster-signing-key-file=" + p.CA.KeyFile,
		"--cluster-name=semipd",
		// The default is under /usr/libexec, which it would try to create.
		"--flex-volume-plugin-dir=" + filepath.Join(dataDir, "flexvolume"),
	}
}

// startControllerManager runs kube-controller-manager in this process until ctx ends.
func startControllerManager(ctx context.Context, kubeconfig, dataDir string, p *pki) (<-chan error, error) {
	s, err := kcmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return nil, err
	}
	known, disabled, aliases := kcmapp.KnownControllers(), kcmapp.ControllersDisabledByDefault(), kcmapp.ControllerAliases()
	named := s.Flags(known, disabled, aliases)
	s.ParsedFlags = &named
	fs := pflag.NewFlagSet("kube-controller-manager", pflag.ContinueOnError)
	for _, f := range named.FlagSets {
		fs.AddFlagSet(f)
	}
	if err := fs.Parse(controllerManagerArgs(kubeconfig, dataDir, p)); err != nil {
		return nil, err
	}
	if err := s.ComponentGlobalsRegistry.Set(); err != nil {
		return nil, err
	}
	c, err := s.Config(ctx, known, disabled, aliases)
	if err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() {
		err := kcmapp.Run(ctx, c.Complete())
		if err == nil && ctx.Err() == nil {
			err = fmt.Errorf("exited without being asked to")
		}
		done <- err
	}()
	return done, nil
}
