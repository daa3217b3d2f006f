"""disagg/params.py: signed opaque_state blobs, the shared key and its key file."""
import base64
import concurrent.futures
import multiprocessing
import os
import re
import shutil

import msgspec
import pytest

from meshserve.disagg import params
from meshserve.disagg.transceiver import RankLayout

KEY = b"k" * 32


def _layout():
    return RankLayout("127.0.0.1:5000", "llama-abc", "bfloat16", 16, (0, 1, 2), 8, (0, 4), 128, groups=(0, 0, 0))


def test_round_trip_with_structs_inside():
    payload = {"prompt_token_ids": [1, 2, 3], "layouts": [_layout()], "block_ids": [[4, 5]], "num_tokens": 3}
    out = params.verify(params.sign(payload, KEY), KEY)
    assert out["prompt_token_ids"] == [1, 2, 3] and out["num_tokens"] == 3
    assert msgspec.convert(out["layouts"][0], RankLayout) == _layout()


def test_wrong_key_refused():
    blob = params.sign({"a": 1}, KEY)
    with pytest.raises(ValueError, match="disaggregated_params.opaque_state: signature does not match"):
        params.verify(blob, b"x" * 32)


def test_tampered_payload_refused():
    raw = bytearray(base64.urlsafe_b64decode(params.sign({"num_tokens": 10}, KEY)))
    raw[-40] ^= 1  # a byte of the msgpack body
    with pytest.raises(ValueError, match="signature does not match"):
        params.verify(base64.urlsafe_b64encode(bytes(raw)).decode(), KEY)


@pytest.mark.parametrize("blob", ["", "!!!not base64!!!", base64.urlsafe_b64encode(b"short").decode(), 17])
def test_malformed_refused(blob):
    with pytest.raises(ValueError, match="disaggregated_params.opaque_state: malformed"):
        params.verify(blob, KEY)


def test_signed_garbage_is_malformed_not_unpickled():
    import hashlib
    import hmac
    body = b"\xc1\xc1\xc1"  # not msgpack
    blob = base64.urlsafe_b64encode(body + hmac.new(KEY, body, hashlib.sha256).digest()).decode()
    with pytest.raises(ValueError, match="malformed"):
        params.verify(blob, KEY)


def test_secret_key_from_env_and_process_fallback():
    assert params.secret_key({"MESHSERVE_SECRET": "00ff" * 8}) == bytes.fromhex("00ff" * 8)
    assert params.secret_key({"MESHSERVE_SECRET": "not hex!"}) == b"not hex!"
    a, b = params.secret_key({}), params.secret_key({})
    assert a == b and len(a) == 32  # one random key per process


# ---- the key file (MESHSERVE_SECRET unset) -------------------------------------------------------------------
def _mode(path):
    return os.stat(path).st_mode & 0o777


def test_create_key_file_makes_a_private_random_key_once(tmp_path):
    path = str(tmp_path / "cache" / "meshserve" / "disagg.key")
    key, created = params.create_key_file(path)
    assert created and len(key) == 32
    assert _mode(path) == 0o600 and _mode(os.path.dirname(path)) == 0o700
    assert open(path).read() == key.hex() + "\n"
    assert params.create_key_file(path) == (key, False)  # read, not made again
    assert params.read_key_file(path) == key
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]  # nothing left aside


def test_create_key_file_never_overwrites_an_existing_key(tmp_path):
    path = tmp_path / "disagg.key"
    path.write_text("ab" * 20 + "\n")
    path.chmod(0o600)
    assert params.create_key_file(str(path)) == (bytes.fromhex("ab" * 20), False)
    assert path.read_text() == "ab" * 20 + "\n"


def test_processes_racing_to_make_the_key_file_agree(tmp_path):
    path = str(tmp_path / "k" / "disagg.key")
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(params.create_key_file, [path] * 8))
    assert len({key for key, _ in results}) == 1 and sum(created for _, created in results) == 1
    assert params.read_key_file(path) == results[0][0]


@pytest.mark.parametrize("case,message", [
    ("mode 0644", "is readable or writable by others (mode 0644): chmod 600"),
    ("mode 0620", "is readable or writable by others (mode 0620): chmod 600"),
    ("symlink", "is a symbolic link"),
    ("empty", "holds no key"),
    ("short", "holds a key of 4 bytes"),
    ("folder writable by others", "is writable by others (mode 777), so they could replace the key"),
    ("a folder", "is not a regular file"),
])
def test_unsafe_or_unusable_key_files_are_refused(tmp_path, case, message):
    folder = tmp_path / "f"
    folder.mkdir(mode=0o700)
    path = folder / "disagg.key"
    path.write_text("cd" * 32)
    path.chmod(0o600)
    if case.startswith("mode"):
        path.chmod(int(case.split()[1], 8))
    elif case == "symlink":
        real = folder / "real.key"
        path.rename(real)
        path.symlink_to(real)
    elif case == "empty":
        path.write_text("\n")
    elif case == "short":
        path.write_text("0a0b0c0d")
    elif case == "folder writable by others":
        folder.chmod(0o777)
    elif case == "a folder":
        path.unlink()
        path.mkdir()
    with pytest.raises(params.KeyFileError, match=re.escape(message)) as e:
        params.read_key_file(str(path))
    assert "\n" not in str(e.value) and "cd" * 32 not in str(e.value)  # one line, and never the key
    if case != "a folder":
        with pytest.raises(params.KeyFileError, match=re.escape(message)):
            params.create_key_file(str(path))  # nor made anew over it


