/*
 * snapshotd.h — the C interface of the snapshotd trainer client.
 *
 * Link with libsnapshotdclient.so (`swift build -c release --product
 * snapshotdclient`; it lands in .build/release/). Python's `snapshotd`
 * package is built on exactly this interface.
 *
 * Errors. Every call that can fail returns an int: SNAPSHOTD_OK (0) or a
 * nonzero snapshotd_status. 1–99 are the daemon's own error codes (the same
 * numbers as its wire protocol); 100 and above come from this library. After
 * a failure, snapshotd_last_error() returns a readable message. The message
 * is per thread and stays valid until the next failing call on that thread.
 *
 * Ownership and lifetimes. Every handle is created by one call and freed by
 * exactly one matching call (client_close, save_free, restore_close); freeing
 * NULL is a no-op. A save or restore handle keeps its client alive: closing
 * the client first is allowed, its connection closes when the last handle
 * goes. Pointers a handle gives out (tensor buffers, names, shapes, metadata)
 * stay valid until that handle is freed, and not a moment longer.
 *
 * Zero copy. Over the local Unix socket snapshotd_save_buffer() points into
 * the daemon's own memory (a shared mapping of its arena): write the tensor
 * there and commit. Over TCP it points into a staging buffer of this library
 * that the commit streams to the daemon. A restore's tensor pointers are
 * read-only views of the daemon's memory (locally) or of a verified copy (TCP).
 *
 * Threads. A client's calls are serialized inside the library: calls from
 * several threads are safe but run one at a time. Several threads may fill
 * different tensors of one save at once; the commit must come after all of
 * them. One client per trainer rank.
 */
#ifndef SNAPSHOTD_H
#define SNAPSHOTD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum snapshotd_status {
    SNAPSHOTD_OK = 0,
    /* The daemon's codes (wire protocol ErrorCode). */
    SNAPSHOTD_ERR_MALFORMED_FRAME = 1,
    SNAPSHOTD_ERR_UNAUTHENTICATED = 2,
    SNAPSHOTD_ERR_HELLO_REQUIRED = 3,
    SNAPSHOTD_ERR_INVALID_REQUEST = 4,
    SNAPSHOTD_ERR_WRONG_JOB = 5,
    SNAPSHOTD_ERR_DUPLICATE_RANK = 6,
    SNAPSHOTD_ERR_UNKNOWN_STEP = 7,
    SNAPSHOTD_ERR_OVER_BUDGET = 8,
    SNAPSHOTD_ERR_CHECKSUM_MISMATCH = 9,
    SNAPSHOTD_ERR_NOT_COMMITTED = 10,
    SNAPSHOTD_ERR_SAVE_IN_PROGRESS = 11,
    SNAPSHOTD_ERR_TOO_MANY_CONNECTIONS = 12,
    SNAPSHOTD_ERR_TIMEOUT = 13,
    SNAPSHOTD_ERR_UNRECOVERABLE = 14,
    SNAPSHOTD_ERR_SHUTTING_DOWN = 15,
    SNAPSHOTD_ERR_INTERNAL = 16,
    SNAPSHOTD_ERR_UNAVAILABLE = 17,
    /* This library's codes. */
    SNAPSHOTD_ERR_CONNECTION = 100,       /* daemon down, unreachable, or the connection broke */
    SNAPSHOTD_ERR_INVALID_ARGUMENT = 101, /* a bad argument, caught before anything was sent */
    SNAPSHOTD_ERR_PROTOCOL = 102,         /* an answer this library did not expect */
} snapshotd_status;

/* Element types (the wire protocol's DType). */
typedef enum snapshotd_dtype {
    SNAPSHOTD_BYTES = 0, SNAPSHOTD_BOOL = 1, SNAPSHOTD_UINT8 = 2, SNAPSHOTD_INT8 = 3,
    SNAPSHOTD_INT16 = 4, SNAPSHOTD_INT32 = 5, SNAPSHOTD_INT64 = 6, SNAPSHOTD_UINT16 = 7,
    SNAPSHOTD_UINT32 = 8, SNAPSHOTD_UINT64 = 9, SNAPSHOTD_FLOAT16 = 10, SNAPSHOTD_BFLOAT16 = 11,
    SNAPSHOTD_FLOAT32 = 12, SNAPSHOTD_FLOAT64 = 13, SNAPSHOTD_FLOAT8_E4M3 = 14, SNAPSHOTD_FLOAT8_E5M2 = 15,
} snapshotd_dtype;

