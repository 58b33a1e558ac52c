/* vswitch.c - the I/O partition's virtual switch thread.
 *
 * Per pass, port by port (round robin, at most `batch` each): a guest port's
 * requests are popped (copied out) and checked; a NET_RX request parks its buffer
 * on the port's receive queue, a NET_TX request has its frame gathered out of the
 * guest's memory through the region table, checked (length, source MAC) and
 * switched. An uplink's fd is read non-blocking. Switching learns the source MAC,
 * then delivers to the learned port, or floods. Delivery into a guest translates
 * its posted buffer at that moment, so memory reassigned meanwhile is refused.
 * Responses are published once per port per pass.
 *
 * A guest port may have an in-flight journal (failover, iop_journal.h): then every
 * request is taken through it, a posted receive buffer keeps its entry TAKEN while
 * it waits for a frame, every completion (frame sent, buffer filled, refusal) marks
 * its entry DONE at its response position, and the entry is retired once the port
 * published. The entries a previous switch left are run first, all of them on the
 * port's first turn: transmits are switched again (a receiver may see a frame twice),
 * receive buffers are posted again (a frame copied into one whose completion was
 * never published is lost, as a NIC may lose what it received).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "iop_channel.h"
#include "iop_internal.h"
#include "iop_journal.h"
#include "iop_vswitch.h"
#include "iop_worker.h"
#include "iop_xlate.h"

#define P_FREE 0
#define P_ACTIVE 1
#define P_REMOVING 2
#define MAX_SG 16
#define BUMP(field, v) __atomic_store_n(&(field), (field) + (v), __ATOMIC_RELAXED)

struct posted {
    uint64_t id;
    uint64_t addr;
    uint32_t len;
    int32_t jidx;   /* its journal entry (TAKEN while the buffer waits), or -1 */
};

struct port {
    int state;
    int broken_seen;
    struct iop_vport_cfg cfg;
    struct iop_chan *ch;
    const struct iop_xlate_table *xlate;
    struct posted *rxq;
    uint32_t rx_head, rx_count;
    int dirty;
    struct iop_jrnl *j;   /* failover channels: the in-flight journal, else NULL */
    struct iop_vport_stats st;
};

struct mac_entry {
    uint64_t mac; /* 48 bits; 0 = empty */
    int port;
    uint64_t seen;
};

struct iop_vswitch {
    uint8_t *pool;
    uint64_t pool_len;
    struct iop_vswitch_cfg cfg;
    pthread_t thread;
    int wake_fd;
    int stopping;
    int held;    /* set by iop_vswitch_hold: switch nothing until it is cleared */
    int pausing; /* the thread's answer: it is between passes and stays there */
    pthread_mutex_t mu;
    struct port ports[IOP_VSW_MAX_PORTS];
    struct mac_entry macs[IOP_VSW_MAC_TABLE];
    uint8_t frame[IOP_VSW_FRAME_MAX];
    struct iop_vswitch_stats st;
};

static uint64_t mac_of(const uint8_t *p)
{
    uint64_t m = 0;
    for (int i = 0; i < 6; i++)
        m = (m << 8) | p[i];
    return m;
}

static uint32_t mac_hash(uint64_t mac)
{
    return (uint32_t)((mac * 0x9E3779B97F4A7C15ULL) >> 54) & (IOP_VSW_MAC_TABLE - 1);
}

static struct mac_entry *mac_find(struct iop_vswitch *s, uint64_t mac)
{
    uint32_t h = mac_hash(mac);
    for (uint32_t i = 0; i < 16; i++) {
        struct mac_entry *e = &s->macs[(h + i) & (IOP_VSW_MAC_TABLE - 1)];
        if (e->mac == mac)
            return e;
        if (e->mac == 0)
            return NULL;
    }
    return NULL;
}

