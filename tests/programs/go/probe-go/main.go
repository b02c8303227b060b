// probe-go: the probe CLI of tests/programs/c/probe.c, in Go (static,
// CGO_ENABLED=0, pure-Go resolver). Every command prints the same bytes as the
// C flavours; errors print "error: <ERRNO NAME>" to stdout and exit 1.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

const usage = `usage: probe COMMAND ARGS...
  env NAME | cat PATH | stat PATH | statfs PATH | ls DIR | readlink PATH
  symlink TARGET PATH
  resolve NAME | resolve6 NAME | tcp HOST PORT MSG | http URL
  unix-connect PATH MSG
  udp HOST PORT MSG | udp-unconnected HOST PORT MSG
  udp-mmsg HOST PORT MSG N | udp-mmsg-recv HOST PORT MSG N
  exit N | kill SIG | loop-getpid N | loop-open PATH N
  exec PATH ARGS... | fork-exec PATH ARGS... | hostname
  serve ADDR PORT NAME [PORT2]
`

const receiveTimeout = 2 * time.Second

func main() {
	net.DefaultResolver.PreferGo = true
	if len(os.Args) < 2 {
		badUsage()
	}
	cmd, args := os.Args[1], os.Args[2:]
	switch {
	case cmd == "env" && len(args) == 1:
		cmdEnv(args[0])
	case cmd == "cat" && len(args) == 1:
		cmdCat(args[0])
	case cmd == "stat" && len(args) == 1:
		cmdStat(args[0])
	case cmd == "statfs" && len(args) == 1:
		cmdStatfs(args[0])
	case cmd == "ls" && len(args) == 1:
		cmdLs(args[0])
	case cmd == "readlink" && len(args) == 1:
		cmdReadlink(args[0])
	case cmd == "symlink" && len(args) == 2:
		cmdSymlink(args[0], args[1])
	case cmd == "resolve" && len(args) == 1:
		cmdResolve(args[0])
	case cmd == "resolve6" && len(args) == 1:
		cmdResolve6(args[0])
	case cmd == "tcp" && len(args) == 3:
		cmdTCP(args[0], args[1], args[2])
	case cmd == "unix-connect" && len(args) == 2:
		cmdUnixConnect(args[0], args[1])
	case cmd == "http" && len(args) == 1:
		cmdHTTP(args[0])
	case cmd == "udp" && len(args) == 3:
		cmdUDP(args[0], args[1], args[2])
	case cmd == "udp-unconnected" && len(args) == 3:
		cmdUDPUnconnected(args[0], args[1], args[2])
	case cmd == "udp-mmsg" && len(args) == 4:
		cmdUDPMmsg(args[0], args[1], args[2], parseInt(args[3]), false)
	case cmd == "udp-mmsg-recv" && len(args) == 4:
		cmdUDPMmsg(args[0], args[1], args[2], parseInt(args[3]), true)
	case cmd == "exit" && len(args) == 1:
		os.Exit(parseInt(args[0]))
	case cmd == "kill" && len(args) == 1:
		cmdKill(args[0])
	case cmd == "loop-getpid" && len(args) == 1:
		cmdLoopGetpid(parseInt(args[0]))
	case cmd == "loop-open" && len(args) == 2:
		cmdLoopOpen(args[0], parseInt(args[1]))
	case cmd == "exec" && len(args) >= 1:
		fail(syscall.Exec(args[0], args, os.Environ()))
	case cmd == "fork-exec" && len(args) >= 1:
		cmdForkExec(args)
	case cmd == "hostname" && len(args) == 0:
		name, err := os.Hostname()
		if err != nil {
			fail(err)
		}
		fmt.Println(name)
	case cmd == "serve" && (len(args) == 3 || len(args) == 4):
		cmdServe(args[0], args[1:2], args[2], args[3:])
	default:
		badUsage()
	}
}

func badUsage() {
	fmt.Fprint(os.Stderr, usage)
	os.Exit(2)
}

func parseInt(text string) int {
	value, err := strconv.Atoi(text)
	if err != nil {
		failText("EINVAL")
	}
	return value
}

func out(data []byte) {
	if _, err := os.Stdout.Write(data); err != nil {
		fail(err)
	}
}

func cmdEnv(name string) {
	if value, ok := os.LookupEnv(name); ok {
		fmt.Printf("%s=%s\n", name, value)
	} else {
		fmt.Printf("%s unset\n", name)
	}
}

