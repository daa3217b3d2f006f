"""Scheduler: token and sequence budgets, chunked prefill, preemption by recompute (pure Python,
driven by a fake model that returns a fixed token)."""
from meshserve.engine.kv_cache import KVCacheManager
from meshserve.engine.kv_spec import FullAttentionSpec, SlidingWindowSpec, kv_cache_groups
from meshserve.engine.messages import ModelRunnerOutput
from meshserve.engine.request import Request, RequestStatus
from meshserve.engine.scheduler import Scheduler, SchedulerConfig
from meshserve.sampling_params import SamplingParams


def make(max_batch=8, max_tokens=64, num_blocks=64, block=4, chunked=True, reuse=True):
    kv = KVCacheManager(num_blocks, block, reuse)
    return Scheduler(SchedulerConfig(max_batch, max_tokens, 1000, chunked), kv)


def add(s, rid, n_prompt, max_tokens=4):
    r = Request(rid, list(range(3, 3 + n_prompt)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), [2], 1000)
    s.add_request(r)
    return r


def step(s, token=7):
    so = s.schedule()
    out = ModelRunnerOutput(so.step_id, [r.req_id for r in so.reqs], [token] * len(so.reqs))
    return so, s.update_from_output(so, out)


def test_token_budget_chunks_long_prompts():
    s = make(max_tokens=5)
    r = add(s, "a", 12)
    so, outs = step(s)
    assert [(x.req_id, x.num_computed_tokens, x.num_new_tokens) for x in so.reqs] == [("a", 0, 5)]
    assert outs == []  # a partial prefill samples nothing
    so, _ = step(s)
    assert so.reqs[0].num_computed_tokens == 5 and so.reqs[0].num_new_tokens == 5
    so, outs = step(s)
    assert so.reqs[0].num_new_tokens == 2 and outs[0].new_token_ids == [7]
    assert r.num_output_tokens == 1


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    s = make(max_tokens=10, chunked=False)
    add(s, "a", 6)
    add(s, "b", 6)
    so, _ = step(s)
    assert [x.req_id for x in so.reqs] == ["a"]


def test_running_requests_decode_before_new_prefills():
    s = make(max_tokens=8)
    add(s, "a", 4)
    step(s)
    add(s, "b", 20)
    so, _ = step(s)
    assert [(x.req_id, x.num_new_tokens) for x in so.reqs] == [("a", 1), ("b", 7)]


def test_max_batch_size_limits_running_sequences():
    s = make(max_batch=2)
    for i in range(4):
        add(s, str(i), 3)
    so, _ = step(s)
    assert len(so.reqs) == 2 and s.num_waiting == 2


def test_preemption_frees_the_newest_and_requeues_it_first():
    s = make(num_blocks=6, block=4)  # 5 usable blocks = 20 tokens
    a = add(s, "a", 8, max_tokens=10)
    b = add(s, "b", 8, max_tokens=10)
    step(s)  # a: 2 blocks, b: 2 blocks, 1 free
    c = add(s, "c", 9, max_tokens=2)  # queued behind the running pair
    so, _ = step(s)  # a and b both need a third block: b, the newer, is preempted
    assert s.num_preemptions == 1 and b.num_preemptions == 1 and a.num_preemptions == 0
    assert [r.req_id for r in so.reqs] == ["a"]
    # b goes back to the head of the queue, ahead of c, which was waiting before it
    assert [r.request_id for r in s.waiting] == ["b", "c"]
    so, _ = step(s)
    assert [r.req_id for r in so.reqs] == ["a", "b", "c"]  # readmitted in that order
    # everything still finishes, with the full number of tokens
    for _ in range(100):
        if not s.has_unfinished():
            break
        step(s)
    assert a.num_output_tokens == 10 and b.num_output_tokens == 10 and c.num_output_tokens == 2


def test_preempted_request_longer_than_the_budget_resumes_without_chunked_prefill():
    # whole prefills of at most 10 tokens; 7 blocks of 4 hold 28 tokens, three requests grow to 20 each
    s = make(max_tokens=10, num_blocks=8, block=4, chunked=False, reuse=False)
    reqs = [add(s, str(i), 8, max_tokens=12) for i in range(3)]
    for _ in range(200):
        if not s.has_unfinished():
            break
        so, _ = step(s)
        assert sum(r.num_new_tokens for r in so.reqs) <= 10
    assert s.num_preemptions > 0
    # the preempted request held 8 + k > 10 tokens: its recomputation went in chunks, and the queue behind it moved
    assert [r.num_output_tokens for r in reqs] == [12, 12, 12] and not s.has_unfinished()


