"""Which quantized folder loads where: ONE table of the consumers' loading rules.

Every rule names the consumer, what the consumer's code does with a folder that breaks it (``refuses`` = raises at
load time; ``loads-wrong`` = loads without an error but computes with wrong weights), the rule in words, the source
file and version it was read from, and the ``python -m quantize`` flag that changes it. The rules are evaluated on a
:class:`Layout` (the facts of one folder: format, bits, group, sym, act-order, quantized modules, config locations),
which :mod:`internvl_kernels.quant.checker` reads from a folder on disk and ``quantize.targets`` predicts from the
command line before any work. Update a rule here and the checker, the CLI's ``--target`` refusals and the README's
"which folder loads where" table (:func:`markdown_table`) all follow.

Verdict of a consumer for a layout: ``refuses`` when any of its ``refuses`` rules fires; else ``loads-wrong`` when
any ``loads-wrong`` rule fires; else ``unknown`` when the layout is outside what was read/tested for it
(``Consumer.scope``); else ``loads``.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

__all__ = ["Layout", "Rule", "Consumer", "CONSUMERS", "RULES", "TARGETS", "evaluate", "verdicts", "target_problems",
           "MARLIN_GROUPS", "markdown_table", "fused_groups", "VERDICTS"]

VERDICTS = ("loads", "refuses", "loads-wrong", "unknown")
MARLIN_GROUPS = (-1, 32, 64, 128)  # vLLM marlin_utils: MARLIN_SUPPORTED_GROUP_SIZES


@dataclass
class Layout:
    """Facts of one quantized folder. ``None`` = not known (a rule needing it does not fire)."""
    kind: str | None = None                 # internvl_chat | llm | intern_vit
    llm_arch: str | None = None             # LlamaForCausalLM, InternLM2ForCausalLM, ...
    ps_version: str | None = None           # InternVL-Chat pixel-shuffle version (v1 = V1.1/V1.2, v2 = V1.5)
    method: str | None = None               # quant_method: gptq | awq | compressed-tensors | ...
    checkpoint_format: str | None = None    # GPTQ: gptq (v1) | gptq_v2
    awq_version: str | None = None          # AWQ: gemm | gemv | ...
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    desc_act: bool | None = None
    torch_dtype: str | None = None          # config.json torch_dtype / dtype
    config_top: bool | None = None          # quantization_config in config.json
    config_llm: bool | None = None          # quantization_config inside config.json's llm_config
    config_json: bool | None = None         # quantize_config.json beside config.json
    modules_to_not_convert: list | None = None
    quantized: list = field(default_factory=list)       # module names with a .qweight
    dense: list = field(default_factory=list)           # module names with a dense 2-D .weight
    quantized_parts: dict = field(default_factory=dict)  # {"vision": bool, "llm": bool}
    partial_groups: list | None = None      # quantized modules whose input width the group size does not divide
    fused_mixed: list | None = None         # fused groups (q/k/v, gate/up) with some members quantized, some not
    stored_zero_layout: str | None = None   # symmetric GPTQ: "v1" (zero-1 stored) or "v2" (true zero), from tensors
    unconverted_dense: list | None = None   # dense Linears a modules_to_not_convert-driven loader would convert
    tokenizer: bool | None = None           # tokenizer files in the folder
    made_by_gptqmodel: bool | None = None   # quantization_config.meta.quantizer names gptqmodel >= 0.9
    problems: list = field(default_factory=list)         # unreadable/missing files: every consumer refuses

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_gptq(self) -> bool:
        return self.method == "gptq"

    @property
    def is_awq(self) -> bool:
        return self.method == "awq"

    @property
    def v2(self) -> bool:
        return self.is_gptq and self.checkpoint_format == "gptq_v2"


@dataclass(frozen=True)
class Consumer:
    key: str
    name: str
    source: str                                   # the code (and version) the rules were read from
    scope: Callable[[Layout], str | None] = lambda lay: None  # why a layout is outside what is known (-> unknown)


@dataclass(frozen=True)
class Rule:
    consumer: str
    id: str
    verdict: str                                  # refuses | loads-wrong
    when: Callable[[Layout], str | None]          # detail when the rule fires, else None
    rule: str                                     # the consumer's rule, in words
    source: str                                   # file(s) it was read from
    fix: str                                      # the flag to change


# ----------------------------------------------------------------------------------------------- fused groups
_FUSED = (
    (re.compile(r"^(?P<p>.*\.)(?:self_attn\.)(?P<m>q_proj|k_proj|v_proj)$"), ("q_proj", "k_proj", "v_proj"),
     "self_attn."),
    (re.compile(r"^(?P<p>.*\.)(?:mlp\.)(?P<m>gate_proj|up_proj)$"), ("gate_proj", "up_proj"), "mlp."),
    (re.compile(r"^(?P<p>.*\.)(?:feed_forward\.)(?P<m>w1|w3)$"), ("w1", "w3"), "feed_forward."),
)


def fused_groups(names) -> dict:
    """``{group name: [member names]}`` of the fused groups vLLM loads as one layer (q/k/v, gate/up, InternLM2 w1/w3).

    InternLM2's ``attention.wqkv`` is one tensor already, and InternViT's ``attn.qkv`` too: nothing to check there.
    """
    out: dict = {}
    for n in names:
        for pat, members, mid in _FUSED:
            m = pat.match(n)
            if m:
                key = f"{m.group('p')}{mid}{'/'.join(members)}"
                out.setdefault(key, set()).add(n)
    return {k: sorted(v) for k, v in out.items()}


def mixed_fused(quantized, dense) -> list:
    """Fused groups in which some members are quantized and some are dense."""
    q, d = set(quantized), set(dense)
    bad = []
    for g, members in fused_groups(itertools.chain(q, d)).items():
        kinds = {m in q for m in members}
        if len(kinds) > 1:
            bad.append(f"{g} (quantized: {', '.join(m.rsplit('.', 1)[1] for m in members if m in q)}; "
                       f"16-bit: {', '.join(m.rsplit('.', 1)[1] for m in members if m in d)})")
    return sorted(bad)


# ----------------------------------------------------------------------------------------------- helpers for rules
def _marlin_ok(lay: Layout) -> bool:
    """vLLM picks GPTQ Marlin / AWQ Marlin (fp16 and bf16 activations) for these; else the plain kernel (fp16)."""
    if lay.is_gptq:
        return lay.sym is True and lay.bits in (4, 8) and lay.group_size in MARLIN_GROUPS
    if lay.is_awq:
        return lay.bits == 4 and lay.group_size in MARLIN_GROUPS
    return False


def _fires(cond: bool, detail: str) -> str | None:
    return detail if cond else None


def _list(xs, n=3) -> str:
    xs = list(xs or ())
    return ", ".join(xs[:n]) + (f" and {len(xs) - n} more" if len(xs) > n else "")


VLLM_SRC = ("vllm-project/vllm main @00161ce (late 2026): model_executor/models/internvl.py, intern_vit.py, "
            "layers/quantization/gptq.py, gptq_marlin.py, awq.py, awq_marlin.py, utils/gptq_utils.py, "
            "utils/marlin_utils.py")
TM_SRC = ("InternLM/lmdeploy main (late 2026): lmdeploy/turbomind/deploy/converter.py, "
          "turbomind/deploy/source_model/internvl.py, internlm2.py, llama.py, turbomind/deploy/policy.py")
PT_SRC = "InternLM/lmdeploy main (late 2026): lmdeploy/pytorch/models/internlm2.py, lite/apis/auto_awq.py"
TF_SRC = "huggingface/transformers 5.x (late 2026): quantizers/quantizer_gptq.py, quantizers/quantizer_awq.py"
GM_SRC = "GPTQModel 7.7.0 (run on CPU by tests/test_consumer_gptqmodel.py: GPTQ v1/v2 LLM folders)"
IK_SRC = "this package (same version): internvl_kernels/quant/loading.py"


def _scope_gptqmodel(lay: Layout) -> str | None:
    if lay.kind != "llm":
        return f"only plain LLM folders were tested with GPTQModel 7.7 (this is {lay.kind})"
    if not lay.is_gptq:
        return f"only GPTQ folders were tested with GPTQModel 7.7 (this is {lay.method})"
    return None


def _scope_tf(lay: Layout) -> str | None:
    if lay.is_gptq and lay.kind == "llm":
        return "GPTQ LLM folders go through optimum/GPTQModel inside transformers: not exercised here"
    return None


CONSUMERS = {
    "vllm": Consumer("vllm", "vLLM", VLLM_SRC),
    "lmdeploy-turbomind": Consumer("lmdeploy-turbomind", "lmdeploy TurboMind", TM_SRC),
    "lmdeploy-pytorch": Consumer("lmdeploy-pytorch", "lmdeploy PyTorch engine", PT_SRC),
    "transformers": Consumer("transformers", "transformers", TF_SRC, _scope_tf),
    "gptqmodel": Consumer("gptqmodel", "GPTQModel", GM_SRC, _scope_gptqmodel),
    "internvl-kernels": Consumer("internvl-kernels", "internvl_kernels.quant", IK_SRC),
}

_PROBLEMS = lambda lay: _fires(bool(lay.problems), "; ".join(lay.problems))  # noqa: E731
_KNOWN = ("gptq", "awq")

RULES: list[Rule] = []
for _c in CONSUMERS:
    RULES.append(Rule(_c, f"{_c}.files", "refuses", _PROBLEMS, "every file the index names must be present and "
                      "readable", "safetensors index", "rewrite the folder (python -m quantize --overwrite)"))

RULES += [
    # ------------------------------------------------------------------------------------------------ vLLM
    Rule("vllm", "vllm.method", "refuses",
         lambda L: _fires(L.method not in _KNOWN + ("compressed-tensors",), f"quant_method {L.method!r}"),
         "quant_method gptq, awq or compressed-tensors", VLLM_SRC, "--format gptq|awq"),
    Rule("vllm", "vllm.model", "refuses",
         lambda L: _fires(L.kind == "intern_vit", "a standalone InternViT is not a model vLLM serves"),
         "a generative model (InternVL-Chat or an LLM)", "vllm model registry", "quantize the chat model"),
    Rule("vllm", "vllm.awq_version", "refuses",
         lambda L: _fires(L.is_awq and L.awq_version not in (None, "gemm"), f"AWQ version {L.awq_version!r}"),
         "AWQ version gemm", VLLM_SRC, "--format awq (writes GEMM)"),
    Rule("vllm", "vllm.group_aligned", "refuses",
         lambda L: _fires(bool(L.partial_groups), "The input size is not aligned with the quantized weight shape: "
                          f"group {L.group_size} does not divide the input width of {_list(L.partial_groups)}"),
         "the group size divides every quantized Linear's input width", "gptq.py / gptq_marlin.py / awq.py "
         "create_weights", "--group-size (one that divides every width, e.g. 64 for 576-wide layers)"),
    Rule("vllm", "vllm.fused_whole", "refuses",
         lambda L: _fires(bool(L.fused_mixed), f"Detected some but not all shards of {_list(L.fused_mixed, 2)} "
                          "are quantized"),
         "fused groups (q/k/v, gate/up) all quantized or all 16-bit", "utils/gptq_utils.py "
         "get_linear_quant_method", "--skip (name every member of the group, e.g. '*.self_attn.*_proj')"),
    Rule("vllm", "vllm.plain_kernel_dtype", "refuses",
         lambda L: _fires((L.is_gptq or L.is_awq) and not _marlin_ok(L) and L.torch_dtype not in (None, "float16"),
                          f"not Marlin-compatible (sym={L.sym}, bits={L.bits}, group={L.group_size}): the plain "
                          f"{L.method} kernel takes float16 activations only, the folder says torch_dtype "
                          f"{L.torch_dtype}"),
         "Marlin needs GPTQ sym 4/8-bit (AWQ 4-bit) and group in {-1,32,64,128}; otherwise the plain kernel runs "
         "float16 only (GPTQConfig/AWQConfig.get_supported_act_dtypes)", VLLM_SRC,
         "--sym (Marlin), or --dtype float16"),
    # ------------------------------------------------------------------------------------------------ TurboMind
    Rule("lmdeploy-turbomind", "tm.method", "refuses",
         lambda L: _fires(L.method not in _KNOWN, f"quant_method {L.method!r}"),
         "GPTQ or AWQ", TM_SRC, "--format gptq|awq"),
    Rule("lmdeploy-turbomind", "tm.model", "refuses",
         lambda L: _fires(L.kind == "intern_vit", "a standalone InternViT is not a model TurboMind serves"),
         "a generative model", TM_SRC, "quantize the chat model"),
    Rule("lmdeploy-turbomind", "tm.ps_version", "refuses",
         lambda L: _fires(L.kind == "internvl_chat" and L.ps_version == "v1",
                          "ps_version v1 (InternVL-Chat V1.1/V1.2) is not supported"),
         "InternVL-Chat with ps_version v2 (V1.5)", TM_SRC, "none for this model: use --target vllm"),
    Rule("lmdeploy-turbomind", "tm.vision", "refuses",
         lambda L: _fires(bool(L.quantized_parts.get("vision")), "the vision tower is quantized (TurboMind builds "
                          "it 16-bit: KeyError on attn.qkv.weight)"),
         "the vision tower stays 16-bit", TM_SRC, "--parts llm"),
    Rule("lmdeploy-turbomind", "tm.bits", "refuses",
         lambda L: _fires(L.method in _KNOWN and L.bits not in (None, 4), f"bits {L.bits}"),
         "4-bit", TM_SRC, "--bits 4"),
    Rule("lmdeploy-turbomind", "tm.group", "refuses",
         lambda L: _fires(L.method in _KNOWN and L.group_size not in (None, 128), f"group_size {L.group_size}"),
         "group size 128", TM_SRC, "--group-size 128"),
    Rule("lmdeploy-turbomind", "tm.gptq_sym", "refuses",
         lambda L: _fires(L.is_gptq and L.sym is False, "GPTQ sym=false"),
         "GPTQ symmetric", TM_SRC, "--sym"),
    Rule("lmdeploy-turbomind", "tm.desc_act", "refuses",
         lambda L: _fires(L.is_gptq and bool(L.desc_act), "GPTQ desc_act=true"),
         "GPTQ without act-order", TM_SRC, "drop --act-order"),
    Rule("lmdeploy-turbomind", "tm.awq_version", "refuses",
         lambda L: _fires(L.is_awq and L.awq_version not in (None, "gemm"), f"AWQ version {L.awq_version!r}"),
         "AWQ version gemm", TM_SRC, "--format awq (writes GEMM)"),
    Rule("lmdeploy-turbomind", "tm.gptq_v2", "loads-wrong",
         lambda L: _fires(L.is_gptq and (L.v2 or L.stored_zero_layout == "v2"),
                          "zeros stored as true zeros (gptq_v2): TurboMind's GPTQ reader always adds 1 and ignores "
                          "checkpoint_format, so every weight is off by one step"),
         "GPTQ zeros stored v1 (zero-1)", TM_SRC, "--format gptq"),
    # ------------------------------------------------------------------------------------------------ lmdeploy pytorch
    Rule("lmdeploy-pytorch", "pt.method", "refuses",
         lambda L: _fires(L.method != "awq", f"quant_method {L.method!r} (the PyTorch engine reads AWQ only)"),
         "AWQ (no GPTQ)", PT_SRC, "--method awq --format awq"),
    Rule("lmdeploy-pytorch", "pt.model", "refuses",
         lambda L: _fires(L.kind == "intern_vit", "a standalone InternViT is not a model the engine serves"),
         "a generative model", PT_SRC, "quantize the chat model"),
    Rule("lmdeploy-pytorch", "pt.awq_version", "refuses",
         lambda L: _fires(L.is_awq and L.awq_version not in (None, "gemm"), f"AWQ version {L.awq_version!r}"),
         "AWQ version gemm", PT_SRC, "--format awq"),
    Rule("lmdeploy-pytorch", "pt.config_location", "refuses",
         lambda L: _fires(L.kind == "internvl_chat" and L.config_llm is False,
                          "quantization_config only at the top level: the engine reads llm_config's, builds "
                          "16-bit layers and fails on the first .qweight"),
         "InternVL-Chat: quantization_config inside llm_config (as lmdeploy's auto_awq writes it)", PT_SRC,
         "--target lmdeploy (writes llm_config.quantization_config)"),
    # ------------------------------------------------------------------------------------------------ transformers
    Rule("transformers", "tf.method", "refuses",
         lambda L: _fires(L.method not in _KNOWN + ("compressed-tensors",), f"quant_method {L.method!r}"),
         "a quantization method transformers knows", TF_SRC, "--format gptq|awq"),
    Rule("transformers", "tf.gptq_pure_text", "refuses",
         lambda L: _fires(L.is_gptq and L.kind in ("internvl_chat", "intern_vit"),
                          "We can only quantize pure text model. (main_input_name is pixel_values)"),
         "GPTQ only for models whose main_input_name is input_ids", TF_SRC, "--method awq --format awq"),
    Rule("transformers", "tf.awq_version", "refuses",
         lambda L: _fires(L.is_awq and L.awq_version not in (None, "gemm", "gemv", "exllama", "ipex"),
                          f"AWQ version {L.awq_version!r}"),
         "AWQ version gemm (also gemv/exllama/ipex)", TF_SRC, "--format awq"),
    Rule("transformers", "tf.awq_not_convert", "loads-wrong",
         lambda L: _fires(L.is_awq and bool(L.unconverted_dense),
                          "16-bit Linears not named in modules_to_not_convert would be replaced by empty AWQ layers "
                          f"(uninitialized weights): {_list(L.unconverted_dense)}"),
         "every 16-bit Linear (vision tower, mlp1, skipped layers) named in modules_to_not_convert", TF_SRC,
         "write with python -m quantize (it lists them), --target transformers"),
    # ------------------------------------------------------------------------------------------------ GPTQModel
    Rule("gptqmodel", "gm.tokenizer", "refuses",
         lambda L: _fires(L.tokenizer is False, "no tokenizer files in the folder"),
         "a tokenizer beside the weights", GM_SRC, "write from a folder that has one"),
    Rule("gptqmodel", "gm.asym_v1", "refuses",
         lambda L: _fires(L.is_gptq and L.sym is False and not L.v2 and not L.made_by_gptqmodel,
                          "Loading of a sym=False model with format=FORMAT.GPTQ is only supported if produced by "
                          "gptqmodel version >= 0.9.0"),
         "asymmetric GPTQ only as gptq_v2 (or v1 written by GPTQModel >= 0.9)", GM_SRC + "; models/loader.py",
         "--format gptq_v2 (or --sym)"),
    Rule("gptqmodel", "gm.zeros_label", "loads-wrong",
         lambda L: _fires(L.is_gptq and L.stored_zero_layout is not None and L.sym and
                          L.stored_zero_layout != ("v2" if L.v2 else "v1"),
                          f"checkpoint_format says {L.checkpoint_format} but the stored zeros are "
                          f"{L.stored_zero_layout}"),
         "checkpoint_format matches the stored zeros", GM_SRC, "--format gptq|gptq_v2"),
    # ------------------------------------------------------------------------------------------------ our runtime
    Rule("internvl-kernels", "ik.method", "refuses",
         lambda L: _fires(L.method not in _KNOWN, f"quant_method {L.method!r}"),
         "GPTQ v1/v2 or AWQ", IK_SRC, "--format gptq|gptq_v2|awq"),
    Rule("internvl-kernels", "ik.awq_version", "refuses",
         lambda L: _fires(L.is_awq and L.awq_version not in (None, "gemm"), f"AWQ version {L.awq_version!r}"),
         "AWQ version gemm", IK_SRC, "--format awq"),
    Rule("internvl-kernels", "ik.zeros_label", "loads-wrong",
         lambda L: _fires(L.is_gptq and L.stored_zero_layout is not None and L.sym and
                          L.stored_zero_layout != ("v2" if L.v2 else "v1"),
                          f"checkpoint_format says {L.checkpoint_format} but the stored zeros are "
                          f"{L.stored_zero_layout}"),
         "checkpoint_format matches the stored zeros", IK_SRC, "--format gptq|gptq_v2"),
]

# target -> (consumers that must load, consumers reported)
TARGETS = {
    "vllm": ("vllm",),
    "lmdeploy": ("lmdeploy-turbomind",),   # + the PyTorch engine for AWQ folders (see required_consumers)
    "transformers": ("transformers",),
    "any": (),
}


def required_consumers(target: str, lay: Layout) -> tuple:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {tuple(TARGETS)}")
    req = TARGETS[target]
    if target == "lmdeploy" and lay.is_awq:
        req = req + ("lmdeploy-pytorch",)
    return req


def evaluate(lay: Layout, consumer: str) -> dict:
    """``{"verdict", "reasons": [{rule, verdict, detail, rule_text, source, fix}], "consumer", "source"}``."""
    c = CONSUMERS[consumer]
    reasons = []
    for r in RULES:
        if r.consumer != consumer:
            continue
        detail = r.when(lay)
        if detail:
            reasons.append({"rule": r.id, "verdict": r.verdict, "detail": detail, "rule_text": r.rule,
                            "source": r.source, "fix": r.fix})
    kinds = {x["verdict"] for x in reasons}
    if "refuses" in kinds:
        verdict = "refuses"
    elif "loads-wrong" in kinds:
        verdict = "loads-wrong"
    else:
        why = c.scope(lay)
        verdict = "unknown" if why else "loads"
        if why:
            reasons.append({"rule": f"{consumer}.scope", "verdict": "unknown", "detail": why, "rule_text": "",
                            "source": c.source, "fix": ""})
    return {"consumer": c.name, "verdict": verdict, "reasons": reasons, "source": c.source}


def verdicts(lay: Layout) -> dict:
    return {k: evaluate(lay, k) for k in CONSUMERS}


def target_problems(lay: Layout, target: str) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for writing ``lay`` under ``target``.

    Errors: a required consumer does not load it, or ANY consumer would load it wrong (never written).
    Warnings: other consumers that refuse it. With ``--target any`` each reason is one warning; for a named target
    the consumers that were not asked for get one line each with the rule ids — the folder is for the target, the
    others are a note (``python -m quantize check`` gives every reason).
    """
    req = required_consumers(target, lay)
    compact = target != "any"
    errors, warnings = [], []
    for key, v in verdicts(lay).items():
        name = CONSUMERS[key].name
        others = []
        for r in v["reasons"]:
            if r["verdict"] == "unknown":
                continue
            msg = f"{name}: {r['detail']} — rule: {r['rule_text']} ({r['source'].split(':')[0]}); change: {r['fix']}"
            if r["verdict"] == "loads-wrong" and v["verdict"] == "loads-wrong":
                errors.append(msg + " [would load silently wrong]")
            elif key in req and r["verdict"] == "refuses":
                errors.append(msg)
            elif r["verdict"] == "refuses":
                others.append((r["rule"], msg))
        if compact and others:
            ids = ", ".join(sorted({rule for rule, _ in others}))
            warnings.append(f"{name} (not the target) refuses this layout ({ids}); "
                            f"`python -m quantize check <folder>` gives the reasons")
        else:
            warnings += [m for _, m in others]
    return errors, warnings


