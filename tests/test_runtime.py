"""prefixlens.runtime: hooks that act in one thread only, so one model serves several threads (issue 21 item 2)."""

import threading

import pytest
import torch

import prefixlens as pl
from prefixlens.runtime import attached_prefix, thread_hooks
from tests.conftest import build, n_attached_hooks, random_tokens

ITERATIONS = 12


def _references(model, x, prompt, a, b):
    """Single-threaded outputs of every route, the oracle of the concurrent runs."""
    with torch.no_grad():
        d = pl.decompose(model, x, a)
        with pl.attached(model, b) as slots:
            attached_logits = model(slots.prepend(x))
        return {
            "plain": model(x),
            "run_with_prefix A": pl.run_with_prefix(model, x, a),
            "run_with_prefix B": pl.run_with_prefix(model, x, b),
            "run_with_cache A": pl.run_with_cache(model, x, a, names_filter="blocks.1.attn.hook_pattern")[1][
                "blocks.1.attn.hook_pattern"
            ],
            "generate B": pl.generate(model, x, b, max_new_tokens=3),
            "decompose A": (d.prefix_attention, d.z, d.layer_input_shift),
            "attached B": attached_logits,
            "from_prompt": pl.KVPrefix.from_prompt(model, prompt).keys,
            "to_kv B": b.to_kv(model).values,
        }


def _routes(model, x, prompt, a, b):
    def decompose_a():
        d = pl.decompose(model, x, a)
        return d.prefix_attention, d.z, d.layer_input_shift

    def attached_b():
        with pl.attached(model, b) as slots:
            assert attached_prefix(model) is b
            return model(slots.prepend(x))

    return {
        "plain": lambda: model(x),
        "run_with_prefix A": lambda: pl.run_with_prefix(model, x, a),
        "run_with_prefix B": lambda: pl.run_with_prefix(model, x, b),
        "run_with_cache A": lambda: pl.run_with_cache(model, x, a, names_filter="blocks.1.attn.hook_pattern")[1][
            "blocks.1.attn.hook_pattern"
        ],
        "generate B": lambda: pl.generate(model, x, b, max_new_tokens=3),
        "decompose A": decompose_a,
        "attached B": attached_b,
        "from_prompt": lambda: pl.KVPrefix.from_prompt(model, prompt).keys,
        "to_kv B": lambda: b.to_kv(model).values,
    }


def _same(got, want) -> bool:
    if isinstance(want, tuple):
        return all(_same(g, w) for g, w in zip(got, want, strict=True))
    return torch.equal(got, want)


@pytest.fixture
def one_intra_op_thread():
    """torch's intra-op parallelism splits reductions differently when Python threads compete for its
    pool (7e-7 in float32 here), so exact comparisons across threads need one intra-op thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_threads_each_see_their_own_prefix_on_every_route(family, one_intra_op_thread):
    """One thread per route, all at once on one model, many times: every prefixlens route's output equals
    its single-threaded output exactly (they take turns), and a bare ``model(x)`` is either exact or, when
    it would interleave with a prefixlens run in another thread, refused with an error naming the threads:
    never a wrong number."""
    model = build(family)
    x, prompt = random_tokens((2, 6), seed=21), random_tokens((3,), seed=22)
    a = pl.KVPrefix.from_prompt(model, prompt)
    b = pl.ResidualPrefix.random(model, 2, seed=23)
    want = _references(model, x, prompt, a, b)
    before = n_attached_hooks(model)
    routes = _routes(model, x, prompt, a, b)
    start = threading.Barrier(len(routes))
    wrong: list[str] = []
    refused: list[str] = []

    def work(name, run):
        start.wait()
        for i in range(ITERATIONS):
            try:
                with torch.no_grad():
                    got = run()
            except RuntimeError as e:
                if name == "plain" and "in another thread" in str(e):  # a bare forward during a prefixlens run: refused
                    refused.append(name)
                    continue
                wrong.append(f"{name} #{i}: {type(e).__name__}: {e}")
                continue
            except Exception as e:  # noqa: BLE001  (reported below, with the route)
                wrong.append(f"{name} #{i}: {type(e).__name__}: {e}")
                continue
            if not _same(got, want[name]):
                wrong.append(f"{name} #{i}: differs from the single-threaded output")

    threads = [threading.Thread(target=work, args=item) for item in routes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of {ITERATIONS * len(routes)} calls wrong: " + "; ".join(wrong[:6])
    assert n_attached_hooks(model) == before


def test_thread_hooks_act_in_their_thread_only():
    """Inside a prefixlens run, a bare forward pass from another thread is refused, naming the threads
    (the bridge is not thread-safe); after the run it is the plain forward, untouched by the run's hooks."""
    model = build("gpt2")
    x = random_tokens((1, 4), seed=24)
    with torch.no_grad():
        plain = model(x)
        inside, outside, errors = [], [], []

        def other_thread():
            try:
                with torch.no_grad():
                    outside.append(model(x))
            except RuntimeError as e:
                errors.append(str(e))

        with thread_hooks(model, [("hook_embed", lambda act, hook: act * 0)]):
            inside.append(model(x))
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
        assert len(errors) == 1 and "in another thread" in errors[0] and "copy.deepcopy" in errors[0]
        other_thread()
    assert torch.equal(outside[0], plain)
    assert not torch.equal(inside[0], plain)
    assert n_attached_hooks(model) == 0 and not model._forward_pre_hooks


def test_a_prefix_attached_in_another_thread_is_no_obstacle():
    """Another thread's ``attached`` block does not make a call refused: it waits for the block to end
    and then gives its own exact answer; the refusal of nested prefixes names this thread's block."""
    model = build("gpt2")
    x = random_tokens((1, 4), seed=25)
    prefix = pl.KVPrefix.random(model, 2, seed=26)
    with torch.no_grad():
        want = pl.run_with_prefix(model, x, prefix)
    entered, leave = threading.Event(), threading.Event()
    got, errors = [], []

    def hold():
        with pl.attached(model, prefix):
            entered.set()
            leave.wait(30)

    def call():
        try:
            with torch.no_grad():
                got.append(pl.run_with_prefix(model, x, prefix))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    holder, caller = threading.Thread(target=hold), threading.Thread(target=call)
    holder.start()
    assert entered.wait(30)
    assert attached_prefix(model) is None  # the block is the other thread's
    caller.start()
    caller.join(0.5)
    assert caller.is_alive() and not got  # waits its turn
    leave.set()
    holder.join()
    caller.join()
    assert not errors and torch.equal(got[0], want)
    with pl.attached(model, prefix), pytest.raises(RuntimeError, match="attached` block of this thread"):
        pl.run_with_prefix(model, x, prefix)


def test_evaluation_mode_in_two_threads_restores_the_modes_once():
    """Two overlapping blocks: the model stays in eval mode until the last one leaves, then every module
    gets its own mode back (before, the first to leave put dropout back on under the other thread)."""
    from prefixlens.runtime import evaluation_mode

    model = build("gpt2")
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first():
        with evaluation_mode(model):
            first_in.set()
            second_in.wait(30)
        first_out.set()

    model.train()
    try:
        t = threading.Thread(target=first)
        t.start()
        assert first_in.wait(30)
        with evaluation_mode(model):
            second_in.set()
            assert first_out.wait(30)
            seen.append(any(m.training for m in model.modules()))
        t.join()
        assert seen == [False], "the first block to leave restored train mode under the second"
        assert all(m.training for m in model.modules()), "the last block to leave restores every mode"
    finally:
        model.eval()

