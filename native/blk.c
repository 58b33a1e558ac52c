/* blk.c - the I/O partition's block server thread and the native block client.
 *
 * Server loop, per endpoint in turn (round robin, so one flooding client cannot
 * starve the others): pop (copy out) -> check the copy -> check the range against
 * the endpoint's extent -> translate every fragment -> submit to the engine. Then
 * reap completions, re-check each client's memory generation, push responses, and
 * publish once per endpoint per pass. A request is taken only when its endpoint's
 * response ring has room for it and for everything already in flight, so a client
 * that does not read its responses holds back only itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "iop_blk.h"
#include "iop_channel.h"
#include "iop_internal.h"
#include "iop_journal.h"
#include "iop_worker.h"
#include "iop_xlate.h"

#define MAX_IOV 64
#define EP_FREE 0
#define EP_ACTIVE 1
#define EP_REMOVING 2

#define BUMP(field, v) __atomic_store_n(&(field), (field) + (v), __ATOMIC_RELAXED)

struct ep {
    int state;
    int broken_seen;
    struct iop_chan *ch;
    const struct iop_xlate_table *xlate;
    struct iop_blk_endpoint_cfg cfg;
    uint32_t inflight;
    int dirty;
    struct iop_jrnl *j;   /* failover channels: the in-flight journal, else NULL */
    struct iop_blk_stats st;
};

struct req {
    struct ep *e;
    uint64_t id;
    uint64_t offset;
    uint64_t t0;
    uint32_t len;
    uint32_t gen;
    uint16_t op;
    int jidx;
    int niov;
    int next_free;
    struct iovec iov[MAX_IOV];
};

struct iop_blk_server {
    uint8_t *pool;
    uint64_t pool_len;
    struct iop_blk_server_cfg cfg;
    pthread_t thread;
    int wake_fd;
    int stopping;
    pthread_mutex_t mu; /* serialises add/remove callers, never taken by the thread */
    struct ep eps[IOP_BLK_MAX_ENDPOINTS];
    struct req *reqs;
    int free_head;
    int uring;
    struct io_uring ring;
    int uring_efd;
    uint32_t uring_pending; /* sqes prepared, not yet submitted */
    struct iop_blk_server_stats st;
};

static void hist_add(struct iop_blk_stats *st, uint64_t ns)
{
    int b = 0;
    if (ns >= (1u << IOP_BLK_HIST_SHIFT)) {
        b = 63 - __builtin_clzll(ns) - (IOP_BLK_HIST_SHIFT - 1);
        if (b >= IOP_BLK_HIST_BUCKETS)
            b = IOP_BLK_HIST_BUCKETS - 1;
    }
    BUMP(st->hist[b], 1);
    BUMP(st->lat_sum_ns, ns);
}

static struct req *req_get(struct iop_blk_server *s)
{
    if (s->free_head < 0)
        return NULL;
    struct req *r = &s->reqs[s->free_head];
    s->free_head = r->next_free;
    return r;
}

static void req_put(struct iop_blk_server *s, struct req *r)
{
    r->next_free = s->free_head;
    s->free_head = (int)(r - s->reqs);
}

static void respond(struct ep *e, int jidx, uint64_t id, uint16_t op, int status, uint32_t len,
                    uint64_t offset)
{
    struct iop_desc rsp;
    memset(&rsp, 0, IOP_DESC_HDR_SIZE);
    rsp.id = id;
    rsp.opcode = op;
    rsp.status = status;
    rsp.len = status == 0 ? len : 0;
    rsp.offset = offset;
    if (iop_jrnl_push(e->j, e->ch, jidx, &rsp) == 0)
        e->dirty = 1;
}

/* Make pushed completions visible; only then are their journal entries done with. */
static void publish(struct ep *e)
{
    iop_jrnl_publish(e->j, e->ch);
    e->dirty = 0;
}

static void refuse(struct ep *e, int jidx, const struct iop_desc *d, int err, uint64_t *counter)
{
    BUMP(*counter, 1);
    BUMP(e->st.refused, 1);
    respond(e, jidx, d->id, d->opcode, err, 0, d->offset);
}

