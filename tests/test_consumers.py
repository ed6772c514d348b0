"""``--target`` and ``python -m quantize check``: every target's folder passes its consumers' rules, combinations a
target cannot load are refused before any work (message naming the rule and the flag), and the checker gives the
right verdict on hand-made bad folders (gptq_v2 for lmdeploy, partial groups, split fused groups, quantized vision,
top-level-only config, a missing shard, a mislabelled checkpoint_format)."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_kernels.model.testing import write_checkpoint
from internvl_kernels.quant.checker import CheckError, check_folder, inspect_folder
from internvl_kernels.quant.consumers import CONSUMERS, RULES, markdown_table
from quantize import formats
from quantize.cli import main

FAST = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--eval-windows", "0", "--eval-images", "0",
        "--max-calib-images", "1", "--mm-samples", "0", "--no-progress", "--device", "cpu"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wide_v15(path: str) -> str:
    """The tiny V1.5 with an LLM 128 wide (MLP 256), so that group 128 (lmdeploy's only group) divides its widths."""
    from internvl_kernels.model import InternVLChatModel
    from internvl_kernels.model.testing import build_tokenizer, chat_config, randomize_

    tok = build_tokenizer()
    cfg = chat_config("v1.5", vocab_size=len(tok))
    cfg.llm_config.update(hidden_size=128, intermediate_size=256)
    model = InternVLChatModel(cfg)
    randomize_(model, 7)
    model.save_pretrained(path, max_shard_size=256 * 1024, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("consumers")
    return {"v1.5": write_checkpoint(str(d / "v15"), "v1.5", seed=3),
            "v1.2": write_checkpoint(str(d / "v12"), "v1.2", seed=4),
            "wide": _wide_v15(str(d / "wide"))}


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def verdict(rep, consumer):
    return rep["verdicts"][consumer]["verdict"]


def rules_fired(rep, consumer):
    return {r["rule"] for r in rep["verdicts"][consumer]["reasons"]}


_written = {}


def write(ckpts, tmp_path_factory, capsys, preset, *flags):
    key = (preset,) + flags
    if key not in _written:
        out = str(tmp_path_factory.mktemp("q") / "out")
        code, so, se = run_cli(["--model", ckpts[preset], "--out", out, *FAST, *flags], capsys)
        assert code == 0, se
        _written[key] = (out, so, se)
    return _written[key]


# ------------------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("preset,flags,required", [
    ("v1.5", (), ("vllm",)),                                               # default --target vllm
    ("v1.2", ("--target", "vllm", "--group-size", "32"), ("vllm",)),
    ("wide", ("--target", "lmdeploy"), ("lmdeploy-turbomind",)),
    ("wide", ("--target", "lmdeploy", "--method", "awq"), ("lmdeploy-turbomind", "lmdeploy-pytorch")),
    ("wide", ("--target", "transformers"), ("transformers",)),
    ("v1.5", ("--target", "vllm", "--asym"), ("vllm",)),
])
def test_each_target_writes_what_its_consumers_load(ckpts, tmp_path_factory, capsys, preset, flags, required):
    out, so, se = write(ckpts, tmp_path_factory, capsys, preset, *flags)
    target = flags[flags.index("--target") + 1] if "--target" in flags else "vllm"
    rep = check_folder(out, target)
    assert rep["target"]["ok"], rep["target"]["errors"]
    for c in required:
        assert verdict(rep, c) == "loads", (c, rep["verdicts"][c])
    assert verdict(rep, "internvl-kernels") == "loads"
    # the CLI put the same verdicts in quant_report.json and printed them
    with open(os.path.join(out, "quant_report.json")) as f:
        saved = json.load(f)
    assert saved["target"]["name"] == target and saved["target"]["ok"]
    assert {k: v["verdict"] for k, v in saved["consumers"].items()} == {k: v["verdict"]
                                                                        for k, v in rep["verdicts"].items()}
    assert f"target {target}: OK" in so
    lay = rep["layout"]
    if target == "lmdeploy":
        assert lay["quantized_parts"] == {"vision": False, "llm": True} and lay["group_size"] == 128
        assert lay["config_llm"] is True and not lay["desc_act"] and lay["bits"] == 4
        if lay["method"] == "gptq":
            assert lay["sym"] is True and lay["checkpoint_format"] == "gptq" and lay["stored_zero_layout"] == "v1"
    if target == "vllm":
        assert not lay["partial_groups"] and not lay["fused_mixed"]
        if "--asym" in flags:  # plain gptq kernel: fp16 only
            assert lay["sym"] is False and lay["torch_dtype"] == "float16"
            assert "--dtype float16" in se
        else:
            assert lay["sym"] is True
    if target == "transformers":
        assert lay["method"] == "awq" and "mlp1" in lay["modules_to_not_convert"]
        assert lay["unconverted_dense"] == []


