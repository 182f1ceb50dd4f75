"""The real engine and the real workers, in one process, over an in-process ring.

Rank 0's Driver/Engine and a Worker per other rank (each with its own Stage of the layers)
exchange the same Message objects they send over MPI, through a ring that delivers a message
to the next rank at once. This checks the engine's message sequence and the workers' cache
tables directly, and the tokens against single-process mlx-lm, without mpirun.
"""

from __future__ import annotations

from collections import deque

import pytest

from conftest import ARCHS, reference_tokens
from helpers import NullTokenizer
from pipeline.exec.driver import Driver
from pipeline.exec.engine import Engine, Sequence
from pipeline.exec.sampling import SamplingParams
from pipeline.exec.worker import Worker
from pipeline.model.load import load_stage, read_config
from pipeline.place.split import layer_ranges
from pipeline.wire.protocol import Batch, Flag, Op, Run


class LocalRing:
    """Rank `rank`'s end of an in-process ring; sends are delivered to the next rank at once."""

    def __init__(self, net: "LocalNet", rank: int):
        self.net, self.rank, self.size = net, rank, net.size
        self.stages = net.size  # one rank per stage (no tensor-parallel groups here)
        self.inbox: deque = deque()
        self.bytes_sent, self.wait_s, self.sending = 0, 0.0, False

    @property
    def is_last_stage(self) -> bool:
        return self.rank == self.size - 1

    def progress(self) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, msg) -> None:
        nxt = (self.rank + 1) % self.size
        self.net.log.append((self.rank, msg.op, msg.mb, msg.flags, list(msg.payload)))
        if nxt == 0:
            self.inbox_of_rank0.append(msg)
        else:
            self.net.workers[nxt].handle(msg)
            if self.rank == 0:  # the message has gone all the way round
                self.net.check_tables()

    def recv(self):
        self.net.log.append((0, "recv", self.inbox_of_rank0[0].mb))
        return self.inbox_of_rank0.popleft()

    @property
    def inbox_of_rank0(self) -> deque:
        return self.net.rings[0].inbox

    def request(self, request) -> None:
        self.net.log.append((0, "request", request))
        for w in self.net.workers[1:]:
            w.begin(request)


class LocalNet:
    def __init__(self, path, split: list[int], head_share_rows: int = 0, **load_kw):
        """load_kw: more load_stage arguments (dtype, dequantize) for every stage."""
        config = read_config(path)
        self.size = len(split)
        self.rings = [LocalRing(self, r) for r in range(self.size)]
        self.log: list = []
        ranges = layer_ranges(split)
        self.stages = [load_stage(path, config, ranges[r], with_head=r == 0,
                                  head_share_rows=head_share_rows if r == self.size - 1 else 0,
                                  **load_kw)
                       for r in range(self.size)]
        self.workers = [None] + [Worker(self.rings[r], self.stages[r])
                                 for r in range(1, self.size)]
        self.engine_table = None

    def check_tables(self) -> None:
        """After each delivery every worker holds the same cache ids as rank 0's engine (rank 0
        applies a control op, then sends it; delivery here is immediate)."""
        if self.engine_table is None:
            return
        for w in self.workers[1:]:
            assert set(w.table.batches) == set(self.engine_table.batches)


def _driver(net: LocalNet, head_share_rows: int = 0) -> Driver:
    return Driver(None, net.stages[0], NullTokenizer(), 0, prefill_chunk=8,
                  ring=net.rings[0] if net.size > 1 else None,
                  head_share_rows=head_share_rows)


def _engine(net: LocalNet, concurrency: int, head_share_rows: int = 0) -> Engine:
    engine = Engine(_driver(net, head_share_rows), concurrency)
    net.engine_table = engine.table
    return engine


PROMPTS = [[5, 9, 12, 40, 7, 3, 22, 18, 11, 30, 2], [7, 7, 8], list(range(20, 45)), [3, 4],
           [60, 61, 62, 63, 64, 65]]


def _run(engine: Engine, max_tokens: list[int]) -> dict:
    seqs = [Sequence(id=i, prompt=p,
                     sampling=SamplingParams(max_tokens=n, ignore_eos=True))
            for i, (p, n) in enumerate(zip(PROMPTS, max_tokens))]
    done = {}
    engine.run(seqs, lambda s: done.__setitem__(s.id, s.tokens))
    return done


@pytest.mark.parametrize("split", [[7], [3, 4], [2, 3, 2]])
def test_engine_tokens_equal_mlx_lm(model_dir, split):
    path = model_dir("tiny-llama")
    net = LocalNet(path, split)
    engine = _engine(net, concurrency=3)
    max_tokens = [6, 3, 5, 4, 7]
    done = _run(engine, max_tokens)
    for i, (prompt, n) in enumerate(zip(PROMPTS, max_tokens)):
        assert done[i] == reference_tokens(path, prompt, n), i
    assert not engine.table.batches and all(not w.table.batches for w in net.workers[1:])


