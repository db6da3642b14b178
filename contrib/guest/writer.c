/*
 * writer: the test guest's disk writer (vdsm-lsm contrib/guest).
 *
 * Writes fixed-size, self-describing blocks at block indexes inside a span
 * of a disk, each one durable before it is acknowledged (O_DIRECT write,
 * then fdatasync), and logs every acknowledged write on stdout (the serial
 * console in the guest) as one line:
 *
 *     ACK <seq> <block> <guest-monotonic-ms>
 *
 * Block layout (little endian), see contrib/guest/verifier.py:
 *
 *     0   8  magic "LSMBLK1\0"
 *     8   8  seq (1, 2, ...; one counter per run)
 *     16  8  block index inside the span
 *     24  8  run id (random per boot unless lsm.run= is given)
 *     32  4  block size
 *     36  4  header version (1)
 *     40  8  guest monotonic ms when the block was built
 *     48  8  reserved (0)
 *     56  4  crc32 (zlib's) of the whole block with this field zeroed
 *     60  4  reserved (0)
 *     64  -  filler: xorshift64 stream seeded from (run, seq, block)
 *
 * Parameters come from the kernel command line (/proc/cmdline), or from the
 * first argument when given (the same "lsm.key=value ..." words), so the
 * writer can also run on the host against a file:
 *
 *     lsm.dev=/dev/vda lsm.span_mb=64 lsm.offset_mb=0 lsm.bs=65536
 *     lsm.pattern=random|seq lsm.rate=0 (writes/s, 0 = as fast as possible)
 *     lsm.seed=<n> lsm.count=0 (0 = forever) lsm.run=<n>
 *
 * An I/O error (EIO, ENOSPC, short write, failed fdatasync) is reported as a
 * "WRITER ERROR" line and the same write is retried after a short sleep:
 * when the VM is paused on ENOSPC and resumed, the write completes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define HEADER_SIZE 64
#define HEADER_VERSION 1
#define MAGIC "LSMBLK1"
#define MAX_BLOCK_SIZE (16u << 20)

struct params {
    char dev[256];
    uint64_t span_mb;
    uint64_t offset_mb;
    uint64_t bs;
    int random;
    uint64_t rate;
    uint64_t seed;
    uint64_t count;
    uint64_t run;
    int have_seed;
    int have_run;
};

static uint32_t crc_table[256];

static void crc32_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(uint64_t ms)
{
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000 };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

/* One line, one write(2): lines are never interleaved with each other. */
static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    size_t off = 0;
    while (off < (size_t)n) {
        ssize_t w = write(STDOUT_FILENO, line + off, n - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        off += w;
    }
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static int parse_u64(const char *key, const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end) {
        say("WRITER ERROR bad value %s=%s", key, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_params(const char *cmdline, struct params *p)
{
    char buf[4096];
    snprintf(buf, sizeof(buf), "%s", cmdline);
    for (char *save, *w = strtok_r(buf, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save)) {
        if (strncmp(w, "lsm.", 4) != 0)
            continue;
        char *eq = strchr(w, '=');
        if (!eq)
            continue;
        *eq = '\0';
        const char *k = w + 4, *v = eq + 1;
        int rc = 0;
        if (!strcmp(k, "dev"))
            snprintf(p->dev, sizeof(p->dev), "%s", v);
        else if (!strcmp(k, "span_mb"))
            rc = parse_u64(w, v, &p->span_mb);
        else if (!strcmp(k, "offset_mb"))
            rc = parse_u64(w, v, &p->offset_mb);
        else if (!strcmp(k, "bs"))
            rc = parse_u64(w, v, &p->bs);
        else if (!strcmp(k, "rate"))
            rc = parse_u64(w, v, &p->rate);
        else if (!strcmp(k, "count"))
            rc = parse_u64(w, v, &p->count);
        else if (!strcmp(k, "seed")) {
            rc = parse_u64(w, v, &p->seed);
            p->have_seed = 1;
        } else if (!strcmp(k, "run")) {
            rc = parse_u64(w, v, &p->run);
            p->have_run = 1;
        } else if (!strcmp(k, "pattern")) {
            if (!strcmp(v, "random"))
                p->random = 1;
            else if (!strcmp(v, "seq"))
                p->random = 0;
            else {
                say("WRITER ERROR bad value lsm.pattern=%s", v);
                rc = -1;
            }
        }
        if (rc)
            return -1;
    }
    if (p->bs < 4096 || p->bs > MAX_BLOCK_SIZE || p->bs % 4096) {
        say("WRITER ERROR lsm.bs=%" PRIu64 " must be a multiple of 4096 up to %u",
            p->bs, MAX_BLOCK_SIZE);
        return -1;
    }
    if (p->span_mb == 0 || (p->span_mb << 20) < p->bs) {
        say("WRITER ERROR lsm.span_mb=%" PRIu64 " holds no block", p->span_mb);
        return -1;
    }
    return 0;
}

static int read_file(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = '\0';
    return 0;
}

static uint64_t random_u64(void)
{
    uint64_t v = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd >= 0) {
        if (read(fd, &v, sizeof(v)) != sizeof(v))
            v = 0;
        close(fd);
    }
    if (v == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        v = ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 16);
    }
    return v;
}

static int device_size(int fd, uint64_t *size)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -1;
    if (S_ISBLK(st.st_mode))
        return ioctl(fd, BLKGETSIZE64, size);
    *size = (uint64_t)st.st_size;
    return 0;
}

