/*
 * kata-ci-jail: start one VM process (QEMU or the file server) the way Firecracker's jailer
 * does: in its own cgroups, under an unprivileged identity, with no way to regain privileges,
 * killed when kata-ci dies, then exec the real program (same pid).
 *
 *   kata-ci-jail [--cgroup DIR]... [--netns PATH] [--uid N --gid N [--groups N,N...]]
 *                [--fsize BYTES] [--no-setid-files] -- PROGRAM ARGS...
 *
 * --cgroup DIR      join DIR (write our pid to DIR/cgroup.procs) before anything else runs,
 *                   so every byte the program allocates is charged to the VM's cgroup.
 * --netns PATH      enter the network namespace bound at PATH (the VM's, made by kata-ci)
 *                   while still privileged: QEMU then reaches only what that namespace's
 *                   policy lets through (executors/network/netns.py), not the host's network.
 * --uid/--gid       drop to this identity after joining; supplementary groups are exactly
 *                   --groups (e.g. kvm for /dev/kvm), none without it.
 * --fsize BYTES     RLIMIT_FSIZE: no file the program writes grows past BYTES. SIGXFSZ is
 *                   ignored so the writer gets EFBIG (the guest sees an I/O error) instead of
 *                   dying.
 * --no-setid-files  seccomp: refuse (EPERM) chmod/create/mknod calls whose mode carries
 *                   setuid or setgid bits, and mknod of device nodes. For the file server:
 *                   a guest must not leave a setuid file or a device node in a host directory,
 *                   whatever identity the server runs under. openat2's mode sits in a struct
 *                   seccomp cannot read, so openat2 gets ENOSYS (callers fall back to openat).
 *
 * Always: PR_SET_NO_NEW_PRIVS (no setuid binary or file capability can raise privileges
 * later), core dumps off (guest memory must not land on the host disk), parent-death signal
 * KILL set *after* the identity change (changing credentials clears it).
 *
 * Written in C, not as a Python preexec_fn: the runner is multi-threaded, and running Python
 * between fork and exec can deadlock on a lock another thread held at fork time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_CGROUPS 8
#define MAX_GROUPS 32

static void die(const char *what) {
    fprintf(stderr, "kata-ci-jail: %s: %s\n", what, strerror(errno));
    exit(125);
}

static void join_cgroup(const char *dir) {
    char path[4096], pid[32];
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) die(path);
    int n = snprintf(pid, sizeof pid, "%d\n", getpid());
    if (write(fd, pid, (size_t)n) != n) die(path);
    close(fd);
}

/* One rule: if (nr == SYSCALL && (arg[ARG] & MASK)) return EPERM. */
#define LOAD_NR BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr))
#define ARG_LO(i) (offsetof(struct seccomp_data, args) + (i) * 8)
#define DENY_MODE(sys, arg, mask)                                               \
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (sys), 0, 4),                           \
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(arg)),                            \
    BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, (mask), 0, 1),                         \
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),                       \
    LOAD_NR
/* mknod of a character or block device: (mode & S_IFMT) is S_IFCHR or S_IFBLK. */
#define DENY_DEVICE(sys, arg)                                                   \
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (sys), 0, 6),                           \
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(arg)),                            \
    BPF_STMT(BPF_ALU | BPF_AND | BPF_K, S_IFMT),                                \
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, S_IFCHR, 1, 0),                         \
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, S_IFBLK, 0, 1),                         \
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),                       \
    LOAD_NR

#ifndef __NR_fchmodat2
#define __NR_fchmodat2 452
#endif
#ifndef __NR_openat2
#define __NR_openat2 437
#endif

static void no_setid_files(void) {
    const unsigned setid = S_ISUID | S_ISGID;
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        LOAD_NR,
        /* x32 syscalls carry the same numbers with bit 30 set: refuse them all. */
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        DENY_MODE(__NR_chmod, 1, setid),
        DENY_MODE(__NR_fchmod, 1, setid),
        DENY_MODE(__NR_fchmodat, 2, setid),
        DENY_MODE(__NR_fchmodat2, 2, setid),
        DENY_MODE(__NR_open, 2, setid),
        DENY_MODE(__NR_openat, 3, setid),
        DENY_MODE(__NR_creat, 1, setid),
        DENY_MODE(__NR_mkdir, 1, setid),
        DENY_MODE(__NR_mkdirat, 2, setid),
        DENY_MODE(__NR_mknod, 1, setid),
        DENY_MODE(__NR_mknodat, 2, setid),
        DENY_DEVICE(__NR_mknod, 1),
        DENY_DEVICE(__NR_mknodat, 2),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_openat2, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof filter / sizeof filter[0], .filter = filter};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) die("seccomp");
}

int main(int argc, char **argv) {
    const char *cgroups[MAX_CGROUPS];
    int ncgroups = 0, setid_filter = 0;
    const char *netns = NULL;
    long long uid = -1, gid = -1, fsize = -1;
    gid_t groups[MAX_GROUPS];
    size_t ngroups = 0;
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) { i++; break; }
        if (strcmp(a, "--no-setid-files") == 0) { setid_filter = 1; continue; }
        if (i + 1 >= argc) { fprintf(stderr, "kata-ci-jail: %s needs a value\n", a); return 125; }
        const char *v = argv[++i];
        if (strcmp(a, "--cgroup") == 0 && ncgroups < MAX_CGROUPS) cgroups[ncgroups++] = v;
        else if (strcmp(a, "--netns") == 0) netns = v;
        else if (strcmp(a, "--uid") == 0) uid = atoll(v);
        else if (strcmp(a, "--gid") == 0) gid = atoll(v);
        else if (strcmp(a, "--fsize") == 0) fsize = atoll(v);
        else if (strcmp(a, "--groups") == 0) {
            char *copy = strdup(v), *save = NULL;
            for (char *t = strtok_r(copy, ",", &save); t && ngroups < MAX_GROUPS;
                 t = strtok_r(NULL, ",", &save))
                groups[ngroups++] = (gid_t)atoll(t);
        }
        else { fprintf(stderr, "kata-ci-jail: unknown option %s\n", a); return 125; }
    }
    if (i >= argc) { fprintf(stderr, "kata-ci-jail: no program\n"); return 125; }

    for (int c = 0; c < ncgroups; c++) join_cgroup(cgroups[c]);
    if (netns) {
        int fd = open(netns, O_RDONLY | O_CLOEXEC);
        if (fd < 0) die(netns);
        if (setns(fd, CLONE_NEWNET) != 0) die("setns");
        close(fd);
    }
    struct rlimit no_core = {0, 0};
    if (setrlimit(RLIMIT_CORE, &no_core) != 0) die("RLIMIT_CORE");
    if (fsize >= 0) {
        struct rlimit limit = {(rlim_t)fsize, (rlim_t)fsize};
        if (setrlimit(RLIMIT_FSIZE, &limit) != 0) die("RLIMIT_FSIZE");
        signal(SIGXFSZ, SIG_IGN); /* an ignored disposition survives exec */
    }
    if (gid >= 0) {
        if (setgroups(ngroups, groups) != 0) die("setgroups");
        if (setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) != 0) die("setresgid");
    }
    if (uid >= 0 && setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0) die("setresuid");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs");
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) die("pdeathsig");
    if (getppid() == 1) return 125; /* kata-ci already gone */
    if (setid_filter) no_setid_files();
    execvp(argv[i], &argv[i]);
    die(argv[i]);
    return 125;
}
