"""The random-weight checkpoints load in transformers exactly as real ones would."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from warmserve.testing.checkpoints import _tensor_specs, build_checkpoint, ensure_checkpoint
from warmserve.testing.model_configs import FAMILIES, SHAPES, checkpoint_config
from warmserve.testing.tokenizer_files import build_tokenizer

OPT_POST_NORM = {"do_layer_norm_before": False}
# OPT-350m: post-norm, and embeddings narrower than the hidden size, with project_in/out.
OPT_350M_STYLE = {"do_layer_norm_before": False, "word_embed_proj_dim": 32}

# (family, shape, build options): every tiny preset, plus the variants an engine must handle.
TINY_VARIANTS = [
    *[(family, "tiny", {}) for family in FAMILIES],
    *[(family, "tiny-mha", {}) for family in FAMILIES if family != "opt"],
    ("llama", "tiny-llama3-rope", {}),
    ("opt", OPT_POST_NORM, {}),
    ("opt", OPT_350M_STYLE, {}),
]
LOAD_VARIANTS = [
    *TINY_VARIANTS,
    ("llama", "tiny", {"tie_word_embeddings": True}),
    ("opt", "tiny", {"tie_word_embeddings": False}),
    ("mistral", {"sliding_window": 16}, {}),
    ("qwen3", "tiny", {"dtype": "bfloat16", "sharded": True}),
]

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France? Answer:",
    "def fibonacci(n):\n    return",
    "你好，世界！Emoji: 🙂 and café.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
    "Once upon a time, in a land far away, there lived a small dragon who loved books and tea.",
]

# Parameter counts of the public models the real shapes copy.
PUBLIC_PARAMETER_COUNTS = {
    "opt-125m": 125_239_296,
    "qwen3-0.6b": 596_049_920,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "qwen3-8b": 8_190_735_360,
}


def variant_id(variant) -> str:
    family, shape, options = variant
    label = shape if isinstance(shape, str) else json.dumps(shape, separators=(",", ":"))
    return "-".join([family, label, *(f"{key}={value}" for key, value in options.items())])


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """Build each distinct checkpoint once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}

    def get(family, shape="tiny", **options):
        key = json.dumps([family, shape, options], sort_keys=True)
        if key not in paths:
            paths[key] = ensure_checkpoint(root / str(len(paths)), family, shape, **options)
        return paths[key]

    return get


@pytest.mark.parametrize("variant", LOAD_VARIANTS, ids=variant_id)
def test_loads_in_transformers_without_key_problems_and_generates(checkpoint, variant):
    family, shape, options = variant
    path = checkpoint(family, shape, **options)

    model, loading_info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert {key: value for key, value in loading_info.items() if value} == {}
    assert model.dtype == getattr(torch, options.get("dtype", "float32"))

    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    output = model.generate(prompt_ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert output.shape == (1, prompt_ids.shape[1] + 8)


@pytest.mark.parametrize("variant", LOAD_VARIANTS, ids=variant_id)
def test_config_is_what_transformers_writes(checkpoint, variant, tmp_path):
    family, shape, options = variant
    path = checkpoint(family, shape, **options)

    AutoConfig.from_pretrained(path).save_pretrained(tmp_path)
    written = json.loads((path / "config.json").read_text())
    rewritten = json.loads((tmp_path / "config.json").read_text())
    for config in (written, rewritten):
        del config["transformers_version"]
    assert written == rewritten
    assert written["architectures"] == [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[written["model_type"]]]


@pytest.mark.parametrize(
    ("shape", "family"),
    [(shape, family) for shape, presets in SHAPES.items() for family in presets],
)
def test_every_preset_has_the_state_dict_transformers_expects(shape, family):
    # Checked on the meta device: the real shapes are too big to build in a test.
    config = checkpoint_config(family, shape, "bfloat16", None, None)
    arguments = copy.deepcopy(config)
    transformers_config = AutoConfig.for_model(arguments.pop("model_type"), **arguments)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(transformers_config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        del expected["lm_head.weight"]

    specs = _tensor_specs(config, init_std=0.02)
    assert {spec.name: spec.shape for spec in specs} == expected
    if shape in PUBLIC_PARAMETER_COUNTS:
        assert sum(spec.numel for spec in specs) == PUBLIC_PARAMETER_COUNTS[shape]


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_holds_the_unsharded_weights(checkpoint, family):
    sharded = checkpoint(family, sharded=True)
    unsharded = checkpoint(family)

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(sharded.glob("model-*.safetensors"))
    assert len(shard_files) >= 2
    assert [file.name for file in shard_files] == [
        f"model-{number:05d}-of-{len(shard_files):05d}.safetensors"
        for number in range(1, len(shard_files) + 1)
    ]
    assert not (sharded / "model.safetensors").exists()

    tensors = {}
    for file in shard_files:
        shard = load_file(file)
        assert all(index["weight_map"][name] == file.name for name in shard)
        tensors.update(shard)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"] == {
        "total_parameters": sum(tensor.numel() for tensor in tensors.values()),
        "total_size": sum(tensor.numel() * tensor.element_size() for tensor in tensors.values()),
    }
    expected = load_file(unsharded / "model.safetensors")
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[name], expected[name]) for name in expected)

    model, loading_info = AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not loading_info["missing_keys"] and not loading_info["unexpected_keys"]
    reference = AutoModelForCausalLM.from_pretrained(unsharded)
    prompt_ids = AutoTokenizer.from_pretrained(sharded)(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(prompt_ids).logits, reference(prompt_ids).logits)


