// httpclient: a benchmark client.
//
//	httpclient [-file PATH] URL N
//
// Resolves the URL's host once (pure-Go resolver), then does N sequential
// GETs over one keep-alive connection, reading PATH once per request (default
// /etc/hosts; -file "" skips it). Prints "ok N". Flags may also follow URL N.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
)

func fail(format string, args ...any) {
	fmt.Printf("error: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	net.DefaultResolver.PreferGo = true
	path := flag.String("file", "/etc/hosts", "file read once per request (\"\" to skip)")
	flag.Parse()
	// Go's flag package stops at the first positional argument: allow
	// "URL N -file PATH" as well.
	var positional []string
	for args := flag.Args(); len(args) > 0; args = flag.Args() {
		positional = append(positional, args[0])
		flag.CommandLine.Parse(args[1:])
	}
	if len(positional) != 2 {
		fmt.Fprintln(os.Stderr, "usage: httpclient [-file PATH] URL N")
		os.Exit(2)
	}
	target, err := url.Parse(positional[0])
	if err != nil {
		fail("%v", err)
	}
	count, err := strconv.Atoi(positional[1])
	if err != nil {
		fail("bad count %q", positional[1])
	}

	if _, err := net.DefaultResolver.LookupHost(context.Background(), target.Hostname()); err != nil {
		fail("%v", err)
	}
	client := &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 1}}
	for i := 0; i < count; i++ {
		if *path != "" {
			if _, err := os.ReadFile(*path); err != nil {
				fail("%v", err)
			}
		}
		resp, err := client.Get(target.String())
		if err != nil {
			fail("%v", err)
		}
		// Drain the body so the connection goes back to the pool.
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil {
			fail("%v", err)
		}
		if resp.StatusCode != http.StatusOK {
			fail("status %d", resp.StatusCode)
		}
	}
	fmt.Printf("ok %d\n", count)
}
