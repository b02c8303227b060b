/*
 * probe: a multi-command test program, built three ways from this one source
 * (static glibc, static musl, dynamic glibc). tests/programs/go/probe-go is the
 * same CLI in Go; all four must print the same bytes for the same inputs, so a
 * plain run can be compared with a run under mtrace.
 *
 * Errors print "error: <ERRNO NAME>" (or EAI_* for name resolution) to stdout
 * and exit 1. Usage: see usage() below.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define E(name) {name, #name}
static const struct {
    int code;
    const char *name;
} errno_names[] = {
    E(EPERM), E(ENOENT), E(ESRCH), E(EINTR), E(EIO), E(ENXIO), E(E2BIG),
    E(ENOEXEC), E(EBADF), E(ECHILD), E(EAGAIN), E(ENOMEM), E(EACCES),
    E(EFAULT), E(EBUSY), E(EEXIST), E(EXDEV), E(ENODEV), E(ENOTDIR),
    E(EISDIR), E(EINVAL), E(ENFILE), E(EMFILE), E(ENOTTY), E(ETXTBSY),
    E(EFBIG), E(ENOSPC), E(ESPIPE), E(EROFS), E(EMLINK), E(EPIPE), E(EDOM),
    E(ERANGE), E(EDEADLK), E(ENAMETOOLONG), E(ENOLCK), E(ENOSYS),
    E(ENOTEMPTY), E(ELOOP), E(ENOMSG), E(ENODATA), E(ETIME), E(EPROTO),
    E(EBADMSG), E(EOVERFLOW), E(EILSEQ), E(ENOTSOCK), E(EDESTADDRREQ),
    E(EMSGSIZE), E(EPROTOTYPE), E(ENOPROTOOPT), E(EPROTONOSUPPORT),
    E(ESOCKTNOSUPPORT), E(EOPNOTSUPP), E(EPFNOSUPPORT), E(EAFNOSUPPORT),
    E(EADDRINUSE), E(EADDRNOTAVAIL), E(ENETDOWN), E(ENETUNREACH),
    E(ENETRESET), E(ECONNABORTED), E(ECONNRESET), E(ENOBUFS), E(EISCONN),
    E(ENOTCONN), E(ESHUTDOWN), E(ETIMEDOUT), E(ECONNREFUSED), E(EHOSTDOWN),
    E(EHOSTUNREACH), E(EALREADY), E(EINPROGRESS), E(ESTALE), E(ECANCELED),
};

static _Noreturn void fail_text(const char *text)
{
    printf("error: %s\n", text);
    exit(1);
}

static _Noreturn void fail_errno(int err)
{
    for (size_t i = 0; i < sizeof(errno_names) / sizeof(errno_names[0]); i++)
        if (errno_names[i].code == err)
            fail_text(errno_names[i].name);
    printf("error: errno %d\n", err);
    exit(1);
}

static void fail_gai(int rc)
{
    switch (rc) {
    case EAI_NONAME:
#ifdef EAI_NODATA
    case EAI_NODATA:
#endif
        fail_text("EAI_NONAME");
    case EAI_AGAIN:
        fail_text("EAI_AGAIN");
    case EAI_SYSTEM:
        fail_errno(errno);
    default:
        fail_text("EAI_FAIL");
    }
}

static void usage(void)
{
    fputs("usage: probe COMMAND ARGS...\n"
          "  env NAME | cat PATH | stat PATH | statfs PATH | ls DIR | readlink PATH\n"
          "  symlink TARGET PATH\n"
          "  resolve NAME | resolve6 NAME | tcp HOST PORT MSG | http URL\n"
          "  unix-connect PATH MSG\n"
          "  udp HOST PORT MSG | udp-unconnected HOST PORT MSG\n"
          "  udp-mmsg HOST PORT MSG N | udp-mmsg-recv HOST PORT MSG N\n"
          "  exit N | kill SIG | loop-getpid N | loop-open PATH N\n"
          "  exec PATH ARGS... | fork-exec PATH ARGS... | hostname\n"
          "  serve ADDR PORT NAME [PORT2]\n",
          stderr);
    exit(2);
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail_errno(errno);
        }
        buf += n;
        len -= (size_t)n;
    }
}

static void out(const char *buf, size_t len)
{
    fflush(stdout);
    write_all(1, buf, len);
}

/* Resolves HOST:PORT (any family, the order getaddrinfo gives). */
static struct addrinfo *resolve_addr(const char *host, const char *port, int socktype)
{
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = socktype;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0)
        fail_gai(rc);
    return res;
}

