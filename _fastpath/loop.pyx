# cython: language_level=3
"""The packet thread's loop, shared by the udp pump (pump.pyx) and the wireguard pump (wg.pyx): one poll() over the
lane's fds, and each ready fd drained in rounds that the pump defines (_tun_round, _socket_round). The GIL is released
for the loop's whole life."""
from libc.stdint cimport uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from _fastpath.clib cimport pollfd
from _fastpath.waiting cimport READY_SOCK, READY_SOCK6, READY_STOP, READY_TUN, wait_ready, watch


cdef inline long long monotonic_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <long long>now.tv_sec * 1000000000 + now.tv_nsec


cdef class PacketLoop:
    # No __cinit__ here: Cython would call it with each pump's own arguments; the pumps set these fields themselves.

    # The sides' switches, as the backends and the tests see them.
    @property
    def vnet_hdr(self):
        return self.tun.vnet_hdr

    @property
    def gso(self):
        return self.udp.gso

    @property
    def gro(self):
        return self.udp.gro

    @property
    def gso_error(self):
        return self.udp.gso_error

    def side_counters(self, dict drops_out, dict drops_in):
        """The counters every pump keeps (its two sides' and its TSO cuts), with the sides' own drops added to the
        pump's drops by reason (drops_out: TUN -> UDP, drops_in: UDP -> TUN)."""
        if self.udp.send_failed:
            drops_out["send_failed"] = self.udp.send_failed
        if self.tun.write_failed:
            drops_in["tun_write_failed"] = self.tun.write_failed
        return {
            "tun_read_packets": self.tun_read_packets,
            "udp_sent_packets": self.udp.sent_packets,
            "udp_sent_bytes": self.udp.sent_bytes,
            "udp_received_packets": self.udp_received_packets,
            "tun_written_packets": self.tun.written_packets,
            "tun_written_bytes": self.tun.written_bytes,
            "send_batches": self.udp.send_batches,
            "receive_batches": self.udp.receive_batches,
            "gso_sends": self.udp.gso_sends,
            "gro_receives": self.udp.gro_receives,
            "tso_reads": self.tso_reads,
            "tso_segments": self.tso_segments,
            "tun_writes": self.tun.writes,
            "coalesced_writes": self.tun.coalesced_writes,
            "drops_tun_to_udp": drops_out,
            "drops_udp_to_tun": drops_in,
        }

    cdef void _tun_round(self) noexcept nogil:
        pass

    cdef void _socket_round(self, int fd, bint v6) noexcept nogil:
        pass

    def on_tun_readable(self):
        """Everything queued in the TUN, in rounds, as run() would move it (for callers that drive the pump)."""
        cdef uint64_t before
        with nogil:
            while True:
                before = self.tun_read_packets
                self._tun_round()
                if self.tun_read_packets == before:
                    break

    def on_socket_readable(self):
        """Everything queued in the sockets, in rounds, as run() would move it."""
        cdef uint64_t before
        with nogil:
            while True:
                before = self.udp_received_packets
                if self.udp.sock_fd >= 0:
                    self._socket_round(self.udp.sock_fd, False)
                if self.udp.sock6_fd >= 0:
                    self._socket_round(self.udp.sock6_fd, True)
                if self.udp_received_packets == before:
                    break

    def run(self, int stop_fd, int busy_poll_us=0):
        """The packet loop, for a thread of its own: until stop_fd (an eventfd) is readable or an fd is closed.

        busy_poll_us > 0: after a round that found packets, the loop keeps looking (poll without sleeping) for that
        long before it sleeps again, so the answer to a packet just sent, or the next packet of a flow, is taken
        without the thread being woken and scheduled (the userspace form of SO_BUSY_POLL). The CPU it burns is
        bounded by the window after each burst; an idle tunnel sleeps as before."""
        cdef pollfd fds[4]
        cdef int ready, timeout = -1
        cdef long long window_ns = <long long>busy_poll_us * 1000, spin_until = 0
        with nogil:
            watch(fds, self.tun.fd, self.udp.sock_fd, self.udp.sock6_fd, stop_fd)
            while True:
                ready = wait_ready(fds, timeout)
                if ready & READY_STOP:
                    break
                if ready == 0:  # only while spinning: sleep again once the window has passed without a packet
                    if monotonic_ns() >= spin_until:
                        timeout = -1
                    continue
                if ready & READY_TUN:
                    self._tun_round()
                if ready & READY_SOCK:
                    self._socket_round(self.udp.sock_fd, False)
                if ready & READY_SOCK6:
                    self._socket_round(self.udp.sock6_fd, True)
                if window_ns > 0:
                    timeout = 0
                    spin_until = monotonic_ns() + window_ns
