/* iop_nic.h - native loops of a guest's NIC (the client end of a switch port).
 *
 * All buffers are in the guest's own memory: `base` is where this process maps PRPA
 * 0 and [buf_prpa, buf_prpa + nbufs * IOP_NIC_BUF) is the loop's buffer area.
 * Receive buffers carry ids 0..nbufs-1; transmits carry ids with bit 32 set. A
 * posted receive buffer stays with the switch until a frame fills it, so a loop run
 * again on the same buffers says `posted` = 1 and posts none anew.
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
                     uint64_t n, uint64_t *lat_ns, int timeout_ms);

/* Send every received frame back to its sender (reply = 1), or just count them
 * (reply = 0), until n frames or *stop becomes non-zero. Returns frames seen. */
int64_t iop_nic_echo(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                     int posted, const uint8_t *mac, int reply, uint64_t n,
                     const volatile uint32_t *stop, int timeout_ms);

/* Send n frames as fast as the switch takes them, keeping up to nbufs in flight.
 * *elapsed_ns gets the time to the last completion. Returns frames accepted. */
int64_t iop_nic_blast(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                      const uint8_t *src, const uint8_t *dst, uint32_t frame_len, uint64_t n,
                      uint64_t *elapsed_ns, int timeout_ms);

/* Bridge a TAP (IFF_TAP | IFF_NO_PI, non-blocking) and the channel until stop_fd is
 * readable: the guest's NIC driver for unmodified programs in a network namespace.
 * Counters: [0] frames to the switch, [1] frames to the TAP, [2] TAP writes failed,
 * [3] sends refused by the switch. */
int iop_nic_bridge(struct iop_chan *ch, uint8_t *base, uint64_t buf_prpa, uint32_t nbufs,
                   int tap_fd, int stop_fd, uint64_t spin_ns, uint64_t *counters);

#endif
