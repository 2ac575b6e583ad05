#include "isal_reference.h"

#include <isa-l/erasure_code.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double isal_reference_encode_seconds(int k, int m, int fragment_bytes,
                                     unsigned char **data, unsigned char **parity, int iterations) {
    unsigned char *matrix = malloc((size_t)(k + m) * k);
    unsigned char *tables = malloc((size_t)32 * k * m);
    gf_gen_cauchy1_matrix(matrix, k + m, k);
    ec_init_tables(k, m, matrix + k * k, tables);
    double start = now_seconds();
    for (int i = 0; i < iterations; i++) {
        ec_encode_data(fragment_bytes, k, m, tables, data, parity);
    }
    double elapsed = now_seconds() - start;
    free(tables);
    free(matrix);
    return elapsed;
}

double isal_reference_decode_seconds(int k, int m, int lost, int fragment_bytes,
                                     unsigned char **fragments, int iterations) {
    int n = k + m;
    unsigned char *matrix = malloc((size_t)n * k);
    unsigned char *survivor_rows = malloc((size_t)k * k);
    unsigned char *inverse = malloc((size_t)k * k);
    unsigned char *tables = malloc((size_t)32 * k * lost);
    unsigned char **sources = malloc(sizeof(unsigned char *) * k);
    unsigned char **outputs = malloc(sizeof(unsigned char *) * lost);
    gf_gen_cauchy1_matrix(matrix, n, k);
    // Survivors are fragments lost..lost+k-1; the lost ones are data 0..lost-1.
    for (int r = 0; r < k; r++) {
        memcpy(survivor_rows + r * k, matrix + (lost + r) * k, k);
        sources[r] = fragments[lost + r];
    }
    double elapsed = -1;
    if (gf_invert_matrix(survivor_rows, inverse, k) == 0) {
        // Lost data fragment i is row i of the inverse.
        ec_init_tables(k, lost, inverse, tables);
        for (int i = 0; i < lost; i++) outputs[i] = fragments[i];
        double start = now_seconds();
        for (int i = 0; i < iterations; i++) {
            ec_encode_data(fragment_bytes, k, lost, tables, sources, outputs);
        }
        elapsed = now_seconds() - start;
    }
    free(outputs);
    free(sources);
    free(tables);
    free(inverse);
    free(survivor_rows);
    free(matrix);
    return elapsed;
}

double reference_memcpy_seconds(void *destination, const void *source, size_t bytes, int iterations) {
    double start = now_seconds();
    for (int i = 0; i < iterations; i++) {
        memcpy(destination, source, bytes);
        // Keep the compiler from eliding repeated copies.
        __asm__ volatile("" : : "r"(destination) : "memory");
    }
    return now_seconds() - start;
}