def test_vllm_picks_a_group_that_divides_every_width(ckpts, tmp_path_factory, capsys):
    out, _, se = write(ckpts, tmp_path_factory, capsys, "v1.5")  # widths 64, 128, 160, 320: only 32 divides all
    lay = inspect_folder(out)
    assert lay.group_size == 32 and "--group-size 32" in se
    assert not lay.partial_groups


@pytest.mark.parametrize("preset,flags,needles", [
    ("v1.5", ("--target", "lmdeploy", "--act-order", "--method", "gptq"), ["without act-order", "drop --act-order"]),
    ("v1.5", ("--target", "lmdeploy", "--asym"), ["GPTQ symmetric", "--sym"]),
    ("v1.5", ("--target", "lmdeploy", "--bits", "8"), ["4-bit", "--bits 4"]),
    ("v1.5", ("--target", "lmdeploy", "--group-size", "64"), ["group size 128", "--group-size 128"]),
    ("v1.5", ("--target", "lmdeploy", "--parts", "vision,llm"), ["vision tower stays 16-bit", "--parts llm"]),
    ("v1.2", ("--target", "lmdeploy",), ["ps_version v1", "--target vllm"]),
    ("v1.5", ("--target", "lmdeploy", "--format", "gptq_v2"), ["adds 1", "--format gptq", "silently wrong"]),
    # gptq_v2 + sym loads silently wrong in TurboMind: refused under every target, --target any included
    ("v1.5", ("--target", "any", "--format", "gptq_v2", "--sym", "--parts", "llm", "--group-size", "128"),
     ["silently wrong", "--format gptq"]),
    ("v1.5", ("--target", "vllm", "--group-size", "48"), ["not aligned", "--group-size 32 divides every"]),
    ("v1.2", ("--target", "vllm", "--skip", "*.layers.0.mlp.gate_proj"), ["some but not all shards", "--skip"]),
    ("v1.5", ("--target", "vllm", "--asym", "--dtype", "bfloat16"), ["float16", "--dtype float16"]),
    ("v1.5", ("--target", "transformers", "--method", "gptq"), ["pure text model", "--method awq"]),
])
def test_target_refuses_before_any_work(ckpts, tmp_path, capsys, preset, flags, needles):
    out = tmp_path / "out"
    code, so, se = run_cli(["--model", ckpts[preset], "--out", str(out), *FAST, *flags], capsys)
    assert code == 2, (so, se)
    assert se.startswith("error: --target"), se
    for n in needles:
        assert n in se, (n, se)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert "calibration" not in so and "quantization report" not in so  # nothing ran


def test_target_any_writes_and_warns(ckpts, tmp_path_factory, capsys, monkeypatch):
    # a folder as another tool might write it: --skip of gate_proj NOT widened to its fused partner up_proj (the
    # quantizer keeps fused groups whole; here that step is switched off to get "some but not all shards")
    import quantize.runner as runner

    monkeypatch.setattr(runner, "_expand_skips", lambda lm, st, linears: tuple(st.skip))
    out, so, se = write(ckpts, tmp_path_factory, capsys, "v1.2", "--target", "any", "--group-size", "48",
                        "--skip", "*.layers.0.mlp.gate_proj", "--max-shard-size", "200KB")
    assert "warning (--target any): vLLM" in se and "lmdeploy TurboMind" in se
    rep = check_folder(out, "any")
    assert rep["target"]["ok"] and rep["target"]["warnings"]
    # partial last group → vLLM refuses; gate quantized, up not → "some but not all shards"
    assert verdict(rep, "vllm") == "refuses"
    assert {"vllm.group_aligned", "vllm.fused_whole"} <= rules_fired(rep, "vllm")
    assert any("mlp.gate_proj/up_proj" in g for g in rep["layout"]["fused_mixed"])
    assert rep["layout"]["sym"] is False  # --target any keeps the old default (asymmetric)
    assert check_folder(out, "vllm")["target"]["ok"] is False
    assert verdict(rep, "internvl-kernels") == "loads"


