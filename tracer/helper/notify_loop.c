/*
 * The passthrough half of the notify trap loop, in C, and the answers it can
 * give without Python.
 *
 * mtrace_notify_next() waits on the listener and answers CONTINUE to every
 * call no handler wants, returning to Python only with a call a handler wants,
 * on a timeout, or when the listener hangs up. A trapped call nobody handles
 * then costs what it costs the C reference supervisor (bench/refsup.c): poll,
 * RECV, SEND, no Python. The supervisor loads this library with ctypes, which
 * releases the GIL for the call, so the async side runs meanwhile.
 *
 * Fast answers: the files feature registers (mtrace_fast_*) the opens it
 * would answer from its cache anyway (a target file whose stat is fresh and
 * whose shadow copy is current: an absolute path, read-only, until a
 * deadline) and the shadow inodes whose stat it would report. This loop then
 * answers those opens (a fresh open of the copy, ADDFD) and fstat of those fds
 * (the registered stat bytes) itself: a resolver re-reading /etc/hosts per
 * request no longer crosses into Python twice a request. Anything that does
 * not match exactly (flags, an expired deadline, an inode not registered, a
 * size changed by the tracee's writes, a failed memory access) goes to Python
 * as before, which gives the full answer.
 *
 * Local fds: fchmod, fchown and fstatfs are trapped for the fds of shadow
 * copies (a target file's mode, owner and filesystem), but most calls name
 * an fd of this machine's own files, which the files feature lets the kernel
 * run anyway. While a shadow root is set, this loop answers CONTINUE itself
 * to those whose fd is not under it (one readlink of /proc/PID/fd/N, the
 * same test the files feature makes first), so they no longer cost a trip
 * through Python; an fd under the root, or one it cannot read, goes to Python.
 *
 * Returns 1: a wanted notification is in *out; 0: timeout or a signal (the
 * caller looks at its stop condition); -1: the listener hung up (every tracee
 * is gone); -2: an error, errno set. *passed counts the calls answered here
 * (CONTINUEs and fast answers). A syscall number at or above wanted_bits
 * counts as wanted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* The kernel's O_LARGEFILE (64-bit libcs define O_LARGEFILE as 0); on
 * aarch64 0100000 is O_NOFOLLOW, which must reach Python. */
#if defined(__aarch64__)
#define KERNEL_O_LARGEFILE 0400000
#else
#define KERNEL_O_LARGEFILE 0100000
#endif
#define MAX_OPENS 64
#define MAX_NODES 256
#define MAX_STAT_BYTES 256

struct fast_open {
    char *tracee_path;
    char *shadow_path;
    long long deadline_ns; /* CLOCK_MONOTONIC, as Python's time.monotonic() */
};

struct fast_node {
    unsigned long long device, inode;
    long long size;
    unsigned int length;
    unsigned char stat[MAX_STAT_BYTES];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct fast_open opens[MAX_OPENS];
static struct fast_node nodes[MAX_NODES];
static unsigned int node_count;
static char shadow_root[PATH_MAX]; /* "" : no fast answers */

static long long monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void drop_open(struct fast_open *entry)
{
    free(entry->tracee_path);
    free(entry->shadow_path);
    memset(entry, 0, sizeof(*entry));
}

void mtrace_fast_clear(const char *root)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_OPENS; i++)
        drop_open(&opens[i]);
    node_count = 0;
    snprintf(shadow_root, sizeof(shadow_root), "%s", root ? root : "");
    pthread_mutex_unlock(&lock);
}

void mtrace_fast_open_drop(const char *tracee_path)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_OPENS; i++)
        if (opens[i].tracee_path && !strcmp(opens[i].tracee_path, tracee_path))
            drop_open(&opens[i]);
    pthread_mutex_unlock(&lock);
}

int mtrace_fast_open_set(const char *tracee_path, const char *shadow_path, long long deadline_ns)
{
    char *path = strdup(tracee_path), *shadow = strdup(shadow_path);
    if (!path || !shadow) {
        free(path);
        free(shadow);
        return -1;
    }
    pthread_mutex_lock(&lock);
    struct fast_open *slot = NULL, *oldest = &opens[0];
    for (int i = 0; i < MAX_OPENS && !slot; i++) {
        if (opens[i].tracee_path && !strcmp(opens[i].tracee_path, tracee_path))
            slot = &opens[i];
        else if (!opens[i].tracee_path || opens[i].deadline_ns < oldest->deadline_ns)
            oldest = &opens[i];
    }
    if (!slot)
        slot = oldest;
    drop_open(slot);
    slot->tracee_path = path;
    slot->shadow_path = shadow;
    slot->deadline_ns = deadline_ns;
    pthread_mutex_unlock(&lock);
    return 0;
}

