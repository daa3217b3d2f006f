"""Timing of GPU work for the kernel benchmarks: capture `fn` once in a CUDA graph and time its
replays with CUDA events, so launch overhead and the host are out of the figure, as in a decode
step's graph."""


def graph_seconds(fn, reps: int = 50) -> float:
    """Seconds per replay of a CUDA graph of fn() (warmed up once, eagerly and as a graph)."""
    import torch

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps
