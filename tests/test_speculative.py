"""Speculative decoding (exec/draft.py, exec/verify.py): proposals, the acceptance rules
(standard by default, the margin test with --draft-exact), the caches every rank trims, and the
tokens, which must be those of plain decoding (standard: up to ties within rounding).

Most tests drive the real Driver and Workers over the in-process ring of test_engine.py; the
last ones run one-shot jobs over mpirun and compare --json token ids with and without
prompt lookup."""

from __future__ import annotations


import mlx.core as mx
import pytest

from conftest import reference_tokens, run_json
from test_engine import PROMPTS, LocalNet, _driver
from pipeline.exec import draft, verify as verify_mod
from pipeline.exec.draft import (DraftControl, DraftModel, DraftOptions, PromptLookup,
                                 cache_limit, load_draft_model)
from pipeline.exec.sampling import Sampler, SamplingParams, logprobs_of
from pipeline.exec.verify import verify
from pipeline.model.load import load_stage, read_config
from pipeline.model.spec import ModelError
from pipeline.wire.protocol import Op


# -- proposals -------------------------------------------------------------------------------
def test_prompt_lookup_follows_the_latest_earlier_occurrence():
    look = PromptLookup([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert look.propose(3) == [7, 8, 5]  # "2 3" last seen before at 6-7, followed by 7 8 5
    look.extend([4])
    assert look.propose(2) == []  # 3-, 2- and 1-grams ending in 4: never seen before
    look.extend([1, 2, 3])
    assert look.propose(2) == [7, 8]  # the 3-gram "1 2 3" wins over the later "2 3" (4 1)


def test_prompt_lookup_copies_a_repeating_pattern_ahead():
    look = PromptLookup([5, 6, 7, 5, 6, 7, 5])
    assert look.propose(6) == [6, 7, 5, 6, 7, 5]  # runs past the present: copies itself
    assert PromptLookup([4]).propose(3) == []


def test_draft_control_adapts_k_and_pauses_while_drafting_does_not_pay():
    control = DraftControl(cap=6)
    assert control.wanted() == draft.START_DRAFT
    control.record(4, 4)
    assert control.wanted() == 6  # +2 after a full acceptance, capped
    control.record(6, 6)
    assert control.k == 6
    control.record(6, 2)
    assert control.k == 5  # -1 after a rejection
    control = DraftControl(cap=8)
    for _ in range(draft.WINDOW):
        control.record(1, 0)
    assert control.k == 1 and control.pauses == 1
    assert [control.wanted() for _ in range(draft.PAUSE_MIN)] == [0] * draft.PAUSE_MIN
    assert control.wanted() == 1  # the pause is over: it probes again
    for _ in range(draft.WINDOW):
        control.record(1, 0)
    assert control.pauses == 2 and control.paused_for == 2 * draft.PAUSE_MIN
    control.paused_for = 0
    for _ in range(draft.WINDOW):
        control.record(1, 1)  # a good window: the next pause starts short again
    assert control.pause == draft.PAUSE_MIN


def test_cache_limit_by_cache_kind(model_dir):
    def stage_of(like):
        path = model_dir(like)
        config = read_config(path)
        return load_stage(path, config, (0, config["num_hidden_layers"]), with_head=True)

    assert cache_limit(stage_of("tiny-llama")) == (None, None)
    window = read_config(model_dir("tiny-gemma3"))["sliding_window"]
    assert cache_limit(stage_of("tiny-gemma3")) == (window, None)

    from mlx_lm.models.cache import ArraysCache

    stage = stage_of("tiny-llama")
    stage.cache_factory = lambda: [ArraysCache(2) for _ in range(7)]
    limit, why = cache_limit(stage)
    assert limit == 0 and "ArraysCache cannot be rolled back" in why


# -- the acceptance rule ---------------------------------------------------------------------
def _logits(rows: list[list[float]]) -> mx.array:
    return mx.array(rows, dtype=mx.float32)


@pytest.mark.parametrize("exact", [False, True])
def test_verify_greedy_takes_the_agreeing_prefix_and_one_more(exact):
    greedy = Sampler(SamplingParams())
    rows = _logits([[0, 5, 1, 0], [0, 0, 6, 1], [3, 0, 0, 1], [0, 0, 0, 2]])  # argmax 1 2 0 3
    v = verify(rows, [1, 2, 0], greedy, exact=exact)
    assert (v.tokens, v.accepted, v.near_tie) == ([1, 2, 0, 3], 3, False)  # all + bonus
    v = verify(rows, [1, 3, 0], greedy, exact=exact)
    assert (v.tokens, v.accepted, v.near_tie) == ([1, 2], 1, False)  # correction at 1
    v = verify(rows, [2, 2, 0], greedy, exact=exact)
    assert (v.tokens, v.accepted, v.near_tie) == ([1], 0, False)  # the first one rejected


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_standard_greedy_keeps_the_argmax_whatever_the_margin(dtype):
    """The default keeps a proposal iff it is the row's argmax, however close the runner-up
    (here within the dtype's rounding, where the exact mode stops), and takes the argmax of
    the first row whose proposal is not it; no near tie, no plain step after it."""
    greedy = Sampler(SamplingParams())
    tie = _logits([[0, 5, 1, 0], [0, 4, 4.02, 0], [3, 0, 0, 1]]).astype(dtype)
    assert mx.argmax(tie, axis=-1).tolist() == [1, 2, 0]  # still apart after the cast
    v = verify(tie, [1, 2], greedy)
    assert (v.tokens, v.accepted, v.near_tie) == ([1, 2, 0], 2, False)
    v = verify(tie, [1, 1], greedy)  # the runner-up by a hair is still not the argmax
    assert (v.tokens, v.accepted, v.near_tie) == ([1, 2], 1, False)
    v = verify(tie, [3, 2], greedy)
    assert (v.tokens, v.accepted, v.near_tie) == ([1], 0, False)


def test_exact_mode_stops_at_a_near_tie_and_takes_nothing_from_it():
    greedy = Sampler(SamplingParams())
    tie = _logits([[0, 5, 1, 0], [0, 4, 4 + 1e-6, 0], [3, 0, 0, 1]])
    v = verify(tie, [1, 2], greedy, exact=True)
    assert (v.tokens, v.accepted, v.near_tie) == ([1], 1, True)
    # the margin scales with the dtype: far enough apart in float32 is a tie in bfloat16
    apart = _logits([[0, 5, 1, 0], [0, 4, 4.02, 0]])
    assert not verify(apart, [1], greedy, exact=True).near_tie
    assert verify(apart.astype(mx.bfloat16), [1], greedy, exact=True).near_tie


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("top_p,min_p", [(1.0, 0.0), (0.8, 0.0), (1.0, 0.1)])
def test_verify_sampled_draws_the_plain_paths_tokens(top_p, min_p, exact):
    """Position i draws with the key the plain path uses for its i-th token from here, so
    the verdict's tokens are the plain sampler's, for every seed."""
    rows = mx.random.normal((4, 64), key=mx.random.key(7)) * 2
    for seed in range(40 if exact else 20):
        params = SamplingParams(temp=0.9, top_p=top_p, min_p=min_p, seed=seed)
        plain = Sampler(params)
        expected = [plain(rows[i : i + 1] - mx.logsumexp(rows[i : i + 1], axis=-1))
                    for i in range(4)]
        v = verify(rows, expected[:3], Sampler(params), exact=exact)
        assert not v.near_tie and v.tokens == expected and v.accepted == 3
        wrong = [expected[0], (expected[1] + 1) % 64, expected[2]]
        v = verify(rows, wrong, Sampler(params), exact=exact)
        assert v.tokens == expected[:2] and v.accepted == 1


def test_verify_sampled_token_follows_the_target_distribution():
    """Chi-square: with a fixed proposal, the first token a pass gives is distributed as the
    model's p (the proposal accepted with probability p(x), else drawn from p without x)."""
    logits = _logits([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0, 0, 0, 0, 0, 0]])
    p = mx.softmax(logits[0]).tolist()
    draws = 3000
    counts = [0] * 6
    for seed in range(draws):
        counts[verify(logits, [1], Sampler(SamplingParams(temp=1.0, seed=seed))).tokens[0]] += 1
    chi2 = sum((c - draws * q) ** 2 / (draws * q) for c, q in zip(counts, p))
    assert chi2 < 20.5, (counts, chi2)  # 5 degrees of freedom: p = 0.001


# A bigram toy model over 3 tokens: row t holds the logits of the token after t. With
# temperature 0.8, top-p 0.9 and min-p 0.1 the cuts remove some tokens from some rows.
BIGRAM = [[1.2, 0.9, -1.5], [0.1, 0.3, 0.2], [2.5, -0.4, 0.6]]
BIGRAM_PARAMS = dict(temp=0.8, top_p=0.9, min_p=0.1)
START, LENGTH, RUNS = 1, 3, 1500
POSSIBLE = 16  # of the 27 sequences of 3 tokens, those the cuts leave a probability
CHI2_LIMIT = 37.7  # chi-square, POSSIBLE - 1 = 15 degrees of freedom, p = 0.001


def _bigram_sequence(seed: int, rule) -> tuple[int, ...]:
    """LENGTH tokens after START, decoded as the driver does: each pass proposes k = all the
    tokens left but one (a deterministic draft: the two tokens other than the last one), the
    rule gives the tokens taken, the sampler skips their draws."""
    table = _logits(BIGRAM)
    sampler = Sampler(SamplingParams(seed=seed, **BIGRAM_PARAMS))
    out = [START]
    while len(out) <= LENGTH:
        last, left = out[-1], LENGTH + 1 - len(out)
        proposals = [(last + 1) % 3, (last + 2) % 3][: left - 1]
        if not proposals:
            out.append(sampler(logprobs_of(table[last : last + 1])))
            continue
        taken = rule(table[mx.array([last, *proposals])], proposals, sampler)
        sampler.skip(len(taken))
        out.extend(taken)
    return tuple(out[1:])


def _bigram_target() -> dict:
    """Each sequence's probability under plain sampling: the product of its steps'
    probabilities in the processed distribution the plain sampler draws from."""
    import itertools

    table = _logits(BIGRAM)
    sampler = Sampler(SamplingParams(**BIGRAM_PARAMS))
    p = [mx.softmax(sampler.scores(logprobs_of(table[t : t + 1])), axis=-1)[0].tolist()
         for t in range(3)]
    target = {}
    for seq in itertools.product(range(3), repeat=LENGTH):
        prob, last = 1.0, START
        for t in seq:
            prob, last = prob * p[last][t], t
        target[seq] = prob
    return target


def _chi2(rule) -> float:
    counts: dict = {}
    for seed in range(RUNS):
        seq = _bigram_sequence(seed, rule)
        counts[seq] = counts.get(seq, 0) + 1
    target = _bigram_target()
    assert sum(q > 0 for q in target.values()) == POSSIBLE
    assert all(target[seq] > 0 for seq in counts), "a sequence plain sampling never gives"
    return sum((counts.get(seq, 0) - RUNS * q) ** 2 / (RUNS * q)
               for seq, q in target.items() if q > 0)


def test_sampled_drafting_leaves_the_output_distributed_as_plain_sampling():
    """Whole decoded sequences of the toy model, drafting with standard acceptance at
    temperature > 0 with cuts, against their probabilities under plain sampling; the same
    statistic rejects two wrong rules: keeping every proposal, and on a rejection drawing
    from p again without removing the proposal."""
    import numpy as np

    def standard(logits, proposals, sampler):
        return verify(logits, proposals, sampler).tokens

    def always_accept(logits, proposals, sampler):
        return proposals + [sampler.draw(logprobs_of(logits[-1:]), sampler.next_keys(1)[0])]

    rng = np.random.default_rng(0)

    def redraw_from_p(logits, proposals, sampler):
        out = []
        for i, x in enumerate(proposals + [None]):
            p = np.array(mx.softmax(sampler.scores(logprobs_of(logits[i : i + 1])),
                                    axis=-1)[0].tolist())
            if x is not None and rng.random() < p[x]:
                out.append(x)
                continue
            out.append(int(rng.choice(len(p), p=p / p.sum())))  # x not removed: wrong
            break
        return out

    assert _chi2(standard) < CHI2_LIMIT
    assert _chi2(always_accept) > CHI2_LIMIT
    assert _chi2(redraw_from_p) > CHI2_LIMIT


# -- through the ring ------------------------------------------------------------------------
class Oracle:
    """A draft source that proposes the reference continuation, wrong at chosen steps."""

    def __init__(self, reference: list[int], prompt_len: int, wrong_every: int = 0):
        self.reference, self.prompt_len, self.wrong_every = reference, prompt_len, wrong_every
        self.tokens: list[int] = []
        self.calls = 0

    def reset(self, tokens):
        self.tokens = list(tokens)

    def extend(self, tokens):
        self.tokens.extend(tokens)

    def propose(self, k):
        self.calls += 1
        done = len(self.tokens) - self.prompt_len
        out = list(self.reference[done : done + k])
        if self.wrong_every and self.calls % self.wrong_every == 0 and len(out) > 1:
            out[len(out) // 2] = (out[len(out) // 2] + 1) % 512
        return out


def _generate(driver, prompt, n, **kw):
    return [t for t, _ in driver.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True,
                                                                **kw)) if t >= 0]


