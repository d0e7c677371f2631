// kubecp: the real Kubernetes control plane that mailfleet's cluster tests run against, in one
// binary built from released modules (as hyperkube once was): etcd, kube-apiserver,
// kube-controller-manager and kube-scheduler, each a subcommand run as its own process, plus
// `kstatus`, the readiness check GitOps tools apply to every object.
//
// hack/kube-up starts them; nothing here is part of the product.
package main

import (
	"fmt"
	"os"
	_ "time/tzdata" // CronJob time zones, as the upstream binaries embed them

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

const usage = `usage: kubecp COMMAND [FLAGS]

commands:
  etcd                 etcd (flags as etcd's)
  apiserver            kube-apiserver (flags as kube-apiserver's)
  controller-manager   kube-controller-manager (flags as kube-controller-manager's)
  scheduler            kube-scheduler (flags as kube-scheduler's)
  kstatus              kstatus of objects: kubecp kstatus --help
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	name := os.Args[1]
	// Each component parses os.Args as if it were its own binary.
	os.Args = append([]string{"kubecp " + name}, os.Args[2:]...)
	switch name {
	case "etcd":
		etcdmain.Main(os.Args)
	case "apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kstatus":
		os.Exit(kstatusMain(os.Args[1:]))
	default:
		fmt.Fprintf(os.Stderr, "kubecp: unknown command %q\n%s", name, usage)
		os.Exit(2)
	}
}
