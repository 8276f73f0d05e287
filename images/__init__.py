"""Guest images: kernel from config fragments, rootfs from a recipe, initramfs with init + agent."""
