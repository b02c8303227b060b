/*
 * loop: the tracee workloads of the benchmark (built with gcc -static -O2).
 *
 *   loop true                       exit 0 at once (startup cost)
 *   loop getpid N                   N getpid calls, timed as one block
 *   loop open PATH N                N openat+close pairs, timed as one block
 *   loop open-each PATH N           the same, each pair timed (first = cold)
 *   loop read-each PATH N           N open+fstat+read+close, each timed (a file read
 *                                   whole, as Go's os.ReadFile does: the Go client's
 *                                   per-request /etc/hosts)
 *   loop stat PATH N                N stat calls, each timed
 *   loop fd-meta DIR N              N rounds of fchmod+fchown+fstatfs on an fd of a
 *                                   new (unlinked) file in DIR, each round timed
 *   loop connect HOST PORT N        N socket+connect+close, each timed
 *   loop http HOST PORT N           one keep-alive connection, N small GETs, each timed
 *   loop bulk HOST PORT             read everything the server sends
 *
 * Prints one JSON object on stdout: {"op", "n", "total_ns"} plus, for the
 * per-call modes, "first_ns", "p50_ns", "p99_ns" over calls 2..N (the first is
 * reported apart: it is where caches are cold); bulk adds "bytes" and
 * "first_byte_ns" (connection setup, which throughput leaves out).
 * Timing happens inside the program, so process startup never counts.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static _Noreturn void die(const char *what)
{
    fprintf(stderr, "loop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static long parse_count(const char *text)
{
    char *end;
    long value = strtol(text, &end, 10);
    if (*end || value < 0) {
        fprintf(stderr, "loop: bad count %s\n", text);
        exit(2);
    }
    return value;
}

static int compare_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* One JSON line: the first sample apart, percentiles over the others. */
static void report_samples(const char *op, int64_t *samples, long n, int64_t total)
{
    int64_t first = n > 0 ? samples[0] : 0;
    int64_t p50 = 0, p99 = 0;
    if (n > 1) {
        long rest = n - 1;
        qsort(samples + 1, (size_t)rest, sizeof(int64_t), compare_i64);
        p50 = samples[1 + rest / 2];
        long index = (rest * 99) / 100;
        if (index >= rest)
            index = rest - 1;
        p99 = samples[1 + index];
    } else {
        p50 = p99 = first;
    }
    printf("{\"op\": \"%s\", \"n\": %ld, \"total_ns\": %lld, \"first_ns\": %lld, "
           "\"p50_ns\": %lld, \"p99_ns\": %lld}\n",
           op, n, (long long)total, (long long)first, (long long)p50, (long long)p99);
}

static int64_t *alloc_samples(long n)
{
    int64_t *samples = calloc((size_t)(n ? n : 1), sizeof(int64_t));
    if (!samples)
        die("calloc");
    return samples;
}

static struct sockaddr_in address(const char *host, const char *port)
{
    struct sockaddr_in sin = {0};
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)atoi(port));
    if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
        fprintf(stderr, "loop: not an IPv4 address: %s\n", host);
        exit(2);
    }
    return sin;
}

static int connect_to(const struct sockaddr_in *sin)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    if (connect(fd, (const struct sockaddr *)sin, sizeof(*sin)) != 0)
        die("connect");
    return fd;
}

static int cmd_getpid(long n)
{
    int64_t start = now_ns();
    for (long i = 0; i < n; i++)
        syscall(SYS_getpid);
    printf("{\"op\": \"getpid\", \"n\": %ld, \"total_ns\": %lld}\n", n,
           (long long)(now_ns() - start));
    return 0;
}

static void open_close(const char *path)
{
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die(path);
    close(fd);
}

static int cmd_open(const char *path, long n)
{
    int64_t start = now_ns();
    for (long i = 0; i < n; i++)
        open_close(path);
    printf("{\"op\": \"open\", \"n\": %ld, \"total_ns\": %lld}\n", n,
           (long long)(now_ns() - start));
    return 0;
}

static int cmd_open_each(const char *path, long n)
{
    int64_t *samples = alloc_samples(n);
    int64_t start = now_ns();
    for (long i = 0; i < n; i++) {
        int64_t t = now_ns();
        open_close(path);
        samples[i] = now_ns() - t;
    }
    report_samples("open-each", samples, n, now_ns() - start);
    return 0;
}

static int cmd_read_each(const char *path, long n)
{
    int64_t *samples = alloc_samples(n);
    char buf[65536];
    struct stat st;
    int64_t start = now_ns();
    for (long i = 0; i < n; i++) {
        int64_t t = now_ns();
        int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fstat(fd, &st) != 0)
            die(path);
        while (read(fd, buf, sizeof(buf)) > 0)
            ;
        close(fd);
        samples[i] = now_ns() - t;
    }
    report_samples("read-each", samples, n, now_ns() - start);
    return 0;
}

