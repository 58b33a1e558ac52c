/* journal.c - in-flight journals of failover channels, and the heartbeat thread.
 *
 * The journal is written only by the server that owns the channel, in pages the
 * client does not map. Its entries are the truth about what a server took and
 * did not yet make visible; the free list and the replay queue are private to
 * the handle and rebuilt from the entries whenever a server opens the journal.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "iop_channel.h"
#include "iop_internal.h"
#include "iop_journal.h"
#include "iop_vswitch.h"
#include "iop_worker.h"

_Static_assert(sizeof(struct iop_jrnl_hdr) == IOP_JRNL_HDR_SIZE, "journal header size");
_Static_assert(sizeof(struct iop_jentry) == IOP_JENTRY_SIZE, "journal entry size");

struct iop_jrnl {
    struct iop_jrnl_hdr *h;
    uint8_t *entries;
    uint32_t n, stride, slot_size;
    uint32_t nfree;
    uint32_t *free_stack;
    uint32_t *replay;   /* entry indices to re-execute, in seq order */
    uint32_t nreplay, replay_next;
    uint32_t *pushed;   /* DONE entries whose completions are not yet published */
    uint32_t npushed;
};

static int pow2(uint32_t v) { return v && !(v & (v - 1)); }

uint64_t iop_jrnl_size(uint32_t nentries, uint32_t slot_size)
{
    if (!pow2(nentries) || nentries > IOP_RING_MAX || !pow2(slot_size) ||
        slot_size < IOP_SLOT_MIN || slot_size > IOP_SLOT_MAX)
        return 0;
    return IOP_JRNL_HDR_SIZE + (uint64_t)nentries * (IOP_JENTRY_SIZE + slot_size);
}