@pytest.mark.parametrize("split", [[7], [3, 4], [2, 3, 2]])
def test_ring_tokens_and_caches_with_accepted_and_rejected_proposals(model_dir, split):
    path = model_dir("tiny-llama")
    prompt, n = PROMPTS[0], 24
    expected = reference_tokens(path, prompt, n)
    net = LocalNet(path, split)
    driver = _driver(net)
    driver.drafting = DraftOptions(num_draft_tokens=5,
                                   draft_model=Oracle(expected, len(prompt), wrong_every=3))
    assert _generate(driver, prompt, n) == expected
    stats = driver.last_stats
    assert 0 < stats.accepted < stats.drafted and stats.passes < n
    # every rank trimmed the same rejected positions: caches hold what rank 0 says was fed
    assert {s.offset for s in net.stages} == {len(driver.fed)} == {len(prompt) + n - 1}
    trims = [e for e in net.log if e[1] == Op.TRIM]
    if len(split) > 1:  # each TRIM goes down the ring to the last rank, not back to 0
        assert trims and all(e[4][0] > 0 for e in trims)
        sent = [sum(1 for e in trims if e[0] == r) for r in range(len(split))]
        assert sent == [sent[0]] * (len(split) - 1) + [0]


def test_chat_turns_reuse_the_cache_with_drafting(model_dir):
    path = model_dir("tiny-qwen2")
    net = LocalNet(path, [2, 3, 2])
    driver = _driver(net)
    driver.drafting = DraftOptions(num_draft_tokens=4)
    first = _generate(driver, PROMPTS[0], 6)
    assert first == reference_tokens(path, PROMPTS[0], 6)
    turn2 = PROMPTS[0] + first[:-1] + PROMPTS[0]  # repeats itself: prompt lookup proposes
    expected = reference_tokens(path, turn2, 12)
    driver.drafting = DraftOptions(num_draft_tokens=4,
                                   draft_model=Oracle(expected, len(turn2), wrong_every=2))
    assert _generate(driver, turn2, 12) == expected
    assert driver.last_stats.cached_tokens == len(PROMPTS[0]) + len(first) - 1
    assert {s.offset for s in net.stages} == {len(turn2) + 12 - 1}