def test_a_sticky_shared_folder_is_fine(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o1777)  # as /tmp: others cannot replace our file there
    key, created = params.create_key_file(str(folder / "disagg.key"))
    assert created and params.read_key_file(str(folder / "disagg.key")) == key


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_a_key_file_of_another_user_is_refused(tmp_path):
    path = tmp_path / "disagg.key"
    path.write_text("cd" * 32)
    path.chmod(0o600)
    os.chown(path, 12345, 12345)
    with pytest.raises(params.KeyFileError, match="belongs to uid 12345, not to this user"):
        params.read_key_file(str(path))


def test_default_key_file_is_under_the_cache_folder(tmp_path):
    assert params.default_key_file({"XDG_CACHE_HOME": str(tmp_path)}) == str(tmp_path / "meshserve" / "disagg.key")
    home = os.path.expanduser("~")
    assert params.default_key_file({"XDG_CACHE_HOME": "relative"}) == f"{home}/.cache/meshserve/disagg.key"
    assert params.default_key_file({}) == f"{home}/.cache/meshserve/disagg.key"


def test_secret_key_reads_meshserve_secret_file(tmp_path):
    path = str(tmp_path / "disagg.key")
    key, _ = params.create_key_file(path)
    assert params.secret_key({"MESHSERVE_SECRET_FILE": path}) == key
    both = {"MESHSERVE_SECRET_FILE": path, "MESHSERVE_SECRET": "00ff" * 8}
    assert params.secret_key(both) == bytes.fromhex("00ff" * 8)  # MESHSERVE_SECRET first
    with pytest.raises(params.KeyFileError, match="MESHSERVE_SECRET_FILE.*does not exist.*MESHSERVE_SECRET"):
        params.secret_key({"MESHSERVE_SECRET_FILE": str(tmp_path / "missing.key")})


def test_server_key_file(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert params.server_key_file(None, {**env, "MESHSERVE_SECRET": "s"}) is None  # the secret is the key
    default = str(tmp_path / "cache" / "meshserve" / "disagg.key")
    assert params.server_key_file(None, env) == (default, True)  # the default file is made when missing
    assert params.server_key_file(None, env) == (default, False)
    assert _mode(default) == 0o600
    # a named file is the orchestrator's, copied: it must be there
    for secret_file, extra, flag in ((str(tmp_path / "copy.key"), {}, "--secret_file"),
                                     (None, {"MESHSERVE_SECRET_FILE": str(tmp_path / "copy.key")},
                                      "MESHSERVE_SECRET_FILE")):
        with pytest.raises(params.KeyFileError) as e:
            params.server_key_file(secret_file, {**env, **extra})
        msg = str(e.value)
        assert msg.startswith(f"no key for disaggregated serving: the key file {tmp_path / 'copy.key'} ({flag}) "
                              f"does not exist; copy the orchestrator's key file") and "MESHSERVE_SECRET" in msg
        assert "\n" not in msg and not os.path.exists(tmp_path / "copy.key")
    shutil.copy(default, tmp_path / "copy.key")
    os.chmod(tmp_path / "copy.key", 0o600)
    assert params.server_key_file(str(tmp_path / "copy.key"), env) == (str(tmp_path / "copy.key"), False)


def test_orchestrator_key(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert params.orchestrator_key(None, {**env, "MESHSERVE_SECRET": "00ff" * 8}) == (bytes.fromhex("00ff" * 8), None,
                                                                                      False)
    key, path, created = params.orchestrator_key(None, env)
    assert created and path == str(tmp_path / "meshserve" / "disagg.key") and params.read_key_file(path) == key
    assert params.orchestrator_key(None, env) == (key, path, False)
    named = str(tmp_path / "named.key")  # the orchestrator makes a named file too
    other, path2, created2 = params.orchestrator_key(named, env)
    assert (path2, created2) == (named, True) and other != key


def test_key_proof():
    challenge = "ab" * 16
    proof = params.key_proof(KEY, challenge)
    assert len(proof) == 64 and proof == params.key_proof(KEY, challenge)
    assert params.key_proof(b"y" * 32, challenge) != proof and params.key_proof(KEY, "cd" * 16) != proof
    assert KEY.hex() not in proof
    for bad in ("", "ab", "zz" * 16, "ab" * 65, None):
        assert params.key_proof(KEY, bad) is None
