/* dtab.c - the partition descriptor table: one writer, many read-only readers. */
#include <errno.h>
#include <string.h>

#include "iop_channel.h"
#include "iop_xlate.h"
#include "iop_dtab.h"

static struct iop_pdesc *slot(void *base, uint32_t i)
{
    return (struct iop_pdesc *)((char *)base + sizeof(struct iop_dtab_hdr)) + i;
}

uint64_t iop_dtab_size(uint32_t nslots)
{
    uint64_t n = sizeof(struct iop_dtab_hdr) + (uint64_t)nslots * sizeof(struct iop_pdesc);
    return (n + 4095) & ~(uint64_t)4095;
}

int iop_dtab_init(void *base, uint32_t nslots, uint64_t pool_len)
{
    if (nslots == 0)
        return -EINVAL;
    struct iop_dtab_hdr *h = base;
    memset(base, 0, iop_dtab_size(nslots));
    for (uint32_t i = 0; i < nslots; i++)
        iop_xlate_init(&slot(base, i)->mem, pool_len);
    h->version = IOP_DTAB_VERSION;
    h->nslots = nslots;
    h->slot_size = sizeof(struct iop_pdesc);
    __atomic_store_n(&h->magic, (uint64_t)IOP_DTAB_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

int iop_dtab_check(const void *base, uint64_t size)
{
    const struct iop_dtab_hdr *h = base;
    if (size < sizeof *h || __atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != IOP_DTAB_MAGIC)
        return -EPROTO;
    if (h->version != IOP_DTAB_VERSION || h->slot_size != sizeof(struct iop_pdesc))
        return -EPROTO;
    if (h->nslots == 0 || iop_dtab_size(h->nslots) > size)
        return -EINVAL;
    return (int)h->nslots;
}

static void copy_str(char *dst, const char *src, size_t cap)
{
    memset(dst, 0, cap);
    if (src)
        strncpy(dst, src, cap - 1);
}

int iop_dtab_publish(void *base, uint32_t index, const char *name, const char *kind,
                     const char *state, uint32_t cpu_milli, uint64_t memory,
                     const struct iop_region *regions, uint32_t nregions)
{
    struct iop_dtab_hdr *h = base;
    if (index >= h->nslots)
        return -ERANGE;
    struct iop_pdesc *d = slot(base, index);
    /* check the regions against a scratch table first: a refusal changes nothing */
    static __thread struct iop_xlate_table scratch;
    iop_xlate_init(&scratch, d->mem.pool_len);
    int rc = iop_xlate_set(&scratch, regions, name ? nregions : 0);
    if (rc < 0)
        return rc;
    uint32_t s = __atomic_load_n(&d->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&d->seq, s | 1u, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    d->status = name ? IOP_PDESC_LIVE : IOP_PDESC_FREE;
    d->index = index;
    d->cpu_milli = name ? cpu_milli : 0;
    d->memory = name ? memory : 0;
    copy_str(d->name, name, sizeof d->name);
    copy_str(d->kind, name ? kind : NULL, sizeof d->kind);
    copy_str(d->state, name ? state : NULL, sizeof d->state);
    iop_xlate_set(&d->mem, regions, name ? nregions : 0);
    __atomic_store_n(&d->seq, (s | 1u) + 1u, __ATOMIC_RELEASE);
    __atomic_fetch_add(&h->publishes, 1, __ATOMIC_RELAXED);
    return 0;
}

int64_t iop_dtab_read(const void *base, uint32_t index, struct iop_pdesc *out, int max_tries)
{
    const struct iop_dtab_hdr *h = base;
    if (index >= __atomic_load_n(&h->nslots, __ATOMIC_RELAXED))
        return -ERANGE;
    const struct iop_pdesc *d = (const struct iop_pdesc *)((const char *)base + sizeof *h) + index;
    for (int i = 0; i < max_tries; i++) {
        uint32_t s1 = __atomic_load_n(&d->seq, __ATOMIC_ACQUIRE);
        if (s1 & 1u) {
            __asm__ __volatile__("" ::: "memory");
            continue;
        }
        memcpy(out, (const void *)d, sizeof *out);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&d->seq, __ATOMIC_RELAXED) == s1) {
            out->name[sizeof out->name - 1] = 0;
            out->kind[sizeof out->kind - 1] = 0;
            out->state[sizeof out->state - 1] = 0;
            return s1;
        }
    }
    return -EAGAIN;
}
