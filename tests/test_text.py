"""Text in, text out: strings and lists of strings at every entry point, one BOS policy, chat prefixes.

Toy models (word-level tokenizer: the text "3 5 7" is the ids [3, 5, 7]; "1" is BOS, "2" EOS, "0" pad, and
these special tokens also match inside a longer number, so "10" is [1, 0]: the texts avoid digits 0-2;
their default is to prepend BOS) for the rules, SmolLM2-135M-Instruct for the real tokenizer and chat
template (loaded once for the module).
"""

import pytest
import torch

import prefixlens as pl
from prefixlens import analysis, models, text
from tests.conftest import build, n_attached_hooks

FORMS = [pl.KVPrefix, pl.ResidualPrefix, pl.SoftPrompt]
BOS = 1


def ids(*rows):
    return torch.tensor(rows)


# --- prefixlens.text: encoding, BOS, padding, errors ------------------------------------------------------


def test_encode_bos_policy_and_left_padding():
    model = build("llama_gqa")
    assert model.cfg.default_prepend_bos  # the toy tokenizer's own default: BOS first
    assert text.encode(model, "3 5 7") == [BOS, 3, 5, 7]
    assert text.encode(model, "3 5 7", prepend_bos=False) == [3, 5, 7]
    # a continuation (content after a prefix) gets no BOS unless asked for
    tokens, mask = text.tokens_and_mask(model, "3 5 7", continuation=True)
    assert tokens.tolist() == [[3, 5, 7]] and mask is None
    tokens, _ = text.tokens_and_mask(model, "3 5 7", prepend_bos=True, continuation=True)
    assert tokens.tolist() == [[BOS, 3, 5, 7]]
    tokens, mask = text.tokens_and_mask(model, ["3 5 7", "9"], continuation=True)
    assert tokens.tolist() == [[3, 5, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    tokens, mask = text.tokens_and_mask(model, ["3 5", "9 8"])
    assert tokens.tolist() == [[BOS, 3, 5], [BOS, 9, 8]] and mask is None


def test_smollm2_default_has_no_bos_where_transformerlens_adds_one(smollm2):
    assert smollm2.cfg.default_prepend_bos is False
    assert text.encode(smollm2, "Hi") == [26843]
    assert text.encode(smollm2, "Hi", prepend_bos=True) == [1, 26843]
    assert pl.SoftPrompt.from_prompt(smollm2, "Hi").length == 1


def test_errors():
    model, native = build("llama_gqa"), build("native")
    prefix = pl.KVPrefix.from_prompt(model, "4 6")
    with pytest.raises(ValueError, match="no tokenizer"):
        pl.run_with_prefix(native, "3 5", pl.KVPrefix.random(native, 2))
    with pytest.raises(ValueError, match="no tokenizer"):
        pl.SoftPrompt.from_prompt(native, "3 5")
    with pytest.raises(ValueError, match="prepend_bos applies to text only"):
        pl.run_with_prefix(model, ids([3, 5]), prefix, prepend_bos=True)
    with pytest.raises(ValueError, match="prepend_bos applies to text only"):
        pl.KVPrefix.from_prompt(model, ids([3, 5]), prepend_bos=False)
    with pytest.raises(ValueError, match="attention_mask was given with text"):
        pl.run_with_prefix(model, ["3 5", "7"], prefix, attention_mask=ids([1, 1], [0, 1]))
    with pytest.raises(ValueError, match="empty string"):
        pl.run_with_prefix(model, "", prefix)
    with pytest.raises(ValueError, match="empty string"):
        pl.generate(model, ["3", ""], prefix)
    with pytest.raises(ValueError, match="empty string"):
        pl.KVPrefix.from_prompt(model, "")
    with pytest.raises(ValueError, match="prefix slots cannot be padded"):
        pl.ResidualPrefix.from_prompt(model, ["3 5 7", "9"])
    with pytest.raises(ValueError, match="return_text=True needs the model's tokenizer"):
        pl.generate(native, ids([3, 5]), max_new_tokens=1, return_text=True)
    with pytest.raises(ValueError, match="no chat template"):
        text.chat_prefix(model, "4 6")
    assert n_attached_hooks(model) == 0


# --- every entry point takes text ---------------------------------------------------------------------------


@pytest.mark.wrong_types_on_purpose  # lists mixing strings and ids, where str | list[str] or ids are annotated
def test_lists_mixing_strings_and_ids_are_refused():
    model = build("llama_gqa")
    prefix = pl.KVPrefix.from_prompt(model, "4 6")
    with pytest.raises(TypeError, match="mixing strings and token ids"):
        pl.run_with_prefix(model, ["3 5", [7, 9]], prefix)
    with pytest.raises(TypeError, match="mixing strings and token ids"):
        pl.decompose(model, ["3 5", 7], prefix)


@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_from_prompt_text_is_the_prompt_with_the_model_default_bos(form):
    model = build("llama_gqa")
    by_text = form.from_prompt(model, "4 6")
    by_ids = form.from_prompt(model, ids(BOS, 4, 6))  # the prompt starts the sequence: the toy default adds BOS
    assert not by_text.batched and by_text.length == 3
    for name in form.tensor_names:
        assert torch.equal(getattr(by_text, name), getattr(by_ids, name))
    no_bos = form.from_prompt(model, "4 6", prepend_bos=False)
    assert no_bos.length == 2
    batched = form.from_prompt(model, ["4 6", "8 9"])  # equal token lengths: one prefix per example
    assert batched.batched and batched.batch_size == 2 and batched.length == 3
    row = form.from_prompt(model, "8 9")
    for name in form.tensor_names:
        assert (getattr(batched, name)[1] - getattr(row, name)).abs().max() < 1e-5  # batched matmul: roundoff


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("form", FORMS, ids=lambda c: c.__name__)
def test_prefix_from_prompt_text_then_content_text_equals_the_real_prompt(family, form):
    model = build(family)
    logits = pl.run_with_prefix(model, "3 5 7", form.from_prompt(model, "4 6"))
    with torch.no_grad():
        real = model(ids([BOS, 4, 6, 3, 5, 7]))[:, 3:]  # the prompt's BOS, no BOS before the content
        with_bos = model(ids([BOS, 4, 6, BOS, 3, 5, 7]))[:, 3:]
    assert logits.shape == real.shape
    assert (logits - real).abs().max() < 1e-5
    assert (with_bos[:, 1:] - real).abs().max() > 1e-3  # a stray BOS would be seen
    explicit = pl.run_with_prefix(model, "3 5 7", form.from_prompt(model, "4 6"), prepend_bos=True)
    assert (explicit - with_bos).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_ragged_text_batch_equals_each_row_alone(family):
    model = build(family)
    prefix = pl.KVPrefix.from_prompt(model, "4 6 8")
    texts = ["3 5 7 9", "39", "43 45"]
    batch = pl.run_with_prefix(model, texts, prefix)
    gen = pl.generate(model, texts, prefix, max_new_tokens=4)
    gen_text = pl.generate(model, texts, prefix, max_new_tokens=4, return_text=True)
    d = pl.decompose(model, texts, prefix)
    for i, t in enumerate(texts):
        n = len(t.split())
        alone = pl.run_with_prefix(model, t, prefix)
        assert (batch[i, -n:] - alone[0]).abs().max() < 1e-5
        alone_gen = pl.generate(model, t, prefix, max_new_tokens=4)
        assert torch.equal(gen[i, -(n + 4) :], alone_gen[0])
        assert gen_text[i] == " ".join(str(x) for x in alone_gen[0, n:].tolist())
        d_alone = pl.decompose(model, t, prefix)
        assert (d.prefix_attention[:, i, :, -n:] - d_alone.prefix_attention[:, 0]).abs().max() < 1e-5
        assert (d.z[:, i, -n:] - d_alone.z[:, 0]).abs().max() < 1e-5
    assert (gen[1, :2] == 0).all()  # padding (the pad id) on the left of the short rows
    assert d.reconstruction_error() < 1e-5
    assert n_attached_hooks(model) == 0


def test_text_and_ids_agree_at_every_entry_point():
    model = build("llama_gqa")
    prefix = pl.ResidualPrefix.from_prompt(model, "4 6")
    texts, tokens, mask = ["3 5 7", "9 33"], ids([3, 5, 7], [0, 9, 33]), ids([1, 1, 1], [0, 1, 1])
    loss_t = pl.run_with_prefix(model, texts, prefix, return_type="loss")
    loss_i = pl.run_with_prefix(model, tokens, prefix, attention_mask=mask, return_type="loss")
    assert torch.equal(loss_t, loss_i)
    logits_t, cache_t = pl.run_with_cache(model, texts, prefix, names_filter="blocks.1.hook_resid_pre")
    logits_i, cache_i = pl.run_with_cache(
        model, tokens, prefix, names_filter="blocks.1.hook_resid_pre", attention_mask=mask
    )
    assert torch.equal(logits_t, logits_i)
    assert torch.equal(cache_t["blocks.1.hook_resid_pre"], cache_i["blocks.1.hook_resid_pre"])
    check_t = analysis.check_identities(model, texts, prefix)
    check_i = analysis.check_identities(model, tokens, prefix, attention_mask=mask)
    assert torch.equal(check_t.mean_prefix_attention, check_i.mean_prefix_attention)
    assert check_t.n_positions == 3
    stats_t = analysis.slot_statistics(model, texts, prefix)
    stats_i = analysis.slot_statistics(model, tokens, prefix, attention_mask=mask)
    assert torch.equal(stats_t.weights, stats_i.weights)
    # and the BOS choice reaches them: an explicit BOS changes what they see
    check_bos = analysis.check_identities(model, texts, prefix, prepend_bos=True)
    assert check_bos.n_positions == 4
    assert not torch.equal(check_bos.mean_prefix_attention, check_t.mean_prefix_attention)


def test_generate_without_prefix_starts_the_sequence_with_the_default_bos():
    model = build("gpt2")
    out = pl.generate(model, "3 5", max_new_tokens=3)
    assert out[0, :3].tolist() == [BOS, 3, 5]
    out = pl.generate(model, "3 5", pl.KVPrefix.from_prompt(model, "4"), max_new_tokens=3)
    assert out[0, :2].tolist() == [3, 5]


def test_return_text_is_the_continuation_cut_at_eos():
    model = build("gpt2")
    prefix = pl.SoftPrompt.from_prompt(model, "4 6")
    free = pl.generate(model, ["3 5", "7"], prefix, max_new_tokens=5)
    assert pl.generate(model, ["3 5", "7"], prefix, max_new_tokens=5, return_text=True) == [
        " ".join(map(str, row[-5:].tolist())) for row in free
    ]
    eos = int(free[0, -4])  # row 0's second new token acts as EOS
    out = pl.generate(model, ["3 5", "7"], prefix, max_new_tokens=5, eos_token_id=eos, return_text=True)
    for row, said in zip(free, out):
        new = row[-5:].tolist()
        end = new.index(eos) + 1 if eos in new else 5
        assert said == " ".join(map(str, new[:end]))  # up to and including the first EOS, no EOS padding
    assert len(out[0].split()) < 5


# --- chat templates --------------------------------------------------------------------------------------

# A word-level chat template for the toy tokenizer: each turn is "1 <role id> <content> 2".
TOY_TEMPLATE = (
    "{% for m in messages %}1 {{ {'system': '36', 'user': '37', 'assistant': '38'}[m['role']] }} "
    "{{ m['content'] }} 2 {% endfor %}{% if add_generation_prompt %}1 38 {% endif %}"
)
FOLDING_TEMPLATE = (  # Llama-2 style: with a user turn, the system prompt goes inside it
    "{% if messages|length == 1 %}1 36 {{ messages[0]['content'] }} 2 "
    "{% else %}1 {% for m in messages %}{{ m['content'] }} {% endfor %}2 {% endif %}"
)


@pytest.mark.parametrize("form", ["kv", "residual", "soft"])
def test_chat_prefix_plus_turn_equals_the_whole_templated_conversation_toy(monkeypatch, form):
    model = build("llama_gqa")
    monkeypatch.setattr(model.tokenizer, "chat_template", TOY_TEMPLATE, raising=False)
    user = [{"role": "user", "content": "3 5 7"}]
    prefix = text.chat_prefix(model, "4 6", form=form)
    tokens, mask = text.chat_continuation(model, user, "4 6")
    assert prefix.length == 5 and mask is None
    assert tokens.tolist() == [[1, 37, 3, 5, 7, 2, 1, 38]]
    full = text.chat_ids(model, [{"role": "system", "content": "4 6"}] + user, add_generation_prompt=True)
    assert full == [1, 36, 4, 6, 2] + tokens[0].tolist()
    with torch.no_grad():
        real = model(torch.tensor([full]))[:, 5:]
    assert (pl.run_with_prefix(model, tokens, prefix) - real).abs().max() < 1e-5
    # ragged conversations: left-padded with a mask, each row as it is alone
    batch, mask = text.chat_continuation(model, [user, "9"], "4 6")
    assert mask is not None and batch[1, -6:].tolist() == [1, 37, 9, 2, 1, 38]
    # from_chat on the forms is the same prefix
    same = {"kv": pl.KVPrefix, "residual": pl.ResidualPrefix, "soft": pl.SoftPrompt}[form].from_chat(model, "4 6")
    assert all(torch.equal(getattr(same, n), getattr(prefix, n)) for n in prefix.tensor_names)


def test_chat_template_that_folds_the_system_prompt_is_refused(monkeypatch):
    model = build("llama_gqa")
    monkeypatch.setattr(model.tokenizer, "chat_template", FOLDING_TEMPLATE, raising=False)
    assert text.chat_ids(model, "4 6") == [1, 36, 4, 6, 2]
    assert text.chat_ids(model, [{"role": "system", "content": "4 6"}, {"role": "user", "content": "3"}]) == [1, 4, 6, 3, 2]
    with pytest.raises(ValueError, match="cannot be split"):
        text.chat_continuation(model, "3", "4 6")
    with pytest.raises(TypeError, match="messages"):
        text.chat_prefix(model, [{"content": "no role"}])


# --- SmolLM2-135M-Instruct: the real tokenizer, chat template and HF generate -------------------------------

# Tolerance for float32 logits (|logit| up to ~30) against the model on the whole sequence; measured
# (docs/concepts/text.md, "Text in, text out"): prompt + content 5.6e-5 (KV, residual),
# 0.0 (soft prompt); chat system prefix + user turn 6.2e-5 (KV, residual), 0.0 (soft); float64 0.0 for all.
SMOL_TOL = 5e-4


@pytest.fixture(scope="module")
def smollm2():
    return models.load("smollm2-135m")


def test_smollm2_prompt_text_then_content_text_equals_the_real_prompt(smollm2):
    m = smollm2
    prompt, content = "You are a helpful assistant.", " The capital of France is"
    real_ids = text.encode(m, prompt) + text.encode(m, content, prepend_bos=False)
    # here the token concatenation is also the joint tokenisation of the text
    assert real_ids == m.tokenizer(prompt + content, add_special_tokens=False)["input_ids"]
    P = len(text.encode(m, prompt))
    with torch.no_grad():
        real = m(torch.tensor([real_ids]))[:, P:]
        for form in FORMS:
            got = pl.run_with_prefix(m, content, form.from_prompt(m, prompt))
            assert got.shape == real.shape
            assert (got - real).abs().max() < SMOL_TOL, form.__name__
        with_bos = m(torch.tensor([[1] + real_ids]))[:, P + 1 :]
    assert (with_bos - real).abs().max() > 0.1  # TransformerLens's stray <|im_start|> would show


def test_smollm2_ragged_text_batch_equals_each_row_alone(smollm2):
    m = smollm2
    prefix = pl.KVPrefix.from_prompt(m, "Answer in one word.")
    texts = [" The capital of France is", " Two plus two"]
    batch = pl.run_with_prefix(m, texts, prefix)
    for i, t in enumerate(texts):
        alone = pl.run_with_prefix(m, t, prefix)
        assert (batch[i, -alone.shape[1] :] - alone[0]).abs().max() < SMOL_TOL


def test_smollm2_greedy_generate_with_a_prompt_prefix_matches_hf_generate(smollm2):
    m = smollm2
    prompt, content = "Answer briefly.", " The capital of France is"
    prefix = pl.KVPrefix.from_prompt(m, prompt)
    ours = pl.generate(m, content, prefix, max_new_tokens=6)
    full = torch.tensor([text.encode(m, prompt) + text.encode(m, content, prepend_bos=False)])
    hf = m.original_model.generate(full, max_new_tokens=6, do_sample=False)
    assert ours[0].tolist() == hf[0, prefix.length :].tolist()
    said = pl.generate(m, "The capital of France is", max_new_tokens=3, return_text=True)
    assert isinstance(said, list) and len(said) == 1 and "Paris" in said[0]
    assert not said[0].startswith("The capital")  # the continuation only


def _chat_check(m, tol):
    system = "You are a pirate."
    user = [{"role": "user", "content": "What is the capital of France?"}]
    prefix = text.chat_prefix(m, system)
    tokens, mask = text.chat_continuation(m, user, system)
    full = m.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}] + user, tokenize=True, add_generation_prompt=True
    )
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    assert mask is None
    assert full[: prefix.length] == text.chat_ids(m, system) and full[prefix.length :] == tokens[0].tolist()
    with torch.no_grad():
        real = m(torch.tensor([full]))[:, prefix.length :]
        got = pl.run_with_prefix(m, tokens, prefix)
    error = (got - real).abs().max().item()
    assert error < tol
    eos = m.tokenizer.eos_token_id  # <|im_end|>
    ours = pl.generate(m, tokens, prefix, max_new_tokens=8, eos_token_id=eos)
    hf = m.original_model.generate(torch.tensor([full]), max_new_tokens=8, do_sample=False, eos_token_id=eos)
    new_hf = hf[0, len(full) :].tolist()
    assert ours[0, tokens.shape[1] : tokens.shape[1] + len(new_hf)].tolist() == new_hf
    assert new_hf[-1] == eos  # " The capital of France is Paris." and <|im_end|>: the cut at EOS is exercised
    said = pl.generate(m, tokens, prefix, max_new_tokens=8, eos_token_id=eos, return_text=True, skip_special_tokens=True)
    assert said == [m.tokenizer.decode(new_hf, skip_special_tokens=True)] and "Paris" in said[0]
    assert text.decode(m, ours[:, tokens.shape[1] :])[0].endswith("<|im_end|>")
    return error


def test_smollm2_chat_system_prompt_as_a_prefix(smollm2):
    _chat_check(smollm2, SMOL_TOL)


@pytest.mark.slow
def test_smollm2_chat_system_prompt_as_a_prefix_float64():
    _chat_check(models.load("smollm2-135m", dtype=torch.float64), 1e-10)