# ----------------------------------------------------------------------------------------------- README table
_TABLE_ROWS = [
    # (label, layout overrides)
    ("GPTQ v1", dict(method="gptq", checkpoint_format="gptq")),
    ("gptq_v2", dict(method="gptq", checkpoint_format="gptq_v2")),
    ("AWQ GEMM", dict(method="awq", awq_version="gemm")),
]


def _row_layouts():
    for (label, fmt), bits, sym, act, parts in itertools.product(
            _TABLE_ROWS, (4, 8), (True, False), (False, True), ("llm", "vision,llm")):
        if fmt["method"] == "awq" and (bits != 4 or act or sym):
            continue
        lay = Layout(kind="internvl_chat", llm_arch="InternLM2ForCausalLM", ps_version="v2", bits=bits,
                     group_size=128, sym=sym, desc_act=act if fmt["method"] == "gptq" else None,
                     torch_dtype=None, config_top=True, config_llm=True, config_json=True,
                     quantized_parts={"vision": "vision" in parts, "llm": True}, partial_groups=[], fused_mixed=[],
                     unconverted_dense=[], tokenizer=True, **fmt)
        yield label, bits, sym, act, parts, lay


def markdown_table() -> str:
    """The README's "which folder loads where" table, generated from :data:`RULES`.

    Rows: format × bits × sym × act-order × parts for an InternVL-Chat-V1.5 folder (ps v2, group 128,
    ``quantization_config`` at the top level and in ``llm_config``, no partial groups, fused groups whole).
    """
    cons = ["vllm", "lmdeploy-turbomind", "lmdeploy-pytorch", "transformers"]
    head = ("| format | bits | sym | act-order | parts | " + " | ".join(CONSUMERS[c].name for c in cons) + " |")
    lines = [head, "|" + "---|" * (5 + len(cons))]
    notes: dict = {}
    for label, bits, sym, act, parts, lay in _row_layouts():
        cells = []
        for c in cons:
            texts = {}
            for dt in ("bfloat16", "float16"):
                lay.torch_dtype = dt
                v = evaluate(lay, c)
                ids = sorted({r["rule"] for r in v["reasons"] if r["verdict"] != "unknown"})
                for r in v["reasons"]:
                    notes.setdefault(r["rule"], r["rule_text"])
                texts[dt] = v["verdict"] + (f" ({', '.join(ids)})" if ids and v["verdict"] != "loads" else "")
            cells.append(texts["bfloat16"] if texts["bfloat16"] == texts["float16"] else
                         f"bf16: {texts['bfloat16']}; fp16: {texts['float16']}")
        symtxt = "zero point" if lay.is_awq else ("yes" if sym else "no")
        acttxt = "–" if lay.is_awq else ("yes" if act else "no")
        lines.append(f"| {label} | {bits} | {symtxt} | {acttxt} | {parts} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Rules cited above (consumer's rule; `python -m quantize check` prints the detail and the flag to "
                 "change):")
    lines.append("")
    for rid in sorted(notes):
        r = next(x for x in RULES if x.id == rid)
        lines.append(f"- `{rid}` ({r.verdict}): {r.rule} — change: {r.fix}")
    lines.append("")
    lines.append("Sources: " + "; ".join(f"{CONSUMERS[c].name}: {CONSUMERS[c].source}" for c in cons) + ".")
    return "\n".join(lines)
