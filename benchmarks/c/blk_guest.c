/* A guest-side virtio-blk driver that behaves like Linux's and costs little, for the
 * end-to-end benchmark (benchmarks/e2e_blk.py). The simulator's Python driver sets the
 * device up (features, queue, DRIVER_OK); this program then takes over its queue 0 and
 * runs the workload: 4 KiB random reads and writes (50/50), QD requests in flight.
 *
 * What it does per interrupt and per kick is what Linux's virtio_mmio + virtio_blk do:
 *   - submissions are added in a batch and kicked once, and only when EVENT_IDX says
 *     the device asked for it (virtqueue_kick_prepare: vring_need_event);
 *   - an interrupt is taken from the line (Xen's injected SPI: an eventfd here), then
 *     InterruptStatus is read and InterruptACK written, two MMIO exits even when the
 *     Dom0 kernel injected it (vm_interrupt); then the used ring is drained and
 *     used_event re-armed, checking once more for a completion that raced the re-arm
 *     (virtqueue_enable_cb);
 *   - it never polls the used ring while it waits.
 *
 * In "xen" mode a register access is a trapped MMIO access the way the simulated Xen
 * performs it (xvf/platform/sim/ioreq.py, evtchn.py): the request goes into this
 * vCPU's ioreq slot, the device model's event-channel port is signalled on its handle
 * (lent by the simulator: a SOCK_SEQPACKET socket carrying 4-byte port numbers, masked
 * after each delivery until the device model writes the port back), and the vCPU waits
 * for port|NOTIFY_BIT. QueueNotify goes to KICK_FD instead when the Dom0 kernel holds an
 * ioeventfd for it. In "direct" mode there is no Xen: kicks and interrupts are the
 * backend's own eventfds, with no register accesses at all.
 *
 * Usage: blk_guest key=value...   (see e2e_blk.py: CGuest.argv)
 * Latencies (uint32 ns, submit to completion seen) go to OUT; one summary line to stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "xvf/virtio_mmio.h"
#include "xvf/virtio_ring.h"
#include "xvf/xen_ioreq.h"

#define BLK_T_IN 0u
#define BLK_T_OUT 1u
#define SECTOR 512u
#define BLOCK 4096u
#define MAX_REGIONS 4

struct blk_outhdr { uint32_t type, reserved; uint64_t sector; };

static struct { uint64_t gpa, size, offset; } regions[MAX_REGIONS];
static int nregions;
static uint8_t *ram;

/* the queue */
static uint16_t qsize;
static xvf_vring_desc_t *desc;
static xvf_vring_avail_t *avail;
static xvf_vring_used_t *used;
static int event_idx;
static uint16_t avail_idx, last_used;

/* xen mode: the vCPU's slot and the lent event-channel handle */
static volatile xvf_ioreq_t *slot;
static int evt_fd = -1, kick_fd = -1, irq_fd = -1, call_fd = -1;
static uint32_t port;          /* the device model's local port of this vCPU */
static int port_masked, port_pending;
/* The device model's loopback channel (its service thread's wake-up): a notify of one
 * end is delivered as the other, masked like any port (0: none). */
static uint32_t wake_port[2];
static int wake_masked[2], wake_pending[2];
static uint64_t mmio_base;
static long exits, kicks, interrupts, spurious;

static void die(const char *what) { perror(what); exit(2); }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *gpa_ptr(uint64_t gpa, uint64_t len) {
    for (int i = 0; i < nregions; i++)
        if (gpa >= regions[i].gpa && gpa + len <= regions[i].gpa + regions[i].size)
            return ram + regions[i].offset + (gpa - regions[i].gpa);
    fprintf(stderr, "gpa %#llx+%llu is not guest RAM\n", (unsigned long long)gpa,
            (unsigned long long)len);
    exit(2);
}

/* ---- the simulated Xen's event channel, as the simulator's evtchn.py does it --- */
static void deliver(void) {
    if (port_masked) { port_pending = 1; return; }
    port_masked = 1;
    if (send(evt_fd, &port, 4, 0) != 4) die("evtchn deliver");
}

static void deliver_wake(int end) {
    if (wake_masked[end]) { wake_pending[end] = 1; return; }
    wake_masked[end] = 1;
    if (send(evt_fd, &wake_port[end], 4, 0) != 4) die("evtchn deliver");
}

/* A word for the loopback channel: a notify delivers the peer end, an unmask unmasks. */
static void wake_word(uint32_t word) {
    for (int end = 0; end < 2; end++) {
        if (!wake_port[end]) continue;
        if (word == (wake_port[end] | NOTIFY_BIT)) {
            deliver_wake(!end);
        } else if (word == wake_port[end]) {
            wake_masked[end] = 0;
            if (wake_pending[end]) { wake_pending[end] = 0; deliver_wake(end); }
        }
    }
}

