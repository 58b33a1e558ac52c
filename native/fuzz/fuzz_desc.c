/* fuzz_desc.c - libFuzzer target for everything a hostile peer controls.
 *
 * The first input byte picks a mode:
 *   even: the rest is a region table, a slot's raw bytes and the ring control of a
 *         well-formed channel; the server pops, checks, and translates every fragment.
 *   odd:  the rest overwrites the channel header and ring controls before the server
 *         attaches; then it pops and answers what it can.
 * Any crash, sanitizer report or hang is a bug. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "iop_channel.h"
#include "iop_xlate.h"

#define NSLOTS 4
#define SLOT 128
#define POOL (1u << 20)

static _Alignas(64) uint8_t chan_mem[8192];

static void take(const uint8_t **p, size_t *n, void *out, size_t len)
{
    size_t k = *n < len ? *n : len;
    memset(out, 0, len);
    memcpy(out, *p, k);
    *p += k;
    *n -= k;
}

static void serve(struct iop_chan *ch, const struct iop_xlate_table *t)
{
    struct iop_desc d, rsp;
    const char *why;
    memset(&rsp, 0, sizeof rsp);
    for (int i = 0; i < 2 * NSLOTS; i++) {
        if (iop_chan_pop(ch, &d) < 0)
            break;
        if (iop_desc_check(ch, &d, &why) == 0) {
            for (uint16_t f = 0; f < d.nfrags; f++) {
                struct iop_sg sg[4];
                uint32_t gen;
                int n = iop_xlate(t, d.frags[f].addr, d.frags[f].len, d.frags[f].access, sg, 4, &gen);
                for (int k = 0; k < n; k++)
                    if (sg[k].pool_off + sg[k].len > POOL || sg[k].len == 0)
                        abort(); /* a translation outside the pool is the bug we hunt */
            }
        }
        rsp.id = d.id;
        if (iop_chan_tx_free(ch))
            iop_chan_push(ch, &rsp);
    }
    iop_chan_publish(ch);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t mode = data[0];
    data++, size--;
    uint64_t len = iop_chan_size(NSLOTS, SLOT);
    if (iop_chan_format(chan_mem, sizeof chan_mem, NSLOTS, SLOT, NULL, 0))
        abort();
    struct iop_chan_hdr *h = (void *)chan_mem;
    h->total_size = sizeof chan_mem;
    (void)len;

    static struct iop_xlate_table t;
    iop_xlate_init(&t, POOL);
    struct iop_chan *ch = NULL;
    if (mode & 1) {
        size_t n = size < sizeof chan_mem ? size : sizeof chan_mem;
        memcpy(chan_mem, data, n);
        if (iop_chan_attach(chan_mem, sizeof chan_mem, IOP_ROLE_SERVER, &ch, NULL) == 0) {
            serve(ch, &t);
            iop_chan_detach(ch);
        }
        return 0;
    }
    struct iop_region r[4];
    uint8_t nreg;
    take(&data, &size, &nreg, 1);
    take(&data, &size, r, sizeof r);
    iop_xlate_set(&t, r, nreg % 5); /* refused sets must leave the table usable */
    if (iop_chan_attach(chan_mem, sizeof chan_mem, IOP_ROLE_SERVER, &ch, NULL))
        abort(); /* a freshly formatted channel must attach */
    uint8_t *slots = chan_mem + h->req_ring_off + IOP_RING_CTL_SIZE;
    take(&data, &size, slots, NSLOTS * SLOT);
    struct iop_ring_ctl *req = (void *)(chan_mem + h->req_ring_off);
    struct iop_ring_ctl *rsp = (void *)(chan_mem + h->rsp_ring_off);
    uint32_t idx[2];
    take(&data, &size, idx, sizeof idx);
    req->prod = idx[0];     /* the client's producer index: anything */
    rsp->cons = idx[1] % 3; /* the client's consumer index on our tx ring */
    serve(ch, &t);
    iop_chan_detach(ch);
    return 0;
}
