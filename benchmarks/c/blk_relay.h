/* The grant half of the C device model (blk_dm.c): the smallest shadow-ring relay, for
 * a guest whose rings and buffers are grants and a backend (QSD) that cannot map them.
 * It does per request what xvf's relay does (xvf/hotpath/_relay.pyx): the guest's
 * chain walked and checked, its device-readable bytes grant-copied into bounce space
 * in one copy call per batch of requests, a shadow chain published to QSD, and at
 * completion the device-written bytes copied back in one call per batch and the guest's
 * used ring written, with EVENT_IDX on both rings. It is smaller than xvf's in what
 * it does not need to do for the benchmark: a fixed 64 KiB of bounce space per guest
 * head (chains longer than that, and indirect descriptors, are refused), the shadow
 * descriptors at the guest's own indices, no stall for space, no reset.
 *
 * The grant copy is the software Xen's GNTTABOP_copy run in this process, as xvf's
 * copier runs it (include/xvf/sim_grant_copy.h). The guest's rings are mapped once at
 * DRIVER_OK by resolving their grants in the guest's grant table (what gntdev's map
 * does on Xen; xvf maps them through the software Xen's OP_GNT_MAP). */
#ifndef XVF_BENCH_BLK_RELAY_H
#define XVF_BENCH_BLK_RELAY_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "xvf/barrier.h"
#include "xvf/linux_xen.h"
#include "xvf/sim_grant_copy.h"
#include "xvf/virtio_ring.h"
#include "xvf/xen_grant.h"

#define RELAY_SLOT (64u << 10)       /* bounce bytes per guest head */
#define RELAY_MAX_DESCS 16u          /* descriptors per chain */
#define RELAY_BATCH 64u              /* requests (or completions) per copy call */
#define RELAY_SEGS (RELAY_BATCH * (RELAY_SLOT / 4096u + RELAY_MAX_DESCS))
#define RELAY_SHADOW_RINGS 0x1000u   /* the shadow rings' offset; page 0 stays unused */
#define RELAY_BOUNCE 0x10000u        /* the bounce slots' offset */
#define RELAY_RAM_BANKS 8

struct relay_desc { uint64_t addr; uint32_t len; int write; };
struct relay_req { int busy; unsigned n; struct relay_desc d[RELAY_MAX_DESCS]; };

struct relay {
    /* the guest, as the software Xen shows it to a copier */
    int ram_fd;
    xvf_sim_area_t ram[RELAY_RAM_BANKS];
    uint64_t ram_off[RELAY_RAM_BANKS];    /* each bank's offset in ram_fd */
    char *ram_map;                        /* all of ram_fd, mapped */
    xvf_sim_guest_view_t view;
    uint16_t domid, caller;
    /* the shadow memory QSD maps: the shadow rings and the bounce slots */
    uint8_t *shadow;
    uint64_t shadow_size;
    xvf_sim_area_t local;
    /* the rings */
    uint16_t num;
    int event_idx;
    xvf_vring_desc_t *gdesc;
    xvf_vring_avail_t *gavail;
    xvf_vring_used_t *gused;
    xvf_vring_desc_t *sdesc;
    xvf_vring_avail_t *savail;
    xvf_vring_used_t *sused;
    uint16_t g_last_avail, g_used, s_avail, s_last_used;
    struct relay_req *reqs;     /* per guest head */
    xvf_gntdev_grant_copy_segment_t segs[RELAY_SEGS];
    long refused, lost, lies;
};

static inline uint16_t *relay_used_event(xvf_vring_avail_t *a, uint16_t num)
    { return &a->ring[num]; }
static inline uint16_t *relay_avail_event(xvf_vring_used_t *u, uint16_t num)
    { return (uint16_t *)&u->ring[num]; }
static inline int relay_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
    { return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old); }

/* Map [addr, addr + len) of grant DMA space: each page's grant resolved in the grant
 * table to a frame of the guest's RAM, mapped from its memfd. NULL if it is not. */
