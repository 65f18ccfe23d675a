// elv-registrar: minimal kubelet plugin registration for a CSI driver.
// Written for ELV's tests; node-driver-registrar is not available from the
// Go module proxy. Flags follow node-driver-registrar's names.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

var version = "unknown"

type server struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint string
}

func (s *server) GetInfo(ctx context.Context, _ *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	log.Printf("GetInfo: %s at %s", s.name, s.endpoint)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.name,
		Endpoint:          s.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (s *server) NotifyRegistrationStatus(ctx context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !st.PluginRegistered {
		log.Printf("kubelet failed to register %s: %s", s.name, st.Error)
		os.Exit(1)
	}
	log.Printf("kubelet registered %s", s.name)
	return &registerapi.RegistrationStatusResponse{}, nil
}

func driverName(addr string, timeout time.Duration) (string, error) {
	target := addr
	if !strings.HasPrefix(target, "unix:") {
		target = "unix://" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	resp, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{}, grpc.WaitForReady(true))
	if err != nil {
		return "", err
	}
	return resp.GetName(), nil
}

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "CSI endpoint of the driver, as this process sees it")
	kubeletPath := flag.String("kubelet-registration-path", "", "CSI endpoint of the driver, as kubelet sees it (required)")
	regPath := flag.String("plugin-registration-path", "/registration", "kubelet's plugin registration directory")
	name := flag.String("driver-name", "", "driver name; default: ask the driver (GetPluginInfo)")
	timeout := flag.Duration("timeout", 60*time.Second, "how long to wait for the driver's GetPluginInfo")
	httpEndpoint := flag.String("http-endpoint", "", "if set, serve /healthz on this address (200 while the registration socket exists)")
	flag.Int("v", 0, "accepted for compatibility with node-driver-registrar; ignored")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println(filepath.Base(os.Args[0]), version)
		return
	}
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}
	if *name == "" {
		n, err := driverName(*csiAddress, *timeout)
		if err != nil {
			log.Fatalf("GetPluginInfo on %s: %v", *csiAddress, err)
		}
		*name = n
	}
	sock := filepath.Join(*regPath, *name+"-reg.sock")
	if err := os.Remove(sock); err != nil && !os.IsNotExist(err) {
		log.Fatalf("removing stale %s: %v", sock, err)
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatalf("listen on %s: %v", sock, err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, &server{name: *name, endpoint: *kubeletPath})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		srv.Stop()
		os.Remove(sock)
		os.Exit(0)
	}()
	if *httpEndpoint != "" {
		http.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			if _, err := os.Stat(sock); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		go func() { log.Fatal(http.ListenAndServe(*httpEndpoint, nil)) }()
	}
	log.Printf("serving registration for %s on %s (driver endpoint for kubelet: %s)", *name, sock, *kubeletPath)
	if err := srv.Serve(lis); err != nil {
		log.Fatal(err)
	}
}
