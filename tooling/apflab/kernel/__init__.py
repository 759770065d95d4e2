"""Guest kernels under test: cached builds from a source, patches and config fragments.

The public surface (what the CLI and the experiment call)::

    from apflab import kernel

    spec = kernel.KernelSpec(source="debian-6.1", patches=(path,), configs=(fragment,))
    kernel.check(spec)                  # UsageError: one line naming the file and the fix
    built = kernel.build(spec)          # BuiltKernel: .bzimage, .release, .how, .to_dict()
    kernel.check_bzimage(path)          # UsageError unless an x86_64 bzImage
    kernel.cache_dir()                  # /var/cache/apflab/kernels or $APFLAB_KERNEL_CACHE

Modules: :mod:`~apflab.kernel.builder`, :mod:`~apflab.kernel.sources`
(Debian packages, git trees, tarballs), :mod:`~apflab.kernel.fragments` (config lines and
Kconfig symbols), :mod:`~apflab.kernel.patches`, :mod:`~apflab.kernel.make` (make with
progress), :mod:`~apflab.kernel.cache` (layout, keys, locks), :mod:`~apflab.kernel.bzimage`
(the x86 boot protocol header).
"""

from __future__ import annotations

from apflab.kernel.builder import (
    BuiltKernel,
    KernelSpec,
    build,
    built_at,
    check,
    default_base_config,
    index_file,
    load_entry,
    lookup,
    patches_dir,
    request_key,
)
from apflab.kernel.bzimage import BzImageHeader, check_bzimage, is_bzimage
from apflab.kernel.cache import KernelBuildError, cache_dir, compute_key
from apflab.kernel.sources import DEBIAN_SOURCES, DEFAULT_SOURCE

__all__ = [
    "DEBIAN_SOURCES",
    "DEFAULT_SOURCE",
    "BuiltKernel",
    "BzImageHeader",
    "KernelBuildError",
    "KernelSpec",
    "build",
    "built_at",
    "cache_dir",
    "check",
    "check_bzimage",
    "compute_key",
    "default_base_config",
    "index_file",
    "is_bzimage",
    "load_entry",
    "lookup",
    "patches_dir",
    "request_key",
]
