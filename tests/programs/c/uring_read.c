/* uring_read PATH: prints PATH's first 4 KiB, opened and read through
 * io_uring (IORING_OP_OPENAT, IORING_OP_READ) with raw system calls, no
 * liburing. Where io_uring_setup fails with ENOSYS (as under a sandbox, or
 * under mtrace) it falls back to open/read, as async runtimes do.
 * stdout: the bytes; stderr: "via io_uring" or "via read (io_uring: ERRNO)".
 * A failed open or read prints "error: ERRNO" and exits 1. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static char buffer[4096];

static int fail(int err)
{
    printf("error: %s\n", strerrorname_np(err) ? strerrorname_np(err) : strerror(err));
    return 1;
}

struct ring {
    int fd;
    struct io_uring_params params;
    uint8_t *sq, *cq;
    struct io_uring_sqe *sqes;
};

/* Submit one SQE and wait for its completion; the CQE's result. */
static int run_one(struct ring *ring, const struct io_uring_sqe *sqe)
{
    struct io_uring_params *p = &ring->params;
    unsigned *sq_tail = (unsigned *)(ring->sq + p->sq_off.tail);
    unsigned *sq_mask = (unsigned *)(ring->sq + p->sq_off.ring_mask);
    unsigned *sq_array = (unsigned *)(ring->sq + p->sq_off.array);
    unsigned *cq_head = (unsigned *)(ring->cq + p->cq_off.head);
    unsigned *cq_tail = (unsigned *)(ring->cq + p->cq_off.tail);
    unsigned *cq_mask = (unsigned *)(ring->cq + p->cq_off.ring_mask);
    struct io_uring_cqe *cqes = (struct io_uring_cqe *)(ring->cq + p->cq_off.cqes);

    unsigned tail = *sq_tail;
    unsigned index = tail & *sq_mask;
    ring->sqes[index] = *sqe;
    sq_array[index] = index;
    __atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, ring->fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0)
        return -errno;
    unsigned head = *cq_head;
    if (head == __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE))
        return -EAGAIN;
    int result = cqes[head & *cq_mask].res;
    __atomic_store_n(cq_head, head + 1, __ATOMIC_RELEASE);
    return result;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: uring_read PATH\n");
        return 2;
    }
    struct ring ring;
    memset(&ring, 0, sizeof ring);
    ring.fd = (int)syscall(__NR_io_uring_setup, 4, &ring.params);
    if (ring.fd < 0) {
        int err = errno;
        fprintf(stderr, "via read (io_uring: %s)\n", strerrorname_np(err));
        int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return fail(errno);
        ssize_t n = read(fd, buffer, sizeof buffer);
        if (n < 0)
            return fail(errno);
        fwrite(buffer, 1, (size_t)n, stdout);
        return 0;
    }
    struct io_uring_params *p = &ring.params;
    size_t sq_size = p->sq_off.array + p->sq_entries * sizeof(unsigned);
    size_t cq_size = p->cq_off.cqes + p->cq_entries * sizeof(struct io_uring_cqe);
    ring.sq = mmap(NULL, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring.fd,
                   IORING_OFF_SQ_RING);
    ring.cq = mmap(NULL, cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring.fd,
                   IORING_OFF_CQ_RING);
    ring.sqes = mmap(NULL, p->sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_POPULATE, ring.fd, IORING_OFF_SQES);
    if (ring.sq == MAP_FAILED || ring.cq == MAP_FAILED || ring.sqes == MAP_FAILED)
        return fail(errno);
    fprintf(stderr, "via io_uring\n");

    struct io_uring_sqe sqe;
    memset(&sqe, 0, sizeof sqe);
    sqe.opcode = IORING_OP_OPENAT;
    sqe.fd = AT_FDCWD;
    sqe.addr = (uint64_t)(uintptr_t)argv[1];
    sqe.open_flags = O_RDONLY | O_CLOEXEC;
    int fd = run_one(&ring, &sqe);
    if (fd < 0)
        return fail(-fd);

    memset(&sqe, 0, sizeof sqe);
    sqe.opcode = IORING_OP_READ;
    sqe.fd = fd;
    sqe.addr = (uint64_t)(uintptr_t)buffer;
    sqe.len = sizeof buffer;
    sqe.off = 0;
    int n = run_one(&ring, &sqe);
    if (n < 0)
        return fail(-n);
    fwrite(buffer, 1, (size_t)n, stdout);
    return 0;
}