int mtrace_fast_node_set(unsigned long long device, unsigned long long inode, long long size,
                         const unsigned char *stat_bytes, unsigned int length)
{
    if (length > MAX_STAT_BYTES)
        return -1;
    pthread_mutex_lock(&lock);
    unsigned int i = 0;
    while (i < node_count && !(nodes[i].device == device && nodes[i].inode == inode))
        i++;
    if (i == node_count) {
        if (node_count == MAX_NODES)
            i = 0; /* full: reuse the oldest slot (a miss only costs Python) */
        else
            node_count++;
    }
    nodes[i].device = device;
    nodes[i].inode = inode;
    nodes[i].size = size;
    nodes[i].length = length;
    memcpy(nodes[i].stat, stat_bytes, length);
    pthread_mutex_unlock(&lock);
    return 0;
}

/* The registered node of (device, inode) copied out; 0 if none. */
static int find_node(unsigned long long device, unsigned long long inode, struct fast_node *out)
{
    int found = 0;
    pthread_mutex_lock(&lock);
    for (unsigned int i = 0; i < node_count && !found; i++)
        if (nodes[i].device == device && nodes[i].inode == inode) {
            *out = nodes[i];
            found = 1;
        }
    pthread_mutex_unlock(&lock);
    return found;
}

/* A NUL-terminated string of the tracee, page by page; 0 if unreadable or too long. */
static int read_string(pid_t pid, unsigned long long address, char *out, size_t size)
{
    size_t have = 0;
    long page = sysconf(_SC_PAGESIZE);
    while (have < size) {
        size_t chunk = (size_t)page - (size_t)((address + have) % (size_t)page);
        if (chunk > size - have)
            chunk = size - have;
        struct iovec local = {out + have, chunk};
        struct iovec remote = {(void *)(unsigned long)(address + have), chunk};
        if (process_vm_readv(pid, &local, 1, &remote, 1, 0) != (ssize_t)chunk)
            return 0;
        if (memchr(out + have, 0, chunk))
            return 1;
        have += chunk;
    }
    return 0;
}

static int send_value(int fd, unsigned long long id, long long value)
{
    struct seccomp_notif_resp response = {.id = id, .val = value};
    if (ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &response) != 0 && errno != ENOENT)
        return -1;
    return 1;
}

/* 1: answered; 0: Python answers it; -1: error, errno set. */
static int fast_open(int fd, const struct seccomp_notif *n)
{
    unsigned long long address;
    int flags;
    if (n->data.nr == SYS_openat) {
        address = n->data.args[1];
        flags = (int)n->data.args[2];
#ifdef SYS_open
    } else if (n->data.nr == SYS_open) {
        address = n->data.args[0];
        flags = (int)n->data.args[1];
#endif
    } else {
        return 0;
    }
    if (flags & ~(O_CLOEXEC | KERNEL_O_LARGEFILE | O_NOCTTY | O_NONBLOCK))
        return 0; /* O_RDONLY is 0: anything else (writes, O_NOFOLLOW, O_PATH...) is Python's */
    long long now = monotonic_ns();
    int any = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_OPENS && !any; i++)
        any = opens[i].tracee_path && opens[i].deadline_ns > now;
    pthread_mutex_unlock(&lock);
    if (!any)
        return 0; /* nothing registered: no read of the path Python will read again */
    char path[PATH_MAX], shadow[PATH_MAX];
    if (!read_string(n->pid, address, path, sizeof(path)) || path[0] != '/')
        return 0;
    int found = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_OPENS && !found; i++)
        if (opens[i].tracee_path && opens[i].deadline_ns > now
                && !strcmp(opens[i].tracee_path, path)) {
            snprintf(shadow, sizeof(shadow), "%s", opens[i].shadow_path);
            found = 1;
        }
    pthread_mutex_unlock(&lock);
    if (!found)
        return 0;
    int local = open(shadow, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | (flags & O_NONBLOCK));
    if (local < 0)
        return 0;
    /* The copy must be an inode Python registered (a copy replaced since is not). */
    struct stat st;
    struct fast_node node;
    if (fstat(local, &st) != 0 || !find_node(st.st_dev, st.st_ino, &node)) {
        close(local);
        return 0;
    }
    struct seccomp_notif_addfd addfd = {
        .id = n->id, .flags = SECCOMP_ADDFD_FLAG_SEND, .srcfd = (unsigned int)local,
        .newfd = 0, .newfd_flags = (flags & O_CLOEXEC) ? O_CLOEXEC : 0,
    };
    int result = ioctl(fd, SECCOMP_IOCTL_NOTIF_ADDFD, &addfd);
    int error = errno;
    close(local);
    if (result >= 0 || error == ENOENT)
        return 1;
    /* Not installed (the tracee's fd table is full...): the kernel's reason. */
    struct seccomp_notif_resp response = {.id = n->id, .error = -error};
    if (ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &response) != 0 && errno != ENOENT)
        return -1;
    return 1;
}

