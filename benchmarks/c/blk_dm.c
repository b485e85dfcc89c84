/* The smallest C device model for the end-to-end baseline: one virtio-blk device over
 * virtio-mmio, served on the same ioreq page and event channel as xvf (the simulated
 * Xen's: xvf/platform/sim/evtchn.py and control.py), forwarding the queue's kicks and
 * calls to the same qemu-storage-daemon. The vhost-user side is set up by the
 * benchmark (Python) before and at DRIVER_OK; everything per access and per request is
 * here: the register file, the kick (QueueNotify -> KICK_FD), the call (CALL_FD ->
 * InterruptStatus and the SPI raised with a set_irq_level dm_op on IRQ_FD), the
 * acknowledgement (InterruptACK -> the SPI lowered).
 *
 * Usage: blk_dm key=value...  (see e2e_blk.py: CDeviceModel)
 *   page_fd, page_off  the ioreq page (vCPU 0's slot at page_off)
 *   evt_fd, port       the event-channel handle and the local port of vCPU 0
 *   base               the MMIO window
 *   irq_fd, irq, irq_prefix  the control connection for dm_ops, the SPI, and the
 *                      16-byte message prefix (hex) the simulator expects before it
 *   kick_fd, call_fd   QSD's queue 0 eventfds
 *   features           the device features to offer (QSD's, as xvf would offer them)
 *   config             the config space (hex, read by the driver at 0x100+)
 *   qmax               QueueNumMax
 *   req_fd, ack_fd     at DRIVER_OK it writes "vring NUM DESC AVAIL USED FEATURES\n" to
 *                      req_fd and waits for one byte on ack_fd (QSD's vring is set up)
 * and, for a guest that grants (blk_relay.h: the relay), what the software Xen shows a
 * copier of the guest (control.OP_GNT_COPY_DOMAIN) and the shadow memory QSD maps:
 *   grant=1, domid, caller, ram_fd, ram (gpa:size:offset,...), gnt_fd, gnt_entries,
 *   lock_fd, shadow_fd, shadow_size; the vring line then gives the shadow rings'
 *   offsets in the shadow memory.
 * It runs until the event channel hangs up. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench.h"
#include "blk_relay.h"
#include "xvf/virtio_mmio.h"
#include "xvf/xen_dmop.h"
#include "xvf/xen_ioreq.h"

#define WINDOW 0x200u

static volatile xvf_ioreq_t *slot;
static int evt_fd, irq_fd, kick_fd, call_fd, req_fd, ack_fd;
static uint32_t port, irq, qmax;
static uint64_t base, features, driver_features;
static uint8_t irq_prefix[16], config[256];
static size_t config_len;
static uint32_t status, int_status, level, feat_sel, drv_sel, queue_sel;
static uint32_t q_num, q_ready;
static uint64_t q_desc, q_avail, q_used;
static long exits, kicks, calls;
static int grant, relay_pending;
static struct relay relay;

static volatile sig_atomic_t stopping;

static void die(const char *what) { perror(what); exit(2); }

static void on_sigterm(int sig) { (void)sig; stopping = 1; }

static void report_and_exit(void) {
    fprintf(stderr, "blk_dm: exits=%ld kicks=%ld calls=%ld refused=%ld lost=%ld lies=%ld\n",
            exits, kicks, calls, relay.refused, relay.lost, relay.lies);
    exit(0);
}

static void set_level(uint32_t want) {
    if (want == level) return;
    struct { uint8_t prefix[16]; xvf_dm_op_t op; } msg;
    memcpy(msg.prefix, irq_prefix, sizeof msg.prefix);
    memset(&msg.op, 0, sizeof msg.op);
    msg.op.op = XVF_DMOP_set_irq_level;
    msg.op.u.set_irq_level.irq = irq;
    msg.op.u.set_irq_level.level = (uint8_t)want;
    if (send(irq_fd, &msg, sizeof msg, 0) != (ssize_t)sizeof msg) die("dm_op send");
    struct { int32_t rc; xvf_dm_op_t op; } reply;
    if (recv(irq_fd, &reply, sizeof reply, 0) < 4 || reply.rc < 0) die("dm_op set_irq_level");
    level = want;
}

static void raise_vring_interrupt(void) {
    int_status |= XVF_VIRTIO_MMIO_INT_VRING;
    set_level(1);
}

/* The guest's kick, relayed: its new requests to QSD (kicked if it asks). */
static void relay_kick(void) {
    uint64_t one = 1;
    int irq = 0;
    relay_pending = 0;
    if (relay_avail(&relay, &irq) && write(kick_fd, &one, 8) != 8) die("kick");
    if (irq) raise_vring_interrupt();
}

