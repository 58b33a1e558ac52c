/* iop_internal.h - private definitions shared by the native units (not a cdef). */
#ifndef IOP_INTERNAL_H
#define IOP_INTERNAL_H
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include "iop_channel.h"

struct iop_chan {
    struct iop_chan_hdr *hdr;
    uint64_t size;
    int role;
    int broken;
    uint32_t nslots, mask, slot_size, max_frags;
    struct iop_ring_ctl *tx, *rx;  /* ring we produce into / consume from */
    uint8_t *tx_slots, *rx_slots;
    uint32_t tx_prod;              /* private producer index */
    uint32_t tx_published;         /* last value stored to tx->prod */
    uint32_t tx_cons_cache;        /* last checked value of the peer's consumer index */
    uint32_t rx_cons;              /* private consumer index */
    uint32_t rx_prod_cache;        /* last checked value of the peer's producer index */
    int kick_fd, wait_fd;
    uint64_t spin_ns;
    int yield;                     /* spin with sched_yield instead of pause */
    uint64_t next_id;              /* request ids of the native client loops */
    const char *last_error;
    struct iop_chan_counters stats;     /* authoritative */
    struct iop_chan_counters *counters; /* our copy in the shared header */
};

void iop_chan_sync_counters(struct iop_chan *ch);
/* Ask the producer for a doorbell at our next index, then look once more:
 * 1 when work is already there (do not sleep), 0 when armed, -EPROTO. */
int iop_chan_arm(struct iop_chan *ch);
int iop_chan_wait_fd(const struct iop_chan *ch);
/* Free response slots with the consumer index read fresh (servers' admission check). */
uint32_t iop_chan_tx_room(struct iop_chan *ch);

/* Copy a block of counters that another thread increments (relaxed, word by word). */
static inline void iop_load_counters(void *dst, const void *src, size_t bytes)
{
    const uint64_t *s = src;
    uint64_t *d = dst;
    for (size_t i = 0; i < bytes / sizeof(uint64_t); i++)
        d[i] = __atomic_load_n(&s[i], __ATOMIC_RELAXED);
}

/* Pop the next descriptor, waiting (spin, then doorbell) while the ring is empty. */
int iop_chan_pop_wait(struct iop_chan *ch, struct iop_desc *out, int timeout_ms);

/* Ring a server thread's wake eventfd. */
static inline void iop_wake_fd(int fd)
{
    uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof one);
    (void)r;
}

/* A caller removing a slot from a server thread: wait until the thread has set the
 * slot's state to free_value, waking it meanwhile. */
static inline void iop_wait_slot(const int *state, int free_value, int wake_fd)
{
    while (__atomic_load_n(state, __ATOMIC_ACQUIRE) != free_value) {
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
        iop_wake_fd(wake_fd);
    }
}

/* Our private producer index: where the next push lands. */
uint32_t iop_chan_tx_pos(const struct iop_chan *ch);
/* Copy the next slot out without consuming it (*pos: its ring index); 0, -EAGAIN,
 * -EPROTO. iop_chan_consume then frees it. */
int iop_chan_peek(struct iop_chan *ch, struct iop_desc *out, uint32_t *pos);
void iop_chan_consume(struct iop_chan *ch);

/* Journal operations of a server thread (see iop_journal.h). take: peek, copy into
 * a free entry, consume; returns the entry or -EAGAIN (ring empty), -ENOSPC
 * (journal full), -EPROTO. next_replay: the next entry queued at open, or -EAGAIN.
 * push: push entry idx's completion (the entry becomes DONE at that ring position);
 * publish: publish the ring, then free every entry pushed since. j may be NULL (a
 * channel without a journal) and idx -1 (a completion of no entry) for both. */
struct iop_jrnl;
int iop_jrnl_take(struct iop_jrnl *j, struct iop_chan *ch, struct iop_desc *out);
int iop_jrnl_next_replay(struct iop_jrnl *j, struct iop_desc *out);
/* Move the queued entries of one kind ahead of the rest (a switch posts receive
 * buffers again before it replays any port's frames); next_replay_op: the next queued
 * entry only if it is of that kind, else -EAGAIN. */
void iop_jrnl_replay_first(struct iop_jrnl *j, uint16_t opcode);
int iop_jrnl_next_replay_op(struct iop_jrnl *j, uint16_t opcode, struct iop_desc *out);
int iop_jrnl_push(struct iop_jrnl *j, struct iop_chan *ch, int idx, const struct iop_desc *d);
void iop_jrnl_publish(struct iop_jrnl *j, struct iop_chan *ch);

static inline void iop_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}
#endif
