// elv-livenessprobe: a stand-in for kubernetes-csi/livenessprobe, whose v2
// releases the Go module proxy cannot serve (see scripts/k8s-tools). It serves
// /healthz: 200 when the driver answers Probe within --probe-timeout and does
// not report ready=false, 500 otherwise. Flags follow livenessprobe's names;
// scripts/build-image puts it into the image deploy/ names
// (registry.k8s.io/sig-storage/livenessprobe).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"strings"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

var version = "unknown"

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "CSI endpoint of the driver")
	httpEndpoint := flag.String("http-endpoint", "", "address to serve /healthz on (default :<health-port>)")
	healthPort := flag.Int("health-port", 9808, "TCP port to serve /healthz on, when --http-endpoint is not set")
	probeTimeout := flag.Duration("probe-timeout", time.Second, "how long to wait for the driver's Probe")
	flag.Int("v", 0, "accepted for compatibility with livenessprobe; ignored")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println(os.Args[0], version)
		return
	}
	addr := *httpEndpoint
	if addr == "" {
		addr = fmt.Sprintf(":%d", *healthPort)
	}
	target := *csiAddress
	if !strings.HasPrefix(target, "unix:") {
		target = "unix://" + target
	}
	// The connection is made lazily and kept: a restarted driver is found again.
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("%s: %v", target, err)
	}
	identity := csi.NewIdentityClient(conn)
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *probeTimeout)
		defer cancel()
		resp, err := identity.Probe(ctx, &csi.ProbeRequest{})
		if err != nil {
			log.Printf("health check failed: %v", err)
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if ready := resp.GetReady(); ready != nil && !ready.GetValue() {
			log.Printf("health check failed: driver responded but is not ready")
			http.Error(w, "driver responded but is not ready", http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	log.Printf("serving /healthz on %s for %s", addr, target)
	log.Fatal(http.ListenAndServe(addr, nil))
}
