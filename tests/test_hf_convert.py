"""Hugging Face import/export against transformers itself (GPT-2 and Llama families).

torch (CPU) and transformers are test-only dependencies (the `hf` extra); the
tests are skipped without them. Models are tiny and random, with weights
scaled up so that a wrong mapping changes the logits by far more than 1e-4.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import model.hf as hf  # noqa: E402
from data.hf_tokenizer import HFTokenizer  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from model.config import get_preset  # noqa: E402
from model.hf import safetensors_io as st  # noqa: E402
from model.sampling import SamplingConfig, sample  # noqa: E402
from model.transformer import LanguageModel  # noqa: E402
from tests.helpers import mesh_of, write_bpe_tokenizer  # noqa: E402
from train import state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, EOS = 96, 5
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
MASK = np.ones_like(TOKENS)
MASK[0, :4] = 0  # row 0 left-padded by 4


def _randomise(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 1.0))
    return module.eval()


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=EOS, eos_token_id=EOS,
    )  # fmt: skip
    return _randomise(transformers.GPT2LMHeadModel(cfg), 0)


def _llama(**options):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS,
        **options,
    )  # fmt: skip
    return _randomise(transformers.LlamaForCausalLM(cfg), 1)


LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500.0, factor=4.0, low_freq_factor=1.0,
    high_freq_factor=2.0, original_max_position_embeddings=8,
)  # fmt: skip
MODELS = {
    "gpt2": _gpt2,
    "llama-gqa-untied": _llama,
    "llama3-rope-head_dim": lambda: _llama(head_dim=16, rope_parameters=LLAMA3_ROPE),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{name: (torch model, directory saved with save_pretrained)}."""
    out = {}
    for name, build in MODELS.items():
        model = build()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)  # safetensors
        out[name] = (model, path)
    return out