static void driver_ok(void) {
    uint64_t desc = q_desc, avail = q_avail, used = q_used;
    if (grant && relay_start(&relay, (uint16_t)q_num, q_desc, q_avail, q_used,
                             (driver_features >> 29) & 1, &desc, &avail, &used) < 0) {
        fprintf(stderr, "blk_dm: the guest's rings are not grants it gave us\n");
        exit(2);
    }
    dprintf(req_fd, "vring %u %#llx %#llx %#llx %#llx\n", q_num, (unsigned long long)desc,
            (unsigned long long)avail, (unsigned long long)used,
            (unsigned long long)driver_features);
    char b;
    if (read(ack_fd, &b, 1) != 1) die("waiting for the vring set-up");
}

static uint32_t reg_read(uint32_t off) {
    switch (off) {
    case XVF_VIRTIO_MMIO_MAGIC_VALUE: return XVF_VIRTIO_MMIO_MAGIC;
    case XVF_VIRTIO_MMIO_VERSION: return XVF_VIRTIO_MMIO_VERSION_2;
    case XVF_VIRTIO_MMIO_DEVICE_ID: return 2;  /* block */
    case XVF_VIRTIO_MMIO_VENDOR_ID: return 0x554d4551;
    case XVF_VIRTIO_MMIO_DEVICE_FEATURES: return feat_sel < 2 ? (uint32_t)(features >> (32 * feat_sel)) : 0;
    case XVF_VIRTIO_MMIO_QUEUE_NUM_MAX: return queue_sel == 0 ? qmax : 0;
    case XVF_VIRTIO_MMIO_QUEUE_READY: return queue_sel == 0 ? q_ready : 0;
    case XVF_VIRTIO_MMIO_INTERRUPT_STATUS: return int_status;
    case XVF_VIRTIO_MMIO_STATUS: return status;
    case XVF_VIRTIO_MMIO_CONFIG_GENERATION: return 0;
    default: return 0;
    }
}

static void reg_write(uint32_t off, uint32_t v) {
    switch (off) {
    case XVF_VIRTIO_MMIO_DEVICE_FEATURES_SEL: feat_sel = v; break;
    case XVF_VIRTIO_MMIO_DRIVER_FEATURES_SEL: drv_sel = v; break;
    case XVF_VIRTIO_MMIO_DRIVER_FEATURES:
        if (drv_sel < 2) {
            driver_features &= ~(0xffffffffull << (32 * drv_sel));
            driver_features |= (uint64_t)v << (32 * drv_sel);
        }
        break;
    case XVF_VIRTIO_MMIO_QUEUE_SEL: queue_sel = v; break;
    case XVF_VIRTIO_MMIO_QUEUE_NUM: if (queue_sel == 0) q_num = v; break;
    case XVF_VIRTIO_MMIO_QUEUE_READY: if (queue_sel == 0) q_ready = v & 1; break;
    case XVF_VIRTIO_MMIO_QUEUE_DESC_LOW: q_desc = (q_desc & ~0xffffffffull) | v; break;
    case XVF_VIRTIO_MMIO_QUEUE_DESC_HIGH: q_desc = (q_desc & 0xffffffffull) | (uint64_t)v << 32; break;
    case XVF_VIRTIO_MMIO_QUEUE_DRIVER_LOW: q_avail = (q_avail & ~0xffffffffull) | v; break;
    case XVF_VIRTIO_MMIO_QUEUE_DRIVER_HIGH: q_avail = (q_avail & 0xffffffffull) | (uint64_t)v << 32; break;
    case XVF_VIRTIO_MMIO_QUEUE_DEVICE_LOW: q_used = (q_used & ~0xffffffffull) | v; break;
    case XVF_VIRTIO_MMIO_QUEUE_DEVICE_HIGH: q_used = (q_used & 0xffffffffull) | (uint64_t)v << 32; break;
    case XVF_VIRTIO_MMIO_QUEUE_NOTIFY: {
        uint64_t one = 1;
        kicks++;
        if (v == 0 && grant) relay_pending = 1;  /* after the vCPU has its answer */
        else if (v == 0 && write(kick_fd, &one, 8) != 8) die("kick");
        break;
    }
    case XVF_VIRTIO_MMIO_INTERRUPT_ACK:
        int_status &= ~v;
        if (!int_status) set_level(0);
        break;
    case XVF_VIRTIO_MMIO_STATUS:
        if ((v & XVF_VIRTIO_STATUS_DRIVER_OK) && !(status & XVF_VIRTIO_STATUS_DRIVER_OK)) driver_ok();
        status = v;
        break;
    default: break;
    }
}