def test_exact_mode_near_ties_fall_back_to_plain_steps(model_dir, monkeypatch):
    """--draft-exact with a tolerance so wide that every position is a near tie: nothing
    proposed is taken and every token comes from a plain step after the failed pass, same
    tokens. The default mode does not use the margin: it keeps the (correct) proposals."""
    monkeypatch.setattr(verify_mod, "TOLERANCE_EPS", 1e12)
    path = model_dir("tiny-llama")
    prompt, n = PROMPTS[2], 8
    expected = reference_tokens(path, prompt, n)
    net = LocalNet(path, [3, 4])
    driver = _driver(net)
    driver.drafting = DraftOptions(draft_model=Oracle(expected, len(prompt)), exact=True)
    assert _generate(driver, prompt, n) == expected
    stats = driver.last_stats
    assert stats.accepted == 0 and stats.passes > n and stats.drafted >= stats.passes - n
    assert {s.offset for s in net.stages} == {len(prompt) + n - 1}
    driver.drafting = DraftOptions(draft_model=Oracle(expected, len(prompt)))
    assert _generate(driver, prompt, n) == expected
    stats = driver.last_stats
    assert stats.accepted == stats.drafted > 0 and stats.passes < n


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_prompt_lookup_keeps_proposals_and_plain_greedy_text(model_dir, dtype):
    """In 16-bit, prompt lookup on prompts of one repeated token (the tiny model then repeats
    a token of its own) keeps proposals by default, where the exact mode's margin keeps
    almost none, and gives plain greedy decoding's tokens, or tokens that first differ where
    plain decoding's own two best logits lay within the exact mode's margin (rounding)."""
    from pipeline.commands.bench_spec import agreement

    net = LocalNet(model_dir("tiny-llama"), [3, 4], dtype=dtype)
    kept = {False: 0, True: 0}
    for prompt in ([10] * 12, [108] * 12, [87] * 12):
        driver = _driver(net)
        driver.keep_logits = logits = []
        plain = _generate(driver, prompt, 24)
        for exact in (False, True):
            driver = _driver(net)
            driver.drafting = DraftOptions(exact=exact)
            drafted = _generate(driver, prompt, 24)
            kept[exact] += driver.last_stats.accepted
            agree = agreement(plain, drafted, logits)
            if exact:
                assert drafted == plain
            elif drafted != plain:
                assert agree["gap_eps"] <= 2 * verify_mod.TOLERANCE_EPS, agree
    assert kept[False] >= 40 and kept[True] < kept[False] // 4, kept


