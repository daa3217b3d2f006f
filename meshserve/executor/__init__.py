"""Executors: how a SchedulerOutput reaches every rank (base.py: the interface and the in-flight
depth; uniproc.py: one rank in this process; multiproc.py: rank 0 here, the others in worker
processes spawned on this host or started by a launcher). engine/setup.py picks one."""
