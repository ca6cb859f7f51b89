"""The page allocator (`pages.PagePool`) and the scheduler's bookkeeping, without a model: reference counts,
the prefix cache's keys and LRU eviction, the token budget, the step arrays, and preemption that never
holds more pages than there are and never drops a request."""

import collections

import numpy as np
import pytest

from mixtral_jax.inference.pages import PagePool, page_keys
from mixtral_jax.inference.sampling import SamplingParams
from mixtral_jax.inference.scheduler import Request, Scheduler, step_tokens, table_width


def test_pool_hands_out_every_page_once_and_takes_them_back():
    pool = PagePool(3)
    pages = [pool.allocate() for _ in range(3)]
    assert sorted(pages) == [0, 1, 2] and pool.allocate() is None and pool.available == 0
    pool.release(pages[1])
    assert pool.available == 1 and pool.allocate() == pages[1]
    pool.release(pages[0])
    with pytest.raises(ValueError, match="not held"):
        pool.release(pages[0])


def test_keys_name_the_whole_prefix():
    a = page_keys(list(range(10)), 4)
    assert len(a) == 2  # the partial third page has none
    assert page_keys(list(range(8)), 4) == a
    other_start = page_keys([99] + list(range(1, 10)), 4)
    assert other_start[0] != a[0] and other_start[1] != a[1]  # same second page's tokens, other prefix
    assert page_keys(list(range(4, 8)), 4, parent=a[0]) == a[1:]  # a chain extends from its last key


def test_cached_pages_are_shared_counted_and_evicted_least_recently_used_first():
    pool = PagePool(4)
    keys = page_keys(list(range(12)), 4)
    held = [pool.allocate() for _ in range(3)]
    for page, key in zip(held, keys):
        pool.register(page, key)
    assert pool.take(keys) == held and [pool.refs(p) for p in held] == [2, 2, 2]
    for page in held:  # both holders let go: the pages stay cached, idle
        pool.release(page)
        pool.release(page)
    assert pool.available == 4 and pool.cached == 3 and pool.match(keys) == 3
    assert pool.allocate() not in held  # a never-used page goes before any cached one
    assert pool.allocate() == held[0]  # then the least recently let go: its key is forgotten
    assert pool.match(keys) == 0 and pool.match(keys[1:]) == 2
    assert pool.take(keys[1:]) == held[1:] and pool.available == 0
    pool.release(held[2])
    assert pool.allocate() == held[2] and pool.match(keys[1:]) == 1


def test_a_second_page_with_a_cached_prefix_stays_private():
    pool = PagePool(2)
    (key,) = page_keys([5, 6], 2)
    first, second = pool.allocate(), pool.allocate()
    pool.register(first, key)
    pool.register(second, key)
    pool.release(second)  # freed, not cached
    assert pool.cached == 1 and pool.allocate() == second


def test_step_shapes_are_powers_of_two():
    assert [step_tokens(n, 64) for n in (0, 1, 4, 5, 17, 64, 100)] == [4, 4, 4, 8, 32, 64, 64]
    assert [table_width(n, 24) for n in (1, 4, 5, 9, 24)] == [4, 4, 8, 16, 24]


def _request(prompt, max_tokens, **params):
    return Request(list(prompt), SamplingParams(max_tokens=max_tokens, stop_tokens=(), **params),
                   lambda t: None, lambda r: None)


def _drive(sched: Scheduler, waiting: collections.deque, max_steps=500, check=None):
    """Run the scheduler as the engine does, the device replaced by 'the next token is (position * 7) % 50'
    and read back at once. Returns the plans."""
    plans = []
    for _ in range(max_steps):
        if not waiting and not sched.seqs:
            return plans
        plan, _ = sched.plan(waiting)
        if plan is None:
            continue
        plans.append(plan)
        for _, r in plan.emits:
            r.history.append(len(r.history) * 7 % 50)
        if check:
            check(sched, plan)
    raise AssertionError("the scheduler did not finish")


