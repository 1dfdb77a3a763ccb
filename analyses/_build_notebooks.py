"""Writes the section notebooks (unexecuted) from the cells below: ``python analyses/_build_notebooks.py``.

demo (the tour on SmolLM2: load, run with and without a prefix, decompose, look), section4_bias_only,
section5_toy_tasks, section6_prefix_vs_lora, appendixB_longer_prefixes (the section-3 notebook is
``constructions.ipynb``). Each runs top to bottom on a laptop CPU in minutes;
``PREFIXLENS_NOTEBOOK_SCALE`` (default 1) scales every training budget (the tests use a small one),
and pretrained models and prefixes are cached as training checkpoints under ``runs/notebooks``
(``PREFIXLENS_NOTEBOOK_CACHE``), so the notebooks share one pretrained toy model.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

torch.set_num_threads(int(os.environ.get("PREFIXLENS_THREADS", "1")))  # tiny models: one thread is fastest
import prefixlens as pl
from prefixlens import analysis, models, report, tasks, train

SCALE = float(os.environ.get("PREFIXLENS_NOTEBOOK_SCALE", "1"))  # < 1 shortens every training run
CACHE = os.environ.get("PREFIXLENS_NOTEBOOK_CACHE") or str(Path(pl.__file__).resolve().parents[1] / "runs" / "notebooks")
iters = lambda n: max(2, int(n * SCALE))  # noqa: E731'''

BASE = '''# The shared toy model: a 2-layer GPT-2 pretrained on the mixture of the four pretraining tasks
# (no task marker in the input), with 10 pad positions in front that a prefix of length 10 replaces.
N_PAD = 10
BASE = dict(n_layers=2, d_model=64, n_heads=4, d_vocab=tasks.VOCAB, n_ctx=32)
model = models.toy_gpt2(seed=0, **BASE)
pretrain = train.TrainConfig(iters=iters(1500), lr=3e-3, seed=0, progress=False, checkpoint_dir=CACHE, checkpoint_every=iters(1500))
res = train.train_model(model, tasks.MIXTURE, N_PAD, pretrain, name="notebook-pretrain")  # resumes from CACHE if done
model.requires_grad_(False)
print(f"pretrained {res.steps} iterations, final loss {res.final_loss:.3f}")

def prefix_config(seed=0, n=300, lr=1e-2):
    return train.TrainConfig(iters=iters(n), lr=lr, seed=seed, progress=False, checkpoint_dir=CACHE, checkpoint_every=iters(n))'''


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


def section4() -> list:
    return [
        md("""
# Section 4 — a prefix only rescales the content attention and adds a bias

Petrov, Torr & Bibi (ICLR 2024), §4: for one head with prefix slots `p` and content positions `j`,

1. **relative attention**: `A^pt[i, P+j] = A^ref[i, j] · (1 − A_i)` with `A_i = Σ_p A^pt[i, p]` — the
   prefix cannot change *which* content the head attends to, only how much;
2. **bias only**: `z_i = Σ_p A^pt[i, p]·v_p + (1 − A_i)·t_i` — the head output is the no-prefix output
   `t_i`, scaled down, plus a bias in the span of the prefix values.

