/*
 * ptagent: the ptlab guest agent. Run as `ptagent CMD ARGS...` (over SSH); prints exactly
 * one JSON object on one line; exit status 0 on success, 1 on an error reply
 * ({"error": "...", "errno": N}). See PROTOCOL.md.
 *
 * Commands that hold state across SSH sessions (secretmem, mmap, mprotect, canary, pin,
 * release, list, ping) are forwarded to `ptagent serve`, a daemon started by /init that
 * keeps the mappings alive; it listens on a unix socket (/run/ptagent.sock). The other
 * commands run in the calling process.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "ptinit.h"

#ifndef SYS_memfd_secret
#define SYS_memfd_secret 447
#endif
#ifndef SYS_finit_module
#error "finit_module syscall number unknown"
#endif
#ifndef SYS_delete_module
#error "delete_module syscall number unknown"
#endif

#define DEFAULT_SOCK "/run/ptagent.sock"
#define MAX_PAGES 262144          /* 1 GiB of 4 KiB pages per request */
#define MAX_OBJECTS 4096
#define MAX_REQUEST 65536
#define MAX_CLIENTS 32             /* connections the daemon serves at once */
#define MEM_RESERVE (64 << 20)    /* bytes a new object must leave of MemAvailable */
#define SERVER_IO_TIMEOUT_S 5
#define CLIENT_TIMEOUT_S 60

/* ---------------------------------------------------------------- JSON output */

struct out {
    char *buf;
    size_t len, cap;
    int err;                      /* errno of an error reply, 0 otherwise */
};

static void out_reserve(struct out *o, size_t extra)
{
    if (o->len + extra + 1 <= o->cap)
        return;
    size_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + extra + 1)
        cap *= 2;
    char *b = realloc(o->buf, cap);
    if (!b) {
        fputs("{\"error\": \"out of memory\", \"errno\": 12}\n", stdout);
        exit(1);
    }
    o->buf = b;
    o->cap = cap;
}