def _torch_logits(model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.numpy()


def _our_logits(cfg, params, tokens, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return np.asarray(
        LanguageModel(cfg).apply({"params": params}, jnp.asarray(tokens), positions, mask)
    )


def _assert_same_function(cfg, params, torch_model):
    ones = np.ones_like(MASK)
    for mask in (ones, MASK):  # full rows, then a left-padded batch
        ours, theirs = (
            _our_logits(cfg, params, TOKENS, mask),
            _torch_logits(torch_model, TOKENS, mask),
        )
        real = mask.astype(bool)
        # rows past the vocabulary pad the table to a multiple of 128, never to be chosen
        assert ours.shape[-1] == cfg.padded_vocab == 128 and (ours[..., VOCAB:] <= -1e8).all()
        np.testing.assert_allclose(ours[..., :VOCAB][real], theirs[real], atol=1e-4, rtol=0)
        assert np.abs(theirs[real]).max() > 1.0  # the comparison is not of near-zero logits


@pytest.mark.parametrize("name", MODELS)
def test_imported_logits_match_transformers(hf_dirs, name):
    torch_model, path = hf_dirs[name]
    cfg, _ = hf.read_config(path)
    if name == "llama3-rope-head_dim":
        assert (cfg.d_head, cfg.rope_scaling, cfg.rope_original_max_len) == (16, "llama3", 8)
        assert cfg.head_dim * cfg.n_heads != cfg.d_model
    _assert_same_function(cfg, hf.load_params(path, cfg), torch_model)


@pytest.mark.parametrize("name", ["gpt2", "llama3-rope-head_dim"])
def test_greedy_sampling_matches_generate(hf_dirs, name):
    torch_model, path = hf_dirs[name]
    cfg, _ = hf.read_config(path)
    params = hf.load_params(path, cfg)
    new = 8
    with torch.no_grad():
        theirs = torch_model.generate(
            input_ids=torch.tensor(TOKENS),
            attention_mask=torch.tensor(MASK),
            do_sample=False,
            max_new_tokens=new,
            pad_token_id=EOS,
        )[:, TOKENS.shape[1] :].numpy()
    theirs = np.pad(theirs, ((0, 0), (0, new - theirs.shape[1])), constant_values=EOS)
    # The sampler takes right-padded prompts with their lengths.
    lengths = MASK.sum(1)
    prompts = np.full_like(TOKENS, EOS)
    for row, n in enumerate(lengths):
        prompts[row, :n] = TOKENS[row, -n:]
    greedy = SamplingConfig(max_new_tokens=new, temperature=0.0, eos_id=EOS, pad_id=EOS)
    ours = sample(LanguageModel(cfg), params, prompts, lengths, jax.random.key(0), greedy)
    np.testing.assert_array_equal(np.asarray(ours.tokens_BT), theirs)


def _tensors(path):
    ckpt = st.Checkpoint(path)
    return {n: ckpt.tensor(n)[st.full_index(ckpt.tensor(n).shape)] for n in ckpt.names()}


@pytest.mark.parametrize("name", ["gpt2", "llama3-rope-head_dim"])
def test_import_export_import_is_identity(hf_dirs, name, tmp_path):
    _, path = hf_dirs[name]
    cfg, _ = hf.read_config(path)
    params = hf.load_params(path, cfg)
    ids = {"bos_token_id": 1, "eos_token_id": EOS, "pad_token_id": EOS}
    hf.export(tmp_path / "out", params, cfg, ids, max_shard_bytes=10_000)  # several files
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "out" / st.INDEX_FILE).exists()
    again_cfg, _ = hf.read_config(tmp_path / "out")
    assert again_cfg == cfg
    again = hf.load_params(tmp_path / "out", again_cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    # the files hold the same tensors under the same names as save_pretrained's
    original, exported = _tensors(path), _tensors(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for n in original:
        np.testing.assert_array_equal(original[n], exported[n])


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny", dict(use_bias=False, vocab_size=VOCAB)),  # exported with zero biases
        (
            "tiny-llama",
            dict(
                vocab_size=VOCAB, d_head=8, scan_layers=True, rope_scaling="linear", rope_factor=2.0
            ),
        ),
    ],  # fmt: skip
)
def test_exported_model_loads_in_transformers(preset, overrides, tmp_path):
    cfg = get_preset(preset, **overrides)
    boxed = LanguageModel(cfg).init(jax.random.key(3), jnp.zeros((1, 1), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 2.0, state.strip_axis_names(boxed))
    ids = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    hf.export(tmp_path / "hf", params, cfg, ids, max_shard_bytes=20_000)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32
    ).eval()
    _assert_same_function(cfg, params, torch_model)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 3


def test_sharded_load_places_each_parameter_by_the_rule_table(hf_dirs, monkeypatch):
    _, path = hf_dirs["llama-gqa-untied"]
    cfg, _ = hf.read_config(path)
    mesh = mesh_of(dict(data=1, fsdp=4, tensor=2))
    init = lambda rng: LanguageModel(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]  # noqa: E731
    expected = state.param_shardings(init, mesh)
    reads = []
    original_getitem = st.Stored.__getitem__

    def recording_getitem(self, index):
        out = original_getitem(self, index)
        reads.append((self.name, out.size))
        return out

    monkeypatch.setattr(st.Stored, "__getitem__", recording_getitem)
    params = hf.load_params(path, cfg, expected)
    monkeypatch.undo()
    whole = hf.load_params(path, cfg)
    for (p, leaf), (_, want), (_, ref) in zip(
        *(jax.tree_util.tree_leaves_with_path(t) for t in (params, expected, whole))
    ):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), jax.tree_util.keystr(p)
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
    # up_proj [F, D] is split 2 ways (mlp over tensor) by 4 (embed over fsdp): each
    # device reads one eighth of it, never the whole tensor.
    up = [size for name, size in reads if name == "model.layers.0.mlp.up_proj.weight"]
    assert up == [48 * 32 // 8] * 8


def test_hf_tokenizer_matches_transformers_and_pads_with_eos(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    eos = write_bpe_tokenizer(src)
    (src / "config.json").write_text(json.dumps({"bos_token_id": eos, "eos_token_id": eos}))
    files = hf.tokenizer_files(src, tmp_path)  # GPT-2's hub layout: no tokenizer_config.json
    assert [f.name for f in files] == ["tokenizer.json", "tokenizer_config.json"]
    dest = tmp_path / "tok"
    dest.mkdir()
    for f in files:
        (dest / f.name).write_bytes(f.read_bytes())
    ours = load_tokenizer(dest)
    assert isinstance(ours, HFTokenizer) and ours.pad_id == ours.eos_id == ours.bos_id == eos
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    sample_text = "def fox(a):\n  return a + 'é'"
    ids = ours.encode(sample_text)
    assert ids == reference(sample_text, add_special_tokens=False)["input_ids"]
    assert ours.decode([eos, *ids, eos]) == sample_text
    assert ours.encode_batch([sample_text, "b"]) == [ids, ours.encode("b")]


def _edit_config(path, tmp_path, **changes):
    out = tmp_path / "edited"
    out.mkdir()
    for f in path.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    return out


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="mistral"), "model_type='mistral' is not supported"),
        (dict(architectures=["LlamaForSequenceClassification"]), "architectures="),
        (dict(rope_parameters=dict(rope_type="yarn", factor=2.0)), "rope_type='yarn'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(intermediate_size=40), "mlp.gate_proj.weight has shape (48, 32)"),
        (
            dict(num_key_value_heads=4),
            "k_proj.weight has shape (16, 32), but the config implies (32, 32)",
        ),
    ],
)
def test_bad_input_is_one_clear_error(hf_dirs, tmp_path, changes, message):
    _, path = hf_dirs["llama-gqa-untied"]
    edited = _edit_config(path, tmp_path, **changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg, family = hf.read_config(edited)
        hf.load_params(edited, cfg, None, family)


def test_missing_files_and_existing_destination_write_nothing(hf_dirs, tmp_path):
    _, path = hf_dirs["gpt2"]
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.read_config(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        hf.load_params(tmp_path, hf.read_config(tmp_path)[0])
    cfg, _ = hf.read_config(path)
    params = hf.load_params(path, cfg)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        hf.export(tmp_path / "taken", params, cfg, {})
    assert list((tmp_path / "taken").iterdir()) == []
    with pytest.raises(ValueError, match="cannot export as Llama: ModelConfig.norm"):
        hf.export(tmp_path / "new", params, cfg.replace(positional="rope"), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "taken"]


def test_cli_reports_bad_input_in_one_line(hf_dirs, tmp_path):
    _, path = hf_dirs["gpt2"]
    edited = _edit_config(path, tmp_path, activation_function="relu")
    run = subprocess.run(
        [sys.executable, "-m", "experiments.convert", "import", f"--src={edited}",
         f"--workdir={tmp_path / 'w'}"],
        capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: GPT-2 activation_function='relu' is not supported; "
        "supported: gelu_new, gelu_pytorch_tanh (the tanh GELU)"
    ]
    assert not (tmp_path / "w").exists()


def _gpt2_with_tokenizer(hf_dirs, tmp_path) -> tuple[Path, int]:
    """(folder, eos id): the tiny GPT-2 with a BPE tokenizer whose eos its config names."""
    src = _edit_config(hf_dirs["gpt2"][1], tmp_path)
    eos = write_bpe_tokenizer(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(
        json.dumps({**config, "bos_token_id": eos, "eos_token_id": eos})
    )
    return src, eos


def test_convert_commands_write_a_checkpoint_and_export_it(hf_dirs, tmp_path):
    """An import is an ordinary checkpoint of this project (params only, the model config,
    the tokenizer with its identity): load_model reads it, and export gives back the files."""
    from experiments import convert
    from train.saved_model import load_model, read_latest_meta

    src, eos = _gpt2_with_tokenizer(hf_dirs, tmp_path)
    convert.import_checkpoint(src, tmp_path / "work")
    loaded = load_model(tmp_path / "work")
    assert loaded.cfg == hf.read_config(src)[0] and loaded.step == 0
    meta = read_latest_meta(tmp_path / "work")
    assert meta["imported_from"]["model_type"] == "gpt2" and meta["tokenizer"]["sha256"]
    assert loaded.tokenizer.eos_id == eos
    with pytest.raises(FileExistsError, match="already exists"):
        convert.import_checkpoint(src, tmp_path / "work")

    convert.export_checkpoint(tmp_path / "work", tmp_path / "out", max_shard_bytes=10_000)
    out = tmp_path / "out"
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {
        p.name for p in out.iterdir()
    }
    exported, original = _tensors(out), _tensors(src)
    assert sorted(exported) == sorted(original)
    for n in original:
        np.testing.assert_array_equal(exported[n], original[n])
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (eos, eos)  # GPT-2 pads with eos
    with pytest.raises(FileExistsError, match="already exists"):
        convert.export_checkpoint(tmp_path / "work", out)
    # the command: one line on stdout, and orbax's dozens of log lines only with --verbose
    command = [
        sys.executable,
        "-m",
        "experiments.convert",
        "export",
        f"--workdir={tmp_path / 'work'}",
    ]
    run = subprocess.run(
        [*command, f"--dst={tmp_path / 'out2'}"],
        capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("exported") and run.stderr == ""


def test_a_config_json_that_is_not_an_object_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('["gpt2"]')
    with pytest.raises(ValueError, match="config.json holds a JSON list, not an object"):
        hf.read_config(tmp_path)


def test_export_mistakes_are_one_line_with_status_2(hf_dirs, tmp_path):
    """A checkpoint's edited tokenizer copy (a CheckpointError) and a shard size below one
    byte end as every entry point's user errors do, writing nothing."""
    from experiments import convert

    src, eos = _gpt2_with_tokenizer(hf_dirs, tmp_path)
    convert.import_checkpoint(src, tmp_path / "work")
    dst = tmp_path / "out"
    command = [
        sys.executable, "-m", "experiments.convert", "export",
        f"--workdir={tmp_path / 'work'}", f"--dst={dst}",
    ]  # fmt: skip

    def one_line_error(*args: str) -> str:
        run = subprocess.run(
            [*command, *args], capture_output=True, text=True,
            env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert run.returncode == 2, run.stderr[-2000:]
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-2000:]
        assert not dst.exists()
        return lines[0]

    assert "--max_shard_bytes must be at least 1" in one_line_error("--max_shard_bytes=0")
    with open(tmp_path / "work" / "tokenizer" / "tokenizer.json", "a") as f:
        f.write(" ")
    assert "is not the one the checkpoint was trained with" in one_line_error()
