"""The C system interfaces the data plane uses (sockets, UDP GSO/GRO, poll, iovecs, threads), declared once."""
from libc.stdint cimport uint16_t, uint32_t, uint64_t


cdef extern from "<netinet/in.h>" nogil:
    ctypedef uint32_t in_addr_t
    cdef struct in_addr:
        in_addr_t s_addr
    cdef struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr
    cdef struct in6_addr:
        unsigned char s6_addr[16]
    cdef struct sockaddr_in6:
        unsigned short sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)
    int AF_INET
    int AF_INET6

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    int PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP
    int pthread_rwlockattr_init(pthread_rwlockattr_t* attr)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t* attr, int kind)
    int pthread_rwlockattr_destroy(pthread_rwlockattr_t* attr)
    int pthread_rwlock_init(pthread_rwlock_t* lock, const pthread_rwlockattr_t* attr)
    int pthread_rwlock_destroy(pthread_rwlock_t* lock)
    int pthread_rwlock_rdlock(pthread_rwlock_t* lock)
    int pthread_rwlock_wrlock(pthread_rwlock_t* lock)
    int pthread_rwlock_unlock(pthread_rwlock_t* lock)

cdef extern from *:
    """
    /* Counters that several packet threads add to (a peer's): relaxed atomic adds, no lock. */
    static inline void counter_add(uint64_t *counter, uint64_t value) {
        __atomic_fetch_add(counter, value, __ATOMIC_RELAXED);
    }
    static inline uint64_t counter_read(const uint64_t *counter) {
        return __atomic_load_n(counter, __ATOMIC_RELAXED);
    }
    """
    void counter_add(uint64_t* counter, uint64_t value) nogil
    uint64_t counter_read(const uint64_t* counter) nogil

cdef extern from "<netinet/udp.h>" nogil:
    int SOL_UDP
    int UDP_SEGMENT  # a send's segment size: the kernel cuts one buffer into datagrams (UDP GSO)
    int UDP_GRO  # receives may carry a run of datagrams from one sender, cut at the size in the cmsg

cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void* iov_base
        size_t iov_len
    Py_ssize_t writev(int fd, const iovec* iov, int n)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    cdef struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr* CMSG_FIRSTHDR(msghdr* m)
    cmsghdr* CMSG_NXTHDR(msghdr* m, cmsghdr* c)
    unsigned char* CMSG_DATA(cmsghdr* c)
    size_t CMSG_SPACE(size_t n)
    size_t CMSG_LEN(size_t n)
    int recvmmsg(int fd, mmsghdr* vec, unsigned int n, int flags, void* timeout)
    int sendmmsg(int fd, mmsghdr* vec, unsigned int n, int flags)
    int MSG_DONTWAIT
    int MSG_TRUNC

cdef extern from "<errno.h>" nogil:
    int EIO

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long n, int timeout)
    short POLLIN
    short POLLOUT
    short POLLERR
    short POLLNVAL