static void complete(struct iop_blk_server *s, struct req *r, int64_t res)
{
    struct ep *e = r->e;
    int status = 0;
    if (res < 0) {
        status = (int)res;
        BUMP(e->st.errors, 1);
    } else if (r->op != IOP_OP_FLUSH && (uint64_t)res != r->len) {
        status = -EIO; /* short transfer inside the extent: the device failed */
        BUMP(e->st.errors, 1);
    } else if (r->op != IOP_OP_FLUSH && !iop_xlate_valid(e->xlate, r->gen)) {
        /* the client's memory was reassigned while the I/O ran */
        status = -ESTALE;
        BUMP(e->st.refused_stale, 1);
        BUMP(e->st.refused, 1);
    }
    if (status == 0) {
        if (r->op == IOP_OP_READ) {
            BUMP(e->st.reads, 1);
            BUMP(e->st.bytes_read, r->len);
        } else if (r->op == IOP_OP_WRITE) {
            BUMP(e->st.writes, 1);
            BUMP(e->st.bytes_written, r->len);
        } else {
            BUMP(e->st.flushes, 1);
        }
    }
    hist_add(&e->st, iop_now_ns() - r->t0);
    respond(e, r->jidx, r->id, r->op, status, r->len, r->offset);
    e->inflight--;
    BUMP(e->st.inflight, -1);
    BUMP(s->st.completed, 1);
    req_put(s, r);
}

static int64_t psync_io(struct req *r)
{
    int fd = r->e->cfg.fd;
    if (r->op == IOP_OP_FLUSH)
        return fdatasync(fd) ? -errno : 0;
    uint64_t pos = r->e->cfg.base + r->offset;
    ssize_t n = r->op == IOP_OP_READ ? preadv(fd, r->iov, r->niov, (off_t)pos)
                                     : pwritev(fd, r->iov, r->niov, (off_t)pos);
    return n < 0 ? -errno : n;
}

static int64_t nowait_io(struct req *r)
{
    uint64_t pos = r->e->cfg.base + r->offset;
    ssize_t n = r->op == IOP_OP_READ
                    ? preadv2(r->e->cfg.fd, r->iov, r->niov, (off_t)pos, RWF_NOWAIT)
                    : pwritev2(r->e->cfg.fd, r->iov, r->niov, (off_t)pos, RWF_NOWAIT);
    return n < 0 ? -errno : n;
}

static int uring_prep(struct iop_blk_server *s, struct req *r)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&s->ring);
    if (!sqe)
        return -EAGAIN;
    int fd = r->e->cfg.fd;
    uint64_t pos = r->e->cfg.base + r->offset;
    if (r->op == IOP_OP_FLUSH)
        io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
    else if (r->niov == 1 && r->op == IOP_OP_READ)
        io_uring_prep_read(sqe, fd, r->iov[0].iov_base, (unsigned)r->iov[0].iov_len, pos);
    else if (r->niov == 1)
        io_uring_prep_write(sqe, fd, r->iov[0].iov_base, (unsigned)r->iov[0].iov_len, pos);
    else if (r->op == IOP_OP_READ)
        io_uring_prep_readv(sqe, fd, r->iov, (unsigned)r->niov, pos);
    else
        io_uring_prep_writev(sqe, fd, r->iov, (unsigned)r->niov, pos);
    io_uring_sqe_set_data(sqe, r);
    s->uring_pending++;
    return 0;
}

