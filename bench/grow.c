/*
 * grow: the workloads of the "growth" benchmark group (gcc -static -O2 -pthread).
 * Each mode grows one dimension, so the group can show where cost bends.
 *
 *   grow serve                            a server on 127.0.0.1 (backlog 1024, one
 *                                         thread per connection); prints "http=P bulk=P udp=P":
 *                                         http answers each request with a 2-byte body
 *                                         (keep-alive); bulk reads "N\n" and sends N bytes;
 *                                         udp=P echoes each datagram
 *   grow read PATH TIMES                  TIMES x (open, read to EOF in 1 MiB reads, close)
 *   grow list DIR TIMES                   TIMES x (open, getdents64 to the end, close)
 *   grow streams HOST PORT N BYTES        N connections opened first, then N threads
 *                                         each read BYTES; aggregate time from the start
 *                                         signal to the last byte
 *   grow requests HOST PORT N R           N connections, N threads, R small HTTP
 *                                         requests each, every request timed
 *   grow udp HOST PORT N                  a connected UDP socket, N request/responses
 *                                         with the server's udp port, each timed
 *   grow calls PATH N K                   N threads, K openat+close of PATH each (a
 *                                         trapped call under mtrace), started together
 *
 * One JSON line on stdout. read/list: "ns" (one duration per repetition) and the
 * byte or entry count; streams: "total_ns", "bytes"; requests: "total_ns",
 * "p50_ns", "p99_ns", "requests" (udp too); calls: "total_ns", "calls".
 * Timing happens inside the program, so process start-up never counts.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
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
    fprintf(stderr, "grow: %s: %s\n", what, strerror(errno));
    exit(1);
}

static long count(const char *text)
{
    char *end;
    long value = strtol(text, &end, 10);
    if (*end || value <= 0) {
        fprintf(stderr, "grow: bad count %s\n", text);
        exit(2);
    }
    return value;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* --- serve ------------------------------------------------------------------ */

static int listen_any(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0 || listen(fd, 1024) != 0)
        die("bind/listen");
    socklen_t len = sizeof(sin);
    getsockname(fd, (struct sockaddr *)&sin, &len);
    *port = ntohs(sin.sin_port);
    return fd;
}

static void *serve_http(void *arg)
{
    static const char response[] =
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
    int fd = (int)(intptr_t)arg, one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    char buf[8192];
    size_t have = 0;
    for (;;) {
        ssize_t got = read(fd, buf + have, sizeof(buf) - 1 - have);
        if (got <= 0)
            break;
        have += (size_t)got;
        buf[have] = 0;
        char *end;
        while ((end = strstr(buf, "\r\n\r\n")) != NULL) {
            if (write_all(fd, response, sizeof(response) - 1) != 0)
                goto done;
            size_t used = (size_t)(end + 4 - buf);
            memmove(buf, buf + used, have - used + 1);
            have -= used;
        }
        if (have == sizeof(buf) - 1)
            break;
    }
done:
    close(fd);
    return NULL;
}

static void *serve_bulk(void *arg)
{
    static char chunk[1 << 16];
    int fd = (int)(intptr_t)arg;
    char line[32];
    size_t have = 0;
    while (have < sizeof(line) - 1) {
        ssize_t got = read(fd, line + have, 1);
        if (got <= 0 || line[have] == '\n')
            break;
        have++;
    }
    line[have] = 0;
    long long bytes = atoll(line);
    while (bytes > 0) {
        size_t n = bytes < (long long)sizeof(chunk) ? (size_t)bytes : sizeof(chunk);
        if (write_all(fd, chunk, n) != 0)
            break;
        bytes -= (long long)n;
    }
    close(fd);
    return NULL;
}

static void *accept_loop(void *arg)
{
    int listener = (int)(intptr_t)(((intptr_t *)arg)[0]);
    void *(*serve)(void *) = (void *(*)(void *))((intptr_t *)arg)[1];
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 << 10);
    for (;;) {
        int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (client < 0)
            continue;
        pthread_t thread;
        if (pthread_create(&thread, &attr, serve, (void *)(intptr_t)client) != 0)
            close(client);
    }
    return NULL;
}

static void *serve_udp(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char buf[2048];
    for (;;) {
        struct sockaddr_in peer;
        socklen_t len = sizeof(peer);
        ssize_t got = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &len);
        if (got >= 0)
            sendto(fd, buf, (size_t)got, 0, (struct sockaddr *)&peer, len);
    }
    return NULL;
}

static int cmd_serve(void)
{
    signal(SIGPIPE, SIG_IGN);
    int udp = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sin_len = sizeof(sin);
    if (udp < 0 || bind(udp, (struct sockaddr *)&sin, sizeof(sin)) != 0 ||
        getsockname(udp, (struct sockaddr *)&sin, &sin_len) != 0)
        die("udp socket");
    pthread_t udp_thread;
    if (pthread_create(&udp_thread, NULL, serve_udp, (void *)(intptr_t)udp) != 0)
        die("pthread_create");
    int http_port, bulk_port;
    static intptr_t http_args[2], bulk_args[2];
    http_args[0] = listen_any(&http_port);
    http_args[1] = (intptr_t)serve_http;
    bulk_args[0] = listen_any(&bulk_port);
    bulk_args[1] = (intptr_t)serve_bulk;
    pthread_t thread;
    if (pthread_create(&thread, NULL, accept_loop, http_args) != 0)
        die("pthread_create");
    printf("http=%d bulk=%d udp=%d\n", http_port, bulk_port, ntohs(sin.sin_port));
    fflush(stdout);
    accept_loop(bulk_args);
    return 0;
}

