// A verbs + rdma_cm smoke test for the Soft-RoCE guest (Tests/rdma-guest):
//
//   rdma_smoke server SERVER_ADDRESS          (in the peer's network namespace)
//   rdma_smoke client CLIENT_ADDRESS SERVER_ADDRESS
//
// The two connect a reliable-connected queue pair over rdma_cm; the client
// RDMA-WRITEs a pseudo-random buffer into the server's registered memory
// and SENDs its CRC; the server checks the bytes. It proves the guest
// environment (modules, rxe links on both ends of a veth pair, providers)
// carries real RDMA traffic. Each prints "rdma_smoke <role>: ok …" or an
// error, and exits 0 or 1.
#include <arpa/inet.h>
#include <infiniband/verbs.h>
#include <netdb.h>
#include <rdma/rdma_cma.h>
#include <rdma/rdma_verbs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BYTES (4u << 20)
#define PORT "7471"

static const char *server_address = "10.77.0.2";
static const char *client_address = "10.77.0.1";

struct handshake { uint64_t address; uint32_t rkey; uint32_t crc; };

static uint32_t crc32c(const uint8_t *p, size_t n) {
    uint32_t crc = ~0u;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static int fail(const char *what) {
    perror(what);
    fprintf(stdout, "rdma_smoke: FAILED at %s\n", what);
    fflush(stdout);
    exit(1);
}

static struct ibv_wc wait_completion(struct rdma_cm_id *id, int send) {
    struct ibv_wc wc;
    int n = send ? rdma_get_send_comp(id, &wc) : rdma_get_recv_comp(id, &wc);
    if (n <= 0 || wc.status != IBV_WC_SUCCESS) {
        fprintf(stdout, "rdma_smoke: FAILED: completion status %s\n", n > 0 ? ibv_wc_status_str(wc.status) : "none");
        exit(1);
    }
    return wc;
}

static struct rdma_addrinfo *resolve(const char *node, int passive) {
    struct rdma_addrinfo hints = {0}, *result = NULL;
    hints.ai_port_space = RDMA_PS_TCP;
    if (passive) hints.ai_flags = RAI_PASSIVE;
    if (rdma_getaddrinfo(node, PORT, &hints, &result)) fail("rdma_getaddrinfo");
    return result;
}

static struct ibv_qp_init_attr qp_attributes(void) {
    struct ibv_qp_init_attr attr = {0};
    attr.cap.max_send_wr = attr.cap.max_recv_wr = 4;
    attr.cap.max_send_sge = attr.cap.max_recv_sge = 1;
    attr.sq_sig_all = 1;
    attr.qp_type = IBV_QPT_RC;
    return attr;
}

static int server(void) {
    struct rdma_addrinfo *info = resolve(server_address, 1);
    struct ibv_qp_init_attr attr = qp_attributes();
    struct rdma_cm_id *listener, *id;
    if (rdma_create_ep(&listener, info, NULL, &attr)) fail("server rdma_create_ep");
    if (rdma_listen(listener, 1)) fail("rdma_listen");
    printf("rdma_smoke server: listening on %s:%s\n", server_address, PORT);
    fflush(stdout);
    if (rdma_get_request(listener, &id)) fail("rdma_get_request");
    uint8_t *server_buffer = calloc(1, BYTES);
    struct handshake hello = {0}, done = {0};
    struct ibv_mr *data = rdma_reg_write(id, server_buffer, BYTES);
    struct ibv_mr *control = rdma_reg_msgs(id, &hello, sizeof hello);
    struct ibv_mr *answer = rdma_reg_msgs(id, &done, sizeof done);
    if (!data || !control || !answer) fail("server rdma_reg");
    if (rdma_post_recv(id, NULL, &done, sizeof done, answer)) fail("server rdma_post_recv");
    if (rdma_accept(id, NULL)) fail("rdma_accept");
    hello.address = (uintptr_t)server_buffer;
    hello.rkey = data->rkey;
    if (rdma_post_send(id, NULL, &hello, sizeof hello, control, 0)) fail("server rdma_post_send");
    wait_completion(id, 1);
    wait_completion(id, 0);  // the client's CRC, sent after its write completed
    uint32_t got = crc32c(server_buffer, BYTES);
    if (got != done.crc) {
        fprintf(stdout, "rdma_smoke: FAILED: server holds CRC %08x, client wrote %08x\n", got, done.crc);
        exit(1);
    }
    rdma_disconnect(id);
    rdma_dereg_mr(data); rdma_dereg_mr(control); rdma_dereg_mr(answer);
    rdma_destroy_ep(id);
    rdma_destroy_ep(listener);
    rdma_freeaddrinfo(info);
    printf("rdma_smoke server: ok %u bytes received by RDMA WRITE, CRC-32C %08x matches\n", BYTES, got);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "server") == 0) {
        server_address = argv[2];
        return server();
    }
    if (argc != 4 || strcmp(argv[1], "client") != 0) {
        fprintf(stderr, "usage: rdma_smoke server ADDRESS | rdma_smoke client FROM TO\n");
        return 2;
    }
    client_address = argv[2];
    server_address = argv[3];
    struct rdma_addrinfo hints = {0}, *info = NULL;
    hints.ai_port_space = RDMA_PS_TCP;
    struct addrinfo *source;
    if (getaddrinfo(client_address, NULL, NULL, &source)) fail("getaddrinfo(client)");
    hints.ai_src_addr = source->ai_addr;
    hints.ai_src_len = source->ai_addrlen;
    if (rdma_getaddrinfo(server_address, PORT, &hints, &info)) fail("client rdma_getaddrinfo");
    struct ibv_qp_init_attr attr = qp_attributes();
    struct rdma_cm_id *id;
    if (rdma_create_ep(&id, info, NULL, &attr)) fail("client rdma_create_ep");
    uint8_t *buffer = malloc(BYTES);
    uint64_t state = 0x5EED;
    for (size_t i = 0; i < BYTES; i++) { state = state * 6364136223846793005ull + 1442695040888963407ull; buffer[i] = (uint8_t)(state >> 56); }
    struct handshake hello = {0}, done = {0};
    struct ibv_mr *data = rdma_reg_msgs(id, buffer, BYTES);
    struct ibv_mr *control = rdma_reg_msgs(id, &hello, sizeof hello);
    struct ibv_mr *answer = rdma_reg_msgs(id, &done, sizeof done);
    if (!data || !control || !answer) fail("client rdma_reg");
    if (rdma_post_recv(id, NULL, &hello, sizeof hello, control)) fail("client rdma_post_recv");
    if (rdma_connect(id, NULL)) fail("rdma_connect");
    wait_completion(id, 0);
    if (rdma_post_write(id, NULL, buffer, BYTES, data, 0, hello.address, hello.rkey)) fail("rdma_post_write");
    wait_completion(id, 1);
    done.crc = crc32c(buffer, BYTES);
    if (rdma_post_send(id, NULL, &done, sizeof done, answer, 0)) fail("client rdma_post_send");
    wait_completion(id, 1);
    printf("rdma_smoke client: ok %u bytes written by RDMA WRITE, CRC-32C %08x sent\n", BYTES, done.crc);
    return 0;
}
