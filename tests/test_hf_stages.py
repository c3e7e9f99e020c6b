"""Every stage from an imported Hugging Face model: post-training adds the chat tokens to a
published tokenizer (rlhf/chat_vocab.py), continued pretraining tokenizes its data with the
imported tokenizer, sampling matches transformers, and the result exports back.

Models are tiny and random (as in test_hf_convert.py), with a byte-level BPE tokenizer.json
trained in the test (GPT-2's kind of tokenizer, without the chat tokens).
"""

import json
import logging
import sysconfig
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from data.tokenizer import CHAT_TOKENS  # noqa: E402
from experiments import convert  # noqa: E402
from model.transformer import LanguageModel  # noqa: E402
from rlhf import chat_vocab  # noqa: E402
from tests.run_helpers import synthetic_posttrain_data  # noqa: E402
from train.saved_model import load_model  # noqa: E402

EOT = "<|endoftext|>"
# Python source: enough distinct merges for a few hundred BPE tokens.
TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()


def _bpe_tokenizer_json(directory: Path, vocab_size: int) -> int:
    """A byte-level BPE tokenizer.json of exactly `vocab_size` tokens; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TEXT], trainer)
    backend.save(str(directory / "tokenizer.json"))
    assert backend.get_vocab_size() == vocab_size
    return backend.token_to_id(EOT)


def _hf_model(family: str, vocab: int, eot: int):
    ids = dict(bos_token_id=eot, eos_token_id=eot)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=4, **ids
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False, **ids,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 1.0))
    return model.eval()


# GPT-2 tied, 300 tokens: the 4 chat tokens fit in the 384 padded rows. Llama untied, 383
# tokens: they do not, so the embedding and the head grow to 512 rows.
FAMILIES = {"gpt2": 300, "llama": 383}


@pytest.fixture(scope="module")
def imports(tmp_path_factory):
    """{family: (torch model, HF dir, imported checkpoint dir)}."""
    out = {}
    for family, vocab in FAMILIES.items():
        root = tmp_path_factory.mktemp(family)
        src = root / "hf"
        src.mkdir()
        eot = _bpe_tokenizer_json(src, vocab)
        model = _hf_model(family, vocab, eot)
        model.save_pretrained(src)
        convert.import_checkpoint(src, root / "imported")
        out[family] = (model, src, root / "imported")
    return out


def _logits(cfg, params, tokens):
    return np.asarray(LanguageModel(cfg).apply({"params": params}, jnp.asarray(tokens)))


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_tokens_are_added_and_old_logits_unchanged(imports, family, tmp_path, caplog):
    _, _, imported = imports[family]
    start = load_model(imported)
    old = start.tokenizer.vocab_size
    assert chat_vocab.missing_chat_tokens(start.tokenizer) == list(CHAT_TOKENS)
    with caplog.at_level(logging.INFO, logger="rlhf.chat_vocab"):
        grown = chat_vocab.with_chat_tokens(start, tmp_path / "tok")
    assert len([r for r in caplog.records if "added the chat tokens" in r.message]) == 1
    # the new ids follow the old ones; every old id keeps its meaning
    assert [grown.tokenizer.special_id(t) for t in CHAT_TOKENS] == list(range(old, old + 4))
    assert chat_vocab.missing_chat_tokens(grown.tokenizer) == []
    assert grown.tokenizer.encode(TEXT[:500]) == start.tokenizer.encode(TEXT[:500])
    assert grown.tokenizer.encode("a<|user|>b")[1] == old + 1
    assert grown.cfg.vocab_size == old + 4
    rows = {"gpt2": (384, 384), "llama": (384, 512)}[family]
    assert (start.cfg.padded_vocab, grown.cfg.padded_vocab) == rows
    # the model is the same function on the old vocabulary
    tokens = np.random.default_rng(0).integers(0, old, (2, 16))
    before = _logits(start.cfg, start.params, tokens)
    after = _logits(grown.cfg, grown.params, tokens)
    np.testing.assert_array_equal(after[..., :old], before[..., :old])
    assert (after[..., old + 4 :] <= -1e8).all()  # padding rows stay masked
    # new rows: the mean of the old ones
    table = np.asarray(grown.params["embed"]["embedding"])
    mean = np.asarray(start.params["embed"]["embedding"])[:old].mean(0)
    np.testing.assert_allclose(table[old : old + 4], np.tile(mean, (4, 1)), atol=1e-6)
    if family == "llama":
        head = np.asarray(grown.params["lm_head"])
        assert head.shape == (32, 512)
        want = np.asarray(start.params["lm_head"])[:, :old].mean(1)
        np.testing.assert_allclose(head[:, old : old + 4], np.tile(want[:, None], 4), atol=1e-6)
    # the same input gives the same bytes: a resumed stage stores the same tokenizer
    chat_vocab.with_chat_tokens(start, tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert chat_vocab.with_chat_tokens(grown, tmp_path / "unused") is grown


def test_sentencepiece_tokenizer_gets_the_chat_tokens(tmp_path):
    """A Llama-2-style tokenizer.model: the tokens become user-defined pieces at the end."""
    import sentencepiece as spm

    from data.special_tokens import add_special_tokens
    from data.tokenizer import load_tokenizer

    (tmp_path / "src").mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines()),
        model_prefix=str(tmp_path / "src" / "tokenizer"),
        vocab_size=400,
        byte_fallback=True,
        minloglevel=2,
    )
    before = load_tokenizer(tmp_path / "src")
    assert chat_vocab.missing_chat_tokens(before) == list(CHAT_TOKENS)
    add_special_tokens(tmp_path / "src", tmp_path / "dst", CHAT_TOKENS)
    after = load_tokenizer(tmp_path / "dst")
    assert [after.special_id(t) for t in CHAT_TOKENS] == [400, 401, 402, 403]
    assert after.encode(TEXT[:300]) == before.encode(TEXT[:300])
    assert 401 in after.encode("x <|user|> y")


def _posttrain_config(imported: Path, stages: str):
    """posttrain_tiny from an imported model, shrunk to seconds on a CPU."""
    from experiments.configs import posttrain_tiny

    c = posttrain_tiny.get_config()
    c.stages, c.init_from, c.pretrain_checkpoint = stages, str(imported), "latest"
    c.sft.data.update(seq_len=96, eval_rows=8)
    c.sft.train.update(global_batch_size=8, num_steps=2, log_every=1, eval_every=2)
    c.sft.train.checkpoint_every = 2
    c.sft.optim.warmup_steps = 1
    c.dpo.data.seq_len = 96
    c.dpo.train.update(global_batch_size=8, num_steps=2, log_every=1, checkpoint_every=2)
    c.dpo.train.eval_every = 2
    c.dpo.optim.warmup_steps = 1
    c.eval.update(num_prompts=8, max_prompt_len=48, max_new_tokens=8, batch_size=8)
    return c


def _export_matches_transformers(stage_dir: Path, dst: Path, old_vocab: int) -> None:
    """The exported model and tokenizer load in transformers: the chat tokens encode to
    their ids, and the logits are ours (float32, 1e-4)."""
    loaded = load_model(stage_dir)
    convert.export_checkpoint(stage_dir, dst)
    assert json.loads((dst / "config.json").read_text())["vocab_size"] == old_vocab + 4
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(dst)
    text = "<|user|>def f(x):<|end|><|assistant|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == loaded.tokenizer.encode(text) and ids[0] == old_vocab + 1
    tokens = np.asarray([ids, ids[::-1]])
    with torch.no_grad():
        want = theirs(input_ids=torch.tensor(tokens)).logits.numpy()
    ours = _logits(loaded.cfg, loaded.params, tokens)[..., : old_vocab + 4]
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
    assert np.abs(want).max() > 1.0


def test_grown_untied_model_exports_to_transformers(imports, tmp_path):
    """Llama untied, its embedding and head grown past the padded rows: the export holds
    the new rows and transformers computes the same logits."""
    from train.saved_model import save_model

    _, _, imported = imports["llama"]
    start = load_model(imported)
    grown = chat_vocab.with_chat_tokens(start, tmp_path / "tok")
    files = sorted((tmp_path / "tok").iterdir())
    save_model(tmp_path / "grown", grown.params, grown.cfg, files)
    _export_matches_transformers(tmp_path / "grown", tmp_path / "hf", start.tokenizer.vocab_size)


def test_pipeline_post_trains_an_import_and_exports_it(imports, tmp_path):
    """`experiments.pipeline` with init_from=an imported GPT-2: SFT runs on the extended
    tokenizer, DPO inherits it, and the SFT model exports with the extended vocabulary."""
    from experiments import pipeline
    from experiments import sft as sft_stage
    from train.saved_model import read_latest_meta

    _, _, imported = imports["gpt2"]
    root = tmp_path / "run"
    synthetic_posttrain_data(root / "posttrain_data")
    config = _posttrain_config(imported, "sft,dpo")
    summary = pipeline.run(config, root)
    assert set(summary["stages"]) == {"sft", "dpo"}
    old = load_model(imported).tokenizer.vocab_size
    sft = load_model(root / "sft")
    assert sft.step == 2 and sft.cfg.vocab_size == old + 4
    assert [sft.tokenizer.special_id(t) for t in CHAT_TOKENS] == list(range(old, old + 4))
    sha = read_latest_meta(root / "sft")["tokenizer"]["sha256"]
    assert read_latest_meta(root / "dpo")["tokenizer"]["sha256"] == sha
    assert load_model(root / "dpo").cfg == sft.cfg
    _export_matches_transformers(root / "sft", tmp_path / "hf", old)
    # SFT asked for one more step resumes: it extends the import again, to the same bytes
    config.sft.train.num_steps = 3
    config.sft.optim.total_steps = 2  # the schedule it had: one step more at its end value
    sft_stage.run(config, root)
    assert load_model(root / "sft").step == 3
    assert read_latest_meta(root / "sft")["tokenizer"]["sha256"] == sha


def _continued_pretraining_config(imported: Path, corpus: Path, data_dir: Path):
    """stdlib_tiny with the imported model's own model section, two steps."""
    import dataclasses

    from ml_collections import ConfigDict

    from experiments.configs.stdlib_tiny import get_config

    c = get_config()
    c.model = ConfigDict(dataclasses.asdict(load_model(imported).cfg))
    c.data.update(corpus=f"text:{corpus}", dir=str(data_dir), seq_len=32)
    c.train.update(global_batch_size=8, num_steps=2, log_every=1, eval_every=2, eval_batches=1)
    c.train.update(checkpoint_every=2, init_from=str(imported))
    c.optim.update(warmup_steps=1, total_steps=2)
    c.sample.num_samples = 0
    return c