static void *relay_map_grants(struct relay *r, uint64_t addr, uint64_t len) {
    if (!(addr & XVF_GRANT_DMA_ADDR_OFF) || len == 0) return NULL;
    uint64_t raw = addr & ~XVF_GRANT_DMA_ADDR_OFF, off = raw & 0xfff, first = raw >> 12;
    uint64_t pages = (off + len + 0xfff) >> 12;
    uint8_t *base = mmap(NULL, pages << 12, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return NULL;
    for (uint64_t i = 0; i < pages; i++) {
        char *where;  /* the page in our map of all RAM: its offset there is its offset in ram_fd */
        if (first + i > UINT32_MAX ||
            xvf_sim_grant_side(&r->view, r->caller, (uint32_t)(first + i), 0, 4096, 1, &where) !=
                XVF_GNTST_okay ||
            mmap(base + (i << 12), 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, r->ram_fd,
                 (off_t)(where - r->ram_map)) == MAP_FAILED)
            return NULL;
    }
    return base + off;
}

/* Map the guest's RAM for the copies and lay out the shadow memory. 0, or -1. */
static int relay_init(struct relay *r, int gnt_fd, uint32_t nr_entries, int lock_fd,
                      int shadow_fd, uint64_t shadow_size) {
    uint64_t ram_size = 0;
    for (int i = 0; i < r->view.nram; i++)
        if (r->ram_off[i] + r->ram[i].size > ram_size) ram_size = r->ram_off[i] + r->ram[i].size;
    char *ram = r->ram_map = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, r->ram_fd, 0);
    void *entries = mmap(NULL, ((uint64_t)nr_entries * sizeof(xvf_grant_entry_v1_t) + 0xfff) & ~0xfffull,
                         PROT_READ, MAP_SHARED, gnt_fd, 0);
    void *lock = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, lock_fd, 0);
    r->shadow = mmap(NULL, shadow_size, PROT_READ | PROT_WRITE, MAP_SHARED, shadow_fd, 0);
    if (ram == MAP_FAILED || entries == MAP_FAILED || lock == MAP_FAILED || r->shadow == MAP_FAILED)
        return -1;
    for (int i = 0; i < r->view.nram; i++) r->ram[i].base = ram + r->ram_off[i];
    r->view.ram = r->ram;
    r->view.entries = entries;
    r->view.nr_entries = nr_entries;
    r->view.lock = lock;
    r->shadow_size = shadow_size;
    r->local = (xvf_sim_area_t){(uint64_t)(uintptr_t)r->shadow, shadow_size, (char *)r->shadow};
    return 0;
}

/* At DRIVER_OK: map the guest's rings, place the shadow's. The shadow rings' offsets
 * in the shadow memory go to *sdesc.. (QSD's vring addresses). 0, or -1. */
static int relay_start(struct relay *r, uint16_t num, uint64_t desc, uint64_t avail, uint64_t used,
                       int event_idx, uint64_t *sdesc, uint64_t *savail, uint64_t *sused) {
    if (num == 0 || num > XVF_VRING_MAX_SIZE || RELAY_BOUNCE + (uint64_t)num * RELAY_SLOT > r->shadow_size)
        return -1;
    r->num = num;
    r->event_idx = event_idx;
    r->gdesc = relay_map_grants(r, desc, 16ull * num);
    r->gavail = relay_map_grants(r, avail, 6 + 2ull * num);
    r->gused = relay_map_grants(r, used, 6 + 8ull * num);
    r->reqs = calloc(num, sizeof *r->reqs);
    if (!r->gdesc || !r->gavail || !r->gused || !r->reqs) return -1;
    *sdesc = RELAY_SHADOW_RINGS;
    *savail = *sdesc + 16ull * num;
    *sused = (*savail + 6 + 2ull * num + 3) & ~3ull;
    if (*sused + 6 + 8ull * num > RELAY_BOUNCE) return -1;
    r->sdesc = (xvf_vring_desc_t *)(r->shadow + *sdesc);
    r->savail = (xvf_vring_avail_t *)(r->shadow + *savail);
    r->sused = (xvf_vring_used_t *)(r->shadow + *sused);
    return 0;
}

/* The copy call: every segment under the guest's grant lock, as one GNTTABOP_copy. */
static int relay_copy(struct relay *r, unsigned n) {
    if (n == 0) return 0;
    if (xvf_sim_grant_lock(r->view.lock)) return -1;
    const xvf_sim_guest_view_t *g = r->view.lock->alive ? &r->view : NULL;
    int rc = 0;
    for (unsigned k = 0; k < n && rc == 0; k++) {
        rc = xvf_sim_segment_domid(&r->segs[k]);
        if (rc >= 0) rc = xvf_sim_copy_segment(g, r->caller, &r->local, 1, &r->segs[k]);
    }
    xvf_sim_grant_unlock(r->view.lock);
    return rc;
}

