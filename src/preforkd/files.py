"""Files the supervisor creates or reads, and the directories it keeps them in.

The rules (``docs/operations.md``, "Security model"), each enforced here once:

* **Files it only reads** (the configuration) are read as regular files, without
  blocking, up to a size bound (:func:`read_regular_file`).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import List


def read_regular_file(path: str, limit: int) -> bytes:
    """The contents of the regular file *path*, read without ever blocking on it.

    It is opened with ``O_NONBLOCK`` (a FIFO then opens at once instead of waiting for
    a writer, open(2)) and checked with ``fstat`` before anything is read.

    :param limit: the largest size accepted, in bytes.
    :raises OSError: cannot be opened (``strerror`` says why), is not a regular file
        (``EINVAL``), or is larger than *limit* (``EFBIG``).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        chunks: List[bytes] = []
        size = 0
        while True:  # the file may grow while we read: never more than limit + 1 bytes
            data = os.read(fd, limit + 1 - size)
            if not data:
                break
            chunks.append(data)
            size += len(data)
            if size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        return b"".join(chunks)
    finally:
        os.close(fd)