/* Connects to the first address that accepts; fails with the last error. */
static int connect_to(const char *host, const char *port, int socktype)
{
    struct addrinfo *res = resolve_addr(host, port, socktype);
    int err = ECONNREFUSED;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            freeaddrinfo(res);
            return fd;
        }
        err = errno;
        close(fd);
    }
    freeaddrinfo(res);
    fail_errno(err);
    return -1;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static long parse_long(const char *text)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || *end || end == text)
        fail_text("EINVAL");
    return value;
}

static int cmd_env(const char *name)
{
    const char *value = getenv(name);
    if (value)
        printf("%s=%s\n", name, value);
    else
        printf("%s unset\n", name);
    return 0;
}

static int cmd_cat(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail_errno(errno);
    char buf[65536];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail_errno(errno);
        }
        if (n == 0)
            break;
        out(buf, (size_t)n);
    }
    close(fd);
    return 0;
}

static void print_statfs(const char *label, const struct statfs *fs)
{
    printf("%s type=%lx bsize=%ld blocks=%llu files=%llu namelen=%ld\n", label,
           (unsigned long)fs->f_type, (long)fs->f_bsize, (unsigned long long)fs->f_blocks,
           (unsigned long long)fs->f_files, (long)fs->f_namelen);
}

/* statfs of PATH, then fstatfs of an fd of it: the filesystem it is on. */
static int cmd_statfs(const char *path)
{
    struct statfs fs;
    if (statfs(path, &fs) != 0)
        fail_errno(errno);
    print_statfs("statfs", &fs);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail_errno(errno);
    if (fstatfs(fd, &fs) != 0)
        fail_errno(errno);
    print_statfs("fstatfs", &fs);
    close(fd);
    return 0;
}

