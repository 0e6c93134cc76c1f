"""numba's on-disk cache, where it can be had."""

from __future__ import annotations

import os
import tempfile

import numba


def jit_cache_enabled(module_file: str) -> bool:
    """Whether numba can keep the compiled kernels of the module at `module_file` on disk
    (pass `cache=jit_cache_enabled(__file__)` to its njit decorators).

    numba's ``cache=True`` raises at decoration time when none of its cache directories is
    writable (the package sitting in Kaggle's read-only /kaggle/input with no writable
    NUMBA_CACHE_DIR or home). Checks the same places, in numba's order: NUMBA_CACHE_DIR, the
    package's __pycache__, the user-wide cache dir.
    """
    candidates = []
    if numba.config.CACHE_DIR:
        candidates.append(numba.config.CACHE_DIR)
    candidates.append(os.path.join(os.path.dirname(os.path.abspath(module_file)), "__pycache__"))
    try:
        from numba.misc.appdirs import AppDirs

        candidates.append(AppDirs(appname="numba", appauthor=False).user_cache_dir)
    except ImportError:  # private module; without it we only trust the two places above
        pass
    for directory in candidates:
        try:
            os.makedirs(directory, exist_ok=True)
            tempfile.TemporaryFile(dir=directory).close()
        except OSError:
            continue
        return True
    return False