static void mac_learn(struct iop_vswitch *s, uint64_t mac, int port, uint64_t now)
{
    uint32_t h = mac_hash(mac);
    struct mac_entry *oldest = NULL;
    for (uint32_t i = 0; i < 16; i++) {
        struct mac_entry *e = &s->macs[(h + i) & (IOP_VSW_MAC_TABLE - 1)];
        if (e->mac == mac) {
            if (e->port != port)
                BUMP(s->st.moves, 1);
            e->port = port;
            e->seen = now;
            return;
        }
        if (e->mac == 0) {
            oldest = e;
            break;
        }
        if (!oldest || e->seen < oldest->seen)
            oldest = e;
    }
    /* a full probe window evicts its stalest entry: a flood of fake MACs only ever
     * costs flooding, never a crash or an unbounded table */
    oldest->mac = mac;
    oldest->port = port;
    oldest->seen = now;
    BUMP(s->st.learned, 1);
}

static void mac_forget_port(struct iop_vswitch *s, int port)
{
    /* rebuild without the port: deleting from an open-addressed table in place would
     * cut probe chains */
    struct mac_entry keep[IOP_VSW_MAC_TABLE];
    memcpy(keep, s->macs, sizeof keep);
    memset(s->macs, 0, sizeof s->macs);
    for (int i = 0; i < IOP_VSW_MAC_TABLE; i++)
        if (keep[i].mac && keep[i].port != port) {
            uint32_t h = mac_hash(keep[i].mac);
            for (uint32_t k = 0; k < 16; k++) {
                struct mac_entry *e = &s->macs[(h + k) & (IOP_VSW_MAC_TABLE - 1)];
                if (e->mac == 0) {
                    *e = keep[i];
                    break;
                }
            }
        }
}

static void respond(struct port *p, int jidx, uint64_t id, uint16_t op, int status,
                    uint32_t len)
{
    struct iop_desc r;
    memset(&r, 0, IOP_DESC_HDR_SIZE);
    r.id = id;
    r.opcode = op;
    r.status = status;
    r.len = status == 0 ? len : 0;
    if (iop_jrnl_push(p->j, p->ch, jidx, &r) == 0)
        p->dirty = 1;
}

/* Make pushed completions visible; only then are their journal entries done with. */
static void publish(struct port *p)
{
    iop_jrnl_publish(p->j, p->ch);
    p->dirty = 0;
}

static void refuse(struct port *p, int jidx, const struct iop_desc *d, int err)
{
    BUMP(p->st.refused, 1);
    respond(p, jidx, d->id, d->opcode, err, 0);
}

/* Copy len bytes between the frame buffer and guest memory [addr, addr+len). */
static int guest_copy(struct iop_vswitch *s, struct port *p, uint64_t addr, uint32_t len,
                      uint32_t access, uint8_t *frame)
{
    struct iop_sg sg[MAX_SG];
    uint32_t gen;
    int n = iop_xlate(p->xlate, addr, len, access, sg, MAX_SG, &gen);
    if (n < 0)
        return n;
    uint32_t done = 0;
    for (int i = 0; i < n; i++) {
        if (sg[i].pool_off > s->pool_len || sg[i].len > s->pool_len - sg[i].pool_off)
            return -EFAULT;
        if (access == IOP_ACCESS_READ)
            memcpy(frame + done, s->pool + sg[i].pool_off, sg[i].len);
        else
            memcpy(s->pool + sg[i].pool_off, frame + done, sg[i].len);
        done += (uint32_t)sg[i].len;
    }
    return iop_xlate_valid(p->xlate, gen) ? 0 : -ESTALE;
}