@pytest.mark.parametrize("kw", [dict(temp=1.0), dict(temp=0.7, top_p=0.9, min_p=0.05)])
def test_sampled_tokens_equal_plain_sampling_for_every_seed(model_dir, kw):
    path = model_dir("tiny-llama")
    prompt, n = PROMPTS[4], 10
    for seed in range(6):
        net = LocalNet(path, [3, 4])
        plain = _generate(_driver(net), prompt, n, seed=seed, **kw)
        other = _generate(_driver(net), prompt, n, seed=seed + 100, **kw)
        driver = _driver(net)
        # proposals: half the time the plain path's own tokens, else another seed's
        driver.drafting = DraftOptions(draft_model=Oracle(plain if seed % 2 else other,
                                                          len(prompt)))
        assert _generate(driver, prompt, n, seed=seed, **kw) == plain, seed


def test_sliding_window_stops_drafting_when_full(model_dir):
    path = model_dir("tiny-gemma3")
    window = read_config(path)["sliding_window"]
    prompt, n = [3, 4, 5], 12
    expected = reference_tokens(path, prompt, n)
    net = LocalNet(path, [3, 4])
    logged = []
    driver = _driver(net)
    driver.log = logged.append
    driver.drafting = DraftOptions(num_draft_tokens=3, draft_model=Oracle(expected, len(prompt)))
    assert _generate(driver, prompt, n) == expected
    assert driver.last_stats.accepted > 0
    assert any(f"sliding window ({window} tokens) is full" in line for line in logged)


