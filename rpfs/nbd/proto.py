"""The NBD protocol's numbers and byte layouts, written from the specification
(NetworkBlockDevice/nbd `doc/proto.md`, fixed newstyle): one place for the server
(serve/nbd.py) and the client a capture reads an NBD export with (nbd/client.py).

Everything on the wire is big-endian.
"""

from __future__ import annotations

import struct

# -- handshake ------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": the newstyle greeting and every option
REPLY_MAGIC = 0x3E889045565A9  # every option reply

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, data length
OPTION_REPLY = struct.Struct(">QIII")  # REPLY_MAGIC, option, reply type, data length

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9

# NBD_REP_INFO types
INFO_EXPORT = 0  # size (64), transmission flags (16)
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3  # minimum, preferred, maximum (32 each)

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- transmission ---------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunks
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1  # offset (64), data
REPLY_TYPE_OFFSET_HOLE = 2  # offset (64), length (32)
REPLY_TYPE_BLOCK_STATUS = 5  # context id (32), then (length 32, flags 32) descriptors
REPLY_TYPE_ERROR = (1 << 15) | 1  # error (32), message length (16), message
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2  # as ERROR, then the offset (64)

# errors, as the protocol numbers them (Linux's values)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# meta contexts
BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0  # base:allocation
STATE_ZERO = 1 << 1
DIRTY_BITMAP = "qemu:dirty-bitmap:"  # + a name; bit 0: dirty
ALLOCATION_DEPTH = "qemu:allocation-depth"  # 0 unallocated, 1 this layer, 2+ a backing one
STATE_DIRTY = 1 << 0

MIN_BLOCK = 512
MAX_BLOCK = 32 << 20  # the largest request payload served
MAX_STRING = 4096  # an export name or context query may not be longer


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply, len(data)) + data


def chunk(flags: int, kind: int, cookie: int, payload: bytes = b"") -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload


def error_payload(error: int, message: str) -> bytes:
    text = message.encode()[:MAX_STRING]
    return struct.pack(">IH", error, len(text)) + text
