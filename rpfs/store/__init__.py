"""The pack store: record format, the pack backend seam, packs, and the chunk cache."""
