"""The signed `disaggregated_params.opaque_state` a context server hands back, and the shared key.

`sign(payload, key)` is base64url(msgpack(payload) + HMAC-SHA256(key, msgpack(payload))); `verify`
checks the MAC before decoding anything (msgpack, never pickle) and returns the payload dict. The
orchestrator passes the blob through untouched; only a server holding the key can make or read one
as valid.

The key (`secret_key()`), the same on every context and generation server, their ranks and the
orchestrator:
1. `MESHSERVE_SECRET` (a hex string is decoded, anything else is used as its UTF-8 bytes);
2. else the key file `MESHSERVE_SECRET_FILE` names (its text, read as MESHSERVE_SECRET would be).
   `meshserve disaggregated` and `meshserve serve` with `cache_transceiver_config` settle on a file
   at start (`orchestrator_key`, `server_key_file`): `--secret_file`, MESHSERVE_SECRET_FILE, else
   `default_key_file()` (~/.cache/meshserve/disagg.key), which whichever of them comes first creates
   with 32 random bytes (hex; mode 0600 in a 0700 folder; written aside and hard-linked into place,
   so it never overwrites a key already there). A server then exports MESHSERVE_SECRET_FILE to its
   engine and rank processes. A file that is a symlink, not the user's, or readable or writable by
   anyone else is refused (KeyFileError, one line naming the fix); the key is never logged.
3. else a random key made once per process: enough when both sides live in one process (tests), and
   deliberately quiet about it; servers in separate processes then refuse each other's params and
   transfers ("signature does not match").

`key_proof` lets the orchestrator check that a server holds its key without either sending it: the
orchestrator's /health poll carries a random challenge, the server answers an HMAC of it under a
key derived from the shared one.
"""
from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import os
import secrets
import stat
import threading
from typing import Mapping, Optional

import msgspec

_MAC = hashlib.sha256().digest_size
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict)
_process_key: Optional[bytes] = None
_file_keys: dict[str, bytes] = {}  # key file path -> its key, read once per process
_lock = threading.Lock()

WHERE = "disaggregated_params.opaque_state"
SECRET_ENV = "MESHSERVE_SECRET"
SECRET_FILE_ENV = "MESHSERVE_SECRET_FILE"
MIN_KEY_BYTES = 16
# /health challenge-response (the orchestrator checks each server holds its key)
CHALLENGE_HEADER = "x-meshserve-key-challenge"
PROOF_HEADER = "x-meshserve-key-proof"
_PROOF_LABEL = b"meshserve disaggregated key proof v1"
HOW_TO_SHARE = (f"copy the orchestrator's key file to every server's host (mode 0600; the default path, or name "
                f"it with {SECRET_FILE_ENV} / --secret_file) or set the same {SECRET_ENV} on every server and "
                f"the orchestrator")


class KeyFileError(ValueError):
    """A key file that cannot be used, in one line naming the fix."""


def key_from_secret(secret: str) -> bytes:
    """A MESHSERVE_SECRET string as key bytes: hex decoded when it is hex, else its UTF-8 bytes."""
    s = secret.strip()
    if s and len(s) % 2 == 0:
        try:
            return bytes.fromhex(s)
        except ValueError:
            pass
    return secret.encode()


def default_key_file(env: Mapping[str, str] = os.environ) -> str:
    """$XDG_CACHE_HOME/meshserve/disagg.key, else ~/.cache/meshserve/disagg.key."""
    base = env.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "meshserve", "disagg.key")


def _check_folder(folder: str) -> None:
    try:
        st = os.stat(folder)
    except OSError as e:
        raise KeyFileError(f"cannot use the key file's folder {folder}: {e.strerror or e}") from None
    if st.st_uid not in (os.geteuid(), 0):
        raise KeyFileError(f"the key file's folder {folder} belongs to uid {st.st_uid}, not to this user "
                           f"(uid {os.geteuid()}); use a folder of your own")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise KeyFileError(f"the key file's folder {folder} is writable by others (mode {stat.S_IMODE(st.st_mode):o}), "
                           f"so they could replace the key: chmod go-w {folder}")