__attribute__((format(printf, 2, 3)))
static void jp(struct out *o, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    out_reserve(o, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(o->buf + o->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    o->len += (size_t)n;
}

/* A JSON string literal (quoted, escaped; invalid bytes as \u00XX). */
static void jstr(struct out *o, const char *s)
{
    jp(o, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            jp(o, "\\%c", *p);
        else if (*p == '\n')
            jp(o, "\\n");
        else if (*p == '\t')
            jp(o, "\\t");
        else if (*p < 0x20 || *p >= 0x7f)
            jp(o, "\\u%04x", *p);
        else
            jp(o, "%c", *p);
    }
    jp(o, "\"");
}

__attribute__((format(printf, 3, 4)))
static int fail(struct out *o, int err, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    o->len = 0;
    o->err = err ? err : EINVAL;
    jp(o, "{\"error\": ");
    jstr(o, msg);
    jp(o, ", \"errno\": %d}", o->err);
    return -1;
}

/* ---------------------------------------------------------------- small helpers */

static int parse_u64(const char *s, unsigned long long *v)
{
    char *end;
    if (!s || !*s || *s == '-')
        return -1;
    errno = 0;
    *v = strtoull(s, &end, 0);
    return (errno || *end) ? -1 : 0;
}

static int read_file(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t n = 0;
    while (n + 1 < size) {
        ssize_t r = read(fd, buf + n, size - 1 - n);
        if (r < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    buf[n] = 0;
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = 0;
    return (int)n;
}

static int write_file(const char *path, const char *s)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t r = write(fd, s, strlen(s));
    int e = errno;
    close(fd);
    errno = e;
    return r < 0 ? -1 : 0;
}

static long page_size(void)
{
    return sysconf(_SC_PAGESIZE);
}

/* PFN of the page mapped at va (from /proc/self/pagemap), or -1 if not present. */
static long long va_to_pfn(int pm, uintptr_t va)
{
    uint64_t e;
    off_t off = (off_t)(va / (uintptr_t)page_size()) * 8;
    if (pread(pm, &e, sizeof e, off) != sizeof e)
        return -1;
    if (!(e & (1ULL << 63)))
        return -1;
    return (long long)(e & ((1ULL << 55) - 1));
}

static int emit_pfns(struct out *o, uintptr_t va, long pages)
{
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0)
        return fail(o, errno, "open /proc/self/pagemap: %s", strerror(errno));
    jp(o, "\"pfns\": [");
    for (long i = 0; i < pages; i++) {
        long long pfn = va_to_pfn(pm, va + (uintptr_t)i * (uintptr_t)page_size());
        if (pfn < 0)
            jp(o, "%snull", i ? ", " : "");
        else
            jp(o, "%s%lld", i ? ", " : "", pfn);
    }
    jp(o, "]");
    close(pm);
    return 0;
}

/* "none" or any of r, w, x (e.g. "rw", "r-x"). */
static int parse_prot(const char *s, int *prot)
{
    if (!s || !*s)
        return -1;
    if (!strcmp(s, "none")) {
        *prot = PROT_NONE;
        return 0;
    }
    *prot = 0;
    for (const char *p = s; *p; p++) {
        if (*p == 'r')
            *prot |= PROT_READ;
        else if (*p == 'w')
            *prot |= PROT_WRITE;
        else if (*p == 'x')
            *prot |= PROT_EXEC;
        else if (*p != '-')
            return -1;
    }
    return 0;
}

static const char *prot_str(int prot, char buf[4])
{
    buf[0] = prot & PROT_READ ? 'r' : '-';
    buf[1] = prot & PROT_WRITE ? 'w' : '-';
    buf[2] = prot & PROT_EXEC ? 'x' : '-';
    buf[3] = 0;
    return buf;
}

/* ---------------------------------------------------------------- held objects (daemon) */

enum kind { K_SECRETMEM, K_MMAP, K_CANARY, K_PIN };
static const char *kind_names[] = {"secretmem", "mmap", "canary", "pin"};

struct object {
    int id;                       /* 0 = free slot */
    enum kind kind;
    void *va;
    long pages;
    int fd;                       /* memfd_secret fd, -1 otherwise */
    int prot;
};

static struct object objects[MAX_OBJECTS];
static int next_id = 1;

static struct object *new_object(void)
{
    for (int i = 0; i < MAX_OBJECTS; i++)
        if (!objects[i].id) {
            objects[i].id = next_id++;
            objects[i].fd = -1;
            return &objects[i];
        }
    return NULL;
}

static struct object *find_object(const char *arg)
{
    unsigned long long id;
    if (parse_u64(arg, &id))
        return NULL;
    for (int i = 0; i < MAX_OBJECTS; i++)
        if (objects[i].id && (unsigned long long)objects[i].id == id)
            return &objects[i];
    return NULL;
}

static void drop_object(struct object *ob)
{
    if (ob->va)
        munmap(ob->va, (size_t)ob->pages * (size_t)page_size());
    if (ob->fd >= 0)
        close(ob->fd);
    memset(ob, 0, sizeof *ob);
}

/* MemAvailable from /proc/meminfo in bytes, or -1. */
static long long mem_available(void)
{
    char buf[4096];
    if (read_file("/proc/meminfo", buf, sizeof buf) < 0)
        return -1;
    const char *p = strstr(buf, "MemAvailable:");
    unsigned long long kib;
    if (!p || sscanf(p + 13, "%llu", &kib) != 1)
        return -1;
    return (long long)(kib * 1024);
}

/* A page count for a new held object: 1..MAX_PAGES, and (all of it gets populated) no more
 * than MemAvailable less MEM_RESERVE, so that a huge N is an ENOMEM reply, not the OOM killer
 * taking the daemon or sshd. */
static int get_pages(struct out *o, const char *arg, long *pages)
{
    unsigned long long n;
    if (parse_u64(arg, &n) || n == 0 || n > MAX_PAGES)
        return fail(o, EINVAL, "page count must be 1..%d, got '%s'", MAX_PAGES,
                    arg ? arg : "");
    long long avail = mem_available();
    long long want = (long long)n * page_size();
    if (avail >= 0 && want > avail - MEM_RESERVE)
        return fail(o, ENOMEM, "%llu pages (%lld MiB) exceed MemAvailable %lld MiB less a "
                    "%d MiB reserve", n, want >> 20, avail >> 20, MEM_RESERVE >> 20);
    *pages = (long)n;
    return 0;
}

static sigjmp_buf touch_fault;

static void on_touch_fault(int sig)
{
    siglongjmp(touch_fault, sig);
}

/* Write each page once so that it is allocated (and, for secretmem, removed from the direct
 * map). A page the kernel refuses to fault in (SIGBUS, e.g. a secretmem fault the kernel
 * fails) must not kill the daemon and every object it holds: returns the index of that
 * page, or -1 when all were touched. */
static long touch_pages(void *va, long pages)
{
    struct sigaction sa = {.sa_handler = on_touch_fault}, old_bus, old_segv;
    volatile long i = 0;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &old_bus);
    sigaction(SIGSEGV, &sa, &old_segv);
    if (sigsetjmp(touch_fault, 1) == 0) {
        for (; i < pages; i++)
            *(volatile uint64_t *)((char *)va + i * page_size()) =
                0x70746c6162000000ULL | (uint64_t)i;
        i = -1;
    }
    sigaction(SIGBUS, &old_bus, NULL);
    sigaction(SIGSEGV, &old_segv, NULL);
    return i;
}

static int object_reply(struct out *o, struct object *ob)
{
    char pb[4];
    jp(o, "{\"id\": %d, \"kind\": \"%s\", \"va\": %llu, \"pages\": %ld, \"prot\": \"%s\", ",
       ob->id, kind_names[ob->kind], (unsigned long long)(uintptr_t)ob->va, ob->pages,
       prot_str(ob->prot, pb));
    if (emit_pfns(o, (uintptr_t)ob->va, ob->pages))
        return -1;
    jp(o, "}");
    return 0;
}

static int cmd_secretmem(struct out *o, int argc, char **argv)
{
    long pages;
    if (argc != 2)
        return fail(o, EINVAL, "usage: secretmem N");
    if (get_pages(o, argv[1], &pages))
        return -1;
    int fd = (int)syscall(SYS_memfd_secret, O_CLOEXEC);
    if (fd < 0)
        return fail(o, errno, "memfd_secret: %s", strerror(errno));
    size_t size = (size_t)pages * (size_t)page_size();
    if (ftruncate(fd, (off_t)size)) {
        int e = errno;
        close(fd);
        return fail(o, e, "ftruncate secretmem: %s", strerror(e));
    }
    void *va = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (va == MAP_FAILED) {
        int e = errno;
        close(fd);
        return fail(o, e, "mmap secretmem: %s", strerror(e));
    }
    long bad = touch_pages(va, pages);
    if (bad >= 0) {
        munmap(va, size);
        close(fd);
        return fail(o, EFAULT, "secretmem: the kernel refused page %ld of %ld (SIGBUS)", bad,
                    pages);
    }
    struct object *ob = new_object();
    if (!ob) {
        munmap(va, size);
        close(fd);
        return fail(o, ENOSPC, "too many held objects (%d)", MAX_OBJECTS);
    }
    ob->kind = K_SECRETMEM;
    ob->va = va;
    ob->pages = pages;
    ob->fd = fd;
    ob->prot = PROT_READ | PROT_WRITE;
    return object_reply(o, ob);
}

static int cmd_mmap(struct out *o, int argc, char **argv)
{
    long pages;
    int prot;
    if (argc != 3)
        return fail(o, EINVAL, "usage: mmap N PROT (PROT: none or letters of rwx)");
    if (get_pages(o, argv[1], &pages))
        return -1;
    if (parse_prot(argv[2], &prot))
        return fail(o, EINVAL, "bad protection '%s' (none or letters of rwx)", argv[2]);
    size_t size = (size_t)pages * (size_t)page_size();
    void *va = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (va == MAP_FAILED)
        return fail(o, errno, "mmap: %s", strerror(errno));
    touch_pages(va, pages);
    if (mprotect(va, size, prot)) {
        int e = errno;
        munmap(va, size);
        return fail(o, e, "mprotect: %s", strerror(e));
    }
    struct object *ob = new_object();
    if (!ob) {
        munmap(va, size);
        return fail(o, ENOSPC, "too many held objects (%d)", MAX_OBJECTS);
    }
    ob->kind = K_MMAP;
    ob->va = va;
    ob->pages = pages;
    ob->prot = prot;
    return object_reply(o, ob);
}

static int cmd_mprotect(struct out *o, int argc, char **argv)
{
    int prot;
    if (argc != 3)
        return fail(o, EINVAL, "usage: mprotect ID PROT");
    struct object *ob = find_object(argv[1]);
    if (!ob)
        return fail(o, ENOENT, "no held object with id '%s'", argv[1]);
    if (parse_prot(argv[2], &prot))
        return fail(o, EINVAL, "bad protection '%s' (none or letters of rwx)", argv[2]);
    if (mprotect(ob->va, (size_t)ob->pages * (size_t)page_size(), prot))
        return fail(o, errno, "mprotect: %s", strerror(errno));
    ob->prot = prot;
    return object_reply(o, ob);
}

/* N anonymous pages, populated and mlocked: guest RAM the host may write (e.g. page
 * tables for the vCPU) while the daemon holds them. */
static int cmd_pin(struct out *o, int argc, char **argv)
{
    long pages;
    if (argc != 2)
        return fail(o, EINVAL, "usage: pin N");
    if (get_pages(o, argv[1], &pages))
        return -1;
    size_t size = (size_t)pages * (size_t)page_size();
    void *va = mmap(NULL, size, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (va == MAP_FAILED)
        return fail(o, errno, "mmap: %s", strerror(errno));
    touch_pages(va, pages);
    if (mlock(va, size)) {
        int e = errno;
        munmap(va, size);
        return fail(o, e, "mlock: %s", strerror(e));
    }
    struct object *ob = new_object();
    if (!ob) {
        munmap(va, size);
        return fail(o, ENOSPC, "too many held objects (%d)", MAX_OBJECTS);
    }
    ob->kind = K_PIN;
    ob->va = va;
    ob->pages = pages;
    ob->prot = PROT_READ | PROT_WRITE;
    return object_reply(o, ob);
}

static int cmd_canary(struct out *o, int argc, char **argv)
{
    (void)argv;
    unsigned char pat[64];
    if (argc != 1)
        return fail(o, EINVAL, "usage: canary");
    if (getrandom(pat, sizeof pat, 0) != (ssize_t)sizeof pat)
        return fail(o, errno, "getrandom: %s", strerror(errno));
    size_t size = (size_t)page_size();
    void *va = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (va == MAP_FAILED)
        return fail(o, errno, "mmap: %s", strerror(errno));
    memcpy(va, pat, sizeof pat);
    mlock(va, size);
    struct object *ob = new_object();
    if (!ob) {
        munmap(va, size);
        return fail(o, ENOSPC, "too many held objects (%d)", MAX_OBJECTS);
    }
    ob->kind = K_CANARY;
    ob->va = va;
    ob->pages = 1;
    ob->prot = PROT_READ | PROT_WRITE;
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    long long pfn = pm >= 0 ? va_to_pfn(pm, (uintptr_t)va) : -1;
    if (pm >= 0)
        close(pm);
    if (pfn < 0) {
        drop_object(ob);
        return fail(o, EIO, "canary page has no PFN in /proc/self/pagemap");
    }
    jp(o, "{\"id\": %d, \"kind\": \"canary\", \"va\": %llu, \"pfn\": %lld, \"offset\": 0, "
       "\"pattern\": \"", ob->id, (unsigned long long)(uintptr_t)va, pfn);
    for (size_t i = 0; i < sizeof pat; i++)
        jp(o, "%02x", pat[i]);
    jp(o, "\"}");
    return 0;
}

static int cmd_release(struct out *o, int argc, char **argv)
{
    if (argc != 2)
        return fail(o, EINVAL, "usage: release ID|all");
    jp(o, "{\"released\": [");
    int n = 0;
    if (!strcmp(argv[1], "all")) {
        for (int i = 0; i < MAX_OBJECTS; i++)
            if (objects[i].id) {
                jp(o, "%s%d", n++ ? ", " : "", objects[i].id);
                drop_object(&objects[i]);
            }
    } else {
        struct object *ob = find_object(argv[1]);
        if (!ob)
            return fail(o, ENOENT, "no held object with id '%s'", argv[1]);
        jp(o, "%d", ob->id);
        drop_object(ob);
    }
    jp(o, "]}");
    return 0;
}

static int cmd_list(struct out *o, int argc, char **argv)
{
    (void)argv;
    char pb[4];
    if (argc != 1)
        return fail(o, EINVAL, "usage: list");
    jp(o, "{\"objects\": [");
    int n = 0;
    for (int i = 0; i < MAX_OBJECTS; i++) {
        struct object *ob = &objects[i];
        if (ob->id)
            jp(o, "%s{\"id\": %d, \"kind\": \"%s\", \"va\": %llu, \"pages\": %ld, "
               "\"prot\": \"%s\"}", n++ ? ", " : "", ob->id, kind_names[ob->kind],
               (unsigned long long)(uintptr_t)ob->va, ob->pages, prot_str(ob->prot, pb));
    }
    jp(o, "]}");
    return 0;
}

static time_t started;

static int cmd_ping(struct out *o, int argc, char **argv)
{
    (void)argv;
    if (argc != 1)
        return fail(o, EINVAL, "usage: ping");
    int n = 0;
    for (int i = 0; i < MAX_OBJECTS; i++)
        n += objects[i].id != 0;
    jp(o, "{\"pong\": true, \"pid\": %d, \"objects\": %d, \"uptime_s\": %lld}", (int)getpid(),
       n, (long long)(time(NULL) - started));
    return 0;
}

/* ---------------------------------------------------------------- stateless commands */

static const char *info_symbols[] = {
    "_text", "_stext", "_etext", "_sdata", "_edata", "_end", "__start_rodata", "__end_rodata",
    "__init_begin", "__init_end", "__entry_text_start", "__entry_text_end",
    "__entry_tramp_text_start", "__entry_tramp_text_end", "linux_banner", "init_mm",
    "swapper_pg_dir", "init_top_pgt", "level4_kernel_pgt", "tramp_pg_dir", "idmap_pg_dir",
    "reserved_pg_dir", "empty_zero_page", "page_offset_base", "vmalloc_base", "vmemmap_base",
    "phys_base", "kimage_voffset", "memstart_addr", "vectors", "tramp_vectors",
    "entry_SYSCALL_64", "cpu_entry_area", NULL,
};
/* Variables whose 8-byte value `info` reads through /proc/kcore when the symbol is known. */
static const char *info_vars[] = {
    "page_offset_base", "vmalloc_base", "vmemmap_base", "phys_base", "kimage_voffset",
    "memstart_addr", NULL,
};
#define N_SYMS (sizeof info_symbols / sizeof info_symbols[0])

static int kcore_read(uint64_t va, void *buf, size_t len)
{
    int fd = open("/proc/kcore", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    Elf64_Ehdr eh;
    int rc = -1;
    errno = EFAULT;
    if (pread(fd, &eh, sizeof eh, 0) != sizeof eh || memcmp(eh.e_ident, ELFMAG, SELFMAG)) {
        errno = EIO;
        goto out;
    }
    for (int i = 0; i < eh.e_phnum; i++) {
        Elf64_Phdr ph;
        if (pread(fd, &ph, sizeof ph, (off_t)(eh.e_phoff + (uint64_t)i * eh.e_phentsize))
            != sizeof ph)
            break;
        if (ph.p_type == PT_LOAD && va >= ph.p_vaddr && va - ph.p_vaddr + len <= ph.p_memsz) {
            ssize_t r = pread(fd, buf, len, (off_t)(ph.p_offset + (va - ph.p_vaddr)));
            if (r == (ssize_t)len)
                rc = 0;
            else if (r >= 0)
                errno = EIO;
            goto out;
        }
    }
out:;
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

static void info_ram(struct out *o)
{
    FILE *f = fopen("/proc/iomem", "re");
    jp(o, "\"system_ram\": [");
    if (f) {
        char line[256];
        int n = 0;
        while (fgets(line, sizeof line, f)) {
            unsigned long long a, b;
            char name[200];
            if (line[0] == ' ')
                continue;
            if (sscanf(line, "%llx-%llx : %199[^\n]", &a, &b, name) == 3 &&
                !strcmp(name, "System RAM"))
                jp(o, "%s{\"start\": %llu, \"end\": %llu}", n++ ? ", " : "", a, b + 1);
        }
        fclose(f);
    }
    jp(o, "]");
}

static int cmd_info(struct out *o, int argc, char **argv)
{
    (void)argv;
    if (argc != 1)
        return fail(o, EINVAL, "usage: info");
    struct utsname u;
    uname(&u);
    char buf[4096];
    jp(o, "{\"uname\": {\"sysname\": ");
    jstr(o, u.sysname);
    jp(o, ", \"release\": ");
    jstr(o, u.release);
    jp(o, ", \"version\": ");
    jstr(o, u.version);
    jp(o, ", \"machine\": ");
    jstr(o, u.machine);
    jp(o, ", \"nodename\": ");
    jstr(o, u.nodename);
    jp(o, "}, \"page_size\": %ld, \"cmdline\": ", page_size());
    jstr(o, read_file("/proc/cmdline", buf, sizeof buf) >= 0 ? buf : "");

    unsigned long long pa, size;
    if (read_file("/sys/kernel/vmcoreinfo", buf, sizeof buf) >= 0 &&
        sscanf(buf, "%llx %llx", &pa, &size) == 2)
        jp(o, ", \"vmcoreinfo\": {\"paddr\": %llu, \"size\": %llu}", pa, size);
    else
        jp(o, ", \"vmcoreinfo\": null");

    unsigned long long addr[N_SYMS] = {0};
    int have[N_SYMS] = {0};
    FILE *f = fopen("/proc/kallsyms", "re");
    int nonzero = 0;
    if (f) {
        /* ~150k lines "ADDR T NAME" ("ADDR t NAME\t[MODULE]" for modules): split by hand and
           compare a name only with symbols of its length (sscanf and a strcmp per symbol
           made `info` take 0.8 s of guest CPU under TCG) */
        size_t len[N_SYMS];
        for (size_t i = 0; info_symbols[i]; i++)
            len[i] = strlen(info_symbols[i]);
        char line[512];
        while (fgets(line, sizeof line, f)) {
            char *sp = strchr(line, ' ');
            if (!sp || !sp[1] || sp[2] != ' ')
                continue;
            char *name = sp + 3;
            size_t n = strcspn(name, "\t\n");
            if (name[n] == '\t' || n == 0)
                continue;       /* a module's symbol */
            if (!nonzero)
                nonzero = strspn(line, "0") < (size_t)(sp - line);
            for (size_t i = 0; info_symbols[i]; i++)
                if (!have[i] && len[i] == n && !memcmp(name, info_symbols[i], n)) {
                    have[i] = 1;
                    addr[i] = strtoull(line, NULL, 16);
                }
        }
        fclose(f);
    }
    jp(o, ", \"kallsyms_visible\": %s, \"kallsyms\": {", nonzero ? "true" : "false");
    int n = 0;
    for (size_t i = 0; info_symbols[i]; i++)
        if (have[i])
            jp(o, "%s\"%s\": %llu", n++ ? ", " : "", info_symbols[i], addr[i]);
    jp(o, "}, \"kvars\": {");
    n = 0;
    for (size_t v = 0; info_vars[v]; v++)
        for (size_t i = 0; info_symbols[i]; i++) {
            uint64_t val;
            if (have[i] && addr[i] && !strcmp(info_symbols[i], info_vars[v]) &&
                !kcore_read(addr[i], &val, sizeof val))
                jp(o, "%s\"%s\": %llu", n++ ? ", " : "", info_vars[v],
                   (unsigned long long)val);
        }
    jp(o, "}, ");
    info_ram(o);
    jp(o, "}");
    return 0;
}

static int cmd_kread(struct out *o, int argc, char **argv)
{
    unsigned long long va, len;
    if (argc != 3 || parse_u64(argv[1], &va) || parse_u64(argv[2], &len) || len == 0 ||
        len > 4096)
        return fail(o, EINVAL, "usage: kread VA LEN (LEN 1..4096)");
    unsigned char buf[4096];
    if (kcore_read(va, buf, (size_t)len))
        return fail(o, errno, "read /proc/kcore at %#llx: %s", va, strerror(errno));
    jp(o, "{\"va\": %llu, \"hex\": \"", va);
    for (size_t i = 0; i < len; i++)
        jp(o, "%02x", buf[i]);
    jp(o, "\"}");
    return 0;
}

#define MEMDIR "/sys/devices/system/memory"

static int cmd_memblocks(struct out *o, int argc, char **argv)
{
    (void)argv;
    if (argc != 1)
        return fail(o, EINVAL, "usage: memblocks");
    char buf[256], path[512];
    unsigned long long bs;
    if (read_file(MEMDIR "/block_size_bytes", buf, sizeof buf) < 0)
        return fail(o, errno, "read " MEMDIR "/block_size_bytes: %s", strerror(errno));
    if (sscanf(buf, "%llx", &bs) != 1 || !bs)
        return fail(o, EIO, "bad block_size_bytes '%s'", buf);
    DIR *d = opendir(MEMDIR);
    if (!d)
        return fail(o, errno, "opendir " MEMDIR ": %s", strerror(errno));
    /* collect ids, sort, then print */
    unsigned long *ids = NULL;
    size_t n = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        unsigned long id;
        char tail;
        if (sscanf(de->d_name, "memory%lu%c", &id, &tail) != 1)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            unsigned long *p = realloc(ids, cap * sizeof *ids);
            if (!p) {
                free(ids);
                closedir(d);
                return fail(o, ENOMEM, "out of memory");
            }
            ids = p;
        }
        ids[n++] = id;
    }
    closedir(d);
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && ids[j - 1] > ids[j]; j--) {
            unsigned long t = ids[j];
            ids[j] = ids[j - 1];
            ids[j - 1] = t;
        }
    jp(o, "{\"block_size\": %llu, \"blocks\": [", bs);
    for (size_t i = 0; i < n; i++) {
        snprintf(path, sizeof path, MEMDIR "/memory%lu/state", ids[i]);
        if (read_file(path, buf, sizeof buf) < 0)
            snprintf(buf, sizeof buf, "unknown");
        jp(o, "%s{\"id\": %lu, \"start\": %llu, \"state\": ", i ? ", " : "", ids[i],
           (unsigned long long)ids[i] * bs);
        jstr(o, buf);
        snprintf(path, sizeof path, MEMDIR "/memory%lu/removable", ids[i]);
        if (read_file(path, buf, sizeof buf) >= 0)
            jp(o, ", \"removable\": %s", buf[0] == '1' ? "true" : "false");
        snprintf(path, sizeof path, MEMDIR "/memory%lu/valid_zones", ids[i]);
        if (read_file(path, buf, sizeof buf) >= 0) {
            jp(o, ", \"zones\": ");
            jstr(o, buf);
        }
        jp(o, "}");
    }
    jp(o, "]}");
    free(ids);
    return 0;
}

static int cmd_online(struct out *o, int argc, char **argv, int online)
{
    unsigned long long b;
    const char *how = online ? "online" : "offline";
    if (online && argc == 3)
        how = argv[2];
    if (argc != 2 && !(online && argc == 3))
        return fail(o, EINVAL, online ? "usage: online BLOCK [online|online_kernel|"
                                        "online_movable]" : "usage: offline BLOCK");
    if (parse_u64(argv[1], &b))
        return fail(o, EINVAL, "bad block number '%s'", argv[1]);
    if (strcmp(how, "online") && strcmp(how, "online_kernel") && strcmp(how, "online_movable") &&
        strcmp(how, "offline"))
        return fail(o, EINVAL, "bad online type '%s'", how);
    char path[256], buf[64];
    snprintf(path, sizeof path, MEMDIR "/memory%llu/state", b);
    if (access(path, F_OK))
        return fail(o, ENOENT, "no memory block %llu", b);
    if (write_file(path, how))
        return fail(o, errno, "%s memory block %llu: %s", how, b, strerror(errno));
    if (read_file(path, buf, sizeof buf) < 0)
        snprintf(buf, sizeof buf, "unknown");
    jp(o, "{\"block\": %llu, \"state\": ", b);
    jstr(o, buf);
    jp(o, "}");
    return 0;
}

static int cmd_insmod(struct out *o, int argc, char **argv)
{
    if (argc < 2)
        return fail(o, EINVAL, "usage: insmod PATH [PARAM=VALUE...]");
    char params[4096] = "";
    for (int i = 2; i < argc; i++) {
        if (strlen(params) + strlen(argv[i]) + 2 > sizeof params)
            return fail(o, E2BIG, "module parameters too long");
        if (i > 2)
            strcat(params, " ");
        strcat(params, argv[i]);
    }
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(o, errno, "open %s: %s", argv[1], strerror(errno));
    long r = syscall(SYS_finit_module, fd, params, 0);
    int e = errno;
    close(fd);
    if (r)
        return fail(o, e, "finit_module %s: %s", argv[1], strerror(e));
    jp(o, "{\"loaded\": ");
    jstr(o, argv[1]);
    jp(o, "}");
    return 0;
}

static int cmd_rmmod(struct out *o, int argc, char **argv)
{
    if (argc != 2 || !argv[1][0] || strlen(argv[1]) >= 64 || strchr(argv[1], '/'))
        return fail(o, EINVAL, "usage: rmmod NAME");
    if (syscall(SYS_delete_module, argv[1], O_NONBLOCK))
        return fail(o, errno, "delete_module %s: %s", argv[1], strerror(errno));
    jp(o, "{\"removed\": ");
    jstr(o, argv[1]);
    jp(o, "}");
    return 0;
}

/* ---------------------------------------------------------------- dispatch */

struct command {
    const char *name;
    int held;                     /* 1: runs in the daemon (state across sessions) */
    int (*fn)(struct out *, int, char **);
};

static int cmd_offline(struct out *o, int argc, char **argv) { return cmd_online(o, argc, argv, 0); }
static int cmd_online1(struct out *o, int argc, char **argv) { return cmd_online(o, argc, argv, 1); }

static const struct command commands[] = {
    {"info", 0, cmd_info},           {"kread", 0, cmd_kread},
    {"memblocks", 0, cmd_memblocks}, {"online", 0, cmd_online1},
    {"offline", 0, cmd_offline},     {"insmod", 0, cmd_insmod},
    {"rmmod", 0, cmd_rmmod},
    {"secretmem", 1, cmd_secretmem}, {"mmap", 1, cmd_mmap},
    {"mprotect", 1, cmd_mprotect},   {"canary", 1, cmd_canary},
    {"release", 1, cmd_release},     {"list", 1, cmd_list},
    {"ping", 1, cmd_ping},           {"pin", 1, cmd_pin},
    {NULL, 0, NULL},
};

static const struct command *lookup(const char *name)
{
    for (const struct command *c = commands; c->name; c++)
        if (!strcmp(c->name, name))
            return c;
    return NULL;
}

static void dispatch(struct out *o, int argc, char **argv)
{
    const struct command *c = argc > 0 ? lookup(argv[0]) : NULL;
    o->len = 0;
    o->err = 0;
    if (!c) {
        fail(o, EINVAL, "unknown command '%s'", argc > 0 ? argv[0] : "");
        return;
    }
    if (c->fn(o, argc, argv) == 0 && o->len == 0)
        fail(o, EIO, "command produced no reply");
}

/* ---------------------------------------------------------------- daemon and client */

static const char *sock_path(void)
{
    const char *p = getenv("PTAGENT_SOCK");
    return p && *p ? p : DEFAULT_SOCK;
}

/* ---- the daemon's event loop: every connection is served from one poll() loop, so a client
 * that never finishes its request (or never reads its reply) delays nobody; each gets
 * SERVER_IO_TIMEOUT_S for its request and as long again for its reply. */

struct client {
    int fd;                       /* -1: free slot */
    char *buf;                    /* the request (NUL-terminated), then the reply */
    size_t len, pos;              /* bytes held / reply bytes written */
    int replying;
    int in_eof;                   /* the client shut down its side of the request */
    long long deadline_ms;        /* CLOCK_MONOTONIC */
};

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Request: each argument NUL-terminated, then EOF (shutdown). Reply: one JSON line, EOF. */
static void run_request(struct out *o, char *req, size_t n)
{
    char *argv[256];
    int argc = 0;
    for (size_t i = 0; i < n && argc < 255;) {
        argv[argc++] = req + i;
        i += strlen(req + i) + 1;
    }
    argv[argc] = NULL;
    const struct command *c = argc ? lookup(argv[0]) : NULL;
    if (c && !c->held)
        fail(o, EINVAL, "command '%s' is not served by the daemon", argv[0]);
    else
        dispatch(o, argc, argv);
}

/* Turn client ``cl`` to replying with the reply in ``o`` (one line). */
static void start_reply(struct client *cl, struct out *o)
{
    jp(o, "\n");
    free(cl->buf);
    cl->buf = malloc(o->len);
    if (cl->buf)
        memcpy(cl->buf, o->buf, o->len);
    cl->len = cl->buf ? o->len : 0;
    cl->pos = 0;
    cl->replying = 1;
    cl->deadline_ms = now_ms() + SERVER_IO_TIMEOUT_S * 1000;
}

static void drop_client(struct client *cl)
{
    close(cl->fd);
    free(cl->buf);
    memset(cl, 0, sizeof *cl);
    cl->fd = -1;
}

static void client_read(struct client *cl, struct out *o)
{
    if (!cl->buf && !(cl->buf = malloc(MAX_REQUEST))) {
        fail(o, ENOMEM, "out of memory for the request");
        start_reply(cl, o);
        return;
    }
    ssize_t r = read(cl->fd, cl->buf + cl->len, MAX_REQUEST - 1 - cl->len);
    if (r < 0) {
        if (errno != EINTR && errno != EAGAIN)
            drop_client(cl);      /* reset by the peer: nobody to answer */
        return;
    }
    cl->len += (size_t)r;
    if (r == 0) {
        cl->in_eof = 1;
        cl->buf[cl->len] = 0;
        o->len = 0;
        run_request(o, cl->buf, cl->len);
        start_reply(cl, o);
    } else if (cl->len >= MAX_REQUEST - 1) {
        fail(o, E2BIG, "request longer than %d bytes", MAX_REQUEST - 2);
        start_reply(cl, o);
    }
}

/* Write the reply; read and discard whatever the client still sends (a request cut short
 * by E2BIG or the timeout: closing with unread bytes would reset the connection before the
 * client has read its reply). Done once the reply is out and the client's side is shut. */
static void client_write(struct client *cl, short revents)
{
    if ((revents & POLLOUT) && cl->pos < cl->len) {
        ssize_t w = write(cl->fd, cl->buf + cl->pos, cl->len - cl->pos);
        if (w < 0 && errno != EINTR && errno != EAGAIN) {
            drop_client(cl);
            return;
        }
        if (w > 0 && (cl->pos += (size_t)w) == cl->len)
            shutdown(cl->fd, SHUT_WR);
    }
    if ((revents & (POLLIN | POLLHUP | POLLERR)) && !cl->in_eof) {
        char sink[4096];
        ssize_t r = read(cl->fd, sink, sizeof sink);
        if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN))
            cl->in_eof = 1;
    }
    if (cl->pos == cl->len && cl->in_eof)
        drop_client(cl);
}