static void fill_block(unsigned char *buf, const struct params *p, uint64_t seq, uint64_t block)
{
    memset(buf, 0, HEADER_SIZE);
    memcpy(buf, MAGIC, sizeof(MAGIC));
    put64(buf + 8, seq);
    put64(buf + 16, block);
    put64(buf + 24, p->run);
    put32(buf + 32, (uint32_t)p->bs);
    put32(buf + 36, HEADER_VERSION);
    put64(buf + 40, now_ms());

    uint64_t s = (seq * 0x9E3779B97F4A7C15ull) ^ p->run ^ (block << 1) ^ 0x5DEECE66Dull;
    if (s == 0)
        s = 1;
    for (uint64_t off = HEADER_SIZE; off < p->bs; off += 8)
        put64(buf + off, xorshift64(&s));

    put32(buf + 56, crc32_update(0, buf, p->bs));
}

/* Write and sync one block, retrying the same write until it is durable. */
static void write_durably(int fd, const unsigned char *buf, const struct params *p,
                          uint64_t seq, uint64_t block)
{
    off_t off = (off_t)((p->offset_mb << 20) + block * p->bs);
    uint64_t backoff = 100;
    for (;;) {
        ssize_t n = pwrite(fd, buf, p->bs, off);
        const char *op = "write";
        int err = errno;
        if (n == (ssize_t)p->bs) {
            if (fdatasync(fd) == 0)
                return;
            op = "fdatasync";
            err = errno;
        } else if (n >= 0) {
            op = "short-write";
            err = 0;
        }
        if (err == EINTR)
            continue;
        say("WRITER ERROR op=%s seq=%" PRIu64 " block=%" PRIu64 " errno=%d (%s), retrying",
            op, seq, block, err, err ? strerror(err) : "short write");
        sleep_ms(backoff);
        if (backoff < 1000)
            backoff *= 2;
    }
}

int main(int argc, char **argv)
{
    struct params p = {
        .dev = "/dev/vda", .span_mb = 64, .offset_mb = 0, .bs = 65536,
        .random = 1, .rate = 0, .count = 0,
    };
    char cmdline[4096];

    crc32_init();
    if (argc > 1) {
        snprintf(cmdline, sizeof(cmdline), "%s", argv[1]);
    } else if (read_file("/proc/cmdline", cmdline, sizeof(cmdline)) < 0) {
        say("WRITER ERROR cannot read /proc/cmdline: %s", strerror(errno));
        return 2;
    }
    if (parse_params(cmdline, &p) < 0)
        return 2;
    if (!p.have_run)
        p.run = random_u64();
    if (!p.have_seed)
        p.seed = p.run;

    int fd = open(p.dev, O_WRONLY | O_DIRECT);
    if (fd < 0) {
        say("WRITER ERROR cannot open %s: %s", p.dev, strerror(errno));
        return 2;
    }
    uint64_t size = 0;
    if (device_size(fd, &size) < 0) {
        say("WRITER ERROR cannot get the size of %s: %s", p.dev, strerror(errno));
        return 2;
    }
    uint64_t nblocks = (p.span_mb << 20) / p.bs;
    if ((p.offset_mb << 20) + nblocks * p.bs > size) {
        say("WRITER ERROR span offset_mb=%" PRIu64 " span_mb=%" PRIu64
            " does not fit in %s of %" PRIu64 " bytes", p.offset_mb, p.span_mb, p.dev, size);
        return 2;
    }

    unsigned char *buf;
    if (posix_memalign((void **)&buf, 4096, p.bs)) {
        say("WRITER ERROR cannot allocate %" PRIu64 " bytes", p.bs);
        return 2;
    }

    say("WRITER START run=%" PRIu64 " dev=%s bs=%" PRIu64 " offset=%" PRIu64
        " span_blocks=%" PRIu64 " pattern=%s rate=%" PRIu64 " seed=%" PRIu64
        " count=%" PRIu64, p.run, p.dev, p.bs, p.offset_mb << 20, nblocks,
        p.random ? "random" : "seq", p.rate, p.seed, p.count);

    uint64_t rng = p.seed ? p.seed : 1;
    uint64_t start = now_ms();
    for (uint64_t seq = 1; p.count == 0 || seq <= p.count; seq++) {
        uint64_t block = p.random ? xorshift64(&rng) % nblocks : (seq - 1) % nblocks;
        if (p.rate) {
            uint64_t due = start + (seq - 1) * 1000 / p.rate;
            uint64_t now = now_ms();
            if (due > now)
                sleep_ms(due - now);
        }
        fill_block(buf, &p, seq, block);
        write_durably(fd, buf, &p, seq, block);
        say("ACK %" PRIu64 " %" PRIu64 " %" PRIu64, seq, block, now_ms());
    }
    say("WRITER DONE count=%" PRIu64 " ms=%" PRIu64, p.count, now_ms() - start);
    close(fd);
    return 0;
}
