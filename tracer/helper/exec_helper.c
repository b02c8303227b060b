/*
 * mtrace-exec: the exec helper.
 *
 * Started by the supervisor as
 *
 *     mtrace-exec --ctl FD --mode notify|trace --trap NR,NR,... [--enosys NR,...]
 *                 [--trap-if NR:ARG,...] [--exec-path PATH] -- CMD ARGS...
 *
 * it forks into two processes:
 *
 *   watchdog (this process): a child subreaper that stays out of the tracee's way.
 *       It reaps the tracee and every orphaned descendant, reports the tracee's
 *       pid and its exit status to the supervisor, and, if the supervisor dies
 *       (its end of the control socket hangs up), kills every descendant so no
 *       half-virtualised process survives. Under notify it also holds a copy
 *       of the listener: a filter whose listener is closed answers every
 *       trapped call with ENOSYS, so without that copy the tracee would run on
 *       (its opens failing) between the supervisor's death and the watchdog's
 *       SIGKILL. With it, a trapped call made then waits, unanswered, until
 *       the SIGKILL ends it.
 *
 *   tracee: sets no_new_privs, installs the BPF filter (USER_NOTIF or TRACE for
 *       the trapped syscalls, ENOSYS for the ones libc must fall back from),
 *       tells the supervisor the listener's fd number (the supervisor takes
 *       it with pidfd_getfd and acknowledges), and execs CMD. In trace mode it first waits until the
 *       supervisor has attached with ptrace.
 *
 * The control socket is a SOCK_SEQPACKET pair; every message is one struct
 * ctl_message (see tracer/launcher.py for the other side).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SECCOMP_FILTER_FLAG_NEW_LISTENER
#define SECCOMP_FILTER_FLAG_NEW_LISTENER (1UL << 3)
#endif
#ifndef SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
#define SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (1UL << 5)
#endif
#ifndef SECCOMP_RET_USER_NOTIF
#define SECCOMP_RET_USER_NOTIF 0x7fc00000U
#endif

#if defined(__x86_64__)
#define MTRACE_AUDIT_ARCH AUDIT_ARCH_X86_64
/* x32 syscalls share the arch value and set this bit in the number. */
#define MTRACE_NR_FLAG_MASK 0x40000000U
#elif defined(__aarch64__)
#define MTRACE_AUDIT_ARCH AUDIT_ARCH_AARCH64
#define MTRACE_NR_FLAG_MASK 0U
#else
#error "mtrace-exec: unsupported architecture"
#endif

enum ctl_kind {
    CTL_TRACEE_PID = 1,   /* watchdog -> supervisor: value = tracee pid */
    CTL_LISTENER = 2,     /* tracee -> supervisor: listener fd number, value = filter flags */
    CTL_ERROR = 3,        /* tracee -> supervisor: value = errno, stage says where */
    CTL_EXIT = 4,         /* watchdog -> supervisor: value = raw wait status */
    CTL_READY = 5,        /* tracee -> supervisor (trace mode): filter installed, about to exec */
    CTL_GO = 6,           /* supervisor -> tracee: attached (trace) or listener taken (notify) */
};

enum ctl_stage {
    STAGE_NONE = 0,
    STAGE_NO_NEW_PRIVS = 1,
    STAGE_FILTER = 2,
    STAGE_SEND_LISTENER = 3,
    STAGE_EXEC = 4,
    STAGE_FORK = 5,
    STAGE_WAIT_GO = 6,
};

struct ctl_message {
    int32_t kind;
    int32_t stage;
    int64_t value;
    int32_t pid;   /* the sender */
    int32_t fd;    /* CTL_LISTENER: the listener's number in the tracee, else -1 */
};

#define MAX_NRS 512
#define MAX_INSNS 4096

static int ctl_fd = -1;
/* Tracee <-> watchdog: the listener's fd number, then the watchdog's ack. */
static int handoff[2] = {-1, -1};

