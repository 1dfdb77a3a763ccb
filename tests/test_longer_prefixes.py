"""analyses/longer_prefixes.py: trains tiny prefixes, or analyses saved ones, and writes its tables;
and the real-task run on SmolLM2 with the lexicons of prefixlens.lexicons (real labels from afinn / nrclex)."""

from __future__ import annotations

import json

import pytest
import torch

import prefixlens as pl
from prefixlens import lexicons, models, tasks
from tests.test_prefix_bias_only import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("longer_prefixes")


def test_trains_and_reports(script, tmp_path):
    script.main(["--pretrain-iters", "3", "--prefix-iters", "3", "--seeds", "0,1", "--length", "3",
                 "--n-inputs", "24", "--n-eval", "16", "--out", str(tmp_path),
                 "--save-prefixes", str(tmp_path / "p")])
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"longer_prefixes.{ext}").stat().st_size > 500
    on_disk = json.loads((tmp_path / "longer_prefixes.json").read_text())
    assert on_disk["command"].startswith("prefixlens run longer_prefixes --pretrain-iters 3")
    assert on_disk["experiment"] == "longer_prefixes" and on_disk["wall_time_s"] >= 0 and "environment" in on_disk
    assert on_disk["config"]["seeds"] == [0, 1] and on_disk["config"]["stem"] == "longer_prefixes"
    assert [p["seed"] for p in on_disk["prefixes"]] == [0, 1]
    L, H = script.TOY_GPT2["n_layers"], script.TOY_GPT2["n_heads"]
    # every head of every layer, for both queries, trained and init
    for q in ("last_input", "answer"):
        for kind in ("prefix", "init"):
            table = on_disk["per_layer"][q][kind]
            assert len(table["spread_p1_p99"]) == L
            assert all(0.0 <= x <= 1.0 for x in table["spread_p1_p99"] + table["top_slot_share"])
            assert all(x <= 3 + 1e-9 for x in table["value_rank"] + table["bias_erank"])
            heads = on_disk["per_head"][q][kind][0]
            assert torch.tensor(heads["top_slot_share"]).shape == (L, H)
    assert len(on_disk["slot_ranges"]) == 2 * L * H * 3
    assert all(r["p1"] <= r["median"] <= r["p99"] for r in on_disk["slot_ranges"])
    # a trained prefix differs from its initialisation; the init control is the trainer's init
    # (the prefix was trained on the pretrained model: onto the untrained one it loads only by override)
    path, untrained = tmp_path / "p" / "ascending_P3_seed0.safetensors", models.toy_gpt2(**script.TOY_GPT2)
    with pytest.raises(ValueError, match="other weights"):
        pl.Prefix.load(path, untrained)
    trained = pl.Prefix.load(path, untrained, allow_other_weights=True)
    init = pl.ResidualPrefix.random(models.toy_gpt2(**script.TOY_GPT2), 3, seed=0)
    assert 0 < float((trained.resid - init.resid).detach().abs().max()) < 1.0
    md = (tmp_path / "longer_prefixes.md").read_text()
    assert "0.016" in md and "| mean p99−p1 |" in md
    assert "Command: `prefixlens run longer_prefixes --pretrain-iters 3" in md
    # the Markdown and the figure come back from the JSON alone
    png = (tmp_path / "longer_prefixes.png").read_bytes()
    (tmp_path / "longer_prefixes.md").unlink()
    (tmp_path / "longer_prefixes.png").unlink()
    script.main(["--render-only", "--out", str(tmp_path)])
    assert (tmp_path / "longer_prefixes.md").read_text() == md and (tmp_path / "longer_prefixes.png").read_bytes() == png


def test_help_and_default_out(script, help_text):
    """--help shows the docstring's whole first sentence, the profiles and every option; results go to runs/results by default."""
    from prefixlens.experiment import COMMITTED_RESULTS, DEFAULT_OUT

    text = help_text(script)
    assert ("Appendix B on every head: attention over the slots of a longer prefix, and the span its biases use."
            in text)
    assert "prefixlens run longer_prefixes --model smollm2-135m --profile quick" in text and "python analyses" not in text
    assert "full: The committed run: 3 seeds × 40 steps of 16 words, 30 test words per label" in text
    assert "quick: A tiny run for tests" in text and "(default: full)" in text and f"(default: {DEFAULT_OUT})" in text
    args = script.parse_args([])
    assert args.out == DEFAULT_OUT != COMMITTED_RESULTS and args.stem == "longer_prefixes" and not args.real
    assert args.seeds == [0, 1, 2, 3, 4]
    real = script.parse_args(["--model", "smollm2-135m"])
    assert real.stem == "longer_prefixes_smollm2" and real.task == "nrc-emotion" and real.real
    assert (real.seeds, real.steps, real.batch_size, real.n_test_per_class) == ([0, 1, 2], 40, 16, 30)
    quick = script.parse_args(["--model", "smollm2-135m", "--profile", "quick", "--steps", "5"])
    assert (quick.seeds, quick.steps, quick.batch_size, quick.n_test_per_class) == ([0], 5, 2, 2)