/* Check one private descriptor copy and start it. */
static void start(struct iop_blk_server *s, struct ep *e, const struct iop_desc *d, int jidx)
{
    const char *why = NULL;
    uint64_t t0 = iop_now_ns();
    if (iop_desc_check(e->ch, d, &why)) {
        refuse(e, jidx, d, -EINVAL, &e->st.refused_desc);
        return;
    }
    if (d->opcode == IOP_OP_NULL || d->opcode == IOP_OP_ECHO) {
        respond(e, jidx, d->id, d->opcode, 0, 0, d->offset); /* understood by every server */
        return;
    }
    if (d->opcode != IOP_OP_READ && d->opcode != IOP_OP_WRITE && d->opcode != IOP_OP_FLUSH) {
        refuse(e, jidx, d, -EOPNOTSUPP, &e->st.refused_op);
        return;
    }
    if (d->opcode == IOP_OP_WRITE && (e->cfg.flags & IOP_BLK_RO)) {
        refuse(e, jidx, d, -EROFS, &e->st.refused_ro);
        return;
    }
    struct req *r = req_get(s);
    r->e = e;
    r->id = d->id;
    r->op = d->opcode;
    r->jidx = jidx;
    r->offset = d->offset;
    r->len = d->len;
    r->t0 = t0;
    r->niov = 0;
    r->gen = 0;
    if (d->opcode != IOP_OP_FLUSH) {
        uint64_t total = 0;
        for (uint16_t i = 0; i < d->nfrags; i++)
            total += d->frags[i].len;
        uint64_t align = e->cfg.align ? e->cfg.align : 1;
        if (d->nfrags == 0 || total != d->len) {
            req_put(s, r);
            refuse(e, jidx, d, -EINVAL, &e->st.refused_desc);
            return;
        }
        if (d->offset > e->cfg.size || d->len > e->cfg.size - d->offset ||
            d->offset % align || d->len % align) {
            req_put(s, r);
            refuse(e, jidx, d, -ERANGE, &e->st.refused_range);
            return;
        }
        /* reading the device writes client memory, and the reverse */
        uint32_t access = d->opcode == IOP_OP_READ ? IOP_ACCESS_WRITE : IOP_ACCESS_READ;
        for (uint16_t i = 0; i < d->nfrags; i++) {
            struct iop_sg sg[MAX_IOV];
            uint32_t gen = 0;
            int n = iop_xlate(e->xlate, d->frags[i].addr, d->frags[i].len, access, sg,
                              MAX_IOV - r->niov, &gen);
            if (n < 0) {
                req_put(s, r);
                if (n == -E2BIG)
                    refuse(e, jidx, d, n, &e->st.refused_desc);
                else
                    refuse(e, jidx, d, n == -EACCES ? -EACCES : -EFAULT, &e->st.refused_addr);
                return;
            }
            if (i == 0)
                r->gen = gen;
            else if (gen != r->gen) {
                req_put(s, r);
                refuse(e, jidx, d, -ESTALE, &e->st.refused_stale);
                return;
            }
            for (int k = 0; k < n; k++) {
                if (sg[k].pool_off > s->pool_len || sg[k].len > s->pool_len - sg[k].pool_off ||
                    ((e->cfg.flags & IOP_BLK_DIRECT) && (sg[k].pool_off % align ||
                                                         sg[k].len % align))) {
                    req_put(s, r);
                    refuse(e, jidx, d, -EINVAL, &e->st.refused_addr);
                    return;
                }
                r->iov[r->niov].iov_base = s->pool + sg[k].pool_off;
                r->iov[r->niov].iov_len = sg[k].len;
                r->niov++;
            }
        }
    }
    e->inflight++;
    BUMP(e->st.inflight, 1);
    BUMP(s->st.submitted, 1);
    if (s->uring && !(e->cfg.flags & IOP_BLK_DIRECT) && r->op != IOP_OP_FLUSH) {
        /* page cache hit: done inline, as fast as a plain pread; a miss (EAGAIN or a
         * short transfer) goes to io_uring whole, which is safe because block I/O is
         * idempotent by position */
        int64_t n = nowait_io(r);
        if (n == (int64_t)r->len || (n < 0 && n != -EAGAIN && n != -EOPNOTSUPP)) {
            BUMP(s->st.inline_done, 1);
            complete(s, r, n);
            return;
        }
        if (r->op == IOP_OP_WRITE) {
            /* a buffered write that cannot promise not to block (ext4 here) only copies
             * into the page cache: doing it here costs less than an io-wq worker thread
             * that would compete with this one for its CPU */
            BUMP(s->st.inline_done, 1);
            complete(s, r, psync_io(r));
            return;
        }
    }
    if (s->uring && uring_prep(s, r) == 0)
        return;
    complete(s, r, psync_io(r));
}

static int reap(struct iop_blk_server *s)
{
    struct io_uring_cqe *cqe;
    int n = 0;
    if (IO_URING_READ_ONCE(*s->ring.sq.kflags) & IORING_SQ_TASKRUN)
        io_uring_get_events(&s->ring);
    while (io_uring_peek_cqe(&s->ring, &cqe) == 0) {
        struct req *r = io_uring_cqe_get_data(cqe);
        int64_t res = cqe->res;
        io_uring_cqe_seen(&s->ring, cqe);
        complete(s, r, res);
        n++;
    }
    return n;
}

static void drain(int fd)
{
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof v);
    (void)r;
}

static int should_stop(struct iop_blk_server *s)
{
    return __atomic_load_n(&s->stopping, __ATOMIC_ACQUIRE);
}

