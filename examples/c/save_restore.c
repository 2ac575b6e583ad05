/*
 * Saves and restores one rank's shard through libsnapshotdclient.so, the way
 * a C or C++ trainer would. Exits 0 when the restore is byte-identical.
 *
 *   cc -std=c11 -I Sources/CSnapshotd/include examples/c/save_restore.c \
 *      -L .build/release -lsnapshotdclient -Wl,-rpath,$PWD/.build/release -o save_restore
 *   ./save_restore /path/to/snapshotd.sock job-name 7
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "snapshotd.h"

#define CHECK(call)                                                                   \
    do {                                                                              \
        int status_ = (call);                                                         \
        if (status_ != SNAPSHOTD_OK) {                                                \
            fprintf(stderr, "%s failed: %d: %s\n", #call, status_, snapshotd_last_error()); \
            return 1;                                                                 \
        }                                                                             \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SOCKET JOB STEP\n", argv[0]);
        return 2;
    }
    const uint64_t step = strtoull(argv[3], NULL, 10);
    snapshotd_client_options options = {0};
    options.socket_path = argv[1];

    snapshotd_client *client = NULL;
    CHECK(snapshotd_client_open(argv[2], 0, 1, &options, &client));

    /* A bad argument is refused with a code and a message, before anything is sent. */
    const int64_t bad_shape[1] = {-1};
    snapshotd_tensor_spec bad = {"bad", SNAPSHOTD_FLOAT32, SNAPSHOTD_PARAMETER, 1, bad_shape};
    snapshotd_save *refused = NULL;
    int status = snapshotd_save_begin(client, step, &bad, 1, &refused);
    if (status != SNAPSHOTD_ERR_INVALID_ARGUMENT || refused != NULL || strlen(snapshotd_last_error()) == 0) {
        fprintf(stderr, "a negative extent gave status %d (%s), expected %d\n", status, snapshotd_last_error(), SNAPSHOTD_ERR_INVALID_ARGUMENT);
        return 1;
    }

    const int64_t weight_shape[2] = {256, 1024};
    const int64_t step_shape[1] = {1};
    snapshotd_tensor_spec specs[3] = {
        {"model.layers.0.weight", SNAPSHOTD_FLOAT32, SNAPSHOTD_PARAMETER, 2, weight_shape},
        {"optimizer.step", SNAPSHOTD_INT64, SNAPSHOTD_OPTIMIZER, 1, step_shape},
        {"scalar", SNAPSHOTD_FLOAT64, SNAPSHOTD_EXTRA, 0, NULL},
    };
    snapshotd_save *save = NULL;
    CHECK(snapshotd_save_begin(client, step, specs, 3, &save));
    uint64_t length = 0;
    float *weight = snapshotd_save_buffer(save, 0, &length); /* zero copy: the daemon's memory */
    if (weight == NULL || length != 256 * 1024 * sizeof(float)) {
        fprintf(stderr, "weight buffer %p of %llu bytes\n", (void *)weight, (unsigned long long)length);
        return 1;
    }
    for (size_t i = 0; i < 256 * 1024; i++) weight[i] = (float)i * 0.5f;
    *(int64_t *)snapshotd_save_buffer(save, 1, NULL) = (int64_t)step;
    *(double *)snapshotd_save_buffer(save, 2, NULL) = 3.25;
    const char metadata[] = "{\"from\": \"C\"}";
    CHECK(snapshotd_save_commit(save, 1.5, metadata, sizeof metadata));
    snapshotd_save_free(save);

    uint64_t committed = 0;
    CHECK(snapshotd_wait_committed(client, step, 30000, &committed));
    int found = 0;
    uint64_t latest = 0;
    CHECK(snapshotd_latest_committed(client, &found, &latest));
    if (!found || latest != step || committed != step) {
        fprintf(stderr, "committed %llu, latest %llu (found %d), expected %llu\n", (unsigned long long)committed, (unsigned long long)latest, found, (unsigned long long)step);
        return 1;
    }

    snapshotd_restore *restore = NULL;
    CHECK(snapshotd_restore_open(client, 0, 0, &restore));
    if (snapshotd_restore_step(restore) != step || snapshotd_restore_count(restore) != 3) {
        fprintf(stderr, "restored step %llu with %zu tensors\n", (unsigned long long)snapshotd_restore_step(restore), snapshotd_restore_count(restore));
        return 1;
    }
    snapshotd_tensor_info info;
    CHECK(snapshotd_restore_tensor(restore, 0, &info));
    const float *restored = info.data;
    if (strcmp(info.name, "model.layers.0.weight") != 0 || info.dtype != SNAPSHOTD_FLOAT32 || info.ndim != 2 || info.shape[0] != 256 || info.shape[1] != 1024) {
        fprintf(stderr, "tensor 0 came back as %s, dtype %d, ndim %d\n", info.name, info.dtype, info.ndim);
        return 1;
    }
    for (size_t i = 0; i < 256 * 1024; i++) {
        if (restored[i] != (float)i * 0.5f) {
            fprintf(stderr, "weight[%zu] = %f\n", i, restored[i]);
            return 1;
        }
    }
    CHECK(snapshotd_restore_tensor(restore, 2, &info));
    if (info.ndim != 0 || *(const double *)info.data != 3.25) {
        fprintf(stderr, "scalar came back wrong\n");
        return 1;
    }
    size_t metadata_length = 0;
    const void *restored_metadata = snapshotd_restore_metadata(restore, &metadata_length);
    if (metadata_length != sizeof metadata || memcmp(restored_metadata, metadata, sizeof metadata) != 0 || snapshotd_restore_gradient_norm(restore) != 1.5) {
        fprintf(stderr, "metadata or gradient norm came back wrong\n");
        return 1;
    }
    status = snapshotd_restore_tensor(restore, 3, &info);
    if (status != SNAPSHOTD_ERR_INVALID_ARGUMENT) {
        fprintf(stderr, "tensor 3 of 3 gave status %d\n", status);
        return 1;
    }
    /* A shard saved by its trainer is exact; one that CheckFree rebuilt from its
     * pipeline neighbours would say how (method, source stages, weights). */
    snapshotd_reconstruction how;
    memset(&how, 0xFF, sizeof how);
    if (snapshotd_restore_reconstruction(restore, &how) != 0 || how.method != SNAPSHOTD_EXACT || how.source_count != 0) {
        fprintf(stderr, "an exact shard reported reconstruction method %d\n", how.method);
        return 1;
    }
    snapshotd_restore_close(restore);

    /* A step that was never saved: the daemon's own code and message. */
    status = snapshotd_restore_open(client, 1, step + 1000, &restore);
    if (status == SNAPSHOTD_OK || status >= 100) {
        fprintf(stderr, "restore of an unknown step gave status %d (%s)\n", status, snapshotd_last_error());
        return 1;
    }
    printf("restore of an unknown step refused: %d: %s\n", status, snapshotd_last_error());
    snapshotd_client_close(client);
    printf("snapshotd C interface %s: save and restore of step %llu byte-identical\n", snapshotd_version(), (unsigned long long)step);
    return 0;
}
