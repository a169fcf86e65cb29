"""The NBD protocol (proto.py), shared by the daemon's exports (serve/nbd.py) and the
client a capture reads an NBD export with (client.py)."""