/* Read what the device model wrote on its handle: unmasks and notifies. Returns 1 if
 * this vCPU's port was notified. */
static int drain_handle(int block) {
    uint32_t words[64];
    int notified = 0;
    for (;;) {
        /* The handle is the simulator's non-blocking socket (one open file, shared):
         * wait in poll, never by clearing O_NONBLOCK under the simulator's feet. */
        struct pollfd p = {evt_fd, POLLIN, 0};
        if (block && poll(&p, 1, 20000) == 0) { fprintf(stderr, "no answer in 20 s\n"); exit(3); }
        ssize_t n = recv(evt_fd, words, sizeof words, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN) {
                if (block) continue;
                return notified;
            }
            if (errno == EINTR) continue;
            die("evtchn recv");
        }
        if (n == 0) { fprintf(stderr, "the device model closed its event channel\n"); exit(3); }
        for (ssize_t i = 0; i < n / 4; i++) {
            if (words[i] == (port | NOTIFY_BIT)) {
                notified = 1;
            } else if (words[i] == port) {          /* unmask */
                port_masked = 0;
                if (port_pending) { port_pending = 0; deliver(); }
            } else {
                wake_word(words[i]);
            }
        }
        if (notified) return 1;
        block = 0;
    }
}

/* One trapped 4-byte access: the ioreq slot, the event, the wait for the answer. */
static uint32_t mmio(uint32_t offset, int is_write, uint32_t value) {
    if ((__atomic_load_n(&slot->flags, __ATOMIC_ACQUIRE) & XVF_IOREQ_STATE_MASK) !=
        XVF_STATE_IOREQ_NONE)
        die("ioreq slot busy");
    exits++;
    slot->addr = mmio_base + offset;
    slot->data = is_write ? value : 0;
    slot->count = 1;
    slot->size = 4;
    slot->type = XVF_IOREQ_TYPE_COPY;
    __atomic_store_n(&slot->flags,
                     (uint8_t)(XVF_STATE_IOREQ_READY | (is_write ? 0 : XVF_IOREQ_DIR_BIT)),
                     __ATOMIC_RELEASE);
    deliver();
    while ((__atomic_load_n(&slot->flags, __ATOMIC_ACQUIRE) & XVF_IOREQ_STATE_MASK) !=
           XVF_STATE_IORESP_READY)
        drain_handle(1);
    uint32_t data = (uint32_t)slot->data;
    __atomic_store_n(&slot->flags, (uint8_t)XVF_STATE_IOREQ_NONE, __ATOMIC_RELEASE);
    return is_write ? 0 : data;
}

/* ---- the ring ------------------------------------------------------------------- */
static uint16_t *used_event_p(void) { return &avail->ring[qsize]; }
static uint16_t *avail_event_p(void) { return (uint16_t *)&used->ring[qsize]; }

static int need_event(uint16_t event, uint16_t new_idx, uint16_t old) {
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static void kick(uint16_t old) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* avail idx before reading avail_event */
    int needed = event_idx
        ? need_event(__atomic_load_n(avail_event_p(), __ATOMIC_RELAXED), avail_idx, old)
        : !(__atomic_load_n(&used->flags, __ATOMIC_RELAXED) & XVF_VRING_USED_F_NO_NOTIFY);
    if (!needed) return;
    kicks++;
    uint64_t one = 1;
    if (kick_fd >= 0) {
        if (write(kick_fd, &one, 8) != 8) die("kick");
    } else {
        mmio(XVF_VIRTIO_MMIO_QUEUE_NOTIFY, 1, 0);
    }
}

/* requests: slot i owns descriptors 3i..3i+2, a header+status area and a 4 KiB buffer */
struct req { uint64_t t0; };
static struct req *reqs;
static uint64_t hdr_gpa, buf_gpa;   /* where the CPU writes them */
static uint64_t hdr_dma, buf_dma;   /* what the descriptors say (grant DMA addresses, or GPAs) */
static uint64_t rng_state;

static uint64_t rnd(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return rng_state;
}

