"""Calibration with ModelOpt, the corrected unified HF export, and nemo3 loading it back.

The oracle for "nemo3 runs the exported checkpoint as ModelOpt's fake-quantized model does" is the
calibrated transformers model itself, evaluated in fp32 with ModelOpt's own activation and K/V
quantizers as calibrated, and with each quantized weight set to what the export wrote (dequantized,
its weight quantizer off). Two deviations from running ModelOpt's model untouched, both forced:

* ModelOpt's NVFP4 fake quantization asserts CUDA on CPU; its NVFP4 activation quantizers run
  through a registered ModelOpt backend that computes `quant.nvfp4.fake_quantize`, which is
  bit-identical to ModelOpt's CUDA kernel (tests/test_nvfp4.py).
* ModelOpt's own weight fake-quant is not its export: for BF16 weights the export divides by the
  scale in BF16 before the E4M3 cast (a double rounding), the fake quantizer in fp32, so some FP8
  weights differ by one E4M3 step (`test_modelopt_weight_fake_quant_vs_its_export` bounds it). On
  these small random models such one-step differences flip MoE routing and move the logits by
  about as much as the quantization itself, which would make any logits tolerance meaningless, so
  the oracle takes the exported weights; deployment runs the exported weights too.

Layer by layer, each quantized layer given the input ModelOpt's module saw computes the same output
(to fp32 rounding; ModelOpt's FP8 activation quantizer multiplies by 448/amax where the exported
scale divides, which moves a rare value by one E4M3 step). End to end the logits agree to 1e-5 of
their scale at most positions, but not all: transformers' and nemo3's networks order their fp32
arithmetic differently, an activation within that rounding of an FP8/NVFP4 rounding boundary then
rounds the other way in one of them, and the Mamba state carries the difference along the sequence.
So end to end the test bounds the KL divergence between the two (at most 5% of what quantization
itself costs; measured: 0 to 2.3%) and the top-1 agreement (at least 95%; measured: 98 to 100%).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from quant_fixtures import BUILTIN_DIR, random_windows, write_tiny_checkpoint

import nemo3
from nemo3.engines.network.quant_linear import QuantLinear
from nemo3.export.checkpoint import CheckpointError, QUANT_CONFIG_FILE, open_checkpoint, read_header
from nemo3.export.names import EMBEDDING, expected_tensors, fp32_tensors
from nemo3.quant import fp8, nvfp4
from nemo3.quant.calibrate import calibrate, load_transformers_model, single_chunk_scan
from nemo3.quant.data import DataError, calibration_windows, read_texts
from nemo3.quant.export import clean_module_name, export_quantized, export_unquantized
from nemo3.quant.layout import linear_layouts
from nemo3.quant.modelopt_cpu import cpu_static_nvfp4
from nemo3.quant.recipes import BF16, FP8, NVFP4, NVFP4_W4A16, layer_of, load_recipe

pytest.importorskip("modelopt.torch.quantization")

BACKEND = "nemo3-nvfp4"
RECIPE_NAMES = ["nvfp4", "fp8", "nvfp4-all"]
# NVIDIA's recipes with MSE calibration (Super: FP8 scale sweep; Lightning: W4A16 with four-over-six), tiny only
MSE_RECIPE_NAMES = ["nvfp4-mse", "nvfp4-w4a16"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def source_folder(which: str, tiny_folder):
    if which == "builtin":
        if not (BUILTIN_DIR / "model.safetensors").exists():
            pytest.skip(f"{BUILTIN_DIR}/model.safetensors is absent (the built-in model is not trained yet)")
        return BUILTIN_DIR
    return tiny_folder


# ---- the oracle ---------------------------------------------------------------------------------------
def hf_module_of(layer: str) -> tuple[str, str | None, int | None]:
    """Canonical layer -> (transformers module name, fused expert parameter, expert index)."""
    name = layer if layer == "lm_head" else "model." + layer.removeprefix("backbone.")
    expert = re.fullmatch(r"(.*\.experts)\.(\d+)\.(up_proj|down_proj)", name)
    return (expert[1], expert[3], int(expert[2])) if expert else (name, None, None)


def exported_weight(ckpt, layout) -> torch.Tensor:
    get = lambda suffix: ckpt.get(f"{layout.layer}.{suffix}")  # noqa: E731
    if layout.weight_format == NVFP4:
        return nvfp4.dequantize(get("weight"), get("weight_scale"), get("weight_scale_2"))
    return fp8.dequantize(get("weight"), get("weight_scale"))


def e2m1_value(codes: torch.Tensor) -> torch.Tensor:
    values = nvfp4.E2M1_VALUES[(codes & 7).long()]
    return torch.where(codes >= 8, -values, values)


def e4m3_step_distance(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """How many E4M3 codes apart two dequantized FP8 tensors are (same sign assumed where both are nonzero)."""
    codes = [(t / scale).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16) for t in (a, b)]
    magnitude = [(c & 0x7F) * torch.where((c & 0x80) > 0, -1, 1) for c in codes]
    return (magnitude[0] - magnitude[1]).abs()


def check_static_nvfp4(ckpt, layer: str, weight: torch.Tensor, quantizer, ours: torch.Tensor) -> None:
    """An MSE-calibrated (static block scales, four-over-six included) NVFP4 weight: nemo3's packing with the
    exported scales is the exported tensor bit for bit, and ModelOpt's own fake quantization (on CPU through
    quant/modelopt_cpu.py) rounds to the same E2M1 values except at exact ties between two of them, where its
    scale, multiplied out in another order, is one fp32 ulp off and breaks the tie the other way."""
    packed, block_scale, global_scale = (ckpt.get(f"{layer}.{s}") for s in ("weight", "weight_scale", "weight_scale_2"))
    assert torch.equal(nvfp4.quantize(weight.to(torch.bfloat16), global_scale, block_scale).packed, packed), layer
    with cpu_static_nvfp4():
        theirs = quantizer(weight.clone()).detach()
    step = (block_scale.float() * global_scale).unsqueeze(-1)
    blocks = lambda t: t.reshape(*block_scale.shape, 16)  # noqa: E731
    differ = e2m1_value(nvfp4.e2m1_codes(blocks(theirs) / step)) != e2m1_value(blocks(nvfp4.unpack(packed)))
    ties = torch.isin((blocks(weight) / step).abs(), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]))
    assert not (differ & ~ties).any(), layer
    same = ~differ.reshape(theirs.shape)
    assert ((theirs - ours).abs() <= 2**-22 * theirs.abs())[same].all(), layer


def make_oracle(calibrated, out) -> tuple[torch.nn.Module, list[float]]:
    """(the oracle of the module docstring, per FP8 layer the fraction of weights where ModelOpt's weight
    fake-quant and its export differ, all by at most one E4M3 step)."""
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import register_quant_backend

    register_quant_backend(BACKEND, lambda x, q: nvfp4.fake_quantize(x, nvfp4.global_scale_from_amax(q.amax)))
    oracle = copy.deepcopy(calibrated).float()
    ckpt = open_checkpoint(out)
    fp8_mismatch = []
    with torch.no_grad():
        for layout in linear_layouts(ckpt).values():
            if layout.weight_format == BF16:
                continue
            module_name, fused, e = hf_module_of(layout.layer)
            module = oracle.get_submodule(module_name)
            weight = getattr(module, fused)[e] if fused else module.weight
            quantizer = getattr(module, f"{fused}_weight_quantizers")[e] if fused else module.weight_quantizer
            assert quantizer.is_enabled, f"{layout.layer}: exported quantized, but ModelOpt did not quantize it"
            ours = exported_weight(ckpt, layout)
            if layout.weight_format == NVFP4 and quantizer.block_sizes["type"] == "static":
                check_static_nvfp4(ckpt, layout.layer, weight, quantizer, ours)
            if layout.weight_format == FP8:
                theirs = quantizer(weight.clone())
                scale = ckpt.get(f"{layout.layer}.weight_scale")
                distance = e4m3_step_distance(theirs, ours, scale)
                assert distance.max() <= 1, layout.layer
                fp8_mismatch.append((distance > 0).float().mean().item())
            weight.copy_(ours)
            quantizer.disable()
        for name, q in oracle.named_modules():
            if isinstance(q, TensorQuantizer) and q.is_enabled and q.num_bits == (2, 1):
                assert name.endswith("input_quantizer"), name
                q.backend = BACKEND
    return oracle, fp8_mismatch


@pytest.fixture(scope="module", params=[(m, r) for m in ("tiny", "builtin") for r in RECIPE_NAMES]
                + [("tiny", r) for r in MSE_RECIPE_NAMES], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tiny_folder, tmp_path_factory):
    """Calibrate, keep a copy of the calibrated model for the oracle, export: what the tests look at."""
    which, name = request.param
    folder = source_folder(which, tiny_folder)
    source = open_checkpoint(folder)
    recipe = load_recipe(name)
    out = tmp_path_factory.mktemp(f"{which}-{name}") / "checkpoint"
    model = calibrate(folder, recipe, random_windows(source.spec.vocab_size), progress=False)
    kept = copy.deepcopy(model)
    summary = export_quantized(model, source, out, {"recipe": name})
    return {"which": which, "recipe": recipe, "source": source, "out": out, "calibrated": kept, "summary": summary}


# ---- the checkpoint's files ------------------------------------------------------------------------------
def stored_tensors(folder) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Raw stored name -> (safetensors dtype, shape), through the index (no name mapping)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        for key, t in read_header(folder / file).items():
            assert index[key] == file
            out[key] = (t.dtype, t.stored_shape)
    assert set(out) == set(index)
    return out


def test_tensor_names_dtypes_and_shapes_follow_the_recipe(exported):
    recipe, spec, out = exported["recipe"], exported["source"].spec, exported["out"]
    stored = stored_tensors(out)
    want = {}
    for name, shape in expected_tensors(spec).items():
        fmt = recipe.format_of(name)
        if name.startswith("mtp.") or fmt == BF16:
            want[name] = ("F32" if fp32_tensors(name) else "BF16", shape)
            continue
        layer, (rows, cols) = name.removesuffix(".weight"), shape
        if fmt in (NVFP4, NVFP4_W4A16):
            want[name] = ("U8", (rows, cols // 2))
            want[f"{layer}.weight_scale"] = ("F8_E4M3", (rows, cols // 16))
            want[f"{layer}.weight_scale_2"] = ("F32", ())
        else:
            want[name] = ("F8_E4M3", shape)
            want[f"{layer}.weight_scale"] = ("F32", ())
        if fmt != NVFP4_W4A16:
            want[f"{layer}.input_scale"] = ("F32", ())
    if recipe.kv_cache == "fp8":
        for i in spec.layers_of("*"):
            want[f"backbone.layers.{i}.mixer.k_proj.k_scale"] = ("F32", ())
            want[f"backbone.layers.{i}.mixer.v_proj.v_scale"] = ("F32", ())
    assert EMBEDDING in stored and "backbone.embedding.weight" not in stored
    assert stored == want
    assert any(n.startswith("backbone.layers.") and ".experts." in n and v[0] == "U8" for n, v in stored.items()) \
        == (recipe.name != "fp8")


def test_every_file_has_the_same_mode(exported):
    """ModelOpt 0.47 writes its shards 0600; every file of the checkpoint gets the mode the others have."""
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in exported["out"].iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_mtp_tensors_are_carried_in_bf16(exported):
    source, ckpt = exported["source"], open_checkpoint(exported["out"])
    mtp = [n for n in source.names() if n.startswith("mtp.")]
    assert mtp and exported["summary"]["mtp_tensors"] == len(mtp)
    for name in mtp:
        want = source.get(name, dtype=torch.float32 if fp32_tensors(name) else torch.bfloat16)
        assert torch.equal(ckpt.get(name), want), name


def test_quant_config_names_are_clean_and_configs_hub_style(exported):
    recipe, spec, out = exported["recipe"], exported["source"].spec, exported["out"]
    for file in (QUANT_CONFIG_FILE, "config.json"):
        text = (out / file).read_text()
        assert "\\u0000" not in text and "sentinel" not in text, file
    quant = json.loads((out / QUANT_CONFIG_FILE).read_text())["quantization"]
    config = json.loads((out / "config.json").read_text())
    modules = {n.rpartition(".")[0] for n in stored_tensors(out)}
    excluded = quant.get("exclude_modules", [])
    assert "mtp*" in excluded
    for pattern in excluded:  # every entry names a module of the checkpoint
        assert pattern == "mtp*" or pattern in modules or any(m.startswith(pattern + ".") for m in modules), pattern
    assert quant["kv_cache_quant_algo"] == "FP8"
    algo = {NVFP4: "NVFP4", NVFP4_W4A16: "W4A16_NVFP4", FP8: "FP8"}
    if recipe.modelopt is not None:
        assert quant["quant_algo"] == "MIXED_PRECISION"
        expected = {}
        for name, fmt in recipe.assign(spec).items():
            layer = layer_of(name)
            if layer and fmt != BF16:  # every expert projection, as NVIDIA's checkpoints list them
                expected[layer] = algo[fmt]
        assert {k: v["quant_algo"] for k, v in quant["quantized_layers"].items()} == expected
    else:
        assert quant["quant_algo"] == algo[recipe.layers[-1].format]
        quantized = {n.rpartition(".")[0] for n in stored_tensors(out) if n.endswith(".weight_scale")}
        assert not any(m == p or m.startswith(p + ".") for m in quantized for p in excluded if p != "mtp*")
    assert "layers_block_type" not in config and "dtype" not in config
    assert config["hybrid_override_pattern"] == spec.pattern
    assert config["mtp_hybrid_override_pattern"] == spec.mtp_pattern
    assert config["num_nextn_predict_layers"] == 1 and config["torch_dtype"] == "bfloat16"
    qc = config["quantization_config"]
    assert qc["quant_method"] == "modelopt" and "mtp*" in qc["ignore"]
    assert [p for p in qc["ignore"] if p != "mtp*"] == [p for p in excluded if p != "mtp*"]
    assert exported["summary"]["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(out)  # another loader reads the config
    assert hf_config.num_hidden_layers == spec.num_layers and hf_config.model_type == "nemotron_h"


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per position, from logits [..., V]."""
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_logits_match_modelopts_fake_quantized_model(exported):
    """nemo3.load(OUT/checkpoint) vs the oracle of the module docstring, end to end, on sequences no longer
    than the calibration windows (the oracle's Mamba scan is one chunk of that length)."""
    out, folder = exported["out"], exported["source"].path
    oracle, fp8_mismatch = make_oracle(exported["calibrated"], out)
    model = nemo3.load(out)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(quantized) == set(linear_layouts(open_checkpoint(out)))
    ids = random_windows(model.spec.vocab_size, count=3, length=32, seed=7)
    with torch.no_grad():
        want = oracle(ids, use_cache=False).logits
        got = model.logits(ids)
        plain = nemo3.load(folder).logits(ids)
    per_position = (got - want).abs().amax(-1) / want.abs().max()  # [B, T]
    assert (per_position <= 1e-5).float().mean() >= 0.5
    assert kl(want, got).mean() <= 0.05 * kl(want, plain).mean()  # far below what quantization changes
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    assert all(f <= 0.08 for f in fp8_mismatch), fp8_mismatch


