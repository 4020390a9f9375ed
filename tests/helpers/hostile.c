/* What a hostile program in an image tries, for tests/test_confinement.py (built with gcc -static).
 *
 *   hostile gethandle PATH                 (on the host) print PATH's file handle: TYPE HEX
 *   hostile openhandle FILE TYPE HEX NAME  open the directory with that handle on FILE's
 *                                          filesystem, print the content of NAME in it
 *   hostile syscalls                       try each syscall that reaches past a container,
 *                                          with harmless arguments, each in its own child;
 *                                          print "NAME ERRNO" (0: it worked)
 *   hostile status                         print the effective uid and CapEff
 *   hostile memgrep PID TEXT               count the readable mappings of PID's memory that
 *                                          hold TEXT (/proc/PID/mem); print "hits N"
 *   hostile tiocsti FD|PATH TEXT           push TEXT into a terminal's input (TIOCSTI), as
 *                                          if typed there; print "typed" or the errno
 *   hostile sessionkey DESC                read the "user" key DESC found in the session
 *                                          keyring: print "key PAYLOAD" or "errno N"
 *   hostile stdio                          set O_NONBLOCK on fds 0-2 and shut down those
 *                                          that are sockets; print "done"
 *   hostile chroot-escape PATH             chroot into a new directory, walk up out of it and
 *                                          chroot there: print "escaped" if PATH is then seen
 *   hostile shm ID                         attach SysV shared memory ID: print "shm TEXT" (its
 *                                          first bytes) or "errno N"
 *   hostile connect @NAME|PORT             connect to the abstract Unix socket NAME or to TCP
 *                                          PORT on 127.0.0.1 and send "hostile": print
 *                                          "connected" or "errno N"
 *   hostile unlimit V1|V2                  in a user and cgroup namespace of its own, mount
 *                                          the pids hierarchy (cgroup v1's "pids", or
 *                                          cgroup2) and write "max" to the pids.max of its
 *                                          root, the container's own group, and make
 *                                          groups below it: print "unlimited" or
 *                                          "STEP errno N"
 *   suid-status                            the same (a setuid-root copy of this program)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/ioctl.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int gethandle(const char *path) {
    struct file_handle *h = malloc(sizeof(*h) + MAX_HANDLE_SZ);
    int mount_id;
    h->handle_bytes = MAX_HANDLE_SZ;
    if (name_to_handle_at(AT_FDCWD, path, h, &mount_id, 0) < 0) {
        perror("name_to_handle_at");
        return 1;
    }
    printf("%d ", h->handle_type);
    for (unsigned i = 0; i < h->handle_bytes; i++)
        printf("%02x", h->f_handle[i]);
    printf("\n");
    return 0;
}

static int openhandle(const char *file, const char *type, const char *hex, const char *name) {
    struct file_handle *h = malloc(sizeof(*h) + MAX_HANDLE_SZ);
    size_t n = strlen(hex) / 2;
    h->handle_type = atoi(type);
    h->handle_bytes = n;
    for (size_t i = 0; i < n; i++)
        sscanf(hex + 2 * i, "%2hhx", &h->f_handle[i]);
    int mfd = open(file, O_RDONLY);
    if (mfd < 0) {
        perror("open");
        return 2;
    }
    int dfd = open_by_handle_at(mfd, h, O_RDONLY | O_DIRECTORY);
    if (dfd < 0) {
        printf("open_by_handle_at: %d %s\n", errno, strerror(errno));
        return 1;
    }
    int fd = openat(dfd, name, O_RDONLY);
    if (fd < 0) {
        printf("openat: %d %s\n", errno, strerror(errno));
        return 1;
    }
    char buf[4096];
    ssize_t got;
    while ((got = read(fd, buf, sizeof buf)) > 0)
        fwrite(buf, 1, got, stdout);
    return 0;
}

static long probe(const char *name) {
    static char stack[65536];
    struct timespec bad = {0, -1};
    if (!strcmp(name, "mount")) return mount("none", "/tmp", "tmpfs", 0, NULL);
    if (!strcmp(name, "umount2")) return umount2("/proc/sys", MNT_DETACH);
    if (!strcmp(name, "open_tree")) return syscall(SYS_open_tree, AT_FDCWD, "/", 0);
    if (!strcmp(name, "move_mount")) return syscall(SYS_move_mount, -1, "", -1, "", 0);
    if (!strcmp(name, "fsopen")) return syscall(SYS_fsopen, "tmpfs", 0);
    if (!strcmp(name, "fsconfig")) return syscall(SYS_fsconfig, -1, 0, NULL, NULL, 0);
    if (!strcmp(name, "fsmount")) return syscall(SYS_fsmount, -1, 0, 0);
    if (!strcmp(name, "fspick")) return syscall(SYS_fspick, AT_FDCWD, "/", 0);
    if (!strcmp(name, "mount_setattr")) return syscall(SYS_mount_setattr, -1, "", 0, NULL, 0);
    if (!strcmp(name, "pivot_root")) return syscall(SYS_pivot_root, "/", "/");
    if (!strcmp(name, "unshare")) return unshare(CLONE_NEWUSER);
    if (!strcmp(name, "setns")) return setns(-1, 0);
    if (!strcmp(name, "clone")) {
        long pid = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, stack + sizeof stack, 0, 0, 0);
        if (pid == 0) _exit(0);
        return pid < 0 ? -1 : 0;
    }
    if (!strcmp(name, "clone3")) return syscall(SYS_clone3, NULL, 0);
    if (!strcmp(name, "kexec_load")) return syscall(SYS_kexec_load, 0, 0, NULL, 0);
    if (!strcmp(name, "kexec_file_load")) return syscall(SYS_kexec_file_load, -1, -1, 0, "", 0);
    if (!strcmp(name, "init_module")) return syscall(SYS_init_module, NULL, 0, "");
    if (!strcmp(name, "finit_module")) return syscall(SYS_finit_module, -1, "", 0);
    if (!strcmp(name, "delete_module")) return syscall(SYS_delete_module, "pyunion_none", 0);
    if (!strcmp(name, "bpf")) return syscall(SYS_bpf, 0, NULL, 0);
    if (!strcmp(name, "keyctl")) return syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -2, 0);
    if (!strcmp(name, "add_key")) return syscall(SYS_add_key, "user", "pyunion", "x", 1, -2);
    if (!strcmp(name, "request_key"))
        return syscall(SYS_request_key, "user", "pyunion-none", NULL, -2);
    if (!strcmp(name, "swapon")) return syscall(SYS_swapon, "/pyunion-none", 0);
    if (!strcmp(name, "swapoff")) return syscall(SYS_swapoff, "/pyunion-none");
    if (!strcmp(name, "reboot")) return syscall(SYS_reboot, 0, 0, 0, NULL); /* bad magic */
    if (!strcmp(name, "settimeofday")) return syscall(SYS_settimeofday, &bad, NULL);
    if (!strcmp(name, "clock_settime")) return syscall(SYS_clock_settime, CLOCK_REALTIME, &bad);
    if (!strcmp(name, "acct")) return acct("/pyunion-none");
    if (!strcmp(name, "quotactl")) return syscall(SYS_quotactl, 0x800001 /* Q_SYNC */, NULL, 0, NULL);
    if (!strcmp(name, "open_by_handle_at")) return syscall(SYS_open_by_handle_at, -1, NULL, 0);
    if (!strcmp(name, "userfaultfd")) return syscall(SYS_userfaultfd, 0);
    if (!strcmp(name, "personality")) return personality(ADDR_NO_RANDOMIZE);
    if (!strcmp(name, "syslog")) return syscall(SYS_syslog, 10 /* SIZE_BUFFER */, NULL, 0);
    if (!strcmp(name, "iopl")) return syscall(SYS_iopl, 3);
    if (!strcmp(name, "perf_event_open")) return syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0);
    if (!strcmp(name, "sethostname")) return sethostname("pyunion-probe", 13);
    if (!strcmp(name, "ptrace")) return syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0);
    errno = ENOSYS;
    return -2;
}

