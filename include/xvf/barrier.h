/* Ordering against another party on a shared page (Xen, a guest's rings, a
 * backend's shadow rings, the simulator on another CPU). The index words of a
 * split ring and the ioreq page's state byte are read and written with these, so
 * the compiler neither tears nor caches them and the CPU (aarch64 included) keeps
 * the order the protocols require. */
#ifndef XVF_BARRIER_H
#define XVF_BARRIER_H

#include <stdint.h>

/* after reading an index or a state that covers data: the data, not older */
static inline void xvf_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
/* before publishing an index or a state: what it covers first */
static inline void xvf_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
/* a store, then a load of what the other side stores (event-index handshakes) */
static inline void xvf_full(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline uint16_t xvf_load_u16(const volatile uint16_t *p)
    { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void xvf_store_u16(volatile uint16_t *p, uint16_t v)
    { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

#endif