// cmdCat reads and writes with plain read/write calls: io.Copy to os.Stdout
// would use copy_file_range/splice/sendfile, which the C flavour never does.
func cmdCat(path string) {
	file, err := os.Open(path)
	if err != nil {
		fail(err)
	}
	defer file.Close()
	buf := make([]byte, 65536)
	for {
		n, err := file.Read(buf)
		out(buf[:n])
		if err == io.EOF {
			return
		}
		if err != nil {
			fail(err)
		}
	}
}

func printStatfs(label string, fs *syscall.Statfs_t) {
	fmt.Printf("%s type=%x bsize=%d blocks=%d files=%d namelen=%d\n", label,
		uint64(fs.Type), int64(fs.Bsize), uint64(fs.Blocks), uint64(fs.Files), int64(fs.Namelen))
}

// cmdStatfs: statfs of path, then fstatfs of an fd of it (the filesystem it is on).
func cmdStatfs(path string) {
	var fs syscall.Statfs_t
	if err := syscall.Statfs(path, &fs); err != nil {
		fail(err)
	}
	printStatfs("statfs", &fs)
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		fail(err)
	}
	if err := syscall.Fstatfs(fd, &fs); err != nil {
		fail(err)
	}
	printStatfs("fstatfs", &fs)
	syscall.Close(fd)
}

func cmdStat(path string) {
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		fail(err)
	}
	kind := "other"
	switch st.Mode & syscall.S_IFMT {
	case syscall.S_IFREG:
		kind = "file"
	case syscall.S_IFDIR:
		kind = "dir"
	case syscall.S_IFLNK:
		kind = "symlink"
	case syscall.S_IFIFO:
		kind = "fifo"
	case syscall.S_IFSOCK:
		kind = "socket"
	case syscall.S_IFCHR:
		kind = "char"
	case syscall.S_IFBLK:
		kind = "block"
	}
	fmt.Printf("size=%d mode=%04o type=%s\n", st.Size, st.Mode&0o7777, kind)
}

func cmdLs(path string) {
	entries, err := os.ReadDir(path) // sorted by name, bytewise like strcmp
	if err != nil {
		fail(err)
	}
	var text strings.Builder
	for _, entry := range entries {
		text.WriteString(entry.Name() + "\n")
	}
	out([]byte(text.String()))
}

// cmdSymlink makes a symlink (symlinkat) and prints what it holds, read back.
func cmdSymlink(target, path string) {
	if err := os.Symlink(target, path); err != nil {
		fail(err)
	}
	cmdReadlink(path)
}

func cmdReadlink(path string) {
	target, err := os.Readlink(path)
	if err != nil {
		fail(err)
	}
	fmt.Printf("%s\n", target)
}

func cmdResolve6(name string) {
	resolver := &net.Resolver{PreferGo: true}
	ips, err := resolver.LookupIP(context.Background(), "ip6", name)
	if err != nil {
		fail(err)
	}
	seen := map[string]bool{}
	var addrs []net.IP
	for _, ip := range ips {
		if ip.To4() == nil && len(ip) == net.IPv6len && !seen[string(ip)] {
			seen[string(ip)] = true
			addrs = append(addrs, ip)
		}
	}
	sort.Slice(addrs, func(i, j int) bool { return bytes.Compare(addrs[i], addrs[j]) < 0 })
	for _, ip := range addrs {
		fmt.Println(ip.String())
	}
}

func cmdResolve(name string) {
	resolver := &net.Resolver{PreferGo: true}
	ips, err := resolver.LookupIP(context.Background(), "ip4", name)
	if err != nil {
		fail(err)
	}
	seen := map[uint32]bool{}
	var addrs []uint32
	for _, ip := range ips {
		if v4 := ip.To4(); v4 != nil {
			value := binary.BigEndian.Uint32(v4)
			if !seen[value] {
				seen[value] = true
				addrs = append(addrs, value)
			}
		}
	}
	sort.Slice(addrs, func(i, j int) bool { return addrs[i] < addrs[j] })
	for _, value := range addrs {
		ip := make(net.IP, 4)
		binary.BigEndian.PutUint32(ip, value)
		fmt.Println(ip.String())
	}
}

func cmdTCP(host, port, msg string) {
	conn, err := net.Dial("tcp", net.JoinHostPort(host, port))
	if err != nil {
		fail(err)
	}
	exchange(conn.(*net.TCPConn), msg)
}

// Like tcp, over a Unix stream socket; "@name" is an abstract name (Go's own convention).
func cmdUnixConnect(path, msg string) {
	conn, err := net.Dial("unix", path)
	if err != nil {
		fail(err)
	}
	exchange(conn.(*net.UnixConn), msg)
}

type halfCloser interface {
	net.Conn
	CloseWrite() error
}