static int cmd_stat(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        fail_errno(errno);
    const char *type = "other";
    switch (st.st_mode & S_IFMT) {
    case S_IFREG: type = "file"; break;
    case S_IFDIR: type = "dir"; break;
    case S_IFLNK: type = "symlink"; break;
    case S_IFIFO: type = "fifo"; break;
    case S_IFSOCK: type = "socket"; break;
    case S_IFCHR: type = "char"; break;
    case S_IFBLK: type = "block"; break;
    }
    printf("size=%lld mode=%04o type=%s\n", (long long)st.st_size,
           (unsigned)(st.st_mode & 07777), type);
    return 0;
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int cmd_ls(const char *path)
{
    DIR *dir = opendir(path);
    if (!dir)
        fail_errno(errno);
    size_t count = 0, cap = 64;
    char **names = malloc(cap * sizeof(*names));
    struct dirent *entry;
    errno = 0;
    while ((entry = readdir(dir))) {
        if (!strcmp(entry->d_name, ".") || !strcmp(entry->d_name, ".."))
            continue;
        if (count == cap)
            names = realloc(names, (cap *= 2) * sizeof(*names));
        names[count++] = strdup(entry->d_name);
    }
    if (errno)
        fail_errno(errno);
    closedir(dir);
    qsort(names, count, sizeof(*names), compare_names);
    for (size_t i = 0; i < count; i++)
        printf("%s\n", names[i]);
    return 0;
}

static int cmd_readlink(const char *path)
{
    char buf[4096];
    ssize_t n = readlink(path, buf, sizeof(buf) - 1);
    if (n < 0)
        fail_errno(errno);
    buf[n] = 0;
    printf("%s\n", buf);
    return 0;
}

/* symlink(2), then the link read back: what was stored */
static int cmd_symlink(const char *target, const char *path)
{
    if (symlink(target, path) < 0)
        fail_errno(errno);
    return cmd_readlink(path);
}

static int cmd_hostname(void)
{
    char name[256];
    if (gethostname(name, sizeof(name)) < 0)
        fail_errno(errno);
    name[sizeof(name) - 1] = 0;
    printf("%s\n", name);
    return 0;
}

static int compare_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static int cmd_resolve(const char *name)
{
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(name, NULL, &hints, &res);
    if (rc != 0)
        fail_gai(rc);
    uint32_t addrs[256];
    size_t count = 0;
    for (struct addrinfo *ai = res; ai && count < 256; ai = ai->ai_next)
        addrs[count++] = ntohl(((struct sockaddr_in *)ai->ai_addr)->sin_addr.s_addr);
    freeaddrinfo(res);
    qsort(addrs, count, sizeof(addrs[0]), compare_u32);
    for (size_t i = 0; i < count; i++) {
        if (i > 0 && addrs[i] == addrs[i - 1])
            continue;
        struct in_addr in = {htonl(addrs[i])};
        printf("%s\n", inet_ntoa(in));
    }
    return 0;
}

static int compare_in6(const void *a, const void *b)
{
    return memcmp(a, b, sizeof(struct in6_addr));
}

static int cmd_resolve6(const char *name)
{
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_INET6;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(name, NULL, &hints, &res);
    if (rc != 0)
        fail_gai(rc);
    struct in6_addr addrs[256];
    size_t count = 0;
    for (struct addrinfo *ai = res; ai && count < 256; ai = ai->ai_next)
        addrs[count++] = ((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
    freeaddrinfo(res);
    qsort(addrs, count, sizeof(addrs[0]), compare_in6);
    for (size_t i = 0; i < count; i++) {
        if (i > 0 && !memcmp(&addrs[i], &addrs[i - 1], sizeof(addrs[i])))
            continue;
        char text[INET6_ADDRSTRLEN];
        inet_ntop(AF_INET6, &addrs[i], text, sizeof(text));
        printf("%s\n", text);
    }
    return 0;
}

static void send_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail_errno(errno);
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* Copies the socket to stdout until EOF. */
static void relay_to_stdout(int fd)
{
    char buf[65536];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail_errno(errno);
        }
        if (n == 0)
            return;
        out(buf, (size_t)n);
    }
}

static int cmd_tcp(const char *host, const char *port, const char *msg)
{
    int fd = connect_to(host, port, SOCK_STREAM);
    size_t len = strlen(msg);
    char *line = malloc(len + 2);
    memcpy(line, msg, len);
    line[len] = '\n';
    send_all(fd, line, len + 1);
    if (shutdown(fd, SHUT_WR) != 0)
        fail_errno(errno);
    relay_to_stdout(fd);
    close(fd);
    return 0;
}

/* Like tcp, over a Unix stream socket; "@name" is an abstract name. */
static int cmd_unix_connect(const char *path, const char *msg)
{
    struct sockaddr_un addr = {0};
    addr.sun_family = AF_UNIX;
    size_t plen = strlen(path);
    if (plen >= sizeof(addr.sun_path))
        fail_errno(ENAMETOOLONG);
    memcpy(addr.sun_path, path, plen);
    socklen_t alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + 1);
    if (path[0] == '@') {
        addr.sun_path[0] = 0;
        alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail_errno(errno);
    if (connect(fd, (struct sockaddr *)&addr, alen) != 0)
        fail_errno(errno);
    size_t len = strlen(msg);
    char *line = malloc(len + 2);
    memcpy(line, msg, len);
    line[len] = '\n';
    send_all(fd, line, len + 1);
    if (shutdown(fd, SHUT_WR) != 0)
        fail_errno(errno);
    relay_to_stdout(fd);
    close(fd);
    return 0;
}

static int cmd_http(const char *url)
{
    if (strncmp(url, "http://", 7) != 0)
        fail_text("EINVAL");
    const char *authority = url + 7;
    const char *path = strchr(authority, '/');
    size_t authority_len = path ? (size_t)(path - authority) : strlen(authority);
    if (!path)
        path = "/";
    char host[256], port[16] = "80";
    if (authority_len == 0 || authority_len >= sizeof(host))
        fail_text("EINVAL");
    memcpy(host, authority, authority_len);
    host[authority_len] = 0;
    char *port_sep;
    if (host[0] == '[') {
        char *close_bracket = strchr(host, ']');
        if (!close_bracket)
            fail_text("EINVAL");
        *close_bracket = 0;
        port_sep = close_bracket[1] == ':' ? close_bracket + 1 : NULL;
        memmove(host, host + 1, strlen(host + 1) + 1);
    } else {
        port_sep = strrchr(host, ':');
    }
    if (port_sep) {
        *port_sep = 0;
        snprintf(port, sizeof(port), "%s", port_sep + 1);
    }
    int fd = connect_to(host, port, SOCK_STREAM);
    char request[4096];
    int n = snprintf(request, sizeof(request),
                     "GET %s HTTP/1.0\r\nHost: %.*s\r\nUser-Agent: probe\r\n"
                     "Connection: close\r\n\r\n",
                     path, (int)authority_len, authority);
    if (n < 0 || (size_t)n >= sizeof(request))
        fail_text("EINVAL");
    send_all(fd, request, (size_t)n);
    size_t len = 0, cap = 65536;
    char *response = malloc(cap);
    for (;;) {
        if (len == cap)
            response = realloc(response, cap *= 2);
        ssize_t got = recv(fd, response + len, cap - len, 0);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            fail_errno(errno);
        }
        if (got == 0)
            break;
        len += (size_t)got;
    }
    close(fd);
    int status;
    if (len < 12 || memcmp(response, "HTTP/1.", 7) != 0 ||
        sscanf(response + 8, " %3d", &status) != 1)
        fail_text("EPROTO");
    char *body = memmem(response, len, "\r\n\r\n", 4);
    if (!body)
        fail_text("EPROTO");
    body += 4;
    printf("status %d\n", status);
    out(body, len - (size_t)(body - response));
    return 0;
}