@pytest.mark.parametrize("arch", [*ARCHS, "tiny-olmo2", "tiny-gemma3-vl"])
def test_engine_every_architecture_over_three_stages(model_dir, arch):
    """Micro-batches of every cache kind (KV, sliding window, linear attention's recurrent
    state, MoE layers' KV) join, decode and shrink like one sequence in mlx-lm; also for an
    architecture no code here names (olmo2) and a multimodal checkpoint's text model."""
    path = model_dir(arch)
    engine = _engine(LocalNet(path, [2, 3, 2]), concurrency=3)
    max_tokens = [6, 3, 5, 4, 7]
    done = _run(engine, max_tokens)
    for i, (prompt, n) in enumerate(zip(PROMPTS, max_tokens)):
        assert done[i] == reference_tokens(path, prompt, n), i


def test_engine_message_sequence(model_dir):
    """What rank 0 sends, in order: the Batch request; per new sequence OPEN, its prefill
    chunks (no RETURN) and a JOIN into its micro-batch; decode steps with RETURN, one per
    micro-batch in flight; FILTER when sequences finish; END last. Both micro-batches are in
    flight before the first comes back (the pipe is filled), and control ops reach every
    rank in the order sent."""
    net = LocalNet(model_dir("tiny-llama"), [3, 4])
    engine = _engine(net, concurrency=4)
    _run(engine, [4, 2, 3, 5, 1])
    sent0 = [e for e in net.log if e[0] == 0]
    assert sent0[0][1:] == ("request", Batch())
    ops = [e[1] for e in sent0 if e[1] not in ("request", "recv")]
    assert ops[-1] == Op.END
    opened: set = set()
    joined: set = set()
    for e in sent0:
        if e[1] == Op.OPEN:
            opened.add(e[2])
        elif e[1] == Op.FORWARD and not e[3] & Flag.RETURN:
            assert e[2] in opened and e[2] not in joined  # a prefill chunk of an open sequence
        elif e[1] == Op.JOIN:
            assert set(e[4]) <= opened and not set(e[4]) & joined
            joined |= set(e[4])
        elif e[1] == Op.FORWARD:
            assert e[2] in (1, 2)  # decode steps run on the micro-batches
    assert joined == opened and len(opened) == len(PROMPTS)
    first_recv = next(i for i, e in enumerate(sent0) if e[1] == "recv")
    in_flight = {e[2] for e in sent0[:first_recv] if e[1] == Op.FORWARD and e[3] & Flag.RETURN}
    assert in_flight == {1, 2}
    # the last rank sends back exactly the decode steps, nothing else
    back = [e for e in net.log if e[0] == net.size - 1]
    assert back and all(e[1] == Op.FORWARD and e[3] & Flag.RETURN for e in back)
    assert sum(1 for e in sent0 if e[1] == "recv") == sum(
        1 for e in sent0 if e[1] == Op.FORWARD and e[3] & Flag.RETURN)


def test_shared_head_in_process_equals_one_head(model_dir):
    """The last rank holds the head's first rows and sends HEAD summaries for greedy
    micro-batches; the tokens equal those of one head."""
    path = model_dir("tiny-llama")
    vocab = read_config(path)["vocab_size"]
    plain = _run(_engine(LocalNet(path, [3, 4]), concurrency=4), [5, 4, 6, 3, 5])
    net = LocalNet(path, [3, 4], head_share_rows=256)
    engine = _engine(net, concurrency=4, head_share_rows=256)
    assert 0 < engine.split.cut <= 256 < vocab
    shared = _run(engine, [5, 4, 6, 3, 5])
    assert shared == plain
    flags = {e[3] for e in net.log if e[0] == 0 and e[1] == Op.FORWARD and e[3] & Flag.RETURN}
    assert flags == {Flag.RETURN | Flag.HEAD}


@pytest.mark.parametrize("arch, split", [("tiny-mistral", [3, 4]), ("tiny-llama", [2, 3, 2])])
def test_shared_head_in_bfloat16_equals_one_head_and_mlx_lm(model_dir, arch, split):
    """bfloat16 logits, where rounding after "- logsumexp" can move the greedy token: the
    summaries carry the last rank's logsumexp; tokens equal one head's and mlx-lm's."""
    path = model_dir(arch, dtype="bfloat16")
    max_tokens = [8, 6, 9, 7, 8]
    plain = _run(_engine(LocalNet(path, split), concurrency=4), max_tokens)
    net = LocalNet(path, split, head_share_rows=256)
    engine = _engine(net, concurrency=4, head_share_rows=256)
    shared = _run(engine, max_tokens)
    assert engine.summaries.rows > 0
    assert shared == plain
    for i, (prompt, n) in enumerate(zip(PROMPTS, max_tokens)):
        assert shared[i] == reference_tokens(path, prompt, n), i


SMOLLM2_PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
                   "Water boils at", "List three colors:", "The meaning of life is",
                   "Q: What is 2+2?\nA:", "Here is a poem about the sea:"]


