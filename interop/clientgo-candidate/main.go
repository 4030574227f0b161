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
//
// With --coordinated it takes part in coordinated leader election (KEP-4355): it
// publishes a LeaseCandidate named after --id (client-go's leasecandidate.go) and never
// acquires the Lease on its own.
//
// With --ledger, its work while leading is what leaderz-faults-worker does under
// `leaderz run`: write to the fault suite's fenced ledger every few ms with the term's
// leaseTransitions as fencing token, logging "started" and "stopped" lines to
// --worker-log in the worker's format.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
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
	ledger := flag.String("ledger", "", "fenced ledger URL to write to while leading (fault suite)")
	ledgerResource := flag.String("ledger-resource", "", "the ledger resource to write to")
	workerLog := flag.String("worker-log", "", "JSON-lines file for the ledger writer's started/stopped events")
	writeInterval := flag.Duration("write-interval", 5*time.Millisecond, "time between ledger writes")
	coordinated := flag.Bool("coordinated", false, "coordinated leader election: publish a LeaseCandidate and let the controller elect")
	binaryVersion := flag.String("binary-version", "1.34.0", "the LeaseCandidate's binaryVersion (coordinated)")
	emulationVersion := flag.String("emulation-version", "", "the LeaseCandidate's emulationVersion (default: the binary version)")
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
	if *coordinated {
		if *emulationVersion == "" {
			*emulationVersion = *binaryVersion
		}
		candidate, _, err := leaderelection.NewCandidate(client, *namespace, *id, *lease,
			*binaryVersion, *emulationVersion, coordinationv1.OldestEmulationVersion)
		if err != nil {
			fmt.Fprintf(os.Stderr, "error: %v\n", err)
			os.Exit(1)
		}
		go candidate.Run(electionCtx)
	}
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
			Coordinated:     *coordinated,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(ctx context.Context) {
					working.Add(1)
					defer working.Done()
					leading.Lock()
					isLeading = true
					logEvent(*id, "started_leading", "")
					leading.Unlock()
					if *ledger != "" {
						writeLedger(ctx, workCtx, lock, *ledger, *ledgerResource, *workerLog, *id, *writeInterval)
					} else {
						select {
						case <-ctx.Done():
						case <-workCtx.Done():
						}
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

// writeLedger writes to the fenced ledger until either context ends, with the Lease's
// leaseTransitions (read once, at the start of the term) as the fencing token.
func writeLedger(ctx, workCtx context.Context, lock *resourcelock.LeaseLock, url, resource, logPath, id string, interval time.Duration) {
	token := int64(-1)
	getCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
	if record, _, err := lock.Get(getCtx); err == nil {
		token = int64(record.LeaderTransitions)
	}
	cancel()
	pid := os.Getpid()
	var seq uint64
	logWorker(logPath, "started", id, token, pid, seq)
	client := &http.Client{Timeout: time.Second}
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			logWorker(logPath, "stopped", id, token, pid, seq)
			return
		case <-workCtx.Done():
			logWorker(logPath, "stopped", id, token, pid, seq)
			return
		case <-ticker.C:
		}
		body, _ := json.Marshal(map[string]any{
			"resource": resource, "identity": id, "token": token, "pid": pid,
			"seq": seq, "sent_ns": time.Now().UnixNano(),
		})
		seq++
		if resp, err := client.Post(url+"/write", "application/json", bytes.NewReader(body)); err == nil {
			resp.Body.Close()
		}
	}
}

// logWorker appends one line in leaderz-faults-worker's log format.
func logWorker(path, event, id string, token int64, pid int, sent uint64) {
	if path == "" {
		return
	}
	line, _ := json.Marshal(map[string]any{
		"event": event, "ts_ns": time.Now().UnixNano(), "identity": id,
		"token": token, "pid": pid, "sent": sent,
	})
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	_, _ = f.Write(append(line, '\n'))
}
