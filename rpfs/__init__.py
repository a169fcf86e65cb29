"""rpfs: recovery points of virtual-machine disks, served as disk image files over FUSE."""

__version__ = "0.1.0"
