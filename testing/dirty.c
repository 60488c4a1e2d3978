/*
 * dirty.c: the static /init of virtmig's QEMU test guest.
 *
 * Concern: give migration tests a guest whose memory keeps changing and whose liveness and memory
 * integrity can be read from its serial console, and, when asked, whose network and disk keep
 * working.  Without net= or disklog= it mounts nothing, needs no other file than /dev/console, and
 * it never exits (PID 1 exiting panics the kernel).
 *
 * Parameters arrive as environment variables (kernel command line `k=v` words the kernel does not
 * know are passed to /init's environment):
 *   dirty_mb    MiB of memory to map, fill with non-zero data and keep dirtying (default 64)
 *   dirty_rate  MiB/s of pages to dirty, one 64-bit word per 4 KiB page (default 0: unlimited)
 *   net         udp:<ipv4>:<port>: also send each heartbeat line as a UDP datagram there, through
 *               eth0 (default: no network).  eth0 gets 10.0.2.15/24, QEMU user networking's guest
 *               address.  Only a destination inside 10.0.2.0/24 (QEMU's internal network, whose
 *               10.0.2.2 QEMU delivers to the host's 127.0.0.1) is taken: anything else is
 *               refused, and nothing is ever sent elsewhere.
 *   disklog     a raw block device (e.g. /dev/vdb) to log every heartbeat to (default: none)
 * The two are independent and may be combined.  Either first loads the drivers, once: every
 * module named in /lib/modules/order (one name a line, without ".ko"), in that order
 * (finit_module; none without that file: the drivers are built in, or there are none).
 *
 * Console output:
 *   DIRTY-READY mb=<mb> rate=<rate>                 once the memory is filled
 *   HEARTBEAT n=<counter> sum=<checksum> ok=<0|1>   every second
 *   NET-READY dev=eth0 to=<ipv4>:<port>             once the network is up (with net=)
 *   NET-ERROR <why>                                 the network could not be brought up
 *   MODULE-ERROR <name>: <why>                      a module could not be loaded
 * `sum` is the running checksum (sum of every word of the area, kept up to date on each write);
 * `ok` says whether re-reading the whole area gave that same sum, so a page that did not arrive
 * intact after a migration shows up as ok=0.
 *
 * With disklog: /init mounts devtmpfs on /dev, loads the modules (the virtio block driver, which
 * Debian builds as a module, is one of them), opens the device with O_DIRECT|O_SYNC and prints
 *   DISKLOG-READY dev=<dev>                         (or DISKLOG-ERROR <why>, and logs nothing)
 * then writes heartbeat n's record to sector n-1, before printing the heartbeat (a record on the
 * disk was written, and acknowledged, before its line): little-endian "VMHB", u32 version 1,
 * u64 n, u64 sum, u64 FNV-1a 64 of the 24 bytes before it, zeros to 512 bytes.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096UL
#define WORDS_PER_PAGE (PAGE_SIZE / sizeof(uint64_t))
#define SLICE_NS 10000000ULL /* rate-limited dirtying runs in 10 ms slices */
#define NS 1000000000ULL
#define NET_DEV "eth0"
#define NET_ADDR "10.0.2.15"    /* QEMU user networking's guest address */
#define NET_PREFIX "10.0.2."     /* the only network anything is sent to */
#define NET_MASK "255.255.255.0"
#define MODULE_DIR "/lib/modules/"

static int net_sock = -1; /* net=: the heartbeat also goes to net_to */
static struct sockaddr_in net_to;

