"""Scheduler, disaggregated serving: context_only requests pin their KV blocks until released or
expired; generation_only requests wait for blocks, pull their KV, then decode on from the context
server's first token (pure Python, a fake model that returns a fixed token)."""
from meshserve.disagg.transceiver import RankLayout
from meshserve.engine.kv_cache import KVCacheManager
from meshserve.engine.messages import DisaggRequest, ModelRunnerOutput
from meshserve.engine.request import Request, RequestStatus
from meshserve.engine.scheduler import Scheduler, SchedulerConfig
from meshserve.sampling_params import SamplingParams

LAYOUT = RankLayout("127.0.0.1:1", "llama-x", "float32", 4, (0, 1), 2, (0, 2), 16)


def make(num_blocks=32, block=4, max_tokens=64, reuse=True, overlap=False):
    kv = KVCacheManager(num_blocks, block, reuse)
    s = Scheduler(SchedulerConfig(8, max_tokens, 1000, True, overlap=overlap), kv)
    s.kv_timeout_s = 5.0
    return s


def ctx(s, rid, n_prompt, first=3):
    r = Request(rid, list(range(first, first + n_prompt)), SamplingParams(max_tokens=1, ignore_eos=True), [2], 1000,
                disagg=DisaggRequest("context_only"))
    s.add_request(r)
    return r


def gen(s, rid, n_prompt, first_token=9, max_tokens=4, src_blocks=([5, 6, 7],)):
    d = DisaggRequest("generation_only", ctx_request_id="ctx-" + rid, first_token=first_token, sources=[LAYOUT],
                      src_block_ids=[list(b) for b in src_blocks], src_num_tokens=n_prompt)
    r = Request(rid, list(range(3, 3 + n_prompt)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), [2], 1000,
                disagg=d)
    s.add_request(r)
    return r


def step(s, token=7):
    so = s.schedule()
    out = ModelRunnerOutput(so.step_id, [r.req_id for r in so.reqs], [token] * len(so.reqs))
    return so, s.update_from_output(so, out)


def used(s):
    return s.kv.num_usable_blocks - s.kv.num_free_blocks


def test_context_request_registers_its_blocks_pins_them_and_frees_them_on_release():
    s = make()
    ctx(s, "c", 10)
    so, outs = step(s)
    assert [(r.ctx_request_id, r.num_tokens) for r in so.kv_register] == [("c", 10)]
    blocks = so.kv_register[0].block_ids
    assert len(blocks) == 1 and len(blocks[0]) == 3  # 10 tokens in blocks of 4
    assert outs[0].finish_reason == "length" and outs[0].new_token_ids == [7]
    assert outs[0].kv_transfer_params == {"block_ids": blocks, "num_tokens": 10}
    assert not s.has_unfinished() and s.has_transfers() and "c" in s.pinned and "c" not in s.requests
    assert used(s) == 3
    assert s.unpin("c") and not s.unpin("c")
    assert used(s) == 0 and not s.has_transfers()
    ctx(s, "d", 3)
    so, _ = step(s)
    assert so.kv_unregister == ["c"]  # every rank stops serving reads before the blocks are reused


def test_chunked_context_request_registers_only_with_its_last_chunk():
    s = make(max_tokens=4)
    ctx(s, "c", 10)
    assert [step(s)[0].kv_register for _ in range(3)][:2] == [[], []]
    assert "c" in s.pinned


def test_pinned_blocks_expire_at_the_deadline():
    s = make()
    ctx(s, "c", 6)
    step(s)
    deadline = s.pinned["c"][1]
    assert s.expire_pinned(deadline - 0.01) == [] and used(s) == 2
    assert s.expire_pinned(deadline) == ["c"] and used(s) == 0
    assert s.kv_unregister == ["c"]
    # an idle engine still steps once, so every rank stops serving the freed blocks now (a late pull
    # fails), not whenever the next request comes
    assert s.has_unfinished() and not s.has_transfers()
    so, _ = step(s)
    assert so.reqs == [] and so.kv_unregister == ["c"] and not s.has_unfinished()


def test_context_request_aborted_in_flight_frees_and_unregisters():
    s = make()
    ctx(s, "c", 6)
    so = s.schedule()
    assert so.kv_register
    s.abort_request("c")
    s.update_from_output(so, ModelRunnerOutput(so.step_id, ["c"], [7]))
    assert used(s) == 0 and not s.pinned and s.kv_unregister == ["c"]