def test_each_quantized_layer_matches_modelopts_on_the_same_input(exported):
    """Teacher-forced, layer by layer: every quantized linear layer (each routed expert too) given the very
    input ModelOpt's module saw in the oracle's forward. Same input, same quantizer scale, same weight:
    the same output (FP8 activations: ModelOpt multiplies by 448/amax where the export's scale divides,
    which can move a rare value by one E4M3 step, so a few rows may differ by about one step)."""
    oracle, _ = make_oracle(exported["calibrated"], exported["out"])
    model = nemo3.load(exported["out"])
    layouts = linear_layouts(open_checkpoint(exported["out"]))
    inputs = {}

    def keep_input(name):
        def hook(module, args):
            inputs.setdefault(name, args[0].detach().clone())
        return hook

    for name in {hf_module_of(layer)[0] for layer in layouts}:
        oracle.get_submodule(name).register_forward_pre_hook(keep_input(name))
    ids = random_windows(model.spec.vocab_size, count=3, length=32, seed=7)
    worst = {}
    with torch.no_grad():
        oracle(ids, use_cache=False)
        for layer, layout in layouts.items():
            module_name, fused, e = hf_module_of(layer)
            theirs, ours = oracle.get_submodule(module_name), model.get_submodule(layer)
            x = inputs[module_name]
            if fused == "down_proj":  # the expert's own up projection and relu^2 first, on every token
                up = theirs.up_proj_input_quantizer(x) @ theirs.up_proj[e].T
                x = torch.relu(up).square()
            if fused:
                want = getattr(theirs, f"{fused}_input_quantizer")(x) @ getattr(theirs, fused)[e].T
            else:
                want = theirs(x)
            if layout.output_scale:  # the FP8 KV cache: ModelOpt's k/v_bmm_quantizer of the attention module
                attention = oracle.get_submodule(module_name.rpartition(".")[0])
                want = getattr(attention, f"{layout.output_scale[0]}_bmm_quantizer")(want)
            got = ours(x)
            rows = (got - want).abs().amax(-1) / want.abs().max().clamp(min=1e-30)
            worst[layer] = (rows.max().item(), (rows > 1e-6).float().mean().item())
    assert all(frac <= 0.02 and err <= 1e-3 for err, frac in worst.values()), \
        {k: v for k, v in worst.items() if v[1] > 0.02 or v[0] > 1e-3}


