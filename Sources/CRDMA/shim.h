// libibverbs / librdmacm. ibv_query_port is a macro in verbs.h, which Swift
// cannot import, so this shim wraps it in a real function.
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

static inline int snapshotd_ibv_query_port(struct ibv_context *context, uint8_t port_num,
                                           struct ibv_port_attr *port_attr) {
    return ibv_query_port(context, port_num, port_attr);
}

// librdmacm's inline helpers (rdma_post_send, rdma_post_write, …).
#include <rdma/rdma_verbs.h>
#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>

/* Waits for one completion on `cq`, armed through `channel`, for at most
 * `timeout_ms` between events (-1: without limit), while also watching the
 * connection's rdma_cm event channel `cm_fd` (-1: none): 1 with the
 * completion in *wc (check wc->status), 0 when the time passed, 2 when an
 * rdma_cm event is waiting (a peer's disconnect: the caller reads it), -1 on
 * an error (errno says which). rdma_get_send_comp and rdma_get_recv_comp
 * would block without a bound and miss a peer that left. */
static inline int snapshotd_rdma_wait_completion(struct ibv_cq *cq, struct ibv_comp_channel *channel, int cm_fd, int timeout_ms,
                                                 struct ibv_wc *wc) {
    for (;;) {
        int found = ibv_poll_cq(cq, 1, wc);
        if (found != 0) return found < 0 ? -1 : 1;
        if (ibv_req_notify_cq(cq, 0)) return -1;
        found = ibv_poll_cq(cq, 1, wc); /* one that completed while arming */
        if (found != 0) return found < 0 ? -1 : 1;
        struct pollfd ready[2] = {{.fd = channel->fd, .events = POLLIN}, {.fd = cm_fd, .events = POLLIN}};
        int events = poll(ready, cm_fd >= 0 ? 2 : 1, timeout_ms);
        if (events == 0) return 0;
        if (events < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (cm_fd >= 0 && (ready[1].revents & POLLIN)) {
            /* A completion that came before the disconnect is still delivered. */
            found = ibv_poll_cq(cq, 1, wc);
            if (found != 0) return found < 0 ? -1 : 1;
            return 2;
        }
        if (ready[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            errno = EIO;
            return -1;
        }
        if (!(ready[0].revents & POLLIN)) continue;
        struct ibv_cq *event_cq;
        void *context;
        if (ibv_get_cq_event(channel, &event_cq, &context)) return -1;
        ibv_ack_cq_events(event_cq, 1);
    }
}

/* Whether `fd` is readable within `timeout_ms` (0: now; -1: without limit):
 * 1 yes, 0 no, -1 error. For rdma_cm event channels (accept, disconnects). */
static inline int snapshotd_rdma_fd_readable(int fd, int timeout_ms) {
    struct pollfd ready = {.fd = fd, .events = POLLIN};
    for (;;) {
        int events = poll(&ready, 1, timeout_ms);
        if (events >= 0) return events > 0 ? 1 : 0;
        if (errno != EINTR) return -1;
    }
}

/* Which of two descriptors is readable first within `timeout_ms` (-1: without
 * limit): 1 for `first`, 2 for `second`, 0 when the time passed, -1 on an
 * error. For a handshake that a disconnect from another thread must end. */
static inline int snapshotd_rdma_wait_either(int first, int second, int timeout_ms) {
    struct pollfd ready[2] = {{.fd = first, .events = POLLIN}, {.fd = second, .events = POLLIN}};
    for (;;) {
        int events = poll(ready, 2, timeout_ms);
        if (events == 0) return 0;
        if (events < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (ready[1].revents) return 2;
        if (ready[0].revents) return 1;
    }
}
