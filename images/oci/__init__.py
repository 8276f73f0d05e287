"""OCI images on the host: a job's ``image:`` is pulled with skopeo (reference.py, registry.py),
its layers are unpacked safely into a root-only staging tree (unpack.py), and that tree becomes
a read-only ext4 disk of a fixed virtual size, cached by manifest digest and pruned by age
(store.py). The VM mounts the disk; nothing of the image is ever run or followed on the host."""
