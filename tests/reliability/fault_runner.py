"""Run the ``medfoundry`` CLI with one fault injected, chosen by the environment variable ``MF_FAULT``.

``kill_mid_write:N``   the N-th checkpoint write (``torch.save`` into the temporary file) writes half of its bytes,
                       then the process SIGKILLs itself: a crash in the middle of a write.
``kill_before_record:N`` the N-th checkpoint is renamed into place, then the process dies before its checksum
                       record is written.
``fsize:BYTES``        no file may grow past BYTES (RLIMIT_FSIZE; writes past it fail with EFBIG): a full disk.
(empty)                no fault.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import sys


def _nth(n: int):
    count = [0]

    def hit() -> bool:
        count[0] += 1
        return count[0] == n

    return hit


def inject(fault: str) -> None:
    """Install ``fault`` (see the module docstring) into this process."""
    kind, _, arg = fault.partition(":")
    if kind == "kill_mid_write":
        import torch

        import medfoundry.checkpoints.format as ckpt

        real_save, hit = torch.save, _nth(int(arg))

        def save(obj, f, *a, **kw):
            if not hasattr(f, "write") or not hit():
                return real_save(obj, f, *a, **kw)
            buf = io.BytesIO()
            real_save(obj, buf, *a, **kw)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        ckpt.torch.save = save
    elif kind == "kill_before_record":
        import medfoundry.checkpoints.format as ckpt

        hit = _nth(int(arg))
        real_record = ckpt.record_file

        def record(path, digest=None):
            if hit():
                os.kill(os.getpid(), signal.SIGKILL)
            return real_record(path, digest)

        ckpt.record_file = record
    elif kind == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        limit = int(arg)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    elif kind:
        raise SystemExit(f"unknown MF_FAULT {fault!r}")


if __name__ == "__main__":
    inject(os.environ.get("MF_FAULT", ""))
    from medfoundry_cli.cli import main

    sys.exit(main(sys.argv[1:]))
