package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

// kstatusResult is one object's status as kstatus computes it, one JSON object per line.
type kstatusResult struct {
	Resource  string `json:"resource"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Status    string `json:"status"`
	Message   string `json:"message"`
}

// kstatusMain prints the kstatus of every object of the named resources in one namespace, as
// Flux and kapp judge health: Current only when observedGeneration caught up and the
// conditions say ready. Exit status 0 when all are Current, 1 when any is not, 2 on errors.
func kstatusMain(args []string) int {
	fs := flag.NewFlagSet("kstatus", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the cluster")
	namespace := fs.String("namespace", "default", "namespace of the objects")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: kubecp kstatus [--kubeconfig F] [--namespace NS] RESOURCE.VERSION.GROUP...")
		fmt.Fprintln(fs.Output(), "  e.g. relaypools.v1alpha1.mailfleet.dev statefulsets.v1.apps")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: failed to load kubeconfig %s: %v\n", *kubeconfig, err)
		return 2
	}
	client, err := dynamic.NewForConfig(config)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: failed to build a client: %v\n", err)
		return 2
	}
	allCurrent := true
	out := json.NewEncoder(os.Stdout)
	for _, arg := range fs.Args() {
		gvr, _ := schema.ParseResourceArg(arg)
		if gvr == nil {
			fmt.Fprintf(os.Stderr, "kstatus: %q is not RESOURCE.VERSION.GROUP\n", arg)
			return 2
		}
		list, err := client.Resource(*gvr).Namespace(*namespace).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: failed to list %s in %s: %v\n", arg, *namespace, err)
			return 2
		}
		for i := range list.Items {
			obj := &list.Items[i]
			res := compute(obj)
			res.Resource = arg
			if res.Status != status.CurrentStatus.String() {
				allCurrent = false
			}
			if err := out.Encode(res); err != nil {
				return 2
			}
		}
	}
	if !allCurrent {
		return 1
	}
	return 0
}

func compute(obj *unstructured.Unstructured) kstatusResult {
	res := kstatusResult{Namespace: obj.GetNamespace(), Name: obj.GetName()}
	result, err := status.Compute(obj)
	if err != nil {
		res.Status = status.UnknownStatus.String()
		res.Message = err.Error()
		return res
	}
	res.Status = result.Status.String()
	res.Message = result.Message
	return res
}
