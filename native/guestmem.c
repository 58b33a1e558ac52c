/* guestmem.c - map a partition's pool extents at their PRPA layout. */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>

#include "iop_guestmem.h"
#include "iop_channel.h"
#include "iop_xlate.h"

void *iop_guest_map(int pool_fd, const struct iop_region *r, uint32_t n, uint64_t *span)
{
    if (n == 0 || n > IOP_XLATE_MAX_REGIONS || !span) {
        errno = EINVAL;
        return NULL;
    }
    uint64_t end = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (r[i].len == 0 || r[i].prpa % 4096 || r[i].len % 4096 || r[i].pool_off % 4096 ||
            r[i].prpa + r[i].len < r[i].prpa || (i && r[i].prpa < r[i - 1].prpa + r[i - 1].len)) {
            errno = EINVAL;
            return NULL;
        }
        end = r[i].prpa + r[i].len;
    }
    /* reserve the whole PRPA span first, so no other mapping lands in a hole */
    uint8_t *base = mmap(NULL, end, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    for (uint32_t i = 0; i < n; i++) {
        void *p = mmap(base + r[i].prpa, r[i].len,
                       PROT_READ | ((r[i].access & IOP_ACCESS_WRITE) ? PROT_WRITE : 0),
                       MAP_SHARED | MAP_FIXED, pool_fd, (off_t)r[i].pool_off);
        if (p == MAP_FAILED) {
            int e = errno;
            munmap(base, end);
            errno = e;
            return NULL;
        }
    }
    *span = end;
    return base;
}

int iop_guest_unmap(void *base, uint64_t span)
{
    return munmap(base, span) ? -errno : 0;
}