static void set_receive_timeout(int fd)
{
    struct timeval tv = {2, 0};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0)
        fail_errno(errno);
}

static void fail_receive(int err)
{
    fail_errno(err == EAGAIN || err == EWOULDBLOCK ? ETIMEDOUT : err);
}

static int cmd_udp(const char *host, const char *port, const char *msg)
{
    int fd = connect_to(host, port, SOCK_DGRAM);
    set_receive_timeout(fd);
    if (send(fd, msg, strlen(msg), 0) < 0)
        fail_errno(errno);
    char buf[65536];
    ssize_t n;
    while ((n = recv(fd, buf, sizeof(buf), 0)) < 0 && errno == EINTR)
        ;
    if (n < 0)
        fail_receive(errno);
    out(buf, (size_t)n);
    printf("\n");
    return 0;
}

static int cmd_udp_unconnected(const char *host, const char *port, const char *msg)
{
    struct addrinfo *res = resolve_addr(host, port, SOCK_DGRAM);
    int fd = socket(res->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail_errno(errno);
    set_receive_timeout(fd);
    if (sendto(fd, msg, strlen(msg), 0, res->ai_addr, res->ai_addrlen) < 0)
        fail_errno(errno);
    freeaddrinfo(res);
    char buf[65536];
    struct sockaddr_storage from;
    socklen_t from_len;
    ssize_t n;
    do {
        from_len = sizeof(from);
        n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &from_len);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        fail_receive(errno);
    out(buf, (size_t)n);
    char ip[INET6_ADDRSTRLEN];
    if (from.ss_family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&from;
        inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip));
        printf("\nfrom %s:%d\n", ip, ntohs(sin->sin_port));
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&from;
        inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof(ip));
        printf("\nfrom [%s]:%d\n", ip, ntohs(sin6->sin6_port));
    }
    return 0;
}

static const struct {
    int number;
    const char *name;
} signal_names[] = {
    {SIGHUP, "HUP"}, {SIGINT, "INT"}, {SIGQUIT, "QUIT"}, {SIGILL, "ILL"},
    {SIGTRAP, "TRAP"}, {SIGABRT, "ABRT"}, {SIGBUS, "BUS"}, {SIGFPE, "FPE"},
    {SIGKILL, "KILL"}, {SIGUSR1, "USR1"}, {SIGSEGV, "SEGV"}, {SIGUSR2, "USR2"},
    {SIGPIPE, "PIPE"}, {SIGALRM, "ALRM"}, {SIGTERM, "TERM"},
};

static int parse_signal(const char *text)
{
    if (text[0] >= '0' && text[0] <= '9')
        return (int)parse_long(text);
    if (!strncmp(text, "SIG", 3))
        text += 3;
    for (size_t i = 0; i < sizeof(signal_names) / sizeof(signal_names[0]); i++)
        if (!strcmp(signal_names[i].name, text))
            return signal_names[i].number;
    fail_text("EINVAL");
    return 0;
}

static int cmd_kill(const char *sig_text)
{
    int sig = parse_signal(sig_text);
    fflush(stdout);
    if (kill(getpid(), sig) != 0)
        fail_errno(errno);
    /* A caught or ignored signal leaves us running. */
    sleep(1);
    fail_text("ESRCH");
    return 1;
}

