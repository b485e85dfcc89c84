/* The software Xen's (xvf.platform.sim) stand-ins for kernel interfaces that have no
 * file-descriptor form Linux could give it. Everything else in the simulator
 * uses Xen's and Linux's own layouts. */
#ifndef XVF_SIM_ABI_H
#define XVF_SIM_ABI_H

/* A simulated /dev/xen/evtchn handle is a SOCK_SEQPACKET socket (each write is
 * one message, as each write() to the device is one call). Like the real device,
 * reads yield pending 4-byte port numbers and a written port number unmasks it;
 * IOCTL_EVTCHN_NOTIFY, which a socket cannot take, is a written port number
 * with this bit set. */
#define XVF_SIM_EVTCHN_NOTIFY 0x80000000u

/* Control-socket request carrying a struct xen_dm_op, as IOCTL_PRIVCMD_DM_OP would:
 * header {u32 op = XVF_SIM_OP_DM_OP, u32 payload length}, then {u16 domid, u16 pad,
 * u32 pad} and the xen_dm_op bytes. The reply is {i32 rc} and the dm_op bytes. */
#define XVF_SIM_OP_DM_OP 1u

#endif
