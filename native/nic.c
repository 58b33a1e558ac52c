/* nic.c - a guest's NIC driver loops: round trips, echo, blast, TAP bridge. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iop_channel.h"
#include "iop_internal.h"
#include "iop_nic.h"
#include "iop_vswitch.h"
#include "iop_worker.h"

#define TXBIT (1ULL << 32)

/* The loops' shadow of their requests in flight: per buffer, the id of the request
 * it is with the switch for, IDLE, or HELD (a receive buffer an earlier run posted,
 * id unknown). Ids carry the buffer index in bits 0-31, bit 32 for a transmit, and a
 * count of the channel's requests above, so that a late completion of an earlier
 * request on the same buffer is not taken for the one in flight. */
#define IDLE UINT64_MAX
#define HELD (UINT64_MAX - 1)
#define SEQ_SHIFT 33

struct shadow {
    uint64_t *own;
    uint32_t nbufs;
    uint64_t seq;
    uint64_t *duplicates;
};

static int shadow_init(struct shadow *sh, struct iop_chan *ch, uint32_t nbufs,
                       uint64_t *duplicates)
{
    sh->own = malloc((size_t)nbufs * sizeof *sh->own);
    if (!sh->own)
        return -ENOMEM;
    for (uint32_t i = 0; i < nbufs; i++)
        sh->own[i] = IDLE;
    sh->nbufs = nbufs;
    sh->seq = ch->next_id;
    sh->duplicates = duplicates;
    return 0;
}

static void shadow_fini(struct shadow *sh, struct iop_chan *ch)
{
    ch->next_id = sh->seq;
    free(sh->own);
}

static int post_rx(struct iop_chan *ch, struct shadow *sh, uint64_t buf_prpa, uint32_t i)
{
    struct iop_desc d;
    memset(&d, 0, IOP_DESC_HDR_SIZE + IOP_FRAG_SIZE);
    d.id = i | ((sh->seq & 0x7fffffffu) << SEQ_SHIFT);
    d.opcode = IOP_OP_NET_RX;
    d.len = IOP_NIC_BUF;
    d.nfrags = 1;
    d.frags[0].addr = buf_prpa + (uint64_t)i * IOP_NIC_BUF;
    d.frags[0].len = IOP_NIC_BUF;
    d.frags[0].access = IOP_ACCESS_WRITE;
    int rc = iop_chan_push(ch, &d);
    if (rc == 0) {
        sh->own[i] = d.id;
        sh->seq++;
    }
    return rc;
}

static int send_tx(struct iop_chan *ch, struct shadow *sh, uint64_t buf_prpa, uint32_t i,
                   uint32_t len)
{
    struct iop_desc d;
    memset(&d, 0, IOP_DESC_HDR_SIZE + IOP_FRAG_SIZE);
    d.id = TXBIT | i | ((sh->seq & 0x7fffffffu) << SEQ_SHIFT);
    d.opcode = IOP_OP_NET_TX;
    d.len = len;
    d.nfrags = 1;
    d.frags[0].addr = buf_prpa + (uint64_t)i * IOP_NIC_BUF;
    d.frags[0].len = len;
    d.frags[0].access = IOP_ACCESS_READ;
    int rc = iop_chan_push(ch, &d);
    if (rc == 0) {
        sh->own[i] = d.id;
        sh->seq++;
    }
    return rc;
}

/* A receive buffer the switch holds when the loop starts (posted by an earlier run). */
static void held_rx(struct shadow *sh, uint32_t i) { sh->own[i] = HELD; }

/* The buffer a completion is for, taken back from the switch; or -1 when its id is not
 * in the shadow (a completion delivered twice, say by a switch that took the port over,
 * or one never asked for): dropped, counted. */
static int64_t claim(struct shadow *sh, uint64_t id)
{
    uint64_t i = id & 0xffffffffu;
    if (i >= sh->nbufs ||
        (sh->own[i] != id && !(sh->own[i] == HELD && !(id & TXBIT)))) {
        if (sh->duplicates)
            (*sh->duplicates)++;
        return -1;
    }
    sh->own[i] = IDLE;
    return (int64_t)i;
}

static void header(uint8_t *f, const uint8_t *dst, const uint8_t *src, uint32_t len)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = 0x88; /* local experimental ethertype */
    f[13] = 0xb5;
    memset(f + 14, 0x5a, len - 14);
}

