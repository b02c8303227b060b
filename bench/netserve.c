/*
 * netserve: the loopback services the benchmark talks to.
 *
 *   netserve BULK_BYTES
 *
 * Listens on two free ports of 127.0.0.1 and prints "http=PORT bulk=PORT":
 *   http  answers every request on a keep-alive connection with a 2-byte
 *         body ("ok"), HTTP/1.1, Content-Length;
 *   bulk  sends BULK_BYTES bytes to each client, then closes.
 * One forked process per connection; runs until killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static _Noreturn void die(const char *what)
{
    fprintf(stderr, "netserve: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int listen_any(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0 || listen(fd, 128) != 0)
        die("bind/listen");
    socklen_t len = sizeof(sin);
    getsockname(fd, (struct sockaddr *)&sin, &len);
    *port = ntohs(sin.sin_port);
    return fd;
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

static void serve_http(int fd)
{
    static const char response[] =
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    char buf[8192];
    size_t have = 0;
    for (;;) {
        ssize_t got = read(fd, buf + have, sizeof(buf) - 1 - have);
        if (got <= 0)
            return;
        have += (size_t)got;
        buf[have] = 0;
        char *end;
        /* Requests carry no body: each blank line ends one request. */
        while ((end = strstr(buf, "\r\n\r\n")) != NULL) {
            if (write_all(fd, response, sizeof(response) - 1) != 0)
                return;
            size_t used = (size_t)(end + 4 - buf);
            memmove(buf, buf + used, have - used + 1);
            have -= used;
        }
        if (have == sizeof(buf) - 1)
            return;
    }
}

static void serve_bulk(int fd, long long bytes)
{
    static char chunk[1 << 16];
    memset(chunk, 'x', sizeof(chunk));
    while (bytes > 0) {
        size_t n = bytes < (long long)sizeof(chunk) ? (size_t)bytes : sizeof(chunk);
        if (write_all(fd, chunk, n) != 0)
            return;
        bytes -= (long long)n;
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fputs("usage: netserve BULK_BYTES\n", stderr);
        return 2;
    }
    long long bulk_bytes = atoll(argv[1]);
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    int http_port, bulk_port;
    struct pollfd fds[2] = {
        {.fd = listen_any(&http_port), .events = POLLIN},
        {.fd = listen_any(&bulk_port), .events = POLLIN},
    };
    printf("http=%d bulk=%d\n", http_port, bulk_port);
    fflush(stdout);
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        for (int i = 0; i < 2; i++) {
            if (!(fds[i].revents & POLLIN))
                continue;
            int client = accept4(fds[i].fd, NULL, NULL, SOCK_CLOEXEC);
            if (client < 0)
                continue;
            pid_t pid = fork();
            if (pid == 0) {
                close(fds[0].fd);
                close(fds[1].fd);
                if (i == 0)
                    serve_http(client);
                else
                    serve_bulk(client, bulk_bytes);
                _exit(0);
            }
            close(client);
        }
    }
}
