/* iop_nic.h - native loops of a guest's NIC (the client end of a switch port).
 *
 * All buffers are in the guest's own memory: `base` is where this process maps PRPA
 * 0 and [buf_prpa, buf_prpa + nbufs * IOP_NIC_BUF) is the loop's buffer area.
 * Request ids carry the buffer index in bits 0-31, bit 32 set for a transmit, and a
 * count of the channel's requests above it. A posted receive buffer stays with the
 * switch until a frame fills it, so a loop run again on the same buffers says
 * `posted` = 1 and posts none anew.
 *
 * Each loop keeps a shadow of its requests in flight: a completion whose id is not in
 * it (delivered twice, e.g. by a switch that took the port over, or never asked for)
 * is dropped and counted in *duplicates (may be NULL; added to, not reset).
 */
#ifndef IOP_NIC_H
#define IOP_NIC_H
#include <stdint.h>

#define IOP_NIC_BUF 2048

struct iop_chan;

/* Round trips: send a frame of frame_len bytes from src to dst, wait for the frame
 * that comes back. lat_ns (may be NULL) gets n latencies. */
int iop_nic_pingpong(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                     int posted, const uint8_t *src, const uint8_t *dst, uint32_t frame_len,
                     uint64_t n, uint64_t *lat_ns, int timeout_ms, uint64_t *duplicates);

/* Send every received frame back to its sender (reply = 1), or just count them
 * (reply = 0), until n frames or *stop becomes non-zero. Returns frames seen. */
int64_t iop_nic_echo(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                     int posted, const uint8_t *mac, int reply, uint64_t n,
                     const volatile uint32_t *stop, int timeout_ms, uint64_t *duplicates);

/* Send n frames as fast as the switch takes them, keeping up to nbufs in flight.
 * *elapsed_ns gets the time to the last completion. Returns frames accepted. */
int64_t iop_nic_blast(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                      const uint8_t *src, const uint8_t *dst, uint32_t frame_len, uint64_t n,
                      uint64_t *elapsed_ns, int timeout_ms, uint64_t *duplicates);

/* Bridge a TAP (IFF_TAP | IFF_NO_PI, non-blocking) and the channel until stop_fd is
 * readable: the guest's NIC driver for unmodified programs in a network namespace.
 * Counters: [0] frames to the switch, [1] frames to the TAP, [2] TAP writes failed,
 * [3] sends refused by the switch. */
int iop_nic_bridge(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                   int tap_fd, int stop_fd, uint64_t spin_ns, uint64_t *counters,
                   uint64_t *duplicates);

/* ---- sequence-numbered traffic (failover checks, verifying load) ----
 * Frame k from src to dst: ethertype 0x88b5, k in 8 little-endian bytes at offset 14,
 * then bytes that follow from k; its length (60..1500) follows from k too. */

/* Write frame k into f (at least 1500 bytes); its length. */
uint32_t iop_nic_seq_frame(uint8_t *f, const uint8_t *src, const uint8_t *dst, uint64_t k);
/* 0 and *k (may be NULL) when f[0..len) is exactly a frame k from src to dst. */
int iop_nic_seq_check(const uint8_t *f, uint32_t len, const uint8_t *src, const uint8_t *dst,
                      uint64_t *k);

struct iop_nic_seq_tx {
    uint64_t first;                 /* sequence number of the first frame */
    uint64_t n;                     /* at most this many frames */
    const volatile uint64_t *credit; /* NULL, or: frame k only while k < *credit (a
                                      * sender with nothing in flight that waited 20 ms
                                      * sends one more anyway: counted in stalls) */
    const volatile uint32_t *stop;  /* NULL, or: no new frame once it is non-zero */
    int32_t timeout_ms;             /* for each completion */
    uint32_t reserved;
    uint64_t queued;                /* out: frames first .. first+queued-1 were queued */
    uint64_t accepted;              /* out: completed with status 0 */
    uint64_t failed;                /* out: completed with an error status */
    uint64_t duplicates;            /* out: completions dropped, ids not in flight */
    uint64_t stalls;
};

/* Send frames first, first+1, ... (up to nbufs in flight) until n were queued or *stop,
 * then wait for every completion. 0, or -errno (the counts say how far it got). */
int iop_nic_seq_send(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                     const uint8_t *src, const uint8_t *dst, struct iop_nic_seq_tx *job);

struct iop_nic_seq_rx {
    uint8_t *counts;                /* counts[k]: times frame k arrived (saturates) */
    uint64_t max_seq;               /* counts has this many entries */
    volatile uint64_t *credit;      /* NULL, or set to highest k received + 1 + window */
    uint64_t window;
    const volatile uint32_t *stop;  /* run until it is non-zero */
    int32_t posted;                 /* 1: the nbufs receive buffers are posted already */
    uint32_t reserved;
    uint64_t frames;                /* out: sequence frames received */
    uint64_t bad;                   /* out: frames that were not (or k >= max_seq) */
    uint64_t errors;                /* out: receive completions with an error status */
    uint64_t duplicates;            /* out: completions dropped, ids not in flight */
};

/* Keep nbufs receive buffers posted and count every frame k from src to dst that
 * arrives, until *stop. 0 or -errno. */
int iop_nic_seq_recv(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                     const uint8_t *src, const uint8_t *dst, struct iop_nic_seq_rx *job);

#endif
