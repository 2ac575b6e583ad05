#include "snapshotd.h"

/* Kept in C so the header has a home target that Swift imports: the Swift
 * implementation (Sources/SnapshotClientC) sees exactly the declared types. */
const char *snapshotd_version(void) { return SNAPSHOTD_VERSION; }
