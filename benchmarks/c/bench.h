/* What the benchmarks' C programs share beyond the ABI headers in include/xvf/. */
#ifndef XVF_BENCH_H
#define XVF_BENCH_H

/* The simulator's tag for IOCTL_EVTCHN_NOTIFY on its event-channel handle socket
 * (xvf/platform/sim/evtchn.py: NOTIFY_BIT): a written port number with it set. */
#define NOTIFY_BIT 0x80000000u

/* A spin-wait hint (x86 PAUSE, Arm YIELD). */
#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() do { } while (0)
#endif

#endif
