/* The smallest correct ioreq responder: the C baseline the benchmarks compare
 * xvf's Cython and pure-Python service loops with.
 *
 *   responder MODE PAGE_FD EVT_FD NDEV VCPUS_PER_DEV KICK_FD
 *
 * It maps NDEV ioreq pages (fd offset dev*4096), reads pending ports from the
 * event-channel handle (xvf/platform/sim/evtchn.py semantics: 4-byte port numbers,
 * unmask by writing the port back, notify by writing port|0x80000000), serves
 * the slot of that port's vCPU (port t+1 -> device t/VCPUS_PER_DEV, slot
 * t%VCPUS_PER_DEV) and notifies. Registers: InterruptStatus reads return 1,
 * QueueNotify writes go to KICK_FD (-1: dropped), everything else reads 0.
 * MODE "read": blocking read() per wake-up (3 syscalls per access);
 * MODE "epoll": epoll_wait then non-blocking reads until EAGAIN, the structure
 * of xvf's ServiceLoop (5 syscalls per access). Exits when the handle hangs up.
 * MODE "spin": no event channel at all: spins over every slot and answers without a
 * notify (with the requester's "spin": both sides spinning, the floor); exits when
 * the handle hangs up, which it checks every 2^20 rounds. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench.h"
#include "xvf/virtio_mmio.h"
#include "xvf/xen_arm.h"
#include "xvf/xen_ioreq.h"

#define STATE_MASK XVF_IOREQ_STATE_MASK
#define PTR_BIT XVF_IOREQ_DATA_IS_PTR_BIT
#define DIR_READ XVF_IOREQ_DIR_BIT
#define ST_READY XVF_STATE_IOREQ_READY
#define ST_INPROC XVF_STATE_IOREQ_INPROCESS
#define ST_RESP XVF_STATE_IORESP_READY
#define MMIO_BASE XVF_GUEST_VIRTIO_MMIO_BASE  /* the first window libxl gives */
#define MMIO_SIZE XVF_VIRTIO_MMIO_DEV_SIZE
#define PAGE XVF_PAGE_SIZE

typedef xvf_ioreq_t ioreq_t;

static uint8_t *pages;
static int ndev, vpd, kick_fd, evt;
static uint32_t int_status = 1;
static int notify = 1;

static void serve(uint32_t port) {
    uint32_t t = port - 1;
    if (port == 0 || t >= (uint32_t)(ndev * vpd)) return;
    ioreq_t *req = (ioreq_t *)(pages + (size_t)(t / vpd) * PAGE) + (t % vpd);
    uint8_t flags = __atomic_load_n(&req->flags, __ATOMIC_ACQUIRE);
    if ((flags & STATE_MASK) != ST_READY) return;
    __atomic_store_n(&req->flags, (uint8_t)((flags & ~STATE_MASK) | ST_INPROC), __ATOMIC_RELEASE);
    int is_read = (flags & DIR_READ) != 0;
    if (req->type != XVF_IOREQ_TYPE_COPY || (flags & PTR_BIT) || req->count != 1 || req->size == 0 || req->size > 8 ||
        req->addr < MMIO_BASE || req->addr - MMIO_BASE >= MMIO_SIZE) {
        if (is_read) req->data = ~0ull;
    } else {
        uint64_t off = req->addr - MMIO_BASE;
        if (is_read) {
            req->data = (off == XVF_VIRTIO_MMIO_INTERRUPT_STATUS && req->size == 4) ? int_status : 0;
        } else if (off == XVF_VIRTIO_MMIO_QUEUE_NOTIFY && req->size == 4) {
            uint64_t one = 1;
            if (kick_fd >= 0 && write(kick_fd, &one, 8) != 8) perror("kick");
        } else if (off == XVF_VIRTIO_MMIO_INTERRUPT_ACK && req->size == 4) {
            int_status &= ~(uint32_t)req->data;
        }
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&req->flags, (uint8_t)((flags & ~STATE_MASK) | ST_RESP), __ATOMIC_RELEASE);
    uint32_t note = port | NOTIFY_BIT;
    if (notify && write(evt, &note, 4) != 4) perror("notify");
}

static int handle(uint32_t *ports, ssize_t n) {
    for (ssize_t i = 0; i < n / 4; i++) {
        if (write(evt, &ports[i], 4) != 4) return -1;  /* unmask first */
        serve(ports[i]);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 7) { fprintf(stderr, "usage: responder read|epoll|spin PAGE_FD EVT_FD NDEV VPD KICK_FD\n"); return 2; }
    int use_epoll = strcmp(argv[1], "epoll") == 0, use_spin = strcmp(argv[1], "spin") == 0;
    int page_fd = atoi(argv[2]);
    evt = atoi(argv[3]);
    ndev = atoi(argv[4]);
    vpd = atoi(argv[5]);
    kick_fd = atoi(argv[6]);
    pages = mmap(NULL, (size_t)ndev * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, page_fd, 0);
    if (pages == MAP_FAILED) { perror("mmap"); return 2; }
    int fl = fcntl(evt, F_GETFL);
    fcntl(evt, F_SETFL, use_epoll ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
    printf("ready\n");
    fflush(stdout);
    uint32_t ports[64];
    if (use_spin) {
        notify = 0;
        for (uint64_t round = 1;; round++) {
            for (uint32_t port = 1; port <= (uint32_t)(ndev * vpd); port++) serve(port);
            if (round % (1u << 20) == 0) {
                char b;
                if (recv(evt, &b, 1, MSG_DONTWAIT | MSG_PEEK) == 0) return 0;
            }
            cpu_relax();
        }
    }
    if (!use_epoll) {
        for (;;) {
            ssize_t n = read(evt, ports, sizeof ports);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0 || handle(ports, n) < 0) return 0;
        }
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = evt};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, evt, &ev) < 0) { perror("epoll_ctl"); return 2; }
    for (;;) {
        struct epoll_event evs[64];
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0) { if (errno == EINTR) continue; return 2; }
        for (;;) {
            ssize_t r = read(evt, ports, sizeof ports);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
            if (r <= 0 || handle(ports, r) < 0) return 0;
        }
    }
}
