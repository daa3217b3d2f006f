"""The MPI KV transfer backend: tcp.py's control path, tensor bytes as MPI messages (mpi4py).

Only when every process of both servers was started by one `mpirun` (MPMD:
`mpirun -np 1 meshserve serve ... : -np 1 meshserve serve ...`), so that they share
MPI_COMM_WORLD: the source `Isend`s each chunk to the sink's world rank with a tag the sink picked,
which has posted the matching `Irecv` (_side.py has the protocol). The SideHello carries each side's
world rank and job (PMIX_NAMESPACE / OMPI_MCA_ess_base_jobid and the world size): a context rank of
another mpirun fails the pull with one line. Asked for outside an mpirun world, `create_transceiver`
refuses MPI naming the alternatives.

Which process calls MPI_Init: Open MPI 4.1 lets exactly one process per mpirun rank initialize,
the launched one or any process it started (a second one aborts in MPI_Init with "orte_ess_init
failed"). `available()` therefore never initializes MPI (the API server of `meshserve serve` runs
it, through check_backend); `init()` does, which `create_transceiver("MPI")` and every source and
sink call, in the process that holds the KV cache: the engine process under `meshserve serve`
(rank 0, spawned by the API server, which never touches MPI), or the worker rank mpirun started
(ranks > 0). Worker ranks the engine would spawn itself would share its mpirun rank, so
engine/setup.py refuses MPI for a tp x pp world that mpirun did not start rank by rank.

MPI needs MPI_THREAD_MULTIPLE (mpi4py asks for it by default; Open MPI 4.1 gives it): sources send
from their connection threads while sinks receive from their pull threads. MPI is not fault
tolerant: a rank that dies usually takes the job down; a timeout cancels this side's receive.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import msgspec

from meshserve.disagg._side import SideKvSink, SideKvSource, next_tag
from meshserve.disagg.tcp import _Fail

logger = logging.getLogger(__name__)

_WORLD_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def in_mpi_world(env=os.environ) -> bool:
    """This process was started by mpirun (or another MPI launcher)."""
    return any(v in env for v in _WORLD_VARS)


def _job(env=os.environ) -> str:
    return env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid") or env.get("PMI_JOBID", "")


_MPI = None


def mpi():
    """mpi4py's MPI module (initialized with MPI_THREAD_MULTIPLE), or an ImportError / RuntimeError."""
    global _MPI
    if _MPI is None:
        import mpi4py
        mpi4py.rc.thread_level = "multiple"
        from mpi4py import MPI
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(f"the MPI library gives thread level {MPI.Query_thread()}, the MPI backend needs "
                               f"MPI_THREAD_MULTIPLE ({MPI.THREAD_MULTIPLE})")
        _MPI = MPI
        logger.info("MPI initialized in process %d: world rank %d of %d (job %s)", os.getpid(),
                    MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), _job() or "?")
    return _MPI


def available() -> Optional[str]:
    """None when MPI can be used here, else why not (one line). Never initializes MPI: under
    `meshserve serve` this check runs in the API server process too, and Open MPI lets one process
    per mpirun rank call MPI_Init (a second one aborts in it with "orte_ess_init failed"). That one
    is the process that holds the KV cache and makes the first MpiKvSource / MpiKvSink: the engine
    process (rank 0), which the API server spawned, or a worker rank mpirun started."""
    if not in_mpi_world():
        return ("the MPI backend needs both servers started in one mpirun (MPMD: `mpirun -np N meshserve "
                "serve ... : -np M meshserve serve ...`); this process was not started by mpirun")
    try:
        import mpi4py  # noqa: F401 - the package only: `mpi4py.MPI` would initialize MPI
    except ImportError as e:
        return f"the MPI backend needs mpi4py (pip install mpi4py) and an MPI library: {e}"
    return None


def init() -> None:
    """Initialize MPI in this process (the one holding the KV cache); a ValueError of one line."""
    why = available()
    if why:
        raise ValueError(why)
    try:
        mpi()
    except ImportError as e:
        raise ValueError(f"the MPI backend needs mpi4py (pip install mpi4py) and an MPI library: {e}") from None
    except Exception as e:  # noqa: BLE001 - MPI_Init failing is reported, not raised as is
        raise ValueError(f"MPI could not be initialized: {type(e).__name__}: {e}") from None


class _World(msgspec.Struct):
    rank: int
    size: int
    job: str


def _info() -> bytes:
    comm = mpi().COMM_WORLD
    return msgspec.msgpack.encode(_World(comm.Get_rank(), comm.Get_size(), _job()))


def _decode(info: bytes) -> _World:
    return msgspec.msgpack.decode(info, type=_World)


def _peer_rank(info: bytes, peer_name: str, me: str, error) -> int:
    """The other side's world rank from its SideHello info; `error` (ValueError on the source,
    _Fail on the sink) when it is malformed or in another MPI world."""
    try:
        peer = _decode(info)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise error(f"{peer_name} sent a malformed MPI address ({e})") from None
    mine = _decode(_info())
    if (peer.job, peer.size) != (mine.job, mine.size) or not 0 <= peer.rank < mine.size:
        raise error(f"{peer_name} is in another MPI world (job {peer.job!r} of {peer.size} ranks; {me}: job "
                    f"{mine.job!r} of {mine.size}): the MPI backend needs both servers in one mpirun")
    return peer.rank


class _Recv:
    def __init__(self, req):
        self.req = req
        self.done = False

    def test(self) -> bool:
        if not self.done:
            self.done = bool(self.req.Test())
        return self.done

    def cancel(self) -> None:
        if not self.done:
            _cancel(self.req, self)
            self.done = True


_abandoned: list = []  # (request, buffer) that could not be cancelled: kept alive, never reused


def _cancel(req, keep, wait_s: float = 1.0) -> None:
    """Cancel a request; one that does not end within wait_s is abandoned (its buffer kept)."""
    req.Cancel()
    end = time.monotonic() + wait_s
    while not req.Test():
        if time.monotonic() > end:
            _abandoned.append((req, keep))
            return
        time.sleep(0.001)


class MpiKvSource(SideKvSource):
    def __init__(self, *args, **kwargs):
        init()
        super().__init__(*args, **kwargs)

    def _local_info(self) -> bytes:
        return _info()

    def _peer(self, info: bytes) -> int:
        return _peer_rank(info, "the generation rank", "this context rank", ValueError)

    def _send(self, peer: int, tag: int, view: memoryview, alive) -> None:
        MPI = mpi()
        req = MPI.COMM_WORLD.Isend([view, MPI.BYTE], dest=peer, tag=tag)
        delay = 0.0001
        while not req.Test():
            if not alive():
                _cancel(req, view)
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.002)


class MpiKvSink(SideKvSink):
    CHANNEL = "mpi"  # host buffers (pinned with GPU caches): CUDA-aware MPI is not assumed

    def __init__(self, *args, **kwargs):
        init()
        super().__init__(*args, **kwargs)

    def _tag(self) -> int:
        MPI = mpi()
        ub = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB) or 32767
        return next_tag(min(ub, 1 << 22))

    def _local_info(self) -> bytes:
        return _info()

    def _peer(self, info: bytes, ep: str) -> int:
        return _peer_rank(info, f"context rank {ep}", "this generation rank", _Fail)

    def _post_recv(self, peer: int, tag: int, view: memoryview) -> _Recv:
        MPI = mpi()
        return _Recv(MPI.COMM_WORLD.Irecv([view, MPI.BYTE], source=peer, tag=tag))
