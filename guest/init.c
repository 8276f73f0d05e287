/*
 * PID 1 of every kata-ci guest (runs from the initramfs).
 *
 * Why C and not Python: Python takes ~2 s to start under TCG; doing the mounts here costs
 * milliseconds, and keeping PID 1 apart from the agent means orphaned job processes are reaped
 * here without racing the agent's own waitpid() for exit statuses.
 *
 * Steps: mount /dev /proc /sys; mount the shared read-only rootfs (/dev/vda) under an overlay
 * whose upper layer is a tmpfs (every VM writes to its own throw-away layer); bind the agent
 * code from the initramfs into it; switch root; start the agent; reap; power off.
 *
 * kataci.layer=1: the host attached the runner layer (images/runner_layer.py, GitHub's
 * actions runner at /opt/actions-runner) as a second read-only disk, /dev/vdb. It joins the
 * overlay's lower layers above the rootfs, so its files show in / and a job may change them
 * like any other file: in its own tmpfs, never in the image other VMs share.
 *
 * The workspace (virtio-fs tag "workspace") is not mounted here: the agent's Mount RPC runs
 * this binary as kata-ci-mount PATH once the host names the job's directory. A VM restored
 * from a snapshot has the kernel command line of the template it was saved from, so nothing
 * job-specific can come from there; cold-booted VMs take the same path.
 *
 * Configuration comes only from kataci.* words of the kernel command line; never secrets.
 * kataci.mode=floor powers off at once (the benchmark floor and the KVM probe use it).
 *
 * OCI images: kata-ci-spawn --in runs a job command chrooted into an image's root under the
 * image's user (the agent's PrepareRoot, guest/roots.py, made that root).
 *
 * Memory: the agent is exempt from the OOM killer (oom_score_adj -1000); every job command
 * starts through this same binary under the name kata-ci-spawn, which puts the job back to
 * 0 before exec, so a job's children never inherit the exemption. Everything a job can write
 * in RAM is bounded together: /, /tmp and /run share the one overlay tmpfs (kataci.overlay_size),
 * /dev/shm has its own small bound. A job filling them gets ENOSPC; the agent stays.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static char cmdline[4096];

static void say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(buf, sizeof buf, "kata-ci-init: ");
    n += vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    if (write(2, buf, n) < 0) { /* nowhere else to report */ }
}

static void power_off(void) {
    sync();
    /* reboot=t on the command line + QEMU -no-reboot: the reset ends the VM process. */
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}

static void die(const char *what) {
    say("FATAL: %s: %s", what, strerror(errno));
    power_off();
}

static void must_mount(const char *src, const char *dst, const char *type,
                       unsigned long flags, const char *data) {
    if (mount(src, dst, type, flags, data) != 0) {
        char what[256];
        snprintf(what, sizeof what, "mount %s on %s (%s)", src, dst, type ? type : "-");
        die(what);
    }
}

static void mkdirs(const char *path, mode_t mode) {
    char tmp[1024];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            mkdir(tmp, mode);
            *p = '/';
        }
    }
    if (mkdir(tmp, mode) != 0 && errno != EEXIST) die(path);
}

/* Value of kataci.<key>=... on the kernel command line, or NULL. */
static const char *option(const char *key, char *out, size_t size) {
    char needle[64];
    snprintf(needle, sizeof needle, "kataci.%s=", key);
    for (char *p = cmdline; (p = strstr(p, needle)) != NULL; p++) {
        if (p != cmdline && p[-1] != ' ') continue;
        p += strlen(needle);
        size_t n = strcspn(p, " \n");
        if (n >= size) n = size - 1;
        memcpy(out, p, n);
        out[n] = 0;
        return out;
    }
    return NULL;
}

/* kata-ci-mount PATH: the agent's Mount RPC. Errors go to stderr (the RPC's reply), never
 * a power-off: the agent reports them and the host ends the job as a system failure. */