def test_continued_pretraining_tokenizes_with_the_imported_tokenizer(imports, tmp_path, caplog):
    from data.prepare import load_meta, prepare
    from tests.run_helpers import make_corpus
    from train.evaluate import evaluate_checkpoint
    from train.pretrain import train, validate
    from train.saved_model import read_latest_meta

    _, _, imported = imports["gpt2"]
    corpus = make_corpus(tmp_path / "text")
    config = _continued_pretraining_config(imported, corpus, tmp_path / "data")
    with caplog.at_level(logging.INFO):
        results = train(config, tmp_path / "pretrain")
    assert np.isfinite(results["eval/loss"])
    assert any("starts from the parameters in" in r.message for r in caplog.records)
    sha = read_latest_meta(imported)["tokenizer"]["sha256"]
    assert read_latest_meta(tmp_path / "pretrain")["tokenizer"]["sha256"] == sha
    meta = load_meta(tmp_path / "data")
    assert meta["tokenizer"]["type"] == "existing" and meta["tokenizer"]["sha256"] == sha
    assert meta["tokenizer"]["files"] == ["tokenizer.json", "tokenizer_config.json"]
    # the import itself scores that data: its tokenizer is the data's, by sha256
    scored = evaluate_checkpoint(imported, tmp_path / "data", seq_len=32, max_batches=2)
    assert scored["step"] == 0 and np.isfinite(scored["eval/bits_per_byte"])

    # data tokenized with another tokenizer is refused, in one line
    prepare(f"text:{corpus}", tmp_path / "chars", tokenizer="char", progress=False)
    config.data.dir = str(tmp_path / "chars")
    with pytest.raises(ValueError, match="was tokenized with another tokenizer") as refused:
        train(config, tmp_path / "other")
    assert "\n" not in str(refused.value)
    # a model section that is not the import's names what to set
    config.model.d_model = 64
    with pytest.raises(ValueError, match=r"holds another model; set --config.model.d_model=32$"):
        validate(config)
    with pytest.raises(FileNotFoundError, match="nor the path of an existing tokenizer"):
        prepare(f"text:{corpus}", tmp_path / "x", tokenizer=str(tmp_path / "nothing"))