static void die_usage(const char *why)
{
    fprintf(stderr, "mtrace-exec: %s\n", why);
    fprintf(stderr, "usage: mtrace-exec --ctl FD --mode notify|trace --trap NR,... [--enosys NR,...] "
                    "[--trap-if NR:ARG,...] [--exec-path PATH] -- CMD ARGS...\n");
    exit(125);
}

/*
 * Messages go out with write(2), never sendmsg(2): once the filter is
 * installed the tracee's own sendmsg is trapped, and the supervisor cannot
 * answer it before it holds the listener. For the same reason the listener fd
 * is not passed with SCM_RIGHTS: the tracee announces its number and waits;
 * the supervisor takes it with pidfd_getfd and acknowledges.
 */
static int send_message(int kind, int stage, int64_t value, int fd)
{
    struct ctl_message msg = {.kind = kind, .stage = stage, .value = value,
                              .pid = (int32_t)getpid(), .fd = fd};
    ssize_t n;
    do {
        n = write(ctl_fd, &msg, sizeof msg);
    } while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof msg ? 0 : -1;
}

static int receive_message(int wanted)
{
    struct ctl_message msg;
    ssize_t n;
    do {
        n = read(ctl_fd, &msg, sizeof msg);
    } while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof msg)
        return n < 0 ? errno : EPIPE;
    return msg.kind == wanted ? 0 : EPROTO;
}

static int parse_nrs(const char *text, unsigned *out, int max)
{
    int count = 0;
    const char *p = text;
    while (*p) {
        char *end;
        errno = 0;
        unsigned long nr = strtoul(p, &end, 10);
        if (end == p || errno || nr > 0xffff || count >= max)
            die_usage("bad syscall number list");
        out[count++] = (unsigned)nr;
        p = end;
        if (*p == ',')
            p++;
        else if (*p)
            die_usage("bad syscall number list");
    }
    return count;
}

/* One syscall number and the filter's answer for it. With arg >= 0 the
 * action applies only when that argument is not zero (recvfrom with a source
 * address buffer); otherwise the call is allowed. */
struct rule {
    unsigned nr;
    uint32_t action;
    int arg;
};

static int compare_rules(const void *a, const void *b)
{
    const struct rule *x = a, *y = b;
    return (x->nr > y->nr) - (x->nr < y->nr);
}

static struct sock_filter insns[MAX_INSNS];
static int insn_count;

static void emit(struct sock_filter insn)
{
    if (insn_count >= MAX_INSNS)
        die_usage("filter too large");
    insns[insn_count++] = insn;
}

/*
 * Emit a binary search over rules[lo, hi) on the syscall number held in A, so
 * an untrapped syscall costs O(log n) comparisons. Every leaf ends in
 * RET_ALLOW. BPF jump offsets are 8 bits, so subtrees are laid out inline and
 * the "greater or equal" branch jumps over the "less" subtree.
 */
static void emit_search(const struct rule *rules, int lo, int hi)
{
    if (hi - lo <= 4) {
        for (int i = lo; i < hi; i++) {
            if (rules[i].arg < 0) {
                emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, rules[i].nr, 0, 1));
                emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, rules[i].action));
                continue;
            }
            uint32_t low = offsetof(struct seccomp_data, args) + 8 * (uint32_t)rules[i].arg;
            emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, rules[i].nr, 0, 7));
            emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, low));
            emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0));
            emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, rules[i].action));
            emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, low + 4));
            emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0));
            emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, rules[i].action));
            emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
        }
        emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
        return;
    }
    int mid = lo + (hi - lo) / 2;
    int branch = insn_count;
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, rules[mid].nr, 0, 0));
    emit_search(rules, lo, mid);
    int skip = insn_count - branch - 1;
    if (skip > 255)
        die_usage("filter subtree too large");
    insns[branch].jt = (unsigned char)skip;
    emit_search(rules, mid, hi);
}

struct condition {
    unsigned nr;
    int arg;
};

static struct condition conditions[MAX_NRS];
static int nconditions;

static int condition_of(unsigned nr)
{
    for (int i = 0; i < nconditions; i++)
        if (conditions[i].nr == nr)
            return conditions[i].arg;
    return -1;
}