/* --- files ------------------------------------------------------------------ */

static void print_durations(const char *op, const char *what, long long amount,
                            const int64_t *ns, long times)
{
    printf("{\"op\": \"%s\", \"%s\": %lld, \"ns\": [", op, what, amount);
    for (long i = 0; i < times; i++)
        printf("%s%lld", i ? ", " : "", (long long)ns[i]);
    printf("]}\n");
}

static int cmd_read(const char *path, long times)
{
    size_t size = 1 << 20;
    char *buf = malloc(size);
    int64_t *ns = calloc((size_t)times, sizeof(int64_t));
    if (!buf || !ns)
        die("malloc");
    long long bytes = 0;
    for (long i = 0; i < times; i++) {
        int64_t start = now_ns();
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            die(path);
        bytes = 0;
        for (;;) {
            ssize_t got = read(fd, buf, size);
            if (got < 0) {
                if (errno == EINTR)
                    continue;
                die("read");
            }
            if (got == 0)
                break;
            bytes += got;
        }
        close(fd);
        ns[i] = now_ns() - start;
    }
    print_durations("read", "bytes", bytes, ns, times);
    return 0;
}

static int cmd_list(const char *path, long times)
{
    static char buf[1 << 16];
    int64_t *ns = calloc((size_t)times, sizeof(int64_t));
    if (!ns)
        die("calloc");
    long long entries = 0;
    for (long i = 0; i < times; i++) {
        int64_t start = now_ns();
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
            die(path);
        entries = 0;
        for (;;) {
            long got = syscall(SYS_getdents64, fd, buf, sizeof(buf));
            if (got < 0)
                die("getdents64");
            if (got == 0)
                break;
            for (long offset = 0; offset < got;) {
                struct dirent64 *entry = (struct dirent64 *)(buf + offset);
                if (strcmp(entry->d_name, ".") && strcmp(entry->d_name, ".."))
                    entries++;
                offset += entry->d_reclen;
            }
        }
        close(fd);
        ns[i] = now_ns() - start;
    }
    print_durations("list", "entries", entries, ns, times);
    return 0;
}

/* --- threads started together ------------------------------------------------- */

static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_open = PTHREAD_COND_INITIALIZER;
static int gate_is_open;

static void wait_gate(void)
{
    pthread_mutex_lock(&gate_lock);
    while (!gate_is_open)
        pthread_cond_wait(&gate_open, &gate_lock);
    pthread_mutex_unlock(&gate_lock);
}

static void open_gate(void)
{
    pthread_mutex_lock(&gate_lock);
    gate_is_open = 1;
    pthread_cond_broadcast(&gate_open);
    pthread_mutex_unlock(&gate_lock);
}

struct worker {
    pthread_t thread;
    int fd;
    long long bytes;  /* streams: bytes read */
    long count;       /* requests, calls: how many */
    const char *path; /* calls */
    int64_t *samples; /* requests: one per request */
};

static void run_workers(struct worker *workers, long n, void *(*body)(void *), int64_t *total)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10);
    for (long i = 0; i < n; i++)
        if (pthread_create(&workers[i].thread, &attr, body, &workers[i]) != 0)
            die("pthread_create");
    int64_t start = now_ns();
    open_gate();
    for (long i = 0; i < n; i++)
        pthread_join(workers[i].thread, NULL);
    *total = now_ns() - start;
}

static int connect_to(const char *host, const char *port)
{
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port))};
    if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
        fprintf(stderr, "grow: not an IPv4 address: %s\n", host);
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    if (connect(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0)
        die("connect");
    return fd;
}

static void *stream_body(void *arg)
{
    struct worker *worker = arg;
    char *buf = malloc(1 << 16);
    if (!buf)
        die("malloc");
    wait_gate();
    char line[32];
    int len = snprintf(line, sizeof(line), "%lld\n", worker->bytes);
    if (write_all(worker->fd, line, (size_t)len) != 0)
        die("write");
    worker->bytes = 0;
    for (;;) {
        ssize_t got = read(worker->fd, buf, 1 << 16);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        if (got == 0)
            break;
        worker->bytes += got;
    }
    close(worker->fd);
    free(buf);
    return NULL;
}

static int cmd_streams(const char *host, const char *port, long n, long long bytes)
{
    struct worker *workers = calloc((size_t)n, sizeof(*workers));
    if (!workers)
        die("calloc");
    for (long i = 0; i < n; i++) {
        workers[i].fd = connect_to(host, port);
        workers[i].bytes = bytes;
    }
    int64_t total;
    run_workers(workers, n, stream_body, &total);
    long long received = 0;
    for (long i = 0; i < n; i++)
        received += workers[i].bytes;
    printf("{\"op\": \"streams\", \"n\": %ld, \"total_ns\": %lld, \"bytes\": %lld}\n", n,
           (long long)total, received);
    return received == bytes * n ? 0 : 1;
}

