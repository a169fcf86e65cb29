#!/usr/bin/env python3
"""A stand-in for ssh in the replication tests: `fakessh.py [-p PORT] HOST COMMAND` runs
COMMAND here with sh, relaying both directions and counting their bytes. Environment:
FAKESSH_LOG (a file: '{"to_far": N, "from_far": N}' at the end), FAKESSH_KILL_AFTER
(SIGKILL the far side once this many bytes came from it)."""

import json
import os
import signal
import subprocess
import sys
import threading

args = sys.argv[1:]
if args[:1] == ["-p"]:
    args = args[2:]
command = args[1]
far = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
counts = {"to_far": 0, "from_far": 0}
kill_after = int(os.environ.get("FAKESSH_KILL_AFTER", "0"))


def forward() -> None:
    src = sys.stdin.buffer.raw
    while data := src.read(65536):
        counts["to_far"] += len(data)
        try:
            far.stdin.write(data)
            far.stdin.flush()
        except BrokenPipeError:
            break
    far.stdin.close()


threading.Thread(target=forward, daemon=True).start()
out = sys.stdout.buffer
while data := far.stdout.read1(65536):
    if kill_after and counts["from_far"] + len(data) >= kill_after:
        data = data[: kill_after - counts["from_far"]]
        out.write(data)
        out.flush()
        counts["from_far"] += len(data)
        far.send_signal(signal.SIGKILL)
        break
    counts["from_far"] += len(data)
    out.write(data)
    out.flush()
rc = far.wait()
if os.environ.get("FAKESSH_LOG"):
    with open(os.environ["FAKESSH_LOG"], "w") as f:
        json.dump(counts, f)
sys.exit(255 if rc < 0 else rc)
