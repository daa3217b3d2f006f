"""The engine process started before its work is known, so its imports overlap the front's.

`meshserve serve` calls `prestart_engine_process()` first thing: a spawned process imports torch and the
engine's modules (~4 s on a small CPU) while the front checks its arguments, resolves the model and
imports its own; `AsyncEngine.start` then hands it the work (`take_prestarted`) instead of spawning one,
and it runs `core_proc.run_engine_process` as a freshly spawned one would. The work order travels as JSON
over a one-way pipe. This module imports no torch (the point is that the front has not yet).
"""
from __future__ import annotations

import importlib
import json
import logging
import multiprocessing
import os
import signal
from typing import Optional

from meshserve.engine import core_proc

logger = logging.getLogger(__name__)

# What every engine process imports before it can load a model (torch alone is ~4 s on a small CPU).
PRELOAD_MODULES = ("torch", "meshserve.config", "meshserve.engine.setup", "meshserve.engine.engine_core")


def _run_prestarted(orders, log_level: str = "INFO") -> None:
    """Entry point of an engine process started before its work is known (`meshserve serve` starts it
    first thing, prestart_engine_process): it imports what every engine needs while the front
    checks its arguments and imports its own modules, then waits for the work order on `orders` (a
    one-way pipe from the front: JSON bytes, never pickle) and runs it as `run_engine_process` would.
    The front closing the pipe without an order (a refused setting, its exit) ends it quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as run_engine_process: the front owns Ctrl-C
    signal.signal(signal.SIGTERM, core_proc._exit_on_signal)  # exits cleanly while importing
    for name in PRELOAD_MODULES:
        importlib.import_module(name)
    try:
        order = json.loads(orders.recv_bytes())
    except (EOFError, OSError):
        raise SystemExit(0) from None
    finally:
        orders.close()
    os.environ.clear()  # the front's environment when it gave the order (import-time keys are unchanged)
    os.environ.update(order["env"])
    core_proc.run_engine_process(order["args_json"], order["model_path"], order["input_addr"],
                                 order["output_addr"], order["parent_pid"], order.get("log_level", log_level),
                                 order.get("tokenizer_path"))


# Environment keys the front may set after prestarting the engine process: read by the engine at run time,
# not when modules are imported, so the order's environment carries them.
_LATE_ENV_KEYS = frozenset({"MESHSERVE_SECRET_FILE"})
_prestarted: Optional[tuple] = None  # (process, the order pipe's sending end, the environment it started with)


def prestart_engine_process(log_level: str = "INFO") -> None:
    """Start the engine process now, before its work is known: it imports torch and the engine's modules
    (PRELOAD_MODULES, ~4 s on a small CPU) while this process checks its arguments, resolves the
    model and imports its own; `AsyncEngine.start` then hands it the work instead of spawning one. If no
    engine starts (a refused setting), or this process's environment changed in a key read at import
    time, it is stopped: at exit, or when `start` spawns a fresh one."""
    global _prestarted
    if _prestarted is not None:
        return
    import atexit

    mp = multiprocessing.get_context("spawn")
    recv, send = mp.Pipe(duplex=False)  # an os.pipe: JSON one way, nothing to unpickle from it
    proc = mp.Process(target=_run_prestarted, name="meshserve-engine", args=(recv, log_level))
    proc.start()
    recv.close()
    _prestarted = (proc, send, dict(os.environ))
    atexit.register(drop_prestarted)  # before multiprocessing's own exit hook joins its children


def drop_prestarted() -> None:
    """Stop a prestarted engine process no engine took: closing the pipe ends it (it may still be importing,
    hence the SIGTERM)."""
    global _prestarted
    if _prestarted is None:
        return
    proc, send, _ = _prestarted
    _prestarted = None
    send.close()
    if proc.is_alive():
        proc.terminate()
    proc.join(10)


def take_prestarted(order: dict):
    """The prestarted engine process, given `order`; None when there is none to take (or it cannot be
    used: it died, or an import-time environment key changed since it started)."""
    global _prestarted
    if _prestarted is None:
        return None
    proc, send, env = _prestarted
    now = dict(os.environ)
    changed = {k for k in env.keys() | now.keys() if env.get(k) != now.get(k)} - _LATE_ENV_KEYS
    if changed or not proc.is_alive():
        logger.debug("not using the prestarted engine process (%s)",
                     f"environment changed: {sorted(changed)}" if changed else "it exited")
        drop_prestarted()
        return None
    _prestarted = None
    try:
        send.send_bytes(json.dumps(dict(order, env=now)).encode())
    except OSError:  # it died since is_alive()
        send.close()
        proc.join(1)
        return None
    send.close()
    return proc