def test_modelopt_weight_fake_quant_vs_its_export(exported):
    """ModelOpt's FP8 weight fake-quant and its export differ by at most one E4M3 step (checked inside
    make_oracle), on at most 8% of the weights: its export rounds w / scale to BF16 first."""
    if exported["recipe"].name == "nvfp4-all":
        pytest.skip("no FP8 layers in nvfp4-all")
    _, fp8_mismatch = make_oracle(exported["calibrated"], exported["out"])
    assert fp8_mismatch and max(fp8_mismatch) <= 0.08 and sum(fp8_mismatch) > 0


def test_quantized_state_dict_names_match_the_checkpoint(exported):
    model = nemo3.load(exported["out"])
    ckpt = open_checkpoint(exported["out"])
    assert set(model.state_dict()) == set(ckpt.names())
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear) and m.layout.weight_format == NVFP4) \
        if exported["recipe"].name != "fp8" else None
    if layer is not None:
        assert layer.weight.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float8_e4m3fn
        assert layer.dequantized.shape == (layer.out_features, layer.in_features)


# ---- bf16 ------------------------------------------------------------------------------------------------
def test_unquantized_export_is_bf16_with_hub_names(tiny_folder, tmp_path):
    source = open_checkpoint(tiny_folder)
    out = tmp_path / "bf16"
    out.mkdir()
    summary = export_unquantized(source, out, max_shard_bytes=200_000)
    stored = stored_tensors(out)
    assert len(summary["files"]) > 1 and not (out / QUANT_CONFIG_FILE).exists()
    assert stored == {n: ("F32" if fp32_tensors(n) else "BF16", s) for n, s in expected_tensors(source.spec).items()}
    config = json.loads((out / "config.json").read_text())
    assert config["hybrid_override_pattern"] == source.spec.pattern and "quantization_config" not in config
    ids = random_windows(source.spec.vocab_size, count=2, length=24, seed=3)
    with torch.no_grad():
        ours = nemo3.load(out).logits(ids)
        hf = load_transformers_model(out, dtype=torch.float32)
        single_chunk_scan(hf, ids.shape[1], torch.device("cpu"))  # transformers 5.14's multi-chunk scan is wrong
        theirs = hf(ids, use_cache=False).logits
    assert rel_err(ours, theirs) <= 1e-4  # transformers loads it too, and computes the same


