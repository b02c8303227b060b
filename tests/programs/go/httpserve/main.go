// httpserve: a small Go HTTP server for incoming-traffic tests.
//
//	httpserve [-name TEXT] [-h2c] [-udp-echo ADDR] ADDR
//
// GET /hello         -> "hello from TEXT\n" (TEXT defaults to the hostname)
// GET /env/NAME      -> "NAME=value\n" or "NAME unset\n" (as probe's env command)
// GET /bulk?bytes=N  -> N bytes of 'x' (throughput benches)
//
// With -udp-echo it also sends every UDP datagram it receives on ADDR back
// to its sender, unchanged (UDP tests against a pod).
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
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	name := flag.String("name", "", "text after \"hello from\" (default: the hostname)")
	h2c := flag.Bool("h2c", false, "also speak HTTP/2 without TLS (prior knowledge), as gRPC servers do")
	udpEcho := flag.String("udp-echo", "", "also echo UDP datagrams received on this address")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: httpserve [-name TEXT] [-h2c] [-udp-echo ADDR] ADDR")
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
	mux.HandleFunc("/bulk", func(w http.ResponseWriter, r *http.Request) {
		size, err := strconv.ParseInt(r.URL.Query().Get("bytes"), 10, 64)
		if err != nil || size < 0 {
			http.Error(w, "bytes=N wanted", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		chunk := []byte(strings.Repeat("x", 256*1024))
		for size > 0 {
			n := int64(len(chunk))
			if size < n {
				n = size
			}
			if _, err := w.Write(chunk[:n]); err != nil {
				return
			}
			size -= n
		}
	})
	if *udpEcho != "" {
		conn, err := net.ListenPacket("udp", *udpEcho)
		if err != nil {
			fmt.Printf("error: %v\n", err)
			os.Exit(1)
		}
		fmt.Printf("echoing UDP on %s\n", conn.LocalAddr())
		go func() {
			buf := make([]byte, 65536)
			for {
				n, from, err := conn.ReadFrom(buf)
				if err != nil {
					return
				}
				conn.WriteTo(buf[:n], from)
			}
		}()
	}

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