static int check_args(struct iop_chan *ch, uint8_t *base, uint32_t nbufs, uint32_t min_bufs)
{
    if (!ch || !base || nbufs < min_bufs || iop_chan_role(ch) != IOP_ROLE_CLIENT)
        return -EINVAL;
    return 0;
}

int iop_nic_pingpong(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                     int posted, const uint8_t *src, const uint8_t *dst, uint32_t frame_len,
                     uint64_t n, uint64_t *lat_ns, int timeout_ms, uint64_t *duplicates)
{
    int rc = check_args(ch, base, nbufs, 2);
    if (rc || frame_len < 22 || frame_len > IOP_NIC_BUF)
        return rc ? rc : -EINVAL;
    struct shadow sh;
    if ((rc = shadow_init(&sh, ch, nbufs, duplicates)))
        return rc;
    uint32_t nrx = nbufs - 1, tx = nbufs - 1;
    for (uint32_t i = 0; i < nrx; i++) {
        if (posted)
            held_rx(&sh, i);
        else if ((rc = post_rx(ch, &sh, buf_prpa, i)))
            goto out;
    }
    iop_chan_publish(ch);
    uint8_t *txf = base + buf_prpa + (uint64_t)tx * IOP_NIC_BUF;
    header(txf, dst, src, frame_len);
    struct iop_desc r;
    for (uint64_t k = 0; k < n; k++) {
        memcpy(txf + 14, &k, sizeof k);
        uint64_t t0 = iop_now_ns();
        if ((rc = send_tx(ch, &sh, buf_prpa, tx, frame_len)))
            goto out;
        iop_chan_publish(ch);
        int sent = 0, got = 0;
        while (!sent || !got) {
            if ((rc = iop_chan_pop_wait(ch, &r, timeout_ms)))
                goto out;
            int64_t i = claim(&sh, r.id);
            if (i < 0)
                continue;
            if (r.id & TXBIT) {
                if (r.status < 0) {
                    rc = r.status;
                    goto out;
                }
                sent = 1;
                continue;
            }
            uint8_t *f = base + buf_prpa + (uint64_t)i * IOP_NIC_BUF;
            uint64_t seq;
            memcpy(&seq, f + 14, sizeof seq);
            if (r.status == 0 && r.len == frame_len && seq == k) {
                got = 1;
                if (lat_ns)
                    lat_ns[k] = iop_now_ns() - t0;
            }
            if ((rc = post_rx(ch, &sh, buf_prpa, (uint32_t)i)))
                goto out;
            iop_chan_publish(ch);
        }
    }
    rc = 0;
out:
    shadow_fini(&sh, ch);
    return rc;
}

int64_t iop_nic_echo(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                     int posted, const uint8_t *mac, int reply, uint64_t n,
                     const volatile uint32_t *stop, int timeout_ms, uint64_t *duplicates)
{
    int rc = check_args(ch, base, nbufs, 1);
    if (rc)
        return rc;
    struct shadow sh;
    if ((rc = shadow_init(&sh, ch, nbufs, duplicates)))
        return rc;
    int64_t seen = 0;
    for (uint32_t i = 0; i < nbufs; i++) {
        if (posted)
            held_rx(&sh, i);
        else if ((rc = post_rx(ch, &sh, buf_prpa, i)))
            goto out;
    }
    iop_chan_publish(ch);
    struct iop_desc r;
    uint64_t idle_since = iop_now_ns();
    while ((uint64_t)seen < n && !(stop && *stop)) {
        rc = iop_chan_pop(ch, &r);
        if (rc == -EAGAIN) {
            rc = iop_chan_wait(ch, -1, 50);
            if (rc == -ETIMEDOUT) {
                if (timeout_ms >= 0 &&
                    iop_now_ns() - idle_since > (uint64_t)timeout_ms * 1000000u)
                    break;
                continue;
            }
            if (rc < 0)
                goto out;
            continue;
        }
        if (rc)
            goto out;
        idle_since = iop_now_ns();
        int64_t k = claim(&sh, r.id);
        if (k < 0)
            continue;
        uint32_t i = (uint32_t)k;
        if (r.id & TXBIT) {
            rc = post_rx(ch, &sh, buf_prpa, i); /* the reply left: the buffer takes frames again */
        } else if (r.status == 0 && reply) {
            uint8_t *f = base + buf_prpa + (uint64_t)i * IOP_NIC_BUF;
            memcpy(f, f + 6, 6);
            memcpy(f + 6, mac, 6);
            seen++;
            rc = send_tx(ch, &sh, buf_prpa, i, r.len);
        } else {
            seen += r.status == 0;
            rc = post_rx(ch, &sh, buf_prpa, i);
        }
        if (rc)
            goto out;
        iop_chan_publish(ch);
    }
    rc = 0;
out:
    shadow_fini(&sh, ch);
    return rc ? rc : seen;
}