static void serve_loop(int lfd)
{
    static struct client clients[MAX_CLIENTS];
    struct pollfd pfd[MAX_CLIENTS + 1];
    struct out o = {0};
    for (int i = 0; i < MAX_CLIENTS; i++)
        clients[i].fd = -1;
    for (;;) {
        long long now = now_ms(), wait = -1;
        int free_slot = -1;
        for (int i = 0; i < MAX_CLIENTS; i++) {
            struct client *cl = &clients[i];
            if (cl->fd >= 0 && now >= cl->deadline_ms) {
                if (cl->replying) {
                    drop_client(cl);  /* the client does not read its reply or hang up */
                } else {
                    fail(&o, ETIMEDOUT, "no complete request within %d s (arguments "
                         "NUL-terminated, then shutdown)", SERVER_IO_TIMEOUT_S);
                    start_reply(cl, &o);
                }
            }
            pfd[i + 1].fd = cl->fd;
            pfd[i + 1].events = (short)((cl->replying && cl->pos < cl->len ? POLLOUT : 0) |
                                        (cl->in_eof ? 0 : POLLIN));
            pfd[i + 1].revents = 0;
            if (cl->fd < 0 && free_slot < 0)
                free_slot = i;
            if (cl->fd >= 0 && (wait < 0 || cl->deadline_ms - now < wait))
                wait = cl->deadline_ms - now;
        }
        pfd[0].fd = lfd;
        pfd[0].events = POLLIN;
        pfd[0].revents = 0;
        if (poll(pfd, MAX_CLIENTS + 1, (int)(wait < 0 ? -1 : wait + 1)) < 0) {
            if (errno != EINTR)
                sleep(1);
            continue;
        }
        for (int i = 0; i < MAX_CLIENTS; i++) {
            struct client *cl = &clients[i];
            if (cl->fd < 0 || !pfd[i + 1].revents)
                continue;
            if (cl->replying)
                client_write(cl, pfd[i + 1].revents);
            else
                client_read(cl, &o);
        }
        if (pfd[0].revents & POLLIN) {
            int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
            if (cfd < 0)
                continue;
            if (free_slot < 0) {
                char sink[4096];
                fail(&o, EBUSY, "the agent daemon serves %d clients already", MAX_CLIENTS);
                jp(&o, "\n");
                if (write(cfd, o.buf, o.len) < 0) {
                    /* nothing more to do for this client */
                }
                /* drop what already arrived: closing on unread bytes resets the connection
                 * before the client has read the reply */
                while (recv(cfd, sink, sizeof sink, MSG_DONTWAIT) > 0) {
                }
                close(cfd);
                continue;
            }
            clients[free_slot].fd = cfd;
            clients[free_slot].deadline_ms = now_ms() + SERVER_IO_TIMEOUT_S * 1000;
        }
    }
}