int iop_jrnl_format(void *mem, uint64_t len, uint32_t nentries, uint32_t slot_size)
{
    uint64_t need = iop_jrnl_size(nentries, slot_size);
    if (!mem || !need)
        return -EINVAL;
    if (len < need)
        return -EMSGSIZE;
    memset(mem, 0, need);
    struct iop_jrnl_hdr *h = mem;
    h->nentries = nentries;
    h->stride = IOP_JENTRY_SIZE + slot_size;
    h->slot_size = slot_size;
    h->next_seq = 1;
    __atomic_store_n(&h->magic, (uint64_t)IOP_JRNL_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

static struct iop_jentry *entry(const struct iop_jrnl *j, uint32_t i)
{
    return (struct iop_jentry *)(j->entries + (uint64_t)i * j->stride);
}

static struct iop_desc *entry_desc(const struct iop_jrnl *j, uint32_t i)
{
    return (struct iop_desc *)((uint8_t *)entry(j, i) + IOP_JENTRY_SIZE);
}

static struct iop_jrnl *seq_sort_ctx;

static int by_seq(const void *a, const void *b)
{
    uint64_t x = entry(seq_sort_ctx, *(const uint32_t *)a)->seq;
    uint64_t y = entry(seq_sort_ctx, *(const uint32_t *)b)->seq;
    return x < y ? -1 : x > y;
}

int iop_jrnl_open(void *mem, uint64_t len, struct iop_chan *ch, uint32_t owner,
                  struct iop_jrnl **out)
{
    if (!mem || !ch || !out || len < IOP_JRNL_HDR_SIZE || iop_chan_role(ch) != IOP_ROLE_SERVER)
        return -EINVAL;
    struct iop_jrnl_hdr *h = mem;
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != IOP_JRNL_MAGIC)
        return -EBADMSG;
    uint64_t need = iop_jrnl_size(h->nentries, h->slot_size);
    if (!need || need > len || h->stride != IOP_JENTRY_SIZE + h->slot_size)
        return -EBADMSG;
    if (h->slot_size != ch->slot_size)
        return -EINVAL; /* a smaller copy would cut replayed descriptors short */
    struct iop_jrnl *j = calloc(1, sizeof *j);
    if (!j)
        return -ENOMEM;
    j->h = h;
    j->entries = (uint8_t *)mem + IOP_JRNL_HDR_SIZE;
    j->n = h->nentries;
    j->stride = h->stride;
    j->slot_size = h->slot_size;
    j->free_stack = calloc(j->n, sizeof *j->free_stack);
    j->replay = calloc(j->n, sizeof *j->replay);
    j->pushed = calloc(j->n, sizeof *j->pushed);
    if (!j->free_stack || !j->replay || !j->pushed) {
        iop_jrnl_close(j);
        return -ENOMEM;
    }
    /* the shared indices as they stand: the channel was just attached, so these are
     * what the previous server published, not what it had privately */
    uint32_t published = iop_chan_tx_pos(ch);
    struct iop_desc scratch;
    uint32_t head = 0;
    int have_head = iop_chan_peek(ch, &scratch, &head) == 0;
    uint64_t max_seq = 0;
    for (uint32_t i = 0; i < j->n; i++) {
        struct iop_jentry *en = entry(j, i);
        if (en->seq > max_seq)
            max_seq = en->seq;
        if (en->state == IOP_JE_DONE &&
            (uint32_t)(published - en->rsp_pos) - 1 < (uint32_t)IOP_RING_MAX) {
            /* its completion is visible to the client: done, exactly once */
            en->state = IOP_JE_FREE;
            h->retired++;
        }
        if (en->state == IOP_JE_FREE) {
            j->free_stack[j->nfree++] = i;
            continue;
        }
        if (en->state == IOP_JE_DONE) {
            h->requeued++;
            if (entry_desc(j, i)->opcode == IOP_OP_NET_RX)
                h->requeued_rx++;
        }
        en->state = IOP_JE_TAKEN;
        j->replay[j->nreplay++] = i;
    }
    seq_sort_ctx = j;
    qsort(j->replay, j->nreplay, sizeof *j->replay, by_seq);
    seq_sort_ctx = NULL;
    /* the last entry taken may still sit at the head of the ring (the server died
     * between copying it and consuming it): consume it there, run it from here. Only
     * that one can: an older entry (a long-posted buffer) matching the head would be
     * an index that wrapped around */
    if (have_head && j->nreplay && entry(j, j->replay[j->nreplay - 1])->ring_pos == head) {
        iop_chan_consume(ch);
        h->skipped++;
    }
    if (h->next_seq <= max_seq)
        h->next_seq = max_seq + 1;
    /* the previous server may have died between publishing completions and ringing the
     * client's doorbell: ring it once. A spurious wake-up costs nothing; a lost one
     * leaves the client asleep with its completions in the ring until its timeout. */
    if (ch->kick_fd >= 0)
        iop_wake_fd(ch->kick_fd);
    h->owner = owner;
    h->epoch++;
    h->takeovers++;
    *out = j;
    return 0;
}

void iop_jrnl_close(struct iop_jrnl *j)
{
    if (!j)
        return;
    free(j->free_stack);
    free(j->replay);
    free(j->pushed);
    free(j);
}

uint32_t iop_jrnl_pending_replays(const struct iop_jrnl *j)
{
    return j->nreplay - j->replay_next;
}

uint32_t iop_jrnl_entries(const struct iop_jrnl *j) { return j->n; }

int iop_jrnl_take(struct iop_jrnl *j, struct iop_chan *ch, struct iop_desc *out)
{
    if (!j->nfree)
        return -ENOSPC;
    uint32_t pos = 0;
    int rc = iop_chan_peek(ch, out, &pos);
    if (rc)
        return rc;
    uint32_t i = j->free_stack[--j->nfree];
    struct iop_jentry *en = entry(j, i);
    memcpy(entry_desc(j, i), out, j->slot_size < sizeof *out ? j->slot_size : sizeof *out);
    en->ring_pos = pos;
    en->rsp_pos = 0;
    en->seq = j->h->next_seq++;
    en->taken_ns = iop_now_ns();
    /* the entry is whole before it says TAKEN, and TAKEN before the slot is freed */
    __atomic_store_n(&en->state, IOP_JE_TAKEN, __ATOMIC_RELEASE);
    iop_chan_consume(ch);
    return (int)i;
}

void iop_jrnl_replay_first(struct iop_jrnl *j, uint16_t opcode)
{
    /* stable: entries of that kind keep their order, and so do the others */
    uint32_t n = j->nreplay - j->replay_next, w = 0;
    uint32_t *q = j->replay + j->replay_next;
    uint32_t *rest = malloc(n * sizeof *rest + 1);
    uint32_t nrest = 0;
    if (!rest)
        return; /* the order stays as taken: still correct for one port */
    for (uint32_t k = 0; k < n; k++) {
        if (entry_desc(j, q[k])->opcode == opcode)
            q[w++] = q[k];
        else
            rest[nrest++] = q[k];
    }
    memcpy(q + w, rest, nrest * sizeof *rest);
    free(rest);
}

int iop_jrnl_next_replay_op(struct iop_jrnl *j, uint16_t opcode, struct iop_desc *out)
{
    if (j->replay_next >= j->nreplay ||
        entry_desc(j, j->replay[j->replay_next])->opcode != opcode)
        return -EAGAIN;
    return iop_jrnl_next_replay(j, out);
}

int iop_jrnl_next_replay(struct iop_jrnl *j, struct iop_desc *out)
{
    if (j->replay_next >= j->nreplay)
        return -EAGAIN;
    uint32_t i = j->replay[j->replay_next++];
    memset(out, 0, sizeof *out);
    memcpy(out, entry_desc(j, i), j->slot_size < sizeof *out ? j->slot_size : sizeof *out);
    j->h->replayed++;
    return (int)i;
}

int iop_jrnl_push(struct iop_jrnl *j, struct iop_chan *ch, int idx, const struct iop_desc *d)
{
    uint32_t pos = iop_chan_tx_pos(ch);
    int rc = iop_chan_push(ch, d);
    if (rc || !j || idx < 0)
        return rc;
    struct iop_jentry *en = entry(j, (uint32_t)idx);
    en->rsp_pos = pos;
    __atomic_store_n(&en->state, IOP_JE_DONE, __ATOMIC_RELEASE);
    j->pushed[j->npushed++] = (uint32_t)idx;
    return 0;
}

void iop_jrnl_publish(struct iop_jrnl *j, struct iop_chan *ch)
{
    iop_chan_publish(ch);
    if (!j)
        return;
    /* visible to the client now: these entries are done with */
    for (uint32_t k = 0; k < j->npushed; k++) {
        uint32_t idx = j->pushed[k];
        __atomic_store_n(&entry(j, idx)->state, IOP_JE_FREE, __ATOMIC_RELEASE);
        j->free_stack[j->nfree++] = idx;
    }
    j->npushed = 0;
}

/* ---- heartbeat ---------------------------------------------------------------- */

struct iop_heartbeat {
    uint64_t *word;
    uint64_t interval_ns;
    int stopping;
    pthread_t thread;
};

uint64_t iop_monotonic_ns(void) { return iop_now_ns(); }

static void *beat(void *arg)
{
    struct iop_heartbeat *hb = arg;
    /* a beat costs microseconds; real-time priority keeps a busy machine from making a
     * healthy server look hung (best effort: needs CAP_SYS_NICE) */
    struct sched_param sp = {.sched_priority = 1};
    pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
    struct timespec ts = {(time_t)(hb->interval_ns / 1000000000ull),
                          (long)(hb->interval_ns % 1000000000ull)};
    while (!__atomic_load_n(&hb->stopping, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(hb->word, iop_now_ns(), __ATOMIC_RELEASE);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int iop_heartbeat_start(uint64_t *word, uint64_t interval_ns, struct iop_heartbeat **out)
{
    if (!word || !out || interval_ns < 100000)
        return -EINVAL;
    struct iop_heartbeat *hb = calloc(1, sizeof *hb);
    if (!hb)
        return -ENOMEM;
    hb->word = word;
    hb->interval_ns = interval_ns;
    __atomic_store_n(word, iop_now_ns(), __ATOMIC_RELEASE);
    int rc = pthread_create(&hb->thread, NULL, beat, hb);
    if (rc) {
        free(hb);
        return -rc;
    }
    *out = hb;
    return 0;
}

void iop_heartbeat_stop(struct iop_heartbeat *hb)
{
    if (!hb)
        return;
    __atomic_store_n(&hb->stopping, 1, __ATOMIC_RELEASE);
    pthread_join(hb->thread, NULL);
    free(hb);
}