static const char *PROBES[] = {
    "mount", "umount2", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "pivot_root", "unshare", "setns", "clone", "clone3", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf", "keyctl",
    "add_key", "request_key", "swapon", "swapoff", "reboot", "settimeofday", "clock_settime",
    "acct", "quotactl", "open_by_handle_at", "userfaultfd", "personality", "syslog", "iopl",
    "perf_event_open", "sethostname", "ptrace", NULL};

static int syscalls(void) {
    for (const char **p = PROBES; *p; p++) {
        int pipefd[2];
        if (pipe(pipefd) < 0) return 2;
        pid_t pid = fork();
        if (pid == 0) {
            int err = 0;
            errno = 0;
            if (probe(*p) < 0) err = errno;
            if (write(pipefd[1], &err, sizeof err) != sizeof err) _exit(3);
            _exit(0);
        }
        close(pipefd[1]);
        int err = -1, status;
        if (read(pipefd[0], &err, sizeof err) != sizeof err) err = -1;
        close(pipefd[0]);
        waitpid(pid, &status, 0);
        printf("%s %d\n", *p, err);
    }
    return 0;
}

static int status(void) {
    char line[256];
    FILE *f = fopen("/proc/self/status", "r");
    printf("euid=%d\n", (int)geteuid());
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "CapEff:", 7)) fputs(line, stdout);
    return 0;
}

