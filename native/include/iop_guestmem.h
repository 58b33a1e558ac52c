/* iop_guestmem.h - a partition's memory as its monitor lays it out.
 *
 * The monitor maps each extent of the host pool that the partition owns at
 * base + prpa, inside one reserved range, so the guest sees its memory as one
 * contiguous PRPA space and nothing else of the pool. The pool fd is not kept.
 */
#ifndef IOP_GUESTMEM_H
#define IOP_GUESTMEM_H
#include <stdint.h>

struct iop_region;

/* Map regions (sorted by prpa) of pool_fd; returns the base or NULL (errno set).
 * *span gets the reserved size (end of the last region). Holes stay PROT_NONE. */
void *iop_guest_map(int pool_fd, const struct iop_region *regions, uint32_t n, uint64_t *span);
int iop_guest_unmap(void *base, uint64_t span);

#endif