static int cmd_loop_getpid(long count)
{
    int64_t start = now_ns();
    for (long i = 0; i < count; i++)
        syscall(SYS_getpid);
    int64_t elapsed = now_ns() - start;
    fprintf(stderr, "loop-getpid: %ld calls, %lld ns/call\n", count,
            (long long)(count ? elapsed / count : 0));
    return 0;
}

static int cmd_loop_open(const char *path, long count)
{
    int64_t start = now_ns();
    for (long i = 0; i < count; i++) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            fail_errno(errno);
        close(fd);
    }
    int64_t elapsed = now_ns() - start;
    fprintf(stderr, "loop-open: %ld calls, %lld ns/call\n", count,
            (long long)(count ? elapsed / count : 0));
    return 0;
}

static int cmd_exec(char **argv)
{
    fflush(stdout);
    execv(argv[0], argv);
    fail_errno(errno);
    return 1;
}

/* Fork, exec in the child, wait; exec errors come back over a CLOEXEC pipe so
 * they print the same way as in the Go flavour (os/exec does the same). */
static int cmd_fork_exec(char **argv)
{
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) != 0)
        fail_errno(errno);
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        fail_errno(errno);
    if (pid == 0) {
        close(pipefd[0]);
        execv(argv[0], argv);
        int err = errno;
        write_all(pipefd[1], (const char *)&err, sizeof(err));
        _exit(127);
    }
    close(pipefd[1]);
    int child_err = 0;
    ssize_t n;
    while ((n = read(pipefd[0], &child_err, sizeof(child_err))) < 0 && errno == EINTR)
        ;
    close(pipefd[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            fail_errno(errno);
    if (n == sizeof(child_err))
        fail_errno(child_err);
    if (WIFSIGNALED(status)) {
        printf("child signal %d\n", WTERMSIG(status));
        return 128 + WTERMSIG(status);
    }
    printf("child exit %d\n", WEXITSTATUS(status));
    return WEXITSTATUS(status);
}

/* "a.b.c.d:port" or "[v6]:port"; an IPv4-mapped address prints as IPv4 (as Go does). */
static void format_peer(const struct sockaddr_storage *address, char *text, size_t size)
{
    char host[INET6_ADDRSTRLEN];
    if (address->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)address;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
        snprintf(text, size, "%s:%u", host, ntohs(in->sin_port));
        return;
    }
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)address;
    if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
        inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], host, sizeof(host));
        snprintf(text, size, "%s:%u", host, ntohs(in6->sin6_port));
        return;
    }
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    snprintf(text, size, "[%s]:%u", host, ntohs(in6->sin6_port));
}

static int compare_lines(const void *a, const void *b)
{
    return strcmp((const char *)a, (const char *)b);
}

/* The replies, received with recvmmsg(2) (raw, MSG_WAITFORONE) until there are
 * `count`, each as "REPLY from PEER". */
static void receive_many(int fd, long count, char (*replies)[256 + 80])
{
    enum { MAX = 16 };
    long got = 0;
    while (got < count) {
        struct mmsghdr messages[MAX];
        struct iovec iov[MAX];
        struct sockaddr_storage from[MAX];
        char bufs[MAX][256];
        memset(messages, 0, sizeof(messages));
        for (long i = 0; i < count - got; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = sizeof(bufs[i]) - 1;
            messages[i].msg_hdr.msg_name = &from[i];
            messages[i].msg_hdr.msg_namelen = sizeof(from[i]);
            messages[i].msg_hdr.msg_iov = &iov[i];
            messages[i].msg_hdr.msg_iovlen = 1;
        }
        long n;
        do
            n = syscall(SYS_recvmmsg, fd, messages, (unsigned)(count - got), MSG_WAITFORONE, NULL);
        while (n < 0 && errno == EINTR);
        if (n < 0)
            fail_receive(errno);
        for (long i = 0; i < n; i++) {
            char peer[80];
            bufs[i][messages[i].msg_len] = 0;
            format_peer(&from[i], peer, sizeof(peer));
            snprintf(replies[got + i], sizeof(replies[0]), "%s from %s", bufs[i], peer);
        }
        got += n;
    }
}

/* sendmmsg(2) of N datagrams "MSG-i" with a destination each, on an
 * unconnected socket, then N replies (recvfrom, or with `many` recvmmsg).
 * Raw syscalls: musl's sendmmsg wrapper sends one sendmsg per message on
 * 64-bit machines. */