static int mount_workspace(const char *path) {
    char tmp[1024];
    if (path[0] != '/' || strlen(path) >= sizeof tmp) {
        fprintf(stderr, "kata-ci-mount: bad path\n");
        return 2;
    }
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            mkdir(tmp, 0755);
            *p = '/';
        }
    }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "kata-ci-mount: mkdir %s: %s\n", path, strerror(errno));
        return 1;
    }
    if (mount("workspace", path, "virtiofs", MS_NODEV, NULL) != 0) {
        fprintf(stderr, "kata-ci-mount: mount workspace on %s: %s\n", path, strerror(errno));
        return 1;
    }
    return 0;
}

static void loopback_up(void) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct ifreq ifr;
    if (fd < 0) return;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (ioctl(fd, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        ioctl(fd, SIOCSIFFLAGS, &ifr);
    }
    close(fd);
}

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) { say("%s: %s", path, strerror(errno)); return; }
    if (write(fd, text, strlen(text)) < 0) say("%s: %s", path, strerror(errno));
    close(fd);
}

/* linux/ipv6.h's in6_ifreq; that header clashes with glibc's netinet/in.h. */
struct in6_ifreq {
    struct in6_addr ifr6_addr;
    unsigned int ifr6_prefixlen;
    int ifr6_ifindex;
};

/* Split "ADDR/LEN,GATEWAY" in place; 0 when malformed. */
static int split_net(char *value, char **addr, int *len, char **gateway) {
    char *slash = strchr(value, '/'), *comma = strchr(value, ',');
    if (!slash || !comma || comma < slash) return 0;
    *slash = *comma = 0;
    *addr = value;
    *len = atoi(slash + 1);
    *gateway = comma + 1;
    return 1;
}

/*
 * The job's NIC (network = egress | allowlist): eth0 gets the same fixed addresses in every
 * VM, from kataci.ip4=ADDR/LEN,GW and kataci.ip6=ADDR/LEN,GW (executors/network/policy.py).
 * Every VM has a network namespace of its own on the host, so equal addresses never meet;
 * being fixed, they survive a snapshot restore. The gateway is kata-ci's end of the link,
 * where its resolver answers; the policy is enforced there, outside the guest.
 * No DAD and no router advertisements: the link has exactly two ends, both known.
 */
