/* ptinit: the guest's /init (a symlink to ptagent), in one process: mounts, the network
 * modules, network, SSH key, dropbear, the agent daemon, then "PTLAB-READY" on the console,
 * the modules SSH does not need (in a background child, at idle priority) and the console
 * shell (/etc/ptlab/console). Doing this without a shell and one exec per step saves about a
 * quarter of a second of a TCG boot. Every failure is logged on the console ("ptlab-init:
 * ...") and the boot goes on: the harness reports what is missing. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ptinit.h"

#define GUEST_ADDR "10.0.2.15"
#define GUEST_MASK "255.255.255.0"
#define GATEWAY "10.0.2.2"

static char stamps[1024];

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("ptlab-init: ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    fflush(stdout);
    va_end(ap);
}

static void stamp(const char *name)
{
    char up[64] = "?";
    FILE *f = fopen("/proc/uptime", "r");
    if (f) {
        if (fscanf(f, "%63s", up) != 1)
            strcpy(up, "?");
        fclose(f);
    }
    size_t n = strlen(stamps);
    snprintf(stamps + n, sizeof stamps - n, " %s=%.*s", name, (int)(strcspn(up, ".") + 3), up);
}

static void do_mount(const char *src, const char *dir, const char *type, const char *opts)
{
    mkdir(dir, 0755);
    if (mount(src, dir, type, 0, opts) && errno != EBUSY)
        say("mount %s on %s: %s", type, dir, strerror(errno));
}

static void mounts(void)
{
    do_mount("proc", "/proc", "proc", NULL);
    do_mount("sysfs", "/sys", "sysfs", NULL);
    do_mount("devtmpfs", "/dev", "devtmpfs", NULL);
    do_mount("devpts", "/dev/pts", "devpts", "gid=5,mode=620");
    do_mount("tmpfs", "/dev/shm", "tmpfs", "mode=1777");
    do_mount("debugfs", "/sys/kernel/debug", "debugfs", NULL);
    do_mount("tmpfs", "/run", "tmpfs", "mode=0755");
    mkdir("/run/dropbear", 0755);
    mkdir("/tmp", 01777);
    chmod("/tmp", 01777);
    char name[65] = {0};
    FILE *f = fopen("/etc/hostname", "r");
    if (f) {
        if (fgets(name, sizeof name, f)) {
            name[strcspn(name, "\n")] = 0;
            if (sethostname(name, strlen(name)))
                say("sethostname: %s", strerror(errno));
        }
        fclose(f);
    }
}

/* A module list (/etc/ptlab/modules, /etc/ptlab/modules.late) names paths under
 * /lib/modules/<kver>/, in dependency order. */
static void modules(const char *list)
{
    char kver[128] = {0}, line[512], path[768];
    FILE *f = fopen("/etc/ptlab/kernel_version", "r");
    if (!f || !fgets(kver, sizeof kver, f)) {
        say("no /etc/ptlab/kernel_version: no modules loaded");
        if (f)
            fclose(f);
        return;
    }
    fclose(f);
    kver[strcspn(kver, "\n")] = 0;
    f = fopen(list, "r");
    if (!f)
        return;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (!line[0])
            continue;
        snprintf(path, sizeof path, "/lib/modules/%s/%s", kver, line);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) && errno != EEXIST))
            say("insmod %s failed: %s", line, strerror(errno));
        if (fd >= 0)
            close(fd);
        const char *base = strrchr(line, '/');
        stamp(base ? base + 1 : line);
    }
    fclose(f);
}

static int set_flags_up(int s, const char *ifname)
{
    struct ifreq ifr = {0};
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFFLAGS, &ifr))
        return -1;
    ifr.ifr_flags |= IFF_UP;
    return ioctl(s, SIOCSIFFLAGS, &ifr);
}

static int set_addr(int s, const char *ifname, unsigned long req, const char *addr)
{
    struct ifreq ifr = {0};
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    sin->sin_family = AF_INET;
    inet_pton(AF_INET, addr, &sin->sin_addr);
    return ioctl(s, req, &ifr);
}

