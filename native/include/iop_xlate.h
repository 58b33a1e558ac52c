/* iop_xlate.h - the I/O monitor's address translation layer.
 *
 * Each client partition has a region table: its memory extents in partition-
 * relative physical address (PRPA) order, each with the pool offset it maps to and
 * the access the client granted. A PRPA range translates only if every byte of it
 * lies in regions assigned to that client with the requested access; a range that
 * spans extents comes back as a scatter list.
 *
 * The table is guarded by a generation number used as a seqlock: the writer makes
 * it odd, updates, makes it even and larger. A translation reports the generation
 * it was made under; iop_xlate_valid() tells whether that is still current, so a
 * buffer checked before a reassignment is refused after it.
 *
 * The table is plain memory with no pointers, so it can live in a shared,
 * read-only descriptor table.
 */
#ifndef IOP_XLATE_H
#define IOP_XLATE_H
#include <stdint.h>

#define IOP_XLATE_MAX_REGIONS 64

struct iop_region {
    uint64_t prpa;
    uint64_t len;
    uint64_t pool_off;
    uint32_t access;
    uint32_t reserved;
};

struct iop_xlate_table {
    uint32_t generation;
    uint32_t nregions;
    uint64_t pool_len;
    struct iop_region regions[64];
};

/* A translated piece: a pool offset and its length. */
struct iop_sg {
    uint64_t pool_off;
    uint64_t len;
};

/* Empty table for a pool of pool_len bytes. */
void iop_xlate_init(struct iop_xlate_table *t, uint64_t pool_len);

/* Replace the regions (seqlock writer). Regions must be sorted by prpa, non-
 * overlapping in PRPA, inside the pool, and of non-zero length; otherwise -EINVAL
 * and nothing changes. */
int iop_xlate_set(struct iop_xlate_table *t, const struct iop_region *regions,
                  uint32_t n);

/* Translate [prpa, prpa+len) for access. Returns the number of sg entries written
 * (>= 1), -EINVAL for a zero or wrapping length, -EFAULT if any byte is not
 * assigned, -EACCES if assigned without that access, -E2BIG if more than max_sg
 * pieces would be needed. *gen_out gets the generation it was valid under. */
int iop_xlate(const struct iop_xlate_table *t, uint64_t prpa, uint64_t len,
              uint32_t access, struct iop_sg *sg, int max_sg, uint32_t *gen_out);

/* 1 if nothing was reassigned since generation gen, else 0. */
int iop_xlate_valid(const struct iop_xlate_table *t, uint32_t gen);

#endif
