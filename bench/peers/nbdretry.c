/*
 * nbdretry: a QD1 4 KiB NBD client (libnbd) that survives its server being killed.
 *
 * It is the client half of the qemu-storage-daemon failover peer (bench/peers/qsd_failover.py):
 * the server is SIGKILLed and restarted on the same Unix socket, and this program measures,
 * from the client's side, how long I/O stalled and whether any acknowledged write was lost.
 *
 * I/O loop.  One operation at a time (QD1), 4 KiB at a random 4 KiB-aligned offset in
 * [0, span).  Each operation is a write or a read (-w PCT% writes).  A write of block B
 * carries a stamp: a header {magic, B, V} where V is B's per-block version counter (bumped
 * for every new write of B), and the rest of the 4 KiB is a pattern derived from (B, V).
 * A read regenerates the pattern from the header it got and checks the whole block:
 *   - a block never written must read back as zeros (the export must start zeroed: the
 *     controller creates a fresh sparse image for every run);
 *   - a wrong magic/block number or pattern is a verify failure;
 *   - V older than the last *acknowledged* version of B is a lost write ("lost");
 *   - V newer than that is a verify failure (cannot happen: see retry below).
 *
 * Retry.  When an operation fails (the server died: the handle goes dead), the handle is
 * closed and a new one is created and connected (nbd_connect_unix) in a tight loop: 200 us
 * sleep between attempts, giving up after -t MS without a connection.  Then the failed
 * operation is re-issued unchanged (a write keeps its stamp, so a write that was in flight
 * when the server died is resolved by its retry and acked exactly at version V).  After the
 * retried operation completes, the client reads back the last (up to 8) blocks whose writes
 * were acknowledged before the failure, since those are the writes a crash could lose.
 *
 * Timing.  Every completion is timed with CLOCK_MONOTONIC (the clock of Python's
 * time.monotonic_ns()).  Two records are kept:
 *   - gaps: every interval between consecutive completions longer than -g US,
 *     as [previous completion ns, this completion ns];
 *   - outages: one per failure episode, [last completion before the failure, time the
 *     failure was seen, time the new connection was up, first completion after it].
 * The stall of an outage is first completion - last completion (no I/O completed between).
 *
 * Control and output.  The program runs until SIGTERM/SIGINT, -n OPS operations, or
 * -d SECONDS, then prints one JSON line on stdout (see print_json) and exits 0; when it
 * gives up (reconnect timeout, too many consecutive failures) it prints the same line with
 * an "error" and exits 2.  While running it publishes live counters in the 64-byte file
 * given with -S (it must exist; it is mmapped shared): little-endian uint64 words
 *   [0] ops completed  [1] last completion ns  [2] reconnects  [3] outages recovered
 *   [4] state (1 running, 2 reconnecting, 3 done)
 * so the controller can wait, bounded, until I/O has resumed after each fault.
 *
 * Usage: nbdretry -s SOCKET [-e EXPORT] -z SPAN_BYTES -S STATUS_FILE [-t RETRY_TIMEOUT_MS]
 *                 [-g GAP_US] [-w WRITE_PCT] [-r SEED] [-n MAX_OPS] [-d SECONDS]
 * Build: cc -O2 -Wall -o nbdretry nbdretry.c -lnbd
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libnbd.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define BLK 4096u
#define WORDS (BLK / 8u)
#define MAGIC 0x6e62647265747279ull /* "nbdretry" */
#define RETRY_SLEEP_NS 200000L
#define MAX_CONSECUTIVE_FAILURES 1000
#define RECENT 8
#define STATUS_BYTES 64

enum { ST_RUNNING = 1, ST_RECONNECTING = 2, ST_DONE = 3 };
enum { S_OPS, S_LAST_NS, S_RECONNECTS, S_RECOVERED, S_STATE };
enum op_kind { OP_READ, OP_WRITE };

struct op {
    enum op_kind kind;
    uint64_t block;
    uint64_t version; /* writes only */
};

struct pairs { /* growable array of uint64 tuples */
    uint64_t *v;
    size_t n, cap, width;
};

static volatile sig_atomic_t stop_flag;