/* What a tensor is, for CheckFree recovery of a lost pipeline stage:
 * parameters are averaged from (or copied from) the neighbouring stages'
 * tensors of the same stage-local name; optimizer state restarts at zero;
 * RNG and extra state come from the neighbour used. CARRIED marks a copy of a
 * tensor another stage owns, saved under the owner's name (the embedding the
 * second stage carries for the first, the LM head the second-to-last carries
 * for the last): a lost owner gets it back exactly from there. */
typedef enum snapshotd_kind {
    SNAPSHOTD_PARAMETER = 0, SNAPSHOTD_OPTIMIZER = 1, SNAPSHOTD_RNG = 2, SNAPSHOTD_EXTRA = 3,
    SNAPSHOTD_CARRIED = 4,
} snapshotd_kind;

/* How a restored shard came to be. */
typedef enum snapshotd_reconstruction_method {
    SNAPSHOTD_EXACT = 0,              /* as saved (or rebuilt exactly by erasure coding) */
    SNAPSHOTD_CHECKFREE_AVERAGE = 1,  /* W_i = (a*W_{i+1} + b*W_{i-1}) / (a + b) of the two neighbouring stages */
    SNAPSHOTD_CHECKFREE_COPY = 2,     /* first or last stage: a copy of its one neighbour */
} snapshotd_reconstruction_method;

/* What snapshotd_restore_reconstruction fills in; all zero for an exact shard. */
typedef struct snapshotd_reconstruction {
    int32_t method;                /* snapshotd_reconstruction_method */
    uint32_t source_count;         /* 2 for an average, 1 for a copy */
    uint32_t source_stages[2];
    uint32_t source_ranks[2];
    double weights[2];             /* b/(a+b) and a/(a+b); 1 for a copy */
    uint64_t source_step;
    int32_t optimizer_reset;       /* 1: optimizer tensors restore as zeros */
    double learning_rate_factor;   /* raise the stage's learning rate by this factor (1.1) */
} snapshotd_reconstruction;

typedef struct snapshotd_client snapshotd_client;
typedef struct snapshotd_save snapshotd_save;
typedef struct snapshotd_restore snapshotd_restore;

/* Where the daemon is and who this rank is. Zero-initialize, then set what
 * you need: with neither socket_path nor host, the default local socket
 * /run/snapshotd/snapshotd.sock is used. */
typedef struct snapshotd_client_options {
    const char *socket_path;      /* local daemon (shared memory, zero copy) */
    const char *host;             /* remote daemon over TCP ... */
    uint16_t port;                /* ... on this port ... */
    const char *secret_file;      /* ... authenticated with the trainers' secret in this file */
    uint32_t local_world;         /* ranks of the job on this daemon (LOCAL_WORLD_SIZE); 0: all */
    uint32_t pipeline_stage;
    uint32_t tensor_parallel_index;
    uint32_t data_parallel_index;
    int64_t reply_timeout_ms;     /* how long a reply may take to start; 0: 60000 */
    /* Added in 0.5 (the struct grew: code built against an older header must be rebuilt). */
    const char *transport;        /* with host: "tcp" (or NULL) or "rdma" (tensors by RDMA WRITE, zero copy) */
    const char *rdma_source;      /* with transport "rdma": the local address to connect from; NULL: as routing picks */
} snapshotd_client_options;

/* One tensor of a save: name (UTF-8, 1–256 bytes, unique in the shard),
 * element type, kind and shape (ndim extents, ndim ≤ 16; ndim 0 is a scalar). */
typedef struct snapshotd_tensor_spec {
    const char *name;
    int32_t dtype;   /* snapshotd_dtype */
    int32_t kind;    /* snapshotd_kind */
    int32_t ndim;
    const int64_t *shape;
} snapshotd_tensor_spec;

