/* worker.c - the native server loop of a channel and native client loops.
 *
 * Queue loop shape: pop (copy out) -> check the copy -> translate every fragment
 * -> handle -> push the response; after the batch, one publish, which rings the
 * client's doorbell only if the client asked for one.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "iop_channel.h"
#include "iop_internal.h"
#include "iop_worker.h"
#include "iop_xlate.h"

#ifndef IOP_BUILD_STAMP
#define IOP_BUILD_STAMP "unstamped"
#endif

#define XLATE_MAX_SG 16

int iop_abi_version(void) { return IOP_ABI_VERSION; }
const char *iop_build_stamp(void) { return IOP_BUILD_STAMP; }

struct iop_worker {
    struct iop_chan *ch;
    const struct iop_xlate_table *xlate;
    struct iop_worker_cfg cfg;
    pthread_t thread;
    int stop_fd;
    int stopping;
    struct iop_worker_stats stats;
};

int iop_pin_cpu(int cpu)
{
    if (cpu < 0)
        return 0;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof set, &set) ? -errno : 0;
}

static int refuse_desc(struct iop_worker *w, int err, const char *why)
{
    w->ch->stats.refused++;
    w->ch->last_error = why;
    return err;
}

/* Validate one private descriptor copy and run the handler. Returns the status. */
static int serve_one(struct iop_worker *w, const struct iop_desc *d)
{
    const char *why = NULL;
    int rc = iop_desc_check(w->ch, d, &why);
    if (rc) {
        w->stats.refused_desc++;
        w->ch->stats.bad_desc++;
        return refuse_desc(w, rc, why);
    }
    for (uint16_t i = 0; i < d->nfrags; i++) {
        struct iop_sg sg[XLATE_MAX_SG];
        uint32_t gen;
        rc = w->xlate ? iop_xlate(w->xlate, d->frags[i].addr, d->frags[i].len,
                                  d->frags[i].access, sg, XLATE_MAX_SG, &gen)
                      : -EFAULT;
        if (rc < 0) {
            if (rc == -EACCES) {
                w->stats.refused_access++;
                return refuse_desc(w, rc, "fragment without the access it asks for");
            }
            w->stats.refused_addr++;
            return refuse_desc(w, rc, "fragment outside the client's memory");
        }
    }
    switch (w->cfg.handler) {
    case IOP_HANDLER_NULL:
        if (d->opcode == IOP_OP_NULL || d->opcode == IOP_OP_ECHO)
            return 0;
        return refuse_desc(w, -EOPNOTSUPP, "opcode not served by this endpoint");
    default:
        return refuse_desc(w, -EOPNOTSUPP, "no handler");
    }
}

static int should_stop(struct iop_worker *w)
{
    return __atomic_load_n(&w->stopping, __ATOMIC_ACQUIRE);
}

static void count(uint64_t *c) { __atomic_store_n(c, *c + 1, __ATOMIC_RELAXED); }

static void *worker_main(void *arg)
{
    struct iop_worker *w = arg;
    struct iop_chan *ch = w->ch;
    struct iop_desc d, rsp;
    iop_pin_cpu(w->cfg.cpu);
    iop_chan_set_spin(ch, w->cfg.spin_ns);
    memset(&rsp, 0, sizeof rsp);
    while (!should_stop(w)) {
        uint32_t n = 0;
        while (n < w->cfg.batch && iop_chan_tx_free(ch) > 0) {
            if (iop_chan_pop(ch, &d))
                break;
            n++;
            count(&w->stats.requests);
            int status = serve_one(w, &d);
            if (status == 0 && (d.flags & IOP_DF_NOREPLY)) {
                count(&w->stats.completed);
                continue;
            }
            rsp.id = d.id;
            rsp.opcode = d.opcode;
            rsp.status = status;
            rsp.len = status == 0 ? d.len : 0;
            rsp.offset = d.offset;
            if (iop_chan_push(ch, &rsp) == 0)
                count(&w->stats.completed);
        }
        if (n) {
            iop_chan_publish(ch);
            count(&w->stats.batches);
            iop_chan_sync_counters(ch);
            continue;
        }
        if (iop_chan_broken(ch)) {
            count(&w->stats.broken);
            /* a broken channel is parked until Python stops the worker */
            uint64_t v;
            ssize_t r = read(w->stop_fd, &v, sizeof v);
            (void)r;
            break;
        }
        if (iop_chan_tx_free(ch) == 0) {
            /* the client is not taking its responses: hold its requests back */
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
            continue;
        }
        int rc = iop_chan_wait(ch, w->stop_fd, 200);
        if (rc == 0)
            count(&w->stats.wakeups);
    }
    iop_chan_sync_counters(ch);
    return NULL;
}