static struct {
    const char *socket, *export_name, *status_path;
    uint64_t span, max_ops, retry_timeout_ns, gap_ns, seed;
    double duration_s;
    unsigned write_pct;
} cfg = { .export_name = "", .retry_timeout_ns = 10000000000ull, .gap_ns = 2000000ull,
          .write_pct = 50, .seed = 1 };

static struct {
    uint64_t ops, reads, writes, errors_retried, reconnects, connect_attempts;
    uint64_t verify_failures, lost, post_fault_checks, last_ok_ns;
} st;

static uint64_t *versions;   /* next version to write, per block */
static uint64_t *acked;      /* last acknowledged version, per block (0 = never written) */
static uint64_t *status;     /* the shared status words */
static uint64_t rng_state;
static struct pairs gaps = { .width = 2 }, outages = { .width = 4 };
static uint64_t recent[RECENT]; /* blocks of the last acked writes (ring) */
static size_t recent_n, recent_head;
static struct op checks[RECENT]; /* reads queued after an outage */
static size_t checks_n;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static uint64_t rnd(void) /* xorshift64* */
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}

static void publish(int word, uint64_t value)
{
    __atomic_store_n(&status[word], value, __ATOMIC_RELEASE);
}

static void push(struct pairs *p, const uint64_t *tuple)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 256;
        uint64_t *v = realloc(p->v, cap * p->width * sizeof *v);
        if (v == NULL)
            return; /* out of memory: drop the record rather than the run */
        p->v = v;
        p->cap = cap;
    }
    memcpy(p->v + p->n * p->width, tuple, p->width * sizeof *tuple);
    p->n++;
}

/* -- stamps ------------------------------------------------------------------------------ */

static uint64_t pattern_word(uint64_t block, uint64_t version, uint64_t i)
{
    uint64_t x = (block * 0x9e3779b97f4a7c15ull) ^ (version << 20) ^ (i * 0xbf58476d1ce4e5b9ull);
    x ^= x >> 31;
    return x * 0x94d049bb133111ebull;
}

static void fill(uint64_t *buf, uint64_t block, uint64_t version)
{
    buf[0] = MAGIC;
    buf[1] = block;
    buf[2] = version;
    for (uint64_t i = 3; i < WORDS; i++)
        buf[i] = pattern_word(block, version, i);
}

static int all_zero(const uint64_t *buf)
{
    for (unsigned i = 0; i < WORDS; i++)
        if (buf[i] != 0)
            return 0;
    return 1;
}

/* Check a block read back against what was acknowledged for it. */
static void verify(const uint64_t *buf, uint64_t block, int post_fault)
{
    uint64_t want = acked[block], got;
    static uint64_t expect[WORDS];

    if (post_fault)
        st.post_fault_checks++;
    if (all_zero(buf)) {
        got = 0;
    } else {
        if (buf[0] != MAGIC || buf[1] != block) {
            st.verify_failures++;
            return;
        }
        got = buf[2];
        fill(expect, block, got);
        if (memcmp(expect, buf, BLK) != 0) {
            st.verify_failures++;
            return;
        }
    }
    if (got < want)
        st.lost++;
    else if (got > want)
        st.verify_failures++;
}

/* -- connection ---------------------------------------------------------------------------- */

static struct nbd_handle *try_connect(void)
{
    struct nbd_handle *h = nbd_create();
    if (h == NULL)
        return NULL;
    st.connect_attempts++;
    if (nbd_set_export_name(h, cfg.export_name) == -1 || nbd_connect_unix(h, cfg.socket) == -1) {
        nbd_close(h);
        return NULL;
    }
    return h;
}

/* Connect, retrying every 200 us for up to the retry timeout; NULL if it never came up. */
static struct nbd_handle *connect_retry(void)
{
    uint64_t deadline = now_ns() + cfg.retry_timeout_ns;
    struct timespec pause = { 0, RETRY_SLEEP_NS };

    for (;;) {
        struct nbd_handle *h = try_connect();
        if (h != NULL)
            return h;
        if (stop_flag || now_ns() > deadline)
            return NULL;
        nanosleep(&pause, NULL);
    }
}

/* -- operations ---------------------------------------------------------------------------- */

