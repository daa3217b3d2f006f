"""Routers: which server of a group (context or generation) takes a request.

The orchestrator's config names one per group (`context_servers: {router: {type: ...}}`, as
TensorRT-LLM spells it):

- `round_robin` (the default): the servers in turn.
- `load_balancing`: the server with the fewest requests in flight through this orchestrator (ties
  in turn, so an idle group still spreads).
- `kv_cache_aware`: prefix affinity. The prompt's first `max_blocks` blocks of `block_size`
  characters (token ids for a prompt of ids; chat messages as `role` + content) are hashed as a
  chain; the server that last took the longest matching chain takes the request, so requests that
  share a prefix (a system prompt, a conversation so far) find their KV blocks in that server's
  prefix cache. No match, or the match already has `max_imbalance` more requests in flight than
  the least busy server: load balancing.

A router sees only the candidates the orchestrator hands it (healthy servers not yet tried for
this request); it never blocks and never does I/O. Servers join and leave a group while the
orchestrator runs (`add` / `remove`: its /register and /unregister routes).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence


class Server:
    """One server of a group as the orchestrator sees it."""

    def __init__(self, address: str, role: str):
        self.address = address  # "host:port" as the config spells it
        self.url = address if "://" in address else f"http://{address}"
        self.role = role  # "context" or "generation"
        self.healthy = True  # until a health check or a request says otherwise
        self.seen = False  # has answered /health with a 200 once
        self.inflight = 0  # requests this orchestrator has open on it
        self.last_error: Optional[str] = None

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else f"unhealthy: {self.last_error}"
        return f"Server({self.role} {self.address}, {state}, {self.inflight} in flight)"


class Router:
    """Base: `choose(candidates, body)` picks one of `candidates` (a non-empty subset of `servers`)."""

    type = ""
    ARGS: dict = {}  # accepted router args -> (type, default, description)

    def __init__(self, servers: Sequence[Server], **args: Any):
        self.servers = list(servers)
        self.index = {id(s): i for i, s in enumerate(self.servers)}
        self.args = {name: args.get(name, default) for name, (_, default, _) in self.ARGS.items()}
        self._next = 0  # the index the next turn starts from (the one after the last chosen server)

    def choose(self, candidates: Sequence[Server], body: dict) -> Server:
        raise NotImplementedError

    def add(self, server: Server) -> None:
        """A server joined the group (the orchestrator's /register): it takes its turn after the others."""
        self.servers.append(server)
        self.index[id(server)] = len(self.servers) - 1

    def remove(self, server: Server) -> None:
        """A server left the group (/unregister): it is never chosen again."""
        i = self.index.get(id(server))
        if i is None:
            return
        del self.servers[i]
        self.index = {id(s): j for j, s in enumerate(self.servers)}
        if self._next > i:
            self._next -= 1
        self._next = self._next % len(self.servers) if self.servers else 0

    def _in_turn(self, candidates: Sequence[Server], key=None) -> Server:
        """The candidate with the smallest `key` (all equal without one), ties broken in turn: the
        first at or after the server following the last one chosen."""
        start, n = self._next, len(self.servers)

        def rank(s: Server):
            turn = (self.index[id(s)] - start) % n
            return (key(s), turn) if key is not None else turn

        chosen = min(candidates, key=rank)
        self._next = (self.index[id(chosen)] + 1) % n
        return chosen


class RoundRobinRouter(Router):
    type = "round_robin"

    def choose(self, candidates: Sequence[Server], body: dict) -> Server:
        return self._in_turn(candidates)


class LoadBalancingRouter(Router):
    type = "load_balancing"

    def choose(self, candidates: Sequence[Server], body: dict) -> Server:
        return self._in_turn(candidates, key=lambda s: s.inflight)


def prompt_key(body: dict):
    """What prefix affinity hashes: a completion's (first) prompt, str or token ids, or the chat
    messages flattened as `<role>content` (text parts of multi-part contents); None when neither."""
    prompt = body.get("prompt")
    if prompt is not None:
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
            prompt = prompt[0]  # a batch: the first prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            return prompt
        return None
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<{m.get('role', '')}>{content if isinstance(content, str) else ''}")
    return "".join(parts)


class KvCacheAwareRouter(LoadBalancingRouter):
    type = "kv_cache_aware"
    ARGS = {
        "block_size": (int, 64, "characters (token ids for a prompt of ids) per hashed block"),
        "max_blocks": (int, 64, "blocks hashed per prompt (its first block_size * max_blocks characters)"),
        "max_entries": (int, 200_000, "block hashes remembered (least recently used dropped)"),
        "max_imbalance": (int, 16, "in-flight requests the affine server may have beyond the least busy one"),
    }

    def __init__(self, servers: Sequence[Server], **args: Any):
        super().__init__(servers, **args)
        self.table: OrderedDict[int, Server] = OrderedDict()  # chain hash -> server that last took it

    def block_hashes(self, body: dict) -> list[int]:
        key = prompt_key(body)
        if not key:
            return []
        size, ids = self.args["block_size"], not isinstance(key, str)
        hashes, h = [], hash(("ids" if ids else "text",))
        for i in range(min(len(key) // size, self.args["max_blocks"])):
            block = key[i * size:(i + 1) * size]
            h = hash((h, tuple(block) if ids else block))
            hashes.append(h)
        return hashes

    def match(self, hashes: Sequence[int], candidates: Sequence[Server]) -> tuple[Optional[Server], int]:
        """The candidate that last took the longest chain of `hashes`, and how many blocks matched."""
        allowed = {id(s) for s in candidates}
        best, depth = None, 0
        for i, h in enumerate(hashes):
            s = self.table.get(h)
            if s is None:
                break
            if id(s) in allowed:
                best, depth = s, i + 1
        return best, depth

    def choose(self, candidates: Sequence[Server], body: dict) -> Server:
        hashes = self.block_hashes(body)
        best, _ = self.match(hashes, candidates)
        least = min(s.inflight for s in candidates)
        if best is None or best.inflight - least > self.args["max_imbalance"]:
            best = super().choose(candidates, body)
        self.remember(hashes, best)
        return best

    def remove(self, server: Server) -> None:
        super().remove(server)
        for h in [h for h, s in self.table.items() if s is server]:
            del self.table[h]

    def remember(self, hashes: Sequence[int], server: Server) -> None:
        for h in hashes:
            self.table[h] = server
            self.table.move_to_end(h)
        while len(self.table) > self.args["max_entries"]:
            self.table.popitem(last=False)


ROUTERS = {cls.type: cls for cls in (RoundRobinRouter, LoadBalancingRouter, KvCacheAwareRouter)}


def create_router(type: str, servers: Sequence[Server], **args: Any) -> Router:
    return ROUTERS[type](servers, **args)