static void deliver(struct iop_vswitch *s, struct port *p, const uint8_t *frame, uint32_t len)
{
    if (p->cfg.kind == IOP_VSW_UPLINK) {
        ssize_t w = write(p->cfg.fd, frame, len);
        if (w == (ssize_t)len) {
            BUMP(p->st.rx_frames, 1);
            BUMP(p->st.rx_bytes, len);
        } else {
            BUMP(p->st.rx_dropped, 1);
        }
        return;
    }
    while (p->rx_count) {
        struct posted b = p->rxq[p->rx_head];
        p->rx_head = (p->rx_head + 1) % p->cfg.rx_slots;
        p->rx_count--;
        BUMP(p->st.rx_posted, -1);
        if (b.len < len) {
            BUMP(p->st.refused, 1);
            respond(p, b.jidx, b.id, IOP_OP_NET_RX, -EMSGSIZE, 0);
            continue;
        }
        int rc = guest_copy(s, p, b.addr, len, IOP_ACCESS_WRITE, (uint8_t *)frame);
        if (rc) {
            BUMP(p->st.refused, 1);
            respond(p, b.jidx, b.id, IOP_OP_NET_RX, rc, 0);
            continue;
        }
        BUMP(p->st.rx_frames, 1);
        BUMP(p->st.rx_bytes, len);
        respond(p, b.jidx, b.id, IOP_OP_NET_RX, 0, len);
        return;
    }
    BUMP(p->st.rx_dropped, 1);
}

static int port_active(struct port *p)
{
    return __atomic_load_n(&p->state, __ATOMIC_ACQUIRE) == P_ACTIVE &&
           (p->cfg.kind == IOP_VSW_UPLINK || !iop_chan_broken(p->ch));
}

static void forward(struct iop_vswitch *s, int src, uint32_t len)
{
    const uint8_t *f = s->frame;
    struct port *sp = &s->ports[src];
    uint64_t now = iop_now_ns();
    BUMP(s->st.frames, 1);
    BUMP(sp->st.tx_frames, 1);
    BUMP(sp->st.tx_bytes, len);
    if (!(f[6] & 1))
        mac_learn(s, mac_of(f + 6), src, now);
    if (!(f[0] & 1)) {
        struct mac_entry *e = mac_find(s, mac_of(f));
        if (e && (!s->cfg.mac_age_ns || now - e->seen < s->cfg.mac_age_ns) &&
            port_active(&s->ports[e->port])) {
            if (e->port != src)
                deliver(s, &s->ports[e->port], f, len);
            return;
        }
        BUMP(s->st.unknown_dst, 1);
    }
    BUMP(sp->st.flooded, 1);
    for (int i = 0; i < IOP_VSW_MAX_PORTS; i++)
        if (i != src && port_active(&s->ports[i]))
            deliver(s, &s->ports[i], f, len);
}

static int frame_ok(struct port *p, uint32_t len)
{
    if (len < IOP_VSW_FRAME_MIN) {
        BUMP(p->st.runts, 1);
        return 0;
    }
    if (len > (uint32_t)p->cfg.mtu + 18 || len > IOP_VSW_FRAME_MAX) {
        BUMP(p->st.oversize, 1);
        return 0;
    }
    return 1;
}

static void guest_request(struct iop_vswitch *s, int idx, const struct iop_desc *d, int jidx)
{
    struct port *p = &s->ports[idx];
    const char *why;
    if (iop_desc_check(p->ch, d, &why)) {
        refuse(p, jidx, d, -EINVAL);
        return;
    }
    if (d->opcode == IOP_OP_NET_RX) {
        if (d->nfrags != 1 || !(d->frags[0].access & IOP_ACCESS_WRITE)) {
            refuse(p, jidx, d, -EINVAL);
            return;
        }
        if (p->rx_count >= p->cfg.rx_slots) {
            refuse(p, jidx, d, -ENOBUFS);
            return;
        }
        struct posted *b = &p->rxq[(p->rx_head + p->rx_count) % p->cfg.rx_slots];
        b->id = d->id;
        b->addr = d->frags[0].addr;
        b->len = d->frags[0].len;
        b->jidx = jidx;
        p->rx_count++;
        BUMP(p->st.rx_posted, 1);
        return;
    }
    if (d->opcode != IOP_OP_NET_TX) {
        refuse(p, jidx, d, -EOPNOTSUPP);
        return;
    }
    uint64_t total = 0;
    for (uint16_t i = 0; i < d->nfrags; i++)
        total += d->frags[i].len;
    if (!frame_ok(p, (uint32_t)(total > IOP_VSW_FRAME_MAX ? IOP_VSW_FRAME_MAX + 1 : total))) {
        respond(p, jidx, d->id, d->opcode, -EMSGSIZE, 0);
        return;
    }
    uint32_t off = 0;
    for (uint16_t i = 0; i < d->nfrags; i++) {
        int rc = guest_copy(s, p, d->frags[i].addr, d->frags[i].len, IOP_ACCESS_READ,
                            s->frame + off);
        if (rc) {
            refuse(p, jidx, d, rc);
            return;
        }
        off += d->frags[i].len;
    }
    if (mac_of(s->frame + 6) != mac_of(p->cfg.mac)) {
        BUMP(p->st.spoofed, 1);
        respond(p, jidx, d->id, d->opcode, -EPERM, 0);
        return;
    }
    forward(s, idx, off);
    respond(p, jidx, d->id, d->opcode, 0, off);
}