/* The daemon's listening socket (refused when a daemon answers there already): -1 with the
 * error in `o`. */
static int serve_listen(struct out *o)
{
    const char *path = sock_path();
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) {
        fail(o, ENAMETOOLONG, "socket path too long");
        return -1;
    }
    strcpy(sa.sun_path, path);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0) {
        fail(o, errno, "socket: %s", strerror(errno));
        return -1;
    }
    if (connect(lfd, (struct sockaddr *)&sa, sizeof sa) == 0) {
        fail(o, EADDRINUSE, "an agent daemon already serves %s", path);
        close(lfd);
        return -1;
    }
    close(lfd);
    lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0) {
        fail(o, errno, "socket: %s", strerror(errno));
        return -1;
    }
    unlink(path);
    mode_t old = umask(077);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) || listen(lfd, 16)) {
        umask(old);
        fail(o, errno, "bind/listen %s: %s", path, strerror(errno));
        close(lfd);
        return -1;
    }
    umask(old);
    return lfd;
}

/* The serving process's own settings (not its parent's: /init's would reach every later
 * process): SIGPIPE ignored, RLIMIT_MEMLOCK lifted, the start time. */
static void serve_setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    /* secretmem pages are locked memory: the kernel refuses to fault one in beyond
     * RLIMIT_MEMLOCK (8 MiB by default), whatever the capabilities. The daemon holds the
     * scenarios' secrets, so it lifts its own limit (root may); PTAGENT_MEMLOCK=BYTES sets
     * it instead (a test's way to make the kernel refuse a page). */
    struct rlimit memlock = {RLIM_INFINITY, RLIM_INFINITY};
    const char *cap = getenv("PTAGENT_MEMLOCK");
    unsigned long long bytes;
    if (cap && *cap && !parse_u64(cap, &bytes))
        memlock.rlim_cur = memlock.rlim_max = (rlim_t)bytes;
    setrlimit(RLIMIT_MEMLOCK, &memlock);
    started = time(NULL);
}