def test_pinned_prefix_blocks_keep_their_refcount_for_a_sharing_request():
    s = make()
    ctx(s, "c", 9)
    step(s)
    ctx(s, "d", 9)  # same prompt: its first two blocks come from the prefix cache
    so, _ = step(s)
    assert so.kv_register[0].block_ids[0][:2] == s.pinned["c"][0].block_ids[:2]
    assert used(s) == 4
    s.unpin("c")
    assert used(s) == 3  # the shared blocks stay with "d"
    s.unpin("d")
    assert used(s) == 0


def test_generation_request_pulls_then_decodes_from_the_first_token():
    s = make()
    r = gen(s, "g", 10, first_token=9, max_tokens=3)
    assert r.status == RequestStatus.WAITING_FOR_KV and s.has_unfinished()
    so, outs = step(s)
    assert so.reqs == [] and outs == []
    (pull,) = so.kv_pulls
    assert pull.req_id == "g" and pull.src.ctx_request_id == "ctx-g" and pull.src.block_ids == [[5, 6, 7]]
    assert pull.src.num_tokens == 10 and pull.sources == [LAYOUT] and len(pull.dst_block_ids[0]) == 3
    assert not s.has_unfinished() and s.has_transfers()
    assert step(s)[0].kv_pulls == []  # issued once
    out = s.pull_done("g", True)
    assert out.new_token_ids == [9] and out.finish_reason is None
    assert r.status == RequestStatus.RUNNING and r.num_computed_tokens == 10 and r.output_token_ids == [9]
    so, outs = step(s, token=11)
    (sr,) = so.reqs
    assert (sr.num_computed_tokens, sr.num_new_tokens) == (10, 1)
    assert sr.new_token_ids == list(range(3, 13)) + [9] and sr.new_block_ids == pull.dst_block_ids[0]
    assert sr.num_output_tokens == 1 and sr.sampling is not None
    assert outs[0].new_token_ids == [11]
    _, outs = step(s, token=12)
    assert outs[0].finish_reason == "length" and r.output_token_ids == [9, 11, 12]
    assert used(s) == 0


def test_generation_request_whose_first_token_ends_it_finishes_at_once():
    s = make()
    gen(s, "g", 5, max_tokens=1)
    step(s)
    out = s.pull_done("g", True)
    assert out.new_token_ids == [9] and out.finish_reason == "length"
    assert used(s) == 0 and not s.requests


def test_failed_pull_frees_every_block_and_reports_the_error():
    s = make()
    gen(s, "g", 10)
    step(s)
    assert used(s) == 3
    out = s.pull_done("g", False, "rank 1: connection refused")
    assert out.finish_reason == "abort" and out.error == "rank 1: connection refused"
    assert used(s) == 0 and not s.requests and not s.has_transfers()


def test_abort_while_pulling_frees_only_when_the_ranks_are_done():
    s = make()
    gen(s, "g", 10)
    step(s)
    assert s.abort_request("g") is not None
    assert used(s) == 3  # the ranks may still be writing them
    assert s.pull_done("g", True) is None and used(s) == 0 and not s.requests


def test_generation_requests_wait_for_blocks_in_arrival_order():
    s = make(num_blocks=6)  # 5 usable blocks
    gen(s, "a", 12)  # 3 blocks
    gen(s, "b", 12)
    so, _ = step(s)
    assert [p.req_id for p in so.kv_pulls] == ["a"] and len(s.kv_waiting) == 1
    assert not s.has_unfinished()  # b cannot fit: nothing to step for
    s.pull_done("a", False, "x")
    assert s.has_unfinished()
    so, _ = step(s)
    assert [p.req_id for p in so.kv_pulls] == ["b"]


def test_abort_of_a_waiting_generation_request():
    s = make(num_blocks=4)
    gen(s, "a", 12)
    gen(s, "b", 12)
    step(s)
    s.abort_request("b")
    assert not s.kv_waiting and "b" not in s.requests


def test_context_request_with_overlap_is_scheduled_once():
    s = make(overlap=True)
    ctx(s, "c", 6)
    so1 = s.schedule()
    so2 = s.schedule()  # its step is in flight: overlap must not schedule it again
    assert [r.req_id for r in so1.reqs] == ["c"] and so2.reqs == []
    outs = s.update_from_output(so1, ModelRunnerOutput(so1.step_id, ["c"], [7]))
    assert outs[0].finish_reason == "length" and "c" in s.pinned


def test_context_request_ended_by_its_first_token_keeps_no_kv():
    s = make()
    r = Request("c", list(range(3, 9)), SamplingParams(max_tokens=1), [7], 1000, disagg=DisaggRequest("context_only"))
    s.add_request(r)
    so, outs = step(s, token=7)  # the EOS: the completion is over, nothing for a generation server
    assert so.kv_register and outs[0].finish_reason == "stop" and outs[0].kv_transfer_params is None
    assert not s.pinned and used(s) == 0 and s.kv_unregister == ["c"]
