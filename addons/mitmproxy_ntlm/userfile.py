"""Reading a file the user points us at, without hanging on a FIFO or guessing an encoding.

A path option may name anything: a FIFO (opening it for reading blocks until a writer comes,
forever at start-up), a directory, a device, a socket. Only regular files are read (a symlink to
one is fine). The path is checked with stat() before it is opened, opened non-blocking, and the
opened descriptor is checked again with fstat() so that a swap in between cannot slip through.
"""

from __future__ import annotations

import codecs
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("mitmproxy_ntlm")

# Far above any password, credentials or cntlm config file; a mistaken path cannot fill memory.
MAX_BYTES = 64 * 1024

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class FileRefused(ValueError):
    """The file cannot be used; the message names the file and the real cause."""


def kind_of(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def require_regular(st: os.stat_result, label: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(f"{label} is {kind_of(st.st_mode)}, not a file")


def stat_regular_file(path: str, what: str) -> os.stat_result:
    """stat() a path (following symlinks) and refuse anything but a regular file."""
    label = f"{what} {path}"
    try:
        st = os.stat(Path(path).expanduser())
    except OSError as e:
        raise FileRefused(f"{label}: {e.strerror}") from None
    require_regular(st, label)
    return st


def read_regular_file(path: str, what: str,
                      check: Callable[[os.stat_result], None] | None = None,
                      limit: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; `check` vets the opened file."""
    label = f"{what} {path}"
    before = stat_regular_file(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) \
        | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(Path(path).expanduser(), flags)
    except OSError as e:
        raise FileRefused(f"{label}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        require_regular(st, label)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise FileRefused(f"{label} was replaced while it was being read; try again")
        if check is not None:
            check(st)
        if st.st_size > limit:
            raise FileRefused(f"{label} is {st.st_size} bytes, more than the {limit} expected")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise FileRefused(f"{label}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileRefused(f"{label} is larger than the {limit} bytes expected")
    return data


def decode_text(data: bytes, label: str) -> str:
    """UTF-8 text; a leading byte order mark (Notepad's UTF-8, PowerShell 5's UTF-16) is
    honoured and dropped. Other encodings are refused rather than guessed: a wrong guess would
    send a wrong password, i.e. a failed logon that counts towards the account's lockout."""
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                          (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            log.debug("[ntlm] %s starts with a %s byte order mark: dropped", label,
                      encoding.upper())
            data, found = data[len(bom):], encoding
            break
    else:
        found = ""
    try:
        text = data.decode(found or "utf-8")
    except UnicodeDecodeError:
        if found:
            raise FileRefused(f"{label} starts with a {found.upper()} byte order mark but is "
                              f"not valid {found.upper()}; save it again as UTF-8") from None
        raise FileRefused(
            f"{label} is not UTF-8 text (perhaps Latin-1/Windows-1252, or UTF-16 without a byte "
            f"order mark); save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`, or in Notepad: "
            f"Save as, Encoding UTF-8") from None
    if "\x00" in text:
        raise FileRefused(f"{label} contains NUL characters (UTF-16 without a byte order "
                          f"mark?); save it as UTF-8")
    return text