/* Arm every endpoint's event index and sleep until a doorbell, a completion, a
 * control change or the timeout. */
static void sleep_all(struct iop_blk_server *s)
{
    struct pollfd p[IOP_BLK_MAX_ENDPOINTS + 2];
    int n = 0, held = 0;
    p[n++] = (struct pollfd){.fd = s->wake_fd, .events = POLLIN};
    if (s->uring && s->uring_efd >= 0)
        p[n++] = (struct pollfd){.fd = s->uring_efd, .events = POLLIN};
    for (int i = 0; i < IOP_BLK_MAX_ENDPOINTS; i++) {
        struct ep *e = &s->eps[i];
        if (__atomic_load_n(&e->state, __ATOMIC_ACQUIRE) != EP_ACTIVE || iop_chan_broken(e->ch))
            continue;
        if (iop_chan_tx_room(e->ch) <= e->inflight) {
            /* its client is not taking responses: its requests wait, and so does it */
            held = 1;
            continue;
        }
        if (iop_chan_arm(e->ch) != 0)
            return; /* work arrived, or the channel just broke */
        int fd = iop_chan_wait_fd(e->ch);
        if (fd >= 0)
            p[n++] = (struct pollfd){.fd = fd, .events = POLLIN};
    }
    if (s->uring && s->uring_efd >= 0 && io_uring_cq_ready(&s->ring))
        return;
    BUMP(s->st.sleeps, 1);
    /* with I/O in flight, wake at least every millisecond to run its completions; a
     * held-back client is looked at as often (it rings no doorbell when it catches up) */
    int busy = held || (s->uring && s->st.submitted != s->st.completed);
    int rc = poll(p, (nfds_t)n, busy ? 1 : 100);
    if (rc <= 0)
        return;
    for (int i = 0; i < n; i++)
        if (p[i].revents & POLLIN)
            drain(p[i].fd);
}

static void *server_main(void *arg)
{
    struct iop_blk_server *s = arg;
    struct iop_desc d;
    iop_pin_cpu(s->cfg.cpu);
    uint64_t last = iop_now_ns();
    while (!should_stop(s)) {
        BUMP(s->st.loops, 1);
        int progress = 0;
        for (int i = 0; i < IOP_BLK_MAX_ENDPOINTS; i++) {
            struct ep *e = &s->eps[i];
            int state = __atomic_load_n(&e->state, __ATOMIC_ACQUIRE);
            if (state == EP_FREE)
                continue;
            if (state == EP_REMOVING) {
                if (e->inflight == 0) {
                    if (e->dirty)
                        publish(e);
                    iop_chan_sync_counters(e->ch);
                    __atomic_store_n(&e->state, EP_FREE, __ATOMIC_RELEASE);
                }
                continue;
            }
            if (iop_chan_broken(e->ch)) {
                if (!e->broken_seen) {
                    e->broken_seen = 1;
                    BUMP(s->st.broken_channels, 1);
                }
                continue;
            }
            for (uint32_t n = 0; n < s->cfg.batch; n++) {
                if (iop_chan_tx_room(e->ch) <= e->inflight || s->free_head < 0)
                    break;
                if (s->uring && io_uring_sq_space_left(&s->ring) == 0) {
                    io_uring_submit(&s->ring);
                    s->uring_pending = 0;
                    if (io_uring_sq_space_left(&s->ring) == 0)
                        break;
                }
                int jidx = -1;
                if (!e->j) {
                    if (iop_chan_pop(e->ch, &d))
                        break;
                } else {
                    /* a channel taken over: its journal runs first, in order */
                    jidx = iop_jrnl_next_replay(e->j, &d);
                    if (jidx == -EAGAIN)
                        jidx = iop_jrnl_take(e->j, e->ch, &d);
                    if (jidx < 0)
                        break;
                }
                progress++;
                start(s, e, &d, jidx);
            }
        }
        if (s->uring) {
            if (s->uring_pending) {
                io_uring_submit(&s->ring);
                s->uring_pending = 0;
            }
            progress += reap(s);
        }
        int published = 0;
        for (int i = 0; i < IOP_BLK_MAX_ENDPOINTS; i++) {
            struct ep *e = &s->eps[i];
            if (e->dirty) {
                publish(e);
                iop_chan_sync_counters(e->ch);
                published = 1;
            }
        }
        if (published)
            BUMP(s->st.batches, 1);
        uint64_t now = iop_now_ns();
        if (progress) {
            last = now;
            continue;
        }
        if (now - last < s->cfg.spin_ns) {
            iop_cpu_relax();
            continue;
        }
        sleep_all(s);
        last = iop_now_ns();
    }
    return NULL;
}