static void parse_conditions(const char *text)
{
    const char *p = text;
    while (*p) {
        char *end;
        unsigned long nr = strtoul(p, &end, 10);
        if (end == p || *end != ':' || nconditions >= MAX_NRS)
            die_usage("bad --trap-if list (NR:ARG,...)");
        p = end + 1;
        unsigned long arg = strtoul(p, &end, 10);
        if (end == p || arg > 5)
            die_usage("bad --trap-if list (NR:ARG,...)");
        conditions[nconditions++] = (struct condition){(unsigned)nr, (int)arg};
        p = end;
        if (*p == ',')
            p++;
        else if (*p)
            die_usage("bad --trap-if list (NR:ARG,...)");
    }
}

static int install_filter(const unsigned *trap, int ntrap, const unsigned *enosys, int nenosys,
                          int trace_mode, long *flags_used)
{
    static struct rule rules[2 * MAX_NRS];
    int nrules = 0;
    uint32_t trap_action = trace_mode ? SECCOMP_RET_TRACE : SECCOMP_RET_USER_NOTIF;
    for (int i = 0; i < nenosys; i++)
        rules[nrules++] = (struct rule){enosys[i], SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA), -1};
    for (int i = 0; i < ntrap; i++) {
        int duplicate = 0;
        for (int j = 0; j < nenosys; j++)
            duplicate |= enosys[j] == trap[i];
        if (!duplicate)
            rules[nrules++] = (struct rule){trap[i], trap_action, condition_of(trap[i])};
    }
    qsort(rules, (size_t)nrules, sizeof rules[0], compare_rules);

    insn_count = 0;
    emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)));
    /* A foreign ABI (a 32-bit int 0x80 call) is not intercepted: let it run. */
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, MTRACE_AUDIT_ARCH, 1, 0));
    emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)));
    if (MTRACE_NR_FLAG_MASK) {
        emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, MTRACE_NR_FLAG_MASK, 0, 1));
        emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS));
    }
    emit_search(rules, 0, nrules);

    struct sock_fprog prog = {.len = (unsigned short)insn_count, .filter = insns};
    if (trace_mode) {
        *flags_used = 0;
        return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
    }
    long flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
    int fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
    if (fd < 0 && errno == EINVAL) {
        /* Kernels before 5.19 lack WAIT_KILLABLE_RECV; the supervisor is told. */
        flags = SECCOMP_FILTER_FLAG_NEW_LISTENER;
        fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
    }
    *flags_used = flags;
    return fd;
}

/* Dispositions the watchdog changes; the tracee puts the inherited ones back. */
static const int watchdog_ignored[] = {SIGINT, SIGQUIT, SIGTERM, SIGHUP, SIGPIPE};
static struct sigaction inherited[sizeof watchdog_ignored / sizeof watchdog_ignored[0]];