static int serve(void) {
    uint8_t flags = __atomic_load_n(&slot->flags, __ATOMIC_ACQUIRE);
    if ((flags & XVF_IOREQ_STATE_MASK) != XVF_STATE_IOREQ_READY) return 0;
    __atomic_store_n(&slot->flags, (uint8_t)((flags & ~XVF_IOREQ_STATE_MASK) | XVF_STATE_IOREQ_INPROCESS),
                     __ATOMIC_RELAXED);
    exits++;
    int is_read = (flags & XVF_IOREQ_DIR_BIT) != 0;
    uint64_t off = slot->addr - base;
    uint32_t size = slot->size;
    if (slot->type != XVF_IOREQ_TYPE_COPY || slot->count != 1 || slot->addr < base || off >= WINDOW ||
        size == 0 || size > 8) {
        if (is_read) slot->data = ~0ull;
    } else if (off >= XVF_VIRTIO_MMIO_CONFIG) {
        uint64_t v = 0;
        size_t c = off - XVF_VIRTIO_MMIO_CONFIG;
        if (is_read && c + size <= config_len) memcpy(&v, config + c, size);
        if (is_read) slot->data = v;
    } else if (is_read) {
        slot->data = size == 4 ? reg_read((uint32_t)off) : 0;
    } else if (size == 4) {
        reg_write((uint32_t)off, (uint32_t)slot->data);
    }
    __atomic_store_n(&slot->flags, (uint8_t)((flags & ~XVF_IOREQ_STATE_MASK) | XVF_STATE_IORESP_READY),
                     __ATOMIC_RELEASE);
    return 1;
}

