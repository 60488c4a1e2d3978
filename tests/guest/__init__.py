"""The QEMU test guest: sources and the builder that caches the kernel and initramfs."""