# ---- errors ----------------------------------------------------------------------------------------------
def test_clean_module_name():
    mangled = "backbone.layers.0.mixer.conv1d.\x00backbone.pt_name_sentinel"
    assert clean_module_name(mangled) == "backbone.layers.0.mixer.conv1d"
    assert clean_module_name("lm_head.\x00backbone.pt_name_sentinel*") == "lm_head*"
    assert clean_module_name("backbone.layers.1.mixer.experts") == "backbone.layers.1.mixer.experts"
    with pytest.raises(RuntimeError, match="NUL"):
        clean_module_name("x.\x00y")


def test_bad_packed_tensor_is_a_one_line_error(exported, tmp_path):
    if exported["which"] != "tiny" or exported["recipe"].name != "nvfp4":
        pytest.skip("one case is enough")
    from safetensors.torch import load_file, save_file
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported["out"], bad)
    name = "backbone.layers.1.mixer.experts.3.up_proj.weight_scale"
    file = bad / json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(file)
    tensors[name] = tensors[name][:, :0]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(name) + r".*expected float8_e4m3fn \[16, 1\]"):
        nemo3.load(bad)


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\nnot json\n', r"data\.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n{"txt": "x"}\n', r'data\.jsonl:2: expected an object with a string "text" field'),
    ("\n\n", r"data\.jsonl: no text to calibrate on"),
    (b"\xff\xfe", r"data\.jsonl: not UTF-8"),
])
def test_bad_calibration_file(tmp_path, content, match):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        read_texts(path)