static int cmd_udp_mmsg(const char *host, const char *port, const char *msg, long count,
                        int many)
{
    enum { MAX = 16, TEXT = 256 };
    if (count < 1 || count > MAX)
        fail_text("EINVAL");
    struct addrinfo *res = resolve_addr(host, port, SOCK_DGRAM);
    int fd = socket(res->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail_errno(errno);
    set_receive_timeout(fd);
    struct mmsghdr messages[MAX];
    struct iovec iov[MAX];
    char texts[MAX][TEXT];
    memset(messages, 0, sizeof(messages));
    for (long i = 0; i < count; i++) {
        snprintf(texts[i], TEXT, "%s-%ld", msg, i);
        iov[i].iov_base = texts[i];
        iov[i].iov_len = strlen(texts[i]);
        messages[i].msg_hdr.msg_name = res->ai_addr;
        messages[i].msg_hdr.msg_namelen = res->ai_addrlen;
        messages[i].msg_hdr.msg_iov = &iov[i];
        messages[i].msg_hdr.msg_iovlen = 1;
    }
    long sent = syscall(SYS_sendmmsg, fd, messages, (unsigned)count, 0);
    if (sent < 0)
        fail_errno(errno);
    freeaddrinfo(res);
    printf("sent %ld:", sent);
    for (long i = 0; i < sent; i++)
        printf(" %u", messages[i].msg_len);
    printf("\n");
    char replies[MAX][TEXT + 80];
    if (many)
        receive_many(fd, sent, replies);
    for (long i = 0; i < sent && !many; i++) {
        char buf[TEXT + 32], peer[80];
        struct sockaddr_storage from;
        socklen_t from_len;
        ssize_t n;
        do {
            from_len = sizeof(from);
            n = recvfrom(fd, buf, sizeof(buf) - 1, 0, (struct sockaddr *)&from, &from_len);
        } while (n < 0 && errno == EINTR);
        if (n < 0)
            fail_receive(errno);
        buf[n] = 0;
        format_peer(&from, peer, sizeof(peer));
        snprintf(replies[i], sizeof(replies[i]), "%s from %s", buf, peer);
    }
    qsort(replies, (size_t)sent, sizeof(replies[0]), compare_lines);
    for (long i = 0; i < sent; i++)
        printf("%s\n", replies[i]);
    close(fd);
    return 0;
}

static int listen_on(const char *addr, const char *port)
{
    struct addrinfo hints = {0}, *found;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV;
    if (getaddrinfo(addr, port, &hints, &found) != 0)
        fail_text("EINVAL");
    int fd = socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail_errno(errno);
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (found->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    if (bind(fd, found->ai_addr, found->ai_addrlen) != 0 || listen(fd, 128) != 0)
        fail_errno(errno);
    freeaddrinfo(found);
    struct sockaddr_storage bound;
    socklen_t length = sizeof(bound);
    if (getsockname(fd, (struct sockaddr *)&bound, &length) != 0)
        fail_errno(errno);
    unsigned bound_port = bound.ss_family == AF_INET
        ? ntohs(((struct sockaddr_in *)&bound)->sin_port)
        : ntohs(((struct sockaddr_in6 *)&bound)->sin6_port);
    printf("listening on %u\n", bound_port);
    fflush(stdout);
    return fd;
}

/* One HTTP/1.1 request per connection: answer "NAME METHOD PATH from PEER". */
static void serve_one(int listener, const char *name)
{
    struct sockaddr_storage peer, named;
    socklen_t length = sizeof(peer), named_length = sizeof(named);
    int fd = accept(listener, (struct sockaddr *)&peer, &length);
    if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED)
            return;
        fail_errno(errno);
    }
    char peer_text[80], named_text[80];
    format_peer(&peer, peer_text, sizeof(peer_text));
    if (getpeername(fd, (struct sockaddr *)&named, &named_length) != 0)
        fail_errno(errno);
    format_peer(&named, named_text, sizeof(named_text));
    char request[8192];
    size_t used = 0;
    while (used < sizeof(request) - 1) {
        ssize_t n = read(fd, request + used, sizeof(request) - 1 - used);
        if (n <= 0)
            break;
        used += (size_t)n;
        request[used] = 0;
        if (strstr(request, "\r\n\r\n"))
            break;
    }
    request[used] = 0;
    char method[16] = "?", path[1024] = "?";
    sscanf(request, "%15s %1023s", method, path);
    char body[1400];
    int body_length = snprintf(body, sizeof(body), "%s %s %s from %s%s\n", name, method, path,
                               peer_text, strcmp(peer_text, named_text) ? " getpeername differs" : "");
    char head[200];
    int head_length = snprintf(head, sizeof(head),
                               "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n",
                               body_length);
    send_all(fd, head, (size_t)head_length);
    send_all(fd, body, (size_t)body_length);
    close(fd);
    fputs(body, stdout);
    fflush(stdout);
}