@pytest.mark.parametrize("variant", TINY_VARIANTS, ids=variant_id)
def test_float32_greedy_margins_dwarf_rounding(checkpoint, variant):
    """The default init_std keeps top-1/top-2 logit gaps far above float32 rounding (~1e-7 at
    these magnitudes), so an engine and transformers pick the same greedy tokens."""
    family, shape, options = variant
    path = checkpoint(family, shape, **options)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    gaps = []
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            top_two = model(prompt_ids).logits[0].topk(2, dim=-1).values
        gaps.append(top_two[:, 0] - top_two[:, 1])
    gaps = torch.cat(gaps)

    assert (gaps > 1e-3).float().mean() >= 0.97
    assert gaps.median() > 0.1


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path, 512)
    return path


def test_tokenizer_has_the_requested_vocabulary_and_fixed_special_ids(tokenizer_dir, tmp_path):
    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert raw.get_vocab_size() == 512
    assert [
        raw.token_to_id(token) for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    ] == [
        0,
        1,
        2,
    ]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == 512
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 2, 0)

    build_tokenizer(tmp_path, 300)
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size() == 300
    for impossible in (100, 100_000):
        with pytest.raises(ValueError, match="cannot train"):
            build_tokenizer(tmp_path, impossible)


@pytest.mark.parametrize(
    "text",
    [
        "Hello world, it's 2024!",
        "  leading spaces, trailing newline\n",
        "Café, naïve, Straße, ¿Dónde?",
        "你好，世界！東京 안녕하세요",
        "emoji 🙂🚀👍🏽 done",
    ],
)
def test_tokenizer_round_trips_text(tokenizer_dir, text):
    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = raw.encode(text).ids
    assert raw.decode(ids) == text
    assert tokenizer(text)["input_ids"] == ids
    assert tokenizer.decode(ids) == text


def test_multibyte_characters_are_split_across_tokens(tokenizer_dir):
    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for character in ("你", "🙂"):
        ids = raw.encode(character).ids
        assert len(ids) > 1
        # Each piece is an incomplete UTF-8 sequence on its own.
        assert all("\ufffd" in raw.decode([token_id]) for token_id in ids)


def test_chat_template_renders_chatml(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi, café?"},
    ]
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi, café?<|im_end|>\n"

    assert tokenizer.apply_chat_template(messages, tokenize=False) == chatml
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == chatml + "<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


def test_bfloat16_checkpoint_holds_the_float32_weights_rounded(checkpoint):
    bf16 = checkpoint("qwen2", dtype="bfloat16")
    fp32 = checkpoint("qwen2")

    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    written = load_file(bf16 / "model.safetensors")
    assert {tensor.dtype for tensor in written.values()} == {torch.bfloat16}
    reference = load_file(fp32 / "model.safetensors")
    assert written.keys() == reference.keys()
    assert all(torch.equal(written[name], reference[name].to(torch.bfloat16)) for name in written)


def test_builds_are_reproducible_and_seeded(tmp_path):
    first = build_checkpoint(tmp_path / "first", "llama", seed=7)
    again = build_checkpoint(tmp_path / "again", "llama", seed=7)
    other = build_checkpoint(tmp_path / "other", "llama", seed=8)

    for file in first.iterdir():
        assert (again / file.name).read_bytes() == file.read_bytes()
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_legacy_rope_keys_fold_into_rope_parameters(tmp_path):
    legacy = {
        "rope_theta": 500000,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    }
    from_legacy = build_checkpoint(tmp_path / "legacy", "llama", legacy)
    from_preset = build_checkpoint(tmp_path / "preset", "llama", "tiny-llama3-rope")
    assert (from_legacy / "config.json").read_text() == (from_preset / "config.json").read_text()


def test_existing_checkpoints_are_kept_unless_overwritten(tmp_path):
    path = build_checkpoint(tmp_path / "model", "opt")
    with pytest.raises(FileExistsError):
        build_checkpoint(path, "opt")

    weights = (path / "model.safetensors").read_bytes()
    build_checkpoint(path, "opt", seed=1, overwrite=True)
    assert (path / "model.safetensors").read_bytes() != weights

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_checkpoint(empty, "opt") / "config.json").is_file()
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["empty", "model"]


def test_ensure_checkpoint_builds_once_for_concurrent_callers(tmp_path):
    path = tmp_path / "shared"
    results = []
    callers = [
        threading.Thread(target=lambda: results.append(ensure_checkpoint(path, "qwen3")))
        for _ in range(4)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()

    assert results == [path] * 4
    assert [entry.name for entry in tmp_path.iterdir()] == ["shared"]
    config_mtime = (path / "config.json").stat().st_mtime_ns
    assert ensure_checkpoint(path, "qwen3") == path
    assert (path / "config.json").stat().st_mtime_ns == config_mtime


@pytest.mark.parametrize(
    ("family", "shape", "options", "message"),
    [
        ("gpt2", "tiny", {}, "unknown family"),
        ("llama", "huge", {}, "unknown shape"),
        ("llama", "qwen3-0.6b", {}, "defined for"),
        ("llama", {"hiden_size": 32}, {}, "no key"),
        ("opt", {"rope_theta": 1.0}, {}, "no key"),
        ("llama", "tiny", {"dtype": "int8"}, "unknown dtype"),
    ],
)
def test_bad_arguments_are_rejected_before_anything_is_written(
    tmp_path, family, shape, options, message
):
    with pytest.raises(ValueError, match=message):
        build_checkpoint(tmp_path / "model", family, shape, **options)
    assert list(tmp_path.iterdir()) == []