int64_t iop_nic_blast(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                      const uint8_t *src, const uint8_t *dst, uint32_t frame_len, uint64_t n,
                      uint64_t *elapsed_ns, int timeout_ms, uint64_t *duplicates)
{
    int rc = check_args(ch, base, nbufs, 1);
    if (rc || frame_len < 14 || frame_len > IOP_NIC_BUF)
        return rc ? rc : -EINVAL;
    uint32_t nb = nbufs < 4096 ? nbufs : 4096;
    struct shadow sh;
    if ((rc = shadow_init(&sh, ch, nb, duplicates)))
        return rc;
    for (uint32_t i = 0; i < nb; i++)
        header(base + buf_prpa + (uint64_t)i * IOP_NIC_BUF, dst, src, frame_len);
    uint32_t free_bufs[4096], nfree = 0;
    for (uint32_t i = 0; i < nb; i++)
        free_bufs[nfree++] = i;
    uint64_t sent = 0, done = 0;
    int64_t accepted = 0;
    struct iop_desc r;
    uint64_t t0 = iop_now_ns();
    while (done < n) {
        int pushed = 0;
        while (nfree && sent < n && iop_chan_tx_free(ch)) {
            if ((rc = send_tx(ch, &sh, buf_prpa, free_bufs[--nfree], frame_len)))
                goto out;
            sent++;
            pushed = 1;
        }
        if (pushed)
            iop_chan_publish(ch);
        if ((rc = iop_chan_pop_wait(ch, &r, timeout_ms)))
            goto out;
        if (!(r.id & TXBIT))
            continue; /* a frame into a buffer an earlier loop posted: not ours to count */
        int64_t i = claim(&sh, r.id);
        if (i < 0)
            continue;
        free_bufs[nfree++] = (uint32_t)i;
        done++;
        accepted += r.status == 0;
    }
    if (elapsed_ns)
        *elapsed_ns = iop_now_ns() - t0;
    rc = 0;
out:
    shadow_fini(&sh, ch);
    return rc ? rc : accepted;
}

