// httpserve: a small Go HTTP server for incoming-traffic tests.
//
//	httpserve [-name TEXT] [-h2c] ADDR
//
// GET /hello     -> "hello from TEXT\n" (TEXT defaults to the hostname)
// GET /env/NAME  -> "NAME=value\n" or "NAME unset\n" (as probe's env command)
//
// Prints "listening on HOST:PORT" once the socket listens (ADDR may use port
// 0: the real port is printed) and exits 0 on SIGTERM or SIGINT.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	name := flag.String("name", "", "text after \"hello from\" (default: the hostname)")
	h2c := flag.Bool("h2c", false, "also speak HTTP/2 without TLS (prior knowledge), as gRPC servers do")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: httpserve [-name TEXT] [-h2c] ADDR")
		os.Exit(2)
	}
	if *name == "" {
		hostname, err := os.Hostname()
		if err != nil {
			hostname = "httpserve"
		}
		*name = hostname
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		fmt.Fprintf(w, "hello from %s\n", *name)
	})
	mux.HandleFunc("/env/", func(w http.ResponseWriter, r *http.Request) {
		key := strings.TrimPrefix(r.URL.Path, "/env/")
		if value, ok := os.LookupEnv(key); ok {
			fmt.Fprintf(w, "%s=%s\n", key, value)
		} else {
			fmt.Fprintf(w, "%s unset\n", key)
		}
	})

	listener, err := net.Listen("tcp", flag.Arg(0))
	if err != nil {
		fmt.Printf("error: %v\n", err)
		os.Exit(1)
	}
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	if *h2c {
		server.Protocols = new(http.Protocols)
		server.Protocols.SetHTTP1(true)
		server.Protocols.SetUnencryptedHTTP2(true)
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	go func() {
		<-stop
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		server.Shutdown(ctx)
		close(done)
	}()

	fmt.Printf("listening on %s\n", listener.Addr())
	if err := server.Serve(listener); err != nil && err != http.ErrServerClosed {
		fmt.Printf("error: %v\n", err)
		os.Exit(1)
	}
	<-done
	fmt.Println("stopped")
}
