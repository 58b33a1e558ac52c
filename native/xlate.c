/* xlate.c - PRPA -> pool translation against a client's region table.
 *
 * The whole range must be covered: [prpa, prpa+len) is walked region by region
 * and any gap, any region without the requested access, or any byte past the last
 * region refuses the whole request. Nothing is partially translated.
 */
#include <errno.h>
#include <string.h>

#include "iop_channel.h"
#include "iop_xlate.h"

void iop_xlate_init(struct iop_xlate_table *t, uint64_t pool_len)
{
    memset(t, 0, sizeof *t);
    t->pool_len = pool_len;
}

int iop_xlate_set(struct iop_xlate_table *t, const struct iop_region *r, uint32_t n)
{
    if (n > IOP_XLATE_MAX_REGIONS)
        return -E2BIG;
    for (uint32_t i = 0; i < n; i++) {
        if (r[i].len == 0 || r[i].prpa + r[i].len < r[i].prpa)
            return -EINVAL;
        if (r[i].pool_off + r[i].len < r[i].pool_off ||
            r[i].pool_off + r[i].len > t->pool_len)
            return -EINVAL;
        if (!r[i].access || (r[i].access & ~(uint32_t)(IOP_ACCESS_READ | IOP_ACCESS_WRITE)))
            return -EINVAL;
        if (i && r[i].prpa < r[i - 1].prpa + r[i - 1].len)
            return -EINVAL;
    }
    uint32_t g = __atomic_load_n(&t->generation, __ATOMIC_RELAXED);
    __atomic_store_n(&t->generation, g | 1u, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(t->regions, r, (size_t)n * sizeof *r);
    __atomic_store_n(&t->nregions, n, __ATOMIC_RELAXED);
    /* next even value: readers that started before see a change and retry */
    __atomic_store_n(&t->generation, (g | 1u) + 1u, __ATOMIC_RELEASE);
    return 0;
}

/* first region whose end lies above prpa (regions are sorted and disjoint) */
static uint32_t find_region(const struct iop_region *r, uint32_t n, uint64_t prpa)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (r[mid].prpa + r[mid].len <= prpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int translate(const struct iop_region *r, uint32_t n, uint64_t prpa, uint64_t len,
                     uint32_t access, struct iop_sg *sg, int max_sg)
{
    int used = 0;
    uint32_t i = find_region(r, n, prpa);
    while (len) {
        if (i >= n || r[i].prpa > prpa)
            return -EFAULT;
        if ((r[i].access & access) != access)
            return -EACCES;
        uint64_t off = prpa - r[i].prpa;
        uint64_t take = r[i].len - off;
        if (take > len)
            take = len;
        if (used > 0 && sg[used - 1].pool_off + sg[used - 1].len == r[i].pool_off + off) {
            sg[used - 1].len += take; /* extents adjacent in the pool too */
        } else {
            if (used == max_sg)
                return -E2BIG;
            sg[used].pool_off = r[i].pool_off + off;
            sg[used].len = take;
            used++;
        }
        prpa += take;
        len -= take;
        i++;
    }
    return used;
}

int iop_xlate(const struct iop_xlate_table *t, uint64_t prpa, uint64_t len, uint32_t access,
              struct iop_sg *sg, int max_sg, uint32_t *gen_out)
{
    if (len == 0 || prpa + len < prpa)
        return -EINVAL;
    if (!access || (access & ~(uint32_t)(IOP_ACCESS_READ | IOP_ACCESS_WRITE)))
        return -EINVAL;
    if (max_sg <= 0)
        return -E2BIG;
    /* bounded: a writer that died mid-update must not stall the I/O partition */
    for (unsigned tries = 0; tries < 1000000u; tries++) {
        uint32_t g1 = __atomic_load_n(&t->generation, __ATOMIC_ACQUIRE);
        if (g1 & 1u)
            continue; /* writer in progress */
        uint32_t n = __atomic_load_n(&t->nregions, __ATOMIC_RELAXED);
        if (n > IOP_XLATE_MAX_REGIONS)
            return -EFAULT;
        int rc = translate(t->regions, n, prpa, len, access, sg, max_sg);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint32_t g2 = __atomic_load_n(&t->generation, __ATOMIC_RELAXED);
        if (g1 != g2)
            continue;
        if (gen_out)
            *gen_out = g1;
        return rc;
    }
    return -EAGAIN;
}

int iop_xlate_valid(const struct iop_xlate_table *t, uint32_t gen)
{
    return __atomic_load_n(&t->generation, __ATOMIC_ACQUIRE) == gen;
}