int iop_nic_bridge(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                   int tap_fd, int stop_fd, uint64_t spin_ns, uint64_t *counters,
                   uint64_t *duplicates)
{
    int rc = check_args(ch, base, nbufs, 2);
    if (rc || tap_fd < 0 || !counters)
        return rc ? rc : -EINVAL;
    uint32_t nrx = nbufs / 2;
    uint32_t nb = nbufs - nrx < 4096 ? nbufs : nrx + 4096;
    struct shadow sh;
    if ((rc = shadow_init(&sh, ch, nb, duplicates)))
        return rc;
    uint32_t free_tx[4096], nfree = 0;
    for (uint32_t i = nrx; i < nb; i++)
        free_tx[nfree++] = i;
    for (uint32_t i = 0; i < nrx; i++)
        if ((rc = post_rx(ch, &sh, buf_prpa, i)))
            goto out;
    iop_chan_publish(ch);
    struct iop_desc r;
    uint64_t last = iop_now_ns();
    for (;;) {
        int progress = 0, pushed = 0;
        while (nfree && iop_chan_tx_free(ch)) {
            uint32_t k = free_tx[nfree - 1];
            ssize_t got = read(tap_fd, base + buf_prpa + (uint64_t)k * IOP_NIC_BUF, IOP_NIC_BUF);
            if (got <= 0)
                break;
            nfree--;
            if ((rc = send_tx(ch, &sh, buf_prpa, k, (uint32_t)got)))
                goto out;
            counters[0]++;
            pushed = progress = 1;
        }
        if (pushed)
            iop_chan_publish(ch);
        int reposted = 0;
        while ((rc = iop_chan_pop(ch, &r)) == 0) {
            progress = 1;
            int64_t k = claim(&sh, r.id);
            if (k < 0)
                continue;
            uint32_t i = (uint32_t)k;
            if (r.id & TXBIT) {
                if (r.status < 0)
                    counters[3]++;
                free_tx[nfree++] = i;
                continue;
            }
            if (r.status == 0) {
                ssize_t w = write(tap_fd, base + buf_prpa + (uint64_t)i * IOP_NIC_BUF, r.len);
                counters[w == (ssize_t)r.len ? 1 : 2]++;
            }
            if ((rc = post_rx(ch, &sh, buf_prpa, i)))
                goto out;
            reposted = 1;
        }
        if (rc != -EAGAIN)
            goto out;
        if (reposted)
            iop_chan_publish(ch);
        uint64_t now = iop_now_ns();
        if (progress) {
            last = now;
            continue;
        }
        if (now - last < spin_ns) {
            iop_cpu_relax();
            continue;
        }
        if (iop_chan_arm(ch) != 0)
            continue;
        struct pollfd p[3] = {{.fd = stop_fd, .events = POLLIN},
                              {.fd = iop_chan_wait_fd(ch), .events = POLLIN},
                              {.fd = nfree ? tap_fd : -1, .events = POLLIN}};
        int n = poll(p, 3, 100);
        if (n > 0 && (p[0].revents & (POLLIN | POLLHUP | POLLERR))) {
            rc = 0;
            goto out;
        }
        if (n > 0 && (p[1].revents & POLLIN)) {
            uint64_t v;
            ssize_t x = read(p[1].fd, &v, sizeof v);
            (void)x;
        }
        last = iop_now_ns();
    }
out:
    shadow_fini(&sh, ch);
    return rc;
}

/* ---- sequence-numbered traffic ------------------------------------------------ */

#define SEQ_HDR 22

static uint32_t seq_len(uint64_t k) { return 60 + (uint32_t)((k * 37) % 1441); }

static uint8_t seq_byte(uint64_t k, uint32_t i) { return (uint8_t)(k * 131 + i); }

uint32_t iop_nic_seq_frame(uint8_t *f, const uint8_t *src, const uint8_t *dst, uint64_t k)
{
    uint32_t len = seq_len(k);
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = 0x88;
    f[13] = 0xb5;
    for (int b = 0; b < 8; b++)
        f[14 + b] = (uint8_t)(k >> (8 * b));
    for (uint32_t i = SEQ_HDR; i < len; i++)
        f[i] = seq_byte(k, i);
    return len;
}

int iop_nic_seq_check(const uint8_t *f, uint32_t len, const uint8_t *src, const uint8_t *dst,
                      uint64_t *k)
{
    if (!f || len < SEQ_HDR)
        return -EINVAL;
    uint64_t v = 0;
    for (int b = 0; b < 8; b++)
        v |= (uint64_t)f[14 + b] << (8 * b);
    if (len != seq_len(v) || memcmp(f, dst, 6) || memcmp(f + 6, src, 6) || f[12] != 0x88 ||
        f[13] != 0xb5)
        return -EINVAL;
    for (uint32_t i = SEQ_HDR; i < len; i++)
        if (f[i] != seq_byte(v, i))
            return -EINVAL;
    if (k)
        *k = v;
    return 0;
}

/* how long a sender with nothing in flight waits for credit before it sends anyway */
#define CREDIT_STALL_NS 20000000ull