/* Serve `lfd` in a forked daemon (own session, stdio on /dev/null): its pid, or -1 with the
 * error in `o`. The caller's copy of `lfd` is closed either way. */
static pid_t serve_daemon(struct out *o, int lfd)
{
    pid_t pid = fork();
    if (pid < 0)
        fail(o, errno, "fork: %s", strerror(errno));
    if (pid != 0) {
        close(lfd);
        return pid;
    }
    setsid();
    prctl(PR_SET_NAME, "ptagent-serve");
    int nul = open("/dev/null", O_RDWR);
    if (nul >= 0) {
        dup2(nul, 0);
        dup2(nul, 1);
        dup2(nul, 2);
        if (nul > 2)
            close(nul);
    }
    serve_setup();
    serve_loop(lfd);
    _exit(0);
}

int agent_daemon_start(void)
{
    struct out o = {0};
    int lfd = serve_listen(&o);
    if (lfd >= 0 && serve_daemon(&o, lfd) > 0)
        return 0;
    jp(&o, "\n");
    fputs(o.buf, stdout); /* the console */
    return -1;
}

static int cmd_serve(int argc, char **argv)
{
    int daemonize = argc == 3 && !strcmp(argv[2], "-d");
    struct out o = {0};
    if (argc > 3 || (argc == 3 && !daemonize)) {
        fail(&o, EINVAL, "usage: ptagent serve [-d]");
        goto error;
    }
    int lfd = serve_listen(&o);
    if (lfd < 0)
        goto error;
    if (!daemonize) {
        serve_setup();
        serve_loop(lfd);
        return 1;
    }
    pid_t pid = serve_daemon(&o, lfd);
    if (pid < 0)
        goto error;
    printf("{\"serving\": \"%s\", \"pid\": %d}\n", sock_path(), (int)pid);
    return 0;
error:
    jp(&o, "\n");
    fputs(o.buf, stdout);
    return 1;
}

