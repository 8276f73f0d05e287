"""QEMU microvm backend."""
