/* The guest side of the benchmarks: vCPUs issuing MMIO accesses through a shared
 * ioreq page (Xen's layout, include/xvf/xen_ioreq.h) and the simulated
 * event-channel handle protocol (xvf/platform/sim/evtchn.py, NOTIFY_BIT), in C so that the
 * requester costs as little as possible and the responder is what is measured.
 *
 * Usage:
 *   requester mmio PAGE_FD EVT_FD NDEV VCPUS_PER_DEV ITERS WARMUP OP OUT [dispatch|spin]
 *     OP: "read" (InterruptStatus) or "notify" (QueueNotify write of queue 0).
 *     spin: no event channel at all, the vCPU spins on its slot for the answer (with
 *     the "spin" responder: the floor of an access through shared memory alone).
 *     Thread t serves device t / VCPUS_PER_DEV (ioreq page at fd offset dev*4096),
 *     slot t % VCPUS_PER_DEV, event-channel port t + 1.
 *   requester kick PAGE_FD EVT_FD KICK_FD DIRECT_FD ITERS WARMUP OUT
 *     QueueNotify through the responder -> KICK_FD readable in a backend thread,
 *     interleaved with a direct eventfd hand-off DIRECT_FD -> backend thread.
 *   requester call PAGE_FD EVT_FD CALL_FD IRQ_FD DIRECT_FD ITERS WARMUP OUT
 *     backend thread writes CALL_FD -> the responder asserts the line with a
 *     set_irq_level dm_op on IRQ_FD, which the vCPU thread receives (it plays Xen's
 *     interrupt injection) -> it reads InterruptStatus and writes InterruptACK;
 *     interleaved with a direct eventfd hand-off DIRECT_FD -> vCPU thread.
 * Latencies (uint32 ns) go to OUT; one summary line goes to stdout. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

#include "bench.h"
#include "xvf/virtio_mmio.h"
#include "xvf/xen_arm.h"
#include "xvf/xen_ioreq.h"

#define STATE_MASK XVF_IOREQ_STATE_MASK
#define DIR_READ XVF_IOREQ_DIR_BIT
#define ST_NONE XVF_STATE_IOREQ_NONE
#define ST_READY XVF_STATE_IOREQ_READY
#define ST_RESP XVF_STATE_IORESP_READY
#define MMIO_BASE XVF_GUEST_VIRTIO_MMIO_BASE
#define REG_NOTIFY XVF_VIRTIO_MMIO_QUEUE_NOTIFY
#define REG_ISR XVF_VIRTIO_MMIO_INTERRUPT_STATUS
#define REG_ACK XVF_VIRTIO_MMIO_INTERRUPT_ACK
#define PAGE XVF_PAGE_SIZE

typedef xvf_ioreq_t ioreq_t;

static uint8_t *pages;
static int evt_fd = -1, irq_fd = -1;
static int dispatch;              /* a dispatcher thread reads EVT_FD for all vCPUs */
static int spin;                  /* no events: spin on the slot for the response */
static int *wake_fds;             /* per thread eventfd, written by the dispatcher */
static int n_wake_fds;
static volatile int stop_dispatch;
static int irq_level;

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) { perror(what); exit(2); }

/* The vCPU plays Xen's interrupt controller too: a set_irq_level dm_op from the
 * responder is answered here, so an ACK that lowers the line cannot deadlock. */
static int handle_irq_msg(void) {
    uint8_t msg[64], reply[4 + 32];
    ssize_t n = recv(irq_fd, msg, sizeof msg, 0);
    if (n < 16 + 32) die("short dm_op");
    int level = msg[16 + 12];
    int32_t rc = 0;
    memcpy(reply, &rc, 4);
    memcpy(reply + 4, msg + 16, 32);
    if (send(irq_fd, reply, sizeof reply, 0) != (ssize_t)sizeof reply) die("irq reply");
    irq_level = level;
    return level;
}