int iop_worker_start(struct iop_chan *ch, const struct iop_xlate_table *xlate,
                     const struct iop_worker_cfg *cfg, struct iop_worker **out)
{
    if (!ch || !cfg || !out || iop_chan_role(ch) != IOP_ROLE_SERVER)
        return -EINVAL;
    struct iop_worker *w = calloc(1, sizeof *w);
    if (!w)
        return -ENOMEM;
    w->ch = ch;
    w->xlate = xlate;
    w->cfg = *cfg;
    if (!w->cfg.batch)
        w->cfg.batch = 32;
    w->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (w->stop_fd < 0) {
        int e = -errno;
        free(w);
        return e;
    }
    int rc = pthread_create(&w->thread, NULL, worker_main, w);
    if (rc) {
        close(w->stop_fd);
        free(w);
        return -rc;
    }
    *out = w;
    return 0;
}

int iop_worker_stop(struct iop_worker *w)
{
    if (!w)
        return -EINVAL;
    __atomic_store_n(&w->stopping, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    ssize_t r = write(w->stop_fd, &one, sizeof one);
    (void)r;
    pthread_join(w->thread, NULL);
    close(w->stop_fd);
    free(w);
    return 0;
}

void iop_worker_stats(const struct iop_worker *w, struct iop_worker_stats *out)
{
    iop_load_counters(out, &w->stats, sizeof *out);
}

/* ---- native client loops ------------------------------------------------ */

int iop_client_roundtrips(struct iop_chan *ch, uint64_t n, uint64_t *lat_ns, int timeout_ms)
{
    if (iop_chan_role(ch) != IOP_ROLE_CLIENT)
        return -EINVAL;
    struct iop_desc d, r;
    memset(&d, 0, sizeof d);
    d.opcode = IOP_OP_NULL;
    for (uint64_t i = 0; i < n; i++) {
        d.id = ch->next_id++;
        uint64_t t0 = iop_now_ns();
        int rc = iop_chan_push(ch, &d);
        if (rc)
            return rc;
        iop_chan_publish(ch);
        rc = iop_chan_pop_wait(ch, &r, timeout_ms);
        if (rc)
            return rc;
        if (r.id != d.id)
            return -EIO;
        if (r.status < 0)
            return r.status;
        if (lat_ns)
            lat_ns[i] = iop_now_ns() - t0;
    }
    return 0;
}

static int await_consumed(struct iop_chan *ch, uint64_t deadline)
{
    /* the request ring's consumer index is the server's progress */
    unsigned k = 0;
    while (__atomic_load_n(&ch->tx->cons, __ATOMIC_ACQUIRE) != ch->tx_prod) {
        iop_cpu_relax();
        if ((++k & 1023) == 0 && iop_now_ns() > deadline)
            return -ETIMEDOUT;
    }
    return 0;
}

int iop_client_oneway(struct iop_chan *ch, uint64_t n, uint32_t batch, uint64_t *elapsed_ns,
                      int timeout_ms)
{
    if (iop_chan_role(ch) != IOP_ROLE_CLIENT || !batch)
        return -EINVAL;
    struct iop_desc d;
    memset(&d, 0, sizeof d);
    d.opcode = IOP_OP_NULL;
    d.flags = IOP_DF_NOREPLY;
    uint64_t t0 = iop_now_ns();
    uint64_t deadline = t0 + (uint64_t)(timeout_ms < 0 ? 60000 : timeout_ms) * 1000000u;
    for (uint64_t i = 0; i < n; i++) {
        d.id = ch->next_id++;
        unsigned k = 0;
        int rc;
        while ((rc = iop_chan_push(ch, &d)) == -EAGAIN) {
            iop_chan_publish(ch);
            iop_cpu_relax();
            if ((++k & 1023) == 0 && iop_now_ns() > deadline)
                return -ETIMEDOUT;
        }
        if (rc)
            return rc;
        if ((i + 1) % batch == 0)
            iop_chan_publish(ch);
    }
    iop_chan_publish(ch);
    int rc = await_consumed(ch, deadline);
    if (rc)
        return rc;
    *elapsed_ns = iop_now_ns() - t0;
    return 0;
}
