/* iop_channel.h - memory channel layout and the native channel API.
 *
 * A channel lives in pool pages mapped by exactly its two ends. Layout:
 *
 *   [iop_chan_hdr, 512 B][request ring: iop_ring_ctl + nslots * slot_size]
 *                        [response ring: iop_ring_ctl + nslots * slot_size]
 *
 * The client produces into the request ring and consumes the response ring; the
 * server does the opposite. Each side keeps its own indices privately and only
 * publishes them; nothing the peer wrote is trusted without a check.
 *
 * This header is also the cffi cdef: plain integer #defines, explicit padding,
 * no inline code. Functions return 0 (or a count) on success, negative errno on
 * failure.
 */
#ifndef IOP_CHANNEL_H
#define IOP_CHANNEL_H
#include <stdint.h>
#include <stddef.h>

#define IOP_CHAN_SIGNATURE 0x314e414843504f49
#define IOP_CHAN_VERSION 1
#define IOP_CHAN_HDR_SIZE 512
#define IOP_RING_CTL_SIZE 256
#define IOP_DESC_HDR_SIZE 32
#define IOP_FRAG_SIZE 16
#define IOP_SLOT_MIN 64
#define IOP_SLOT_MAX 1024
#define IOP_MAX_FRAGS 62
#define IOP_RING_MIN 2
#define IOP_RING_MAX 65536
#define IOP_FRAG_LEN_MAX 1048576
#define IOP_DESC_LEN_MAX 16777216

#define IOP_ROLE_CLIENT 1
#define IOP_ROLE_SERVER 2

#define IOP_STATE_ABSENT 0
#define IOP_STATE_READY 1
#define IOP_STATE_CLOSED 2
#define IOP_STATE_BROKEN 3

/* opcodes understood by every server; device servers add their own from 16 up */
#define IOP_OP_NULL 0
#define IOP_OP_ECHO 1

/* descriptor flags */
#define IOP_DF_NOREPLY 1

/* fragment access bits (also region access in iop_xlate.h) */
#define IOP_ACCESS_READ 1
#define IOP_ACCESS_WRITE 2

/* One fragment of a client buffer, in client partition-relative (PRPA) terms. */
struct iop_frag {
    uint64_t addr;
    uint32_t len;
    uint32_t access;
};

/* A request or a response. Only IOP_DESC_HDR_SIZE + nfrags * IOP_FRAG_SIZE bytes
 * (at most slot_size) travel through the ring. */
struct iop_desc {
    uint64_t id;
    uint16_t opcode;
    uint16_t flags;
    uint16_t nfrags;
    uint16_t reserved;
    int32_t status;
    uint32_t len;
    uint64_t offset;
    struct iop_frag frags[62];
};

/* Counters: every refusal, drop and notification is counted. */
struct iop_chan_counters {
    uint64_t produced;
    uint64_t consumed;
    uint64_t refused;
    uint64_t bad_desc;
    uint64_t bad_index;
    uint64_t kicks_sent;
    uint64_t kicks_suppressed;
    uint64_t sleeps;
};

/* Shared control block of one ring: each index on its own cache line. */
struct iop_ring_ctl {
    uint32_t prod;
    uint8_t pad0[60];
    uint32_t cons;
    uint8_t pad1[60];
    uint32_t event;
    uint8_t pad2[60];
    uint8_t pad3[64];
};

/* Self-describing channel header at offset 0 of the channel. */
struct iop_chan_hdr {
    uint64_t signature;
    uint8_t type_uuid[16];
    uint32_t version;
    uint32_t hdr_size;
    uint64_t total_size;
    uint64_t features;
    uint32_t nslots;
    uint32_t slot_size;
    uint32_t max_frags;
    uint32_t reserved0;
    uint64_t req_ring_off;
    uint64_t rsp_ring_off;
    uint8_t pad0[48];
    uint32_t client_state;
    uint32_t client_pid;
    uint8_t pad1[56];
    uint32_t server_state;
    uint32_t server_epoch;
    uint32_t server_pid;
    uint8_t pad2[52];
    struct iop_chan_counters server_counters;
    struct iop_chan_counters client_counters;
    uint8_t pad3[128];
};

struct iop_chan;

/* Bytes a channel of this geometry occupies (before page rounding). 0 if invalid. */
uint64_t iop_chan_size(uint32_t nslots, uint32_t slot_size);

/* Write a fresh header and empty rings into mem. */
int iop_chan_format(void *mem, uint64_t len, uint32_t nslots, uint32_t slot_size,
                    const uint8_t *type_uuid, uint64_t features);

/* Check a header and take one end of the channel. *why gets a static message on
 * failure. The handle is private to the caller. */
int iop_chan_attach(void *mem, uint64_t len, int role, struct iop_chan **out,
                    const char **why);
void iop_chan_detach(struct iop_chan *ch);

/* Doorbells: kick_fd is the eventfd this end writes to wake its peer, wait_fd the
 * one it sleeps on. -1 disables that direction (pure polling). */
void iop_chan_set_doorbells(struct iop_chan *ch, int kick_fd, int wait_fd);
/* Spin this long polling the ring before sleeping on the doorbell. */
void iop_chan_set_spin(struct iop_chan *ch, uint64_t spin_ns);
/* Spin with sched_yield(): for ends that share a CPU with their peer's other end. */
void iop_chan_set_yield(struct iop_chan *ch, int on);

/* Producer side. push copies one descriptor into the next slot (not yet visible);
 * publish makes all pushed slots visible and rings the doorbell only when the
 * consumer asked for it through its event index. publish returns 1 if it kicked. */
int iop_chan_push(struct iop_chan *ch, const struct iop_desc *d);
int iop_chan_publish(struct iop_chan *ch);
uint32_t iop_chan_tx_free(struct iop_chan *ch);

/* Consumer side. pop copies the next slot out of shared memory into *out and
 * frees the slot; the copy is what gets validated. -EAGAIN when empty, -EPROTO
 * when the peer's index is impossible (the channel is then broken). */
int iop_chan_pop(struct iop_chan *ch, struct iop_desc *out);
int iop_chan_rx_pending(struct iop_chan *ch);

/* Wait for something to consume: spin up to the spin budget, then arm the event
 * index and sleep on the doorbell. Returns 0 when the ring has work, 1 when
 * extra_fd (if >= 0) became readable, -ETIMEDOUT, or -EPROTO. */
int iop_chan_wait(struct iop_chan *ch, int extra_fd, int timeout_ms);

/* Validate a descriptor copy against this channel's limits. */
int iop_desc_check(const struct iop_chan *ch, const struct iop_desc *d,
                   const char **why);

void iop_chan_counters(const struct iop_chan *ch, struct iop_chan_counters *out);
const char *iop_chan_last_error(const struct iop_chan *ch);
int iop_chan_role(const struct iop_chan *ch);
int iop_chan_broken(const struct iop_chan *ch);
uint32_t iop_chan_max_frags(const struct iop_chan *ch);
void iop_chan_set_state(struct iop_chan *ch, uint32_t state);

#endif