static void drain(int fd)
{
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof v);
    (void)r;
}

static void sleep_all(struct iop_vswitch *s)
{
    struct pollfd pf[IOP_VSW_MAX_PORTS + 1];
    int kinds[IOP_VSW_MAX_PORTS + 1];
    int n = 0, held = 0;
    pf[n] = (struct pollfd){.fd = s->wake_fd, .events = POLLIN};
    kinds[n++] = 0;
    for (int i = 0; i < IOP_VSW_MAX_PORTS; i++) {
        struct port *p = &s->ports[i];
        if (__atomic_load_n(&p->state, __ATOMIC_ACQUIRE) != P_ACTIVE)
            continue;
        if (p->cfg.kind == IOP_VSW_UPLINK) {
            pf[n] = (struct pollfd){.fd = p->cfg.fd, .events = POLLIN};
            kinds[n++] = IOP_VSW_UPLINK;
            continue;
        }
        if (iop_chan_broken(p->ch))
            continue;
        if (iop_chan_tx_room(p->ch) <= p->rx_count) {
            held = 1;
            continue;
        }
        if (iop_chan_arm(p->ch) != 0)
            return;
        int fd = iop_chan_wait_fd(p->ch);
        if (fd >= 0) {
            pf[n] = (struct pollfd){.fd = fd, .events = POLLIN};
            kinds[n++] = 0;
        }
    }
    BUMP(s->st.sleeps, 1);
    int rc = poll(pf, (nfds_t)n, held ? 1 : 100);
    if (rc <= 0)
        return;
    for (int i = 0; i < n; i++)
        if ((pf[i].revents & POLLIN) && kinds[i] == 0)
            drain(pf[i].fd);
}

/* After a takeover, every port's receive buffers are posted again before any port's
 * frames are replayed: a frame replayed from one port must find the buffers its
 * destination had posted. */
static int replay_receive_buffers(struct iop_vswitch *s)
{
    struct iop_desc d;
    int n = 0;
    for (int i = 0; i < IOP_VSW_MAX_PORTS; i++) {
        struct port *p = &s->ports[i];
        if (!p->j || __atomic_load_n(&p->state, __ATOMIC_ACQUIRE) != P_ACTIVE ||
            !iop_jrnl_pending_replays(p->j) || iop_chan_broken(p->ch))
            continue;
        while (iop_chan_tx_room(p->ch) > p->rx_count) {
            int jidx = iop_jrnl_next_replay_op(p->j, IOP_OP_NET_RX, &d);
            if (jidx < 0)
                break;
            guest_request(s, i, &d, jidx);
            n++;
        }
    }
    return n;
}

