/* raw_ring.c - the limits iopart's channel is measured against, in one binary.
 *
 *   raw_ring rtt     N CPU_CLIENT CPU_SERVER OUT   shared-memory SPSC rings, both spinning
 *   raw_ring eventfd N CPU_CLIENT CPU_SERVER OUT   eventfd ping-pong, both blocking
 *   raw_ring oneway  N CPU_CLIENT CPU_SERVER BATCH one-way 64 B messages, spinning
 *
 * Two processes (fork). A round trip carries a 64 B message each way; the client
 * times each one with CLOCK_MONOTONIC exactly as iopart's client loop does and
 * writes the latencies (uint64 ns) to OUT. Prints one JSON line on stdout.
 * No validation, no descriptors, no doorbells: this is the floor.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NSLOTS 256
#define MSG 64

struct ring {
    _Alignas(64) uint32_t prod;
    _Alignas(64) uint32_t cons;
    _Alignas(64) uint8_t slots[NSLOTS][MSG];
};

struct shm {
    struct ring req, rsp;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    sched_setaffinity(0, sizeof s, &s);
}

static void relax(void)
{
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
}

static void ring_send(struct ring *r, uint32_t *prod, const uint8_t *msg)
{
    while (*prod - __atomic_load_n(&r->cons, __ATOMIC_ACQUIRE) >= NSLOTS)
        relax();
    memcpy(r->slots[*prod % NSLOTS], msg, MSG);
    ++*prod;
    __atomic_store_n(&r->prod, *prod, __ATOMIC_RELEASE);
}

static void ring_recv(struct ring *r, uint32_t *cons, uint8_t *msg)
{
    while (__atomic_load_n(&r->prod, __ATOMIC_ACQUIRE) == *cons)
        relax();
    memcpy(msg, r->slots[*cons % NSLOTS], MSG);
    ++*cons;
    __atomic_store_n(&r->cons, *cons, __ATOMIC_RELEASE);
}

static int write_lat(const char *path, const uint64_t *lat, uint64_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(lat, sizeof *lat, n, f) != n) {
        perror(path);
        return 1;
    }
    return fclose(f) ? 1 : 0;
}

static int run_rtt(uint64_t n, int cc, int cs, const char *out)
{
    struct shm *m = mmap(NULL, sizeof *m, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return perror("mmap"), 1;
    memset(m, 0, sizeof *m);
    pid_t pid = fork();
    if (pid == 0) {
        pin(cs);
        uint8_t msg[MSG];
        uint32_t c = 0, p = 0;
        for (uint64_t i = 0; i < n; i++) {
            ring_recv(&m->req, &c, msg);
            ring_send(&m->rsp, &p, msg);
        }
        _exit(0);
    }
    pin(cc);
    uint64_t *lat = malloc(n * sizeof *lat);
    uint8_t msg[MSG] = {0};
    uint32_t c = 0, p = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        memcpy(msg, &i, sizeof i);
        ring_send(&m->req, &p, msg);
        ring_recv(&m->rsp, &c, msg);
        lat[i] = now_ns() - t0;
    }
    waitpid(pid, NULL, 0);
    printf("{\"mode\": \"rtt\", \"n\": %" PRIu64 "}\n", n);
    return write_lat(out, lat, n);
}

static int run_eventfd(uint64_t n, int cc, int cs, const char *out)
{
    int ping = eventfd(0, 0), pong = eventfd(0, 0);
    if (ping < 0 || pong < 0)
        return perror("eventfd"), 1;
    pid_t pid = fork();
    uint64_t v = 1;
    if (pid == 0) {
        pin(cs);
        for (uint64_t i = 0; i < n; i++) {
            if (read(ping, &v, sizeof v) != sizeof v || write(pong, &v, sizeof v) != sizeof v)
                _exit(1);
        }
        _exit(0);
    }
    pin(cc);
    uint64_t *lat = malloc(n * sizeof *lat);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        v = 1;
        if (write(ping, &v, sizeof v) != sizeof v || read(pong, &v, sizeof v) != sizeof v) {
            kill(pid, SIGKILL);
            return perror("eventfd ping-pong"), 1;
        }
        lat[i] = now_ns() - t0;
    }
    waitpid(pid, NULL, 0);
    printf("{\"mode\": \"eventfd\", \"n\": %" PRIu64 "}\n", n);
    return write_lat(out, lat, n);
}

static int run_oneway(uint64_t n, int cc, int cs, uint32_t batch)
{
    struct shm *m = mmap(NULL, sizeof *m, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return perror("mmap"), 1;
    memset(m, 0, sizeof *m);
    pid_t pid = fork();
    if (pid == 0) {
        pin(cs);
        uint8_t msg[MSG];
        uint32_t c = 0;
        uint64_t sum = 0;
        for (uint64_t i = 0; i < n; i++) {
            ring_recv(&m->req, &c, msg);
            sum += msg[0];
        }
        _exit(sum == 0xdeadbeef);
    }
    pin(cc);
    uint8_t msg[MSG] = {0};
    uint32_t p = 0;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
        /* batch publication: fill up to `batch` slots, then one index store */
        while (p - __atomic_load_n(&m->req.cons, __ATOMIC_ACQUIRE) >= NSLOTS)
            relax();
        msg[0] = (uint8_t)i;
        memcpy(m->req.slots[p % NSLOTS], msg, MSG);
        p++;
        if (p % batch == 0 || i + 1 == n)
            __atomic_store_n(&m->req.prod, p, __ATOMIC_RELEASE);
    }
    while (__atomic_load_n(&m->req.cons, __ATOMIC_ACQUIRE) != p)
        relax();
    uint64_t el = now_ns() - t0;
    waitpid(pid, NULL, 0);
    printf("{\"mode\": \"oneway\", \"n\": %" PRIu64 ", \"elapsed_ns\": %" PRIu64 "}\n", n, el);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s rtt|eventfd N CPU_CLIENT CPU_SERVER OUT\n"
                        "       %s oneway N CPU_CLIENT CPU_SERVER BATCH\n", argv[0], argv[0]);
        return 2;
    }
    uint64_t n = strtoull(argv[2], NULL, 10);
    int cc = atoi(argv[3]), cs = atoi(argv[4]);
    if (!n)
        return fprintf(stderr, "N must be positive\n"), 2;
    if (!strcmp(argv[1], "rtt"))
        return run_rtt(n, cc, cs, argv[5]);
    if (!strcmp(argv[1], "eventfd"))
        return run_eventfd(n, cc, cs, argv[5]);
    if (!strcmp(argv[1], "oneway")) {
        int b = atoi(argv[5]);
        if (b <= 0 || b > NSLOTS)
            return fprintf(stderr, "BATCH must be in 1..%d\n", NSLOTS), 2;
        return run_oneway(n, cc, cs, (uint32_t)b);
    }
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
