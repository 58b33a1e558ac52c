/* iop_dtab.h - the partition descriptor table the ultravisor publishes.
 *
 * One table per host: a header and one fixed-size slot per partition index. The
 * ultravisor is the only writer; monitors and I/O partitions map the table
 * read-only (the memfd is sealed against new writable mappings). Each slot is a
 * seqlock: `seq` is odd while the ultravisor rewrites the slot, and every
 * published change makes it larger and even. A reader copies a slot out and keeps
 * the copy only if `seq` was even and unchanged around the copy.
 *
 * The memory of a partition is the region table `mem` (see iop_xlate.h): its
 * page-map extents laid out at PRPA 0, 1, ... in order. Its generation changes
 * whenever the memory is reassigned, so a buffer translated under an older
 * generation is refused afterwards.
 */
#ifndef IOP_DTAB_H
#define IOP_DTAB_H
#include <stdint.h>

#define IOP_DTAB_MAGIC 0x42415444504f49
#define IOP_DTAB_VERSION 1
#define IOP_DTAB_NAME_LEN 64
#define IOP_PDESC_FREE 0
#define IOP_PDESC_LIVE 1

struct iop_dtab_hdr {
    uint64_t magic;
    uint32_t version;
    uint32_t nslots;
    uint32_t slot_size;
    uint32_t reserved;
    uint64_t publishes;
};

struct iop_pdesc {
    uint32_t seq;
    uint32_t status;
    uint32_t index;
    uint32_t cpu_milli;
    uint64_t memory;
    char name[64];
    char kind[16];
    char state[16];
    struct iop_xlate_table mem;
};

/* Bytes a table of nslots slots takes. */
uint64_t iop_dtab_size(uint32_t nslots);

/* Lay out an empty table in zeroed memory of iop_dtab_size(nslots) bytes. */
int iop_dtab_init(void *base, uint32_t nslots, uint64_t pool_len);

/* Check a mapped table: magic, version, slot size and that nslots fits in size.
 * Returns nslots or -EPROTO / -EINVAL. */
int iop_dtab_check(const void *base, uint64_t size);

/* Writer: publish slot `index` (seqlock). regions as for iop_xlate_set; a NULL
 * name frees the slot. Returns 0, -ERANGE for an index past the table, -EINVAL /
 * -E2BIG for bad regions (the slot is left as it was). */
int iop_dtab_publish(void *base, uint32_t index, const char *name, const char *kind,
                     const char *state, uint32_t cpu_milli, uint64_t memory,
                     const struct iop_region *regions, uint32_t nregions);

/* Reader: copy slot `index` out consistently. Returns its seq (>= 0), -ERANGE,
 * or -EAGAIN when the writer kept it busy through max_tries attempts. */
int64_t iop_dtab_read(const void *base, uint32_t index, struct iop_pdesc *out,
                      int max_tries);

#endif