def test_shared_head_on_smollm2_in_bfloat16_rarely_needs_the_whole_head():
    """The embedded SmolLM2-135M-Instruct in bfloat16 (dequantized), 2 stages, 8 greedy
    sequences: the summaries decide the tokens of at least 98% of the rows without the whole
    head (the exact path needs a lower-index logit within merge tolerance, ~4% of rows here,
    and a logsumexp within error_bound of a rounding boundary of c, and the two values of c
    picking different tokens: well under 1%), where a near-tie test alone sent 59% of rows
    and every step there. Same tokens as one head."""
    from mlx_lm.utils import load_tokenizer

    from pipeline.model.spec import resolve_model

    path = resolve_model(None)
    vocab = read_config(path)["vocab_size"]
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.encode(p) for p in SMOLLM2_PROMPTS]

    def run(rows: int):
        net = LocalNet(path, [15, 15], head_share_rows=rows, dtype="bfloat16", dequantize=True)
        engine = _engine(net, concurrency=len(prompts), head_share_rows=rows)
        seqs = [Sequence(id=i, prompt=p, sampling=SamplingParams(max_tokens=12, ignore_eos=True))
                for i, p in enumerate(prompts)]
        done = {}
        engine.run(seqs, lambda s: done.__setitem__(s.id, s.tokens))
        return done, engine

    shared, engine = run(vocab * 3 // 4)
    counts = engine.summaries
    print(f"\nSmolLM2 bfloat16, shared head: {counts}")
    assert counts.rows >= len(prompts) * 11
    assert counts.exact_rows <= 0.02 * counts.rows
    assert shared == run(0)[0]


def test_chat_turns_use_run_requests_and_the_conversation_cache(model_dir):
    """One-shot/REPL: a Run(keep) request, then steps on micro-batch 0 (the conversation's
    caches); the second turn keeps the first turn's tokens on every rank."""
    path = model_dir("tiny-qwen2")
    net = LocalNet(path, [2, 3, 2])
    driver = _driver(net)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    first = [t for t, _ in driver.generate(PROMPTS[0], params) if t >= 0]
    assert first == reference_tokens(path, PROMPTS[0], 4)
    turn2 = PROMPTS[0] + first[:-1] + [50, 51]
    second = [t for t, _ in driver.generate(turn2, params) if t >= 0]
    assert second == reference_tokens(path, turn2, 4)
    runs = [e[2] for e in net.log if e[1] == "request"]
    assert runs == [Run(0), Run(len(PROMPTS[0]) + len(first) - 1)]
    assert all(e[2] == 0 for e in net.log if e[1] == Op.FORWARD)
    offsets = {s.offset for s in net.stages}
    assert offsets == {len(turn2) + len(second) - 1}


@pytest.mark.parametrize("arch", ["tiny-qwen3-next", "tiny-qwen3-moe"])
def test_chat_turns_with_recurrent_or_moe_caches(model_dir, arch):
    """A turn that extends the conversation reuses every cached token, recurrent state
    included; one that would drop cached tokens re-prefills where a recurrent state
    (qwen3_next's linear attention) cannot drop them, and says so in the log."""
    path = model_dir(arch)
    net = LocalNet(path, [2, 3, 2])
    driver = _driver(net)
    said: list[str] = []
    driver.log = said.append
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    first = [t for t, _ in driver.generate(PROMPTS[0], params) if t >= 0]
    turn2 = PROMPTS[0] + first[:-1] + [50, 51]
    second = [t for t, _ in driver.generate(turn2, params) if t >= 0]
    assert second == reference_tokens(path, turn2, 4)
    assert driver.last_stats.cached_tokens == len(PROMPTS[0]) + len(first) - 1
    turn3 = PROMPTS[0][:6] + [70, 71, 72]  # an edit of the first message: rewinds to 6 tokens
    third = [t for t, _ in driver.generate(turn3, params) if t >= 0]
    assert third == reference_tokens(path, turn3, 4)
    recurrent = arch == "tiny-qwen3-next"
    assert driver.last_stats.cached_tokens == (0 if recurrent else 6)
    assert bool(said) == recurrent
    if recurrent:
        assert "recurrent state" in said[0] and "prefilling all 9 prompt tokens" in said[0]
    assert {s.offset for s in net.stages} == {len(turn3) + len(third) - 1}


def test_context_window_ends_generation_with_length(model_dir):
    """Prompt + answer stop at the context window (finish_reason "length") in chat and batch."""
    path = model_dir("tiny-llama")
    net = LocalNet(path, [3, 4])
    driver = _driver(net)
    driver.context = 14
    prompt = PROMPTS[0]  # 11 tokens: room for 3
    tokens = [t for t, _ in driver.generate(prompt, SamplingParams(max_tokens=50)) if t >= 0]
    assert len(tokens) == 3 and driver.last_stats.finish_reason == "length"
    engine = Engine(driver, concurrency=2)
    net.engine_table = engine.table
    seqs = [Sequence(id=0, prompt=prompt, sampling=SamplingParams(max_tokens=50, ignore_eos=True))]
    done = []
    engine.run(seqs, done.append)
    assert len(done[0].tokens) == 3 and done[0].finish_reason == "length"
    assert done[0].tokens == tokens
