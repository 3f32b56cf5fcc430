"""Reading a local image or video file, confined to an allowed folder without a race.

A check of `realpath(path)` followed by `open(path)` has a window: a symlink swapped in between
makes the open land outside the folder. Here the path is resolved once (symlinks and '..' followed,
so links that stay inside the folder keep working), checked against the folder, and the resolved
path is then opened one component at a time from a descriptor of the folder itself, each component
with O_NOFOLLOW: a component turned into a symlink after the check fails the open instead of being
followed, and a directory renamed meanwhile cannot lead outside, since every step is relative to a
descriptor already inside. The final open is non-blocking (a FIFO cannot hang it) and its target must
be a regular file.
"""

from __future__ import annotations

import errno
import os
import stat

from phi3v.processing.media_errors import ImageInputError, fmt_size, show

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _realpath(path: str, shown: str, kind: str = "image") -> str:
    try:  # realpath lstat()s then readlink()s each link: a link removed in between raises
        return os.path.realpath(path)
    except OSError:
        raise ImageInputError(f"{kind} path {show(shown)} changed while it was resolved (a symlink on the way); "
                              "try again with a stable path") from None


def resolve_under(path: str, allowed_dir: str | None, kind: str = "image") -> tuple[str, list[str]]:
    """(root, components): the folder to start from and the resolved path's parts below it. A relative
    path is taken from `allowed_dir` (never from the server's working directory) when one is set."""
    if "\0" in path:
        raise ImageInputError(f"{kind} path contains a NUL byte; pass a valid file path")
    if allowed_dir is None:
        real = _realpath(path, path, kind)
        return "/", [p for p in real.split(os.sep) if p]
    root = _realpath(allowed_dir, allowed_dir, kind)
    real = _realpath(os.path.join(root, path), path, kind)  # join keeps an absolute `path` as it is
    if os.path.commonpath([root, real]) != root:
        raise ImageInputError(f"{kind} path {show(path)} is outside the allowed directory {show(allowed_dir)}; "
                              "move the file there")
    return root, [p for p in os.path.relpath(real, root).split(os.sep) if p and p != "."]


def _open_beneath(root: str, parts: list[str], path: str, kind: str = "image") -> int:
    """A read-only descriptor of root/parts..., opened without following any symlink on the way."""
    fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the folder itself may be reached through links
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if not parts:
            raise ImageInputError(f"{kind} path {show(path)} is a directory; pass {_a(kind)} file")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def read_media_file(path: str, allowed_dir: str | None, max_bytes: int, kind: str = "image") -> bytes:
    """The bytes of the file at `path` (at most max_bytes, else an error), confined to `allowed_dir`. `kind`
    (image, video) names the file in error messages."""
    root, parts = resolve_under(path, allowed_dir, kind)
    try:
        fd = _open_beneath(root, parts, path, kind)
    except FileNotFoundError:
        raise ImageInputError(f"{kind} file not found: {show(path)}; check the path") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise ImageInputError(f"{kind} path {show(path)} changed while it was opened (a symlink on the way); "
                                  "try again with a stable path") from None
        raise ImageInputError(f"cannot access {kind} file {show(path)} ({e.strerror}); "
                              "check the path and permissions") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageInputError(f"{kind} path {show(path)} is a directory; pass {_a(kind)} file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageInputError(f"{kind} path {show(path)} is not a regular file; pass {_a(kind)} file")
        if st.st_size == 0:
            raise ImageInputError(f"{kind} file {show(path)} is empty (0 bytes); provide a non-empty {kind} file")
        if st.st_size > max_bytes:
            raise ImageInputError(f"{kind} file {show(path)} is {fmt_size(st.st_size)}, over the limit of "
                                  f"{fmt_size(max_bytes)}; use a smaller {kind}")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read(max_bytes + 1)  # capped even if the file grows after fstat
    except OSError as e:
        raise ImageInputError(f"cannot read {kind} file {show(path)} ({e.strerror}); check permissions") from None
    finally:
        if fd >= 0:
            os.close(fd)