static void restore_tracee_signals(void)
{
    for (size_t i = 0; i < sizeof watchdog_ignored / sizeof watchdog_ignored[0]; i++)
        sigaction(watchdog_ignored[i], &inherited[i], NULL);
    /* Python ignores SIGPIPE and SIGXFSZ; a program started from a shell does not. */
    signal(SIGPIPE, SIG_DFL);
    signal(SIGXFSZ, SIG_DFL);
    signal(SIGCHLD, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

static void wait_for_go(void)
{
    int err = receive_message(CTL_GO);
    if (err) {
        send_message(CTL_ERROR, STAGE_WAIT_GO, err, -1);
        _exit(125);
    }
}

static const char *exec_path;

static void run_tracee(char **argv, const unsigned *trap, int ntrap, const unsigned *enosys,
                       int nenosys, int trace_mode, pid_t watchdog)
{
    /* If the watchdog goes, so do we (it kills us itself if the supervisor goes). */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != watchdog)
        _exit(125);
    restore_tracee_signals();

    if (trace_mode)
        wait_for_go();

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        send_message(CTL_ERROR, STAGE_NO_NEW_PRIVS, errno, -1);
        _exit(125);
    }
    long flags_used = 0;
    int listener = install_filter(trap, ntrap, enosys, nenosys, trace_mode, &flags_used);
    if (listener < 0) {
        send_message(CTL_ERROR, STAGE_FILTER, errno, -1);
        _exit(125);
    }
    if (trace_mode) {
        send_message(CTL_READY, STAGE_NONE, 0, -1);
    } else {
        /* The watchdog takes its copy first (read/write on the handoff pair are
         * never trapped); then the supervisor takes its own. */
        int number = listener;
        char ack;
        if (write(handoff[1], &number, sizeof number) != (ssize_t)sizeof number
            || read(handoff[1], &ack, 1) != 1)
            _exit(125);
        /* handoff[1] is close-on-exec: close(2) may be trapped, and nobody
         * answers before the supervisor holds the listener. */
        /* No supervisor to answer: running on would only see ENOSYS. */
        if (send_message(CTL_LISTENER, STAGE_NONE, flags_used, listener) != 0)
            _exit(125);
        if (receive_message(CTL_GO) != 0)
            _exit(125);
        close(listener);
    }
    /* The supervisor resolves PATH itself when it can, so the tracee makes
     * exactly one execve, as it would from a shell. */
    if (exec_path)
        execv(exec_path, argv);
    else
        execvp(argv[0], argv);
    int err = errno;
    send_message(CTL_ERROR, STAGE_EXEC, err, -1);
    fprintf(stderr, "mtrace: cannot execute %s: %s\n", argv[0], strerror(err));
    _exit(err == ENOENT ? 127 : 126);
}

/* Kill every process below us. As a subreaper, orphans are re-parented to us,
 * so the tree under our pid is the whole tracee tree. Repeat until it is empty:
 * a process may fork while we walk. */
static void kill_descendants(void)
{
    pid_t self = getpid();
    for (int round = 0; round < 50; round++) {
        static pid_t pids[65536], parents[65536];
        int count = 0;
        DIR *proc = opendir("/proc");
        if (!proc)
            return;
        struct dirent *entry;
        while ((entry = readdir(proc)) && count < 65536) {
            char *end;
            long pid = strtol(entry->d_name, &end, 10);
            if (*end || pid <= 0)
                continue;
            char path[64], buf[512];
            snprintf(path, sizeof path, "/proc/%ld/stat", pid);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                continue;
            ssize_t n = read(fd, buf, sizeof buf - 1);
            close(fd);
            if (n <= 0)
                continue;
            buf[n] = 0;
            char *paren = strrchr(buf, ')');
            long ppid;
            char state;
            if (!paren || sscanf(paren + 2, "%c %ld", &state, &ppid) != 2)
                continue;
            pids[count] = (pid_t)pid;
            parents[count] = (pid_t)ppid;
            count++;
        }
        closedir(proc);

        static pid_t marked[65536];
        int nmarked = 0;
        marked[nmarked++] = self;
        for (int i = 0; i < nmarked; i++)
            for (int j = 0; j < count; j++)
                if (parents[j] == marked[i] && nmarked < 65536)
                    marked[nmarked++] = pids[j];
        if (nmarked == 1)
            return;
        for (int i = 1; i < nmarked; i++)
            kill(marked[i], SIGKILL);
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
    }
}

/* Notify mode: take a copy of the tracee's listener (see the top of this file).
 * Returns -1 if the tracee died first or the kernel lacks pidfd_getfd (then the
 * supervisor cannot take it either and reports that). */
static int take_listener_copy(pid_t tracee)
{
    close(handoff[1]);
    int number, copy = -1;
    ssize_t n;
    do {
        n = read(handoff[0], &number, sizeof number);
    } while (n < 0 && errno == EINTR);
    if (n == (ssize_t)sizeof number) {
        int pidfd = (int)syscall(SYS_pidfd_open, tracee, 0);
        if (pidfd >= 0) {
            copy = (int)syscall(SYS_pidfd_getfd, pidfd, number, 0);
            close(pidfd);
        }
        char ack = 1;
        if (write(handoff[0], &ack, 1) != 1) {
            /* the tracee is gone: nothing to guard */
        }
    }
    close(handoff[0]);
    return copy;
}