static int default_route(int s, const char *gateway)
{
    struct rtentry rt = {0};
    struct sockaddr_in *gw = (struct sockaddr_in *)&rt.rt_gateway;
    ((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
    ((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
    gw->sin_family = AF_INET;
    inet_pton(AF_INET, gateway, &gw->sin_addr);
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    return ioctl(s, SIOCADDRT, &rt);
}

/* QEMU user networking (slirp) defaults: 10.0.2.15/24 via 10.0.2.2. */
static void network(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        say("socket: %s", strerror(errno));
        return;
    }
    if (set_flags_up(s, "lo"))
        say("lo up: %s", strerror(errno));
    struct stat st;
    for (int i = 0; i < 500 && stat("/sys/class/net/eth0", &st); i++)
        usleep(10000);
    if (set_flags_up(s, "eth0"))
        say("no eth0: %s", strerror(errno));
    else if (set_addr(s, "eth0", SIOCSIFADDR, GUEST_ADDR) ||
             set_addr(s, "eth0", SIOCSIFNETMASK, GUEST_MASK) || default_route(s, GATEWAY))
        say("eth0 %s/24 via %s: %s", GUEST_ADDR, GATEWAY, strerror(errno));
    close(s);
}

static int b64_value(int c)
{
    const char *alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const char *p = c ? strchr(alphabet, c) : NULL;
    return p ? (int)(p - alphabet) : -1;
}

/* ptlab.key=<base64 of the OpenSSH public key line> on the kernel command line. */
static void ssh_key(void)
{
    char cmdline[4096] = {0}, key[2048];
    FILE *f = fopen("/proc/cmdline", "r");
    if (f) {
        if (!fgets(cmdline, sizeof cmdline, f))
            cmdline[0] = 0;
        fclose(f);
    }
    char *arg = strstr(cmdline, "ptlab.key=");
    if (!arg) {
        say("no ptlab.key= on the command line: SSH has no key");
        return;
    }
    size_t n = 0;
    unsigned acc = 0;
    int bits = 0;
    for (char *p = arg + strlen("ptlab.key="); *p && *p != ' ' && *p != '\n'; p++) {
        int v = b64_value(*p);
        if (v < 0)
            continue; /* '=' padding */
        acc = acc << 6 | (unsigned)v;
        bits += 6;
        if (bits >= 8 && n < sizeof key - 2) {
            bits -= 8;
            key[n++] = (char)(acc >> bits & 0xff);
        }
    }
    key[n++] = '\n';
    chmod("/root", 0700);
    mkdir("/root/.ssh", 0700);
    int fd = open("/root/.ssh/authorized_keys", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, key, n) != (ssize_t)n)
        say("authorized_keys: %s", strerror(errno));
    if (fd >= 0)
        close(fd);
}

/* `path` with `argv` in a child: its pid, or -1. */
static pid_t spawn(const char *path, char *const argv[])
{
    pid_t pid = fork();
    if (pid == 0) {
        execv(path, argv);
        _exit(127);
    }
    return pid;
}

/* Does a TCP socket listen on `port` (/proc/net/tcp{,6}: local address ends ":PORT", state
 * 0A = TCP_LISTEN)? */
static int listening(unsigned port)
{
    static const char *const tables[] = {"/proc/net/tcp", "/proc/net/tcp6"};
    char want[8], line[256], local[64];
    snprintf(want, sizeof want, ":%04X", port);
    for (size_t i = 0; i < sizeof tables / sizeof tables[0]; i++) {
        FILE *f = fopen(tables[i], "r");
        if (!f)
            continue;
        int found = 0;
        unsigned state;
        while (!found && fgets(line, sizeof line, f)) {
            size_t n;
            found = sscanf(line, " %*d: %63s %*s %x", local, &state) == 2 && state == 0x0A &&
                    (n = strlen(local)) >= 5 && !strcmp(local + n - 5, want);
        }
        fclose(f);
        if (found)
            return 1;
    }
    return 0;
}

/* dropbear in the foreground as our child (no daemon fork), then wait until it listens:
 * PTLAB-READY promises an SSH server that accepts connections. argv[0] is a bare name that
 * does not open from our cwd (/): dropbear (2022.82 on) re-executes itself from argv[0] for
 * every connection (ASLR; "-2 FD" in the child's argv) unless it cannot open that file, and the
 * re-exec costs a TCG guest ~0.1 s per SSH session; it then just forks. No -s: the image's
 * dropbear has password logins compiled out (harness/ptharness/image_dropbear.py). */
static void sshd(void)
{
    char *dropbear[] = {"dropbear", "-F", "-r", "/etc/dropbear/host_key", "-p", "22",
                        "-P", "/run/dropbear/dropbear.pid", NULL};
    pid_t pid = spawn("/usr/sbin/dropbear", dropbear);
    if (pid < 0) {
        say("dropbear: fork: %s", strerror(errno));
        return;
    }
    for (int i = 0; i < 2000; i++) { /* 10 s */
        if (listening(22))
            return;
        if (waitpid(pid, NULL, WNOHANG) == pid) {
            say("dropbear exited before listening");
            return;
        }
        usleep(5000);
    }
    say("dropbear does not listen on port 22 after 10 s");
}

/* The modules SSH does not need (/etc/ptlab/modules.late: virtio_mem, qemu_fw_cfg) load in a
 * child at SCHED_IDLE, so they take only vCPU time the first SSH session leaves idle; the
 * harness waits for the "late modules" line before it hands the guest out. */
static void late_modules(void)
{
    if (fork() != 0)
        return;
    struct sched_param sp = {0};
    if (sched_setscheduler(0, SCHED_IDLE, &sp))
        say("SCHED_IDLE: %s", strerror(errno));
    stamps[0] = 0;
    modules("/etc/ptlab/modules.late");
    say("late modules loaded:%s", stamps);
    _exit(0);
}

int ptinit_main(void)
{
    say("running /init"); /* the harness's wall-clock mark for "the kernel ran /init" */
    setenv("PATH", "/bin:/sbin:/usr/bin:/usr/sbin", 1);
    setenv("HOME", "/root", 1);
    mounts();
    stamp("init");
    modules("/etc/ptlab/modules");
    stamp("modules");
    network();
    stamp("net");
    ssh_key();
    stamp("keys");
    if (agent_daemon_start()) /* `ptagent serve -d` without its exec: this binary is ptagent */
        say("ptagent serve failed");
    stamp("agent");
    sshd();
    stamp("sshd");
    say("uptime%s", stamps);
    puts("PTLAB-READY");
    fflush(stdout);
    late_modules();
    /* The harness connects now: leave the (single) vCPU to dropbear and the agent for the
     * first SSH session, then install the applet symlinks and start the console shell,
     * both only for interactive use. */
    sleep(2);
    char *install[] = {"/bin/busybox", "--install", "-s", NULL};
    if (fork() == 0) {
        execv(install[0], install);
        _exit(127);
    }
    char *console[] = {"/bin/busybox", "sh", "/etc/ptlab/console", NULL};
    execv(console[0], console);
    say("exec %s: %s", console[0], strerror(errno));
    for (;;) /* pid 1 must not exit */
        pause();
}
