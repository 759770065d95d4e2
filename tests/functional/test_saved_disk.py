"""The machine's disk of L1 saved boots is shared by labs one at a time.

A real QEMU holds the disk the way a running L1 does (a virtio-blk device, read-write,
QEMU's image lock); while it runs, a second lab must see the disk as taken and keep
its own (``saved_boots_disk()`` is None), and take it again once that QEMU is gone.
The probe once opened the disk read-only, which succeeds while another QEMU writes it,
and the second of two labs at once died at launch on the lock.
"""

import os
import subprocess
import time
from pathlib import Path

from avocado import Test

from apflab.lab.assets import saved_boots_disk


class SavedBootsDisk(Test):
    """
    :avocado: tags=lab,cleanup
    """

    timeout = 120

    def test_a_disk_held_by_another_lab_is_not_taken(self) -> None:
        os.environ["APFLAB_CACHE"] = self.workdir  # a disk of the test's own
        try:
            disk = saved_boots_disk()
            self.assertIsNotNone(disk, "a free disk is the lab's")
            assert disk is not None
            holder = subprocess.Popen(
                [
                    "qemu-system-x86_64",
                    "-S",
                    "-nodefaults",
                    "-display",
                    "none",
                    "-drive",
                    f"file={disk},format=raw,if=none,id=d0,cache=writeback",
                    "-device",
                    "virtio-blk-pci,drive=d0",
                ],
                stderr=subprocess.PIPE,
            )
            try:
                time.sleep(2)  # QEMU takes its locks before it would run
                self.assertIsNone(holder.poll(), "the holding QEMU did not start")
                self.assertIsNone(saved_boots_disk(), "a disk another QEMU writes was taken")
            finally:
                holder.terminate()
                holder.wait(timeout=30)
            self.assertEqual(saved_boots_disk(), disk, "the disk is free again")
        finally:
            del os.environ["APFLAB_CACHE"]
            Path(self.workdir, "lab-saved-boots.img").unlink(missing_ok=True)