`A^ref` and `t` are the attention and output the layer gives to the **same layer input** without the
prefix. The reference checked one head (layer 0, head 12) of LLaMA-7B in fp16 (errors 4.88e-4 and
9.16e-5). Here every layer and head is checked, for P > 1, in float32 and float64 —
`analyses/prefix_bias_only.py` does the same at scale (`--model DIR` for a local LLaMA).
"""),
        code(SETUP),
        md("A toy LLaMA (RMSNorm, rotary positions, grouped-query attention) with random weights, and a random residual prefix (the paper's form) of length 3."),
        code('''
def toy(dtype):
    return models.toy_llama(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, init_range=0.1, seed=0, dtype=dtype)

model64, model32 = toy(torch.float64), toy(torch.float32)
prefix64 = pl.ResidualPrefix.random(model64, 3, seed=0)
prefix32 = pl.ResidualPrefix.random(model32, 3, seed=0)
tokens = torch.randint(3, 101, (8, 16), generator=torch.Generator().manual_seed(0))
d = pl.decompose(model64, tokens, prefix64)  # A, t, b and hook_z for every layer and head
{k: v for k, v in d.summary().items() if k != "reconstruction_error"}
'''),
        md("### The identities by hand, for one head of a deeper layer\n\nThe prefixed run's own pattern, against the attention the same layer gives the same input without the prefix (`d.baseline_pattern`, from layer-input patching):"),
        code('''
layer, head, P = 2, 1, prefix64.length
_, cache = pl.run_with_cache(model64, tokens, prefix64, names_filter=lambda n: n.endswith(("hook_pattern", "hook_v")))
A_pt = cache[f"blocks.{layer}.attn.hook_pattern"][:, head, P:]          # [batch, query, P + T]
A = A_pt[..., :P].sum(-1, keepdim=True)                                   # mass on the prefix
A_ref = d.baseline_pattern[layer, :, head]                                # [batch, query, T]
print("identity 1, max error:", float((A_pt[..., P:] - A_ref * (1 - A)).abs().max()))

v = cache[f"blocks.{layer}.attn.hook_v"][:, :, head // 2]                  # GQA: 2 query heads per key/value head
t = A_ref @ v[:, P:]                                                      # output without the prefix
z_hat = A_pt[..., :P] @ v[:, :P] + (1 - A) * t
print("identity 2, max error:", float((d.z[layer, :, :, head] - z_hat).abs().max()))
'''),
        md("### Every layer and head, float32 and float64\n\n`analysis.check_identities` measures both identities (and the decomposition's score-based errors) per layer and head over a batch:"),
        code('''
for m, p in ((model32, prefix32), (model64, prefix64)):
    check = analysis.check_identities(m, tokens, p)
    print(check.dtype, {k: f"{v:.1e}" for k, v in check.to_json()["max"].items()})
for row in check.per_layer():
    print(f"layer {row['layer']}: identity 1 {row['relative_attention']:.1e}, identity 2 {row['bias_only']:.1e}, "
          f"mean A {row['mean_prefix_attention']:.3f}, layer-input shift {row['cross_layer_shift']:.3f}")
'''),
        md("""
Both hold to rounding (≈1e-7 in float32, ≈1e-15 in float64) in **every** layer — the reference's
fp16 4.88e-4 is one fp16 rounding step. Yet the prefix does change deeper layers: their *input* moves
(the layer-input shift above), and through it their attention. A prefix acts on layer ℓ only through
the biases it added in layers < ℓ.

### Figure 5: attention with the prefix, renormalised, and without it
"""),
        code('''
d32 = pl.decompose(model32, tokens[:1], prefix32)
report.Report([
    report.attention_figure(model32, tokens[:1], prefix32, layer=0, decomposition=d32),
    report.prefix_mass_figure(d32, model=model32, tokens=tokens[:1]),
], title="Section 4")
'''),
    ]


def section5() -> list:
    return [
        md("""
# Section 5 — what prefix-tuning can and cannot learn (Tables 2 and 3, in miniature)

A small GPT-2 is pretrained on a mixture of four tasks on 10 digits (sort ascending, sort descending,
+1, +2) with nothing in the input saying which. A prefix then

- **elicits** one pretraining task (Table 2: ≈ 90–100 % on its task, ≈ 0 % on the others);
- can learn a **new task that reuses pretrained attention patterns**: ascending-then-+1 (↗+1);
- cannot learn a task that needs **a new attention pattern**: the histogram (Table 3: ≈ 1 %).

