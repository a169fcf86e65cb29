"""What serves a repository: the daemon, its control socket, the image handles, and the
FUSE tree and operations."""
