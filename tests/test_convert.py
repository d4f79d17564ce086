"""Import/export against independent references.

Tiny random Llama / Qwen2 / Qwen3 models saved by transformers -> load_model -> logits
equal transformers' (float32); import -> export returns every tensor bit for bit and a
config that transformers loads to the same logits; sharded checkpoints; a GGUF written
with gguf.GGUFWriter the way llama.cpp's converter writes it; the bundled SmolLM2 GGUF
against transformers' own GGUF loader on real text; clear errors and no partial output.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from safetensors.torch import load_file as torch_load_file  # noqa: E402
from safetensors.torch import save_file as torch_save_file  # noqa: E402

from hylo_jax import load_model  # noqa: E402
from hylo_jax.convert import export_model  # noqa: E402
from hylo_jax.convert.gguf_io import permute_rope_rows, unpermute_rope_rows  # noqa: E402
from hylo_jax.convert.hub import default_teacher_path, resolve  # noqa: E402
from hylo_jax.convert.safetensors_io import CheckpointError, CheckpointReader, SafetensorsFile  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 101
STDLIB_TEXT = "/root/.pyenv/versions/3.11.7/lib/python3.11/textwrap.py"


def _tiny_hf(family: str, seed: int = 0, dtype=torch.float32):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common)
    elif family == "qwen3":
        # head_dim 16 != hidden/heads, as in real Qwen3 models.
        cfg = transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **common)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # make norms and biases non-trivial so a swapped tensor shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


def _ids(batch=2, length=13, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _ours(model, ids):
    return np.asarray(model(jnp.asarray(ids, jnp.int32)))


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (HF model, dir it was saved to with save_pretrained)."""
    out = {}
    for family in ("llama", "qwen2", "qwen3"):
        model = _tiny_hf(family)
        path = str(tmp_path_factory.mktemp(family))
        model.save_pretrained(path)
        out[family] = (model, path)
    return out


def _leftovers(parent):
    return [f for f in os.listdir(parent) if ".partial-" in f or ".old-" in f]


# ----------------------------------------------------------------- safetensors
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers(saved, family):
    hf, path = saved[family]
    ids = _ids()
    assert _rel(_ours(load_model(path, progress=False), ids), _torch_logits(hf, ids)) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_import_export_roundtrip_bit_exact(saved, family, tmp_path):
    hf, path = saved[family]
    out = export_model(load_model(path, progress=False), tmp_path / "out", tokenizer_from=path)
    original = torch_load_file(os.path.join(path, "model.safetensors"))
    exported = torch_load_file(os.path.join(out, "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == torch.float32
        assert np.array_equal(exported[name].numpy().view(np.uint32), tensor.numpy().view(np.uint32)), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = _ids()
    np.testing.assert_array_equal(_torch_logits(reloaded, ids), _torch_logits(hf, ids))
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == 2


def test_bf16_checkpoint_loads_in_float32_and_exports_identical_bf16(tmp_path):
    hf = _tiny_hf("llama", dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "src")
    model = load_model(str(tmp_path / "src"), progress=False)
    assert model.model.embed_tokens.embedding[...].dtype == jnp.float32
    out = export_model(model, tmp_path / "out")  # default dtype: the source's bfloat16
    original = torch_load_file(str(tmp_path / "src" / "model.safetensors"))
    exported = torch_load_file(os.path.join(out, "model.safetensors"))
    for name, tensor in original.items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name].view(torch.int16), tensor.view(torch.int16)), name


def test_sharded_checkpoints(saved, tmp_path):
    hf, _ = saved["llama"]
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "hf_sharded" / "model.safetensors.index.json")
    model = load_model(str(tmp_path / "hf_sharded"), progress=False)
    ids = _ids()
    assert _rel(_ours(model, ids), _torch_logits(hf, ids)) <= 1e-4
    # Our writer shards too, and transformers reads our index.
    out = export_model(model, tmp_path / "ours_sharded", max_shard_bytes=20_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_array_equal(_torch_logits(reloaded, ids), _torch_logits(hf, ids))


def test_reader_matches_safetensors_library(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }
    torch_save_file(tensors, str(tmp_path / "t.safetensors"))
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert sorted(f.keys()) == sorted(tensors)
    for name, t in tensors.items():
        ours = f.get(name)
        assert ours.shape == tuple(t.shape), name
        if t.dtype == torch.bfloat16:
            assert ours.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(ours.view(np.int16), t.view(torch.int16).numpy())
        else:
            np.testing.assert_array_equal(ours, t.numpy())


# ------------------------------------------------------------------------ GGUF
def test_rope_permutation_matches_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.RandomState(0).randn(3 * 8, 5).astype(np.float32)
    permuted = permute_rope_rows(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, 3), w)
    undone = LlamaTensorProcessor(config={})._reverse_permute_weights(permuted, 3, 3)
    np.testing.assert_array_equal(undone, w)