static int memgrep(const char *pid, const char *text) {
    char path[64], line[512];
    size_t n = strlen(text);
    int hits = 0;
    snprintf(path, sizeof path, "/proc/%s/maps", pid);
    FILE *maps = fopen(path, "r");
    snprintf(path, sizeof path, "/proc/%s/mem", pid);
    int mem = open(path, O_RDONLY);
    if (!maps || mem < 0) {
        printf("open %d\n", errno);
        return 1;
    }
    while (fgets(line, sizeof line, maps)) {
        unsigned long lo, hi;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3 || perms[0] != 'r') continue;
        char *buf = malloc(hi - lo);
        ssize_t got = buf ? pread(mem, buf, hi - lo, lo) : -1;
        for (ssize_t i = 0; got > 0 && i + (ssize_t)n <= got; i++)
            if (!memcmp(buf + i, text, n)) {
                hits++;
                break;
            }
        free(buf);
    }
    printf("hits %d\n", hits);
    return 0;
}

static int tiocsti(const char *where, const char *text) {
    int fd = where[0] == '/' ? open(where, O_RDWR) : atoi(where);
    if (fd < 0) {
        printf("open %d\n", errno);
        return 1;
    }
    for (const char *p = text; *p; p++)
        if (ioctl(fd, TIOCSTI, p) < 0) {
            printf("TIOCSTI %d\n", errno);
            return 1;
        }
    printf("typed\n");
    return 0;
}

static int sessionkey(const char *desc) {
    char buf[256];
    long id = syscall(SYS_keyctl, 10 /* KEYCTL_SEARCH */, -3 /* @s */, "user", desc, 0);
    if (id < 0) {
        printf("errno %d\n", errno);
        return 0;
    }
    long n = syscall(SYS_keyctl, 11 /* KEYCTL_READ */, id, buf, sizeof(buf) - 1);
    if (n < 0) {
        printf("errno %d\n", errno);
        return 0;
    }
    buf[n < (long)sizeof(buf) - 1 ? n : (long)sizeof(buf) - 1] = 0;
    printf("key %s\n", buf);
    return 0;
}

static int stdio(void) {
    printf("done\n");
    fflush(stdout);
    for (int fd = 0; fd < 3; fd++) {
        int flags = fcntl(fd, F_GETFL);
        if (flags >= 0) fcntl(fd, F_SETFL, flags | O_NONBLOCK);
        shutdown(fd, SHUT_RDWR);
    }
    return 0;
}

static int chroot_escape(const char *path) {
    mkdir("/pyunion-jail", 0755);
    if (chroot("/pyunion-jail") < 0) {
        printf("chroot %d\n", errno);
        return 1;
    }
    for (int i = 0; i < 64; i++)
        if (chdir("..") < 0) break;
    if (chroot(".") < 0) {
        printf("chroot . %d\n", errno);
        return 1;
    }
    printf(access(path, F_OK) == 0 ? "escaped\n" : "contained\n");
    return 0;
}

static int shm(const char *id) {
    const char *p = shmat(atoi(id), NULL, SHM_RDONLY);
    if (p == (void *)-1) {
        printf("errno %d\n", errno);
        return 0;
    }
    printf("shm %.32s\n", p);
    return 0;
}