static void say(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof(buf))
		n = sizeof(buf) - 1;
	if (net_sock >= 0 && strncmp(buf, "HEARTBEAT ", 10) == 0)
		sendto(net_sock, buf, (size_t)n, MSG_DONTWAIT, (struct sockaddr *)&net_to,
		       sizeof(net_to)); /* best effort: a lost datagram is the test's to see */
	const char *p = buf;
	while (n > 0) {
		ssize_t w = write(1, p, (size_t)n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		p += w;
		n -= (int)w;
	}
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
	struct timespec ts = {.tv_sec = (time_t)(t / NS), .tv_nsec = (long)(t % NS)};
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static unsigned long env_ulong(const char *name, unsigned long dflt)
{
	const char *v = getenv(name);
	if (v == NULL || *v == '\0')
		return dflt;
	char *end;
	unsigned long x = strtoul(v, &end, 10);
	return *end == '\0' ? x : dflt;
}

/* Load the modules named in /lib/modules/order, one a line, in that order (once; none without
 * that file). */
static void load_modules(void)
{
	static int loaded;
	if (loaded)
		return;
	loaded = 1;
	FILE *order = fopen(MODULE_DIR "order", "re");
	if (order == NULL)
		return; /* nothing to load: the drivers are built in, or there are none */
	char name[128], path[192];
	while (fgets(name, sizeof(name), order) != NULL) {
		name[strcspn(name, "\n")] = '\0';
		if (name[0] == '\0')
			continue;
		snprintf(path, sizeof(path), "%s%s.ko", MODULE_DIR, name);
		int ko = open(path, O_RDONLY | O_CLOEXEC);
		if (ko < 0 || (syscall(SYS_finit_module, ko, "", 0) != 0 && errno != EEXIST))
			say("MODULE-ERROR %s: %s\n", name, strerror(errno));
		if (ko >= 0)
			close(ko);
	}
	fclose(order);
}

static int set_addr(int sock, unsigned long request, const char *addr)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	strncpy(ifr.ifr_name, NET_DEV, IFNAMSIZ - 1);
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	sin->sin_family = AF_INET;
	inet_pton(AF_INET, addr, &sin->sin_addr);
	return ioctl(sock, request, &ifr);
}

/* net=udp:<ipv4>:<port>: bring eth0 up; the socket to send the heartbeat with, or -1. */
static int net_setup(const char *spec, struct sockaddr_in *to)
{
	char host[32];
	unsigned port;
	if (sscanf(spec, "udp:%31[0-9.]:%u", host, &port) != 2 || port == 0 || port > 65535) {
		say("NET-ERROR net=%s: expected udp:<ipv4>:<port>\n", spec);
		return -1;
	}
	memset(to, 0, sizeof(*to));
	to->sin_family = AF_INET;
	to->sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, host, &to->sin_addr) != 1 ||
	    strncmp(host, NET_PREFIX, strlen(NET_PREFIX)) != 0) {
		say("NET-ERROR net=%s: only QEMU's user network %s0/24 is allowed\n", spec,
		    NET_PREFIX);
		return -1;
	}
	load_modules();
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0) {
		say("NET-ERROR socket: %s\n", strerror(errno));
		return -1;
	}
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	strncpy(ifr.ifr_name, NET_DEV, IFNAMSIZ - 1);
	/* The driver registers eth0 as it probes: wait for it (up to 10 s). */
	int tries = 0;
	while (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0) {
		if (++tries > 100) {
			say("NET-ERROR no %s: %s\n", NET_DEV, strerror(errno));
			close(sock);
			return -1;
		}
		sleep_until(now_ns() + NS / 10);
	}
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (set_addr(sock, SIOCSIFADDR, NET_ADDR) != 0 ||
	    set_addr(sock, SIOCSIFNETMASK, NET_MASK) != 0 ||
	    ioctl(sock, SIOCSIFFLAGS, &ifr) != 0) {
		say("NET-ERROR configuring %s: %s\n", NET_DEV, strerror(errno));
		close(sock);
		return -1;
	}
	say("NET-READY dev=%s to=%s:%u\n", NET_DEV, host, port);
	return sock;
}

static _Noreturn void hang(const char *why)
{
	say("DIRTY-ERROR %s\n", why);
	for (;;)
		pause();
}

/* The log device opened for direct, synchronous writes; -1 (said why) when it cannot be. */
static int disklog_open(const char *dev)
{
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) != 0 && errno != EBUSY) {
		say("DISKLOG-ERROR mount devtmpfs: %s\n", strerror(errno));
		return -1;
	}
	load_modules();
	int err = 0;
	for (int i = 0; i < 200; i++) { /* the node appears once the driver probed the device */
		int fd = open(dev, O_RDWR | O_DIRECT | O_SYNC | O_CLOEXEC);
		if (fd >= 0) {
			say("DISKLOG-READY dev=%s\n", dev);
			return fd;
		}
		err = errno;
		sleep_until(now_ns() + NS / 20);
	}
	say("DISKLOG-ERROR open %s: %s\n", dev, strerror(err));
	return -1;
}