static void network_up(void) {
    char v4[128], v6[128], *addr, *gw;
    int len;
    if (!option("ip4", v4, sizeof v4)) return;
    write_file("/proc/sys/net/ipv6/conf/eth0/accept_dad", "0");
    write_file("/proc/sys/net/ipv6/conf/eth0/accept_ra", "0");
    write_file("/proc/sys/net/ipv6/conf/eth0/autoconf", "0");
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "eth0");
    if (fd < 0 || ioctl(fd, SIOCGIFINDEX, &ifr) != 0) { say("no eth0: %s", strerror(errno)); return; }
    int index = ifr.ifr_ifindex;
    char resolv[512] = "";
    if (split_net(v4, &addr, &len, &gw)) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
        sin->sin_family = AF_INET;
        inet_pton(AF_INET, addr, &sin->sin_addr);
        if (ioctl(fd, SIOCSIFADDR, &ifr) != 0) say("eth0 address: %s", strerror(errno));
        sin->sin_addr.s_addr = len ? htonl(~0u << (32 - len)) : 0;
        if (ioctl(fd, SIOCSIFNETMASK, &ifr) != 0) say("eth0 netmask: %s", strerror(errno));
        ioctl(fd, SIOCGIFFLAGS, &ifr);
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        if (ioctl(fd, SIOCSIFFLAGS, &ifr) != 0) say("eth0 up: %s", strerror(errno));
        struct rtentry rt;
        memset(&rt, 0, sizeof rt);
        ((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
        ((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
        struct sockaddr_in *gsin = (struct sockaddr_in *)&rt.rt_gateway;
        gsin->sin_family = AF_INET;
        inet_pton(AF_INET, gw, &gsin->sin_addr);
        rt.rt_flags = RTF_UP | RTF_GATEWAY;
        if (ioctl(fd, SIOCADDRT, &rt) != 0) say("IPv4 default route: %s", strerror(errno));
        snprintf(resolv, sizeof resolv, "nameserver %s\n", gw);
    }
    close(fd);
    int fd6 = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd6 >= 0 && option("ip6", v6, sizeof v6) && split_net(v6, &addr, &len, &gw)) {
        struct in6_ifreq req;
        memset(&req, 0, sizeof req);
        inet_pton(AF_INET6, addr, &req.ifr6_addr);
        req.ifr6_prefixlen = (unsigned)len;
        req.ifr6_ifindex = index;
        if (ioctl(fd6, SIOCSIFADDR, &req) != 0) say("eth0 IPv6 address: %s", strerror(errno));
        struct in6_rtmsg rt6;
        memset(&rt6, 0, sizeof rt6);
        inet_pton(AF_INET6, gw, &rt6.rtmsg_gateway);
        rt6.rtmsg_flags = RTF_UP | RTF_GATEWAY;
        rt6.rtmsg_metric = 1;
        rt6.rtmsg_ifindex = index;
        if (ioctl(fd6, SIOCADDRT, &rt6) != 0) say("IPv6 default route: %s", strerror(errno));
        size_t n = strlen(resolv);
        snprintf(resolv + n, sizeof resolv - n, "nameserver %s\n", gw);
    }
    if (fd6 >= 0) close(fd6);
    write_file("/etc/resolv.conf", resolv);
}

static void set_oom_score_adj(const char *value) {
    int fd = open("/proc/self/oom_score_adj", O_WRONLY);
    if (fd >= 0) {
        if (write(fd, value, strlen(value)) < 0) { /* the default then stays */ }
        close(fd);
    }
}

/* kata-ci-spawn --in ROOT UID GID GROUPS CWD -- PROGRAM ARGS...: a job command in an OCI
 * image's root (the agent's PrepareRoot made it; guest/roots.py resolved the user). The
 * chroot comes first so that PROGRAM is looked up in the image's PATH and files; the
 * identity last, after everything that needs root. GROUPS: comma-separated, may be empty. */
static int spawn_in_root(int argc, char **argv) {
    if (argc < 9 || strcmp(argv[7], "--") != 0) {
        fprintf(stderr, "kata-ci-spawn: bad --in arguments\n");
        return 126;
    }
    const char *root = argv[2], *cwd = argv[6];
    uid_t uid = (uid_t)strtoul(argv[3], NULL, 10);
    gid_t gid = (gid_t)strtoul(argv[4], NULL, 10);
    gid_t groups[64];
    size_t ngroups = 0;
    for (char *p = argv[5]; *p && ngroups < 64;) {
        groups[ngroups++] = (gid_t)strtoul(p, &p, 10);
        if (*p == ',') p++;
        else break;
    }
    if (chroot(root) != 0 || chdir("/") != 0) {
        fprintf(stderr, "kata-ci-spawn: cannot enter the image root: %s\n", strerror(errno));
        return 126;
    }
    if (chdir(cwd) != 0) {
        fprintf(stderr, "kata-ci-spawn: working directory %s: %s\n", cwd, strerror(errno));
        return 126;
    }
    if (setgroups(ngroups, groups) != 0 || setgid(gid) != 0 || setuid(uid) != 0) {
        fprintf(stderr, "kata-ci-spawn: cannot become %u:%u: %s\n", (unsigned)uid,
                (unsigned)gid, strerror(errno));
        return 126;
    }
    execvp(argv[8], &argv[8]);
    fprintf(stderr, "kata-ci-spawn: %s: %s\n", argv[8], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}

int main(int argc, char **argv_in) {
    const char *self = strrchr(argv_in[0], '/');
    if (strcmp(self ? self + 1 : argv_in[0], "kata-ci-spawn") == 0) {
        set_oom_score_adj("0");
        if (argc > 1 && strcmp(argv_in[1], "--in") == 0) return spawn_in_root(argc, argv_in);
        if (argc < 2) return 127;
        execvp(argv_in[1], &argv_in[1]);
        fprintf(stderr, "kata-ci-spawn: %s: %s\n", argv_in[1], strerror(errno));
        return errno == ENOENT ? 127 : 126;
    }
    if (strcmp(self ? self + 1 : argv_in[0], "kata-ci-mount") == 0)
        return argc == 2 ? mount_workspace(argv_in[1]) : 2;
    char value[1024];
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    must_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
        cmdline[n > 0 ? n : 0] = 0;
        close(fd);
    }
    if (option("mode", value, sizeof value) && strcmp(value, "floor") == 0) {
        say("floor: powering off");
        power_off();
    }
    must_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    must_mount("/dev/vda", "/lower", "ext4", MS_RDONLY, "noload");
    /* A layer the host asked for and that will not mount is fatal like the rootfs: a job
     * must never start in a VM that silently lacks /opt/actions-runner. */
    const char *lower = "lowerdir=/lower";
    if (option("layer", value, sizeof value) && strcmp(value, "1") == 0) {
        mkdirs("/layer", 0755);
        must_mount("/dev/vdb", "/layer", "ext4", MS_RDONLY | MS_NOSUID | MS_NODEV, "noload");
        lower = "lowerdir=/layer:/lower";  /* leftmost is uppermost */
    }
    if (!option("overlay_size", value, sizeof value)) strcpy(value, "50%");
    char data[1200];
    snprintf(data, sizeof data, "size=%s,mode=0755", value);
    must_mount("tmpfs", "/rw", "tmpfs", MS_NOSUID | MS_NODEV, data);
    mkdirs("/rw/upper", 0755);
    mkdirs("/rw/work", 0755);
    char layers[128];
    snprintf(layers, sizeof layers, "%s,upperdir=/rw/upper,workdir=/rw/work", lower);
    must_mount("overlay", "/newroot", "overlay", 0, layers);
    mkdirs("/newroot/opt/kata-ci/agent", 0755);
    must_mount("/kata-ci", "/newroot/opt/kata-ci/agent", NULL, MS_BIND, NULL);
    must_mount("/dev", "/newroot/dev", NULL, MS_MOVE, NULL);
    must_mount("/proc", "/newroot/proc", NULL, MS_MOVE, NULL);
    must_mount("/sys", "/newroot/sys", NULL, MS_MOVE, NULL);
    /* /tmp and /run live on the overlay: one bound for everything a job writes in RAM. */
    mkdirs("/newroot/tmp", 01777);
    chmod("/newroot/tmp", 01777);
    mkdirs("/newroot/run", 0755);
    mkdirs("/newroot/dev/pts", 0755);
    must_mount("devpts", "/newroot/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
               "newinstance,ptmxmode=0666,gid=5,mode=0620");
    mkdirs("/newroot/dev/shm", 01777);
    must_mount("tmpfs", "/newroot/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
               "mode=1777,size=10%");
    if (chdir("/newroot") != 0) die("chdir /newroot");
    must_mount(".", "/", NULL, MS_MOVE, NULL);
    if (chroot(".") != 0 || chdir("/") != 0) die("chroot");
    sethostname("kata-ci", 7);
    loopback_up();
    network_up();

    char transport[64] = "serial";
    option("transport", transport, sizeof transport);
    char env_transport[100];
    snprintf(env_transport, sizeof env_transport, "KATACI_TRANSPORT=%s", transport);
    char *envp[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME=/root", "LANG=C.UTF-8", env_transport, NULL};
    /* -I -S: no site-packages scan, no environment, no user dirs: fewer files read at start. */
    char *argv[] = {"python3", "-I", "-S", "-c",
                    "import sys; sys.path[:0] = ['/opt/kata-ci/agent', '/opt/kata-ci/site']; "
                    "from kata_ci.guest.agent import main; main()",
                    NULL};
    pid_t agent = fork();
    if (agent < 0) die("fork");
    if (agent == 0) {
        set_oom_score_adj("-1000");
        execve("/usr/bin/python3", argv, envp);
        die("exec python3");
    }
    for (;;) {
        int status;
        pid_t pid = wait(&status);
        if (pid < 0 && errno == ECHILD) break;
        if (pid == agent) {
            if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
                say("agent ended with status 0x%x", status);
            break;
        }
    }
    kill(-1, SIGKILL);  /* whatever the jobs left behind */
    power_off();
    return 0;
}