int iop_nic_seq_send(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                     const uint8_t *src, const uint8_t *dst, struct iop_nic_seq_tx *job)
{
    int rc = check_args(ch, base, nbufs, 1);
    if (rc || !job)
        return rc ? rc : -EINVAL;
    uint32_t nb = nbufs < 4096 ? nbufs : 4096;
    struct shadow sh;
    if ((rc = shadow_init(&sh, ch, nb, &job->duplicates)))
        return rc;
    uint32_t free_bufs[4096], nfree = 0;
    for (uint32_t i = 0; i < nb; i++)
        free_bufs[nfree++] = nb - 1 - i;
    uint64_t extra = 0, blocked_since = 0;
    struct iop_desc r;
    for (;;) {
        int stopping = job->stop && __atomic_load_n(job->stop, __ATOMIC_ACQUIRE);
        int pushed = 0;
        while (!stopping && nfree && job->queued < job->n && iop_chan_tx_free(ch)) {
            uint64_t k = job->first + job->queued;
            if (job->credit && k >= __atomic_load_n(job->credit, __ATOMIC_ACQUIRE) + extra) {
                /* the receiver is behind; but frames it will never see (lost) must not
                 * stop the sender for good */
                uint64_t now = iop_now_ns();
                if (nfree < nb || !blocked_since) {
                    blocked_since = nfree < nb ? 0 : now;
                    break;
                }
                if (now - blocked_since < CREDIT_STALL_NS)
                    break;
                extra++;
                job->stalls++;
            }
            blocked_since = 0;
            uint32_t i = free_bufs[--nfree];
            uint32_t len = iop_nic_seq_frame(base + buf_prpa + (uint64_t)i * IOP_NIC_BUF, src,
                                             dst, k);
            if ((rc = send_tx(ch, &sh, buf_prpa, i, len)))
                goto out;
            job->queued++;
            pushed = 1;
        }
        if (pushed)
            iop_chan_publish(ch);
        if (nfree == nb) {
            if (stopping || job->queued >= job->n)
                break;
            struct timespec ts = {0, 50000}; /* waiting for credit */
            nanosleep(&ts, NULL);
            continue;
        }
        if ((rc = iop_chan_pop_wait(ch, &r, job->timeout_ms)))
            goto out;
        if (!(r.id & TXBIT))
            continue; /* a frame into a buffer an earlier loop posted: not ours */
        int64_t i = claim(&sh, r.id);
        if (i < 0)
            continue;
        free_bufs[nfree++] = (uint32_t)i;
        if (r.status == 0)
            job->accepted++;
        else
            job->failed++;
    }
    rc = 0;
out:
    shadow_fini(&sh, ch);
    return rc;
}

int iop_nic_seq_recv(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                     const uint8_t *src, const uint8_t *dst, struct iop_nic_seq_rx *job)
{
    int rc = check_args(ch, base, nbufs, 1);
    if (rc || !job || (!job->counts && job->max_seq))
        return rc ? rc : -EINVAL;
    struct shadow sh;
    if ((rc = shadow_init(&sh, ch, nbufs, &job->duplicates)))
        return rc;
    for (uint32_t i = 0; i < nbufs; i++) {
        if (job->posted)
            held_rx(&sh, i);
        else if ((rc = post_rx(ch, &sh, buf_prpa, i)))
            goto out;
    }
    iop_chan_publish(ch);
    uint64_t high = 0;
    uint32_t reposted = 0;
    struct iop_desc r;
    while (!(job->stop && __atomic_load_n(job->stop, __ATOMIC_ACQUIRE))) {
        rc = iop_chan_pop(ch, &r);
        if (rc == -EAGAIN || reposted >= 32) {
            if (reposted)
                iop_chan_publish(ch);
            reposted = 0;
        }
        if (rc == -EAGAIN) {
            rc = iop_chan_wait(ch, -1, 20);
            if (rc < 0 && rc != -ETIMEDOUT)
                goto out;
            continue;
        }
        if (rc)
            goto out;
        int64_t i = claim(&sh, r.id);
        if (i < 0)
            continue;
        if (r.status == 0) {
            uint64_t k = 0;
            const uint8_t *f = base + buf_prpa + (uint64_t)i * IOP_NIC_BUF;
            if (r.len > IOP_NIC_BUF || iop_nic_seq_check(f, r.len, src, dst, &k) ||
                k >= job->max_seq) {
                job->bad++;
            } else {
                job->frames++;
                if (job->counts[k] < UINT8_MAX)
                    job->counts[k]++;
                if (k + 1 > high) {
                    high = k + 1;
                    if (job->credit)
                        __atomic_store_n(job->credit, high + job->window, __ATOMIC_RELEASE);
                }
            }
        } else {
            job->errors++;
        }
        if ((rc = post_rx(ch, &sh, buf_prpa, (uint32_t)i)))
            goto out;
        reposted++;
    }
    iop_chan_publish(ch);
    rc = 0;
out:
    shadow_fini(&sh, ch);
    return rc;
}