def _write_gguf(hf, path, arch="llama"):
    """A tiny F32 GGUF laid out as llama.cpp's convert_hf_to_gguf writes it: for the
    "llama" architecture it permutes the Q/K rows; Qwen (NeoX RoPE) it does not."""
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for name, tensor in hf.state_dict().items():
        a = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name == "lm_head.weight":
            if not c.tie_word_embeddings:
                w.add_tensor("output.weight", a)
        else:
            _, _, i, *rest = name.split(".")
            module = ".".join(rest[:-1])
            if arch == "llama" and module == "self_attn.q_proj":
                a = permute_rope_rows(a, c.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                a = permute_rope_rows(a, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{names[module]}.{rest[-1]}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_import_equals_hf_model(saved, family, tmp_path):
    hf, _ = saved[family]
    _write_gguf(hf, tmp_path / "tiny.gguf", arch=family)
    model = load_model(str(tmp_path / "tiny.gguf"), progress=False)
    assert model.config.num_key_value_heads == hf.config.num_key_value_heads
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = _ids()
    assert _rel(_ours(model, ids), _torch_logits(hf, ids)) <= 1e-4


def test_gguf_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="gpt2.gguf: unsupported GGUF architecture 'gpt2'"):
        load_model(str(tmp_path / "gpt2.gguf"))


# The core invariant on the real model: ~90 s on 2 CPU cores (two dequantized loads).
def test_smollm2_gguf_matches_transformers_on_real_text():
    from hylo_jax.inference import generate

    path = default_teacher_path()
    folder, name = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = np.asarray([tok(open(STDLIB_TEXT).read())["input_ids"][:128]])
    assert ids.shape == (1, 128)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours = load_model(path, progress=False)
    ref = _torch_logits(hf, ids)
    assert _rel(_ours(ours, ids), ref) <= 1e-4
    prompt = ids[:, :48]
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompt), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    got = generate(ours, prompt, 32).tokens
    np.testing.assert_array_equal(got, want.numpy()[:, prompt.shape[1] :])


# ---------------------------------------------------------------------- errors
def test_missing_path():
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        load_model("/no/such/model")


def test_hub_id_offline_uses_local_cache_or_fails_clearly(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="hub"):
        resolve("hylo-test/not-cached")
    # A repo in the local cache (the layout huggingface_hub writes) resolves offline.
    _, path = saved["llama"]
    repo = tmp_path / "cache" / "models--hylo-test--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = resolve("hylo-test/tiny-llama")
    assert source.kind == "hf" and os.path.samefile(source.path, repo / "snapshots" / commit)


def _copy(path, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_truncated_safetensors(saved, tmp_path):
    dst = _copy(saved["llama"][1], tmp_path)
    file = dst / "model.safetensors"
    os.truncate(file, os.path.getsize(file) - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated .*tensor '"):
        load_model(str(dst))


def test_corrupt_safetensors_header(saved, tmp_path):
    dst = _copy(saved["llama"][1], tmp_path)
    file = dst / "model.safetensors"
    with open(file, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n // 2)
        f.write(b"\xff\x00{{")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load_model(str(dst))
    with open(file, "r+b") as f:
        f.write(struct.pack("<Q", 2**40))
    with pytest.raises(CheckpointError, match="header length"):
        CheckpointReader(dst)


def test_unknown_architecture(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        load_model(str(tmp_path / "gpt2"))


def test_shape_mismatch_names_tensor_and_config(saved, tmp_path):
    dst = _copy(saved["llama"][1], tmp_path)
    cfg = json.load(open(dst / "config.json"))
    cfg["intermediate_size"] = 40
    json.dump(cfg, open(dst / "config.json", "w"))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape .*intermediate_size=40"):
        load_model(str(dst), progress=False)


def test_nan_weight_named(saved, tmp_path):
    dst = _copy(saved["llama"][1], tmp_path)
    tensors = torch_load_file(str(dst / "model.safetensors"))
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 4] = float("nan")
    torch_save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.v_proj\.weight' has 1 NaN/Inf"):
        load_model(str(dst), progress=False)


def test_unmapped_and_missing_tensors(saved, tmp_path):
    dst = _copy(saved["llama"][1], tmp_path)
    tensors = torch_load_file(str(dst / "model.safetensors"))
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    torch_save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no mapping row.*self_attn.extra.weight"):
        load_model(str(dst), progress=False)
    del tensors["model.layers.0.self_attn.extra.weight"], tensors["model.norm.weight"]
    torch_save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.norm.weight'\]"):
        load_model(str(dst), progress=False)


def test_failed_export_leaves_nothing(saved, tmp_path):
    _, path = saved["llama"]
    model = load_model(path, progress=False)
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(FileNotFoundError, match="not_a_model"):
        export_model(model, tmp_path / "out", tokenizer_from=tmp_path / "not_a_model")
    assert not os.path.exists(tmp_path / "out") and not _leftovers(tmp_path)
    out = export_model(model, tmp_path / "out")
    with pytest.raises(FileExistsError):
        export_model(model, out)


# ------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "hylo_jax.convert", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_cli_bad_config_key_and_conversion(saved, tmp_path):
    out = tmp_path / "out"
    bad = _cli("--config.outptu_dir=x", f"--config.output_dir={out}")
    assert bad.returncode != 0 and "outptu_dir" in bad.stderr and "output_dir" in bad.stderr
    assert not os.path.exists(out)
    hf, path = saved["qwen2"]
    # Empty student settings: export the teacher unchanged.
    ok = _cli(f"--config.source={path}", f"--config.output_dir={out}", "--config.student.mla_layers=")
    assert ok.returncode == 0, ok.stderr
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = _ids()
    np.testing.assert_array_equal(_torch_logits(reloaded, ids), _torch_logits(hf, ids))
    assert not _leftovers(tmp_path) and not glob.glob(str(tmp_path / "*partial*"))
