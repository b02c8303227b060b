/*
 * The passthrough half of the notify trap loop, in C.
 *
 * mtrace_notify_next() waits on the listener and answers CONTINUE to every
 * call no handler wants, returning to Python only with a call a handler wants,
 * on a timeout, or when the listener hangs up. A trapped call nobody handles
 * then costs what it costs the C reference supervisor (bench/refsup.c): poll,
 * RECV, SEND, no Python. The supervisor loads this library with ctypes, which
 * releases the GIL for the call, so the async side runs meanwhile.
 *
 * Returns 1: a wanted notification is in *out; 0: timeout or a signal (the
 * caller looks at its stop condition); -1: the listener hung up (every tracee
 * is gone); -2: an error, errno set. *passed counts the CONTINUEs sent.
 * A syscall number at or above wanted_bits counts as wanted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <string.h>
#include <sys/ioctl.h>

int mtrace_notify_next(int fd, const unsigned char *wanted, unsigned int wanted_bits,
                       int timeout_ms, struct seccomp_notif *out,
                       unsigned long long *passed)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    struct seccomp_notif_resp response;
    for (;;) {
        int ready = poll(&pfd, 1, timeout_ms);
        if (ready < 0)
            return errno == EINTR ? 0 : -2;
        if (ready == 0)
            return 0;
        if (pfd.revents & POLLIN) {
            memset(out, 0, sizeof(*out)); /* the kernel insists on a zeroed buffer */
            if (ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, out) != 0) {
                if (errno == ENOENT || errno == EINTR || errno == EAGAIN)
                    continue; /* withdrawn: its thread is gone */
                return -2;
            }
            unsigned int nr = (unsigned int)out->data.nr;
            if (nr >= wanted_bits || ((wanted[nr / 8] >> (nr % 8)) & 1))
                return 1;
            memset(&response, 0, sizeof(response));
            response.id = out->id;
            response.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
            if (ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &response) != 0 && errno != ENOENT)
                return -2;
            ++*passed;
            continue;
        }
        if (pfd.revents & (POLLHUP | POLLERR | POLLNVAL))
            return -1;
    }
}
