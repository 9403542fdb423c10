// Package plugin serves the fakecloud driver as a Docker Machine plugin, the way
// libmachine's plugin.RegisterDriver does: it needs MACHINE_PLUGIN_TOKEN=42, listens
// on 127.0.0.1:0, prints the address as the first line of stdout, serves net/rpc over
// HTTP (CONNECT /_goRPC_) under the service names RPCServerDriver and RpcServerDriver,
// exits 0 on Close and 1 when no Heartbeat came for the timeout (counted from the
// start, then from each Heartbeat).
//
// Process-level knobs for tests (the driver's own fault flags are in package
// fakecloud):
//
//	FAKECLOUD_HEARTBEAT_TIMEOUT_MS  heartbeat timeout (default 10000)
//	FAKECLOUD_BANNER                printed instead of the address as the first line
//	FAKECLOUD_API_VERSION           what GetVersion answers (default 1)
//	FAKECLOUD_EXIT_AT_START         write a line to stderr and exit with this status
//	FAKECLOUD_MISSING_METHODS       comma-separated methods answering net/rpc's
//	                                "rpc: can't find method RPCServerDriver.<M>"
package plugin

import (
	"fmt"
	"net"
	"net/http"
	"net/rpc"
	"os"
	"strconv"
	"strings"
	"time"

	"machinist.dev/fakecloud/fakecloud"
	"machinist.dev/fakecloud/rpcdriver"
)

func envInt(name string, def int) int {
	v, ok := os.LookupEnv(name)
	if !ok || v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		fmt.Fprintf(os.Stderr, "fakecloud: %s=%q is not an integer\n", name, v)
		os.Exit(1)
	}
	return n
}

// Main runs the plugin process; it never returns.
func Main() {
	if _, ok := os.LookupEnv("FAKECLOUD_EXIT_AT_START"); ok {
		code := envInt("FAKECLOUD_EXIT_AT_START", 1)
		fmt.Fprintf(os.Stderr, "fakecloud: exiting with status %d at start (FAKECLOUD_EXIT_AT_START)\n", code)
		os.Exit(code)
	}
	if os.Getenv("MACHINE_PLUGIN_TOKEN") != "42" {
		fmt.Fprintf(os.Stderr, `This is a Docker Machine plugin binary.
Plugin binaries are not intended to be invoked directly.
Please use this plugin through the main 'docker-machine' binary.
(API version: %d)
`, rpcdriver.APIVersion)
		os.Exit(1)
	}
	timeout := time.Duration(envInt("FAKECLOUD_HEARTBEAT_TIMEOUT_MS", 10000)) * time.Millisecond

	srv := rpcdriver.NewRPCServerDriver(fakecloud.NewDriver())
	srv.Version = envInt("FAKECLOUD_API_VERSION", rpcdriver.APIVersion)
	for _, m := range strings.Split(os.Getenv("FAKECLOUD_MISSING_METHODS"), ",") {
		if m = strings.TrimSpace(m); m != "" {
			srv.Missing[m] = true
		}
	}
	for _, name := range []string{rpcdriver.ServiceNameV0, rpcdriver.ServiceNameV1} {
		if err := rpc.RegisterName(name, srv); err != nil {
			fmt.Fprintf(os.Stderr, "Error registering the RPC server: %s\n", err)
			os.Exit(1)
		}
	}
	rpc.HandleHTTP()

	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintf(os.Stderr, "Error loading RPC server: %s\n", err)
		os.Exit(1)
	}
	if banner, ok := os.LookupEnv("FAKECLOUD_BANNER"); ok {
		fmt.Println(banner)
	} else {
		fmt.Println(listener.Addr())
	}
	rpcdriver.Logger.Printf("serving on %s, pid %d, heartbeat timeout %s", listener.Addr(), os.Getpid(), timeout)

	go func() {
		err := http.Serve(listener, nil)
		rpcdriver.Logger.Printf("http.Serve: %v", err)
	}()

	for {
		select {
		case <-srv.CloseCh:
			rpcdriver.Logger.Printf("Closing plugin on server side")
			os.Exit(0)
		case <-srv.HeartbeatCh:
			continue
		case <-time.After(timeout):
			rpcdriver.Logger.Printf("no heartbeat for %s, exiting", timeout)
			os.Exit(1)
		}
	}
}
