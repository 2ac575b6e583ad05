// libibverbs / librdmacm. ibv_query_port is a macro in verbs.h, which Swift
// cannot import, so this shim wraps it in a real function.
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

static inline int snapshotd_ibv_query_port(struct ibv_context *context, uint8_t port_num,
                                           struct ibv_port_attr *port_attr) {
    return ibv_query_port(context, port_num, port_attr);
}