static int connect_to(const char *where) {
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    struct sockaddr_in in = {.sin_family = AF_INET};
    struct sockaddr *addr;
    socklen_t len;
    int fd;
    if (where[0] == '@') {
        size_t n = strnlen(where + 1, sizeof(un.sun_path) - 1);
        memcpy(un.sun_path + 1, where + 1, n); /* sun_path[0] = 0: abstract */
        addr = (struct sockaddr *)&un;
        len = offsetof(struct sockaddr_un, sun_path) + 1 + n;
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
    } else {
        in.sin_port = htons(atoi(where));
        in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        addr = (struct sockaddr *)&in;
        len = sizeof(in);
        fd = socket(AF_INET, SOCK_STREAM, 0);
    }
    if (fd < 0 || connect(fd, addr, len) < 0 || write(fd, "hostile", 7) != 7) {
        printf("errno %d\n", errno);
        return 0;
    }
    printf("connected\n");
    close(fd);
    return 0;
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    int ok = fd >= 0 && write(fd, text, strlen(text)) == (ssize_t)strlen(text);
    int saved = errno;
    if (fd >= 0) close(fd);
    errno = saved;
    return ok ? 0 : -1;
}

static int unlimit(const char *version) {
    char map[64];
    uid_t uid = getuid();
    gid_t gid = getgid();
    const char *dir = "/tmp/pyunion-cg";
    if (unshare(CLONE_NEWUSER) < 0) {
        printf("userns errno %d\n", errno);
        return 0;
    }
    write_file("/proc/self/setgroups", "deny");
    snprintf(map, sizeof map, "0 %u 1", (unsigned)uid);
    if (write_file("/proc/self/uid_map", map) < 0) printf("uid_map errno %d\n", errno);
    snprintf(map, sizeof map, "0 %u 1", (unsigned)gid);
    if (write_file("/proc/self/gid_map", map) < 0) printf("gid_map errno %d\n", errno);
    if (unshare(CLONE_NEWCGROUP | CLONE_NEWNS) < 0) {
        printf("cgroupns errno %d\n", errno);
        return 0;
    }
    mkdir(dir, 0755);
    int v2 = !strcmp(version, "V2");
    if (mount("none", dir, v2 ? "cgroup2" : "cgroup", 0, v2 ? NULL : "pids") < 0) {
        printf("mount errno %d\n", errno);
        return 0;
    }
    mkdir("/tmp/pyunion-cg/sub", 0755); /* left for pyunion to remove */
    mkdir("/tmp/pyunion-cg/sub/sub", 0755);
    if (write_file("/tmp/pyunion-cg/pids.max", "max") < 0) {
        printf("write errno %d\n", errno);
        return 0;
    }
    printf("unlimited\n");
    return 0;
}

int main(int argc, char **argv) {
    const char *base = strrchr(argv[0], '/');
    if (!strcmp(base ? base + 1 : argv[0], "suid-status")) return status();
    if (argc == 3 && !strcmp(argv[1], "gethandle")) return gethandle(argv[2]);
    if (argc == 6 && !strcmp(argv[1], "openhandle"))
        return openhandle(argv[2], argv[3], argv[4], argv[5]);
    if (argc == 2 && !strcmp(argv[1], "syscalls")) return syscalls();
    if (argc == 2 && !strcmp(argv[1], "status")) return status();
    if (argc == 4 && !strcmp(argv[1], "tiocsti")) return tiocsti(argv[2], argv[3]);
    if (argc == 4 && !strcmp(argv[1], "memgrep")) return memgrep(argv[2], argv[3]);
    if (argc == 3 && !strcmp(argv[1], "sessionkey")) return sessionkey(argv[2]);
    if (argc == 2 && !strcmp(argv[1], "stdio")) return stdio();
    if (argc == 3 && !strcmp(argv[1], "chroot-escape")) return chroot_escape(argv[2]);
    if (argc == 3 && !strcmp(argv[1], "shm")) return shm(argv[2]);
    if (argc == 3 && !strcmp(argv[1], "connect")) return connect_to(argv[2]);
    if (argc == 3 && !strcmp(argv[1], "unlimit")) return unlimit(argv[2]);
    fprintf(stderr,
            "usage: hostile gethandle|openhandle|syscalls|status|tiocsti|memgrep|sessionkey ...\n");
    return 2;
}
