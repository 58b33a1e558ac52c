/* channel.c - memory channel rings, event-index doorbells, descriptor checks.
 *
 * Index discipline: indices are free-running uint32_t; slot = index & mask. Each
 * end keeps its own producer/consumer index privately and only stores it to the
 * shared control block, so a peer that scribbles on the shared copy cannot move
 * our position. What the peer publishes is checked before use: a producer index
 * more than nslots ahead of our consumer index, or a consumer index that is ahead
 * of our producer index, marks the channel broken.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "iop_channel.h"
#include "iop_internal.h"

_Static_assert(sizeof(struct iop_chan_hdr) == IOP_CHAN_HDR_SIZE, "header size");
_Static_assert(sizeof(struct iop_ring_ctl) == IOP_RING_CTL_SIZE, "ring ctl size");
_Static_assert(sizeof(struct iop_frag) == IOP_FRAG_SIZE, "frag size");
_Static_assert(offsetof(struct iop_desc, frags) == IOP_DESC_HDR_SIZE, "desc header");
_Static_assert(IOP_DESC_HDR_SIZE + IOP_MAX_FRAGS * IOP_FRAG_SIZE <= IOP_SLOT_MAX,
               "max frags fit the largest slot");
_Static_assert(sizeof(struct iop_desc) == IOP_DESC_HDR_SIZE + IOP_MAX_FRAGS * IOP_FRAG_SIZE,
               "desc size");

static int is_pow2(uint32_t v) { return v && !(v & (v - 1)); }

static uint64_t ring_bytes(uint32_t nslots, uint32_t slot_size)
{
    return IOP_RING_CTL_SIZE + (uint64_t)nslots * slot_size;
}

uint64_t iop_chan_size(uint32_t nslots, uint32_t slot_size)
{
    if (!is_pow2(nslots) || nslots < IOP_RING_MIN || nslots > IOP_RING_MAX)
        return 0;
    if (!is_pow2(slot_size) || slot_size < IOP_SLOT_MIN || slot_size > IOP_SLOT_MAX)
        return 0;
    return IOP_CHAN_HDR_SIZE + 2 * ring_bytes(nslots, slot_size);
}

int iop_chan_format(void *mem, uint64_t len, uint32_t nslots, uint32_t slot_size,
                    const uint8_t *type_uuid, uint64_t features)
{
    uint64_t need = iop_chan_size(nslots, slot_size);
    if (!mem || !need)
        return -EINVAL;
    if (len < need)
        return -EMSGSIZE;
    memset(mem, 0, need);
    struct iop_chan_hdr *h = mem;
    if (type_uuid)
        memcpy(h->type_uuid, type_uuid, sizeof h->type_uuid);
    h->version = IOP_CHAN_VERSION;
    h->hdr_size = IOP_CHAN_HDR_SIZE;
    h->total_size = len;
    h->features = features;
    h->nslots = nslots;
    h->slot_size = slot_size;
    h->max_frags = (slot_size - IOP_DESC_HDR_SIZE) / IOP_FRAG_SIZE;
    if (h->max_frags > IOP_MAX_FRAGS)
        h->max_frags = IOP_MAX_FRAGS;
    h->req_ring_off = IOP_CHAN_HDR_SIZE;
    h->rsp_ring_off = IOP_CHAN_HDR_SIZE + ring_bytes(nslots, slot_size);
    /* the signature goes last: a reader that sees it sees a whole header */
    __atomic_store_n(&h->signature, (uint64_t)IOP_CHAN_SIGNATURE, __ATOMIC_RELEASE);
    return 0;
}

static int refuse(const char **why, const char *msg, int err)
{
    if (why)
        *why = msg;
    return err;
}

