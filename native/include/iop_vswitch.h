/* iop_vswitch.h - the I/O partition's virtual switch and the native NIC client.
 *
 * One C thread switches Ethernet frames among ports (claim 19): guest ports are
 * channels whose frames live in the guest's memory, and uplink ports are fds of the
 * host's NICs (a TAP, or an AF_PACKET socket bound to a veth or physical
 * interface). It learns MAC addresses, floods broadcast, multicast and unknown
 * destinations, and drops (and counts) frames whose source MAC is not the sending
 * guest's, runts and oversize frames. Every guest buffer goes through the guest's
 * region table first (claim 20).
 *
 * Guest requests: NET_TX carries a frame in its fragments (read access) and is
 * completed once the frame was switched; NET_RX posts an empty buffer (one fragment,
 * write access) that is completed with len = frame length when a frame arrives for
 * the port. With no buffer posted the frame is dropped and counted, as a real NIC
 * drops what its receive ring has no room for.
 *
 * Failover (iop_journal.h): a guest port added with its channel's journal takes every
 * request through it; posted receive buffers stay TAKEN there while they wait. A
 * switch that took the channel over runs the entries it found first: frames are sent
 * again (a receiver may get a frame twice), buffers are posted again (a frame that was
 * copied into one whose completion was never published is lost). Frames a guest
 * queued for transmit are never lost. Add receiving ports before the ports that send
 * to them: a frame switched to a port not yet added is not delivered.
 */
#ifndef IOP_VSWITCH_H
#define IOP_VSWITCH_H
#include <stdint.h>

#define IOP_OP_NET_TX 32
#define IOP_OP_NET_RX 33

#define IOP_VSW_MAX_PORTS 64
#define IOP_VSW_FRAME_MAX 9216
#define IOP_VSW_FRAME_MIN 14
#define IOP_VSW_MAC_TABLE 1024

/* port kinds */
#define IOP_VSW_GUEST 1
#define IOP_VSW_UPLINK 2

struct iop_vswitch_cfg {
    int32_t cpu;
    uint32_t batch;
    uint64_t spin_ns;
    uint64_t mac_age_ns;
};

struct iop_vport_cfg {
    uint32_t kind;
    int32_t fd;         /* uplink: the NIC's fd (non-blocking); guest: -1 */
    uint8_t mac[6];     /* guest: the only source MAC its frames may carry */
    uint16_t mtu;       /* frames up to mtu + 18 bytes (header, VLAN tag) */
    uint32_t rx_slots;  /* guest: at most this many posted receive buffers */
    uint32_t reserved;
};

struct iop_vport_stats {
    uint64_t tx_frames;     /* frames this port sent into the switch */
    uint64_t tx_bytes;
    uint64_t rx_frames;     /* frames the switch delivered to this port */
    uint64_t rx_bytes;
    uint64_t rx_dropped;    /* no receive buffer posted, or the uplink refused */
    uint64_t spoofed;       /* source MAC not the guest's: dropped */
    uint64_t runts;
    uint64_t oversize;
    uint64_t refused;       /* bad descriptors, addresses, opcodes */
    uint64_t flooded;       /* frames from this port sent to every other port */
    uint64_t rx_posted;     /* receive buffers currently posted */
};

struct iop_vswitch_stats {
    uint64_t loops;
    uint64_t sleeps;
    uint64_t frames;
    uint64_t learned;
    uint64_t moves;         /* a MAC seen on another port than before */
    uint64_t unknown_dst;
    uint64_t broken_channels;
};

struct iop_vswitch;
struct iop_chan;
struct iop_xlate_table;
struct iop_jrnl;

int iop_vswitch_start(void *pool_base, uint64_t pool_len, const struct iop_vswitch_cfg *cfg,
                      struct iop_vswitch **out);
/* Add a port; ch and xlate for guest ports (NULL for uplinks). jrnl (guest ports, may
 * be NULL) is the channel's in-flight journal, opened for this switch, with at least as
 * many entries as the ring has slots: its queued entries run first. The switch uses it
 * until the port is removed or the switch stopped (the caller closes it after).
 * Returns the port id (>= 0) or -errno. */
int iop_vswitch_add(struct iop_vswitch *s, const struct iop_vport_cfg *cfg, struct iop_chan *ch,
                    const struct iop_xlate_table *xlate, struct iop_jrnl *jrnl);
int iop_vswitch_remove(struct iop_vswitch *s, int id);
int iop_vport_stats(struct iop_vswitch *s, int id, struct iop_vport_stats *out);
void iop_vswitch_stats(struct iop_vswitch *s, struct iop_vswitch_stats *out);
/* The port a MAC was learned on, or -ENOENT. */
int iop_vswitch_lookup(struct iop_vswitch *s, const uint8_t *mac);
/* Hold the switch between passes (on = 1: returns once it is holding) or let it go
 * on. A standby taking over adds every port while held, so no frame replayed from one
 * port's journal is switched before its destination port is back. Do not remove
 * ports while held. */
int iop_vswitch_hold(struct iop_vswitch *s, int on);
int iop_vswitch_stop(struct iop_vswitch *s);

#endif