def test_saved_prefixes_on_a_checkpoint(script, tmp_path):
    """--model DIR with --prefixes: no training, statistics only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tasks.VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "ckpt")
    model = models.load(tmp_path / "ckpt")
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"p{seed}.safetensors")
        pl.ResidualPrefix.random(model, 4, seed=seed).save(paths[-1])
    result = script.main(["--model", str(tmp_path / "ckpt"), "--prefixes", *map(str, paths), "--length", "4",
                          "--n-inputs", "20", "--n-eval", "8", "--out", str(tmp_path / "o")])
    assert [p["name"] for p in result["prefixes"]] == ["p0", "p1"]
    assert "init" not in result["per_layer"]["last_input"]
    assert len(result["per_layer"]["answer"]["prefix"]["bias_erank"]) == 2


def test_bad_arguments(script):
    with pytest.raises(SystemExit):
        script.main(["--length", "0"])
    with pytest.raises(SystemExit):
        script.main(["--seeds", ""])
    with pytest.raises(SystemExit):  # a real task needs a model with a tokenizer
        script.main(["--task", "nrc-emotion"])
    with pytest.raises(SystemExit):
        script.main(["--model", "smollm2-135m", "--prefixes", "x.safetensors", "--task", "nrc-emotion"])


# --- the real labelled data: prefixlens.lexicons ---------------------------------------------------------

def test_lexicons_give_real_labels():
    afinn = lexicons.afinn()
    assert len(afinn) == 3382  # AFINN-165
    assert afinn["good"] == 3 and afinn["bad"] == -3 and afinn["outstanding"] == 5
    assert all(-5 <= s <= 5 for s in afinn.values())
    nrc = lexicons.nrc_emotions()
    assert len(nrc) == 6468
    assert nrc["abandon"] == ("fear", "negative", "sadness")
    assert "joy" in nrc["happy"] and "anger" in nrc["rage"]
    assert {t for v in nrc.values() for t in v} == set(lexicons.NRC_EMOTIONS) | {"positive", "negative"}


def test_lexicon_files_are_read_without_importing_the_packages():
    import sys

    before = {m for m in ("afinn", "nrclex", "textblob", "nltk") if m in sys.modules}
    lexicons.afinn(), lexicons.nrc_emotions()
    assert {m for m in ("afinn", "nrclex", "textblob", "nltk") if m in sys.modules} == before
    assert lexicons.data_file("nrclex", "data", "nrc_en.json").name == "nrc_en.json"
    with pytest.raises(ImportError, match="pip install"):
        lexicons.data_file("no_such_lexicon_package_xyz", "data.txt")


def test_task_split_is_frozen_and_deterministic():
    task = lexicons.nrc_emotion_task()
    again = lexicons.nrc_emotion_task()
    assert task == again and task.fingerprint() == again.fingerprint()
    # the committed run's split (results/longer_prefixes_smollm2.json records the same hash)
    assert task.fingerprint() == "85d18cc05e69f13f7d49c5b1ae44aa18e7654cb5a7f7f1576b071eba7de076ff"
    assert task.counts("test") == {c: 30 for c in task.labels}
    assert task.counts("train") == {"anger": 210, "fear": 279, "joy": 112, "sadness": 276, "surprise": 84}
    train_words, test_words = {w for w, _ in task.train}, {w for w, _ in task.test}
    assert not train_words & test_words and len(test_words) == len(task.test)
    nrc = lexicons.nrc_emotions()
    for w, y in task.train + task.test:  # each word has exactly one of the eight emotions, and it is the label
        assert [e for e in nrc[w] if e in lexicons.NRC_EMOTIONS] == [y]
    other = lexicons.nrc_emotion_task(seed=1)
    assert other.fingerprint() != task.fingerprint() and set(other.train + other.test) == set(task.train + task.test)
    sent = lexicons.afinn_sentiment_task()
    afinn = lexicons.afinn()
    assert sent.counts("test") == {"positive": 50, "negative": 50}
    assert all((afinn[w] > 0) == (y == "positive") and abs(afinn[w]) >= 2 for w, y in sent.train + sent.test)
    assert sent.fingerprint() == lexicons.afinn_sentiment_task().fingerprint()
    with pytest.raises(ValueError):
        lexicons.nrc_emotion_task(classes=("anger", "love"))
    with pytest.raises(ValueError, match="leaves none"):
        lexicons.nrc_emotion_task(n_test_per_class=200)


# --- the real run on SmolLM2 (the built-in model; ~30-60 s on a shared CPU) -----------------------------

@pytest.fixture(scope="module")
def smollm2():
    return models.load("smollm2-135m")


@pytest.mark.slow
def test_quick_profile_on_smollm2(script, smollm2, tmp_path, monkeypatch):
    """--profile quick on SmolLM2: the outputs, and the slot statistics checked against hook_pattern."""
    model = smollm2
    monkeypatch.setattr(script, "load_model", lambda name: model)  # reuse the loaded model
    result = script.main(["--model", "smollm2-135m", "--profile", "quick", "--out", str(tmp_path),
                          "--save-prefixes", str(tmp_path / "p")])
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"longer_prefixes_smollm2.{ext}").stat().st_size > 500
    on_disk = json.loads((tmp_path / "longer_prefixes_smollm2.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["command"] == f"prefixlens run longer_prefixes --model smollm2-135m --profile quick --out {tmp_path} --save-prefixes {tmp_path / 'p'}"
    assert on_disk["profile"] == "quick" and on_disk["settings"] == {"seeds": [0], "steps": 2, "batch_size": 2, "n_test_per_class": 2}
    assert on_disk["config"]["real"] and on_disk["config"]["steps"] == 2
    L, H, P = 30, 9, 10
    assert on_disk["task"]["name"] == "nrc-emotion" and on_disk["task"]["n_test"] == 10
    assert on_disk["base"]["label_token_ids"] == [9846, 3696, 7697, 18824, 8731]  # ' anger' ' fear' ' joy' ' sadness' ' surprise'
    assert [p["seed"] for p in on_disk["prefixes"]] == [0] and len(on_disk["prefixes"][0]["losses"]) == 2
    for acc in [on_disk["base"]["zero_shot"]] + [p[k] for p in on_disk["prefixes"] for k in ("test", "init_test")]:
        assert 0 <= acc["accuracy"] <= 1 and acc["n"] == 10 and sum(acc["predicted_counts"]) == 10
        assert acc["accuracy_ci95"][0] <= acc["accuracy"] <= acc["accuracy_ci95"][1]
    for kind in ("prefix", "init"):
        table = on_disk["per_layer"][kind]
        assert len(table["spread_p1_p99"]) == L
        assert all(0 <= a <= b <= c <= 1 for a, b, c in zip(table["spread_min_over_heads"], table["spread_p1_p99"], table["spread_max_over_heads"]))
        assert all(1 / P - 1e-9 <= x <= 1 for x in table["top_slot_share"])
        assert torch.tensor(on_disk["per_head"][kind][0]["top_slot_share"]).shape == (L, H)
    q = torch.tensor(on_disk["slot_quantiles"]["values"])
    assert q.shape == (1, L, H, P, 3) and bool((q[..., 0] <= q[..., 1] + 1e-4).all() and (q[..., 1] <= q[..., 2] + 1e-4).all())
    assert "0.016" in (tmp_path / "longer_prefixes_smollm2.md").read_text()

    # the statistics, independently: the attention pattern of the prefixed run (hook_pattern), at the
    # last prompt token, over the slots, renormalised, gives the recorded slot quantiles, top-slot weights
    # and prefix mass (the JSON's are rounded to 4 / 5 decimals)
    args = script.parse_args(["--model", "smollm2-135m", "--profile", "quick"])
    task = script.real_task(args)
    ids, mask = script.left_pad(script.encode_prompts(model, task, task.test), script.pad_id_of(model))
    trained = pl.Prefix.load(tmp_path / "p" / "nrc-emotion_P10_seed0.safetensors", model)
    init = script.initial_prefix(model, args, seed=0)  # the control: the instruction's residual stream
    words = model.tokenizer(script.INIT_TEXT["nrc-emotion"], add_special_tokens=False)["input_ids"]  # no BOS, as SmolLM2's own tokenizer
    assert len(words) == P and torch.equal(init.resid, pl.ResidualPrefix.from_prompt(model, torch.tensor(words)).resid)
    assert float((trained.resid - init.resid).detach().abs().max()) > 1e-3
    for kind, prefix in (("prefix", trained), ("init", init)):
        heads = on_disk["per_head"][kind][0]
        for layer, head in ((0, 0), (17, 5), (29, 8)):
            name = f"blocks.{layer}.attn.hook_pattern"
            with torch.no_grad():
                _, cache = pl.run_with_cache(model, ids, prefix, names_filter=name, attention_mask=mask)
            row = cache[name][:, head, -1, :P].double()  # [words, slots]: the last prompt token's attention on the slots
            weights = row / row.sum(-1, keepdim=True)
            assert row.shape == (10, P)
            assert abs(float(row.sum(-1).mean()) - heads["prefix_mass"][layer][head]) < 1e-4
            assert abs(float(weights.amax(-1).mean()) - heads["top_slot_share"][layer][head]) < 1e-4
            if kind == "prefix":  # the quantiles are recorded for the trained prefixes
                expected = torch.quantile(weights, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64), dim=0).T  # [slot, 3]
                assert torch.allclose(q[0, layer, head].double(), expected, atol=2e-4)

    # the zero-shot path (left padding, a mask, positions from the mask) gives what each prompt gives alone
    two = script.last_logits(model, ids[:2], mask[:2])
    for i in range(2):
        alone = ids[i, mask[i].bool()][None]
        with torch.no_grad():
            assert torch.allclose(model(alone)[0, -1].float(), two[i], atol=1e-3)
