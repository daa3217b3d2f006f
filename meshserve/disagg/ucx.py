"""The UCX KV transfer backend: tcp.py's control path, tensor bytes as UCX tag messages (ucxx).

ucxx (PyPI `ucxx-cu13`, which brings `libucx-cu13`) through its synchronous core API: one UCX
context and worker per process (tag + wakeup features, a blocking progress thread), shared by every
source and sink in it. The sink's SideHello carries its worker address; a source makes one endpoint
per sink address (kept while the source lives) and `tag_send`s each chunk with the tag the sink
picked, which has posted the worker-level `tag_recv` into a staging buffer before asking
(_side.py has the protocol). UCX picks the transport: on this CPU machine tcp, shared memory or
cma. With the KV caches on a GPU each side moves GPU memory itself: the source gathers a chunk into a
GPU staging buffer and sends it from there, the sink receives into GPU memory and scatters on its
pull stream (UCX picks cuda_ipc / cuda_copy on one host, GPUDirect RDMA across hosts where the
fabric has it), so no byte crosses host memory; a side that checks or makes the payload MAC
(verify_payload) stages through pinned host memory instead, as DEFAULT does. PullResult.path says
which: "ucx_gpu" or "ucx".

A receive the sink gives up on (timeout, another context rank failed) cannot be cancelled through
ucxx's Python API: its buffer is kept aside until the request completes or the process ends, and
the source cancels its send when the sink's connection closes.

UCX_MODULES=^ib is set where there are no InfiniBand devices (nixl.prepare_ucx_env: otherwise a
process with libibverbs installed but no devices can crash at exit).
"""
from __future__ import annotations

import atexit
import threading
import time
from typing import Optional

from meshserve.disagg._side import SideKvSink, SideKvSource
from meshserve.disagg.nixl import prepare_ucx_env
from meshserve.disagg.tcp import _Fail, _one_line

_lock = threading.Lock()
_state: dict = {}


def _ucx():
    """(libucxx module, Array, worker) for this process, made once."""
    with _lock:
        if "worker" not in _state:
            prepare_ucx_env()
            from ucxx._lib import libucxx
            from ucxx._lib.arr import Array
            ctx = libucxx.UCXContext({}, feature_flags=(libucxx.Feature.TAG, libucxx.Feature.WAKEUP))
            worker = libucxx.UCXWorker(ctx, enable_delayed_submission=False)
            worker.start_progress_thread(polling_mode=False, epoll_timeout=-1)
            atexit.register(_stop)
            _state.update(lib=libucxx, Array=Array, ctx=ctx, worker=worker,
                          address=libucxx.UCXAddress.create_from_worker(worker).tobytes())
        return _state["lib"], _state["Array"], _state["worker"]


def _stop() -> None:
    worker = _state.get("worker")
    if worker is not None:
        try:
            worker.stop_progress_thread()
        except Exception:  # noqa: BLE001 - exiting
            pass


def available() -> Optional[str]:
    """None when UCX (ucxx) can be used here, else why not (one line)."""
    try:
        _ucx()
    except ImportError as e:
        return _one_line(f"the UCX backend needs the ucxx-cu13 wheel (pip install ucxx-cu13): {e}")
    except Exception as e:  # noqa: BLE001 - UCX failing to start is reported, not raised
        return _one_line(f"UCX could not be started: {type(e).__name__}: {e}")
    return None


class _Recv:
    def __init__(self, req, keep):
        self.req = req
        self.keep = keep  # the buffer: alive until the request is done
        self.done = False

    def test(self) -> bool:
        if not self.done and self.req.completed:
            self.done = True
            self.req.check_error()
        return self.done

    def cancel(self) -> None:
        if not self.done:
            with _lock:
                _abandoned.append(self)
            _prune()


_abandoned: list[_Recv] = []


def _prune() -> None:
    with _lock:
        _abandoned[:] = [r for r in _abandoned if not r.req.completed]


class UcxKvSource(SideKvSource):
    DEVICE_BUFFERS = True  # UCX moves GPU memory itself (cuda_copy / cuda_ipc; GPUDirect RDMA across hosts)

    def __init__(self, *args, **kwargs):
        why = available()
        if why:
            raise ValueError(why)
        self._eps: dict[bytes, object] = {}
        self._ep_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _local_info(self) -> bytes:
        _ucx()
        return _state["address"]

    def _peer(self, info: bytes):
        lib, _, worker = _ucx()
        with self._ep_lock:
            ep = self._eps.get(info)
            if ep is None or not ep.alive:
                try:
                    address = lib.UCXAddress.create_from_buffer(bytes(info))
                    ep = lib.UCXEndpoint.create_from_worker_address(worker, address, True)
                except Exception as e:  # noqa: BLE001 - a bad address from the sink
                    raise ValueError(f"cannot reach the generation rank's UCX worker: {type(e).__name__}: {e}") \
                        from None
                self._eps[info] = ep
            return ep

    def _send(self, ep, tag: int, view, alive) -> None:
        lib, Array, _ = _ucx()
        req = ep.tag_send(Array(view), lib.UCXXTag(tag))
        delay = 0.0001
        while not req.completed:
            if not alive():
                return  # the sink gave up; UCX drops the request with the endpoint at close
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
        req.check_error()

    def close(self) -> None:
        super().close()
        with self._ep_lock:
            eps, self._eps = list(self._eps.values()), {}
        for ep in eps:
            try:
                ep.close()
            except Exception:  # noqa: BLE001
                pass


class UcxKvSink(SideKvSink):
    DEVICE_BUFFERS = True
    CHANNEL = "ucx"

    def __init__(self, *args, **kwargs):
        why = available()
        if why:
            raise ValueError(why)
        super().__init__(*args, **kwargs)

    def _local_info(self) -> bytes:
        _ucx()
        return _state["address"]

    def _peer(self, info: bytes, ep: str):
        return None  # receives are worker-level: the tag picks the message

    def _post_recv(self, peer, tag: int, view) -> _Recv:
        lib, Array, worker = _ucx()
        _prune()
        try:
            return _Recv(worker.tag_recv(Array(view), lib.UCXXTag(tag)), view)
        except Exception as e:  # noqa: BLE001
            raise _Fail(f"UCX could not post a receive: {type(e).__name__}: {e}") from None

    def _pull_items(self, conn, source, items, src, dst_block_ids, abort, progress) -> str:
        try:
            return super()._pull_items(conn, source, items, src, dst_block_ids, abort, progress)
        except _Fail:
            raise
        except Exception as e:  # noqa: BLE001 - ucxx's own errors (UCXError...) end the pull
            if type(e).__module__.startswith("ucxx"):
                raise _Fail(f"UCX transfer from context rank {source.endpoint} failed: {type(e).__name__}: {e}") \
                    from None
            raise