static int cmd_stat(const char *path, long n)
{
    int64_t *samples = alloc_samples(n);
    struct stat st;
    int64_t start = now_ns();
    for (long i = 0; i < n; i++) {
        int64_t t = now_ns();
        if (stat(path, &st) != 0)
            die(path);
        samples[i] = now_ns() - t;
    }
    report_samples("stat", samples, n, now_ns() - start);
    return 0;
}

static int cmd_fd_meta(const char *dir, long n)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/loop-fd-meta-XXXXXX", dir);
    int fd = mkstemp(path);
    if (fd < 0)
        die(path);
    unlink(path);
    int64_t *samples = alloc_samples(n);
    struct statfs fs;
    int64_t start = now_ns();
    for (long i = 0; i < n; i++) {
        int64_t t = now_ns();
        if (fchmod(fd, (i & 1) ? 0600 : 0640) != 0 || fchown(fd, (uid_t)-1, (gid_t)-1) != 0
                || fstatfs(fd, &fs) != 0)
            die("fd-meta");
        samples[i] = now_ns() - t;
    }
    report_samples("fd-meta", samples, n, now_ns() - start);
    close(fd);
    return 0;
}

static int cmd_connect(const char *host, const char *port, long n)
{
    struct sockaddr_in sin = address(host, port);
    int64_t *samples = alloc_samples(n);
    int64_t start = now_ns();
    for (long i = 0; i < n; i++) {
        int64_t t = now_ns();
        close(connect_to(&sin));
        samples[i] = now_ns() - t;
    }
    report_samples("connect", samples, n, now_ns() - start);
    return 0;
}

/* Reads one response: headers, then Content-Length bytes of body. */
static void read_response(int fd)
{
    char buf[4096];
    size_t have = 0;
    long body = -1;
    for (;;) {
        ssize_t got = read(fd, buf + have, sizeof(buf) - 1 - have);
        if (got <= 0)
            die("read response");
        have += (size_t)got;
        buf[have] = 0;
        char *end = strstr(buf, "\r\n\r\n");
        if (!end)
            continue;
        if (body < 0) {
            char *length = strcasestr(buf, "content-length:");
            body = length ? atol(length + 15) : 0;
        }
        if ((long)(have - (size_t)(end + 4 - buf)) >= body)
            return;
    }
}

static int cmd_http(const char *host, const char *port, long n)
{
    struct sockaddr_in sin = address(host, port);
    int fd = connect_to(&sin);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    static const char request[] = "GET /small HTTP/1.1\r\nHost: bench\r\n\r\n";
    int64_t *samples = alloc_samples(n);
    int64_t start = now_ns();
    for (long i = 0; i < n; i++) {
        int64_t t = now_ns();
        if (write(fd, request, sizeof(request) - 1) != (ssize_t)(sizeof(request) - 1))
            die("write request");
        read_response(fd);
        samples[i] = now_ns() - t;
    }
    int64_t total = now_ns() - start;
    close(fd);
    report_samples("http", samples, n, total);
    return 0;
}

static int cmd_bulk(const char *host, const char *port)
{
    struct sockaddr_in sin = address(host, port);
    static char buf[1 << 16];
    long long bytes = 0;
    int64_t start = now_ns(), first_byte = 0;
    int fd = connect_to(&sin);
    for (;;) {
        ssize_t got = read(fd, buf, sizeof(buf));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        if (got == 0)
            break;
        if (bytes == 0)
            first_byte = now_ns() - start;
        bytes += got;
    }
    int64_t total = now_ns() - start;
    close(fd);
    printf("{\"op\": \"bulk\", \"n\": 1, \"total_ns\": %lld, \"first_byte_ns\": %lld, "
           "\"bytes\": %lld}\n",
           (long long)total, (long long)first_byte, bytes);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "true"))
        return 0;
    if (argc == 3 && !strcmp(argv[1], "getpid"))
        return cmd_getpid(parse_count(argv[2]));
    if (argc == 4 && !strcmp(argv[1], "open"))
        return cmd_open(argv[2], parse_count(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "open-each"))
        return cmd_open_each(argv[2], parse_count(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "read-each"))
        return cmd_read_each(argv[2], parse_count(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "stat"))
        return cmd_stat(argv[2], parse_count(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "fd-meta"))
        return cmd_fd_meta(argv[2], parse_count(argv[3]));
    if (argc == 5 && !strcmp(argv[1], "connect"))
        return cmd_connect(argv[2], argv[3], parse_count(argv[4]));
    if (argc == 5 && !strcmp(argv[1], "http"))
        return cmd_http(argv[2], argv[3], parse_count(argv[4]));
    if (argc == 4 && !strcmp(argv[1], "bulk"))
        return cmd_bulk(argv[2], argv[3]);
    fputs("usage: loop true | getpid N | open PATH N | open-each PATH N | stat PATH N\n"
          "       | fd-meta DIR N\n"
          "       | connect HOST PORT N | http HOST PORT N | bulk HOST PORT\n",
          stderr);
    return 2;
}