Small settings (minutes on a CPU); the full protocol with several seeds and confidence intervals is
`analyses/table1.py`, `table2.py`, `table3.py`. Accuracy is whole-sequence exact match of the 10 answer
tokens, teacher-forced (equal to greedy generation, see `train.evaluate`).
"""),
        code(SETUP),
        code(BASE),
        code('''
TASKS = ["ascending", "descending", "add1", "add2", "ascending_add1", "histogram"]
tests = {t: tasks.test_set(t, 300, N_PAD) for t in TASKS}
x = tests["histogram"]
print("input    ", x.inputs[0].tolist())
for t in TASKS:
    print(f"{t:15s}", tasks.solve(t, x.inputs[:1])[0].tolist())
'''),
        md("### One prefix of length 10 per task (the model stays frozen)"),
        code('''
prefixes, losses = {"no prefix": None}, {}
for t in TASKS:
    n = 300 if t in tasks.PRETRAINING_TASKS else 600  # the two new tasks get twice the budget
    prefix, res = train.train_prefix(model, t, N_PAD, prefix_config(n=n), form="residual", name=f"notebook-prefix-{t}")
    prefixes[t], losses[t] = prefix, res.final_loss
    print(f"{t:15s} {res.steps:4d} steps, final loss {res.final_loss:.3f}  ({prefix.n_parameters()} parameters)")
'''),
        code('''
acc = train.accuracy_matrix(model, tests, prefixes, method="teacher_forced")
print("prefix for ↓ / accuracy on →  " + " ".join(f"{t[:10]:>10s}" for t in TASKS))
for row, cells in acc.items():
    print(f"{row:28s} " + " ".join(f"{cells[t].mean:10.1%}" for t in TASKS))
'''),
        code('''
@torch.no_grad()
def token_accuracy(task, prefix=None):
    """Share of answer tokens predicted right (teacher-forced): finer than whole-sequence exact match."""
    toks, tgts = tests[task].tokens, tests[task].targets
    if prefix is not None:
        toks, tgts = toks[:, prefix.length:], tgts[:, prefix.length:]
    logits = model(toks) if prefix is None else pl.run_with_prefix(model, toks, prefix)
    keep = tgts != tasks.IGNORE
    return float((logits.argmax(-1) == tgts)[keep].float().mean())

for t in ("ascending_add1", "histogram"):
    counts = torch.bincount(tests[t].answers.flatten(), minlength=tasks.VOCAB)
    print(f"{t:15s} token accuracy: no prefix {token_accuracy(t):.1%}, its prefix {token_accuracy(t, prefixes[t]):.1%}, "
          f"always answering the most common token {float(counts.max() / counts.sum()):.1%}")
'''),
        md("""
Each prefix for a pretraining task elicits it (≈ 90–100 % on its task, 0 % on the others: Table 2).
For the two new tasks a laptop budget is far from the paper's (the reference trains them for
500,000 steps), so look at the losses and token accuracies rather than exact match: ↗+1 (sort, then
the +1 map the model also knows) is being learned — its loss falls well below the histogram's and
its token accuracy rises far above a constant guess — while the histogram, which needs every
position to attend to the positions holding the same digit (a pattern the model never formed), keeps
a high loss and a token accuracy no better than always answering the most common count. Several seeds and longer runs: `analyses/table3.py`, `results/table3.md`.

### Why: a prefix only adds a bias (Figure 3)
Attention-block outputs at the last input token of layer 0, without a prefix and with each prefix:
each prefix shifts every sample by a near-constant vector — it steers, it does not re-route.
"""),
        code('''
content = tests["ascending"].tokens[:40, N_PAD:]
shown = {t: prefixes[t] for t in ("ascending", "descending", "histogram")}
report.Report([report.bias_shift_figure(model, content, shown, layer=0, position=tasks.LENGTH - 1)], title="Figure 3")
'''),
        code('''
# The relative attention over the content is the model's own in every layer (for the same layer input):
for t in ("ascending", "histogram"):
    check = analysis.check_identities(model, content[:8], prefixes[t])
    print(f"{t:10s} identity 1 {check.max_error('relative_attention'):.1e}, identity 2 {check.max_error('bias_only'):.1e}, "
          f"mean prefix attention per layer {[round(r['mean_prefix_attention'], 3) for r in check.per_layer()]}")
'''),
    ]


def section6() -> list:
    return [
        md("""
# Section 6 — prefix-tuning vs LoRA with the same number of parameters

