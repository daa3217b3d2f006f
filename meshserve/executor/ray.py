"""RayExecutor: `orchestrator_type="ray"`, the worker ranks as Ray actors (TensorRT-LLM's Ray
orchestrator, the seed's way around a missing MPI).

Rank 0 stays in the engine process, as with the other executors; ranks 1..N-1 are one Ray actor
each, placed by Ray (a placement group of one bundle per rank, bundle 0 on this node for rank 0; a
GPU per bundle on CUDA), so a job spans the nodes of a Ray cluster without mpirun or srun. An actor
checks in with rank 0's store and serves rank 0 exactly as a spawned process does
(worker/main.py `check_in`, worker/worker.py `run_worker`); the control channel and the tensors are
the ones of the multi-process executor (HMAC-signed msgspec over ZMQ, torch.distributed), Ray only
starts, places and watches the ranks (its task arguments are one JSON string).

`RAY_ADDRESS` set (or `ray.init` called by the user first): the job joins that cluster; rank 0 is
reached at this node's address. Otherwise a local Ray instance is started for the job (no dashboard)
and stopped with it; everything stays on loopback. On CPU several actors share the host's cores.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from meshserve.config import LlmArgs
from meshserve.distributed.launch import LaunchInfo
from meshserve.executor.multiproc import MultiProcExecutor
from meshserve.worker.worker import RankSpec

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 300.0  # Ray must find room for every rank within this


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("orchestrator_type='ray' needs the ray package (pip install 'ray>=2.40'); alternatives: "
                         "None (ranks spawned on this host, or taken from torchrun/mpirun/srun)") from None
    return ray


class RankActor:
    """One worker rank inside a Ray actor (decorated with ray.remote at spawn time)."""

    def pid(self) -> int:
        return os.getpid()

    def gpu_ids(self) -> list:
        import ray
        return [int(g) for g in ray.get_gpu_ids()]

    def run(self, spec_json: str) -> int:
        from meshserve.worker.main import check_in
        from meshserve.worker.worker import run_worker
        spec = RankSpec.from_json(spec_json)
        return run_worker(spec, check_in(spec))


class RayRank:
    """A rank's actor seen as the multi-process executor sees a child process (exitcode, pid, join,
    is_alive, kill)."""

    def __init__(self, ray, actor, spec_json: str):
        self.ray, self.actor = ray, actor
        self.pid = ray.get(actor.pid.remote())  # before run: an actor runs its calls one at a time
        self.ref = actor.run.remote(spec_json)
        self._code: Optional[int] = None

    @property
    def exitcode(self) -> Optional[int]:
        if self._code is None:
            ready, _ = self.ray.wait([self.ref], timeout=0)
            if ready:
                try:
                    self._code = int(self.ray.get(self.ref))
                except Exception:  # noqa: BLE001 - the actor died (killed, out of memory, node lost)
                    self._code = -9
        return self._code

    def join(self, timeout: Optional[float] = None) -> None:
        self.ray.wait([self.ref], timeout=timeout)

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        try:
            self.ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


class RayExecutor(MultiProcExecutor):
    def __init__(self, args: LlmArgs, model_path: str, launch: Optional[LaunchInfo], device_type: str,
                 world_size: int, log_level: str = "WARNING"):
        if launch is not None:
            raise ValueError(f"orchestrator_type='ray' with ranks started by {launch.launcher}: Ray starts the "
                             f"worker ranks itself; run one process (no launcher), or drop orchestrator_type")
        ray = self.ray = import_ray()
        self._own_ray = not ray.is_initialized()
        self.device_type = device_type
        self.pg = None
        self._driver_gpu = 0
        if self._own_ray:
            address = os.environ.get("RAY_ADDRESS")
            kwargs = {} if address else {"num_cpus": max(world_size, os.cpu_count() or 1)}
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=True, **kwargs)
        try:
            self._place(world_size)
            super().__init__(args, model_path, None, device_type, world_size, log_level)
        except BaseException:
            self._stop_ray()
            raise

    # ---- placement -------------------------------------------------------------------------------
    def _single_node(self) -> bool:
        return len([n for n in self.ray.nodes() if n.get("Alive")]) <= 1

    def _place(self, world_size: int) -> None:
        """A placement group of one bundle per rank (a GPU each on CUDA), bundle 0 on this node:
        the GPU Ray gives it is the one rank 0 uses here, so no actor is put on it."""
        if world_size <= 1:
            return
        from ray.util.placement_group import placement_group
        here = self.ray.util.get_node_ip_address()
        unit = {"GPU": 1} if self.device_type == "cuda" else {"CPU": 1}  # a CPU rank keeps a core busy
        bundles = [{**unit, f"node:{here}": 0.001}] + [dict(unit) for _ in range(world_size - 1)]
        self.pg = placement_group(bundles, strategy="PACK")
        ready, _ = self.ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise RuntimeError(f"Ray found no room for {world_size} ranks ({unit} each) within "
                               f"{PLACEMENT_TIMEOUT_S:.0f} s; ray status shows the cluster's resources")
        if self.device_type == "cuda":  # which GPU of this node bundle 0 reserved
            probe = self._actor_class().options(**self._in_bundle(0)).remote()
            self._driver_gpu = self.ray.get(probe.gpu_ids.remote())[0]
            self.ray.kill(probe)

    def _in_bundle(self, index: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index)}

    def _actor_class(self):
        gpus = 1 if self.device_type == "cuda" else 0
        return self.ray.remote(num_cpus=0 if gpus else 1, num_gpus=gpus, max_restarts=0,
                               max_task_retries=0)(RankActor)

    # ---- MultiProcExecutor hooks ------------------------------------------------------------------------
    def _check_world(self, args, device_type, launch, world) -> None:
        pass  # the placement group found room for every rank (or failed naming the shortfall)

    def _driver_local_rank(self) -> int:
        return self._driver_gpu

    def _rendezvous_addr(self) -> str:
        return "127.0.0.1" if self._single_node() else self.ray.util.get_node_ip_address()

    def _spawn(self, args: LlmArgs, model_path: str, addr: str, port: int, key: bytes, log_level: str) -> None:
        actor_cls = self._actor_class()
        cuda = self.device_type == "cuda"
        for rank in range(1, self.world_size):
            # an actor sees only its own GPU (CUDA_VISIBLE_DEVICES set by Ray): device index 0
            spec = RankSpec(rank, self.world_size, 0 if cuda else rank, addr, port, args.model_dump(), model_path,
                            key.hex(), log_level=log_level)
            actor = actor_cls.options(name=f"meshserve-rank{rank}-{os.getpid()}", **self._in_bundle(rank)).remote()
            self.procs[rank] = RayRank(self.ray, actor, spec.to_json())

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            for p in self.procs.values():
                p.kill()  # the actor's process holds its process groups: end it
            self._stop_ray()

    def _stop_ray(self) -> None:
        if self.pg is not None:
            try:
                from ray.util.placement_group import remove_placement_group
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - the cluster is going away
                pass
            self.pg = None
        if self._own_ray and self.ray.is_initialized():
            self.ray.shutdown()