static struct op next_op(void)
{
    struct op op;
    if (checks_n > 0)
        return checks[--checks_n];
    op.block = rnd() % (cfg.span / BLK);
    op.kind = (rnd() % 100) < cfg.write_pct ? OP_WRITE : OP_READ;
    op.version = op.kind == OP_WRITE ? ++versions[op.block] : 0;
    return op;
}

static int issue(struct nbd_handle *h, const struct op *op, uint64_t *buf)
{
    uint64_t offset = op->block * BLK;
    if (op->kind == OP_WRITE) {
        fill(buf, op->block, op->version);
        return nbd_pwrite(h, buf, BLK, offset, 0);
    }
    return nbd_pread(h, buf, BLK, offset, 0);
}

static void note_ack(const struct op *op)
{
    acked[op->block] = op->version;
    recent[recent_head] = op->block;
    recent_head = (recent_head + 1) % RECENT;
    if (recent_n < RECENT)
        recent_n++;
}

/* Queue read-backs of the last acked writes (the ones a crash would lose). */
static void queue_checks(void)
{
    checks_n = 0;
    for (size_t i = 0; i < recent_n; i++) {
        size_t idx = (recent_head + RECENT - 1 - i) % RECENT;
        checks[checks_n++] = (struct op){ .kind = OP_READ, .block = recent[idx] };
    }
}

static void completed(uint64_t t)
{
    if (st.last_ok_ns != 0 && t - st.last_ok_ns > cfg.gap_ns) {
        uint64_t gap[2] = { st.last_ok_ns, t };
        push(&gaps, gap);
    }
    st.last_ok_ns = t;
    st.ops++;
    publish(S_LAST_NS, t);
    publish(S_OPS, st.ops);
}

/*
 * Run one operation to completion, reconnecting and re-issuing it as often as needed.
 * Returns NULL with *err set when giving up; otherwise the (possibly new) handle.
 */
static struct nbd_handle *run_op(struct nbd_handle *h, const struct op *op, int post_fault,
                                 const char **err)
{
    static uint64_t buf[WORDS];
    uint64_t outage[4] = { 0, 0, 0, 0 };
    int failures = 0;

    for (;;) {
        if (h != NULL && issue(h, op, buf) == 0)
            break;
        if (h != NULL) { /* the operation failed: the server is gone (or erred) */
            if (failures == 0) {
                outage[0] = st.last_ok_ns;
                outage[1] = now_ns();
            }
            st.errors_retried++;
            nbd_close(h);
            h = NULL;
        }
        if (++failures > MAX_CONSECUTIVE_FAILURES) {
            *err = "too many consecutive failures";
            return NULL;
        }
        publish(S_STATE, ST_RECONNECTING);
        h = connect_retry();
        if (h == NULL) {
            *err = stop_flag ? "stopped while reconnecting" : "reconnect timed out";
            return NULL;
        }
        st.reconnects++;
        publish(S_RECONNECTS, st.reconnects);
        outage[2] = now_ns();
    }
    uint64_t t = now_ns();
    completed(t);
    if (op->kind == OP_WRITE) {
        st.writes++;
        note_ack(op);
    } else {
        st.reads++;
        verify(buf, op->block, post_fault);
    }
    if (failures > 0) {
        outage[3] = t;
        push(&outages, outage);
        queue_checks();
        publish(S_RECOVERED, outages.n);
    }
    publish(S_STATE, ST_RUNNING);
    return h;
}

/* -- output and setup ---------------------------------------------------------------------- */

static void print_pairs(const char *name, const struct pairs *p)
{
    printf(",\"%s\":[", name);
    for (size_t i = 0; i < p->n; i++) {
        printf("%s[", i ? "," : "");
        for (size_t j = 0; j < p->width; j++)
            printf("%s%" PRIu64, j ? "," : "", p->v[i * p->width + j]);
        printf("]");
    }
    printf("]");
}

static void print_json(const char *err)
{
    printf("{\"ops\":%" PRIu64 ",\"reads\":%" PRIu64 ",\"writes\":%" PRIu64
           ",\"errors_retried\":%" PRIu64 ",\"reconnects\":%" PRIu64
           ",\"connect_attempts\":%" PRIu64 ",\"verify_failures\":%" PRIu64
           ",\"lost\":%" PRIu64 ",\"post_fault_checks\":%" PRIu64 ",\"gap_threshold_ns\":%" PRIu64,
           st.ops, st.reads, st.writes, st.errors_retried, st.reconnects, st.connect_attempts,
           st.verify_failures, st.lost, st.post_fault_checks, cfg.gap_ns);
    print_pairs("gaps", &gaps);
    print_pairs("outages", &outages);
    if (err != NULL)
        printf(",\"error\":\"%s\"", err);
    printf("}\n");
    fflush(stdout);
}

