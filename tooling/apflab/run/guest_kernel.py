"""Which kernel the guest boots, and what verdict.json says about it.

Three ways in, from :class:`~apflab.run.scenario.Scenario`:

* nothing: the guest image's own kernel and initrd (the Debian cloud kernel);
* ``--kernel bzImage``: that file (checked as an x86 bzImage before any VM starts);
  an apflab-built one (a kernel cache entry) boots without an initrd, any other with
  the image's, unless ``--initrd`` says otherwise;
* ``--patch`` / ``--kernel-config`` / ``--kernel-source``: built by :mod:`apflab.kernel`
  (cached), booted without an initrd.  Inside the lab there is no source and no
  compiler: the outer host builds first and ships the cache entry, found there by
  its request index (:func:`apflab.kernel.lookup`).
"""

from __future__ import annotations

from apflab import kernel, paths
from apflab.errors import UsageError
from apflab.images.recipe import BuiltImage
from apflab.run.phases import Emit
from apflab.run.records import KernelFacts
from apflab.run.scenario import Scenario
from apflab.vm.qemu import BootSpec


def ensure_built(spec: kernel.KernelSpec, emit: Emit) -> kernel.BuiltKernel:
    """The built kernel of ``spec``: built (or found cached) here; inside the lab only
    found, since the lab has no kernel source.

    :raises UsageError: a bad patch, fragment or source (see :func:`apflab.kernel.check`),
        or, in the lab, a kernel the outer host did not build
    """
    if paths.in_lab():
        found = kernel.lookup(spec)
        if found is None:
            raise UsageError(
                "the guest kernel to build is not in the lab's kernel cache: the lab has no "
                "kernel source; build it on the host first (apflab run / apflab "
                "check-functional do; or `apflab kernel build` and pass --kernel)"
            )
        return found
    return kernel.build(spec, progress=emit)


def resolve(scenario: Scenario, img: BuiltImage, emit: Emit) -> tuple[BootSpec, KernelFacts]:
    """The guest's :class:`BootSpec` and the facts of its kernel (release: after boot)."""
    cmdline = img.boot_spec(scenario.cmdline).cmdline
    spec = scenario.kernel_spec()
    built: kernel.BuiltKernel | None
    if spec is not None:
        built = ensure_built(spec, emit)
        path, initrd = built.bzimage, scenario.initrd
    elif scenario.kernel is not None:
        built = kernel.built_at(scenario.kernel)
        path = scenario.kernel
        initrd = scenario.initrd or (None if built is not None else img.initrd)
    else:
        built, path, initrd = None, img.kernel, img.initrd
    facts = KernelFacts(str(path), paths.sha256_file(path), cmdline)
    if built is not None:
        facts.source = built.source
        facts.patches = built.patches
        facts.config = built.configs
        facts.build = {
            "key": built.key,
            "how": built.how,
            "seconds": round(built.build_seconds, 1),
            "built": built.built,
        }
    elif scenario.kernel is not None:
        facts.source = {"kind": "file"}
    else:
        release = img.manifest["kernel_release"]
        facts.source = {"kind": "image", "name": img.name, "release": release}
    return BootSpec(path, initrd, cmdline), facts
