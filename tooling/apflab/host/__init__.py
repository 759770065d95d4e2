"""Host-side facts and changes: KVM flavour, cgroups, swap, tracefs."""