/* Wait until the responder notifies `port` (direct mode: read the handle here). */
static void wait_notify(int t, uint32_t port) {
    if (dispatch) {
        uint64_t v;
        if (read(wake_fds[t], &v, 8) != 8) die("wake read");
        return;
    }
    for (;;) {
        struct pollfd p[2] = {{evt_fd, POLLIN, 0}, {irq_fd, POLLIN, 0}};
        int np = irq_fd >= 0 ? 2 : 1;
        if (poll(p, np, -1) < 0) { if (errno == EINTR) continue; die("poll"); }
        if (np == 2 && (p[1].revents & POLLIN)) handle_irq_msg();
        if (!(p[0].revents & (POLLIN | POLLHUP))) continue;
        uint32_t words[64];
        ssize_t n = recv(evt_fd, words, sizeof words, MSG_DONTWAIT);
        if (n < 0) { if (errno == EAGAIN) continue; die("evtchn recv"); }
        if (n == 0) { fprintf(stderr, "responder hung up\n"); exit(3); }
        for (ssize_t i = 0; i < n / 4; i++)   /* unmask words are ignored */
            if (words[i] == (port | NOTIFY_BIT)) return;
    }
}

static void *dispatcher(void *arg) {
    (void)arg;
    uint32_t words[64];
    while (!stop_dispatch) {
        struct pollfd p = {evt_fd, POLLIN, 0};
        if (poll(&p, 1, 50) <= 0) continue;
        ssize_t n = recv(evt_fd, words, sizeof words, MSG_DONTWAIT);
        if (n <= 0) continue;
        for (ssize_t i = 0; i < n / 4; i++) {
            if (!(words[i] & NOTIFY_BIT)) continue;
            uint64_t one = 1;
            uint32_t t = (words[i] & ~NOTIFY_BIT) - 1;
            /* a notify of a port no vCPU waits on (the responder's own loopback
             * wake port) is dropped, as Xen drops a send on a port nobody bound */
            if (t >= (uint32_t)n_wake_fds) continue;
            if (write(wake_fds[t], &one, 8) != 8) die("wake write");
        }
    }
    return NULL;
}

/* One trapped access by thread t on its slot; returns the value read. */
static uint64_t access_reg(int t, int vpd, uint32_t off, int is_write, uint64_t value) {
    ioreq_t *req = (ioreq_t *)(pages + (size_t)(t / vpd) * PAGE) + (t % vpd);
    uint32_t port = (uint32_t)t + 1;
    if ((__atomic_load_n(&req->flags, __ATOMIC_ACQUIRE) & STATE_MASK) != ST_NONE) die("slot busy");
    req->addr = MMIO_BASE + off;
    req->data = is_write ? value : 0;
    req->count = 1;
    req->size = 4;
    req->vp_eport = port;
    req->type = XVF_IOREQ_TYPE_COPY;
    __atomic_store_n(&req->flags, (uint8_t)(ST_READY | (is_write ? 0 : DIR_READ)), __ATOMIC_RELEASE);
    if (spin) {
        while ((__atomic_load_n(&req->flags, __ATOMIC_ACQUIRE) & STATE_MASK) != ST_RESP)
            cpu_relax();
    } else if (send(evt_fd, &port, 4, 0) != 4) {
        die("evtchn send");
    }
    while (!spin) {
        wait_notify(t, port);
        if ((__atomic_load_n(&req->flags, __ATOMIC_ACQUIRE) & STATE_MASK) == ST_RESP) break;
    }
    uint64_t data = req->data;
    __atomic_store_n(&req->flags, (uint8_t)ST_NONE, __ATOMIC_RELEASE);
    return is_write ? 0 : (data & 0xffffffffull);
}

/* ---- mmio mode ---------------------------------------------------------- */
struct mmio_arg {
    int t, vpd, iters, warmup, is_write;
    uint32_t off;
    uint32_t *lat;
    long errors;
    pthread_barrier_t *bar;
};

