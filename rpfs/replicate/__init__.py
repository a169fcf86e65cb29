"""Replication between repositories: streams (stream.py), the sender (sender.py), the
receiver (receiver.py), the protocol that drives them (session.py) and the far side
(remote.py). docs/stream-format.md describes the bytes."""