int iop_blk_server_start(void *pool_base, uint64_t pool_len, const struct iop_blk_server_cfg *cfg,
                         struct iop_blk_server **out)
{
    if (!pool_base || !cfg || !out || cfg->engine > IOP_BLK_ENGINE_URING)
        return -EINVAL;
    struct iop_blk_server *s = calloc(1, sizeof *s);
    if (!s)
        return -ENOMEM;
    s->pool = pool_base;
    s->pool_len = pool_len;
    s->cfg = *cfg;
    if (!s->cfg.batch)
        s->cfg.batch = 32;
    if (!s->cfg.queue_depth)
        s->cfg.queue_depth = 256;
    if (s->cfg.queue_depth > 4096)
        s->cfg.queue_depth = 4096;
    s->reqs = calloc(s->cfg.queue_depth, sizeof *s->reqs);
    s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->uring_efd = -1;
    int rc = 0;
    if (!s->reqs || s->wake_fd < 0) {
        rc = s->reqs ? -errno : -ENOMEM;
        goto fail;
    }
    for (uint32_t i = 0; i < s->cfg.queue_depth; i++)
        s->reqs[i].next_free = i + 1 < s->cfg.queue_depth ? (int)i + 1 : -1;
    s->free_head = 0;
    pthread_mutex_init(&s->mu, NULL);
    if (cfg->engine == IOP_BLK_ENGINE_URING) {
        /* completions are run when this thread next enters the kernel (it polls the
         * ring anyway) instead of interrupting it with an IPI for each one */
        rc = io_uring_queue_init(s->cfg.queue_depth, &s->ring,
                                 IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG);
        if (rc == -EINVAL)
            rc = io_uring_queue_init(s->cfg.queue_depth, &s->ring, 0);
        if (rc < 0)
            goto fail;
        s->uring = 1;
        s->uring_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (s->uring_efd < 0 || io_uring_register_eventfd(&s->ring, s->uring_efd) < 0) {
            rc = -errno;
            goto fail;
        }
    }
    rc = -pthread_create(&s->thread, NULL, server_main, s);
    if (rc)
        goto fail;
    *out = s;
    return 0;
fail:
    if (s->uring)
        io_uring_queue_exit(&s->ring);
    if (s->uring_efd >= 0)
        close(s->uring_efd);
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    free(s->reqs);
    free(s);
    return rc;
}

static void wake(struct iop_blk_server *s) { iop_wake_fd(s->wake_fd); }

int iop_blk_server_add(struct iop_blk_server *s, struct iop_chan *ch,
                       const struct iop_xlate_table *xlate, const struct iop_blk_endpoint_cfg *cfg,
                       struct iop_jrnl *jrnl)
{
    if (!s || !ch || !xlate || !cfg || iop_chan_role(ch) != IOP_ROLE_SERVER || cfg->fd < 0)
        return -EINVAL;
    if (cfg->size == 0 || cfg->base + cfg->size < cfg->base)
        return -EINVAL;
    if (cfg->align & (cfg->align - 1))
        return -EINVAL;
    pthread_mutex_lock(&s->mu);
    int id = -ENOSPC;
    for (int i = 0; i < IOP_BLK_MAX_ENDPOINTS; i++) {
        struct ep *e = &s->eps[i];
        if (__atomic_load_n(&e->state, __ATOMIC_ACQUIRE) != EP_FREE)
            continue;
        memset(e, 0, sizeof *e);
        e->j = jrnl;
        e->ch = ch;
        e->xlate = xlate;
        e->cfg = *cfg;
        __atomic_store_n(&e->state, EP_ACTIVE, __ATOMIC_RELEASE);
        id = i;
        break;
    }
    pthread_mutex_unlock(&s->mu);
    if (id >= 0)
        wake(s);
    return id;
}