static void *mmio_thread(void *p) {
    struct mmio_arg *a = p;
    for (int i = 0; i < a->warmup; i++)
        if (access_reg(a->t, a->vpd, a->off, a->is_write, 0) != (a->is_write ? 0 : 1)) a->errors++;
    pthread_barrier_wait(a->bar);
    for (int i = 0; i < a->iters; i++) {
        uint64_t t0 = now_ns();
        uint64_t v = access_reg(a->t, a->vpd, a->off, a->is_write, 0);
        a->lat[i] = (uint32_t)(now_ns() - t0);
        if (v != (a->is_write ? 0 : 1)) a->errors++;
    }
    pthread_barrier_wait(a->bar);
    return NULL;
}

static int run_mmio(int ndev, int vpd, int iters, int warmup, const char *op, const char *out) {
    int nt = ndev * vpd;
    int is_write = strcmp(op, "notify") == 0;
    pthread_t th[nt], disp;
    struct mmio_arg args[nt];
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, (unsigned)nt + 1);
    if (nt > 1 && !spin) dispatch = 1;
    wake_fds = calloc((size_t)nt, sizeof(int));
    n_wake_fds = nt;
    for (int t = 0; t < nt; t++) wake_fds[t] = eventfd(0, EFD_CLOEXEC);
    if (dispatch) pthread_create(&disp, NULL, dispatcher, NULL);
    for (int t = 0; t < nt; t++) {
        args[t] = (struct mmio_arg){t, vpd, iters, warmup, is_write, is_write ? REG_NOTIFY : REG_ISR,
                                    calloc((size_t)iters, 4), 0, &bar};
        pthread_create(&th[t], NULL, mmio_thread, &args[t]);
    }
    pthread_barrier_wait(&bar);
    uint64_t start = now_ns();
    pthread_barrier_wait(&bar);
    uint64_t wall = now_ns() - start;
    long errors = 0;
    FILE *f = fopen(out, "wb");
    if (!f) die(out);
    for (int t = 0; t < nt; t++) {
        pthread_join(th[t], NULL);
        errors += args[t].errors;
        fwrite(args[t].lat, 4, (size_t)iters, f);
    }
    fclose(f);
    stop_dispatch = 1;
    if (dispatch) pthread_join(disp, NULL);
    printf("accesses=%ld measured=%ld wall_ns=%llu errors=%ld\n", (long)nt * (iters + warmup),
           (long)nt * iters, (unsigned long long)wall, errors);
    return errors ? 1 : 0;
}

/* ---- backend thread (kick and call modes) ------------------------------- */
static int b_kick = -1, b_direct = -1, b_done = -1, b_go = -1;
static volatile uint64_t b_seen, b_t0;
static int b_call = -1;
static int b_mode;  /* 0 kick: wait on either fd, stamp; 1 call: on go, stamp and write */

static void *backend(void *arg) {
    (void)arg;
    for (;;) {
        uint64_t v;
        if (b_mode == 0) {
            struct pollfd p[2] = {{b_kick, POLLIN, 0}, {b_direct, POLLIN, 0}};
            if (poll(p, 2, -1) < 0) continue;
            int fd = (p[0].revents & POLLIN) ? b_kick : b_direct;
            if (read(fd, &v, 8) != 8) continue;
            b_seen = now_ns();
            uint64_t one = 1;
            if (write(b_done, &one, 8) != 8) die("done");
        } else {
            if (read(b_go, &v, 8) != 8) continue;
            if (v == 2) return NULL;
            uint64_t one = 1;
            b_t0 = now_ns();
            if (write(v == 1 ? b_call : b_direct, &one, 8) != 8) die("backend signal");
        }
    }
}

static void write_out(const char *out, uint32_t *a, uint32_t *b, uint32_t *c, int n) {
    FILE *f = fopen(out, "wb");
    if (!f) die(out);
    fwrite(a, 4, (size_t)n, f);
    fwrite(b, 4, (size_t)n, f);
    if (c) fwrite(c, 4, (size_t)n, f);
    fclose(f);
}