/* One tensor of a restore, as snapshotd_restore_tensor fills it in. */
typedef struct snapshotd_tensor_info {
    const char *name;
    int32_t dtype;
    int32_t kind;
    int32_t ndim;
    const int64_t *shape;
    const void *data;       /* read-only; NULL when byte_length is 0 */
    uint64_t byte_length;
    uint32_t crc32c;
} snapshotd_tensor_info;

/* The message of the last failing call on this thread ("" if none). */
const char *snapshotd_last_error(void);

/* The version of snapshotd this header belongs to (the daemon, snapshotctl
 * and the Python package carry the same one). */
#define SNAPSHOTD_VERSION "0.5.0"

/* The library's version string: SNAPSHOTD_VERSION when the header and the
 * loaded library match. */
const char *snapshotd_version(void);

/* Connects and introduces this rank. `options` may be NULL. */
int snapshotd_client_open(const char *job, uint32_t rank, uint32_t world,
                          const snapshotd_client_options *options, snapshotd_client **out);
void snapshotd_client_close(snapshotd_client *client);
/* 1 when tensors travel through shared memory (local daemon), 0 over TCP or RDMA. */
int snapshotd_client_is_local(const snapshotd_client *client);

/* Starts this rank's save of `step`: the daemon reserves memory for every
 * tensor. Fill each tensor's buffer, then commit. */
int snapshotd_save_begin(snapshotd_client *client, uint64_t step,
                         const snapshotd_tensor_spec *tensors, size_t count, snapshotd_save **out);
/* Where tensor `index` goes (byte_length bytes, writable); NULL for an
 * empty tensor or an index out of range. */
void *snapshotd_save_buffer(snapshotd_save *save, size_t index, uint64_t *byte_length);
/* Hands the save to the daemon; returns when its bytes are in the daemon's
 * memory (protection and the job-wide commit follow in the background).
 * gradient_norm: the L2 norm of this stage's last gradient, or NaN for none.
 * metadata: up to 64 KiB of opaque bytes returned by restore (may be NULL). */
int snapshotd_save_commit(snapshotd_save *save, double gradient_norm,
                          const void *metadata, size_t metadata_length);
/* Frees the handle; a save never committed is aborted (the daemon frees it). */
void snapshotd_save_free(snapshotd_save *save);

/* Blocks until `step` or a newer one is committed for the whole job, at most
 * timeout_ms; the committed step goes to *committed (may be NULL). */
int snapshotd_wait_committed(snapshotd_client *client, uint64_t step, uint32_t timeout_ms, uint64_t *committed);
/* The newest committed step: *found is 1 and *step set, or *found is 0. */
int snapshotd_latest_committed(snapshotd_client *client, int *found, uint64_t *step);

/* Opens this rank's shard of `step` (has_step = 1) or of the newest committed
 * step (has_step = 0). The daemon pins it until snapshotd_restore_close. */
int snapshotd_restore_open(snapshotd_client *client, int has_step, uint64_t step, snapshotd_restore **out);
uint64_t snapshotd_restore_step(const snapshotd_restore *restore);
size_t snapshotd_restore_count(const snapshotd_restore *restore);
int snapshotd_restore_tensor(const snapshotd_restore *restore, size_t index, snapshotd_tensor_info *out);
/* The metadata saved with the commit (NULL and 0 when none). */
const void *snapshotd_restore_metadata(const snapshotd_restore *restore, size_t *length);
/* The gradient norm saved with the commit, NaN when none. */
double snapshotd_restore_gradient_norm(const snapshotd_restore *restore);
/* 1 when the shard was rebuilt approximately by CheckFree (then `out`, if
 * not NULL, says how), 0 when it is exact (`out` zeroed). */
int snapshotd_restore_reconstruction(const snapshotd_restore *restore, snapshotd_reconstruction *out);
/* NULL when the shard came from memory; when memory could not serve it and
 * the daemon read it from the durable tier, the file it came from (valid
 * until snapshotd_restore_close). */
const char *snapshotd_restore_durable_source(const snapshotd_restore *restore);
void snapshotd_restore_close(snapshotd_restore *restore);

#ifdef __cplusplus
}
#endif
#endif /* SNAPSHOTD_H */