static int cmd_serve(const char *addr, const char *port, const char *name, const char *port2)
{
    int listeners[2];
    int count = 0;
    listeners[count++] = listen_on(addr, port);
    if (port2)
        listeners[count++] = listen_on(addr, port2);
    for (;;) {
        fd_set ready;
        FD_ZERO(&ready);
        for (int i = 0; i < count; i++)
            FD_SET(listeners[i], &ready);
        if (select(listeners[count - 1] + 1, &ready, NULL, NULL, NULL) < 0) {
            if (errno == EINTR)
                continue;
            fail_errno(errno);
        }
        for (int i = 0; i < count; i++)
            if (FD_ISSET(listeners[i], &ready))
                serve_one(listeners[i], name);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    const char *cmd = argv[1];
    int nargs = argc - 2;
    char **args = argv + 2;
    if (!strcmp(cmd, "env") && nargs == 1)
        return cmd_env(args[0]);
    if (!strcmp(cmd, "cat") && nargs == 1)
        return cmd_cat(args[0]);
    if (!strcmp(cmd, "stat") && nargs == 1)
        return cmd_stat(args[0]);
    if (!strcmp(cmd, "statfs") && nargs == 1)
        return cmd_statfs(args[0]);
    if (!strcmp(cmd, "ls") && nargs == 1)
        return cmd_ls(args[0]);
    if (!strcmp(cmd, "readlink") && nargs == 1)
        return cmd_readlink(args[0]);
    if (!strcmp(cmd, "symlink") && nargs == 2)
        return cmd_symlink(args[0], args[1]);
    if (!strcmp(cmd, "resolve") && nargs == 1)
        return cmd_resolve(args[0]);
    if (!strcmp(cmd, "resolve6") && nargs == 1)
        return cmd_resolve6(args[0]);
    if (!strcmp(cmd, "tcp") && nargs == 3)
        return cmd_tcp(args[0], args[1], args[2]);
    if (!strcmp(cmd, "unix-connect") && nargs == 2)
        return cmd_unix_connect(args[0], args[1]);
    if (!strcmp(cmd, "http") && nargs == 1)
        return cmd_http(args[0]);
    if (!strcmp(cmd, "udp") && nargs == 3)
        return cmd_udp(args[0], args[1], args[2]);
    if (!strcmp(cmd, "udp-unconnected") && nargs == 3)
        return cmd_udp_unconnected(args[0], args[1], args[2]);
    if (!strcmp(cmd, "udp-mmsg") && nargs == 4)
        return cmd_udp_mmsg(args[0], args[1], args[2], parse_long(args[3]), 0);
    if (!strcmp(cmd, "udp-mmsg-recv") && nargs == 4)
        return cmd_udp_mmsg(args[0], args[1], args[2], parse_long(args[3]), 1);
    if (!strcmp(cmd, "exit") && nargs == 1)
        return (int)parse_long(args[0]);
    if (!strcmp(cmd, "kill") && nargs == 1)
        return cmd_kill(args[0]);
    if (!strcmp(cmd, "loop-getpid") && nargs == 1)
        return cmd_loop_getpid(parse_long(args[0]));
    if (!strcmp(cmd, "loop-open") && nargs == 2)
        return cmd_loop_open(args[0], parse_long(args[1]));
    if (!strcmp(cmd, "exec") && nargs >= 1)
        return cmd_exec(args);
    if (!strcmp(cmd, "fork-exec") && nargs >= 1)
        return cmd_fork_exec(args);
    if (!strcmp(cmd, "hostname") && nargs == 0)
        return cmd_hostname();
    if (!strcmp(cmd, "serve") && (nargs == 3 || nargs == 4))
        return cmd_serve(args[0], args[1], args[2], nargs == 4 ? args[3] : NULL);
    usage();
    return 2;
}
