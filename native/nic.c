/* nic.c - a guest's NIC driver loops: round trips, echo, blast, TAP bridge. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

#include "iop_channel.h"
#include "iop_internal.h"
#include "iop_nic.h"
#include "iop_vswitch.h"
#include "iop_worker.h"

#define TXBIT (1ULL << 32)

static int post_rx(struct iop_chan *ch, uint64_t buf_prpa, uint32_t i)
{
    struct iop_desc d;
    memset(&d, 0, IOP_DESC_HDR_SIZE + IOP_FRAG_SIZE);
    d.id = i;
    d.opcode = IOP_OP_NET_RX;
    d.len = IOP_NIC_BUF;
    d.nfrags = 1;
    d.frags[0].addr = buf_prpa + (uint64_t)i * IOP_NIC_BUF;
    d.frags[0].len = IOP_NIC_BUF;
    d.frags[0].access = IOP_ACCESS_WRITE;
    return iop_chan_push(ch, &d);
}

static int send_tx(struct iop_chan *ch, uint64_t buf_prpa, uint32_t i, uint32_t len)
{
    struct iop_desc d;
    memset(&d, 0, IOP_DESC_HDR_SIZE + IOP_FRAG_SIZE);
    d.id = TXBIT | i;
    d.opcode = IOP_OP_NET_TX;
    d.len = len;
    d.nfrags = 1;
    d.frags[0].addr = buf_prpa + (uint64_t)i * IOP_NIC_BUF;
    d.frags[0].len = len;
    d.frags[0].access = IOP_ACCESS_READ;
    return iop_chan_push(ch, &d);
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
                     uint64_t n, uint64_t *lat_ns, int timeout_ms)
{
    int rc = check_args(ch, base, nbufs, 2);
    if (rc || frame_len < 22 || frame_len > IOP_NIC_BUF)
        return rc ? rc : -EINVAL;
    uint32_t nrx = nbufs - 1, tx = nbufs - 1;
    for (uint32_t i = 0; i < nrx && !posted; i++)
        if ((rc = post_rx(ch, buf_prpa, i)))
            return rc;
    iop_chan_publish(ch);
    uint8_t *txf = base + buf_prpa + (uint64_t)tx * IOP_NIC_BUF;
    header(txf, dst, src, frame_len);
    struct iop_desc r;
    for (uint64_t k = 0; k < n; k++) {
        memcpy(txf + 14, &k, sizeof k);
        uint64_t t0 = iop_now_ns();
        if ((rc = send_tx(ch, buf_prpa, tx, frame_len)))
            return rc;
        iop_chan_publish(ch);
        int sent = 0, got = 0;
        while (!sent || !got) {
            if ((rc = iop_chan_pop_wait(ch, &r, timeout_ms)))
                return rc;
            if (r.id & TXBIT) {
                if (r.status < 0)
                    return r.status;
                sent = 1;
                continue;
            }
            if (r.id >= nrx)
                return -EIO;
            uint8_t *f = base + buf_prpa + r.id * IOP_NIC_BUF;
            uint64_t seq;
            memcpy(&seq, f + 14, sizeof seq);
            if (r.status == 0 && r.len == frame_len && seq == k) {
                got = 1;
                if (lat_ns)
                    lat_ns[k] = iop_now_ns() - t0;
            }
            if ((rc = post_rx(ch, buf_prpa, (uint32_t)r.id)))
                return rc;
            iop_chan_publish(ch);
        }
    }
    return 0;
}

int64_t iop_nic_echo(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                     int posted, const uint8_t *mac, int reply, uint64_t n,
                     const volatile uint32_t *stop, int timeout_ms)
{
    int rc = check_args(ch, base, nbufs, 1);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < nbufs && !posted; i++)
        if ((rc = post_rx(ch, buf_prpa, i)))
            return rc;
    iop_chan_publish(ch);
    int64_t seen = 0;
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
                return rc;
            continue;
        }
        if (rc)
            return rc;
        idle_since = iop_now_ns();
        uint32_t i = (uint32_t)(r.id & 0xffffffffu);
        if (i >= nbufs)
            return -EIO;
        if (r.id & TXBIT) {
            rc = post_rx(ch, buf_prpa, i); /* the reply left: the buffer takes frames again */
        } else if (r.status == 0 && reply) {
            uint8_t *f = base + buf_prpa + (uint64_t)i * IOP_NIC_BUF;
            memcpy(f, f + 6, 6);
            memcpy(f + 6, mac, 6);
            seen++;
            rc = send_tx(ch, buf_prpa, i, r.len);
        } else {
            seen += r.status == 0;
            rc = post_rx(ch, buf_prpa, i);
        }
        if (rc)
            return rc;
        iop_chan_publish(ch);
    }
    return seen;
}