int main(int argc, char **argv)
{
    const char *mode = "notify";
    static unsigned trap[MAX_NRS], enosys[MAX_NRS];
    int ntrap = 0, nenosys = 0;
    int i;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        if (i + 1 >= argc)
            die_usage("option needs a value");
        if (!strcmp(argv[i], "--ctl"))
            ctl_fd = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--mode"))
            mode = argv[++i];
        else if (!strcmp(argv[i], "--trap"))
            ntrap = parse_nrs(argv[++i], trap, MAX_NRS);
        else if (!strcmp(argv[i], "--enosys"))
            nenosys = parse_nrs(argv[++i], enosys, MAX_NRS);
        else if (!strcmp(argv[i], "--trap-if"))
            parse_conditions(argv[++i]);
        else if (!strcmp(argv[i], "--exec-path"))
            exec_path = argv[++i];
        else
            die_usage("unknown option");
    }
    if (i >= argc)
        die_usage("no command");
    if (ctl_fd < 0 || fcntl(ctl_fd, F_GETFD) < 0)
        die_usage("--ctl must name an open socket");
    int trace_mode;
    if (!strcmp(mode, "notify"))
        trace_mode = 0;
    else if (!strcmp(mode, "trace"))
        trace_mode = 1;
    else
        die_usage("--mode is notify or trace");
    fcntl(ctl_fd, F_SETFD, FD_CLOEXEC);

    for (size_t s = 0; s < sizeof watchdog_ignored / sizeof watchdog_ignored[0]; s++) {
        struct sigaction ignore = {.sa_handler = SIG_IGN};
        sigaction(watchdog_ignored[s], &ignore, &inherited[s]);
    }
    prctl(PR_SET_CHILD_SUBREAPER, 1);

    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);

    if (!trace_mode && socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, handoff) != 0) {
        send_message(CTL_ERROR, STAGE_FORK, errno, -1);
        return 125;
    }

    pid_t watchdog = getpid();
    pid_t tracee = fork();
    if (tracee < 0) {
        send_message(CTL_ERROR, STAGE_FORK, errno, -1);
        return 125;
    }
    if (tracee == 0) {
        close(sfd);
        close(handoff[0]);
        run_tracee(argv + i, trap, ntrap, enosys, nenosys, trace_mode, watchdog);
    }
    send_message(CTL_TRACEE_PID, STAGE_NONE, tracee, -1);
    int listener_copy = trace_mode ? -1 : take_listener_copy(tracee);
    (void)listener_copy; /* held until the watchdog exits, after every tracee is dead */

    int tracee_status = -1;
    for (;;) {
        /* Reap everything that has exited; a subreaper inherits the orphans. */
        for (;;) {
            int status;
            pid_t pid = waitpid(-1, &status, WNOHANG | __WALL);
            if (pid == tracee)
                tracee_status = status;
            if (pid > 0)
                continue;
            if (pid < 0 && errno == ECHILD) {
                send_message(CTL_EXIT, STAGE_NONE, tracee_status, -1);
                if (WIFSIGNALED(tracee_status))
                    return 128 + WTERMSIG(tracee_status);
                return WEXITSTATUS(tracee_status);
            }
            break;
        }
        /* events = 0: only the supervisor hanging up wakes us, never its data. */
        struct pollfd fds[2] = {{.fd = ctl_fd, .events = 0}, {.fd = sfd, .events = POLLIN}};
        int ready = poll(fds, 2, -1);
        if (ready < 0 && errno != EINTR)
            break;
        if (fds[0].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            kill_descendants();
            return 137;
        }
        if (fds[1].revents & POLLIN) {
            struct signalfd_siginfo info;
            while (read(sfd, &info, sizeof info) > 0)
                ;
        }
    }
    kill_descendants();
    return 125;
}