static void *request_body(void *arg)
{
    static const char request[] = "GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
    struct worker *worker = arg;
    char buf[4096];
    wait_gate();
    for (long i = 0; i < worker->count; i++) {
        int64_t start = now_ns();
        if (write_all(worker->fd, request, sizeof(request) - 1) != 0)
            die("write");
        size_t have = 0;
        for (;;) {  /* the whole response: headers and the 2-byte body */
            ssize_t got = read(worker->fd, buf + have, sizeof(buf) - 1 - have);
            if (got <= 0)
                die("read");
            have += (size_t)got;
            buf[have] = 0;
            char *end = strstr(buf, "\r\n\r\n");
            if (end && (size_t)(end + 4 - buf) + 2 <= have)
                break;
        }
        worker->samples[i] = now_ns() - start;
    }
    close(worker->fd);
    return NULL;
}

static int compare_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int cmd_requests(const char *host, const char *port, long n, long r)
{
    struct worker *workers = calloc((size_t)n, sizeof(*workers));
    int64_t *samples = calloc((size_t)(n * r), sizeof(int64_t));
    if (!workers || !samples)
        die("calloc");
    for (long i = 0; i < n; i++) {
        workers[i].fd = connect_to(host, port);
        workers[i].count = r;
        workers[i].samples = samples + i * r;
    }
    int64_t total;
    run_workers(workers, n, request_body, &total);
    long all = n * r;
    qsort(samples, (size_t)all, sizeof(int64_t), compare_i64);
    long p99 = (all * 99) / 100;
    printf("{\"op\": \"requests\", \"n\": %ld, \"requests\": %ld, \"total_ns\": %lld, "
           "\"p50_ns\": %lld, \"p99_ns\": %lld}\n",
           n, all, (long long)total, (long long)samples[all / 2],
           (long long)samples[p99 < all ? p99 : all - 1]);
    return 0;
}

static int cmd_udp(const char *host, const char *port, long n)
{
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port))};
    if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
        fprintf(stderr, "grow: not an IPv4 address: %s\n", host);
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    struct timeval timeout = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    if (connect(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0)
        die("connect");
    int64_t *samples = calloc((size_t)n, sizeof(int64_t));
    if (!samples)
        die("calloc");
    char buf[64];
    int64_t begin = now_ns();
    for (long i = 0; i < n; i++) {
        int64_t start = now_ns();
        if (send(fd, "ping", 4, 0) != 4)
            die("send");
        if (recv(fd, buf, sizeof(buf), 0) != 4)
            die("recv");
        samples[i] = now_ns() - start;
    }
    int64_t total = now_ns() - begin;
    qsort(samples, (size_t)n, sizeof(int64_t), compare_i64);
    long p99 = (n * 99) / 100;
    printf("{\"op\": \"udp\", \"requests\": %ld, \"total_ns\": %lld, \"p50_ns\": %lld, "
           "\"p99_ns\": %lld}\n",
           n, (long long)total, (long long)samples[n / 2],
           (long long)samples[p99 < n ? p99 : n - 1]);
    return 0;
}

static void *call_body(void *arg)
{
    struct worker *worker = arg;
    wait_gate();
    for (long i = 0; i < worker->count; i++) {
        int fd = (int)syscall(SYS_openat, AT_FDCWD, worker->path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            die(worker->path);
        syscall(SYS_close, fd);
    }
    return NULL;
}

static int cmd_calls(const char *path, long n, long k)
{
    struct worker *workers = calloc((size_t)n, sizeof(*workers));
    if (!workers)
        die("calloc");
    for (long i = 0; i < n; i++) {
        workers[i].count = k;
        workers[i].path = path;
    }
    int64_t total;
    run_workers(workers, n, call_body, &total);
    printf("{\"op\": \"calls\", \"n\": %ld, \"calls\": %ld, \"total_ns\": %lld}\n", n, n * k,
           (long long)total);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "serve"))
        return cmd_serve();
    if (argc == 4 && !strcmp(argv[1], "read"))
        return cmd_read(argv[2], count(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "list"))
        return cmd_list(argv[2], count(argv[3]));
    if (argc == 6 && !strcmp(argv[1], "streams"))
        return cmd_streams(argv[2], argv[3], count(argv[4]), count(argv[5]));
    if (argc == 6 && !strcmp(argv[1], "requests"))
        return cmd_requests(argv[2], argv[3], count(argv[4]), count(argv[5]));
    if (argc == 5 && !strcmp(argv[1], "udp"))
        return cmd_udp(argv[2], argv[3], count(argv[4]));
    if (argc == 5 && !strcmp(argv[1], "calls"))
        return cmd_calls(argv[2], count(argv[3]), count(argv[4]));
    fputs("usage: grow serve | read PATH TIMES | list DIR TIMES | streams HOST PORT N BYTES |"
          " requests HOST PORT N R | calls PATH N K\n", stderr);
    return 2;
}