# ------------------------------------------------------------------------------------------------ hand-made folders
def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_cfg(folder, fn):
    p = os.path.join(folder, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(p, "w") as f:
        json.dump(cfg, f)
    q = os.path.join(folder, "quantize_config.json")
    if os.path.exists(q):
        os.remove(q)


def _rewrite_qzeros(folder, fn):
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            p = os.path.join(folder, name)
            sd = load_file(p)
            sd = {k: (fn(v) if k.endswith(".qzeros") else v) for k, v in sd.items()}
            save_file(sd, p)


def test_gptq_v2_folder_loads_wrong_in_turbomind(ckpts, tmp_path_factory, capsys, tmp_path):
    out, _, _ = write(ckpts, tmp_path_factory, capsys, "wide", "--target", "lmdeploy")
    assert verdict(check_folder(out), "lmdeploy-turbomind") == "loads"
    # the same codes stored as gptq_v2 (true zeros) and labelled so: TurboMind adds 1 anyway
    v2 = _copy(out, tmp_path / "v2")
    _rewrite_qzeros(v2, lambda z: formats.gptq_v1_to_v2(z, 4))
    _edit_cfg(v2, lambda c: [d.update(checkpoint_format="gptq_v2", format="gptq_v2")
                             for d in (c["quantization_config"], c["llm_config"]["quantization_config"])])
    rep = check_folder(v2, "lmdeploy")
    assert rep["layout"]["stored_zero_layout"] == "v2"
    assert verdict(rep, "lmdeploy-turbomind") == "loads-wrong"
    assert "tm.gptq_v2" in rules_fired(rep, "lmdeploy-turbomind")
    assert verdict(rep, "vllm") == "loads" and verdict(rep, "internvl-kernels") == "loads"
    assert not rep["target"]["ok"] and "silently wrong" in " ".join(rep["target"]["errors"])
    # v1 tensors mislabelled gptq_v2: our runtime (which honours checkpoint_format) would decode off by one
    bad = _copy(out, tmp_path / "mislabelled")
    _edit_cfg(bad, lambda c: c["quantization_config"].update(checkpoint_format="gptq_v2"))
    rep = check_folder(bad)
    assert rep["layout"]["stored_zero_layout"] == "v1"
    assert verdict(rep, "internvl-kernels") == "loads-wrong"


def test_quantized_vision_and_top_level_config_for_lmdeploy(ckpts, tmp_path_factory, capsys, tmp_path):
    out, _, _ = write(ckpts, tmp_path_factory, capsys, "v1.5")  # --target vllm: ViT quantized too
    rep = check_folder(out, "lmdeploy")
    assert rep["layout"]["quantized_parts"]["vision"] is True
    assert verdict(rep, "lmdeploy-turbomind") == "refuses" and "tm.vision" in rules_fired(rep, "lmdeploy-turbomind")
    assert not rep["target"]["ok"]
    # an AWQ folder with quantization_config only at the top level: lmdeploy's PyTorch engine refuses it
    awq, _, _ = write(ckpts, tmp_path_factory, capsys, "wide", "--target", "lmdeploy", "--method", "awq")
    assert verdict(check_folder(awq), "lmdeploy-pytorch") == "loads"
    top = _copy(awq, tmp_path / "top_only")
    _edit_cfg(top, lambda c: c["llm_config"].pop("quantization_config"))
    rep = check_folder(top)
    assert rep["layout"]["config_llm"] is False
    assert verdict(rep, "lmdeploy-pytorch") == "refuses" and "pt.config_location" in rules_fired(rep, "lmdeploy-pytorch")
    assert verdict(rep, "lmdeploy-turbomind") == "loads"


def test_awq_without_modules_to_not_convert_loads_wrong_in_transformers(ckpts, tmp_path_factory, capsys, tmp_path):
    out, _, _ = write(ckpts, tmp_path_factory, capsys, "wide", "--target", "transformers", "--parts", "llm")
    assert verdict(check_folder(out), "transformers") == "loads"
    bad = _copy(out, tmp_path / "no_mtnc")
    _edit_cfg(bad, lambda c: c["quantization_config"].pop("modules_to_not_convert"))
    rep = check_folder(bad, "transformers")
    assert verdict(rep, "transformers") == "loads-wrong"
    assert any(n.startswith("vision_model.") for n in rep["layout"]["unconverted_dense"])
    assert any(n.startswith("mlp1.") for n in rep["layout"]["unconverted_dense"])


def test_missing_shard_and_unreadable_folders(ckpts, tmp_path_factory, capsys, tmp_path):
    out, _, _ = write(ckpts, tmp_path_factory, capsys, "v1.2", "--target", "any", "--group-size", "48",
                      "--skip", "*.layers.0.mlp.gate_proj", "--max-shard-size", "200KB")
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) > 1
    bad = _copy(out, tmp_path / "missing")
    os.remove(os.path.join(bad, shards[-1]))
    rep = check_folder(bad)
    assert any("missing shard" in p for p in rep["layout"]["problems"])
    assert all(v["verdict"] == "refuses" for v in rep["verdicts"].values())
    with pytest.raises(CheckError, match="folder not found"):
        check_folder(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckError, match="no config.json"):
        check_folder(str(tmp_path / "empty"))
    # an unquantized checkpoint is named as such
    rep = check_folder(ckpts["v1.2"])
    assert any("not a quantized folder" in p for p in rep["layout"]["problems"])