/* Validate a header copy; never trust it field by field in shared memory. */
static int check_header(const struct iop_chan_hdr *h, uint64_t len, const char **why)
{
    if (h->signature != IOP_CHAN_SIGNATURE)
        return refuse(why, "bad channel signature", -EBADMSG);
    if (h->version != IOP_CHAN_VERSION)
        return refuse(why, "unsupported channel version", -EPROTONOSUPPORT);
    if (h->hdr_size != IOP_CHAN_HDR_SIZE)
        return refuse(why, "bad channel header size", -EBADMSG);
    uint64_t need = iop_chan_size(h->nslots, h->slot_size);
    if (!need)
        return refuse(why, "bad ring geometry (slots or slot size)", -EINVAL);
    if (h->total_size != len || need > len)
        return refuse(why, "channel size does not match its mapping", -EMSGSIZE);
    uint32_t mf = (h->slot_size - IOP_DESC_HDR_SIZE) / IOP_FRAG_SIZE;
    if (mf > IOP_MAX_FRAGS)
        mf = IOP_MAX_FRAGS;
    if (h->max_frags != mf)
        return refuse(why, "max_frags does not match slot size", -EINVAL);
    if (h->req_ring_off != IOP_CHAN_HDR_SIZE ||
        h->rsp_ring_off != IOP_CHAN_HDR_SIZE + ring_bytes(h->nslots, h->slot_size))
        return refuse(why, "ring offsets outside the channel", -EINVAL);
    return 0;
}

int iop_chan_attach(void *mem, uint64_t len, int role, struct iop_chan **out,
                    const char **why)
{
    if (!mem || !out || len < IOP_CHAN_HDR_SIZE)
        return refuse(why, "channel mapping smaller than a header", -EMSGSIZE);
    if (role != IOP_ROLE_CLIENT && role != IOP_ROLE_SERVER)
        return refuse(why, "role must be client or server", -EINVAL);
    struct iop_chan_hdr copy;
    memcpy(&copy, mem, sizeof copy);
    int rc = check_header(&copy, len, why);
    if (rc)
        return rc;

    struct iop_chan *ch = calloc(1, sizeof *ch);
    if (!ch)
        return refuse(why, "out of memory", -ENOMEM);
    uint8_t *base = mem;
    ch->hdr = mem;
    ch->size = len;
    ch->role = role;
    ch->nslots = copy.nslots;
    ch->mask = copy.nslots - 1;
    ch->slot_size = copy.slot_size;
    ch->max_frags = copy.max_frags;
    struct iop_ring_ctl *req = (void *)(base + copy.req_ring_off);
    struct iop_ring_ctl *rsp = (void *)(base + copy.rsp_ring_off);
    uint8_t *req_slots = (uint8_t *)req + IOP_RING_CTL_SIZE;
    uint8_t *rsp_slots = (uint8_t *)rsp + IOP_RING_CTL_SIZE;
    if (role == IOP_ROLE_CLIENT) {
        ch->tx = req, ch->tx_slots = req_slots;
        ch->rx = rsp, ch->rx_slots = rsp_slots;
    } else {
        ch->tx = rsp, ch->tx_slots = rsp_slots;
        ch->rx = req, ch->rx_slots = req_slots;
    }
    /* take up where the shared indices stand (a restarted end resumes) */
    ch->tx_prod = __atomic_load_n(&ch->tx->prod, __ATOMIC_ACQUIRE);
    ch->tx_published = ch->tx_prod;
    ch->tx_cons_cache = __atomic_load_n(&ch->tx->cons, __ATOMIC_ACQUIRE);
    ch->rx_cons = __atomic_load_n(&ch->rx->cons, __ATOMIC_ACQUIRE);
    ch->rx_prod_cache = ch->rx_cons;
    if ((uint32_t)(ch->tx_prod - ch->tx_cons_cache) > ch->nslots) {
        free(ch);
        return refuse(why, "ring indices outside the ring", -EPROTO);
    }
    ch->kick_fd = -1;
    ch->wait_fd = -1;
    ch->counters = role == IOP_ROLE_CLIENT ? &ch->hdr->client_counters
                                           : &ch->hdr->server_counters;
    uint32_t *state = role == IOP_ROLE_CLIENT ? &ch->hdr->client_state
                                              : &ch->hdr->server_state;
    __atomic_store_n(state, IOP_STATE_READY, __ATOMIC_RELEASE);
    *out = ch;
    return 0;
}