static void usage(void)
{
    fprintf(stderr, "usage: nbdretry -s SOCKET [-e EXPORT] -z SPAN_BYTES -S STATUS_FILE "
                    "[-t RETRY_TIMEOUT_MS] [-g GAP_US] [-w WRITE_PCT] [-r SEED] [-n MAX_OPS] "
                    "[-d SECONDS]\n");
    exit(64);
}

static void parse_args(int argc, char **argv)
{
    int c;
    while ((c = getopt(argc, argv, "s:e:z:S:t:g:w:r:n:d:")) != -1) {
        switch (c) {
        case 's': cfg.socket = optarg; break;
        case 'e': cfg.export_name = optarg; break;
        case 'z': cfg.span = strtoull(optarg, NULL, 0); break;
        case 'S': cfg.status_path = optarg; break;
        case 't': cfg.retry_timeout_ns = strtoull(optarg, NULL, 0) * 1000000ull; break;
        case 'g': cfg.gap_ns = strtoull(optarg, NULL, 0) * 1000ull; break;
        case 'w': cfg.write_pct = (unsigned)strtoul(optarg, NULL, 0); break;
        case 'r': cfg.seed = strtoull(optarg, NULL, 0); break;
        case 'n': cfg.max_ops = strtoull(optarg, NULL, 0); break;
        case 'd': cfg.duration_s = strtod(optarg, NULL); break;
        default: usage();
        }
    }
    if (cfg.socket == NULL || cfg.status_path == NULL || cfg.span < BLK || cfg.write_pct > 100)
        usage();
    rng_state = cfg.seed ? cfg.seed : 1;
}

static void setup(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: sleeps return early on a stop request */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive the controller */

    int fd = open(cfg.status_path, O_RDWR);
    if (fd < 0 || ftruncate(fd, STATUS_BYTES) < 0) {
        perror(cfg.status_path);
        exit(1);
    }
    status = mmap(NULL, STATUS_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    size_t nblocks = cfg.span / BLK;
    versions = calloc(nblocks, sizeof *versions);
    acked = calloc(nblocks, sizeof *acked);
    if (status == MAP_FAILED || versions == NULL || acked == NULL) {
        perror("setup");
        exit(1);
    }
}

int main(int argc, char **argv)
{
    const char *err = NULL;

    parse_args(argc, argv);
    setup();
    if (getppid() == 1)
        return 1; /* the controller died before the death signal was armed */

    struct nbd_handle *h = connect_retry();
    if (h == NULL) {
        fprintf(stderr, "nbdretry: cannot connect to %s: %s\n", cfg.socket, nbd_get_error());
        print_json("initial connect failed");
        return 2;
    }
    int64_t size = nbd_get_size(h);
    if (size < 0 || (uint64_t)size < cfg.span) {
        fprintf(stderr, "nbdretry: export size %" PRId64 " < span %" PRIu64 "\n", size, cfg.span);
        print_json("export smaller than span");
        return 2;
    }
    publish(S_STATE, ST_RUNNING);
    uint64_t end = cfg.duration_s > 0 ? now_ns() + (uint64_t)(cfg.duration_s * 1e9) : 0;

    while (!stop_flag && (cfg.max_ops == 0 || st.ops < cfg.max_ops) &&
           (end == 0 || st.last_ok_ns < end)) {
        int post_fault = checks_n > 0;
        struct op op = next_op();
        h = run_op(h, &op, post_fault, &err);
        if (h == NULL)
            break;
    }
    if (h != NULL) {
        nbd_shutdown(h, 0);
        nbd_close(h);
    }
    if (err != NULL)
        fprintf(stderr, "nbdretry: giving up: %s: %s\n", err, nbd_get_error());
    publish(S_STATE, ST_DONE);
    print_json(err);
    return err != NULL ? 2 : 0;
}