static uint64_t fnv1a64(const unsigned char *p, size_t n)
{
	uint64_t h = 0xCBF29CE484222325ULL;
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001B3ULL;
	return h;
}

static void put64(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

/* Heartbeat n's record to sector n-1 (buf: one aligned sector); 0 on success. */
static int disklog_write(int fd, unsigned char *buf, uint64_t n, uint64_t sum)
{
	memset(buf, 0, 512);
	memcpy(buf, "VMHB", 4);
	buf[4] = 1; /* version, little-endian u32 */
	put64(buf + 8, n);
	put64(buf + 16, sum);
	put64(buf + 24, fnv1a64(buf, 24));
	ssize_t w = pwrite(fd, buf, 512, (off_t)((n - 1) * 512));
	if (w != 512) {
		say("DISKLOG-ERROR write n=%llu: %s\n", (unsigned long long)n,
		    w < 0 ? strerror(errno) : "short write");
		return -1;
	}
	return 0;
}

int main(void)
{
	unsigned long mb = env_ulong("dirty_mb", 64);
	unsigned long rate = env_ulong("dirty_rate", 0);
	if (mb == 0)
		mb = 1;
	size_t npages = mb * (1024 * 1024 / PAGE_SIZE);
	size_t nwords = npages * WORDS_PER_PAGE;

	uint64_t *mem = mmap(NULL, npages * PAGE_SIZE, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (mem == MAP_FAILED)
		hang("mmap failed");
	const char *net = getenv("net");
	if (net != NULL && *net != '\0')
		net_sock = net_setup(net, &net_to);

	const char *dev = getenv("disklog");
	int logfd = dev != NULL && *dev != '\0' ? disklog_open(dev) : -1;
	unsigned char *sector = NULL;
	if (logfd >= 0 && posix_memalign((void **)&sector, 4096, 4096) != 0)
		hang("posix_memalign failed");

	/* Non-zero everywhere: no page may count as a zero page for the migration. */
	uint64_t sum = 0;
	for (size_t i = 0; i < nwords; i++) {
		uint64_t v = (i + 1) * 0x9E3779B97F4A7C15ULL | 1;
		mem[i] = v;
		sum += v;
	}
	say("DIRTY-READY mb=%lu rate=%lu\n", mb, rate);

	/* Pages to dirty per 10 ms slice; 0: as many as possible. */
	uint64_t per_slice = rate ? rate * (1024 * 1024 / PAGE_SIZE) * SLICE_NS / NS : 0;
	if (rate && per_slice == 0)
		per_slice = 1;
	size_t page = 0;
	uint64_t pass = 0, beats = 0;
	uint64_t next_beat = now_ns() + NS;
	uint64_t slice_end = now_ns() + SLICE_NS;
	for (;;) {
		uint64_t todo = per_slice ? per_slice : 4096;
		for (uint64_t k = 0; k < todo; k++) {
			mem[page * WORDS_PER_PAGE + (pass % WORDS_PER_PAGE)] += 1;
			sum += 1;
			if (++page == npages) {
				page = 0;
				pass++;
			}
		}
		uint64_t t = now_ns();
		if (t >= next_beat) {
			uint64_t check = 0;
			for (size_t i = 0; i < nwords; i++)
				check += mem[i];
			beats++;
			if (logfd >= 0 && disklog_write(logfd, sector, beats, sum) != 0) {
				close(logfd); /* one error said; the heartbeats go on */
				logfd = -1;
			}
			say("HEARTBEAT n=%llu sum=%016llx ok=%d\n", (unsigned long long)beats,
			    (unsigned long long)sum, check == sum);
			t = now_ns();
			next_beat += NS;
			if (next_beat < t) /* a stall (e.g. paused): no burst of beats */
				next_beat = t + NS;
		}
		if (per_slice) {
			if (slice_end > t)
				sleep_until(slice_end);
			slice_end += SLICE_NS;
			if (slice_end < t) /* behind: do not accumulate a backlog */
				slice_end = t + SLICE_NS;
		}
	}
}