static void add_request(int i, uint64_t disk_blocks) {
    uint64_t h = hdr_gpa + (uint64_t)i * 32;
    struct blk_outhdr *hdr = gpa_ptr(h, sizeof *hdr);
    int is_read = (rnd() & 1) != 0;
    hdr->type = is_read ? BLK_T_IN : BLK_T_OUT;
    hdr->reserved = 0;
    hdr->sector = (rnd() % disk_blocks) * (BLOCK / SECTOR);
    *(uint8_t *)gpa_ptr(h + 16, 1) = 0xff;
    uint16_t d = (uint16_t)(3 * i);
    uint64_t hd = hdr_dma + (uint64_t)i * 32;
    desc[d] = (xvf_vring_desc_t){hd, sizeof *hdr, XVF_VRING_DESC_F_NEXT, (uint16_t)(d + 1)};
    desc[d + 1] = (xvf_vring_desc_t){buf_dma + (uint64_t)i * BLOCK, BLOCK,
                                     (uint16_t)(XVF_VRING_DESC_F_NEXT |
                                                (is_read ? XVF_VRING_DESC_F_WRITE : 0)),
                                     (uint16_t)(d + 2)};
    desc[d + 2] = (xvf_vring_desc_t){hd + 16, 1, XVF_VRING_DESC_F_WRITE, 0};
    avail->ring[avail_idx % qsize] = d;
    avail_idx++;
    reqs[i].t0 = now_ns();
}

static void publish(void) {
    __atomic_store_n(&avail->idx, avail_idx, __ATOMIC_RELEASE);  /* descriptors first */
}

/* Wait for the interrupt line, then what Linux's vm_interrupt does. */
static void wait_interrupt(void) {
    uint64_t v;
    int fd = irq_fd >= 0 ? irq_fd : call_fd;
    for (;;) {
        struct pollfd p[2] = {{fd, POLLIN, 0}, {evt_fd, POLLIN, 0}};
        int np = evt_fd >= 0 ? 2 : 1;
        if (poll(p, (nfds_t)np, 20000) <= 0) { fprintf(stderr, "no interrupt in 20 s\n"); exit(3); }
        if (np == 2 && (p[1].revents & POLLIN)) drain_handle(0);  /* unmasks meanwhile */
        if (p[0].revents & POLLIN) break;
    }
    if (read(fd, &v, 8) != 8) die("interrupt read");
    interrupts++;
    if (irq_fd >= 0) {
        uint32_t isr = mmio(XVF_VIRTIO_MMIO_INTERRUPT_STATUS, 0, 0);
        if (isr) mmio(XVF_VIRTIO_MMIO_INTERRUPT_ACK, 1, isr);
        else spurious++;
    }
}