static void *vswitch_main(void *arg)
{
    struct iop_vswitch *s = arg;
    struct iop_desc d;
    iop_pin_cpu(s->cfg.cpu);
    uint64_t last = iop_now_ns();
    while (!__atomic_load_n(&s->stopping, __ATOMIC_ACQUIRE)) {
        if (__atomic_load_n(&s->held, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&s->pausing, 1, __ATOMIC_RELEASE);
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
            continue;
        }
        __atomic_store_n(&s->pausing, 0, __ATOMIC_RELEASE);
        BUMP(s->st.loops, 1);
        int progress = replay_receive_buffers(s);
        for (int i = 0; i < IOP_VSW_MAX_PORTS; i++) {
            struct port *p = &s->ports[i];
            int state = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
            if (state == P_FREE)
                continue;
            if (state == P_REMOVING) {
                /* posted buffers keep their journal entries: a switch taking the
                 * channel over posts them again */
                if (p->dirty)
                    publish(p);
                mac_forget_port(s, i);
                __atomic_store_n(&p->state, P_FREE, __ATOMIC_RELEASE);
                continue;
            }
            if (p->cfg.kind == IOP_VSW_UPLINK) {
                for (uint32_t k = 0; k < s->cfg.batch; k++) {
                    ssize_t r = read(p->cfg.fd, s->frame, sizeof s->frame);
                    if (r < 0)
                        break;
                    progress++;
                    if (frame_ok(p, (uint32_t)r))
                        forward(s, i, (uint32_t)r);
                }
                continue;
            }
            if (iop_chan_broken(p->ch)) {
                if (!p->broken_seen) {
                    p->broken_seen = 1;
                    BUMP(s->st.broken_channels, 1);
                }
                continue;
            }
            for (uint32_t k = 0;; k++) {
                /* room for every posted buffer's response and this request's */
                if (iop_chan_tx_room(p->ch) <= p->rx_count)
                    break;
                int jidx = -1;
                if (!p->j) {
                    if (k >= s->cfg.batch || iop_chan_pop(p->ch, &d))
                        break;
                } else {
                    /* a port taken over: what its journal holds runs first, in order
                     * and all of it (a receiver's buffers are posted again before
                     * other ports' frames come), then the ring */
                    jidx = iop_jrnl_next_replay(p->j, &d);
                    if (jidx == -EAGAIN && k < s->cfg.batch)
                        jidx = iop_jrnl_take(p->j, p->ch, &d);
                    if (jidx < 0)
                        break;
                }
                progress++;
                guest_request(s, i, &d, jidx);
            }
        }
        for (int i = 0; i < IOP_VSW_MAX_PORTS; i++) {
            struct port *p = &s->ports[i];
            if (p->dirty) {
                publish(p);
                iop_chan_sync_counters(p->ch);
            }
        }
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

int iop_vswitch_start(void *pool_base, uint64_t pool_len, const struct iop_vswitch_cfg *cfg,
                      struct iop_vswitch **out)
{
    if (!pool_base || !cfg || !out)
        return -EINVAL;
    struct iop_vswitch *s = calloc(1, sizeof *s);
    if (!s)
        return -ENOMEM;
    s->pool = pool_base;
    s->pool_len = pool_len;
    s->cfg = *cfg;
    if (!s->cfg.batch)
        s->cfg.batch = 32;
    s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->wake_fd < 0) {
        int e = -errno;
        free(s);
        return e;
    }
    pthread_mutex_init(&s->mu, NULL);
    int rc = pthread_create(&s->thread, NULL, vswitch_main, s);
    if (rc) {
        close(s->wake_fd);
        free(s);
        return -rc;
    }
    *out = s;
    return 0;
}

static void wake(struct iop_vswitch *s) { iop_wake_fd(s->wake_fd); }

int iop_vswitch_add(struct iop_vswitch *s, const struct iop_vport_cfg *cfg, struct iop_chan *ch,
                    const struct iop_xlate_table *xlate, struct iop_jrnl *jrnl)
{
    if (!s || !cfg)
        return -EINVAL;
    if (cfg->kind == IOP_VSW_UPLINK) {
        if (cfg->fd < 0 || jrnl)
            return -EINVAL;
    } else if (cfg->kind == IOP_VSW_GUEST) {
        if (!ch || !xlate || iop_chan_role(ch) != IOP_ROLE_SERVER || !cfg->rx_slots ||
            cfg->rx_slots > IOP_RING_MAX || (cfg->mac[0] & 1))
            return -EINVAL;
        /* every request the ring can hold may sit in the journal (posted buffers
         * wait there): a smaller one would stall the port once buffers fill it */
        if (jrnl && iop_jrnl_entries(jrnl) < ch->nslots)
            return -EINVAL;
    } else {
        return -EINVAL;
    }
    if (cfg->mtu < 68 || (uint32_t)cfg->mtu + 18 > IOP_VSW_FRAME_MAX)
        return -EINVAL;
    struct posted *rxq = NULL;
    if (cfg->kind == IOP_VSW_GUEST) {
        rxq = calloc(cfg->rx_slots, sizeof *rxq);
        if (!rxq)
            return -ENOMEM;
    }
    pthread_mutex_lock(&s->mu);
    int id = -ENOSPC;
    for (int i = 0; i < IOP_VSW_MAX_PORTS; i++) {
        struct port *p = &s->ports[i];
        if (__atomic_load_n(&p->state, __ATOMIC_ACQUIRE) != P_FREE)
            continue;
        free(p->rxq);
        memset(p, 0, sizeof *p);
        p->cfg = *cfg;
        p->ch = ch;
        p->xlate = xlate;
        p->rxq = rxq;
        p->j = jrnl;
        if (jrnl) /* the switch thread does not look at this port yet */
            iop_jrnl_replay_first(jrnl, IOP_OP_NET_RX);
        __atomic_store_n(&p->state, P_ACTIVE, __ATOMIC_RELEASE);
        id = i;
        break;
    }
    pthread_mutex_unlock(&s->mu);
    if (id < 0)
        free(rxq);
    else
        wake(s);
    return id;
}

int iop_vswitch_remove(struct iop_vswitch *s, int id)
{
    if (!s || id < 0 || id >= IOP_VSW_MAX_PORTS)
        return -EINVAL;
    struct port *p = &s->ports[id];
    pthread_mutex_lock(&s->mu);
    if (__atomic_load_n(&p->state, __ATOMIC_ACQUIRE) != P_ACTIVE) {
        pthread_mutex_unlock(&s->mu);
        return -ENOENT;
    }
    __atomic_store_n(&p->state, P_REMOVING, __ATOMIC_RELEASE);
    wake(s);
    iop_wait_slot(&p->state, P_FREE, s->wake_fd);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int iop_vport_stats(struct iop_vswitch *s, int id, struct iop_vport_stats *out)
{
    if (!s || id < 0 || id >= IOP_VSW_MAX_PORTS)
        return -EINVAL;
    iop_load_counters(out, &s->ports[id].st, sizeof *out);
    return 0;
}

void iop_vswitch_stats(struct iop_vswitch *s, struct iop_vswitch_stats *out)
{
    iop_load_counters(out, &s->st, sizeof *out);
}

int iop_vswitch_lookup(struct iop_vswitch *s, const uint8_t *mac)
{
    /* read from another thread: a torn answer only names a wrong port for a test */
    struct mac_entry *e = mac_find(s, mac_of(mac));
    return e ? e->port : -ENOENT;
}

int iop_vswitch_hold(struct iop_vswitch *s, int on)
{
    if (!s)
        return -EINVAL;
    __atomic_store_n(&s->held, on ? 1 : 0, __ATOMIC_RELEASE);
    if (!on)
        return 0;
    /* wait until the thread is between passes: nothing is half switched */
    while (!__atomic_load_n(&s->pausing, __ATOMIC_ACQUIRE) &&
           !__atomic_load_n(&s->stopping, __ATOMIC_ACQUIRE)) {
        iop_wake_fd(s->wake_fd);
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

int iop_vswitch_stop(struct iop_vswitch *s)
{
    if (!s)
        return -EINVAL;
    __atomic_store_n(&s->stopping, 1, __ATOMIC_RELEASE);
    wake(s);
    pthread_join(s->thread, NULL);
    for (int i = 0; i < IOP_VSW_MAX_PORTS; i++) {
        if (s->ports[i].dirty)
            publish(&s->ports[i]);
        free(s->ports[i].rxq);
    }
    close(s->wake_fd);
    pthread_mutex_destroy(&s->mu);
    free(s);
    return 0;
}
