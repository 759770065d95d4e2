"""The nested lab: L1 (a Debian kernel with kvm_amd under QEMU TCG with emulated SVM)
where real KVM runs the guests under test, on hosts whose /dev/kvm cannot."""
