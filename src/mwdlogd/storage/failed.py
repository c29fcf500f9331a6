"""Where a chunk goes when its file stays unwritable past `retry_timeout`: never dropped."""

import os
import time
from pathlib import Path

from mwdlogd.errors import StorageError
from mwdlogd.storage.files import fsync_dir
from mwdlogd.storage.ledger import Ledger


def move_to_failed(failed_dir: Path, relpath: str, members: bytes, max_id: int, error: str,
                   ledger: Ledger, root: str) -> Path:
    """Write the members and an `.error` note under `failed_dir`, then mark the batches as
    settled so the journal can let them go. Returns the file written."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = failed_dir / f"{stamp}-{max_id}-{relpath.replace('/', '__')}"
    try:
        failed_dir.mkdir(parents=True, exist_ok=True)
        for path, data in ((target, members),
                           (target.with_name(target.name + ".error"),
                            f"destination: {relpath}\nerror: {error}\n".encode())):
            with open(path, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        fsync_dir(failed_dir)
    except OSError as exc:
        raise StorageError(str(target), "write failed chunk", exc.strerror or str(exc)) from exc
    with ledger.hold(root, relpath) as held:
        assert held is not None
        held.done(max_id, sync=True)
    return target
