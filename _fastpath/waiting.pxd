"""The packet threads' wait: one poll() over a lane's fds (the TUN queue, the IPv4 and IPv6 sockets) and the stop
eventfd, shared by the udp pump and the wireguard pump."""
from libc.errno cimport EINTR, errno

from _fastpath.clib cimport POLLERR, POLLIN, POLLNVAL, poll, pollfd

cdef enum:
    READY_TUN = 1
    READY_SOCK = 2
    READY_SOCK6 = 4
    READY_STOP = 8  # the stop eventfd was written, or an fd was closed under the loop


cdef inline void watch(pollfd* fds, int tun_fd, int sock_fd, int sock6_fd, int stop_fd) noexcept nogil:
    """fds[0..3] for wait_ready (poll() skips a negative fd: a lane without an IPv6 socket)."""
    cdef int i
    fds[0].fd = tun_fd
    fds[1].fd = sock_fd
    fds[2].fd = sock6_fd
    fds[3].fd = stop_fd
    for i in range(4):
        fds[i].events = POLLIN


cdef inline int wait_ready(pollfd* fds, int timeout) noexcept nogil:
    """READY_* bits of what is readable (a pending socket error counts: the receive that reports it clears it); 0
    when the timeout passed first."""
    cdef int r, i, ready = 0
    while True:
        for i in range(4):
            fds[i].revents = 0
        r = poll(fds, 4, timeout)
        if r >= 0 or errno != EINTR:
            break
    if r < 0 or fds[3].revents or (fds[0].revents | fds[1].revents | fds[2].revents) & POLLNVAL:
        return READY_STOP
    for i in range(3):
        if fds[i].revents & (POLLIN | POLLERR):
            ready |= 1 << i
    return ready
