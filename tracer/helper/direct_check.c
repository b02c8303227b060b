/*
 * What the direct path (tracer/features/direct.py) reads at each remote
 * connect, in C: the same /proc walks and getsockopt calls the Python versions
 * make, without an interpreter round per fd and per option (measured in the
 * trap loop: the fd checks took 47 us and the option reads 23 us in Python).
 *
 * mtrace_direct_fd_state(tid, fd, inode): the tracee's fd as fdinfo and
 * /proc/TID/fd see it. Returns a mask: MTRACE_FD_HELD when another fd of the
 * process names the same socket (dup) or one of its epoll instances holds
 * it (a "tfd: ... ino:INODE" line of their fdinfo, under any fd number), or
 * when the fd table
 * cannot be read (the relay is always right); MTRACE_FD_CLOEXEC and
 * MTRACE_FD_NONBLOCK from the fd's own fdinfo flags. -1 with errno set when
 * the fd's fdinfo cannot be read (the fd is gone).
 *
 * mtrace_read_options(fd, table, n, out): for each of the n (level, option,
 * size) triples of table, one slot of MTRACE_OPTION_SLOT bytes in out: a
 * present byte (0: the kernel or this socket lacks the option) and the value
 * getsockopt gave, zero-padded. Two sockets with equal slots have equal
 * options, so a program socket left as made is told by one comparison.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MTRACE_FD_HELD 1
#define MTRACE_FD_CLOEXEC 2
#define MTRACE_FD_NONBLOCK 4
#define MTRACE_OPTION_SLOT 17

/* The whole of a /proc file (an epoll set of thousands of fds is long),
 * NUL-terminated; NULL with errno set. */
static char *read_whole(const char *path, size_t *length)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t size = 4096, used = 0;
    char *buffer = malloc(size);
    while (buffer) {
        if (size - used < 1024) {
            char *larger = realloc(buffer, size * 2);
            if (!larger) {
                free(buffer);
                buffer = NULL;
                break;
            }
            buffer = larger;
            size *= 2;
        }
        ssize_t got = read(fd, buffer + used, size - used - 1);
        if (got < 0) {
            int saved = errno;
            free(buffer);
            buffer = NULL;
            errno = saved;
            break;
        }
        if (got == 0)
            break;
        used += (size_t)got;
    }
    int saved = errno;
    close(fd);
    errno = saved;
    if (buffer) {
        buffer[used] = '\0';
        *length = used;
    }
    return buffer;
}

/* Whether an eventpoll fdinfo text has a registration of the socket
 * ``inode``, under any fd number: one made through a dup since closed names
 * the socket under the dup's number. */
static int epoll_holds(const char *text, unsigned long long inode)
{
    for (const char *line = text; line && *line; line = strchr(line, '\n'), line = line ? line + 1 : NULL) {
        if (strncmp(line, "tfd:", 4) != 0)
            continue;
        const char *line_end = strchr(line, '\n');
        const char *ino = strstr(line, " ino:");
        if (!ino || (line_end && ino > line_end))
            continue;
        if (strtoull(ino + 5, NULL, 16) == inode)
            return 1;
    }
    return 0;
}

int mtrace_direct_fd_state(int tid, int fd, unsigned long long inode)
{
    char path[64];
    size_t length;
    snprintf(path, sizeof path, "/proc/%d/fdinfo/%d", tid, fd);
    char *info = read_whole(path, &length);
    if (!info)
        return -1;
    int state = 0;
    const char *flags = strstr(info, "\nflags:");
    flags = flags ? flags + 7 : (strncmp(info, "flags:", 6) == 0 ? info + 6 : NULL);
    if (!flags) {
        free(info);
        errno = EBADF;
        return -1;
    }
    unsigned long value = strtoul(flags, NULL, 8);
    free(info);
    if (value & O_CLOEXEC)
        state |= MTRACE_FD_CLOEXEC;
    if (value & O_NONBLOCK)
        state |= MTRACE_FD_NONBLOCK;

    snprintf(path, sizeof path, "/proc/%d/fd", tid);
    DIR *directory = opendir(path);
    if (!directory)
        return state | MTRACE_FD_HELD;
    char socket_link[64];
    int socket_length = snprintf(socket_link, sizeof socket_link, "socket:[%llu]", inode);
    static const char eventpoll[] = "anon_inode:[eventpoll]";
    struct dirent *entry;
    while ((entry = readdir(directory)) != NULL) {
        if (entry->d_name[0] == '.')
            continue;
        char link[64];
        ssize_t got = readlinkat(dirfd(directory), entry->d_name, link, sizeof link);
        if (got <= 0 || got >= (ssize_t)sizeof link)
            continue;
        int other = atoi(entry->d_name);
        if (got == socket_length && memcmp(link, socket_link, (size_t)got) == 0) {
            if (other != fd) {
                state |= MTRACE_FD_HELD;
                break;
            }
            continue;
        }
        if (got != (ssize_t)sizeof eventpoll - 1 || memcmp(link, eventpoll, (size_t)got) != 0)
            continue;
        snprintf(path, sizeof path, "/proc/%d/fdinfo/%d", tid, other);
        char *epoll_info = read_whole(path, &length);
        if (!epoll_info)
            continue;
        int held = epoll_holds(epoll_info, inode);
        free(epoll_info);
        if (held) {
            state |= MTRACE_FD_HELD;
            break;
        }
    }
    closedir(directory);
    return state;
}

void mtrace_read_options(int fd, const int *table, unsigned int n, unsigned char *out)
{
    for (unsigned int i = 0; i < n; i++) {
        unsigned char *slot = out + (size_t)i * MTRACE_OPTION_SLOT;
        memset(slot, 0, MTRACE_OPTION_SLOT);
        socklen_t size = (socklen_t)table[3 * i + 2];
        if (size > MTRACE_OPTION_SLOT - 1)
            size = MTRACE_OPTION_SLOT - 1;
        if (getsockopt(fd, table[3 * i], table[3 * i + 1], slot + 1, &size) == 0)
            slot[0] = 1;
        else
            memset(slot + 1, 0, MTRACE_OPTION_SLOT - 1);
    }
}
