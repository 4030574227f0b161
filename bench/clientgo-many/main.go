// Command clientgo-many runs N client-go LeaderElectors in one process, each the only
// candidate on its own Lease (<prefix>-0 .. <prefix>-N-1), sharing one clientset: the
// "many leases in one process" case of the leaderz benchmark. It prints JSON lines:
//
//	{"ts_ns":...,"event":"all_leading","count":1000}
//
// once every elector leads, and {"event":"lost",...} whenever one stops leading. SIGTERM
// cancels every election (releasing each lease) and exits when they have all ended.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
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

func logEvent(event string, extra map[string]any) {
	outMu.Lock()
	defer outMu.Unlock()
	rec := map[string]any{"ts_ns": time.Now().UnixNano(), "event": event}
	for k, v := range extra {
		rec[k] = v
	}
	_ = out.Encode(rec)
}

func main() {
	count := flag.Int("count", 1000, "number of leases, one elector each")
	id := flag.String("id", "many", "identity prefix")
	namespace := flag.String("namespace", "default", "Lease namespace")
	prefix := flag.String("lease-prefix", "many", "Lease name prefix")
	kubeconfig := flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file")
	leaseDuration := flag.Duration("lease-duration", 15*time.Second, "lease duration")
	renewDeadline := flag.Duration("renew-deadline", 10*time.Second, "renew deadline")
	retryPeriod := flag.Duration("retry-period", 2*time.Second, "retry period")
	flag.Parse()

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(1)
	}
	// client-go's default client-side limit (5 requests/s, burst 10) would throttle a
	// thousand electors sharing one clientset; a process like this one lifts it.
	config.QPS = -1
	client := kubernetes.NewForConfigOrDie(config)

	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		cancel()
	}()

	var leading atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < *count; i++ {
		name := fmt.Sprintf("%s-%d", *prefix, i)
		lock := &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Name: name, Namespace: *namespace},
			Client:     client.CoordinationV1(),
			LockConfig: resourcelock.ResourceLockConfig{Identity: fmt.Sprintf("%s-%d", *id, i)},
		}
		elector, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   *leaseDuration,
			RenewDeadline:   *renewDeadline,
			RetryPeriod:     *retryPeriod,
			ReleaseOnCancel: true,
			Name:            name,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(ctx context.Context) {
					if leading.Add(1) == int64(*count) {
						logEvent("all_leading", map[string]any{"count": *count})
					}
					<-ctx.Done()
				},
				OnStoppedLeading: func() {},
			},
		})
		if err != nil {
			fmt.Fprintf(os.Stderr, "error: %v\n", err)
			os.Exit(2)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				elector.Run(ctx)
				if ctx.Err() == nil {
					leading.Add(-1)
					logEvent("lost", map[string]any{"lease": name})
				}
			}
		}()
	}
	wg.Wait()
}