void iop_chan_detach(struct iop_chan *ch)
{
    if (!ch)
        return;
    iop_chan_set_state(ch, IOP_STATE_CLOSED);
    free(ch);
}

void iop_chan_set_state(struct iop_chan *ch, uint32_t state)
{
    uint32_t *p = ch->role == IOP_ROLE_CLIENT ? &ch->hdr->client_state
                                              : &ch->hdr->server_state;
    __atomic_store_n(p, state, __ATOMIC_RELEASE);
}

void iop_chan_set_doorbells(struct iop_chan *ch, int kick_fd, int wait_fd)
{
    ch->kick_fd = kick_fd;
    ch->wait_fd = wait_fd;
}

void iop_chan_set_spin(struct iop_chan *ch, uint64_t spin_ns) { ch->spin_ns = spin_ns; }
void iop_chan_set_yield(struct iop_chan *ch, int on) { ch->yield = on; }

static void publish_counters(struct iop_chan *ch)
{
    /* the authoritative counters are private; the shared copy is for status */
    memcpy(ch->counters, &ch->stats, sizeof ch->stats);
}

static void mark_broken(struct iop_chan *ch, const char *why)
{
    ch->broken = 1;
    ch->last_error = why;
    ch->stats.bad_index++;
    publish_counters(ch);
    iop_chan_set_state(ch, IOP_STATE_BROKEN);
}

uint32_t iop_chan_tx_free(struct iop_chan *ch)
{
    uint32_t used = ch->tx_prod - ch->tx_cons_cache;
    if (used >= ch->nslots) {
        uint32_t cons = __atomic_load_n(&ch->tx->cons, __ATOMIC_ACQUIRE);
        /* the consumer may only move forward, and never past what we produced */
        if ((uint32_t)(cons - ch->tx_cons_cache) > (uint32_t)(ch->tx_prod - ch->tx_cons_cache)) {
            mark_broken(ch, "peer consumer index ahead of producer");
            return 0;
        }
        ch->tx_cons_cache = cons;
        used = ch->tx_prod - cons;
    }
    return ch->nslots - used;
}

int iop_chan_push(struct iop_chan *ch, const struct iop_desc *d)
{
    if (ch->broken)
        return -EPROTO;
    if (d->nfrags > ch->max_frags)
        return -E2BIG;
    if (!iop_chan_tx_free(ch))
        return ch->broken ? -EPROTO : -EAGAIN;
    uint8_t *slot = ch->tx_slots + (uint64_t)(ch->tx_prod & ch->mask) * ch->slot_size;
    memcpy(slot, d, IOP_DESC_HDR_SIZE + (size_t)d->nfrags * IOP_FRAG_SIZE);
    ch->tx_prod++;
    ch->stats.produced++;
    return 0;
}

/* virtio's rule: notify iff event lies in [old, new) */
static int need_event(uint32_t event, uint32_t new_idx, uint32_t old)
{
    return (uint32_t)(new_idx - event - 1) < (uint32_t)(new_idx - old);
}