/* fstat(fd, buf) and newfstatat(fd, "", buf, AT_EMPTY_PATH) of a registered shadow inode. */
static int fast_fstat(int fd, const struct seccomp_notif *n)
{
    int tracee_fd;
    unsigned long long buffer;
    if (n->data.nr == SYS_fstat) {
        tracee_fd = (int)n->data.args[0];
        buffer = n->data.args[1];
    } else if (n->data.nr == SYS_newfstatat) {
        if (!((int)n->data.args[3] & AT_EMPTY_PATH))
            return 0;
        char first;
        struct iovec local = {&first, 1};
        struct iovec remote = {(void *)(unsigned long)n->data.args[1], 1};
        if (process_vm_readv(n->pid, &local, 1, &remote, 1, 0) != 1 || first != 0)
            return 0;
        tracee_fd = (int)n->data.args[0];
        buffer = n->data.args[2];
    } else {
        return 0;
    }
    if (tracee_fd < 0)
        return 0;
    char proc[64], link[PATH_MAX];
    snprintf(proc, sizeof(proc), "/proc/%u/fd/%d", n->pid, tracee_fd);
    struct stat st;
    struct fast_node node;
    if (stat(proc, &st) != 0 || !find_node(st.st_dev, st.st_ino, &node))
        return 0;
    if (S_ISREG(st.st_mode) && st.st_size != node.size)
        return 0; /* written here: Python reports the size the writes made */
    /* An inode number reused outside the shadow tree is not the copy. */
    ssize_t length = readlink(proc, link, sizeof(link) - 1);
    pthread_mutex_lock(&lock);
    size_t root_length = strlen(shadow_root);
    int inside = root_length > 0 && length > (ssize_t)root_length
        && !strncmp(link, shadow_root, root_length) && link[root_length] == '/';
    pthread_mutex_unlock(&lock);
    if (!inside)
        return 0;
    /* The thread id names the caller only while its call waits: never write
     * into whatever reused the id since. */
    unsigned long long id = n->id;
    if (ioctl(fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) != 0)
        return errno == ENOENT ? 1 : -1;
    struct iovec local = {node.stat, node.length};
    struct iovec remote = {(void *)(unsigned long)buffer, node.length};
    if (process_vm_writev(n->pid, &local, 1, &remote, 1, 0) != (ssize_t)node.length)
        return 0; /* Python reports why (EFAULT, a thread gone) */
    return send_value(fd, n->id, 0);
}

/* fchmod, fchown, fstatfs of an fd outside the shadow tree: CONTINUE.
 * 1: answered; 0: Python answers it; -1: error, errno set. */
static int fast_local_fd(int fd, const struct seccomp_notif *n)
{
    if (n->data.nr != SYS_fchmod && n->data.nr != SYS_fchown && n->data.nr != SYS_fstatfs)
        return 0;
    int tracee_fd = (int)n->data.args[0];
    if (tracee_fd < 0)
        return 0;
    char proc[64], link[PATH_MAX];
    snprintf(proc, sizeof(proc), "/proc/%u/fd/%d", n->pid, tracee_fd);
    ssize_t length = readlink(proc, link, sizeof(link) - 1);
    if (length <= 0 || length >= (ssize_t)sizeof(link) - 1)
        return 0; /* no such fd (EBADF), a gone thread, a long path: Python's */
    link[length] = 0;
    pthread_mutex_lock(&lock);
    size_t root_length = strlen(shadow_root);
    int inside = root_length == 0
        || (!strncmp(link, shadow_root, root_length)
            && (link[root_length] == '/' || link[root_length] == 0));
    pthread_mutex_unlock(&lock);
    if (inside)
        return 0;
    struct seccomp_notif_resp response = {
        .id = n->id, .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE,
    };
    if (ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &response) != 0 && errno != ENOENT)
        return -1;
    return 1;
}

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
            if (nr >= wanted_bits || ((wanted[nr / 8] >> (nr % 8)) & 1)) {
                int answered = shadow_root[0] ? fast_open(fd, out) : 0;
                if (answered == 0 && shadow_root[0])
                    answered = fast_fstat(fd, out);
                if (answered == 0 && shadow_root[0])
                    answered = fast_local_fd(fd, out);
                if (answered < 0)
                    return -2;
                if (answered == 0)
                    return 1;
                ++*passed;
                continue;
            }
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