/* Send a request to the daemon and print its reply. The request is ``req`` (``len`` bytes)
 * or, if ``in_fd`` >= 0, whatever that descriptor yields until EOF (`ptagent raw`). The
 * daemon may answer before the request is complete (too long, too slow): sending then stops
 * and its reply is printed. Exit status 0 for a success reply, 1 for an error reply. */
static int talk(const char *req, size_t len, int in_fd)
{
    struct out o = {0};
    const char *path = sock_path();
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    static char reply[1 << 24], chunk[1 << 16];
    size_t off = 0, clen = 0, cpos = 0, n = 0;
    int sending = 1;
    signal(SIGPIPE, SIG_IGN);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || strlen(path) >= sizeof sa.sun_path) {
        fail(&o, fd < 0 ? errno : ENAMETOOLONG, "socket: %s", strerror(errno));
        goto print;
    }
    strcpy(sa.sun_path, path);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
        fail(&o, errno, "agent daemon not reachable at %s: %s (is `ptagent serve` running?)",
             path, strerror(errno));
        goto print;
    }
    fcntl(fd, F_SETFL, O_NONBLOCK);
    long long deadline = now_ms() + CLIENT_TIMEOUT_S * 1000;
    for (;;) {
        if (sending && in_fd < 0 && off == len) {
            sending = 0;
            shutdown(fd, SHUT_WR);
        }
        int from_in = sending && in_fd >= 0 && cpos == clen;
        struct pollfd p[2] = {
            {.fd = fd, .events = POLLIN | (sending && !from_in ? POLLOUT : 0)},
            {.fd = in_fd, .events = POLLIN},
        };
        long long left = deadline - now_ms();
        if (left <= 0) {
            fail(&o, ETIMEDOUT, "no reply from the agent daemon within %d s", CLIENT_TIMEOUT_S);
            goto print;
        }
        if (poll(p, from_in ? 2 : 1, (int)left) < 0) {
            if (errno == EINTR)
                continue;
            fail(&o, errno, "poll: %s", strerror(errno));
            goto print;
        }
        if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            if (n + 1 >= sizeof reply) {
                fail(&o, E2BIG, "reply from the agent daemon too long");
                goto print;
            }
            ssize_t r = read(fd, reply + n, sizeof reply - 1 - n);
            if (r == 0 || (r < 0 && errno == ECONNRESET && n && reply[n - 1] == '\n'))
                break;    /* EOF, or a reset after the whole reply line */
            if (r < 0 && errno != EAGAIN && errno != EINTR) {
                fail(&o, errno, "reading the daemon's reply: %s", strerror(errno));
                goto print;
            }
            if (r > 0) {
                n += (size_t)r;
                continue;
            }
        }
        if (from_in && p[1].revents) {
            ssize_t r = read(in_fd, chunk, sizeof chunk);
            if (r < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            if (r <= 0) {
                sending = 0;
                shutdown(fd, SHUT_WR);
            } else {
                clen = (size_t)r;
                cpos = 0;
            }
        } else if (sending && !from_in && (p[0].revents & POLLOUT)) {
            const char *b = in_fd >= 0 ? chunk + cpos : req + off;
            size_t blen = in_fd >= 0 ? clen - cpos : len - off;
            ssize_t w = write(fd, b, blen);
            if (w < 0 && errno != EAGAIN && errno != EINTR) {
                sending = 0;      /* the daemon stopped reading: its reply says why */
                shutdown(fd, SHUT_WR);
            } else if (w > 0) {
                *(in_fd >= 0 ? &cpos : &off) += (size_t)w;
            }
        }
    }
    reply[n] = 0;
    if (n == 0 || reply[n - 1] != '\n' || memchr(reply, '\n', n) != reply + n - 1) {
        fail(&o, EPROTO, "truncated or malformed reply from the agent daemon");
        goto print;
    }
    close(fd);
    fputs(reply, stdout);
    return strncmp(reply, "{\"error\"", 8) ? 0 : 1;