int iop_blk_server_remove(struct iop_blk_server *s, int id)
{
    if (!s || id < 0 || id >= IOP_BLK_MAX_ENDPOINTS)
        return -EINVAL;
    struct ep *e = &s->eps[id];
    pthread_mutex_lock(&s->mu);
    int state = __atomic_load_n(&e->state, __ATOMIC_ACQUIRE);
    if (state != EP_ACTIVE) {
        pthread_mutex_unlock(&s->mu);
        return -ENOENT;
    }
    __atomic_store_n(&e->state, EP_REMOVING, __ATOMIC_RELEASE);
    wake(s);
    /* the thread frees the slot once nothing of it is in flight */
    iop_wait_slot(&e->state, EP_FREE, s->wake_fd);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int iop_blk_endpoint_stats(struct iop_blk_server *s, int id, struct iop_blk_stats *out)
{
    if (!s || id < 0 || id >= IOP_BLK_MAX_ENDPOINTS)
        return -EINVAL;
    iop_load_counters(out, &s->eps[id].st, sizeof *out);
    return 0;
}

void iop_blk_server_stats(struct iop_blk_server *s, struct iop_blk_server_stats *out)
{
    iop_load_counters(out, &s->st, sizeof *out);
}

int iop_blk_server_stop(struct iop_blk_server *s)
{
    if (!s)
        return -EINVAL;
    __atomic_store_n(&s->stopping, 1, __ATOMIC_RELEASE);
    wake(s);
    pthread_join(s->thread, NULL);
    if (s->uring) {
        /* finish what the kernel still holds: its buffers are client memory */
        while (s->st.submitted > s->st.completed) {
            struct io_uring_cqe *cqe;
            if (io_uring_wait_cqe(&s->ring, &cqe))
                break;
            struct req *r = io_uring_cqe_get_data(cqe);
            int64_t res = cqe->res;
            io_uring_cqe_seen(&s->ring, cqe);
            complete(s, r, res);
        }
        for (int i = 0; i < IOP_BLK_MAX_ENDPOINTS; i++)
            if (s->eps[i].dirty)
                publish(&s->eps[i]);
        io_uring_queue_exit(&s->ring);
        close(s->uring_efd);
    }
    close(s->wake_fd);
    pthread_mutex_destroy(&s->mu);
    free(s->reqs);
    free(s);
    return 0;
}

/* ---- native block client --------------------------------------------------- */

#define UNKNOWN_VERSION 0xffffffffu

struct slot {
    uint64_t id;
    uint64_t block;
    uint64_t t0;
    uint32_t version;
    int write;
    int busy;
};

static uint64_t rnd(uint64_t *x)
{
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    return *x * 0x2545F4914F6CDD1DULL;
}

static void pattern(uint64_t *p, uint32_t bs, uint64_t seed, uint64_t block, uint32_t version)
{
    uint64_t x = seed ^ (block * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)version << 32) ^ 1;
    p[0] = block;
    p[1] = version;
    for (uint32_t i = 2; i < bs / 8; i++)
        p[i] = rnd(&x);
}

static int pattern_ok(const uint64_t *p, uint32_t bs, uint64_t seed, uint64_t block,
                      uint32_t version)
{
    uint64_t x = seed ^ (block * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)version << 32) ^ 1;
    if (p[0] != block || p[1] != version)
        return 0;
    for (uint32_t i = 2; i < bs / 8; i++)
        if (p[i] != rnd(&x))
            return 0;
    return 1;
}

