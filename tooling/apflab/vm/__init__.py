"""Virtual machines: QEMU guests driven over QMP and SSH."""
