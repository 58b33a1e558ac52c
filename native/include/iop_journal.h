/* iop_journal.h - a channel's in-flight journal and the I/O partitions' heartbeat.
 *
 * Failover contract (DESIGN.md): every request a server takes from a channel is
 * first copied into the channel's journal, in pool pages that only the I/O
 * partitions map, and only then consumed from the request ring. Its completion is
 * pushed to the response ring, the entry is marked DONE with the response ring
 * position, and the entry is freed once that position is published. So at any
 * moment each request is in exactly one of: the request ring, the journal (taken,
 * or done but not yet visible), or the response ring.
 *
 * A standby server that takes the channel over (the active one is dead: its pidfd
 * fired, or it missed its heartbeat and was fenced with SIGKILL) attaches the
 * channel afresh and recovers the journal: an entry whose response was published
 * is retired; an entry still at the head of the request ring is consumed from
 * there; every other entry is re-executed, in the order it was taken. Block
 * requests are idempotent by position, and a completion is published exactly once.
 *
 * Journal layout: iop_jrnl_hdr, then nentries entries of `stride` bytes each: an
 * iop_jentry followed by the descriptor copy (slot_size bytes).
 */
#ifndef IOP_JOURNAL_H
#define IOP_JOURNAL_H
#include <stdint.h>

#define IOP_JRNL_MAGIC 0x4c4e524a504f49
#define IOP_JRNL_HDR_SIZE 128
#define IOP_JENTRY_SIZE 32
#define IOP_JE_FREE 0
#define IOP_JE_TAKEN 1
#define IOP_JE_DONE 2

struct iop_jrnl_hdr {
    uint64_t magic;
    uint32_t nentries;
    uint32_t stride;
    uint32_t slot_size;
    uint32_t owner;      /* which I/O partition serves the channel (its slot) */
    uint32_t epoch;      /* bumped by every takeover */
    uint32_t reserved0;
    uint64_t next_seq;
    uint64_t takeovers;
    uint64_t replayed;   /* entries re-executed by a server that took over */
    uint64_t retired;    /* entries found completed at a takeover, not re-executed */
    uint64_t skipped;    /* entries found still at the head of the request ring */
    uint64_t requeued;   /* completions pushed but never published: run again */
    uint64_t requeued_rx; /* of those, NIC receive buffers: the frame in each is lost
                           * (a receive drop, as on real hardware) and the buffer
                           * posted again */
    uint8_t pad[40];
};

struct iop_jentry {
    uint32_t state;
    uint32_t ring_pos;   /* request ring index it was taken from */
    uint32_t rsp_pos;    /* response ring index of its completion (state DONE) */
    uint32_t reserved;
    uint64_t seq;
    uint64_t taken_ns;
};

struct iop_jrnl;
struct iop_chan;
struct iop_desc;

/* Bytes a journal of nentries entries for slots of slot_size takes (0: invalid). */
uint64_t iop_jrnl_size(uint32_t nentries, uint32_t slot_size);
/* Lay out an empty journal. */
int iop_jrnl_format(void *mem, uint64_t len, uint32_t nentries, uint32_t slot_size);
/* Check a journal and take it over for `owner`: entries are retired, skipped or
 * queued for re-execution against ch (just attached as the server end), and the
 * epoch is bumped, and the client's doorbell rung once (ch's doorbells must be set).
 * The handle lists the entries to re-execute (iop_jrnl_replay). */
int iop_jrnl_open(void *mem, uint64_t len, struct iop_chan *ch, uint32_t owner,
                  struct iop_jrnl **out);
void iop_jrnl_close(struct iop_jrnl *j);
/* Entries queued for re-execution at open, in the order they were taken. */
uint32_t iop_jrnl_pending_replays(const struct iop_jrnl *j);
uint32_t iop_jrnl_entries(const struct iop_jrnl *j);

/* ---- heartbeat: a thread stamping CLOCK_MONOTONIC ns into a shared word ---- */
struct iop_heartbeat;
int iop_heartbeat_start(uint64_t *word, uint64_t interval_ns, struct iop_heartbeat **out);
void iop_heartbeat_stop(struct iop_heartbeat *hb);
uint64_t iop_monotonic_ns(void);

#endif
