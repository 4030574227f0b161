// Command clientgo-candidate is a leader-election candidate built on client-go's
// tools/leaderelection, with the same knobs as the leaderz interop candidate. It
// logs one JSON line per event on stdout:
//
//	{"ts_ns":1700000000000000000,"id":"cg-1","event":"started_leading"}
//	{"ts_ns":...,"id":"cg-1","event":"stopped_leading"}
//	{"ts_ns":...,"id":"cg-1","event":"new_leader","leader":"lz-0"}
//
// On SIGTERM it stops its work first (logging stopped_leading), then cancels the
// election, which releases the lease when --release-on-cancel is set. (client-go
// itself releases before cancelling the OnStartedLeading context, client-go #728;
// stopping the work first is what a careful application does.)
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

var out = json.NewEncoder(os.Stdout)
var outMu sync.Mutex

func logEvent(id, event, leader string) {
	outMu.Lock()
	defer outMu.Unlock()
	rec := map[string]any{"ts_ns": time.Now().UnixNano(), "id": id, "event": event}
	if event == "new_leader" {
		rec["leader"] = leader
	}
	_ = out.Encode(rec)
}

func main() {
	id := flag.String("id", "", "candidate identity")
	namespace := flag.String("namespace", "default", "Lease namespace")
	lease := flag.String("lease", "my-lock", "Lease name")
	kubeconfig := flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file")
	leaseDuration := flag.Duration("lease-duration", 15*time.Second, "lease duration")
	renewDeadline := flag.Duration("renew-deadline", 10*time.Second, "renew deadline")
	retryPeriod := flag.Duration("retry-period", 2*time.Second, "retry period")
	releaseOnCancel := flag.Bool("release-on-cancel", true, "release the lease on SIGTERM")
	flag.Parse()
	if *id == "" {
		fmt.Fprintln(os.Stderr, "error: --id is required")
		os.Exit(2)
	}

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(1)
	}
	client := kubernetes.NewForConfigOrDie(config)
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Name: *lease, Namespace: *namespace},
		Client:     client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: *id},
	}

	electionCtx, stopElection := context.WithCancel(context.Background())
	workCtx, stopWork := context.WithCancel(context.Background())
	var working sync.WaitGroup
	var leading sync.Mutex
	isLeading := false

	stopLeading := func() {
		leading.Lock()
		defer leading.Unlock()
		if isLeading {
			isLeading = false
			logEvent(*id, "stopped_leading", "")
		}
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		stopWork()
		working.Wait()
		stopLeading()
		stopElection()
	}()

	// A candidate stays one after losing leadership: run the election again until
	// told to stop.
	for electionCtx.Err() == nil {
		runOnce(electionCtx, leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   *leaseDuration,
			RenewDeadline:   *renewDeadline,
			RetryPeriod:     *retryPeriod,
			ReleaseOnCancel: *releaseOnCancel,
			Name:            *lease,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(ctx context.Context) {
					working.Add(1)
					defer working.Done()
					leading.Lock()
					isLeading = true
					logEvent(*id, "started_leading", "")
					leading.Unlock()
					select {
					case <-ctx.Done():
					case <-workCtx.Done():
					}
					stopLeading()
				},
				OnStoppedLeading: stopLeading,
				OnNewLeader: func(identity string) {
					logEvent(*id, "new_leader", identity)
				},
			},
		})
	}
	stopLeading()
}

func runOnce(ctx context.Context, config leaderelection.LeaderElectionConfig) {
	elector, err := leaderelection.NewLeaderElector(config)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(2)
	}
	elector.Run(ctx)
}