def _check_arrays(sched: Scheduler, plan):
    """Every step: within budget and page pools; each sequence's tokens contiguous, written where its page
    table says, and its kv length the end of its block."""
    ps = sched.page_size
    assert all(p.held <= p.num_pages for p in sched.pools)
    for s in range(sched.shards):
        n = plan.num_seqs[s]
        cu = plan.cu_q_lens[s]
        assert cu[n] <= sched.budget and (plan.rows[s, cu[n]:] == -1).all()
        for i in range(n):
            lo, hi = cu[i], cu[i + 1]
            pos = plan.positions[s, lo:hi]
            assert (np.diff(pos) == 1).all() and pos[-1] == plan.kv_lens[s, i] - 1
            table = plan.page_indices[s, i]
            np.testing.assert_array_equal(plan.slot_mapping[s, lo:hi], table[pos // ps] * ps + pos % ps)
            assert len(set(plan.rows[s, lo:hi])) == 1 and plan.rows[s, lo] // sched.rows == s


def test_budget_decodes_first_then_prefill_chunks():
    sched = Scheduler(shards=1, rows=4, pages=64, page_size=4, pages_per_seq=16, budget=16)
    waiting = collections.deque([_request(range(1, 30), 5), _request(range(1, 3), 5), _request(range(3, 9), 5)])
    plans = _drive(sched, waiting, check=_check_arrays)
    first = plans[0]
    assert first.num_seqs[0] == 1 and first.cu_q_lens[0, 1] == 16  # the long prompt takes the whole budget
    second = plans[1]  # 13 more of it, then 2 of the next prompt, which is complete and draws
    assert second.cu_q_lens[0, :4].tolist() == [0, 13, 15, 16] and len(second.emits) == 2
    assert all(r.n_sampled == 5 and len(r.history) == len(r.prompt) + 5 for r in (r for p in plans for _, r in p.emits))


def test_preemption_when_pages_run_out_never_drops_a_request():
    sched = Scheduler(shards=2, rows=3, pages=6, page_size=4, pages_per_seq=6, budget=8)
    requests = [_request(range(i, i + 3 + i % 5), 12) for i in range(10)]
    waiting = collections.deque(requests)
    _drive(sched, waiting, check=_check_arrays)
    assert sched.preemptions > 0 and all(p.held == 0 for p in sched.pools)
    for r in requests:  # every token of every request was drawn once, in order, whatever the preemptions
        assert r.n_sampled == 12 and r.history[len(r.prompt):] == [i * 7 % 50 for i in range(len(r.prompt),
                                                                                            len(r.prompt) + 12)]


def test_preempted_requests_come_back_first_and_the_youngest_goes():
    sched = Scheduler(shards=1, rows=2, pages=5, page_size=2, pages_per_seq=5, budget=4)
    old, young, later = _request([1, 2, 3], 6), _request([4, 5, 6], 6), _request([7], 2)
    waiting = collections.deque([old, young, later])
    for _ in range(10):
        plan, _ = sched.plan(waiting)
        for _, r in plan.emits:
            r.history.append(9)
        if sched.preemptions:
            break
    assert young.preemptions == 1 and old.preemptions == 0 and waiting[0] is young


def test_prefix_pages_are_shared_within_a_shard_and_the_second_request_waits_for_the_first():
    """Three requests with one 20-token prompt (n = 3): the first prefills it; the others wait for its pages
    and then prefill only the last token (the pages before it are cached)."""
    sched = Scheduler(shards=2, rows=4, pages=32, page_size=4, pages_per_seq=8, budget=16)
    prompt = list(range(3, 23))
    requests = [_request(prompt, 4) for _ in range(3)]
    plans = _drive(sched, collections.deque(requests), check=_check_arrays)
    prefilled = [sum(int((p.rows == q).sum()) for p in plans) for q in range(8)]
    assert sched.prefix_hit_tokens == 2 * 16  # 4 full pages before the last prompt token, twice
    assert sorted(prefilled, reverse=True)[:3] == [20 + 3, 4 + 3, 4 + 3]  # prompt (or its last page) + 3 decodes
    assert len({r.history[len(prompt):] == requests[0].history[len(prompt):] for r in requests}) == 1


def test_penalised_requests_prefill_their_whole_prompt():
    sched = Scheduler(shards=1, rows=2, pages=32, page_size=4, pages_per_seq=8, budget=16)
    prompt = list(range(3, 23))
    first, penalised = _request(prompt, 2), _request(prompt, 2, presence_penalty=0.5)
    _drive(sched, collections.deque([first, penalised]))
    assert sched.prefix_hit_tokens == 0