def read_key_file(path: str) -> Optional[bytes]:
    """The key a key file holds; None when there is no such file; KeyFileError when it cannot be
    trusted (a symlink, another user's, readable or writable by others) or holds no key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise KeyFileError(f"the key file {path} is a symbolic link; it must be a regular file") from None
        raise KeyFileError(f"cannot read the key file {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"the key file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise KeyFileError(f"the key file {path} belongs to uid {st.st_uid}, not to this user "
                               f"(uid {os.geteuid()}); it must be yours, mode 0600")
        if st.st_mode & 0o077:
            raise KeyFileError(f"the key file {path} is readable or writable by others (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        data = b""
        while len(data) <= 4096:
            more = os.read(fd, 4097 - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    _check_folder(os.path.dirname(os.path.abspath(path)))
    if len(data) > 4096:
        raise KeyFileError(f"the key file {path} is larger than 4096 bytes; it should hold one hex key")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"the key file {path} is not text; it should hold one hex key") from None
    key = key_from_secret(text) if text else b""
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(f"the key file {path} holds {'no key' if not key else f'a key of {len(key)} bytes'}; "
                           f"delete it to have a new one made, or write at least {MIN_KEY_BYTES} random bytes "
                           f"(hex) into it")
    return key


def create_key_file(path: str) -> tuple[bytes, bool]:
    """(the key of `path`, whether this call made it): an existing file is read (never
    overwritten); a missing one is made with 32 random bytes, hex, mode 0600 (its folder 0700 when
    made here), written aside and hard-linked into place, so that processes racing to make it all
    end up with the one that won. KeyFileError when that cannot be done safely."""
    key = read_key_file(path)
    if key is not None:
        return key, False
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as e:
        raise KeyFileError(f"cannot make the key file's folder {folder}: {e.strerror or e}; set {SECRET_ENV} "
                           f"or {SECRET_FILE_ENV}") from None
    _check_folder(folder)
    fresh = secrets.token_bytes(32)
    body = (fresh.hex() + "\n").encode()
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and fails when the file exists: never overwrites
        except FileExistsError:
            pass  # another process made it first: theirs is the key
        except OSError:  # a file system without hard links: create it in place, exclusively
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                pass
            else:
                try:
                    os.write(fd, body)
                    os.fsync(fd)
                finally:
                    os.close(fd)
    except OSError as e:
        raise KeyFileError(f"cannot write the key file {path}: {e.strerror or e}; set {SECRET_ENV} or "
                           f"{SECRET_FILE_ENV}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    key = read_key_file(path)
    if key is None:
        raise KeyFileError(f"the key file {path} disappeared as it was made")
    return key, hmac.compare_digest(key, fresh)


def orchestrator_key(secret_file: Optional[str] = None,
                     env: Mapping[str, str] = os.environ) -> tuple[bytes, Optional[str], bool]:
    """The orchestrator's key: (key, the key file or None when MESHSERVE_SECRET gives it, whether
    the file was made now). The file: `secret_file`, else MESHSERVE_SECRET_FILE, else the default;
    made when missing. KeyFileError when it cannot be used."""
    secret = env.get(SECRET_ENV)
    if secret:
        return key_from_secret(secret), None, False
    path = os.path.abspath(secret_file or env.get(SECRET_FILE_ENV) or default_key_file(env))
    key, created = create_key_file(path)
    return key, path, created


def server_key_file(secret_file: Optional[str] = None,
                    env: Mapping[str, str] = os.environ) -> Optional[tuple[str, bool]]:
    """For a server with cache_transceiver_config: None when MESHSERVE_SECRET gives the key, else
    (the key file it and its ranks read, whether it was made now). A file named by `secret_file` or
    MESHSERVE_SECRET_FILE must exist (it is the orchestrator's, copied); the default one is made
    when missing (the orchestrator on the same machine, started before or after, reads the same).
    KeyFileError, one line naming what to set, when there is no usable key."""
    if env.get(SECRET_ENV):
        return None
    explicit = secret_file or env.get(SECRET_FILE_ENV)
    if explicit:
        path = os.path.abspath(explicit)
        if read_key_file(path) is None:
            how = "--secret_file" if secret_file else SECRET_FILE_ENV
            raise KeyFileError(f"no key for disaggregated serving: the key file {path} ({how}) does not exist; "
                               f"{HOW_TO_SHARE}")
        return path, False
    path = default_key_file(env)
    _, created = create_key_file(path)
    return path, created


def secret_key(env: Mapping[str, str] = os.environ) -> bytes:
    """The HMAC key of disaggregated params and KV transfers: MESHSERVE_SECRET, else the key file
    MESHSERVE_SECRET_FILE names (read once per process), else a random key fixed for this process
    (see the module docstring). KeyFileError when MESHSERVE_SECRET_FILE names an unusable file."""
    global _process_key
    secret = env.get(SECRET_ENV)
    if secret:
        return key_from_secret(secret)
    path = env.get(SECRET_FILE_ENV)
    if path:
        path = os.path.abspath(path)
        with _lock:
            key = _file_keys.get(path)
        if key is None:
            key = read_key_file(path)
            if key is None:
                raise KeyFileError(f"no key for disaggregated serving: the key file {path} ({SECRET_FILE_ENV}) "
                                   f"does not exist; {HOW_TO_SHARE}")
            with _lock:
                key = _file_keys.setdefault(path, key)
        return key
    with _lock:
        if _process_key is None:
            _process_key = secrets.token_bytes(32)
        return _process_key


def key_proof(key: bytes, challenge: str) -> Optional[str]:
    """The answer to a /health key challenge (32 to 128 hex characters): hex HMAC-SHA256 of its bytes
    under a key derived from `key` (so it answers nothing else the key signs); None when malformed."""
    if not isinstance(challenge, str) or not 32 <= len(challenge) <= 128:
        return None
    try:
        nonce = bytes.fromhex(challenge)
    except ValueError:
        return None
    derived = hmac.new(key, _PROOF_LABEL, hashlib.sha256).digest()
    return hmac.new(derived, nonce, hashlib.sha256).hexdigest()


def sign(payload: dict, key: bytes) -> str:
    body = _encoder.encode(payload)
    return base64.urlsafe_b64encode(body + hmac.new(key, body, hashlib.sha256).digest()).decode("ascii")


def verify(blob: str, key: bytes) -> dict:
    """The payload of a blob `sign` made with the same key; a ValueError naming what is wrong."""
    if not isinstance(blob, str) or not blob:
        raise ValueError(f"{WHERE}: malformed (expected a non-empty base64 string)")
    try:
        raw = base64.urlsafe_b64decode(blob.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ValueError(f"{WHERE}: malformed (not base64)") from None
    if len(raw) <= _MAC:
        raise ValueError(f"{WHERE}: malformed (too short)")
    body, mac = raw[:-_MAC], raw[-_MAC:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise ValueError(f"{WHERE}: signature does not match (the context and generation servers "
                         f"need the same key: MESHSERVE_SECRET, or the same key file)")
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as e:
        raise ValueError(f"{WHERE}: malformed ({e})") from None
    except RecursionError:  # msgpack nested thousands deep
        raise ValueError(f"{WHERE}: malformed (nested too deeply)") from None