/* Segments copying len bytes between grant address gaddr and shadow offset soff. */
static unsigned relay_segments(struct relay *r, unsigned n, uint64_t gaddr, uint64_t soff, uint32_t len,
                               int to_guest) {
    uint64_t raw = gaddr & ~XVF_GRANT_DMA_ADDR_OFF;
    while (len) {
        uint32_t in_page = 4096 - (uint32_t)(raw & 0xfff), chunk = len < in_page ? len : in_page;
        xvf_gntdev_grant_copy_segment_t *s = &r->segs[n++];
        memset(s, 0, sizeof *s);
        struct xvf_gntdev_copy_foreign f = {(uint32_t)(raw >> 12), (uint16_t)(raw & 0xfff), r->domid};
        if (to_guest) {
            s->source.virt = r->shadow + soff;
            s->dest.foreign = f;
            s->flags = XVF_GNTCOPY_dest_gref;
        } else {
            s->source.foreign = f;
            s->dest.virt = r->shadow + soff;
            s->flags = XVF_GNTCOPY_source_gref;
        }
        s->len = (uint16_t)chunk;
        raw += chunk;
        soff += chunk;
        len -= chunk;
    }
    return n;
}

/* Walk and check guest chain `head` into its request; -1 if it is refused. */
static int relay_take(struct relay *r, uint16_t head) {
    if (head >= r->num || r->reqs[head].busy) return -1;
    struct relay_req *q = &r->reqs[head];
    uint64_t total = 0;
    uint16_t i = head;
    q->n = 0;
    for (;;) {
        xvf_vring_desc_t d = r->gdesc[i];
        if (q->n == RELAY_MAX_DESCS || (d.flags & XVF_VRING_DESC_F_INDIRECT) || d.len == 0 ||
            !(d.addr & XVF_GRANT_DMA_ADDR_OFF) || total + d.len > RELAY_SLOT)
            return -1;
        q->d[q->n++] = (struct relay_desc){d.addr, d.len, (d.flags & XVF_VRING_DESC_F_WRITE) != 0};
        xvf_vring_desc_t *s = &r->sdesc[i];
        s->addr = RELAY_BOUNCE + (uint64_t)head * RELAY_SLOT + total;
        s->len = d.len;
        s->flags = d.flags & (XVF_VRING_DESC_F_NEXT | XVF_VRING_DESC_F_WRITE);
        s->next = d.next;
        total += d.len;
        if (!(d.flags & XVF_VRING_DESC_F_NEXT)) break;
        if (d.next >= r->num) return -1;
        i = d.next;
    }
    q->busy = 1;
    return 0;
}

static void relay_push_used(struct relay *r, uint16_t id, uint32_t len) {
    r->gused->ring[r->g_used % r->num] = (xvf_vring_used_elem_t){id, len};
    r->g_used++;
}

/* Publish the guest's used entries; 1 if the guest wants an interrupt for them. */
static int relay_publish_used(struct relay *r, uint16_t old) {
    if (r->g_used == old) return 0;
    xvf_release();
    xvf_store_u16(&r->gused->idx, r->g_used);
    xvf_full();  /* the index, then the guest's used_event */
    if (r->event_idx)
        return relay_need_event(xvf_load_u16(relay_used_event(r->gavail, r->num)), r->g_used, old);
    return !(xvf_load_u16(&r->gavail->flags) & XVF_VRING_AVAIL_F_NO_INTERRUPT);
}

/* The guest kicked: its new requests to QSD. 1 if QSD is to be kicked; *irq set if
 * refused requests were completed and the guest wants an interrupt. */
