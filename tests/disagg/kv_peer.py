"""One side of a two-process KV transfer (test_kv_backends.py runs it, as two processes or as the two
apps of one MPMD mpirun).

    python kv_peer.py context    DIR BACKEND...   TP 2 context ranks' sources (one per backend, over
                                                  the same random bf16 caches); writes DIR/layouts.msgpack,
                                                  serves until DIR/done appears
    python kv_peer.py generation DIR BACKEND...   reads the layouts, pulls into three generation ranks
                                                  (TP 1 blocks of 32, TP 2 blocks of 16 and 8) with each
                                                  backend into zeroed caches, writes DIR/result.json:
                                                  each backend's caches equal DEFAULT's byte for byte?
                                                  and the truth?
"""
import json
import os
import sys
import time

import msgspec
import torch

from meshserve.disagg.transceiver import KvRequest, RankLayout, TransferState, create_transceiver

KEY = b"kv-peer-test-key"
LAYERS = (0, 1, 2, 3)
HEADS, DIM, N, BLOCKS = 4, 16, 300, 48
SRC_BS = 16


def truth():
    g = torch.Generator().manual_seed(1234)
    return {layer: torch.randn((2, N, HEADS, DIM), generator=g).to(torch.bfloat16) for layer in LAYERS}


def ids(bs, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randperm(BLOCKS - 1, generator=g)[:-(-N // bs)] + 1).tolist()]


def layout(heads, bs):
    return RankLayout("", "peer-model", "bfloat16", bs, LAYERS, HEADS, heads, DIM)


def slots(block_ids, bs):
    t = torch.arange(N)
    return torch.tensor(block_ids)[t // bs], t % bs


def context(out_dir, backends):
    t = truth()
    src_ids = ids(SRC_BS, 1)
    b, o = slots(src_ids[0], SRC_BS)
    sources, layouts = [], {}
    for heads in ((0, 2), (2, 4)):
        caches = []
        for layer in LAYERS:
            c = torch.zeros((2, BLOCKS, SRC_BS, 2, DIM), dtype=torch.bfloat16)
            c[:, b, o] = t[layer][:, :, heads[0]:heads[1]]
            caches.append(c)
        for name in backends:
            Source, _ = create_transceiver(name)
            s = Source(caches, layout(heads, SRC_BS), host="127.0.0.1", key=KEY, require_registered=True)
            s.register(KvRequest("ctx-peer", src_ids, N))
            sources.append(s)
            layouts.setdefault(name, []).append(s.layout)
    tmp = os.path.join(out_dir, "layouts.tmp")
    with open(tmp, "wb") as f:
        f.write(msgspec.msgpack.encode({"layouts": layouts, "src_ids": src_ids}))
    os.rename(tmp, os.path.join(out_dir, "layouts.msgpack"))
    deadline = time.monotonic() + 240
    while not os.path.exists(os.path.join(out_dir, "done")) and time.monotonic() < deadline:
        time.sleep(0.05)
    for s in sources:
        s.close()


def generation(out_dir, backends):
    for name in backends:  # MPI: MPI_Init waits for every rank of the world, the context side's too
        create_transceiver(name)
    path = os.path.join(out_dir, "layouts.msgpack")
    deadline = time.monotonic() + 240
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    info = msgspec.msgpack.decode(open(path, "rb").read(), type=dict[str, object])
    src_ids = info["src_ids"]
    req = KvRequest("ctx-peer", src_ids, N)
    t = truth()
    result = {"errors": [], "equal_to_default": {}, "equal_to_truth": {}, "bytes": {}}
    sinks = [((0, 4), 32, 2), ((0, 2), 16, 3), ((2, 4), 8, 4)]
    caches_of = {}
    try:
        for name in sorted(backends, key=lambda b: b != "DEFAULT"):  # DEFAULT (the reference) first
            _, Sink = create_transceiver(name)
            sources = [msgspec.convert(x, RankLayout) for x in info["layouts"][name]]
            for i, (heads, bs, seed) in enumerate(sinks):
                lay = layout(heads, bs)
                caches = [torch.zeros((2, BLOCKS, bs, heads[1] - heads[0], DIM), dtype=torch.bfloat16)
                          for _ in LAYERS]
                sink = Sink(caches, lay, max_tokens_in_buffer=128, key=KEY)
                dst_ids = ids(bs, seed)
                r = sink.pull(sources, req, dst_ids, 30.0)
                sink.close()
                if r.state is not TransferState.SUCCESS:
                    result["errors"].append(f"{name} sink {i}: {r.error}")
                    continue
                result["bytes"][f"{name}-{i}"] = r.bytes
                caches_of[(name, i)] = caches
                b, o = slots(dst_ids[0], bs)
                ok = all(torch.equal(c[:, b, o].view(torch.int16), t[layer][:, :, heads[0]:heads[1]].view(torch.int16))
                         for layer, c in zip(LAYERS, caches))
                result["equal_to_truth"][f"{name}-{i}"] = ok
        for (name, i), caches in caches_of.items():
            ref = caches_of.get(("DEFAULT", i))
            result["equal_to_default"][f"{name}-{i}"] = ref is not None and all(
                torch.equal(a.view(torch.uint8), d.view(torch.uint8)) for a, d in zip(caches, ref))
    finally:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
        open(os.path.join(out_dir, "done"), "w").close()


if __name__ == "__main__":
    role, out_dir, *names = sys.argv[1:]
    {"context": context, "generation": generation}[role](out_dir, names)
