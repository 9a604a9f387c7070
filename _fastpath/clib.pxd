"""The C system interfaces the data plane uses (sockets, UDP GSO/GRO, poll, iovecs, threads), declared once."""
from libc.stdint cimport uint16_t, uint32_t


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
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* mutex, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)

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