static int relay_avail(struct relay *r, int *irq) {
    uint16_t s_old = r->s_avail, g_old = r->g_used;
    uint16_t heads[RELAY_BATCH];
    unsigned seg_end[RELAY_BATCH];  /* request j's copies: segs[seg_end[j - 1] .. seg_end[j]) */
    for (;;) {
        uint16_t idx = xvf_load_u16(&r->gavail->idx);
        xvf_acquire();  /* the index, then the entries and descriptors it covers */
        if ((uint16_t)(idx - r->g_last_avail) > r->num) { r->lies++; return 0; }  /* a jump */
        unsigned n = 0, nsegs = 0;
        while (r->g_last_avail != idx && n < RELAY_BATCH) {
            uint16_t head = r->gavail->ring[r->g_last_avail % r->num];
            r->g_last_avail++;
            if (relay_take(r, head) < 0) {
                r->refused++;
                if (head < r->num && !r->reqs[head].busy) relay_push_used(r, head, 0);
                continue;
            }
            struct relay_req *q = &r->reqs[head];
            uint64_t soff = RELAY_BOUNCE + (uint64_t)head * RELAY_SLOT;
            for (unsigned k = 0; k < q->n; k++) {
                if (!q->d[k].write) nsegs = relay_segments(r, nsegs, q->d[k].addr, soff, q->d[k].len, 0);
                soff += q->d[k].len;
            }
            seg_end[n] = nsegs;
            heads[n++] = head;
        }
        int rc = relay_copy(r, nsegs);
        for (unsigned j = 0, k = 0; j < n; j++) {
            struct relay_req *q = &r->reqs[heads[j]];
            int ok = rc == 0;
            for (; k < seg_end[j]; k++) ok &= r->segs[k].status == XVF_GNTST_okay;
            if (!ok) {  /* refused: completed with nothing written */
                r->refused++;
                q->busy = 0;
                relay_push_used(r, heads[j], 0);
                continue;
            }
            r->savail->ring[r->s_avail % r->num] = heads[j];
            r->s_avail++;
        }
        xvf_release();  /* the shadow descriptors and bounce bytes, then the index */
        xvf_store_u16(&r->savail->idx, r->s_avail);
        if (r->g_last_avail != xvf_load_u16(&r->gavail->idx)) continue;
        if (r->event_idx) *relay_avail_event(r->gused, r->num) = r->g_last_avail;
        xvf_full();  /* avail_event, then the guest's index once more */
        if (r->g_last_avail == xvf_load_u16(&r->gavail->idx)) break;
    }
    *irq = relay_publish_used(r, g_old);
    if (r->s_avail == s_old) return 0;
    xvf_full();  /* the shadow's index, then QSD's avail_event */
    if (r->event_idx)
        return relay_need_event(xvf_load_u16(relay_avail_event(r->sused, r->num)), r->s_avail, s_old);
    return !(xvf_load_u16(&r->sused->flags) & XVF_VRING_USED_F_NO_NOTIFY);
}

/* QSD completed requests: their bytes back to the guest. 1 if the guest wants an
 * interrupt. */
static int relay_used(struct relay *r) {
    uint16_t g_old = r->g_used;
    uint16_t ids[RELAY_BATCH];
    uint32_t lens[RELAY_BATCH];
    for (;;) {
        uint16_t idx = xvf_load_u16(&r->sused->idx);
        xvf_acquire();
        unsigned n = 0, nsegs = 0;
        while (r->s_last_used != idx && n < RELAY_BATCH) {
            xvf_vring_used_elem_t e = r->sused->ring[r->s_last_used % r->num];
            r->s_last_used++;
            if (e.id >= r->num || !r->reqs[e.id].busy) { r->lies++; continue; }
            struct relay_req *q = &r->reqs[e.id];
            uint64_t soff = RELAY_BOUNCE + (uint64_t)e.id * RELAY_SLOT;
            uint32_t left = e.len;  /* what QSD wrote, in the chain's writable order */
            for (unsigned k = 0; k < q->n && left; k++) {
                if (q->d[k].write) {
                    uint32_t c = left < q->d[k].len ? left : q->d[k].len;
                    nsegs = relay_segments(r, nsegs, q->d[k].addr, soff, c, 1);
                    left -= c;
                }
                soff += q->d[k].len;
            }
            ids[n] = (uint16_t)e.id;
            lens[n++] = e.len - left;
        }
        int rc = relay_copy(r, nsegs);
        for (unsigned j = 0; j < nsegs && rc == 0; j++) rc = r->segs[j].status;
        if (rc) r->lost += n;  /* their data is not in the guest: nothing written */
        for (unsigned j = 0; j < n; j++) {
            r->reqs[ids[j]].busy = 0;
            relay_push_used(r, ids[j], rc ? 0 : lens[j]);
        }
        if (r->s_last_used != xvf_load_u16(&r->sused->idx)) continue;
        if (r->event_idx) *relay_used_event(r->savail, r->num) = r->s_last_used;
        xvf_full();  /* used_event, then QSD's index once more */
        if (r->s_last_used == xvf_load_u16(&r->sused->idx)) break;
    }
    return relay_publish_used(r, g_old);
}

#endif
