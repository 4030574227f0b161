// The pod sandbox program of the local one-node cluster (containerd's
// sandbox_image): it holds the pod's namespaces open, reaps children that are
// re-parented to it, and exits on SIGTERM or SIGINT. It also serves as the init
// (pid 1) of the node's own PID namespace, for the same two reasons.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 16)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
