// Command semipd-controlplane runs a real Kubernetes control plane in one process for the cluster test
// tier: embedded etcd, kube-apiserver and kube-controller-manager, all on loopback. There is no kubelet and
// no scheduler, so pods stay Pending; everything the API and the controllers do is real.
//
// When it is ready it prints one line on stdout:
//
//	ready server=https://127.0.0.1:PORT kubeconfig=PATH
//
// and it shuts everything down on SIGTERM or SIGINT.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

type options struct {
	dataDir       string
	port          int
	kubeconfigOut string
	verbosity     int
	readyTimeout  time.Duration
	admission     string
}

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("semipd-controlplane", flag.ContinueOnError)
	fs.StringVar(&o.dataDir, "data-dir", "", "directory for etcd data, certificates and kubeconfigs (required)")
	fs.IntVar(&o.port, "port", 0, "kube-apiserver port on 127.0.0.1; 0 picks a free one")
	fs.StringVar(&o.kubeconfigOut, "kubeconfig-out", "", "where to write the admin kubeconfig (default DATA_DIR/admin.kubeconfig)")
	fs.IntVar(&o.verbosity, "v", 0, "klog verbosity of the Kubernetes components")
	fs.StringVar(&o.admission, "enable-admission-plugins", "", "kube-apiserver admission plugins to enable on top of the default set (comma-separated)")
	fs.DurationVar(&o.readyTimeout, "ready-timeout", 3*time.Minute, "give up if the control plane is not ready by then")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if o.dataDir == "" {
		return o, fmt.Errorf("--data-dir is required")
	}
	if o.port < 0 || o.port > 65535 {
		return o, fmt.Errorf("--port must be in 0..65535, got %d", o.port)
	}
	abs, err := filepath.Abs(o.dataDir)
	if err != nil {
		return o, err
	}
	o.dataDir = abs
	if o.kubeconfigOut == "" {
		o.kubeconfigOut = filepath.Join(o.dataDir, "admin.kubeconfig")
	}
	return o, nil
}

func main() {
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "semipd-controlplane:", err)
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "semipd-controlplane: error:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	setVerbosity(o.verbosity)
	if err := os.MkdirAll(o.dataDir, 0o700); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	pki, err := writePKI(filepath.Join(o.dataDir, "pki"))
	if err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	etcd, etcdURL, err := startEtcd(filepath.Join(o.dataDir, "etcd"))
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer etcd.Close()

	// Listening here (not inside the apiserver) lets --port 0 pick a free port without a race.
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", o.port))
	if err != nil {
		return fmt.Errorf("listen on 127.0.0.1:%d: %w", o.port, err)
	}
	server := "https://" + ln.Addr().String()

	apiCtx, stopAPI := context.WithCancel(context.Background())
	defer stopAPI()
	apiDone, err := startAPIServer(apiCtx, ln, etcdURL, pki, o.admission)
	if err != nil {
		return fmt.Errorf("kube-apiserver: %w", err)
	}

	if err := writeKubeconfig(o.kubeconfigOut, server, pki, pki.Admin); err != nil {
		return err
	}
	kcmKubeconfig := filepath.Join(o.dataDir, "controller-manager.kubeconfig")
	if err := writeKubeconfig(kcmKubeconfig, server, pki, pki.ControllerManager); err != nil {
		return err
	}

	// A signal before "ready" exits at once, without a graceful stop: kube-apiserver aborts the whole
	// process (a fatal post-start hook) when stopped half-started, and the data is throwaway anyway.
	readyCtx, cancelReady := context.WithTimeout(ctx, o.readyTimeout)
	defer cancelReady()
	if err := waitAPIServerReady(readyCtx, server, pki, apiDone); err != nil {
		if ctx.Err() != nil {
			return nil // signalled while starting: exit at once (see above)
		}
		return shutdown(err, nil, stopAPI, apiDone)
	}

	kcmCtx, stopKCM := context.WithCancel(context.Background())
	defer stopKCM()
	kcmDone, err := startControllerManager(kcmCtx, kcmKubeconfig, o.dataDir, pki)
	if err != nil {
		return shutdown(fmt.Errorf("kube-controller-manager: %w", err), nil, stopAPI, apiDone)
	}
	if err := waitControllersWorking(readyCtx, o.kubeconfigOut, kcmDone); err != nil {
		if ctx.Err() != nil {
			return nil // signalled while starting: exit at once (see above)
		}
		return shutdown(err, stopKCM, stopAPI, apiDone, kcmDone)
	}

	fmt.Printf("ready server=%s kubeconfig=%s\n", server, o.kubeconfigOut)
	select {
	case <-ctx.Done():
		return shutdown(nil, stopKCM, stopAPI, apiDone, kcmDone)
	case err := <-apiDone:
		return shutdown(fmt.Errorf("kube-apiserver stopped: %v", err), stopKCM, stopAPI, kcmDone)
	case err := <-kcmDone:
		return shutdown(fmt.Errorf("kube-controller-manager stopped: %v", err), nil, stopAPI, apiDone)
	}
}

// shutdown stops the controller manager before the apiserver (so it does not log a storm of connection
// errors) and waits a bounded time for each: a test harness must never hang on exit.
func shutdown(cause error, stopKCM, stopAPI context.CancelFunc, done ...<-chan error) error {
	if stopKCM != nil {
		stopKCM()
	}
	if stopAPI != nil {
		stopAPI()
	}
	deadline := time.After(30 * time.Second)
	for _, d := range done {
		select {
		case <-d:
		case <-deadline:
			fmt.Fprintln(os.Stderr, "semipd-controlplane: shutdown timed out")
			return cause
		}
	}
	klog.Flush()
	return cause
}

// setVerbosity sets klog's -v for every component in the process; they all share klog.
func setVerbosity(v int) {
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	_ = fs.Set("v", fmt.Sprint(v))
}