def test_draft_model_proposes_through_its_own_cache(model_dir):
    path = model_dir("tiny-llama")
    prompt, n = PROMPTS[0], 16
    expected = reference_tokens(path, prompt, n)
    for like, accepted_all in (("tiny-llama", True), ("tiny-qwen2", False)):
        dpath = model_dir(like)
        dconfig = read_config(dpath)
        model = DraftModel(load_stage(dpath, dconfig, (0, dconfig["num_hidden_layers"]),
                                      with_head=True))
        net = LocalNet(path, [3, 4])
        driver = _driver(net)
        driver.drafting = DraftOptions(num_draft_tokens=4, draft_model=model)
        assert _generate(driver, prompt, n) == expected
        stats = driver.last_stats
        if accepted_all:  # the model drafting for itself: everything proposed is accepted
            assert stats.accepted == stats.drafted > 0
        assert model.stage.offset == len(model.fed)


def test_draft_model_with_another_tokenizer_is_refused(model_dir):
    class Other:
        @staticmethod
        def get_vocab():
            return {"a": 0}

    with pytest.raises(ModelError, match="another tokenizer"):
        load_draft_model(str(model_dir("tiny-llama")), Other(), None, False)


# -- one-shot jobs over mpirun ---------------------------------------------------------------
REPEAT = ("Repeat this paragraph exactly: The quick brown fox jumps over the lazy dog. "
          "Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump.")