def test_calibration_windows_from_text_and_jsonl(tiny_folder, tmp_path):
    spec = open_checkpoint(tiny_folder).spec
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 40)
    windows, source = calibration_windows(tiny_folder, spec, text, samples=100, seq_len=16)
    assert source == str(text) and 1 <= windows.shape[0] < 100 and windows.shape[1] == 16
    assert windows[0, 0] == spec.bos_token_id
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"print({i})"}) for i in range(50)))
    windows, _ = calibration_windows(tiny_folder, spec, jsonl, samples=4, seq_len=8)
    assert windows.shape == (4, 8) and (windows == spec.eos_token_id).sum() >= 2
    with pytest.raises(DataError, match="fewer than one window of 4096"):
        calibration_windows(tiny_folder, spec, jsonl, samples=1, seq_len=4096)
    windows, source = calibration_windows(tiny_folder, spec, None, samples=2, seq_len=64)
    assert windows.shape == (2, 64) and "train split" in source


# ---- hf_quant_config.json as NVIDIA publishes it ---------------------------------------------------------
PUBLISHED_SUPER = Path(__file__).with_name("data") / "super_nvfp4_hf_quant_config.json"


def layer_kind(module: str) -> str:
    """`backbone.layers.1.mixer.experts.511.up_proj` -> `backbone.layers.N.mixer.experts.E.up_proj`."""
    return re.sub(r"\.experts\.\d+\.", ".experts.E.", re.sub(r"^backbone\.layers\.\d+\.", "backbone.layers.N.", module))