def test_check_cli(ckpts, tmp_path_factory, capsys):
    out, _, _ = write(ckpts, tmp_path_factory, capsys, "v1.5")
    code, so, _ = run_cli(["check", out, "--target", "vllm"], capsys)
    assert code == 0 and "target vllm" in so and "OK" in so and "lmdeploy TurboMind" in so
    code, so, _ = run_cli(["check", out, "--target", "lmdeploy"], capsys)
    assert code == 1 and "NOT MET" in so and "--parts llm" in so
    code, so, _ = run_cli(["check", out, "--json"], capsys)
    assert code == 0 and json.loads(so)["verdicts"]["vllm"]["verdict"] == "loads"
    code, _, se = run_cli(["check", out + "-nope"], capsys)
    assert code == 2 and "folder not found" in se


# ------------------------------------------------------------------------------------------------ the rule table
def test_every_rule_cites_a_source_and_a_fix():
    ids = [r.id for r in RULES]
    assert len(ids) == len(set(ids))
    for r in RULES:
        assert r.consumer in CONSUMERS and r.verdict in ("refuses", "loads-wrong")
        assert r.source and r.fix and r.rule
    for c in CONSUMERS.values():
        assert re.search(r"\d|same version", c.source), f"{c.name}: no version in {c.source!r}"


def _readme_table(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- loads-where:begin[^>]*-->\n(.*?)\n<!-- loads-where:end -->", text, re.S)
    assert m, f"{path} has no generated 'which folder loads where' table"
    return m.group(1)


@pytest.mark.parametrize("readme", [os.path.join("quantize", "README.md")])
def test_readme_table_is_the_generated_one(readme):
    assert _readme_table(os.path.join(ROOT, readme)) == markdown_table(), \
        "regenerate with: python -m quantize check --table"


def test_named_target_warns_once_per_other_consumer():
    """--target vllm: a layout vLLM loads but lmdeploy / transformers refuse gives one warning line per other
    consumer (rule ids, where to read the reasons); --target any lists every reason."""
    from internvl_kernels.quant.consumers import Layout, target_problems

    lay = Layout(kind="internvl_chat", llm_arch="InternLM2ForCausalLM", ps_version="v2", method="gptq",
                 checkpoint_format="gptq", bits=4, group_size=128, sym=False, desc_act=True, torch_dtype="float16",
                 config_top=True, config_json=True, quantized=["vision_model.encoder.layers.0.attn.qkv",
                                                               "language_model.model.layers.0.attention.wqkv"],
                 quantized_parts={"vision": True, "llm": True})
    errors, compact = target_problems(lay, "vllm")
    assert not errors
    _, full = target_problems(lay, "any")
    assert compact and len(full) > len(compact)
    names = [w.split(" (not the target)")[0] for w in compact]
    assert len(names) == len(set(names)) and "vLLM" not in names
    assert all("python -m quantize check" in w and "refuses this layout (" in w for w in compact)