int64_t iop_nic_blast(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                      const uint8_t *src, const uint8_t *dst, uint32_t frame_len, uint64_t n,
                      uint64_t *elapsed_ns, int timeout_ms)
{
    int rc = check_args(ch, base, nbufs, 1);
    if (rc || frame_len < 14 || frame_len > IOP_NIC_BUF)
        return rc ? rc : -EINVAL;
    for (uint32_t i = 0; i < nbufs; i++)
        header(base + buf_prpa + (uint64_t)i * IOP_NIC_BUF, dst, src, frame_len);
    uint32_t free_bufs[4096], nfree = 0;
    for (uint32_t i = 0; i < nbufs && i < 4096; i++)
        free_bufs[nfree++] = i;
    uint64_t sent = 0, done = 0;
    int64_t accepted = 0;
    struct iop_desc r;
    uint64_t t0 = iop_now_ns();
    while (done < n) {
        int pushed = 0;
        while (nfree && sent < n && iop_chan_tx_free(ch)) {
            if ((rc = send_tx(ch, buf_prpa, free_bufs[--nfree], frame_len)))
                return rc;
            sent++;
            pushed = 1;
        }
        if (pushed)
            iop_chan_publish(ch);
        if ((rc = iop_chan_pop_wait(ch, &r, timeout_ms)))
            return rc;
        uint32_t i = (uint32_t)(r.id & 0xffffffffu);
        if (!(r.id & TXBIT))
            continue; /* a frame into a buffer an earlier loop posted: not ours to count */
        if (i >= nbufs)
            return -EIO;
        free_bufs[nfree++] = i;
        done++;
        accepted += r.status == 0;
    }
    if (elapsed_ns)
        *elapsed_ns = iop_now_ns() - t0;
    return accepted;
}

int iop_nic_bridge(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                   int tap_fd, int stop_fd, uint64_t spin_ns, uint64_t *counters)
{
    int rc = check_args(ch, base, nbufs, 2);
    if (rc || tap_fd < 0 || !counters)
        return rc ? rc : -EINVAL;
    uint32_t nrx = nbufs / 2;
    uint32_t free_tx[4096], nfree = 0;
    for (uint32_t i = nrx; i < nbufs && nfree < 4096; i++)
        free_tx[nfree++] = i;
    for (uint32_t i = 0; i < nrx; i++)
        if ((rc = post_rx(ch, buf_prpa, i)))
            return rc;
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
            if ((rc = send_tx(ch, buf_prpa, k, (uint32_t)got)))
                return rc;
            counters[0]++;
            pushed = progress = 1;
        }
        if (pushed)
            iop_chan_publish(ch);
        int reposted = 0;
        while ((rc = iop_chan_pop(ch, &r)) == 0) {
            progress = 1;
            uint32_t i = (uint32_t)(r.id & 0xffffffffu);
            if (i >= nbufs)
                return -EIO;
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
            if ((rc = post_rx(ch, buf_prpa, i)))
                return rc;
            reposted = 1;
        }
        if (rc != -EAGAIN)
            return rc;
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
        if (n > 0 && (p[0].revents & (POLLIN | POLLHUP | POLLERR)))
            return 0;
        if (n > 0 && (p[1].revents & POLLIN)) {
            uint64_t v;
            ssize_t x = read(p[1].fd, &v, sizeof v);
            (void)x;
        }
        last = iop_now_ns();
    }
}
