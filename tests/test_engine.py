"""The block-diffusion engine: the dLLM-Var algorithm, stopping, batching, sampling, lifecycle."""

import collections
import copy
import random

import pytest
import torch

import dllm
from dllm import GenerationConfig
from dllm.engine import PREEMPTION_MODES, Phase, cuda_graphs
from reference_llada import ReferenceLLaDA

B = 8
# The paper's decoding (stop tokens committed by confidence like any other), which the plain
# implementations below write out; stops_last has its own tests.
CFG = GenerationConfig(block_size=B, threshold=0.9, max_new_tokens=48, stops_last=False)


def _prompts(n=6):
    g = torch.Generator().manual_seed(11)
    lengths = (3, 5, 8, 11, 13, 4, 9, 17, 6, 10, 7, 12, 15, 5)
    return [torch.randint(7, 40, (length,), generator=g).tolist() for length in lengths[:n]]


def threshold_decode(block: list[int], logits: torch.Tensor, mask: int, threshold: float) -> None:
    """The threshold rule on a Python list: commit every masked position with confidence >= threshold,
    and the most confident one."""
    logits = logits.clone()
    logits[:, mask] = float("-inf")
    conf, x = torch.softmax(logits, -1).max(-1)
    masked = [i for i, t in enumerate(block) if t == mask]
    best = max(masked, key=lambda i: conf[i])
    for i in {i for i in masked if conf[i] >= threshold} | {best}:
        block[i] = int(x[i])


def finished_answer(generated, block, stops, cap, forwards):
    """(tokens, finish reason, forwards) if this finished block ends the answer, else None."""
    cut = next((i for i, t in enumerate(block) if t in stops), None)
    if cut is not None:
        return generated + block[:cut], "stop", forwards
    if len(generated) + len(block) >= cap:
        return (generated + block)[:cap], "length", forwards
    return None


def keep(kv, n):
    """The first n positions of a reference K/V cache."""
    return [(k[:, :n], v[:, :n]) for k, v in kv]


def reference_generate(ref: ReferenceLLaDA, prompt, cfg, commit_pass=True):
    """dLLM-Var block diffusion written out plainly for one request: a list-of-tensors cache, a
    Python threshold rule. Returns (tokens cut at the first stop token, finish reason, forwards)."""
    mask, stops = cfg_ids(ref)
    b = cfg.block_size

    def decode(block, logits):
        threshold_decode(block, logits, mask, cfg.threshold)

    block = [mask] * b
    logits, kv = ref.forward(torch.tensor(prompt + block))
    past, forwards = keep(kv, len(prompt)), 1
    decode(block, logits[-b:])
    generated = []
    while True:
        while mask in block:
            logits, kv = ref.forward(torch.tensor(block), past=past)
            forwards += 1
            decode(block, logits)
        result = finished_answer(generated, block, stops, cfg.max_new_tokens, forwards)
        if result:
            return result
        generated += block
        past_len = past[0][0].shape[1]
        if commit_pass:
            logits, kv = ref.forward(torch.tensor(block + [mask] * b), past=past)
            forwards += 1
            past, block = keep(kv, past_len + b), [mask] * b
            decode(block, logits[-b:])
        else:
            past, block = keep(kv, past_len + b), [mask] * b  # K/V of the block's last denoise step


def cfg_ids(ref):
    return ref.cfg.mask_token_id, set(ref.cfg.stop_token_ids)


@pytest.fixture(scope="module")
def model64(confident_model):
    return copy.deepcopy(confident_model).double()


def _engine(model, tokenizer=None, **kw):
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_model_len", 256)
    kw.setdefault("page_size", 4)  # prompts of 3-17 tokens span several pages: shared full pages, a copied last one
    return dllm.Engine(model, tokenizer, **kw)


@pytest.mark.parametrize("commit_pass", [True, False])
def test_engine_matches_straightforward_block_diffusion(model64, commit_pass):
    ref = ReferenceLLaDA(model64.state_dict(), model64.config)
    cfg = CFG.replace(commit_pass=commit_pass)
    gens = _engine(model64).generate(_prompts(), cfg)
    stops = 0
    for prompt, gen in zip(_prompts(), gens):
        tokens, reason, forwards = reference_generate(ref, prompt, cfg, commit_pass)
        assert gen.token_ids == tokens
        assert gen.finish_reason == reason
        assert gen.num_forwards == forwards
        stops += reason == "stop"
    # The fixture model is confident: several tokens per forward, and EOS ends some requests.
    assert sum(len(g.token_ids) for g in gens) > 1.5 * sum(g.num_forwards for g in gens) - 1e-9 or stops
    assert 0 < stops < len(gens) + 1
    assert max(g.tokens_per_forward for g in gens) > 1.5


def test_output_is_cut_before_the_first_eos_and_never_contains_stop_tokens(confident_model):
    gens = _engine(confident_model).generate(_prompts(8), CFG)
    stop_ids = set(confident_model.config.stop_token_ids)
    stopped = [g for g in gens if g.finish_reason == "stop"]
    assert stopped
    for g in gens:
        assert not stop_ids & set(g.token_ids)
    for g in stopped:  # stopped inside its last block, not at a block boundary by luck
        assert len(g.token_ids) < g.num_blocks * B


def test_early_stop_keeps_the_tokens_and_saves_forwards(confident_model):
    plain = _engine(confident_model).generate(_prompts(8), CFG)
    early = _engine(confident_model).generate(_prompts(8), CFG.replace(early_stop=True))
    assert [g.token_ids for g in early] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in early] == [g.finish_reason for g in plain]
    assert all(e.num_forwards <= p.num_forwards for e, p in zip(early, plain))
    assert sum(e.num_forwards for e in early) < sum(p.num_forwards for p in plain)


def test_max_new_tokens_caps_the_output(confident_model):
    gens = _engine(confident_model).generate(_prompts(8), CFG.replace(max_new_tokens=5))
    assert all(len(g.token_ids) <= 5 for g in gens)
    assert all(g.num_blocks == 1 for g in gens)
    assert any(g.finish_reason == "length" and len(g.token_ids) == 5 for g in gens)


def test_extra_stop_token_ends_the_answer_before_it(confident_model):
    engine = _engine(confident_model)
    base = engine.generate(_prompts(8), CFG)
    long = max(base, key=lambda g: len(g.token_ids))
    i = len(long.token_ids) // 2
    token = long.token_ids[i]
    first = long.token_ids.index(token)
    prompt = _prompts(8)[base.index(long)]
    again = engine.generate([prompt], CFG.replace(stop_token_ids=[token]))[0]
    assert again.finish_reason == "stop"
    assert again.token_ids == long.token_ids[:first]


