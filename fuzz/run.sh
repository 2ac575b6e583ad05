#!/usr/bin/env bash
# Builds and runs the coverage-guided fuzz target (libFuzzer, swiftc
# -sanitize=fuzzer) over the frame and message decoders.
#
#   bash fuzz/run.sh                 # 1,000,000 inputs (the documented long run)
#   bash fuzz/run.sh -runs=20000     # CI's short pass
#   bash fuzz/run.sh -max_total_time=600
#
# The seed corpus is fuzz/corpus (committed); new inputs the fuzzer finds go
# to a scratch copy, so the repository is not changed. Crashes are written to
# .build-fuzz/crash-* with the input that caused them.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=.build-fuzz
args=("$@")
if [ ${#args[@]} -eq 0 ]; then args=(-runs=1000000); fi

# The two modules the target needs, instrumented for coverage.
swift build -c release --scratch-path "$scratch" --target SnapshotProtocol \
    -Xswiftc -sanitize=fuzzer -Xswiftc -parse-as-library >/dev/null
build="$scratch/release"
objects=$(find "$build/ErasureCoding.build" "$build/SnapshotProtocol.build" -name '*.o')
# shellcheck disable=SC2086
swiftc -O -sanitize=fuzzer -parse-as-library -I "$build/Modules" -I Sources/CISAL \
    fuzz/FuzzFrames.swift $objects -lisal -o "$scratch/fuzz-frames"

work="$scratch/corpus"
rm -rf "$work" && mkdir -p "$work" && cp fuzz/corpus/* "$work/"
"$scratch/fuzz-frames" -artifact_prefix="$scratch/" -max_len=65536 "${args[@]}" "$work"