func exchange(tcp halfCloser, msg string) {
	if _, err := tcp.Write([]byte(msg + "\n")); err != nil {
		fail(err)
	}
	if err := tcp.CloseWrite(); err != nil {
		fail(err)
	}
	// A read loop, not io.Copy: os.Stdout.ReadFrom would splice.
	buf := make([]byte, 65536)
	for {
		n, err := tcp.Read(buf)
		out(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			fail(err)
		}
	}
	tcp.Close()
}

func cmdHTTP(url string) {
	client := &http.Client{
		Transport: &http.Transport{
			Proxy:              nil, // ignore HTTP_PROXY: the C flavour does
			DisableKeepAlives:  true,
			DisableCompression: true,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
	resp, err := client.Get(url)
	if err != nil {
		failProtocol(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		failProtocol(err)
	}
	fmt.Printf("status %d\n", resp.StatusCode)
	out(body)
}

func cmdUDP(host, port, msg string) {
	conn, err := net.Dial("udp", net.JoinHostPort(host, port))
	if err != nil {
		fail(err)
	}
	if _, err := conn.Write([]byte(msg)); err != nil {
		fail(err)
	}
	if err := conn.SetReadDeadline(time.Now().Add(receiveTimeout)); err != nil {
		fail(err)
	}
	buf := make([]byte, 65536)
	n, err := conn.Read(buf)
	if err != nil {
		fail(err)
	}
	out(append(buf[:n], '\n'))
}

func cmdUDPUnconnected(host, port, msg string) {
	target, err := net.ResolveUDPAddr("udp", net.JoinHostPort(host, port))
	if err != nil {
		fail(err)
	}
	// "udp" with no local address would open a dual-stack AF_INET6 socket.
	network := "udp6"
	if target.IP.To4() != nil {
		network = "udp4"
	}
	conn, err := net.ListenUDP(network, nil)
	if err != nil {
		fail(err)
	}
	if _, err := conn.WriteToUDP([]byte(msg), target); err != nil {
		fail(err)
	}
	if err := conn.SetReadDeadline(time.Now().Add(receiveTimeout)); err != nil {
		fail(err)
	}
	buf := make([]byte, 65536)
	n, from, err := conn.ReadFromUDP(buf)
	if err != nil {
		fail(err)
	}
	out(buf[:n])
	fromText := net.JoinHostPort(from.IP.String(), strconv.Itoa(from.Port))
	fmt.Printf("\nfrom %s\n", fromText)
}

var signalNames = map[string]syscall.Signal{
	"HUP": syscall.SIGHUP, "INT": syscall.SIGINT, "QUIT": syscall.SIGQUIT,
	"ILL": syscall.SIGILL, "TRAP": syscall.SIGTRAP, "ABRT": syscall.SIGABRT,
	"BUS": syscall.SIGBUS, "FPE": syscall.SIGFPE, "KILL": syscall.SIGKILL,
	"USR1": syscall.SIGUSR1, "SEGV": syscall.SIGSEGV, "USR2": syscall.SIGUSR2,
	"PIPE": syscall.SIGPIPE, "ALRM": syscall.SIGALRM, "TERM": syscall.SIGTERM,
}

func cmdKill(text string) {
	var sig syscall.Signal
	if text != "" && text[0] >= '0' && text[0] <= '9' {
		sig = syscall.Signal(parseInt(text))
	} else if named, ok := signalNames[strings.TrimPrefix(text, "SIG")]; ok {
		sig = named
	} else {
		failText("EINVAL")
	}
	// The Go runtime handles every signal itself and ignores some (SIGUSR1,
	// SIGPIPE...) that kill a C program: restore the default action first so
	// the signal does what it does to the C flavours.
	if sig != syscall.SIGKILL {
		var dfl [4]uint64 // struct sigaction: handler=SIG_DFL, flags, restorer, mask
		syscall.RawSyscall6(syscall.SYS_RT_SIGACTION, uintptr(sig),
			uintptr(unsafe.Pointer(&dfl)), 0, 8, 0, 0)
	}
	if err := syscall.Kill(os.Getpid(), sig); err != nil {
		fail(err)
	}
	// A caught or ignored signal leaves us running.
	time.Sleep(time.Second)
	failText("ESRCH")
}

func cmdLoopGetpid(count int) {
	start := time.Now()
	for i := 0; i < count; i++ {
		syscall.Getpid()
	}
	reportLoop("loop-getpid", count, time.Since(start))
}

func cmdLoopOpen(path string, count int) {
	start := time.Now()
	for i := 0; i < count; i++ {
		fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			fail(err)
		}
		syscall.Close(fd)
	}
	reportLoop("loop-open", count, time.Since(start))
}

func reportLoop(name string, count int, elapsed time.Duration) {
	perCall := int64(0)
	if count > 0 {
		perCall = elapsed.Nanoseconds() / int64(count)
	}
	fmt.Fprintf(os.Stderr, "%s: %d calls, %d ns/call\n", name, count, perCall)
}

func cmdForkExec(args []string) {
	cmd := &exec.Cmd{Path: args[0], Args: args, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	err := cmd.Run()
	if err != nil && cmd.ProcessState == nil {
		fail(err) // the exec itself failed
	}
	status := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if status.Signaled() {
		fmt.Printf("child signal %d\n", int(status.Signal()))
		os.Exit(128 + int(status.Signal()))
	}
	fmt.Printf("child exit %d\n", status.ExitStatus())
	os.Exit(status.ExitStatus())
}

// formatPeer prints an address as the C probe does: "a.b.c.d:port" (IPv4 and
// IPv4-mapped) or "[v6]:port".
func formatPeer(ip net.IP, port int) string {
	if v4 := ip.To4(); v4 != nil {
		return fmt.Sprintf("%s:%d", v4, port)
	}
	return fmt.Sprintf("[%s]:%d", ip, port)
}

func sockaddrText(sa syscall.Sockaddr) string {
	switch a := sa.(type) {
	case *syscall.SockaddrInet4:
		return formatPeer(net.IP(a.Addr[:]), a.Port)
	case *syscall.SockaddrInet6:
		return formatPeer(net.IP(a.Addr[:]), a.Port)
	}
	return "?"
}

// mmsghdr is struct mmsghdr: a msghdr and the length the kernel sent.
type mmsghdr struct {
	hdr syscall.Msghdr
	len uint32
	_   [4]byte
}

// rawSockaddr is addr:port as the kernel's sockaddr_in or sockaddr_in6.
func rawSockaddr(addr *net.UDPAddr) (int, []byte) {
	if v4 := addr.IP.To4(); v4 != nil {
		raw := make([]byte, syscall.SizeofSockaddrInet4)
		binary.LittleEndian.PutUint16(raw[0:], syscall.AF_INET)
		binary.BigEndian.PutUint16(raw[2:], uint16(addr.Port))
		copy(raw[4:8], v4)
		return syscall.AF_INET, raw
	}
	raw := make([]byte, syscall.SizeofSockaddrInet6)
	binary.LittleEndian.PutUint16(raw[0:], syscall.AF_INET6)
	binary.BigEndian.PutUint16(raw[2:], uint16(addr.Port))
	copy(raw[8:24], addr.IP.To16())
	return syscall.AF_INET6, raw
}

// receiveMany: count replies received with recvmmsg(2) (raw, MSG_WAITFORONE),
// each as "REPLY from PEER".
func receiveMany(fd int, count int) []string {
	replies := make([]string, 0, count)
	for len(replies) < count {
		want := count - len(replies)
		messages := make([]mmsghdr, want)
		iov := make([]syscall.Iovec, want)
		names := make([]syscall.RawSockaddrAny, want)
		bufs := make([][]byte, want)
		for i := range messages {
			bufs[i] = make([]byte, 255)
			iov[i].Base = &bufs[i][0]
			iov[i].SetLen(len(bufs[i]))
			messages[i].hdr.Name = (*byte)(unsafe.Pointer(&names[i]))
			messages[i].hdr.Namelen = uint32(unsafe.Sizeof(names[i]))
			messages[i].hdr.Iov = &iov[i]
			messages[i].hdr.Iovlen = 1
		}
		n, _, errno := syscall.Syscall6(syscall.SYS_RECVMMSG, uintptr(fd),
			uintptr(unsafe.Pointer(&messages[0])), uintptr(want), 0x10000, 0, 0)
		if errno == syscall.EINTR {
			continue
		}
		if errno == syscall.EAGAIN {
			errno = syscall.ETIMEDOUT
		}
		if errno != 0 {
			fail(errno)
		}
		for i := 0; i < int(n); i++ {
			raw := (*[28]byte)(unsafe.Pointer(&names[i]))
			peerPort := int(binary.BigEndian.Uint16(raw[2:4]))
			peer := net.IP(raw[8:24])
			if binary.LittleEndian.Uint16(raw[0:2]) == syscall.AF_INET {
				peer = net.IP(raw[4:8])
			}
			replies = append(replies, fmt.Sprintf("%s from %s", bufs[i][:messages[i].len],
				formatPeer(peer, peerPort)))
		}
	}
	return replies
}

// cmdUDPMmsg: sendmmsg(2) of N datagrams "MSG-i" with a destination each on
// an unconnected socket (Go's net package never uses it: a raw syscall), then
// N replies (recvfrom, or with many recvmmsg), sorted.
func cmdUDPMmsg(host, port, msg string, count int, many bool) {
	if count < 1 || count > 16 {
		failText("EINVAL")
	}
	target, err := net.ResolveUDPAddr("udp", net.JoinHostPort(host, port))
	if err != nil {
		fail(err)
	}
	family, name := rawSockaddr(target)
	fd, err := syscall.Socket(family, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		fail(err)
	}
	timeout := syscall.NsecToTimeval(int64(receiveTimeout))
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &timeout); err != nil {
		fail(err)
	}
	messages := make([]mmsghdr, count)
	iov := make([]syscall.Iovec, count)
	texts := make([][]byte, count)
	for i := range messages {
		texts[i] = []byte(fmt.Sprintf("%s-%d", msg, i))
		iov[i].Base = &texts[i][0]
		iov[i].SetLen(len(texts[i]))
		messages[i].hdr.Name = &name[0]
		messages[i].hdr.Namelen = uint32(len(name))
		messages[i].hdr.Iov = &iov[i]
		messages[i].hdr.Iovlen = 1
	}
	sent, _, errno := syscall.Syscall6(sysSendmmsg, uintptr(fd),
		uintptr(unsafe.Pointer(&messages[0])), uintptr(count), 0, 0, 0)
	if errno != 0 {
		fail(errno)
	}
	line := fmt.Sprintf("sent %d:", sent)
	for i := 0; i < int(sent); i++ {
		line += fmt.Sprintf(" %d", messages[i].len)
	}
	fmt.Println(line)
	replies := make([]string, 0, sent)
	if many {
		replies = receiveMany(fd, int(sent))
	}
	buf := make([]byte, 512)
	for i := 0; i < int(sent) && !many; i++ {
		n, from, err := syscall.Recvfrom(fd, buf, 0)
		for err == syscall.EINTR {
			n, from, err = syscall.Recvfrom(fd, buf, 0)
		}
		if err == syscall.EAGAIN {
			err = syscall.ETIMEDOUT
		}
		if err != nil {
			fail(err)
		}
		replies = append(replies, fmt.Sprintf("%s from %s", buf[:n], sockaddrText(from)))
	}
	sort.Strings(replies)
	for _, reply := range replies {
		fmt.Println(reply)
	}
	syscall.Close(fd)
}

var serveOutput = make(chan string)

func cmdServe(addr string, port []string, name string, more []string) {
	ports := append(port, more...)
	listeners := make([]net.Listener, 0, len(ports))
	for _, p := range ports {
		listener, err := net.Listen("tcp", net.JoinHostPort(addr, p))
		if err != nil {
			fail(err)
		}
		fmt.Printf("listening on %d\n", listener.Addr().(*net.TCPAddr).Port)
		listeners = append(listeners, listener)
	}
	for _, listener := range listeners {
		go serveListener(listener, name)
	}
	for line := range serveOutput {
		fmt.Print(line)
	}
}

func serveListener(listener net.Listener, name string) {
	for {
		conn, err := listener.Accept()
		if err != nil {
			fail(err)
		}
		serveConn(conn.(*net.TCPConn), name)
	}
}

func serveConn(conn *net.TCPConn, name string) {
	defer conn.Close()
	remote := conn.RemoteAddr().(*net.TCPAddr)
	peer := formatPeer(remote.IP, remote.Port)
	named := "?"
	if raw, err := conn.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) {
			if sa, err := syscall.Getpeername(int(fd)); err == nil {
				named = sockaddrText(sa)
			}
		})
	}
	request := make([]byte, 0, 8192)
	buffer := make([]byte, 8192)
	for len(request) < 8191 && !strings.Contains(string(request), "\r\n\r\n") {
		n, err := conn.Read(buffer[:8191-len(request)])
		request = append(request, buffer[:n]...)
		if err != nil {
			break
		}
	}
	method, path := "?", "?"
	if fields := strings.Fields(string(request)); len(fields) >= 2 {
		method, path = fields[0], fields[1]
	}
	differs := ""
	if peer != named {
		differs = " getpeername differs"
	}
	body := fmt.Sprintf("%s %s %s from %s%s\n", name, method, path, peer, differs)
	head := fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n", len(body))
	conn.Write([]byte(head + body))
	serveOutput <- body
}
