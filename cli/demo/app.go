// mtrace-demo-app: the program `mtrace demo` runs twice, plainly and under
// mtrace against a throwaway target. It prints what it sees of its
// environment, files, DNS and network, one line each. Static (CGO_ENABLED=0),
// pure-Go resolver: the kind of binary LD_PRELOAD tools cannot intercept.
package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

func line(what, text string) {
	fmt.Printf("  %-12s %s\n", what, text)
}

func short(err error) string {
	text := err.Error()
	if i := strings.LastIndex(text, ": "); i >= 0 && !strings.Contains(text[i:], "no such host") {
		return text[i+2:]
	}
	return text
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: mtrace-demo-app ENV_NAME FILE HOST:PORT")
		os.Exit(2)
	}
	envName, path, address := os.Args[1], os.Args[2], os.Args[3]

	if value, ok := os.LookupEnv(envName); ok {
		line("environment", envName+"="+value)
	} else {
		line("environment", envName+" is not set")
	}

	if file, err := os.Open(path); err != nil {
		line("file", path+": "+short(err))
	} else {
		first, _ := bufio.NewReader(file).ReadString('\n')
		file.Close()
		line("file", path+": "+strings.TrimSpace(first))
	}

	host, port, _ := net.SplitHostPort(address)
	resolver := &net.Resolver{PreferGo: true}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	addresses, err := resolver.LookupHost(ctx, host)
	cancel()
	if err != nil {
		line("dns", host+": "+short(err))
	} else {
		line("dns", host+" -> "+strings.Join(addresses, ", "))
	}

	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{Proxy: nil}}
	url := "http://" + net.JoinHostPort(host, port) + "/"
	response, err := client.Get(url)
	if err != nil {
		line("http", "GET "+url+": "+short(err))
		return
	}
	body, _ := io.ReadAll(io.LimitReader(response.Body, 200))
	response.Body.Close()
	line("http", fmt.Sprintf("GET %s -> %d %s", url, response.StatusCode, strings.TrimSpace(string(body))))
}