def test_continue_pretraining_config_takes_the_model_from_the_import(imports, tmp_path):
    """`--config=experiments/configs/continue_pretraining.py:DIR`: nothing typed in."""
    from experiments.configs import continue_pretraining
    from tests.run_helpers import make_corpus
    from train.pretrain import train
    from train.saved_model import read_latest_meta

    _, _, imported = imports["llama"]
    c = continue_pretraining.get_config(str(imported))
    assert dict(c.model) == read_latest_meta(imported)["model"]
    c.data.update(corpus=f"text:{make_corpus(tmp_path / 'text')}", seq_len=32)
    c.train.update(global_batch_size=8, num_steps=2, eval_every=2, eval_batches=1)
    c.train.update(checkpoint_every=2, log_every=1)
    c.optim.update(warmup_steps=1)
    c.sample.num_samples = 0
    results = train(c, tmp_path / "pretrain")
    assert np.isfinite(results["eval/loss"])
    assert read_latest_meta(tmp_path / "pretrain")["model"] == read_latest_meta(imported)["model"]
    with pytest.raises(ValueError, match="name the model to continue"):
        continue_pretraining.get_config("")


def test_sample_command_on_an_import_is_transformers_greedy(imports):
    """`experiments.sample --temperature=0` on an imported model prints the text of
    transformers' greedy generation from the same prompt (bos first, stopping at eos)."""
    import os
    import subprocess
    import sys

    from tests.run_helpers import REPO

    torch_model, _, imported = imports["llama"]
    tokenizer = load_model(imported).tokenizer
    prompt, new = "def fill(text, width", 12
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=new,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )[0, len(ids) :].tolist()
    want = tokenizer.decode([t for t in out if t != tokenizer.eos_id])
    run = subprocess.run(
        [sys.executable, "-m", "experiments.sample", f"--workdir={imported}", f"--prompt={prompt}",
         "--num_samples=1", f"--max_new_tokens={new}", "--temperature=0", "--top_k=0"],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("--- sample 0 ---\n", 1)[1] == f"{prompt}{want}\n"
    assert len(out) > 3  # a real continuation, not an immediate eos