@pytest.mark.parametrize("np_", [1, 2])
def test_one_shot_greedy_tokens_equal_without_prompt_lookup(np_, model_dir):
    tiny = str(model_dir("tiny-llama"))
    for args in (["--prompt", REPEAT, "--max-tokens", "48"],
                 ["--model", tiny, "--prompt", "the cat the cat the cat", "--max-tokens", "40",
                  "--ignore-eos"]):
        on = run_json(np_, *args)
        off = run_json(np_, *args, "--no-prompt-lookup")
        assert on["tokens"] == off["tokens"]
        assert off["drafted"] == 0 and off["passes"] == off["generation_tokens"]
        if "--model" not in args:  # the embedded model repeats the paragraph: proposals pay
            assert on["accepted"] > 0 and on["passes"] < on["generation_tokens"]


def test_one_shot_draft_model_over_two_ranks(model_dir):
    tiny = str(model_dir("tiny-llama"))
    args = ["--model", tiny, "--prompt", "hello there", "--max-tokens", "24", "--ignore-eos"]
    off = run_json(2, *args, "--no-prompt-lookup")
    on = run_json(2, *args, "--draft-model", str(model_dir("tiny-qwen2")))
    assert on["tokens"] == off["tokens"] and on["drafted"] > 0


def test_bench_speculative_fields(model_dir, tmp_path):
    """bench --speculative on the in-process ring: every prompt gives the same tokens with and
    without drafting, and the JSON carries the figures the table shows."""
    import json

    from mlx_lm.utils import load_tokenizer

    from pipeline.commands.bench_spec import PROMPTS, markdown, run_speculative_bench

    path = model_dir("tiny-llama")
    driver = _driver(LocalNet(path, [7]))  # (the in-process ring answers no stats request)
    driver.tokenizer = load_tokenizer(path)
    out = tmp_path / "spec.json"
    results = run_speculative_bench(driver, 12, 1, 0, 4, out, label="tiny")
    assert json.loads(out.read_text()) == results
    assert [r["prompt"] for r in results["speculative"]] == [p[1] for p in PROMPTS]
    for r in results["speculative"] + results["kinds"]:
        assert r["same_tokens"] and r["tokens_per_pass"] >= 1
        assert r["decode_tps_off"] > 0 and r["decode_tps_on"] > 0
    for r in results["speculative"]:  # float32, bitwise equal kernels: the same text
        assert r["agreement"] == {"identical": r["tokens"], "of": r["tokens"], "top2": None,
                                  "gap": None, "gap_eps": None}
    assert [k["kind"] for k in results["kinds"]] == ["edit", "question"]
    assert [k["same_prompts"] for k in results["kinds"]] == [3, 3]
    assert driver.drafting is None and driver.keep_logits is None
    assert "| 12/12 |" in markdown(results) and "| 3 of 3 same |" in markdown(results)


def test_bench_agreement_names_the_first_difference_and_its_top2_gap():
    from pipeline.commands.bench_spec import agreement

    rows = [mx.array(r, dtype=mx.bfloat16) for r in
            ([0.0, 8.0, 1.0], [2.0, 0.0, 2.0625], [5.0, 0.0, 0.0])]
    a = agreement([1, 2, 0], [1, 0, 0], rows)
    assert (a["identical"], a["of"], a["top2"], a["gap"]) == (1, 3, [2.0625, 2.0], 0.0625)
    assert a["gap_eps"] == pytest.approx(0.0625 / (2.0 ** -7 * 2.0625))  # 3.9 eps x max
    assert agreement([1, 2, 0], [1, 2, 0], rows)["gap"] is None
    assert agreement([1, 2], [1, 2, 0], rows)["identical"] == 2  # one stopped earlier


def test_bad_drafting_flags_end_the_job_with_one_line(model_dir):
    from conftest import run_pipeline
    from pipeline.model.spec import resolve_model

    tiny = str(model_dir("tiny-llama"))
    proc = run_pipeline(0, "--model", tiny, "--prompt", "hi", "--num-draft-tokens", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "pipeline: error: --num-draft-tokens must be at least 1")
    proc = run_pipeline(2, "--model", tiny, "--prompt", "hi", "--draft-model",
                        str(resolve_model(None)))  # SmolLM2: another tokenizer
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("pipeline: error:")]
    assert len(errors) == 1 and "has another tokenizer than the model" in errors[0]