int main(int argc, char **argv) {
    const char *mode = "xen", *out = NULL, *regs = NULL;
    int ram_fd = -1, page_fd = -1, qd = 1, count = 0, warmup = 0;
    uint64_t page_off = 0, desc_gpa = 0, avail_gpa = 0, used_gpa = 0, ram_size = 0;
    uint64_t disk_blocks = 0, seed = 1;
    for (int i = 1; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) { fprintf(stderr, "bad argument %s\n", argv[i]); return 2; }
        *eq = 0;
        const char *k = argv[i], *v = eq + 1;
        uint64_t n = strtoull(v, NULL, 0);
        if (!strcmp(k, "mode")) mode = v;
        else if (!strcmp(k, "ram_fd")) ram_fd = (int)n;
        else if (!strcmp(k, "ram_size")) ram_size = n;
        else if (!strcmp(k, "regions")) regs = v;
        else if (!strcmp(k, "qsize")) qsize = (uint16_t)n;
        else if (!strcmp(k, "desc")) desc_gpa = n;
        else if (!strcmp(k, "avail")) avail_gpa = n;
        else if (!strcmp(k, "used")) used_gpa = n;
        else if (!strcmp(k, "event_idx")) event_idx = (int)n;
        else if (!strcmp(k, "avail_idx")) avail_idx = (uint16_t)n;
        else if (!strcmp(k, "last_used")) last_used = (uint16_t)n;
        else if (!strcmp(k, "hdr")) hdr_gpa = n;
        else if (!strcmp(k, "buf")) buf_gpa = n;
        else if (!strcmp(k, "hdr_dma")) hdr_dma = n;
        else if (!strcmp(k, "buf_dma")) buf_dma = n;
        else if (!strcmp(k, "qd")) qd = (int)n;
        else if (!strcmp(k, "count")) count = (int)n;
        else if (!strcmp(k, "warmup")) warmup = (int)n;
        else if (!strcmp(k, "seed")) seed = n;
        else if (!strcmp(k, "disk_blocks")) disk_blocks = n;
        else if (!strcmp(k, "out")) out = v;
        else if (!strcmp(k, "page_fd")) page_fd = (int)n;
        else if (!strcmp(k, "page_off")) page_off = n;
        else if (!strcmp(k, "vcpu_slot")) page_off += n * sizeof(xvf_ioreq_t);
        else if (!strcmp(k, "evt_fd")) evt_fd = (int)n;
        else if (!strcmp(k, "port")) port = (uint32_t)n;
        else if (!strcmp(k, "wake_a")) wake_port[0] = (uint32_t)n;
        else if (!strcmp(k, "wake_b")) wake_port[1] = (uint32_t)n;
        else if (!strcmp(k, "mmio_base")) mmio_base = n;
        else if (!strcmp(k, "kick_fd")) kick_fd = (int)n;
        else if (!strcmp(k, "irq_fd")) irq_fd = (int)n;
        else if (!strcmp(k, "call_fd")) call_fd = (int)n;
        else { fprintf(stderr, "unknown argument %s\n", k); return 2; }
    }
    int xen = strcmp(mode, "xen") == 0;
    if (!out || !regs || ram_fd < 0 || !qsize || qd < 1 || 3 * qd > qsize || !disk_blocks ||
        (xen ? (page_fd < 0 || evt_fd < 0 || !port || irq_fd < 0) : (kick_fd < 0 || call_fd < 0))) {
        fprintf(stderr, "missing or inconsistent arguments\n");
        return 2;
    }
    for (const char *p = regs; *p && nregions < MAX_REGIONS; nregions++) {
        char *end;
        regions[nregions].gpa = strtoull(p, &end, 0);
        regions[nregions].size = strtoull(end + 1, &end, 0);
        regions[nregions].offset = strtoull(end + 1, &end, 0);
        p = *end ? end + 1 : end;
    }
    if (!hdr_dma) hdr_dma = hdr_gpa;
    if (!buf_dma) buf_dma = buf_gpa;
    ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, ram_fd, 0);
    if (ram == MAP_FAILED) die("mmap guest RAM");
    if (xen) {
        uint8_t *page = mmap(NULL, XVF_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, page_fd,
                             (off_t)(page_off & ~(uint64_t)(XVF_PAGE_SIZE - 1)));
        if (page == MAP_FAILED) die("mmap ioreq page");
        slot = (volatile xvf_ioreq_t *)(page + (page_off & (XVF_PAGE_SIZE - 1)));
    }
    desc = gpa_ptr(desc_gpa, XVF_VRING_DESC_BYTES(qsize));
    avail = gpa_ptr(avail_gpa, XVF_VRING_AVAIL_BYTES(qsize));
    used = gpa_ptr(used_gpa, XVF_VRING_USED_BYTES(qsize));
    reqs = calloc((size_t)qd, sizeof *reqs);
    uint32_t *lat = calloc((size_t)count, 4);
    rng_state = seed * 0x9e3779b97f4a7c15ull + 1;

    int total = warmup + count, submitted = 0, done = 0, measured = 0;
    long errors = 0;
    uint64_t start = 0;
    if (event_idx) *used_event_p() = last_used;
    uint16_t old = avail_idx;
    for (int i = 0; i < qd && submitted < total; i++, submitted++) add_request(i, disk_blocks);
    publish();
    kick(old);
    if (warmup == 0) start = now_ns();
    while (done < total) {
        wait_interrupt();
        old = avail_idx;
        for (;;) {
            uint16_t idx;
            while ((idx = __atomic_load_n(&used->idx, __ATOMIC_ACQUIRE)) != last_used) {
                xvf_vring_used_elem_t e = used->ring[last_used % qsize];
                last_used++;
                int i = (int)(e.id / 3);
                if (e.id % 3 || i >= qd) { fprintf(stderr, "bad used id %u\n", e.id); return 2; }
                if (*(uint8_t *)gpa_ptr(hdr_gpa + (uint64_t)i * 32 + 16, 1) != 0) errors++;
                uint64_t t = now_ns();
                if (done >= warmup) {
                    if (done == warmup && warmup) start = reqs[i].t0;
                    lat[measured++] = (uint32_t)(t - reqs[i].t0);
                }
                done++;
                if (submitted < total) { add_request(i, disk_blocks); submitted++; }
            }
            /* re-arm the interrupt at what we consumed, then look once more */
            if (event_idx) *used_event_p() = last_used;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (__atomic_load_n(&used->idx, __ATOMIC_ACQUIRE) == last_used) break;
        }
        publish();
        kick(old);
    }
    uint64_t wall = now_ns() - start;
    FILE *f = fopen(out, "wb");
    if (!f) die(out);
    fwrite(lat, 4, (size_t)measured, f);
    fclose(f);
    printf("requests=%d wall_ns=%llu errors=%ld exits=%ld kicks=%ld interrupts=%ld spurious=%ld "
           "avail_idx=%u last_used=%u\n", measured, (unsigned long long)wall, errors, exits, kicks,
           interrupts, spurious, avail_idx, last_used);
    return errors ? 1 : 0;
}