int iop_chan_publish(struct iop_chan *ch)
{
    uint32_t old = ch->tx_published, now = ch->tx_prod;
    if (old == now)
        return 0;
    __atomic_store_n(&ch->tx->prod, now, __ATOMIC_RELEASE);
    ch->tx_published = now;
    /* order the index store before reading the consumer's event index; pairs with
     * the fence in iop_chan_wait (store event; fence; load prod) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t event = __atomic_load_n(&ch->tx->event, __ATOMIC_ACQUIRE);
    if (ch->kick_fd >= 0 && need_event(event, now, old)) {
        uint64_t one = 1;
        ssize_t w = write(ch->kick_fd, &one, sizeof one);
        (void)w;
        ch->stats.kicks_sent++;
        return 1;
    }
    ch->stats.kicks_suppressed++;
    return 0;
}

/* Refresh the view of the peer's producer index, checking it. 1 if work, 0 if
 * empty, -EPROTO if the peer's index is impossible. */
static int rx_refresh(struct iop_chan *ch)
{
    if (ch->rx_prod_cache != ch->rx_cons)
        return 1;
    uint32_t prod = __atomic_load_n(&ch->rx->prod, __ATOMIC_ACQUIRE);
    if ((uint32_t)(prod - ch->rx_cons) > ch->nslots) {
        mark_broken(ch, "peer producer index outside the ring");
        return -EPROTO;
    }
    ch->rx_prod_cache = prod;
    return prod != ch->rx_cons;
}

uint32_t iop_chan_tx_room(struct iop_chan *ch)
{
    /* tx_free trusts its cached consumer index until the ring looks full; a server
     * deciding whether to take a request must see the consumer's real progress */
    uint32_t cons = __atomic_load_n(&ch->tx->cons, __ATOMIC_ACQUIRE);
    if ((uint32_t)(cons - ch->tx_cons_cache) > (uint32_t)(ch->tx_prod - ch->tx_cons_cache)) {
        mark_broken(ch, "peer consumer index ahead of producer");
        return 0;
    }
    ch->tx_cons_cache = cons;
    return ch->nslots - (ch->tx_prod - cons);
}

int iop_chan_arm(struct iop_chan *ch)
{
    if (ch->broken)
        return -EPROTO;
    __atomic_store_n(&ch->rx->event, ch->rx_cons, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return rx_refresh(ch);
}

int iop_chan_pop_wait(struct iop_chan *ch, struct iop_desc *out, int timeout_ms)
{
    for (;;) {
        int rc = iop_chan_pop(ch, out);
        if (rc != -EAGAIN)
            return rc;
        rc = iop_chan_wait(ch, -1, timeout_ms);
        if (rc < 0)
            return rc;
    }
}

int iop_chan_rx_pending(struct iop_chan *ch)
{
    if (ch->broken)
        return -EPROTO;
    int r = rx_refresh(ch);
    if (r <= 0)
        return r;
    return (int)(ch->rx_prod_cache - ch->rx_cons);
}

int iop_chan_pop(struct iop_chan *ch, struct iop_desc *out)
{
    if (ch->broken)
        return -EPROTO;
    int r = rx_refresh(ch);
    if (r <= 0)
        return r ? r : -EAGAIN;
    const uint8_t *slot = ch->rx_slots + (uint64_t)(ch->rx_cons & ch->mask) * ch->slot_size;
    /* copy the whole slot once; everything after this reads the private copy */
    size_t n = ch->slot_size < sizeof *out ? ch->slot_size : sizeof *out;
    memcpy(out, slot, n);
    ch->rx_cons++;
    __atomic_store_n(&ch->rx->cons, ch->rx_cons, __ATOMIC_RELEASE);
    ch->stats.consumed++;
    return 0;
}

uint32_t iop_chan_tx_pos(const struct iop_chan *ch) { return ch->tx_prod; }

int iop_chan_peek(struct iop_chan *ch, struct iop_desc *out, uint32_t *pos)
{
    if (ch->broken)
        return -EPROTO;
    int r = rx_refresh(ch);
    if (r <= 0)
        return r ? r : -EAGAIN;
    const uint8_t *slot = ch->rx_slots + (uint64_t)(ch->rx_cons & ch->mask) * ch->slot_size;
    size_t n = ch->slot_size < sizeof *out ? ch->slot_size : sizeof *out;
    memcpy(out, slot, n);
    *pos = ch->rx_cons;
    return 0;
}

void iop_chan_consume(struct iop_chan *ch)
{
    ch->rx_cons++;
    __atomic_store_n(&ch->rx->cons, ch->rx_cons, __ATOMIC_RELEASE);
    ch->stats.consumed++;
}

int iop_desc_check(const struct iop_chan *ch, const struct iop_desc *d, const char **why)
{
    if (d->nfrags > ch->max_frags)
        return refuse(why, "descriptor has more fragments than the channel allows", -E2BIG);
    if (d->flags & ~(uint16_t)IOP_DF_NOREPLY)
        return refuse(why, "descriptor has unknown flags", -EINVAL);
    uint64_t total = 0;
    for (uint16_t i = 0; i < d->nfrags; i++) {
        const struct iop_frag *f = &d->frags[i];
        if (f->len == 0)
            return refuse(why, "fragment of zero length", -EINVAL);
        if (f->len > IOP_FRAG_LEN_MAX)
            return refuse(why, "fragment longer than the limit", -EMSGSIZE);
        if (f->addr + f->len < f->addr)
            return refuse(why, "fragment address + length wraps around", -EOVERFLOW);
        if (!f->access || (f->access & ~(uint32_t)(IOP_ACCESS_READ | IOP_ACCESS_WRITE)))
            return refuse(why, "fragment access must be read and/or write", -EINVAL);
        total += f->len;
    }
    if (total > IOP_DESC_LEN_MAX)
        return refuse(why, "descriptor total length over the limit", -EMSGSIZE);
    return 0;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t iop_now_ns(void) { return now_ns(); }

static void drain_eventfd(int fd)
{
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof v);
    (void)r;
}

int iop_chan_wait(struct iop_chan *ch, int extra_fd, int timeout_ms)
{
    if (ch->broken)
        return -EPROTO;
    int r = rx_refresh(ch);
    if (r)
        return r < 0 ? r : 0;
    if (ch->spin_ns) {
        uint64_t until = now_ns() + ch->spin_ns;
        unsigned k = 0;
        for (;;) {
            if (ch->yield)
                sched_yield(); /* a peer sharing this CPU gets it at once */
            else
                iop_cpu_relax();
            r = rx_refresh(ch);
            if (r)
                return r < 0 ? r : 0;
            if ((++k & 63) == 0 && now_ns() >= until)
                break;
        }
    }
    uint64_t deadline = timeout_ms < 0 ? 0 : now_ns() + (uint64_t)timeout_ms * 1000000u;
    for (;;) {
        /* ask the producer for a doorbell at our next index, then look once more:
         * a message published before the producer saw our event index is caught
         * here, one published after it rings the doorbell */
        __atomic_store_n(&ch->rx->event, ch->rx_cons, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        r = rx_refresh(ch);
        if (r)
            return r < 0 ? r : 0;
        struct pollfd p[2] = {{.fd = ch->wait_fd, .events = POLLIN},
                              {.fd = extra_fd, .events = POLLIN}};
        int wait_ms = -1;
        if (timeout_ms >= 0) {
            uint64_t t = now_ns();
            if (t >= deadline)
                return -ETIMEDOUT;
            wait_ms = (int)((deadline - t + 999999u) / 1000000u);
        }
        if (ch->wait_fd < 0) {
            /* no doorbell: poll the ring at a coarse interval */
            struct timespec ts = {0, 50000};
            if (extra_fd >= 0 && poll(&p[1], 1, 0) > 0)
                return 1;
            nanosleep(&ts, NULL);
            continue;
        }
        ch->stats.sleeps++;
        int n = poll(p, extra_fd >= 0 ? 2 : 1, wait_ms);
        if (n < 0 && errno != EINTR)
            return -errno;
        if (n > 0 && (p[0].revents & POLLIN))
            drain_eventfd(ch->wait_fd);
        if (n > 0 && extra_fd >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)))
            return 1;
    }
}

void iop_chan_counters(const struct iop_chan *ch, struct iop_chan_counters *out)
{
    memcpy(out, &ch->stats, sizeof *out);
}

const char *iop_chan_last_error(const struct iop_chan *ch)
{
    return ch->last_error ? ch->last_error : "";
}

int iop_chan_role(const struct iop_chan *ch) { return ch->role; }
int iop_chan_broken(const struct iop_chan *ch) { return ch->broken; }
uint32_t iop_chan_max_frags(const struct iop_chan *ch) { return ch->max_frags; }

void iop_chan_sync_counters(struct iop_chan *ch) { publish_counters(ch); }

int iop_chan_wait_fd(const struct iop_chan *ch) { return ch->wait_fd; }
