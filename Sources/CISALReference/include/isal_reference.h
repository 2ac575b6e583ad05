// Reference measurements in plain C against ISA-L, used by snapshot-bench to
// put the Swift layer's figures next to ISA-L called directly on the same data.
#pragma once
#include <stddef.h>

/// Encodes `iterations` times with a Cauchy RS(k, m); returns elapsed seconds.
double isal_reference_encode_seconds(int k, int m, int fragment_bytes,
                                     unsigned char **data, unsigned char **parity, int iterations);

/// Rebuilds fragments 0..lost-1 (data) from the next k fragments `iterations`
/// times; `fragments` has k+m entries. Returns elapsed seconds, or -1 if the
/// decode matrix is singular.
double isal_reference_decode_seconds(int k, int m, int lost, int fragment_bytes,
                                     unsigned char **fragments, int iterations);

/// memcpy of `bytes` from `source` to `destination`, `iterations` times; elapsed seconds.
double reference_memcpy_seconds(void *destination, const void *source, size_t bytes, int iterations);