print:
    if (fd >= 0)
        close(fd);
    jp(&o, "\n");
    fputs(o.buf, stdout);
    return 1;
}

/* A held command: its arguments, each NUL-terminated, are the request. */
static int forward(int argc, char **argv)
{
    size_t len = 0;
    for (int i = 1; i < argc; i++)
        len += strlen(argv[i]) + 1;
    char *req = malloc(len + 1);
    if (!req) {
        puts("{\"error\": \"out of memory\", \"errno\": 12}");
        return 1;
    }
    size_t off = 0;
    for (int i = 1; i < argc; i++) {
        size_t l = strlen(argv[i]) + 1;
        memcpy(req + off, argv[i], l);
        off += l;
    }
    return talk(req, len, -1);
}

int main(int argc, char **argv)
{
    struct out o = {0};
    const char *base = argc > 0 ? strrchr(argv[0], '/') : NULL;
    if (base && !strcmp(base, "/init") && getpid() == 1)
        return ptinit_main(); /* the kernel runs /init, a symlink to this binary */
    if (argc < 2) {
        fail(&o, EINVAL, "usage: ptagent CMD [ARGS...] (commands: see PROTOCOL.md)");
    } else if (!strcmp(argv[1], "serve")) {
        return cmd_serve(argc, argv);
    } else if (!strcmp(argv[1], "raw")) {
        if (argc == 2)
            return talk(NULL, 0, 0);
        fail(&o, EINVAL, "usage: ptagent raw (the request on stdin)");
    } else {
        const struct command *c = lookup(argv[1]);
        if (c && c->held)
            return forward(argc, argv);
        dispatch(&o, argc - 1, argv + 1);
    }
    jp(&o, "\n");
    fputs(o.buf, stdout);
    return o.err ? 1 : 0;
}
