/* iop_blk.h - the I/O partition's block data path and the native block client.
 *
 * A block server is one C thread that multiplexes many client endpoints onto
 * disks (claim 19). Each endpoint is a channel, the client's region table (live,
 * in the read-only descriptor table) and an extent [base, base+size) of a disk fd.
 * For every request the server copies the descriptor out, checks it, checks the
 * byte range against the endpoint's extent (claim 18), translates every fragment
 * through the client's region table (claim 20) and only then touches the disk,
 * with one of two engines: pread/pwrite (the reference) or io_uring. Each
 * completion checks that the client's memory was not reassigned meanwhile.
 *
 * Request: opcode READ/WRITE/FLUSH, offset = byte offset in the endpoint, len =
 * total bytes, fragments = the client's buffers in PRPA terms. Response: same id
 * and opcode, status 0 or a negative errno, len = bytes done.
 */
#ifndef IOP_BLK_H
#define IOP_BLK_H
#include <stdint.h>

#define IOP_OP_READ 16
#define IOP_OP_WRITE 17
#define IOP_OP_FLUSH 18

#define IOP_BLK_ENGINE_PSYNC 0
#define IOP_BLK_ENGINE_URING 1

#define IOP_BLK_MAX_ENDPOINTS 64
#define IOP_BLK_HIST_BUCKETS 32
/* bucket i counts latencies below 2^(i+8) ns (bucket 0: under 256 ns) */
#define IOP_BLK_HIST_SHIFT 8

/* endpoint flags */
#define IOP_BLK_RO 1
#define IOP_BLK_DIRECT 2

struct iop_blk_server_cfg {
    uint32_t engine;
    int32_t cpu;
    uint64_t spin_ns;
    uint32_t batch;
    uint32_t queue_depth;
};

struct iop_blk_endpoint_cfg {
    int32_t fd;
    uint32_t flags;
    uint64_t base;
    uint64_t size;
    uint32_t align;
    uint32_t reserved;
};

struct iop_blk_stats {
    uint64_t reads;
    uint64_t writes;
    uint64_t flushes;
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t errors;
    uint64_t refused;
    uint64_t refused_desc;
    uint64_t refused_addr;
    uint64_t refused_range;
    uint64_t refused_ro;
    uint64_t refused_op;
    uint64_t refused_stale;
    uint64_t inflight;
    uint64_t lat_sum_ns;
    uint64_t hist[32];
};

struct iop_blk_server_stats {
    uint64_t loops;
    uint64_t sleeps;
    uint64_t batches;
    uint64_t submitted;
    uint64_t completed;
    uint64_t broken_channels;
    uint64_t inline_done; /* io_uring engine: requests the page cache served at once */
};

struct iop_blk_server;
struct iop_chan;
struct iop_xlate_table;
struct iop_jrnl;

/* pool_base/pool_len: this process's mapping of the host memory pool, which the
 * region tables' pool offsets refer to. */
int iop_blk_server_start(void *pool_base, uint64_t pool_len,
                         const struct iop_blk_server_cfg *cfg, struct iop_blk_server **out);
/* Add an endpoint (the server end of ch). jrnl (may be NULL) is the channel's
 * in-flight journal, opened for this server: its queued entries run first. The
 * server uses it until the endpoint is removed (the caller closes it after).
 * Returns the endpoint id (>= 0) or -errno. */
int iop_blk_server_add(struct iop_blk_server *s, struct iop_chan *ch,
                       const struct iop_xlate_table *xlate,
                       const struct iop_blk_endpoint_cfg *cfg, struct iop_jrnl *jrnl);
/* Take an endpoint out; waits until its in-flight requests completed. */
int iop_blk_server_remove(struct iop_blk_server *s, int id);
int iop_blk_endpoint_stats(struct iop_blk_server *s, int id, struct iop_blk_stats *out);
void iop_blk_server_stats(struct iop_blk_server *s, struct iop_blk_server_stats *out);
int iop_blk_server_stop(struct iop_blk_server *s);

/* ---- native block client (benchmarks, fast clients, verifying load) ---- */

struct iop_blk_job {
    uint64_t buf_prpa;   /* PRPA of a buffer area in the client's memory */
    void *buf;           /* the same area, mapped in this process */
    uint64_t buf_len;    /* at least queue_depth * block_size */
    uint64_t span;       /* random offsets fall in [0, span) of the endpoint */
    uint64_t n_ops;
    uint64_t seed;
    uint32_t block_size;
    uint32_t queue_depth;
    uint32_t write_pct;  /* 0: reads only, 100: writes only */
    uint32_t verify;     /* 1: stamp written blocks, check every byte read back */
    int32_t timeout_ms;
    uint32_t sequential; /* 1: blocks 0, 1, 2, ... instead of random ones */
    uint32_t *versions;  /* verify state, span/block_size entries kept across jobs
                          * (NULL: private to this job) */
    uint64_t *done_ns;   /* NULL, or n_ops completion times (iop_now_ns clock) */
};

struct iop_blk_job_result {
    uint64_t ops;
    uint64_t reads;
    uint64_t writes;
    uint64_t errors;
    uint64_t verify_failures;
    uint64_t verified_bytes;
    uint64_t elapsed_ns;
    uint64_t duplicates; /* completions not in the shadow of in-flight requests, dropped */
    int32_t first_error;
    uint32_t reserved;
};

/* Run a job on the client end ch. lat_ns (may be NULL) gets n_ops latencies.
 * Returns 0, or a negative errno when the channel failed (not for I/O errors,
 * which are counted in res). */
int iop_blk_client_run(struct iop_chan *ch, const struct iop_blk_job *job, uint64_t *lat_ns,
                       struct iop_blk_job_result *res);

#endif
