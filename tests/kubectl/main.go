// kubectl for the test tiers on machines that have none: the upstream command, built from Go modules by
// .ci/build-kubectl.sh (tests/cluster/test_readme_kubernetes.py runs README's kubectl lines with it).
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
)

func main() {
	os.Exit(cli.Run(cmd.NewDefaultKubectlCommand()))
}