def test_hf_quant_config_has_the_published_super_nvfp4_structure(exported):
    """tests/data/super_nvfp4_hf_quant_config.json is the structure of nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-NVFP4's
    hf_quant_config.json, written from its documented form (ModelOpt's Super recipe header, and the excerpts that
    TensorRT-LLM, vLLM and SGLang test their loaders with): MIXED_PRECISION, FP8 KV cache, and `quantized_layers`
    naming every routed expert's up_proj and down_proj (NVFP4, group 16), the shared experts and the Mamba
    in/out projections (FP8). A build with NVIDIA's Super layout writes the same structure, for every expert
    of every MoE layer."""
    if exported["recipe"].name not in ("nvfp4", "nvfp4-mse"):
        pytest.skip("the Super layout")
    published = json.loads(PUBLISHED_SUPER.read_text())
    ours = json.loads((exported["out"] / QUANT_CONFIG_FILE).read_text())
    assert set(ours) == set(published) | {"nemo3"} and ours["producer"]["name"] == published["producer"]["name"]
    for key in ("quant_algo", "kv_cache_quant_algo"):
        assert ours["quantization"][key] == published["quantization"][key]
    kinds = {layer_kind(m): v for m, v in published["quantization"]["quantized_layers"].items()}
    our_kinds = {}
    for module, value in ours["quantization"]["quantized_layers"].items():
        our_kinds.setdefault(layer_kind(module), []).append(value)
    assert set(our_kinds) == set(kinds)
    assert all(all(v == kinds[kind] for v in values) for kind, values in our_kinds.items())
    spec = exported["source"].spec
    expert_keys = {m for m in ours["quantization"]["quantized_layers"] if ".experts." in m}
    assert expert_keys == {f"backbone.layers.{i}.mixer.experts.{e}.{proj}" for i in spec.layers_of("E")
                           for e in range(spec.n_routed_experts) for proj in ("up_proj", "down_proj")}
    config = json.loads((exported["out"] / "config.json").read_text())["quantization_config"]
    assert {m for m in config["quantized_layers"] if ".experts." in m} == expert_keys
