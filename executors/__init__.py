"""VM backends. A ``Backend`` makes ``VM``s from a ``VMSpec``; QEMU is the first backend."""
