"""Reading a file a flag names, refused up front with one line that names the flag and the path
(the TLS files of rlhf.tls, the token files of rlhf.auth)."""

from __future__ import annotations

from pathlib import Path


def read_flag_file(flag: str, path: str, kind: str, error: type[ValueError]) -> bytes:
    """The bytes of `path`, or `error` saying why not; `kind` says what the file should be
    ("a PEM file", "a token file")."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{flag} {path}: is a folder, not {kind}") from None
    except PermissionError:
        raise error(f"{flag} {path}: not readable by this process") from None
    except OSError as err:
        raise error(f"{flag} {path}: {err.strerror}") from None