def test_priority_policy_orders_admission_budget_and_preemption():
    """scheduling_policy "priority" (vLLM's): lower first, then arrival; a preemption takes the lowest
    priority (fcfs: the newest), and the preempted request waits behind higher priorities."""
    def sched(policy, **kw):
        kv = KVCacheManager(kw.get("num_blocks", 64), 4, False)
        return Scheduler(SchedulerConfig(kw.get("max_batch", 8), 64, 1000, True, policy=policy), kv)

    def add_p(s, rid, n, priority, max_tokens=4):
        r = Request(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), [2], 1000,
                    priority=priority)
        s.add_request(r)
        return r

    s = sched("priority", max_batch=1)
    for rid, pr in [("a", 5), ("b", 0), ("c", 5), ("d", -1)]:
        add_p(s, rid, 3, pr, max_tokens=1)
    order = []
    while s.has_unfinished():
        so, _ = step(s)
        order += [r.req_id for r in so.reqs]
    assert order == ["d", "b", "a", "c"]

    for policy, victim in [("fcfs", "high"), ("priority", "low")]:
        s = sched(policy, num_blocks=6)  # 5 usable blocks of 4
        low = add_p(s, "low", 8, 10, max_tokens=10)  # arrives first, lowest priority
        high = add_p(s, "high", 8, 0, max_tokens=10)
        step(s)  # both prefill: 2 blocks each, 1 free
        waiting = add_p(s, "mid", 2, 5, max_tokens=2)
        so, _ = step(s)  # both need a third block: one is preempted
        assert {"low": low, "high": high}[victim].num_preemptions == 1 and s.num_preemptions == 1, policy
        if policy == "priority":
            assert [r.req_id for r in so.reqs] == ["high"]
            assert [r.request_id for r in s.waiting] == ["mid", "low"]  # behind the higher priority
        for _ in range(100):
            if not s.has_unfinished():
                break
            step(s)
        assert low.num_output_tokens == high.num_output_tokens == 10 and waiting.num_output_tokens == 2


def test_finish_on_max_tokens_frees_blocks():
    s = make()
    r = add(s, "a", 3, max_tokens=2)
    step(s)
    _, outs = step(s)
    assert outs[-1].finish_reason == "length"
    assert s.kv.num_free_blocks == s.kv.num_usable_blocks and not s.has_unfinished()
    assert r.status == RequestStatus.FINISHED_LENGTH


def test_abort_frees_blocks_and_tells_workers():
    s = make()
    add(s, "a", 6)
    step(s)
    s.abort_request("a")
    assert s.kv.num_free_blocks == s.kv.num_usable_blocks
    so = s.schedule()
    assert so.finished_req_ids == ["a"]


def test_wire_sends_deltas_after_the_first_schedule():
    s = make()
    add(s, "a", 5)
    so, _ = step(s)
    first = so.reqs[0]
    assert first.sampling is not None and first.new_token_ids == list(range(3, 8))
    so, _ = step(s)
    nxt = so.reqs[0]
    assert nxt.sampling is None and nxt.new_token_ids == [7] and nxt.num_computed_tokens == 5


def test_ranks_rebuild_every_groups_table_from_the_wire():
    """Two KV groups, one with a 6-token window: the tables a rank rebuilds from the messages (the
    appended entries, nulled there by the window rule) equal the scheduler's at every step, through
    chunked prefill, preemption and resumption."""
    from meshserve.worker.input_batch import InputBatch

    groups = kv_cache_groups([FullAttentionSpec(1, 1), SlidingWindowSpec(1, 1, sliding_window=6)])
    s = Scheduler(SchedulerConfig(8, 16, 1000, True), KVCacheManager(30, 4, True, groups))
    ranks = InputBatch(4, "cpu", 320, None, groups)
    for i, n in enumerate([3, 9, 14]):
        add(s, str(i), n, max_tokens=30)
    steps = 0
    while s.has_unfinished():
        so = s.schedule()
        ranks.update(so)
        for sr in so.reqs:
            r, st = s.requests[sr.req_id], ranks.reqs[sr.req_id]
            assert st.block_ids == r.block_ids and st.group_block_ids == r.group_block_ids, sr.req_id
            assert sum(b != 0 for b in r.group_block_ids[0]) <= 16 // 4 + 2  # a chunk and the window
        s.update_from_output(so, ModelRunnerOutput(so.step_id, [r.req_id for r in so.reqs], [7] * len(so.reqs)))
        steps += 1
        assert steps < 500
    assert s.num_preemptions > 0
    assert s.kv.num_free_blocks == s.kv.num_usable_blocks
