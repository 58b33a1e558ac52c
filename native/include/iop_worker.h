/* iop_worker.h - native channel server threads and native client loops.
 *
 * A worker is a C thread that owns the server end of one channel: it pops a
 * descriptor, validates the private copy, translates every fragment through the
 * client's region table, runs the handler, and completes the batch with one
 * publish (one notification at most). Python starts and stops workers and reads
 * their counters; it never runs per request.
 */
#ifndef IOP_WORKER_H
#define IOP_WORKER_H
#include <stdint.h>

#define IOP_ABI_VERSION 2

/* handlers */
#define IOP_HANDLER_NULL 0

struct iop_worker_cfg {
    uint64_t spin_ns;
    int32_t cpu;
    uint32_t batch;
    uint32_t handler;
    uint32_t reserved;
};

struct iop_worker_stats {
    uint64_t requests;
    uint64_t completed;
    uint64_t refused_desc;
    uint64_t refused_addr;
    uint64_t refused_access;
    uint64_t batches;
    uint64_t wakeups;
    uint64_t broken;
};

struct iop_worker;
struct iop_chan;
struct iop_xlate_table;

int iop_abi_version(void);
const char *iop_build_stamp(void);

/* xlate may be NULL: then any fragment is refused with -EFAULT. */
int iop_worker_start(struct iop_chan *ch, const struct iop_xlate_table *xlate,
                     const struct iop_worker_cfg *cfg, struct iop_worker **out);
int iop_worker_stop(struct iop_worker *w);
void iop_worker_stats(const struct iop_worker *w, struct iop_worker_stats *out);

/* Pin the calling thread to one CPU (-1: leave it). */
int iop_pin_cpu(int cpu);
uint64_t iop_now_ns(void);

/* Client loops for benchmarks and tests: n round trips of one null request each,
 * latency of each stored in lat_ns (may be NULL). Blocks on the doorbell when the
 * handle's spin budget runs out. Returns 0 or negative errno (-EIO on a wrong id). */
int iop_client_roundtrips(struct iop_chan *ch, uint64_t n, uint64_t *lat_ns,
                          int timeout_ms);

/* Push n one-way (no-reply) requests, publishing every `batch`, and wait until the
 * server has consumed them all. *elapsed_ns gets the time from first push to last
 * consumed. */
int iop_client_oneway(struct iop_chan *ch, uint64_t n, uint32_t batch,
                      uint64_t *elapsed_ns, int timeout_ms);

#endif
