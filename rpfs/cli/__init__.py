"""The `rpfs` command: parses arguments, asks the library, prints."""
