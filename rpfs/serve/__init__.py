"""What serves a repository: the daemon, its control socket, the image handles, the FUSE
tree and operations, and the NBD exports."""
