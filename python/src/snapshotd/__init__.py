"""snapshotd: in-memory snapshots of training state, protected across nodes.

    client = snapshotd.Client("my-job")            # RANK / WORLD_SIZE from torchrun
    client.save(step, {"w": weights})              # bytes in the daemon's memory
    client.wait_committed(step)                    # protected on every node
    step, shard = client.restore()                 # zero-copy read-only arrays
"""

from ._dtypes import DType
from ._enums import Kind
from .client import CARRIED, EXTRA, OPTIMIZER, PARAMETER, RNG, Client, PendingSave, Reconstruction, SaveHandle, Shard, flatten
from .errors import DaemonUnavailableError, ErrorCode, SnapshotdError

__all__ = [
    "Client", "PendingSave", "SaveHandle", "Shard", "Reconstruction", "flatten",
    "SnapshotdError", "DaemonUnavailableError", "ErrorCode",
    "Kind", "DType", "PARAMETER", "OPTIMIZER", "RNG", "EXTRA", "CARRIED",
]
__version__ = "0.5.0"