static void on_evtchn(void) {
    uint32_t words[64];
    for (;;) {
        ssize_t n = recv(evt_fd, words, sizeof words, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (n <= 0) report_and_exit();
        if (send(evt_fd, words, (size_t)n, 0) != n) die("unmask");  /* unmask first */
        for (ssize_t i = 0; i < n / 4; i++) {
            if (words[i] != port) continue;
            if (serve()) {
                uint32_t note = port | NOTIFY_BIT;
                if (send(evt_fd, &note, 4, 0) != 4) die("notify");
            }
            if (relay_pending) relay_kick();
        }
    }
}

static void on_call(void) {
    uint64_t v;
    if (read(call_fd, &v, 8) != 8) return;
    calls++;
    if (!grant || relay_used(&relay)) raise_vring_interrupt();
}

static void hex(const char *s, uint8_t *out, size_t max, size_t *len) {
    size_t n = 0;
    for (; s[0] && s[1] && n < max; s += 2) {
        unsigned b;
        if (sscanf(s, "%2x", &b) != 1) break;
        out[n++] = (uint8_t)b;
    }
    if (len) *len = n;
}

int main(int argc, char **argv) {
    int page_fd = -1, gnt_fd = -1, lock_fd = -1, shadow_fd = -1;
    uint64_t page_off = 0, shadow_size = 0;
    uint32_t gnt_entries = 0;
    const char *banks = NULL;
    size_t prefix_len = 0;
    for (int i = 1; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) { fprintf(stderr, "bad argument %s\n", argv[i]); return 2; }
        *eq = 0;
        const char *k = argv[i], *v = eq + 1;
        uint64_t n = strtoull(v, NULL, 0);
        if (!strcmp(k, "page_fd")) page_fd = (int)n;
        else if (!strcmp(k, "page_off")) page_off = n;
        else if (!strcmp(k, "evt_fd")) evt_fd = (int)n;
        else if (!strcmp(k, "port")) port = (uint32_t)n;
        else if (!strcmp(k, "base")) base = n;
        else if (!strcmp(k, "irq_fd")) irq_fd = (int)n;
        else if (!strcmp(k, "irq")) irq = (uint32_t)n;
        else if (!strcmp(k, "irq_prefix")) hex(v, irq_prefix, sizeof irq_prefix, &prefix_len);
        else if (!strcmp(k, "kick_fd")) kick_fd = (int)n;
        else if (!strcmp(k, "call_fd")) call_fd = (int)n;
        else if (!strcmp(k, "features")) features = n;
        else if (!strcmp(k, "config")) hex(v, config, sizeof config, &config_len);
        else if (!strcmp(k, "qmax")) qmax = (uint32_t)n;
        else if (!strcmp(k, "req_fd")) req_fd = (int)n;
        else if (!strcmp(k, "ack_fd")) ack_fd = (int)n;
        else if (!strcmp(k, "grant")) grant = (int)n;
        else if (!strcmp(k, "domid")) relay.domid = (uint16_t)n;
        else if (!strcmp(k, "caller")) relay.caller = (uint16_t)n;
        else if (!strcmp(k, "ram_fd")) relay.ram_fd = (int)n;
        else if (!strcmp(k, "ram")) banks = v;
        else if (!strcmp(k, "gnt_fd")) gnt_fd = (int)n;
        else if (!strcmp(k, "gnt_entries")) gnt_entries = (uint32_t)n;
        else if (!strcmp(k, "lock_fd")) lock_fd = (int)n;
        else if (!strcmp(k, "shadow_fd")) shadow_fd = (int)n;
        else if (!strcmp(k, "shadow_size")) shadow_size = n;
        else { fprintf(stderr, "unknown argument %s\n", k); return 2; }
    }
    if (page_fd < 0 || prefix_len != sizeof irq_prefix || !port || !qmax) {
        fprintf(stderr, "missing arguments\n");
        return 2;
    }
    if (grant) {
        for (const char *b = banks; b && *b && relay.view.nram < RELAY_RAM_BANKS;) {
            unsigned long long gpa, size, off;
            int used = 0;
            if (sscanf(b, "%lli:%lli:%lli%n", &gpa, &size, &off, &used) != 3) break;
            relay.ram[relay.view.nram].start = gpa;
            relay.ram[relay.view.nram].size = size;
            relay.ram_off[relay.view.nram++] = off;
            b += used;
            if (*b == ',') b++;
        }
        if (!relay.view.nram || relay_init(&relay, gnt_fd, gnt_entries, lock_fd, shadow_fd,
                                           shadow_size) < 0)
            die("mapping the guest for grant copies");
    }
    uint8_t *page = mmap(NULL, XVF_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, page_fd,
                         (off_t)(page_off & ~(uint64_t)(XVF_PAGE_SIZE - 1)));
    if (page == MAP_FAILED) die("mmap ioreq page");
    slot = (volatile xvf_ioreq_t *)(page + (page_off & (XVF_PAGE_SIZE - 1)));
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = evt_fd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, evt_fd, &ev) < 0) die("epoll evtchn");
    ev.data.fd = call_fd;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, call_fd, &ev) < 0) die("epoll call");
    struct sigaction sa = {.sa_handler = on_sigterm};  /* no SA_RESTART: epoll_wait returns */
    sigaction(SIGTERM, &sa, NULL);
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        struct epoll_event evs[8];
        int n = epoll_wait(ep, evs, 8, -1);
        if (stopping) report_and_exit();
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.fd == evt_fd) on_evtchn();
            else on_call();
        }
    }
}