int iop_blk_client_run(struct iop_chan *ch, const struct iop_blk_job *job, uint64_t *lat_ns,
                       struct iop_blk_job_result *res)
{
    if (!ch || !job || !res || iop_chan_role(ch) != IOP_ROLE_CLIENT)
        return -EINVAL;
    uint32_t bs = job->block_size, qd = job->queue_depth;
    if (bs < 512 || bs % 512 || qd < 1 || qd > 1024 || job->write_pct > 100)
        return -EINVAL;
    if (job->buf_len < (uint64_t)qd * bs || job->span < bs || !job->buf)
        return -EINVAL;
    uint64_t nblocks = job->span / bs;
    memset(res, 0, sizeof *res);
    struct slot *slots = calloc(qd, sizeof *slots);
    uint32_t *versions = job->versions;
    if (job->verify && !versions)
        versions = calloc(nblocks, sizeof *versions);
    uint8_t *busy = calloc(nblocks, 1);
    if (!slots || !busy || (job->verify && !versions)) {
        free(slots);
        if (versions != job->versions)
            free(versions);
        free(busy);
        return -ENOMEM;
    }
    uint64_t x = job->seed ? job->seed : 0x853c49e6748fea9bULL;
    uint64_t issued = 0, done = 0, lat_i = 0;
    /* ids are unique on the channel across jobs: a late duplicate of an earlier
     * job's completion is recognised as one */
    uint64_t id_base = ch->next_id;
    /* verify state kept across jobs: the stamps must not depend on a job's seed */
    uint64_t stamp_key = job->versions ? 0x10da7a5eedULL : job->seed;
    uint32_t inflight = 0;
    int rc = 0;
    struct iop_desc d, r;
    memset(&d, 0, sizeof d);
    uint64_t t_start = iop_now_ns();
    while (done < job->n_ops) {
        int pushed = 0;
        while (inflight < qd && issued < job->n_ops && iop_chan_tx_free(ch) > 0) {
            uint32_t k = 0;
            while (slots[k].busy)
                k++;
            uint64_t blk = job->sequential ? issued % nblocks : rnd(&x) % nblocks;
            for (uint64_t t = 0; busy[blk] && t < nblocks; t++)
                blk = (blk + 1) % nblocks;
            struct slot *sl = &slots[k];
            sl->busy = 1;
            sl->block = blk;
            sl->write = (uint32_t)(rnd(&x) % 100) < job->write_pct;
            busy[blk] = 1;
            uint8_t *buf = (uint8_t *)job->buf + (uint64_t)k * bs;
            if (sl->write && job->verify) {
                uint32_t v = versions[blk];
                sl->version = (v == UNKNOWN_VERSION ? 0 : v) + 1;
                if (sl->version == UNKNOWN_VERSION)
                    sl->version = 1;
                pattern((uint64_t *)buf, bs, stamp_key, blk, sl->version);
            }
            sl->id = ((id_base + issued) << 10) | k;
            d.id = sl->id;
            d.opcode = sl->write ? IOP_OP_WRITE : IOP_OP_READ;
            d.len = bs;
            d.offset = blk * bs;
            d.nfrags = 1;
            d.frags[0].addr = job->buf_prpa + (uint64_t)k * bs;
            d.frags[0].len = bs;
            d.frags[0].access = sl->write ? IOP_ACCESS_READ : IOP_ACCESS_WRITE;
            sl->t0 = iop_now_ns();
            rc = iop_chan_push(ch, &d);
            if (rc)
                goto out;
            issued++;
            inflight++;
            pushed = 1;
        }
        if (pushed)
            iop_chan_publish(ch);
        rc = iop_chan_pop(ch, &r);
        if (rc == -EAGAIN) {
            rc = iop_chan_wait(ch, -1, job->timeout_ms);
            if (rc < 0)
                goto out;
            continue;
        }
        if (rc)
            goto out;
        uint32_t k = (uint32_t)(r.id & 1023);
        if (k >= qd || !slots[k].busy || slots[k].id != r.id) {
            /* not in our shadow of in-flight requests: a completion delivered twice
             * (or one never asked for); dropped, counted */
            res->duplicates++;
            continue;
        }
        struct slot *sl = &slots[k];
        uint64_t now = iop_now_ns();
        if (lat_ns && lat_i < job->n_ops)
            lat_ns[lat_i++] = now - sl->t0;
        if (job->done_ns && done < job->n_ops)
            job->done_ns[done] = now;
        if (r.status < 0) {
            res->errors++;
            if (!res->first_error)
                res->first_error = r.status;
            if (sl->write && job->verify)
                versions[sl->block] = UNKNOWN_VERSION;
        } else if (sl->write) {
            res->writes++;
            if (job->verify)
                versions[sl->block] = sl->version;
        } else {
            res->reads++;
            uint32_t v = job->verify ? versions[sl->block] : 0;
            if (v && v != UNKNOWN_VERSION) {
                const uint64_t *buf = (const uint64_t *)((uint8_t *)job->buf + (uint64_t)k * bs);
                if (pattern_ok(buf, bs, stamp_key, sl->block, v))
                    res->verified_bytes += bs;
                else
                    res->verify_failures++;
            }
        }
        busy[sl->block] = 0;
        sl->busy = 0;
        inflight--;
        done++;
        res->ops++;
    }
    rc = 0;
out:
    ch->next_id = id_base + issued + 1;
    res->elapsed_ns = iop_now_ns() - t_start;
    free(slots);
    if (versions != job->versions)
        free(versions);
    free(busy);
    return rc;
}