def test_stop_string_cuts_the_text(confident_model, char_tokenizer):
    engine = _engine(confident_model, char_tokenizer)
    base = engine.generate(_prompts(8), CFG)
    long = max(base, key=lambda g: len(g.text))
    stop = long.text[len(long.text) // 2:len(long.text) // 2 + 2]
    again = engine.generate([_prompts(8)[base.index(long)]], CFG.replace(stop=[stop]))[0]
    assert again.finish_reason == "stop"
    assert again.text == long.text[: long.text.find(stop)]
    assert char_tokenizer.decode(again.token_ids) == again.text


def test_include_stop_str_in_output_keeps_the_stop_string_that_cut_the_text(confident_model, char_tokenizer):
    engine = _engine(confident_model, char_tokenizer)
    base = engine.generate(_prompts(8), CFG)
    long = max(base, key=lambda g: len(g.text))
    prompt, half = _prompts(8)[base.index(long)], len(long.text) // 2
    stop, later = long.text[half:half + 2], long.text[half + 1:half + 4]
    # Both stop strings occur; the one that starts first cuts, wherever it is listed.
    again = engine.generate([prompt], CFG.replace(stop=[later, stop], include_stop_str_in_output=True))[0]
    start = long.text.find(stop)
    assert again.finish_reason == "stop"
    assert again.text == long.text[:start + len(stop)] and again.text.endswith(stop)
    assert char_tokenizer.decode(again.token_ids) == again.text  # one character a token: the ids match too
    assert engine.generate([prompt], CFG.replace(stop=[stop]))[0].text == long.text[:start]


def test_skip_special_tokens_false_writes_the_eos_tokens_of_an_ignore_eos_answer(talkative_model, char_tokenizer):
    engine = _engine(talkative_model, char_tokenizer)
    cfg = CFG.replace(max_new_tokens=40, ignore_eos=True)
    eos = talkative_model.config.eos_token_id
    plain = engine.generate(_prompts(6), cfg)
    special = engine.generate(_prompts(6), cfg.replace(skip_special_tokens=False))
    assert [g.token_ids for g in special] == [g.token_ids for g in plain]
    with_eos = [(p, s) for p, s in zip(plain, special) if eos in s.token_ids]
    assert with_eos
    for p, s in with_eos:
        assert s.text == char_tokenizer.decode(s.token_ids, skip_special_tokens=False) != p.text
        assert char_tokenizer.convert_ids_to_tokens(eos) in s.text and p.text == s.text.replace(
            char_tokenizer.convert_ids_to_tokens(eos), "")


def test_stop_string_in_the_block_that_holds_the_eos_cuts_the_text_too(talkative_model, char_tokenizer):
    """One block holds the whole answer and its EOS: the stop string still applies."""
    engine = _engine(talkative_model, char_tokenizer)
    cfg = CFG.replace(block_size=64, max_new_tokens=64)
    prompts = _prompts(8)
    gens = engine.generate(prompts, cfg)
    cases = [(p, g) for p, g in zip(prompts, gens) if g.finish_reason == "stop" and len(g.text) >= 4]
    assert cases
    for prompt, g in cases:
        stop = g.text[1:3]
        again = engine.generate([prompt], cfg.replace(stop=[stop]))[0]
        assert again.finish_reason == "stop" and again.text == g.text[: g.text.find(stop)]
        assert char_tokenizer.decode(again.token_ids) == again.text


def test_ignore_eos_decodes_to_the_cap_past_the_answers_end(talkative_model):
    """The same decoding (stop tokens by confidence, whole blocks), with EOS no longer ending the answer:
    the normal answer is a prefix, then the stop token it ended at, then more, up to the cap."""
    cfg = CFG.replace(max_new_tokens=40)
    engine = _engine(talkative_model)
    stops = engine.base_stop_ids
    normal = engine.generate(_prompts(6), cfg)
    endless = engine.generate(_prompts(6), cfg.replace(ignore_eos=True))
    stopped = [(n, e) for n, e in zip(normal, endless) if n.finish_reason == "stop"]
    assert stopped
    for n, e in stopped:
        assert e.finish_reason == "length" and len(e.token_ids) == 40
        assert e.token_ids[:len(n.token_ids)] == n.token_ids and e.token_ids[len(n.token_ids)] in stops
    extra = engine.generate(_prompts(1), cfg.replace(ignore_eos=True, stop_token_ids=[endless[0].token_ids[5]]))[0]
    assert extra.finish_reason == "stop" and len(extra.token_ids) <= 5  # stop_token_ids still end it


@pytest.mark.parametrize("stops_last", [False, True])
def test_min_tokens_keeps_stop_tokens_out_of_the_first_positions(talkative_model, stops_last):
    engine = _engine(talkative_model)
    cfg = CFG.replace(stops_last=stops_last, early_stop=True, max_new_tokens=40)
    normal = engine.generate(_prompts(8), cfg)
    short = [i for i, g in enumerate(normal) if g.finish_reason == "stop" and len(g.token_ids) < 12]
    assert short
    longer = engine.generate(_prompts(8), cfg.replace(min_tokens=12, record_trajectory=True))
    stops = engine.base_stop_ids
    for g in longer:
        assert len(g.token_ids) >= 12 and g.finish_reason in ("stop", "length")
        block_tokens = [t for block in g.trajectory for t in block.tokens]
        assert not stops & set(block_tokens[:12])  # not even committed past a cut: never proposed there
    assert engine.generate(_prompts(8), cfg.replace(min_tokens=0))[0].token_ids == normal[0].token_ids


def test_string_prompts_are_tokenised(confident_model, char_tokenizer):
    engine = _engine(confident_model, char_tokenizer)
    a = engine.generate(["reverse: abc =>"], CFG)[0]
    ids = char_tokenizer("reverse: abc =>", add_special_tokens=False)["input_ids"]
    b = engine.generate([ids], CFG)[0]
    assert a.token_ids == b.token_ids and a.text == char_tokenizer.decode(a.token_ids)


def test_greedy_output_does_not_depend_on_the_batch(model64):
    prompts = _prompts(8)
    alone = [_engine(model64).generate([p], CFG)[0].token_ids for p in prompts]
    together = [g.token_ids for g in _engine(model64).generate(prompts, CFG)]
    assert together == alone
    # Staggered arrivals with a different block size in the mix: requests join mid-flight.
    engine = _engine(model64, max_batch_size=3)
    ids = {}
    results = {}
    for i, p in enumerate(prompts):
        ids[engine.add_request(p, CFG)] = i
        engine.add_request(list(reversed(p)), CFG.replace(block_size=4))
        for out in engine.step():
            if out.finished and out.request_id in ids:
                results[ids[out.request_id]] = out.generation.token_ids
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.request_id in ids:
                results[ids[out.request_id]] = out.generation.token_ids
    assert [results[i] for i in range(len(prompts))] == alone


def test_requests_with_the_same_prompt_share_one_prefill_row(model64):
    """The n samples of one prompt prefill as one row whose prompt K/V are copied into the others'
    slots: the same tokens and forwards as when every row is prefilled, from fewer prefill rows."""
    a, b, c = _prompts(3)
    batch = [a, a, a, b, a, c, b]
    configs = [CFG] + [CFG.replace(temperature=1.0, seed=s) for s in range(1, len(batch))]
    model = copy.deepcopy(model64)
    rows_per_forward = []
    forward = model.forward

    def spy(*args, **kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        rows_per_forward.append(ids.shape[0])
        return forward(*args, **kwargs)

    model.forward = spy
    engine = _engine(model)
    shared = engine.generate(batch, configs)
    apart = _engine(model64, share_prefills=False).generate(batch, configs)
    assert [(g.token_ids, g.num_forwards) for g in shared] == [(g.token_ids, g.num_forwards) for g in apart]
    assert len({tuple(g.token_ids) for g in shared[:3]}) > 1  # the samples part after the shared prefill
    assert rows_per_forward[0] == 3 and engine.stats()["shared_prefills"] == 4  # a, b, c: 4 rows saved


def _query_lengths(model):
    """A copy of `model` that records the query length of each forward it runs."""
    model = copy.deepcopy(model)
    lengths, forward = [], model.forward

    def spy(*args, **kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        lengths.append((ids if ids is not None else kwargs["inputs_embeds"]).shape[1])
        return forward(*args, **kwargs)

    model.forward = spy
    return model, lengths


def test_a_prompt_seen_before_skips_its_prefill_with_the_same_tokens(model64):
    """Prefix caching: the second time a prompt comes (same block size), its request takes the free slot
    that still holds the prompt's K/V, and its first forward is the B masks alone. Every decoding
    setting gives the tokens, forwards and logprobs it gives without the cache."""
    prompts, settings = _prompts(len(EVERY_DECODING_SETTING)), EVERY_DECODING_SETTING
    model, lengths = _query_lengths(model64)
    engine = _engine(model, max_batch_size=len(prompts))
    first = engine.generate(prompts, settings)
    assert engine.stats()["prefix_cache_hits"] == 0 and all(g.cached_prompt_tokens == 0 for g in first)
    del lengths[:]
    again = engine.generate(prompts, settings)
    uncached = _engine(model64, max_batch_size=len(prompts), prefix_caching=False).generate(prompts, settings)
    for gens in (first, again):
        assert [(g.token_ids, g.num_forwards, g.finish_reason) for g in gens] == \
               [(g.token_ids, g.num_forwards, g.finish_reason) for g in uncached]
    for g, u in zip(again, uncached):
        if u.logprobs is not None:
            assert [t.logprob for t in g.logprobs] == pytest.approx([t.logprob for t in u.logprobs], abs=1e-9)
    assert [g.cached_prompt_tokens for g in again] == [len(p) for p in prompts]
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == len(prompts) and stats["prefix_cached_tokens"] == sum(map(len, prompts))
    assert max(lengths) == 2 * B  # no prompt ran again: DENOISE (B) and COMMIT (2B) forwards only


def test_a_running_requests_prompt_kv_are_copied_to_a_newcomer_with_that_prompt(model64):
    prompt = _prompts(4)[3]
    cfg = CFG.replace(ignore_eos=True)
    alone = _engine(model64, prefix_caching=False).generate([prompt], cfg)[0]
    model, lengths = _query_lengths(model64)
    engine = _engine(model)
    engine.add_request(prompt, cfg, request_id="first")
    engine.step()
    engine.step()
    del lengths[:]
    engine.add_request(prompt, cfg, request_id="second")
    engine.step()
    assert len(lengths) == 1 and lengths[0] == B  # both in one DENOISE forward: the newcomer ran no prefill
    results = {}
    while engine.has_unfinished():
        results.update({o.request_id: o.generation for o in engine.step() if o.finished})
    assert results["first"].token_ids == results["second"].token_ids == alone.token_ids
    assert results["second"].num_forwards == alone.num_forwards
    assert (results["first"].cached_prompt_tokens, results["second"].cached_prompt_tokens) == (0, len(prompt))


def test_the_prefix_cache_holds_only_exact_prompt_kv(model64):
    """A cached prompt is reused only at the same block size (the prefill's prompt K/V saw B masks) and
    only by the dllm-var cache policy (a vicinity request refreshes committed K/V: its prompt is never
    cached); the cache keeps every prompt whose pages the pool does not need for running requests."""
    p, q = _prompts(2)

    def hits(engine, prompt, cfg=CFG):
        before = engine.prefix_cache_hits
        gen = engine.generate([prompt], cfg)[0]
        assert gen.token_ids == _engine(model64, prefix_caching=False).generate([prompt], cfg)[0].token_ids
        return engine.prefix_cache_hits - before

    engine = _engine(model64, max_batch_size=1)
    small = CFG.replace(block_size=4)
    assert [hits(engine, p), hits(engine, p), hits(engine, p, small), hits(engine, p), hits(engine, p, small)] == \
           [0, 1, 0, 1, 1]
    assert [hits(engine, q, CFG.replace(cache_policy="vicinity")), hits(engine, q)] == [0, 0]
    off = _engine(model64, prefix_caching=False)
    off.generate([p, p], CFG)
    off.generate([p], CFG)
    assert off.stats()["prefix_cache_hits"] == 0


def test_cached_prompts_give_their_pages_back_when_the_pool_needs_them(model64):
    """A pool with room for one request: each request's pages come partly from the prompt cached
    before it, which is then forgotten (q evicts p, p evicts q); the same prompt twice in a row hits."""
    p, q = _prompts(2)  # 3 and 5 tokens; + 48 new tokens: 13 and 14 pages of 4
    engine = _engine(model64, max_batch_size=1, kv_cache_tokens=14 * 4, page_allocation="reserve")
    seen = []
    for prompt in (q, p, p, q):
        before = engine.prefix_cache_hits
        gen = engine.generate([prompt], CFG)[0]
        assert gen.token_ids == _engine(model64, prefix_caching=False).generate([prompt], CFG)[0].token_ids
        seen.append(engine.prefix_cache_hits - before)
    assert seen == [0, 0, 1, 0]
    assert engine.stats()["cache_pages_cached"] == 2  # q's prompt: 5 tokens, 2 pages


def test_a_request_holds_the_pages_its_length_needs_not_max_model_len(tiny_config):
    cache = dllm.engine.KVCache(tiny_config, num_slots=4, capacity=64, page_size=4, num_pages=10,
                                device="cpu", dtype=torch.float32)
    assert cache.pages_per_slot == 16 and cache.num_pages == 10  # 4 full slots would need 64 pages
    a = cache.allocate(10)  # 3 pages
    b = cache.allocate(25)  # 7 pages: the pool is full
    assert (cache.used_pages, len(cache.pages(a)), len(cache.pages(b))) == (10, 3, 7)
    assert not set(cache.pages(a)) & set(cache.pages(b))
    assert cache.table[a, :3].tolist() == cache.pages(a) and set(cache.table[a, 3:].tolist()) == {cache.scratch_page}
    assert not cache.can_allocate(1) and cache.free_slots == 2  # slots left, pages not
    with pytest.raises(dllm.engine.kv_cache.CacheFullError):
        cache.allocate(1)
    cache.release(b)
    assert cache.can_allocate(28) and not cache.can_allocate(29)
    with pytest.raises(ValueError, match="not allocated"):
        cache.release(b)
    with pytest.raises(ValueError, match="exceed a slot's capacity of 64"):
        cache.allocate(65)


def test_a_cached_prompts_full_pages_are_shared_and_its_last_page_copied(tiny_config):
    cache = dllm.engine.KVCache(tiny_config, num_slots=3, capacity=48, page_size=4, num_pages=12,
                                device="cpu", dtype=torch.float32)
    owner = cache.allocate(16)  # a 10-token prompt: pages 0, 1 full, page 2 partly
    cache.k[:, cache.pages(owner)] = torch.randn_like(cache.k[:, cache.pages(owner)])
    cache.remember("p", owner, 10)
    prompt_pages = cache.lookup("p")
    assert prompt_pages == cache.pages(owner)[:3]
    reader = cache.allocate(16, prompt_pages, 10)
    mine = cache.pages(reader)
    assert mine[:2] == prompt_pages[:2] and mine[2] not in prompt_pages  # shared, then a copy of its own
    assert torch.equal(cache.k[:, mine[2]], cache.k[:, prompt_pages[2]])
    assert cache.used_pages == 4 + 2  # the reader's 4 pages, 2 of them the owner's
    cache.release(owner)
    cache.release(reader)
    assert (cache.used_pages, cache.cached_pages) == (0, 3)  # the prompt stays cached; the rest is free
    other = cache.allocate(36 - 4)  # 8 pages: 9 are free without the cached prompt, so it stays
    assert cache.lookup("p") == prompt_pages
    cache.release(other)
    cache.allocate(40)  # 10 pages: the cached prompt gives its pages back
    assert cache.lookup("p") is None and cache.cached_pages == 0


@pytest.mark.parametrize("allocation", ["reserve", "on_demand"])
def test_a_request_that_fits_the_pool_only_without_its_cached_prompt_prefills_it_anew(model64, allocation):
    """A 13-token prompt is cached (4 pages, the last partly filled) in a pool of 16 pages; the same prompt
    with 48 new tokens needs all 16. Mapping the cached pages would pin them while the last one is copied
    (17 pages): the request is admitted without them and prefills, instead of waiting for ever."""
    prompt = _prompts(5)[4]
    engine = _engine(model64, max_batch_size=2, kv_cache_tokens=16 * 4, page_allocation=allocation)
    engine.generate([prompt], CFG.replace(max_new_tokens=4))
    assert engine.stats()["cache_pages_cached"] == 4
    cfg = CFG.replace(max_new_tokens=48, ignore_eos=True)
    rid = engine.add_request(prompt, cfg)
    done = None
    for _ in range(500):  # a bound, not a wait: the request used to stay queued
        done = next((o.generation for o in engine.step() if o.finished and o.request_id == rid), done)
        if done:
            break
    assert done is not None and done.token_ids == _engine(model64).generate([prompt], cfg)[0].token_ids


def test_a_slot_grows_by_fresh_pages_and_swaps_out_and_back_bit_for_bit(tiny_config):
    cache = dllm.engine.KVCache(tiny_config, num_slots=2, capacity=32, page_size=4, num_pages=8,
                                device="cpu", dtype=torch.float32)
    a = cache.allocate(6)  # 2 pages
    cache.grow(a, 13)  # 4 pages
    assert len(cache.pages(a)) == 4 and cache.table[a, :4].tolist() == cache.pages(a)
    assert cache.table[a, 4].item() == cache.scratch_page
    b = cache.allocate(16)  # the other 4 pages
    assert not cache.can_grow(a, 17) and cache.can_grow(a, 16)
    with pytest.raises(dllm.engine.kv_cache.CacheFullError):
        cache.grow(a, 17)
    cache.k[:, cache.pages(b)] = torch.randn_like(cache.k[:, cache.pages(b)])
    cache.v[:, cache.pages(b)] = torch.randn_like(cache.v[:, cache.pages(b)])
    before = [pool[:, cache.pages(b)].flatten(1, 2)[:, :11].clone() for pool in (cache.k, cache.v)]
    swapped = cache.swap_out(b, 11)  # positions 0-10: 3 pages; the slot and all 4 pages are free again
    assert swapped.k.device.type == "cpu" and swapped.k.shape[1] == 3 and cache.used_pages == 4
    cache.grow(a, 32)  # takes b's pages, and overwrites them
    cache.k[:, cache.pages(a)] = 0.0
    cache.release(a)
    c = cache.swap_in(swapped, 20)  # 5 pages: the 3 swapped and 2 fresh
    after = [pool[:, cache.pages(c)].flatten(1, 2)[:, :11] for pool in (cache.k, cache.v)]
    assert len(cache.pages(c)) == 5 and all(torch.equal(x, y) for x, y in zip(before, after))


def test_a_prompts_samples_share_its_full_pages_while_they_run(model64):
    """n samples of one prompt prefilled together map the prefilled row's full prompt pages: the pool
    holds that prompt once (not n times), and every sample decodes as with pages of its own."""
    prompt = _prompts(8)[7]  # 17 tokens: 4 full pages of 4 and a partly filled one
    configs = [CFG.replace(temperature=1.0, seed=s, ignore_eos=True) for s in range(4)]
    engine = _engine(model64)
    for cfg in configs:
        engine.add_request(prompt, cfg)
    engine.step()
    per_request = engine.cache.pages_for(len(prompt) + B)  # what the prefill wrote: prompt + a block
    assert engine.stats()["cache_pages_used"] == 4 * per_request - 3 * 4
    results = []
    while engine.has_unfinished():
        results += [o.generation.token_ids for o in engine.step() if o.finished]
    apart = _engine(model64, share_prefills=False).generate([prompt] * 4, configs)
    assert sorted(results) == sorted(g.token_ids for g in apart)


@pytest.mark.parametrize("allocation, admitted", [("reserve", 2), ("on_demand", 5)])
def test_requests_wait_for_pages_when_slots_are_free(model64, allocation, admitted):
    """A pool of pages for two whole requests (prompt + max_new_tokens) at a time, eight slots. Reserved,
    two run and the others wait; on demand, each new request needs the pages of its prefill and keeps a
    block's pages free to grow into (prompts of 3-13 tokens: 5, 6, 6, 7, 8 pages of the 32), so five run.
    Every answer is the one decoded alone."""
    prompts = _prompts(6)
    need = max(_engine(model64).cache.pages_for(len(p) + CFG.max_new_tokens) for p in prompts)
    engine = _engine(model64, kv_cache_tokens=2 * need * 4, prefix_caching=False, page_allocation=allocation)
    for p in prompts:
        engine.add_request(p, CFG)
    engine.step()
    assert (engine.stats()["running"], engine.stats()["waiting"]) == (admitted, 6 - admitted)
    gens = []
    while engine.has_unfinished():
        gens += [o.generation for o in engine.step() if o.finished]
    alone = [_engine(model64).generate([p], CFG)[0].token_ids for p in prompts]
    assert sorted(g.token_ids for g in gens) == sorted(alone)
    assert engine.stats()["cache_pages_used"] == 0


def test_on_demand_pages_grow_block_by_block_with_the_answer(talkative_model):
    engine = _engine(talkative_model)
    prompt = _prompts(2)[1]  # 5 tokens
    rid = engine.add_request(prompt, CFG.replace(ignore_eos=True))
    req = engine._requests[rid]
    extent, held = req.extent(Phase.PREFILL), []
    while engine.has_unfinished():
        engine.step()
        if req.phase is Phase.FINISHED:
            break
        held.append(len(engine.cache.pages(req.slot)))
        assert held[-1] == engine.cache.pages_for(extent)  # what the forwards so far wrote, no more
        extent = max(extent, req.extent())
    assert held[0] == engine.cache.pages_for(5 + B) and max(held) == engine.cache.pages_for(req.cache_extent)
    assert engine.stats()["cache_pages_used"] == 0


# Decoding states that a preempted request carries through its time in host memory or its K/V rebuild,
# and the cache policies whose K/V are rebuilt differently (or not at all: none).
PREEMPTED_CONFIGS = [{}, dict(logprobs=2), dict(decoder="credit"), dict(smoothing=True),
                     dict(decoder="fixed_k", block_size=4, record_trajectory=True), dict(temperature=1.0, seed=5),
                     dict(commit_pass=False), dict(cache_policy="vicinity"),
                     dict(frequency_penalty=1.0, presence_penalty=0.5), dict(cache_policy="none", block_size=4)]


@pytest.fixture(scope="module")
def talkative64(talkative_model):
    return copy.deepcopy(talkative_model).double()


@pytest.mark.parametrize("mode", PREEMPTION_MODES)
@pytest.mark.parametrize("unroll", [1, 4])
@pytest.mark.parametrize("answers", [2, 1.5])
def test_preempted_requests_resume_where_they_stopped_with_the_same_answers(talkative64, answers, unroll, mode):
    """On-demand pages in a pool that holds 1.5 or 2 whole answers: ten requests start, and as the older
    ones grow the newest are preempted and resumed later, their K/V swapped to host memory and back or
    dropped and written again by forwards of the tokens that first wrote them. Each gets the tokens,
    forwards, trajectory and logprobs it gets decoded alone."""
    prompts = _prompts(len(PREEMPTED_CONFIGS))
    cfgs = [CFG.replace(ignore_eos=True, **kw) for kw in PREEMPTED_CONFIGS]
    kw = dict(max_unroll=unroll, expected_tpf=1.0, prefix_caching=False)
    alone = [_engine(talkative64, **kw).generate([p], c)[0] for p, c in zip(prompts, cfgs)]
    need = max(_engine(talkative64).cache.pages_for(len(p) + CFG.max_new_tokens) for p in prompts)
    engine = _engine(talkative64, kv_cache_tokens=int(answers * need) * 4, preemption_mode=mode, **kw)
    gens = engine.generate(prompts, cfgs)
    stats = engine.stats()
    assert stats["preemptions"] >= 3
    assert stats["swapped_bytes" if mode == "swap" else "rebuilt_tokens"] > 0
    for g, a in zip(gens, alone):
        assert (g.token_ids, g.num_forwards, g.num_blocks, g.trajectory) == \
               (a.token_ids, a.num_forwards, a.num_blocks, a.trajectory)
        assert len(g.token_ids) == CFG.max_new_tokens
    assert [t.token_id for t in gens[1].logprobs] == [t.token_id for t in alone[1].logprobs]  # logprobs=2
    assert [t.logprob for t in gens[1].logprobs] == pytest.approx([t.logprob for t in alone[1].logprobs], abs=1e-9)
    assert (stats["cache_pages_used"], stats["swapped_requests"], stats["running"]) == (0, 0, 0)


def test_preempted_samples_of_shared_and_cached_prompts_keep_their_answers(talkative64):
    """Three samples per prompt share their prompt's pages (shared prefill), then, asked again, take
    them from the prefix cache; preempted either way, each sample decodes as alone."""
    prompts = [p for p in _prompts(4) for _ in range(3)]
    cfgs = [CFG.replace(ignore_eos=True, temperature=1.0, seed=i) for i in range(len(prompts))]
    alone = [_engine(talkative64).generate([p], c)[0] for p, c in zip(prompts, cfgs)]
    need = max(_engine(talkative64).cache.pages_for(len(p) + CFG.max_new_tokens) for p in prompts)
    engine = _engine(talkative64, kv_cache_tokens=2 * need * 4)
    for _ in range(2):
        gens = engine.generate(prompts, cfgs)
        assert [(g.token_ids, g.num_forwards) for g in gens] == [(a.token_ids, a.num_forwards) for a in alone]
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["shared_prefills"] > 0 and stats["prefix_cache_hits"] > 0


def test_recompute_preemption_keeps_nothing_in_host_memory_and_rebuilds_from_the_prefix_cache(talkative64):
    """preemption_mode="recompute" with the commit pass: every preemption drops the K/V (no bytes go to
    host memory) and the answers are those decoded alone, at the cost of extra forwards that no
    request counts as its own. With prefix caching a resumed request maps its prompt's pages again and
    rebuilds only its committed blocks."""
    prompts = _prompts(8)
    cfgs = [CFG.replace(ignore_eos=True, temperature=1.0, seed=i) if i % 2 else CFG.replace(ignore_eos=True)
            for i in range(len(prompts))]
    alone = [_engine(talkative64).generate([p], c)[0] for p, c in zip(prompts, cfgs)]
    need = max(_engine(talkative64).cache.pages_for(len(p) + CFG.max_new_tokens) for p in prompts)
    stats = {}
    for mode, caching in [("swap", False), ("recompute", False), ("recompute", True)]:
        engine = _engine(talkative64, kv_cache_tokens=int(1.5 * need) * 4, preemption_mode=mode, prefix_caching=caching)
        gens = engine.generate(prompts, cfgs)
        assert [(g.token_ids, g.num_forwards) for g in gens] == [(a.token_ids, a.num_forwards) for a in alone]
        stats[mode, caching] = engine.stats()
    swap, recompute, cached = stats["swap", False], stats["recompute", False], stats["recompute", True]
    assert swap["swapped_bytes"] > 0 and swap["dropped_preemptions"] == swap["rebuilt_tokens"] == 0
    assert recompute["swapped_bytes"] == 0 and recompute["dropped_preemptions"] == recompute["preemptions"] > 0
    assert recompute["total_forwards"] > swap["total_forwards"]  # the rebuilds
    assert 0 < cached["rebuilt_tokens"] < recompute["rebuilt_tokens"]  # the prompts came from the prefix cache


def test_a_request_preempted_while_it_rebuilds_starts_its_rebuild_over(talkative64):
    """An older request's growth may preempt one still rebuilding its K/V (it was resumed last): it
    gives its pages back, and rebuilds from its prompt once it fits again, with the same answer."""
    prompts = _prompts(8)
    # (prompt, block size, threshold, max_new_tokens), found to preempt the last one while it rebuilds
    mix = [(6, 2, 0.9, 8), (7, 2, 0.5, 16), (2, 4, 0.1, 48), (5, 2, 0.9, 16)]
    cfgs = [CFG.replace(ignore_eos=True, block_size=b, threshold=t, max_new_tokens=m) for _, b, t, m in mix]
    engine = _engine(talkative64, kv_cache_tokens=24 * 4, preemption_mode="recompute", prefix_caching=False)
    reqs = [engine._requests[engine.add_request(prompts[p], c)] for (p, *_), c in zip(mix, cfgs)]
    phases, gens = [], {}
    while engine.has_unfinished():
        gens.update((o.request_id, o.generation) for o in engine.step() if o.finished)
        _check_pages(engine.cache)
        phases.append([r.phase for r in reqs])
    assert any(before[3] is Phase.REBUILD and after[3] is Phase.WAITING for before, after in zip(phases, phases[1:]))
    for r, (p, *_), c in zip(reqs, mix, cfgs):
        assert gens[r.request_id].token_ids == _engine(talkative64).generate([prompts[p]], c)[0].token_ids


def test_a_request_can_be_aborted_while_it_rebuilds(talkative64):
    prompts = _prompts(8)
    need = max(_engine(talkative64).cache.pages_for(len(p) + CFG.max_new_tokens) for p in prompts)
    engine = _engine(talkative64, kv_cache_tokens=int(1.5 * need) * 4, preemption_mode="recompute",
                     prefix_caching=False)
    ids = [engine.add_request(p, CFG.replace(ignore_eos=True)) for p in prompts]
    finished = {}
    while not any(r.phase is Phase.REBUILD for r in engine.scheduler.running):
        finished.update((o.request_id, o.generation) for o in engine.step() if o.finished)
    rebuilding = next(r.request_id for r in engine.scheduler.running if r.phase is Phase.REBUILD)
    assert engine.abort(rebuilding)
    while engine.has_unfinished():
        finished.update((o.request_id, o.generation) for o in engine.step() if o.finished)
        _check_pages(engine.cache)
    assert finished.keys() == set(ids) and finished.pop(rebuilding).finish_reason == "abort"
    assert all(len(g.token_ids) == CFG.max_new_tokens for g in finished.values())
    assert engine.stats()["cache_pages_used"] == 0


def test_swapped_kv_stay_within_swap_space_and_the_others_are_recomputed(talkative64):
    """Swap mode with host memory for about one request's K/V: after every step the swapped K/V take no
    more; the preemptions that would pass it drop the K/V and rebuild them, and every answer is the
    one decoded alone. With no host memory at all nothing is swapped."""
    prompts = _prompts(8)
    cfgs = [CFG.replace(ignore_eos=True, temperature=1.0, seed=i) if i % 2 else CFG.replace(ignore_eos=True)
            for i in range(len(prompts))]
    alone = [_engine(talkative64).generate([p], c)[0].token_ids for p, c in zip(prompts, cfgs)]
    need = max(_engine(talkative64).cache.pages_for(len(p) + CFG.max_new_tokens) for p in prompts)
    one = _engine(talkative64).cache.swap_bytes(40)  # a 16-token prompt and 3 blocks
    for budget in (one, 0):
        engine = _engine(talkative64, kv_cache_tokens=int(1.5 * need) * 4, prefix_caching=False,
                         swap_space=budget / 2**30)
        ids = [engine.add_request(p, c) for p, c in zip(prompts, cfgs)]
        gens = {}
        while engine.has_unfinished():
            gens.update((o.request_id, o.generation.token_ids) for o in engine.step() if o.finished)
            assert engine.stats()["swapped_bytes_now"] <= budget
        assert [gens[i] for i in ids] == alone
        stats = engine.stats()
        assert stats["dropped_preemptions"] > 0 and stats["swapped_bytes_now"] == 0
        assert (stats["swapped_bytes"] > 0) == (budget > 0)


def test_preemption_options_are_checked(model64):
    with pytest.raises(ValueError, match=r"preemption_mode must be one of \['swap', 'recompute'\], got 'drop'"):
        _engine(model64, preemption_mode="drop")
    with pytest.raises(ValueError, match=r"swap_space must be a number of GiB >= 0 \(or None: no limit\), got -1"):
        _engine(model64, swap_space=-1)


def test_a_preempted_request_can_be_aborted_while_swapped_out(talkative64):
    prompts = _prompts(4)
    need = max(_engine(talkative64).cache.pages_for(len(p) + CFG.max_new_tokens) for p in prompts)
    engine = _engine(talkative64, kv_cache_tokens=need * 4, prefix_caching=False)
    ids = [engine.add_request(p, CFG.replace(ignore_eos=True)) for p in prompts]
    while not engine.stats()["swapped_requests"]:
        engine.step()
    swapped = next(r.request_id for r in engine.scheduler.waiting if r.swapped is not None)
    assert engine.abort(swapped)
    assert engine.stats()["swapped_requests"] == 0
    finished = {}
    while engine.has_unfinished():
        finished.update((o.request_id, o.generation) for o in engine.step() if o.finished)
    assert finished.keys() == set(ids) and finished.pop(swapped).finish_reason == "abort"
    assert all(len(g.token_ids) == CFG.max_new_tokens for g in finished.values())
    assert engine.stats()["cache_pages_used"] == 0


def _check_pages(cache) -> None:
    """The pool's bookkeeping agrees with itself: each page is free, cached or mapped, never two of them;
    reference counts are the slots that map a page; the page table lists each slot's pages."""
    mapped = collections.Counter(p for pages in cache._pages_of.values() for p in pages)
    assert all(cache._refs[p] == n for p, n in mapped.items()) and sum(cache._refs) == sum(mapped.values())
    free, cached = set(cache._free_pages), {p for p in cache._prompt_of if p not in mapped}
    assert len(free) == len(cache._free_pages) and not free & set(mapped) and not free & cached
    assert len(free) + len(cached) + len(mapped) == cache.num_pages and cache.cached_pages == len(cached)
    for slot, pages in cache._pages_of.items():
        assert cache.table[slot, :len(pages)].tolist() == pages


# Per-request settings the random arrivals below draw from: stops or not, sampling, two block sizes, every
# cache policy, commit_pass=False, a stateful decoder, logprobs.
ARRIVING = [dict(ignore_eos=True), {}, dict(temperature=1.0, seed=7), dict(block_size=4, ignore_eos=True),
            dict(cache_policy="vicinity", ignore_eos=True), dict(commit_pass=False), dict(decoder="credit"),
            dict(cache_policy="none", block_size=4), dict(logprobs=2, ignore_eos=True)]


@pytest.mark.parametrize("seed", range(12))
def test_random_arrivals_aborts_and_preemptions_keep_the_pool_consistent(talkative64, seed):
    """Requests of a few repeated prompts (shared and cached pages) with mixed settings and caps arrive at
    random steps into a small pool of an engine with random options (half of the seeds schedule by random
    priorities: urgent arrivals preempt, reserved pages too), and some are aborted. Most on-demand seeds preempt: swapping, recomputing, or swapping until 16 KiB of host memory (swap_space) are used
    and recomputing past it. After every step the pool's bookkeeping holds; every request ends, and each one not aborted
    with the answer it gets decoded alone."""
    rng = random.Random(seed)
    prompts = _prompts(6)
    engine = _engine(talkative64, max_batch_size=rng.choice([4, 8]), kv_cache_tokens=rng.choice([16, 20, 24]) * 4,
                     max_prefill_tokens=rng.choice([16, 8192]), page_allocation="reserve" if seed % 3 == 2 else "on_demand",
                     share_prefills=rng.random() < 0.8, prefix_caching=rng.random() < 0.8,
                     max_unroll=rng.choice([1, 3]), expected_tpf=1.0,
                     preemption_mode=PREEMPTION_MODES[seed % 2], swap_space=2**-16 if seed % 4 == 2 else None,
                     scheduling_policy="priority" if seed >= 6 else "fcfs")
    asked, results, aborted = {}, {}, set()
    for step in range(3000):  # a bound, not a wait: every request must end well before it
        if step < 150:
            for _ in range(rng.choice([0, 0, 1, 3])):
                prompt = rng.choice(prompts)
                cfg = CFG.replace(max_new_tokens=rng.choice([4, 8, 24, 48]), **rng.choice(ARRIVING))
                priority = rng.choice([0, 1, 2]) if engine.scheduler.by_priority else 0
                if len(asked) < 30 and engine.cache.pages_for(len(prompt) + 48) <= engine.cache.num_pages:
                    asked[engine.add_request(prompt, cfg, priority=priority)] = (prompt, cfg)
            live = sorted(set(asked) - set(results) - aborted)
            if live and rng.random() < 0.02:
                rid = rng.choice(live)
                assert engine.abort(rid)
                aborted.add(rid)
        results.update((o.request_id, o.generation) for o in engine.step() if o.finished)
        _check_pages(engine.cache)
        if step >= 150 and not engine.has_unfinished():
            break
    assert results.keys() == asked.keys() and engine.stats()["cache_pages_used"] == 0
    for rid, (prompt, cfg) in asked.items():
        if rid in aborted:
            assert results[rid].finish_reason == "abort"
        else:
            assert results[rid].token_ids == _engine(talkative64).generate([prompt], cfg)[0].token_ids, rid


def _finish_order(engine) -> list[str]:
    order = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    return order


def test_under_the_priority_policy_the_most_urgent_request_is_admitted_first(talkative64):
    """One slot, three requests queued together: priority 0 first, then the two of priority 1 in arrival
    order. First come, first served ignores what is not there: it refuses any priority but 0."""
    prompts = _prompts(3)
    engine = _engine(talkative64, max_batch_size=1, scheduling_policy="priority")
    ids = [engine.add_request(p, CFG, priority=k) for p, k in zip(prompts, [1, 0, 1])]
    assert _finish_order(engine) == [ids[1], ids[0], ids[2]]
    fcfs = _engine(talkative64, max_batch_size=1)
    with pytest.raises(ValueError, match="priority 1 needs an engine with scheduling_policy='priority'"):
        fcfs.add_request(prompts[0], CFG, priority=1)
    assert not fcfs.has_unfinished()  # the refused request left nothing behind
    with pytest.raises(ValueError, match=r"scheduling_policy must be one of \['fcfs', 'priority'\], got 'lifo'"):
        _engine(talkative64, scheduling_policy="lifo")


def test_an_urgent_request_preempts_a_less_urgent_one_and_an_equal_one_waits(talkative64):
    """One slot: a long answer of priority 2 is running when a request of priority 0 arrives, which takes
    the slot at once (the long one is preempted and resumes after it, with the answer it gets alone); one
    of priority 2 arriving then waits for the first to end."""
    prompts = _prompts(3)
    long = CFG.replace(ignore_eos=True)
    engine = _engine(talkative64, max_batch_size=1, scheduling_policy="priority")
    slow = engine.add_request(prompts[0], long, priority=2)
    for _ in range(3):
        engine.step()
    urgent = engine.add_request(prompts[1], CFG, priority=0)
    same = engine.add_request(prompts[2], CFG, priority=2)
    results = {}
    order = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                order.append(o.request_id)
                results[o.request_id] = o.generation
    assert order == [urgent, slow, same] and engine.stats()["preemptions"] == 1
    for rid, prompt, cfg in [(slow, prompts[0], long), (urgent, prompts[1], CFG), (same, prompts[2], CFG)]:
        assert results[rid].token_ids == _engine(talkative64).generate([prompt], cfg)[0].token_ids


def test_a_full_pool_preempts_the_least_urgent_request_not_the_newest(talkative64):
    """On-demand pages for about two whole answers, three requests of priorities 0, 2, 1 (in arrival order):
    when they outgrow the pool the one of priority 2 gives its pages back first, though it is not the newest;
    each answer is the one decoded alone."""
    prompts = _prompts(3)
    cfg = CFG.replace(ignore_eos=True)
    need = max(_engine(talkative64).cache.pages_for(len(p) + cfg.max_new_tokens) for p in prompts)
    engine = _engine(talkative64, kv_cache_tokens=2 * need * 4, scheduling_policy="priority", prefix_caching=False)
    ids = [engine.add_request(p, cfg, priority=k) for p, k in zip(prompts, [0, 2, 1])]
    requests = [engine._requests[i] for i in ids]
    engine.step()
    assert all(r.phase is not Phase.WAITING for r in requests)  # all three start
    first_preempted = None
    results = {}
    while engine.has_unfinished():
        results.update((o.request_id, o.generation) for o in engine.step() if o.finished)
        waiting = [r for r in requests if r.phase is Phase.WAITING]
        if waiting and first_preempted is None:
            first_preempted = waiting
    assert first_preempted == [requests[1]]
    for rid, prompt in zip(ids, prompts):
        assert results[rid].token_ids == _engine(talkative64).generate([prompt], cfg)[0].token_ids


def _streamed(engine, prompt, cfg) -> tuple[list[tuple[int, list[int]]], dllm.Generation]:
    """(step, new token ids) of each of the request's outputs, and its Generation."""
    rid, outputs, step = engine.add_request(prompt, cfg), [], 0
    while True:
        for out in engine.step():
            if out.request_id == rid:
                outputs.append((step, out.new_token_ids))
                if out.finished:
                    return outputs, out.generation
        step += 1


@pytest.mark.parametrize("kw", [dict(ignore_eos=True), {}, dict(temperature=1.0, seed=3, ignore_eos=True),
                                dict(decoder="credit", max_new_tokens=21), dict(max_unroll=3)])
def test_settled_prefixes_stream_before_their_block_ends_and_add_up_to_the_answer(talkative64, kw):
    """stream_settled: outputs as each block's leftmost positions settle, not only whole blocks; they add up to
    the same answer, and the first comes no later (here, well before the first block ends)."""
    unroll = kw.pop("max_unroll", 1)
    cfg = CFG.replace(block_size=16, **kw)
    prompt = _prompts(2)[1]
    by_block, alone = _streamed(_engine(talkative64, max_unroll=unroll), prompt, cfg)
    settled, streamed = _streamed(_engine(talkative64, max_unroll=unroll), prompt, cfg.replace(stream_settled=True))
    assert streamed.token_ids == alone.token_ids and streamed.num_forwards == alone.num_forwards
    assert [t for _, ids in settled for t in ids] == streamed.token_ids  # every token once, in order
    assert len(settled) > len(by_block) and settled[0][0] <= by_block[0][0]


def test_requests_with_logprobs_or_stop_strings_stream_whole_blocks(talkative64, char_tokenizer):
    prompt = _prompts(2)[1]
    for extra in (dict(logprobs=2), dict(stop=["zz"])):
        cfg = CFG.replace(block_size=16, ignore_eos=True, **extra)
        by_block, _ = _streamed(_engine(talkative64, char_tokenizer), prompt, cfg)
        settled, _ = _streamed(_engine(talkative64, char_tokenizer), prompt, cfg.replace(stream_settled=True))
        assert [len(ids) for _, ids in settled] == [len(ids) for _, ids in by_block] == [16, 16, 16]  # 48 tokens


def test_page_allocation_is_checked(model64):
    with pytest.raises(ValueError, match=r"page_allocation must be one of \['on_demand', 'reserve'\], got 'lazy'"):
        _engine(model64, page_allocation="lazy")


@pytest.mark.parametrize("share", [True, False])
def test_the_prefill_token_budget_counts_the_rows_a_forward_runs(model64, share):
    """With shared prefills the repeats of a prompt cost no row: 6 samples of one prompt and one other
    prompt fit a budget of 2 rows in one forward."""
    a, b = [7] * 8, [9] * 8  # 8 tokens + a block of 8: 16 per row
    engine = _engine(model64, max_prefill_tokens=32, share_prefills=share)
    for prompt in [a] * 6 + [b]:
        engine.add_request(prompt, CFG)
    engine.scheduler.admit()
    groups = engine.scheduler.schedule()
    assert [len(g) for g in groups] == ([7] if share else [2, 2, 2, 1])
    finished = []
    while engine.has_unfinished():  # and they decode
        finished += [out for out in engine.step() if out.finished]
    assert len(finished) == 7


def test_seeded_sampling_is_reproducible(confident_model):
    engine = _engine(confident_model)
    sample = CFG.replace(temperature=2.0, seed=5)
    a = engine.generate(_prompts(3), sample)
    b = engine.generate(_prompts(3), sample)
    c = engine.generate(_prompts(3), sample.replace(seed=6))
    greedy = engine.generate(_prompts(3), CFG)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    assert [g.token_ids for g in a] != [g.token_ids for g in greedy]


@pytest.mark.parametrize("narrowing", [dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0)])
def test_sampling_narrowed_to_the_most_likely_token_is_greedy_decoding(confident_model, narrowing):
    """top_k / top_p / min_p choose the token; the commit order keeps the unfiltered confidence, so
    leaving one candidate gives greedy decoding's tokens in its forwards."""
    engine = _engine(confident_model)
    greedy = engine.generate(_prompts(8), CFG)
    narrow = engine.generate(_prompts(8), CFG.replace(temperature=2.0, seed=5, **narrowing))
    assert [(g.token_ids, g.num_forwards) for g in narrow] == [(g.token_ids, g.num_forwards) for g in greedy]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_top_p_ranks_a_few_candidates_first_and_samples_what_ranking_the_whole_vocabulary_samples(talkative_model,
                                                                                                   device):
    """Open nuclei (top_p without top_k) are looked for among the engine's first `nucleus_candidates`
    tokens, and ranked over the whole vocabulary where they reach past them: the same draws as ranking
    the whole vocabulary every time (nucleus_candidates 0), in a group with a top_k row and a greedy one."""
    talkative_model = copy.deepcopy(talkative_model).to(device)
    hot = CFG.replace(temperature=1.5, ignore_eos=True)
    settings = [hot.replace(seed=1, top_p=0.9), hot.replace(seed=2, top_p=0.5, min_p=0.01),
                hot.replace(seed=3, top_p=0.8, top_k=4), CFG.replace(ignore_eos=True)]
    answers, syncs = [], []
    for candidates in (0, 3):
        engine = _engine(talkative_model, nucleus_candidates=candidates, compile_blocks=False)  # test time
        answers.append([g.token_ids for g in engine.generate(_prompts(4), settings)])
        syncs.append(engine.stats()["host_syncs"] / engine.stats()["total_forwards"])
    assert answers[0] == answers[1]
    assert syncs[0] == 1 and syncs[1] > 1  # finding the wide nuclei reads them on the host
    with pytest.raises(ValueError, match="nucleus_candidates must be >= 0"):
        _engine(talkative_model, nucleus_candidates=-1)
    assert len({tuple(a) for a in answers[0][:2]}) == 2 and all(len(a) == CFG.max_new_tokens for a in answers[0])


def test_top_k_samples_each_token_among_the_k_most_likely_at_its_commit(confident_model):
    """Checked against the model's own top-3 at the forward that committed each token (logprobs)."""
    engine = _engine(confident_model)
    hot = CFG.replace(temperature=3.0, seed=5, logprobs=3)

    def outside_top3(gens):
        return sum(e.token_id not in [t for t, _ in e.top] for g in gens for e in g.logprobs)

    assert outside_top3(engine.generate(_prompts(8), hot)) > 0
    narrowed = engine.generate(_prompts(8), hot.replace(top_k=3))
    assert outside_top3(narrowed) == 0 and sum(len(g.token_ids) for g in narrowed) > 50


def test_logit_bias_bans_or_forces_tokens(confident_model):
    engine = _engine(confident_model)
    greedy = engine.generate(_prompts(8), CFG)
    common = collections.Counter(t for g in greedy for t in g.token_ids).most_common(1)[0][0]
    banned = engine.generate(_prompts(8), CFG.replace(logit_bias={common: -100.0}))
    assert not any(common in g.token_ids for g in banned)
    forced = engine.generate(_prompts(8), CFG.replace(logit_bias={30: 100.0}, logprobs=0))
    for g in forced:  # every position, stop tokens outbid: the answer runs to the cap
        assert g.finish_reason == "length" and set(g.token_ids) == {30}
        assert max(e.logprob for e in g.logprobs) < -1  # logprobs stay the model's, before the bias
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request([7, 8], CFG.replace(logit_bias={10**6: 1.0}))


def test_allowed_token_ids_generate_only_those_tokens_as_a_ban_on_all_others_would(confident_model):
    """allowed_token_ids mask every other token at every position: greedy answers are those of logit_bias
    -100 on every other token (exp(-100) is no probability), with EOS ending them where it is allowed."""
    engine = _engine(confident_model)
    eos, vocab = confident_model.config.eos_token_id, confident_model.config.embedding_size
    greedy = engine.generate(_prompts(8), CFG)
    common = [t for t, _ in collections.Counter(t for g in greedy for t in g.token_ids).most_common()]
    allowed = common[1:] + [eos]  # all the answers' tokens but their most common one
    only = engine.generate(_prompts(8), CFG.replace(allowed_token_ids=allowed))
    banned = engine.generate(_prompts(8), CFG.replace(
        logit_bias={t: -100.0 for t in range(vocab) if t not in allowed and t != engine.mask_id}))
    assert [g.token_ids for g in only] == [g.token_ids for g in banned]
    assert all(set(g.token_ids) <= set(allowed) for g in only)
    assert {g.finish_reason for g in only} == {"stop", "length"}
    assert [g.token_ids for g in only] != [g.token_ids for g in greedy]  # it did change the answers
    # Without EOS in the list nothing can end the answer but its length.
    endless = engine.generate(_prompts(8), CFG.replace(allowed_token_ids=allowed[:-1], temperature=1.0, seed=2))
    assert all(g.finish_reason == "length" and set(g.token_ids) <= set(allowed[:-1]) for g in endless)


@pytest.mark.parametrize("changes", [
    {"decoder": "factor"}, {"decoder": "credit"}, {"decoder": "hierarchical"}, {"decoder": "fixed_k"},
    {"smoothing": True}, {"temperature": 1.0, "seed": 3, "top_p": 0.9}, {"presence_penalty": 2.0, "min_tokens": 6},
    {"cache_policy": "vicinity"}])
def test_allowed_token_ids_hold_under_every_decoder_and_sampling_setting(confident_model, changes):
    engine = _engine(confident_model)
    greedy = engine.generate(_prompts(6), CFG)
    common = [t for t, _ in collections.Counter(t for g in greedy for t in g.token_ids).most_common()]
    allowed = common[1:] + [confident_model.config.eos_token_id]
    gens = engine.generate(_prompts(6), CFG.replace(allowed_token_ids=allowed, **changes))
    assert all(set(g.token_ids) <= set(allowed) for g in gens) and sum(len(g.token_ids) for g in gens) > 20


@pytest.mark.parametrize("allowed,extra,match", [
    ([10**6], {}, "outside the vocabulary"),
    (["mask"], {}, "mask token"),
    (["eos"], {"min_tokens": 4}, "all stop tokens"),
])
def test_allowed_token_ids_that_leave_a_position_nothing_to_take_are_refused(confident_model, allowed, extra, match):
    engine = _engine(confident_model)
    named = {"mask": engine.mask_id, "eos": confident_model.config.eos_token_id}
    with pytest.raises(ValueError, match=match):
        engine.add_request([7, 8], CFG.replace(allowed_token_ids=[named.get(t, t) for t in allowed], **extra))


def test_allowed_token_ids_must_be_a_list_of_ids_and_do_not_go_with_json_mode():
    with pytest.raises(ValueError, match="allowed_token_ids"):
        GenerationConfig(allowed_token_ids=[])
    with pytest.raises(ValueError, match="allowed_token_ids"):
        GenerationConfig(allowed_token_ids=[-1])
    with pytest.raises(ValueError, match="does not go with response_format"):
        GenerationConfig(allowed_token_ids=[5], response_format="json_object")


def _flat(model):
    """The model with every logit 0: the decoders see only logit_bias and the penalties."""
    flat = copy.deepcopy(model)
    flat.model.transformer["ff_out"].weight.data.zero_()
    return flat


def penalised_greedy(bias: dict, prompt: list, steps: int, presence=0.0, frequency=0.0, repetition=1.0) -> list:
    """vLLM's penalties written out: one greedy token per step over logits = bias (0 elsewhere)."""
    counts = collections.Counter()

    def logit(t):
        x = bias[t]
        if t in prompt or counts[t]:
            x = x / repetition if x > 0 else x * repetition
        return x - frequency * counts[t] - presence * (counts[t] > 0)

    out = []
    for _ in range(steps):
        out.append(max(bias, key=logit))
        counts[out[-1]] += 1
    return out


def _in_commit_order(gen) -> list:
    """A generation's tokens in the order its steps committed them (record_trajectory)."""
    return [t for block in gen.trajectory for _, t in sorted(zip(block.reveal_step, block.tokens))]


@pytest.mark.parametrize("bias, penalties", [
    ({30: 5.0, 31: 4.4}, {"frequency_penalty": 0.25}),  # A A A B ...: each use costs 0.25
    ({30: 3.0, 31: 2.5, 32: 1.8}, {"presence_penalty": 1.0}),  # A B A A ...: the first use costs 1, no more
    ({30: 3.0, 31: 2.0}, {"repetition_penalty": 2.0}),  # 30 is in the prompt: B first
    ({30: 2.05, 31: 2.5, 32: 2.4}, {"presence_penalty": -1.0, "frequency_penalty": 0.3}),
])
def test_penalties_follow_vllms_formula_over_the_tokens_committed_so_far(confident_model, bias, penalties):
    """One token per step over two blocks: the second block's steps see the first block's tokens too."""
    engine = _engine(_flat(confident_model))
    prompt = [30, 12, 13]
    cfg = CFG.replace(decoder="fixed_k", max_new_tokens=2 * B, logit_bias=bias, record_trajectory=True, **penalties)
    gen = engine.generate([prompt], cfg)[0]
    expected = penalised_greedy(bias, prompt, 2 * B, *(penalties.get(f"{x}_penalty", d) for x, d in
                                                       (("presence", 0.0), ("frequency", 0.0), ("repetition", 1.0))))
    assert _in_commit_order(gen) == expected and len(set(expected)) > 1
    assert penalised_greedy(bias, prompt, 2 * B) != expected  # the penalties changed the answer


def test_penalised_rows_decode_as_alone_in_a_mixed_batch_and_unrolled(talkative_model):
    prompts = _prompts(6)
    cfgs = [CFG.replace(stops_last=True, **kw) for kw in (
        dict(frequency_penalty=1.5), {}, dict(presence_penalty=2.0, repetition_penalty=1.5), dict(repetition_penalty=3.0),
        dict(temperature=1.0, seed=3, frequency_penalty=-0.5), dict(presence_penalty=0.7))]
    alone = [_engine(talkative_model).generate([p], c)[0].token_ids for p, c in zip(prompts, cfgs)]
    assert alone != [_engine(talkative_model).generate([p], c.replace(presence_penalty=0.0, frequency_penalty=0.0,
                                                                      repetition_penalty=1.0))[0].token_ids
                     for p, c in zip(prompts, cfgs)]
    assert [g.token_ids for g in _engine(talkative_model).generate(prompts, cfgs)] == alone
    unrolled = _engine(talkative_model, max_unroll=4, expected_tpf=1.0).generate(prompts, cfgs)
    assert [g.token_ids for g in unrolled] == alone


def test_penalties_do_not_count_stop_tokens(confident_model):
    """An EOS run committed early must not push the block's other masks away from EOS; with ignore_eos
    EOS is output like any token and counted."""
    engine = _engine(_flat(confident_model))
    eos = confident_model.config.eos_token_id
    cfg = CFG.replace(decoder="fixed_k", max_new_tokens=B, logit_bias={eos: 5.0, 30: 4.5}, frequency_penalty=1.0,
                      record_trajectory=True)
    assert engine.generate([[12, 13]], cfg)[0].trajectory[0].tokens == [eos] * B
    counted = engine.generate([[12, 13]], cfg.replace(ignore_eos=True))[0]
    assert _in_commit_order(counted) == penalised_greedy({eos: 5.0, 30: 4.5}, [12, 13], B, frequency=1.0)
    for name, value in [("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0),
                        ("repetition_penalty", float("inf")), ("presence_penalty", float("nan"))]:
        with pytest.raises(ValueError, match=name):
            CFG.replace(**{name: value})


@pytest.mark.parametrize("decoder", ["factor", "credit", "hierarchical", "fixed_k"])
def test_every_decoder_generates_valid_output(confident_model, decoder):
    gens = _engine(confident_model).generate(_prompts(4), CFG.replace(decoder=decoder, tokens_per_step=2))
    for g in gens:
        assert g.finish_reason in ("stop", "length")
        assert confident_model.config.mask_token_id not in g.token_ids
    if decoder == "fixed_k":  # exactly 2 tokens per forward: B/2 forwards per block
        assert all(g.num_forwards == g.num_blocks * B // 2 for g in gens)


def test_iteration_smoothing_feeds_expected_embeddings_to_masked_positions(confident_model):
    model = copy.deepcopy(confident_model)
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("inputs_embeds"))
        return forward(*args, **kwargs)

    model.forward = spy
    engine = _engine(model)
    gens = engine.generate(_prompts(2)[1:], CFG.replace(smoothing=True))
    assert gens[0].finish_reason in ("stop", "length")
    table = confident_model.embedding_weight.detach()
    assert all(e is not None for e in seen)  # smoothing runs on the embeddings input path
    # Denoise forwards (B inputs) carry mask embedding + alpha * E[embedding] at still-masked
    # positions: input rows that are no token's embedding.
    denoise = [e[0] for e in seen if e.shape[1] == B]
    soft_rows = [row for e in denoise for row in e if torch.cdist(row[None], table).min() > 1e-4]
    assert soft_rows


def test_requests_are_compared_by_identity_not_by_their_fields():
    # The scheduler tests membership (`req in running`) every step for every request: by identity it is a
    # pointer compare, where the dataclass's field-by-field __eq__ made a step quadratic in the batch.
    from dllm.engine.request import Request
    a, b = (Request("r", [1], CFG, 8, frozenset()) for _ in range(2))
    assert a == a and a != b
    assert len({a, b}) == 2 and [b].count(a) == 0


def test_iteration_smoothing_threshold_decays_from_one_to_tau(confident_model):
    from dllm.engine.request import Request
    engine = _engine(confident_model)
    cfg = CFG.replace(smoothing=True, threshold=0.8)
    r = Request("r", [1], cfg, 8, frozenset())
    assert engine._threshold(r) == 1.0
    r.steps = 5
    assert abs(engine._threshold(r) - 0.9) < 1e-9
    r.steps = 50
    assert engine._threshold(r) == 0.8


def test_streamed_blocks_add_up_to_the_final_answer(confident_model, char_tokenizer):
    engine = _engine(confident_model, char_tokenizer)
    rid = engine.add_request(_prompts(2)[1], CFG)  # a multi-block answer
    tokens, text, final = [], "", None
    blocks = 0
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            tokens += out.new_token_ids
            text += out.new_text
            blocks += bool(out.new_token_ids) and not out.finished
            final = out.generation if out.finished else final
    assert final is not None and tokens == final.token_ids and text == final.text
    assert blocks >= 1


def test_abort_frees_the_slot_and_leaves_others_untouched(model64):
    prompts = _prompts(2)
    alone = _engine(model64).generate([prompts[1]], CFG)[0]
    engine = _engine(model64, max_batch_size=2)
    a = engine.add_request(prompts[0], CFG.replace(max_new_tokens=200))
    b = engine.add_request(prompts[1], CFG)
    engine.step()
    engine.step()
    assert engine.cache.free_slots == 0
    assert engine.abort(a)
    assert engine.cache.free_slots == 1
    assert not engine.abort(a)  # already gone
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.generation
    assert finished[a].finish_reason == "abort"
    assert finished[b].token_ids == alone.token_ids


def test_more_requests_than_slots_wait_and_all_complete(confident_model):
    engine = _engine(confident_model, max_batch_size=2)
    gens = engine.generate(_prompts(6), CFG)
    alone = [_engine(confident_model).generate([p], CFG)[0] for p in _prompts(6)]
    assert len(gens) == 6 and all(g.finish_reason in ("stop", "length") for g in gens)
    assert [g.token_ids for g in gens] == [g.token_ids for g in alone]
    assert engine.cache.free_slots == 2


def test_prompt_that_can_never_fit_is_refused_clearly(confident_model):
    engine = _engine(confident_model, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len=32"):
        engine.add_request(list(range(7, 7 + 30)), CFG)
    # A prompt that fits but leaves room for fewer tokens than asked is capped by the slot.
    g = engine.generate([[7, 8, 9]], CFG.replace(max_new_tokens=500))[0]
    assert len(g.token_ids) <= 32 - 3
    # A pool smaller than one request's prompt and answer: refused up front, not left waiting forever.
    small = _engine(confident_model, kv_cache_tokens=40)
    with pytest.raises(ValueError, match=r"needs 51 cache positions, but the KV cache holds 40 \(kv_cache_tokens\)"):
        small.add_request([7, 8, 9], CFG)
    assert small.generate([[7, 8, 9]], CFG.replace(max_new_tokens=32))[0].finish_reason in ("stop", "length")
    with pytest.raises(ValueError, match="kv_cache_tokens must be >= 1"):
        _engine(confident_model, kv_cache_tokens=0)


def test_bad_requests_are_rejected(confident_model):
    engine = _engine(confident_model)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("text without a tokenizer")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([10**6])
    with pytest.raises(ValueError, match="decoder"):
        GenerationConfig(decoder="beam")
    with pytest.raises(ValueError, match="threshold"):
        GenerationConfig(threshold=0.0)
    with pytest.raises(ValueError, match="cache_policy"):
        GenerationConfig(cache_policy="paged")
    for min_tokens in (-1, 49, 1.5):
        with pytest.raises(ValueError, match="min_tokens"):
            CFG.replace(min_tokens=min_tokens)
    for logprobs in (-1, 21, True, 2.0):
        with pytest.raises(ValueError, match="logprobs"):
            GenerationConfig(logprobs=logprobs)
    for decoder in dllm.engine.DECODERS:  # a threshold below hierarchical's low threshold (0.6) is fine
        GenerationConfig(decoder=decoder, threshold=0.3)
    for name, value in [("low_threshold", 1.5), ("top_k", -1), ("top_k", 2.0), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1),
                        ("min_p", 1.5), ("logit_bias", {-1: 1.0}), ("logit_bias", {3: 101.0}),
                        ("logit_bias", {"3": 1.0}), ("logit_bias", [3])]:
        with pytest.raises(ValueError, match=name):
            CFG.replace(**{name: value})


def reference_refreshing_generate(ref: ReferenceLLaDA, prompt, cfg):
    """The recomputing cache policies written out plainly: each denoise step recomputes the last
    `vicinity` committed tokens (all of them for policy "none") together with the block and keeps
    their fresh K/V; every new block starts with a forward over the whole context."""
    mask, stops = cfg_ids(ref)
    b = cfg.block_size

    def decode(block, logits):
        threshold_decode(block, logits, mask, cfg.threshold)

    generated, forwards = [], 0
    while True:
        context, block = prompt + generated, [mask] * b
        logits, kv = ref.forward(torch.tensor(context + block))  # prefill, or the full refresh of a new block
        past, forwards = keep(kv, len(context)), forwards + 1
        decode(block, logits[-b:])
        while mask in block:
            left = len(context) if cfg.cache_policy == "none" else min(cfg.vicinity, len(context))
            logits, kv = ref.forward(torch.tensor(context[len(context) - left:] + block),
                                     past=keep(past, len(context) - left))
            past, forwards = keep(kv, len(context)), forwards + 1
            decode(block, logits[-b:])
        result = finished_answer(generated, block, stops, cfg.max_new_tokens, forwards)
        if result:
            return result
        generated += block


@pytest.mark.parametrize("policy,vicinity", [("vicinity", 4), ("vicinity", 0), ("none", 16)])
def test_recomputing_cache_policies_match_a_plain_implementation(model64, policy, vicinity):
    ref = ReferenceLLaDA(model64.state_dict(), model64.config)
    cfg = CFG.replace(cache_policy=policy, vicinity=vicinity)
    gens = _engine(model64).generate(_prompts(), cfg)  # prompts of different lengths share forwards
    for prompt, gen in zip(_prompts(), gens):
        tokens, reason, forwards = reference_refreshing_generate(ref, prompt, cfg)
        assert (gen.token_ids, gen.finish_reason, gen.num_forwards) == (tokens, reason, forwards)


def test_cache_policies_mix_in_one_batch(model64):
    prompts = _prompts(6)
    policies = ["dllm-var", "vicinity", "none"] * 2
    alone = [_engine(model64).generate([p], CFG.replace(cache_policy=c))[0].token_ids for p, c in zip(prompts, policies)]
    together = _engine(model64).generate(prompts, [CFG.replace(cache_policy=c) for c in policies])
    assert [g.token_ids for g in together] == alone


def test_fused_projections_give_the_same_tokens(tiny_config):
    from conftest import TALKATIVE, make_confident_model

    cfg = GenerationConfig(block_size=16, threshold=0.9, max_new_tokens=48)
    separate = _engine(make_confident_model(tiny_config, **TALKATIVE)).generate(_prompts(6), cfg)  # CPU: not fused
    assert all(g.token_ids for g in separate)
    engine = _engine(make_confident_model(tiny_config, **TALKATIVE), fuse_projections=True)
    assert engine.model.model.transformer["blocks"][0]._fused is not None
    fused = engine.generate(_prompts(6), cfg)
    assert [g.token_ids for g in fused] == [g.token_ids for g in separate]
    assert [g.num_forwards for g in fused] == [g.num_forwards for g in separate]


@pytest.mark.parametrize("early_stop,stops_last", [(False, False), (True, False), (False, True), (True, True)])
def test_unrolled_denoise_steps_give_the_same_tokens(talkative_model, early_stop, stops_last):
    """Loop unrolling runs several denoise steps per host sync: the answers are identical, forwards
    spent on blocks that finished inside an unrolled run are counted."""
    cfg = GenerationConfig(block_size=16, threshold=0.99, max_new_tokens=48, early_stop=early_stop, stops_last=stops_last,
                           logprobs=2)
    prompts = _prompts(6)
    plain = _engine(talkative_model).generate(prompts, cfg)
    assert all(g.token_ids for g in plain)
    engine = _engine(talkative_model, max_unroll=4, expected_tpf=1.0)
    unrolled = engine.generate(prompts, cfg)
    assert [g.token_ids for g in unrolled] == [g.token_ids for g in plain]
    assert [g.logprobs for g in unrolled] == [g.logprobs for g in plain]
    assert [g.finish_reason for g in unrolled] == [g.finish_reason for g in plain]
    assert sum(g.num_forwards for g in unrolled) >= sum(g.num_forwards for g in plain)
    assert engine.stats()["host_syncs"] < engine.stats()["total_forwards"]  # several steps per sync


def test_logprobs_are_the_models_log_probabilities_in_the_forward_that_committed_each_token(model64):
    """cache_policy "none" recomputes the whole context in every forward, so the forward that committed
    a token is model(prompt + earlier blocks + the block as it was then): its log-softmax (MASK
    excluded) at the token's position gives the token's logprob and its top-k. Sampled tokens and
    credit decoding report the model's own distribution too; rows without logprobs share the batch."""
    prompts = _prompts(5)
    settings = [dict(logprobs=3), dict(logprobs=0, temperature=1.0, seed=5), dict(logprobs=None),
                dict(logprobs=5, temperature=1.0, seed=6), dict(logprobs=2, decoder="credit")]
    cfgs = [CFG.replace(cache_policy="none", record_trajectory=True, **kw) for kw in settings]
    gens = _engine(model64).generate(prompts, cfgs)
    mask = model64.config.mask_token_id
    checked = 0
    for prompt, cfg, g in zip(prompts, cfgs, gens):
        if cfg.logprobs is None:
            assert g.logprobs is None
            continue
        assert [e.token_id for e in g.logprobs] == g.token_ids and g.token_ids
        for k, block in enumerate(g.trajectory):
            before = g.token_ids[:k * B]
            for j, (token, step) in enumerate(zip(block.tokens, block.reveal_step)):
                if k * B + j >= len(g.token_ids):
                    break
                state = [t if block.reveal_step[i] < step else mask for i, t in enumerate(block.tokens)]
                with torch.no_grad():
                    logits = model64(torch.tensor([prompt + before + state]))[0, len(prompt) + len(before) + j]
                logits[mask] = float("-inf")
                expected = torch.log_softmax(logits, -1)
                entry = g.logprobs[k * B + j]
                assert entry.logprob == pytest.approx(expected[token].item(), abs=1e-5)
                top = expected.topk(cfg.logprobs)
                assert [t for t, _ in entry.top] == top.indices.tolist()
                assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-5)
                if cfg.temperature == 0 and cfg.decoder == "threshold":
                    assert entry.top[0] == (token, entry.logprob)  # greedy: the most likely token
                checked += 1
    assert checked > 40


def test_streamed_logprobs_follow_the_tokens_and_stop_strings_cut_them(talkative_model, char_tokenizer):
    engine = _engine(talkative_model, char_tokenizer)
    cfg = CFG.replace(logprobs=1, early_stop=True, stops_last=True)
    plain = engine.generate(_prompts(6), cfg)
    long = max(plain, key=lambda g: len(g.text))
    assert len(long.logprobs) == len(long.token_ids) > B  # more than one block
    stop = long.text[B + 2:B + 4]  # in the second block
    rid = engine.add_request(_prompts(6)[plain.index(long)], cfg.replace(stop=[stop]))
    tokens, logprobs, final = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid and len(out.new_logprobs) == len(out.new_token_ids)
            tokens += out.new_token_ids
            logprobs += out.new_logprobs
            final = out.generation if out.finished else final
    assert final.text == long.text[: long.text.find(stop)]
    alone = final.logprobs  # decoded alone, `long` in a batch of six: the same values up to rounding
    assert [(e.token_id, [t for t, _ in e.top]) for e in alone] == \
        [(e.token_id, [t for t, _ in e.top]) for e in long.logprobs[:len(final.token_ids)]]
    assert [e.logprob for e in alone] == pytest.approx([e.logprob for e in long.logprobs[:len(alone)]], abs=1e-5)
    assert logprobs[:len(final.token_ids)] == final.logprobs and tokens[:len(final.token_ids)] == final.token_ids


def test_unrolling_needs_sane_settings(confident_model):
    with pytest.raises(ValueError, match="max_unroll"):
        _engine(confident_model, max_unroll=0)


EVERY_DECODING_SETTING = [CFG.replace(decoder=d, tokens_per_step=2, early_stop=d == "credit")
                          for d in ("threshold", "factor", "credit", "hierarchical", "fixed_k")]
EVERY_DECODING_SETTING += [CFG.replace(temperature=1.5, seed=3), CFG.replace(smoothing=True),
                           CFG.replace(stops_last=True), CFG.replace(decoder="factor", stops_last=True, early_stop=True),
                           CFG.replace(logprobs=4), CFG.replace(min_tokens=10, stops_last=True),
                           CFG.replace(temperature=1.0, seed=4, top_k=5, top_p=0.8, min_p=0.05, logit_bias={9: -100.0}),
                           CFG.replace(temperature=0.7, seed=5, top_k=3, logit_bias={12: 2.5, 14: -3.0}),
                           CFG.replace(temperature=0.8, seed=6, presence_penalty=0.5, frequency_penalty=0.4,
                                       repetition_penalty=1.3)]


def _stops_before_their_content(gens, stop_ids) -> int:
    """Stop tokens committed at an earlier step than some position to their left (record_trajectory)."""
    return sum(1 for g in gens for block in g.trajectory for j, t in enumerate(block.tokens)
               if t in stop_ids and any(block.reveal_step[i] > block.reveal_step[j] for i in range(j)))


@pytest.mark.parametrize("decoder", ["threshold", "factor", "credit", "hierarchical", "fixed_k"])
def test_stops_last_commits_no_stop_token_before_the_positions_left_of_it(confident_model, decoder):
    """stops_last settles the answer's length after its content; plain confidence order commits
    this model's confident EOS runs first (the failure that cuts trained models' answers short)."""
    engine = _engine(confident_model)
    cfg = CFG.replace(decoder=decoder, tokens_per_step=2, record_trajectory=True)
    stops = engine.base_stop_ids
    assert _stops_before_their_content(engine.generate(_prompts(8), cfg), stops) > 0
    gens = engine.generate(_prompts(8), cfg.replace(stops_last=True))
    assert _stops_before_their_content(gens, stops) == 0
    assert any(t in stops for g in gens for block in g.trajectory for t in block.tokens)


def test_decoding_copies_nothing_from_the_host_once_the_forward_is_queued(confident_model, monkeypatch):
    """Every request's decoder parameters reach the device before its forward is launched: on CUDA a
    host->device copy after the launch waits for the forward, a host sync inside the step."""
    engine = _engine(confident_model, max_unroll=4, expected_tpf=1.0)
    made_from_host = []
    real_tensor = torch.tensor

    def recording(*args, **kwargs):
        made_from_host.append(args[0])
        return real_tensor(*args, **kwargs)

    def host_free(fn):
        def wrapped(*args, **kwargs):
            monkeypatch.setattr(torch, "tensor", recording)
            try:
                return fn(*args, **kwargs)
            finally:
                monkeypatch.setattr(torch, "tensor", real_tensor)
        return wrapped

    engine._decode = host_free(engine._decode)  # runs after the forward is queued ...
    engine._finished_blocks = host_free(engine._finished_blocks)  # ... and up to the step's one sync
    gens = engine.generate(_prompts(len(EVERY_DECODING_SETTING)), EVERY_DECODING_SETTING)
    assert all(g.finish_reason in ("stop", "length") for g in gens)
    assert engine.total_forwards > 0 and made_from_host == []


@pytest.mark.gpu
def test_decoding_does_not_sync_with_the_host_on_cuda(confident_model):
    engine = _engine(copy.deepcopy(confident_model).to("cuda", torch.bfloat16), max_unroll=4, expected_tpf=1.0)
    decode = engine._decode

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")  # any op that waits for the GPU raises
        try:
            return decode(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    engine._decode = strict
    gens = engine.generate(_prompts(len(EVERY_DECODING_SETTING)), EVERY_DECODING_SETTING)
    assert all(g.finish_reason in ("stop", "length") for g in gens)


@pytest.mark.gpu
@pytest.mark.parametrize("unroll,buckets", [(1, None), (4, None), (1, (1, 2, 4))])
def test_decode_graphs_on_cuda_commit_what_the_eager_decoders_commit(talkative_model, monkeypatch, unroll, buckets):
    """Greedy rows of every stateless decoder (a group's rows each choosing their rule in the graph) decode
    the same tokens with their decode step replayed as a graph as with the decoders run eagerly after the
    forward's graph; the decode graphs read and write the device's buffers only. With buckets up to 4, the
    group of 5 replays as a chunk of 4 and one of 1: every forward but the prefill is a replay."""
    if buckets is not None:
        monkeypatch.setattr(cuda_graphs, "ROW_BUCKETS", buckets)
    model = copy.deepcopy(talkative_model).to("cuda", torch.bfloat16)
    settings = [CFG.replace(stops_last=True), CFG.replace(decoder="factor", factor=2.0, early_stop=True),
                CFG.replace(decoder="hierarchical", threshold=0.95, low_threshold=0.5),
                CFG.replace(decoder="fixed_k", tokens_per_step=2),
                CFG.replace(threshold=0.7, early_stop=True, stop_token_ids=[20, 21, 22, 23, 24])]
    prompts = _prompts(len(settings))
    kw = dict(cuda_graphs=True, compile_blocks=False, max_unroll=unroll, expected_tpf=1.0)  # no compile: test time
    eager = _engine(model, decode_graphs=False, **kw).generate(prompts, settings)
    engine = _engine(model, decode_graphs=True, **kw)
    graphed = engine.generate(prompts, settings)
    assert engine.graphs.step_replays == engine.graphs.replays > 0
    assert [g.token_ids for g in graphed] == [g.token_ids for g in eager]
    assert [g.num_forwards for g in graphed] == [g.num_forwards for g in eager]
    if buckets is not None:
        assert engine.total_forwards - engine.graphs.replays == 1  # the prompts' prefill


@pytest.mark.gpu
def test_an_fp8_model_on_cuda_decodes_under_graphs_and_compiled_blocks_what_it_decodes_eagerly(talkative_model):
    """quantization="fp8" on the tensor cores (torch._scaled_mm, per-token input scales on the device):
    captured in CUDA graphs with the compiled block functions, the same tokens as eager FP8 forwards."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability >= 8.9")
    settings = [CFG.replace(stops_last=True), CFG.replace(decoder="hierarchical", threshold=0.95, low_threshold=0.5),
                CFG.replace(temperature=1.0, seed=3, top_k=5)]
    prompts = _prompts(len(settings))
    bf16 = copy.deepcopy(talkative_model).to("cuda", torch.bfloat16)
    eager = _engine(copy.deepcopy(bf16), cuda_graphs=False, compile_blocks=False, quantization="fp8")
    expected = eager.generate(prompts, settings)
    engine = _engine(copy.deepcopy(bf16), cuda_graphs=True, compile_blocks=True, quantization="fp8")
    graphed = engine.generate(prompts, settings)
    assert engine.graphs.replays > 0 and engine.graphs.step_replays > 0
    assert [g.token_ids for g in graphed] == [g.token_ids for g in expected]
    assert [g.num_forwards for g in graphed] == [g.num_forwards for g in expected]
    assert any(g.token_ids for g in graphed)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", PREEMPTION_MODES)
def test_preemption_on_cuda_resumes_under_graphs_with_the_same_answers(talkative_model, rebuild_replays, mode):
    """CUDA graphs read the page table at every replay: a resumed request's new slot and pages need no
    capture, and its K/V come back from pinned host memory behind the same stream (swap) or from rebuild
    forwards that replay the COMMIT graphs (recompute; the prompt's, where needed, eagerly)."""
    model = copy.deepcopy(talkative_model).to("cuda")
    prompts, cfg = _prompts(8), CFG.replace(ignore_eos=True)
    roomy = _engine(model, cuda_graphs=True).generate(prompts, cfg)
    need = max(_engine(model).cache.pages_for(len(p) + CFG.max_new_tokens) for p in prompts)
    engine = _engine(model, kv_cache_tokens=2 * need * 4, cuda_graphs=True, preemption_mode=mode)
    replays_per_rebuild = rebuild_replays(engine)
    gens = engine.generate(prompts, cfg)
    assert engine.stats()["preemptions"] > 0 and engine.graphs.replays > 0
    assert engine.stats()["swapped_bytes" if mode == "swap" else "rebuilt_tokens"] > 0
    assert (sum(replays_per_rebuild) > 0) == (mode == "recompute")  # committed blocks rebuilt through COMMIT graphs
    assert [g.token_ids for g in gens] == [g.token_ids for g in roomy]