static int run_kick(int kick, int direct, int iters, int warmup, const char *out) {
    uint32_t *lx = calloc((size_t)iters, 4), *ld = calloc((size_t)iters, 4);
    pthread_t th;
    b_mode = 0; b_kick = kick; b_direct = direct; b_done = eventfd(0, EFD_CLOEXEC);
    pthread_create(&th, NULL, backend, NULL);
    long errors = 0;
    for (int i = -warmup; i < iters; i++) {
        uint64_t v, one = 1, t0 = now_ns();
        access_reg(0, 1, REG_NOTIFY, 1, 0);          /* QueueNotify(0) */
        if (read(b_done, &v, 8) != 8) die("done read");
        uint64_t x = b_seen - t0;
        t0 = now_ns();
        if (write(direct, &one, 8) != 8) die("direct write");
        if (read(b_done, &v, 8) != 8) die("done read");
        if (i >= 0) { lx[i] = (uint32_t)x; ld[i] = (uint32_t)(b_seen - t0); }
    }
    write_out(out, lx, ld, NULL, iters);
    printf("iterations=%d errors=%ld\n", iters, errors);
    return 0;
}

static int run_call(int call, int direct, int iters, int warmup, const char *out) {
    uint32_t *lx = calloc((size_t)iters, 4), *ld = calloc((size_t)iters, 4),
             *lf = calloc((size_t)iters, 4);
    long errors = 0;
    pthread_t th;
    b_mode = 1; b_call = call; b_direct = direct; b_go = eventfd(0, EFD_CLOEXEC);
    pthread_create(&th, NULL, backend, NULL);
    for (int i = -warmup; i < iters; i++) {
        uint64_t one = 1, three = 3, two = 2, v;
        /* the backend thread stamps and writes CALL_FD (its used-buffer signal) */
        if (write(b_go, &one, 8) != 8) die("go");
        while (!irq_level) handle_irq_msg();                  /* Xen asserts the SPI */
        uint64_t seen = now_ns();
        uint64_t isr = access_reg(0, 1, REG_ISR, 0, 0);
        if (isr != 1) errors++;
        access_reg(0, 1, REG_ACK, 1, isr);                    /* lowers the line */
        if (irq_level) errors++;
        uint64_t done = now_ns();
        uint64_t x = seen - b_t0, full = done - b_t0;
        /* the same backend thread writes DIRECT_FD: an irqfd-style hand-off */
        if (write(b_go, &three, 8) != 8) die("go");
        if (read(direct, &v, 8) != 8) die("direct read");
        uint64_t d = now_ns() - b_t0;
        if (i >= 0) { lx[i] = (uint32_t)x; ld[i] = (uint32_t)d; lf[i] = (uint32_t)full; }
        if (i == iters - 1 && write(b_go, &two, 8) != 8) die("go");
    }
    pthread_join(th, NULL);
    write_out(out, lx, ld, lf, iters);
    printf("iterations=%d errors=%ld\n", iters, errors);
    return errors ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: see the comment at the top of requester.c\n"); return 2; }
    const char *mode = argv[1];
    int page_fd = atoi(argv[2]);
    evt_fd = atoi(argv[3]);
    int flags = fcntl(evt_fd, F_GETFL);
    fcntl(evt_fd, F_SETFL, flags & ~O_NONBLOCK);
    if (!strcmp(mode, "mmio") && argc >= 10) {
        int ndev = atoi(argv[4]);
        pages = mmap(NULL, (size_t)ndev * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, page_fd, 0);
        if (pages == MAP_FAILED) die("mmap");
        if (argc > 10 && !strcmp(argv[10], "dispatch")) dispatch = 1;
        if (argc > 10 && !strcmp(argv[10], "spin")) spin = 1;
        return run_mmio(ndev, atoi(argv[5]), atoi(argv[6]), atoi(argv[7]), argv[8], argv[9]);
    }
    pages = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, page_fd, 0);
    if (pages == MAP_FAILED) die("mmap");
    if (!strcmp(mode, "kick") && argc == 9)
        return run_kick(atoi(argv[4]), atoi(argv[5]), atoi(argv[6]), atoi(argv[7]), argv[8]);
    if (!strcmp(mode, "call") && argc == 10) {
        irq_fd = atoi(argv[5]);
        return run_call(atoi(argv[4]), atoi(argv[6]), atoi(argv[7]), atoi(argv[8]), argv[9]);
    }
    fprintf(stderr, "bad arguments\n");
    return 2;
}