On the histogram task (which needs a new attention pattern) the paper finds that a prefix fails
(0.31 %) while a rank-1 LoRA with the same parameter count succeeds (92 %). Here, in miniature: a
P = 10 residual prefix (2 layers × 10 slots × 64 = 1,280 parameters) vs a rank-1 LoRA on both MLP
matrices (the paper's text; also 1,280 parameters at this size), trained for the same number of steps.
The reference's variant (P = 12 vs LoRA on attention output + MLP), the paper-size model and several
seeds are in `analyses/section6.py`.
"""),
        code(SETUP),
        code(BASE),
        code('''
from prefixlens.lora import MLP_TARGETS, lora_parameter_count

TASK = "histogram"
test = tasks.test_set(TASK, 300, N_PAD)
print("prefix parameters:", train.prefix_parameter_count(model, 10, "residual"))
print("rank-1 MLP LoRA parameters:", lora_parameter_count(model, 1, MLP_TARGETS))

@torch.no_grad()
def token_accuracy(prefix=None):
    """Share of answer tokens predicted right (teacher-forced): finer than whole-sequence exact match."""
    toks, tgts = test.tokens, test.targets
    if prefix is not None:
        toks, tgts = toks[:, prefix.length:], tgts[:, prefix.length:]
    logits = model(toks) if prefix is None else pl.run_with_prefix(model, toks, prefix)
    keep = tgts != tasks.IGNORE
    return float((logits.argmax(-1) == tgts)[keep].float().mean())

counts = torch.bincount(test.answers.flatten(), minlength=tasks.VOCAB)
print(f"always answering the most common count: token accuracy {float(counts.max() / counts.sum()):.1%}")
print(f"pretrained model: {train.evaluate(model, test, method='teacher_forced')}, token accuracy {token_accuracy():.1%}")
'''),
        code('''
STEPS = 600
prefix, prefix_run = train.train_prefix(model, TASK, N_PAD, prefix_config(n=STEPS), name="notebook-s6-prefix")
print(f"prefix: {train.evaluate(model, test, prefix, method='teacher_forced')}, token accuracy {token_accuracy(prefix):.1%}")

lora_cfg = train.TrainConfig(iters=iters(STEPS), lr=1e-2, seed=0, progress=False)
lora, lora_run = train.train_lora(model, TASK, N_PAD, lora_cfg, rank=1, targets="mlp")
print(f"LoRA:   {train.evaluate(model, test, method='teacher_forced')}, token accuracy {token_accuracy():.1%} "
      f"({lora.n_parameters()} parameters)")
lora.remove()  # the base model is restored exactly
'''),
        code('''
import matplotlib.pyplot as plt

smooth = lambda xs, k=25: [sum(xs[max(0, i - k):i + 1]) / len(xs[max(0, i - k):i + 1]) for i in range(len(xs))]  # noqa: E731
plt.figure(figsize=(6, 3.5))
plt.plot(smooth(prefix_run.losses), label=f"prefix P=10 ({prefix.n_parameters()} params)")
plt.plot(smooth(lora_run.losses), label=f"rank-1 LoRA, MLP ({lora.n_parameters()} params)")
plt.xlabel("iteration"); plt.ylabel("training loss"); plt.legend(); plt.title("histogram")
plt.show()
'''),
        md("""
At this laptop budget neither method reaches a useful whole-sequence accuracy on the histogram (the
paper's LoRA trains 10,000 steps on a 4-layer, d = 256 model); compare the training losses and the
per-token accuracies instead: the prefix's token accuracy stays at the level of always answering the
most common count, while the LoRA's rises above it and its loss falls lower. The mechanism behind the paper's gap is Section 4: a prefix can only add
a bias to each head's output and cannot make a head attend to "the positions holding my digit",
whereas a low-rank change of the weights can use and reshape what the model already computes. Run
`python analyses/section6.py --profile paper` for the paper-size comparison.
"""),
    ]


def appendix_b() -> list:
    return [
        md("""
# Appendix B — attention over the slots of a longer prefix is concentrated

With P = 10 slots a prefix could add an input-dependent mixture of 10 value vectors per head. The
paper (GPT-2, Emotion) found the attention over the slots concentrated on one or two slots and
nearly constant across inputs, so the realised bias is close to one fixed vector. The reference
measured one head per layer (head ℓ of layer ℓ, by a bug); here every head. The default run with
5 seeds is `analyses/longer_prefixes.py` (`results/longer_prefixes.md`).
"""),
        code(SETUP),
        code(BASE),
        code('''
TASK, P = "ascending", 10
test = tasks.test_set(TASK, 300, N_PAD)
trained, initial = {}, {}
for seed in (0, 1, 2):
    prefix, res = train.train_prefix(model, TASK, N_PAD, prefix_config(seed=seed), name=f"notebook-B-{seed}")
    trained[seed], initial[seed] = prefix, pl.ResidualPrefix.random(model, P, seed=seed)  # the trainer's init
    print(f"seed {seed}: {train.evaluate(model, test, prefix, method='teacher_forced')}")
'''),
        md("Attention of the last input token over the 10 slots (normalised over the slots), every layer and head, over 300 test inputs:"),
        code('''
content = test.tokens[:, N_PAD:]  # the prefix takes the place of the pads
stats = {s: analysis.slot_statistics(model, content, p, positions=tasks.LENGTH - 1) for s, p in trained.items()}
controls = {s: analysis.slot_statistics(model, content, p, positions=tasks.LENGTH - 1) for s, p in initial.items()}
keys = ["spread_p1_p99", "top_slot_share", "top2_share", "value_rank", "bias_erank", "bias_erank_centered", "weight_erank"]
for name, group in (("trained", stats), ("init", controls)):
    for key in keys:
        per_layer = [sum(s.summary()[key][l] for s in group.values()) / len(group) for l in range(model.cfg.n_layers)]
        print(f"{name:8s} {key:20s}", " ".join(f"{x:6.3f}" for x in per_layer))
'''),
        code('''
import matplotlib.pyplot as plt

s = stats[0]
q = s.quantiles((0.01, 0.5, 0.99))
L, H = s.shape
fig, axes = plt.subplots(1, L * H, figsize=(2 * L * H, 3), sharey=True)
for l in range(L):
    for h in range(H):
        ax = axes[l * H + h]
        for p in range(P):
            ax.plot([q[l, h, p, 0], q[l, h, p, 2]], [p, p], lw=3, color="C0")
            ax.plot(q[l, h, p, 1], p, "k|")
        ax.set_xlim(-0.02, 1.02); ax.set_title(f"L{l}H{h}", fontsize=9)
axes[0].invert_yaxis(); axes[0].set_ylabel("slot")
fig.suptitle("p1–p99 range of each slot's weight across inputs (seed 0)"); plt.tight_layout(); plt.show()
'''),
        md("""
*spread_p1_p99*: how much a slot's weight varies across inputs; *top_slot_share*: the weight of the
most-attended slot; *value_rank*: the dimension of the span of the 10 prefix values of a head;
*bias_erank*: the effective rank of the biases the prefix actually adds across inputs (and
*bias_erank_centered* of their input-dependent part). Compare the trained prefixes with their
initialisations: how much of the 10-dimensional span does training make the prefix use?
"""),
    ]


def demo() -> list:
    return [
        md("""
# A prefix, mechanistically — the prefixlens tour on SmolLM2-135M-Instruct

Load a real model, turn an instruction into a prefix, run with and without it, decompose every head
into `(1 − A)·t + A·b` (Petrov, Torr & Bibi, ICLR 2024), and look: where the prefix's attention goes
(the attention sink vs the instruction) and which heads' biases move the answer. Runs on a laptop CPU
in about a minute (the first use converts the built-in model once, ≈ 30 s).
"""),
        code('''import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

import prefixlens as pl
from prefixlens import attribution, models, report, text

model = models.load("smollm2-135m")          # the built-in real model: no hub needed
print(model.cfg.n_layers, "layers ×", model.cfg.n_heads, "heads")'''),
        md("""
## A prefix from an instruction, exact against the real prompt

`KVPrefix.from_prompt` keeps the keys and values the system prompt writes in every layer. The
questions that follow are a continuation (no BOS): prefix + question is the model on the whole prompt.
"""),
        code('''prompt_text = "<|im_start|>system\\nYou are a pirate. Talk like a pirate.<|im_end|>\\n"
prompt = torch.tensor(text.encode(model, prompt_text))
questions = ["What is your favourite food?", "Tell me about your ship."]
content = [f"<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n" for q in questions]
tokens, _ = text.tokens_and_mask(model, content, continuation=True)
prefix = pl.KVPrefix.from_prompt(model, prompt)

with torch.no_grad():
    with_prefix = pl.run_with_prefix(model, tokens, prefix)
    with_prompt = model(torch.cat([prompt.expand(len(questions), -1), tokens], 1))[:, len(prompt):]
print("max |Δ logits| prefix vs real prompt:", float((with_prefix - with_prompt).abs().max()))'''),
        code('''for q, plain, pirate in zip(
    questions,
    pl.generate(model, tokens, None, max_new_tokens=12, return_text=True),
    pl.generate(model, tokens, prefix, max_new_tokens=12, return_text=True),
):
    print(q, "\\n  without:", repr(plain[len(q):][-60:]), "\\n  with:   ", repr(pirate[len(q):][-60:]))'''),
        md("""
## Every head: `z = (1 − A)·t + A·b`

`A` is the share of a head's attention on the prefix, `t` what the head gives over the content alone
(the same attention as without the prefix, for the same layer input), `b` the prefix's bias.
"""),
        code('''d = pl.decompose(model, tokens, prefix)
print("reconstruction error:", d.reconstruction_error())
print("relative attention unchanged, max error per layer:", float(d.relative_attention_error().max()))
print("mean A over all heads:", round(float(d.prefix_attention.mean()), 3))'''),
        md("""
## A sink is not an instruction

Most of `A` sits on the first slot, `<|im_start|>`, an attention sink that many heads use whatever
token is there. Split `A` by slot groups and compare with the template alone (an empty instruction).
"""),
        code('''neutral = torch.tensor(text.encode(model, "<|im_start|>system\\n<|im_end|>\\n"))
with torch.no_grad():
    answer = pl.run_with_prefix(model, tokens, prefix)[:, -1].argmax(-1)    # first answer token with the prefix
    contrast = model(tokens)[:, -1].argmax(-1)                             # ... and without it
story = attribution.compare_with_neutral(model, tokens, prompt, neutral, answer=answer, contrast=contrast)
print(story.groups)
print({k: round(v, 3) for k, v in story.summary().items()})
report.slot_groups_figure(story.split, story.neutral_mass)'''),
        md("""
## Which heads' biases move the answer

The direct effect of each head's bias `A·b·W_O` on the answer-vs-contrast logit difference, net of
the template, per layer and head; then the attention of the head with the largest effect.
"""),
        code('''top = attribution.top_heads(story.net_effect(), k=3)
print("heads by effect:", [report.head_label(l, h) for l, h in top])
report.head_effect_figure(story.net_effect(), highlight=top)'''),
        code('''layer, head = top[0]
report.attention_figure(model, tokens, prefix, layer=layer, head=head, decomposition=d,
                        slot_names=report.token_labels(model, prompt))'''),
    ]


NOTEBOOKS = {
    "demo": demo,
    "section4_bias_only": section4,
    "section5_toy_tasks": section5,
    "section6_prefix_vs_lora": section6,
    "appendixB_longer_prefixes": appendix_b,
}


def build(name: str):
    nb = new_notebook(cells=NOTEBOOKS[name]())
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # deterministic ids: rebuilding gives the same file
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    return nb


def main() -> None:
    from prefixlens.serialization import atomic_write_text

    for name in NOTEBOOKS:
        atomic_write_text(HERE / f"{name}.ipynb", nbformat.writes(build(name)) + "\n")
        print(f"wrote analyses/{name}.ipynb")


if __name__ == "__main__":
    main()
