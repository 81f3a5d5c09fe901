"""PR #2135's optimizer, schedule and weight averaging against the record script itself.

The script (../shared/anchors/pr2135/train_gpt.py) is imported through tests/_anchors.py with the
settings of its logged run (the README's training command; the tests below check them against the
"Hyperparameters:" block of train_seed42.log), and each of its pieces is run beside pgolf's on the
same tensors, world size 1:

* its `Muon` (row normalisation, Polar Express Newton-Schulz, decoupled weight decay, the
  sqrt(max(1, rows/cols)) lr scale, Nesterov momentum) against pgolf's `Muon` and `ParallelMuon`;
* its `Optimizers` (AdamW on the tied embedding with EMBED_WD, AdamW on the scalars with ADAM_WD,
  Muon on the banks) and the clip of its step function against pgolf's `build_optimizers`;
* the lr multiplier, the training fraction with GPTQ_RESERVE_SECONDS taken off the wallclock cap,
  the Muon momentum warmup and the EMA update, taken out of its `train_model` (they are closures
  and inline statements there) with `ast` and executed as they are;
* its clip before the gradient averaging (8 GPUs) against `train.grad_clip_scope: local` on two
  gloo processes.

Precision: the script runs Muon in bf16 (gradients, momentum and Newton-Schulz). The exact tests
run its code with `Tensor.bfloat16` mapped to fp32 (its one eager path otherwise unchanged) and
compare with fp32 pgolf; what is left is rounding order (pgolf multiplies the shape scale into
the update before the lr, the script after; fused vs for-loop AdamW), a few float32 ulps per step,
hence atol 2e-6 on O(1) weights. The bf16 test runs the script as it is and bounds the difference
that pgolf's fp32 momentum makes.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import spawn_ranks
import yaml

from _anchors import anchor_path, load_script
from pgolf.config import TrainConfig, from_dict
from pgolf.shared.dist import DistInfo
from pgolf.train.averages import WeightAverages
from pgolf.train.optim import Muon, ParallelMuon, build_optimizers
from pgolf.train.schedule import lr_multiplier, lr_scale, muon_momentum_at, training_frac

CPU1 = DistInfo(0, 0, 1, torch.device("cpu"))

# The README's training command, as far as it touches training (the rest keep script defaults).
RUN_ENV = {"MATRIX_LR": "0.028", "MIN_LR": "0.1", "WARMDOWN_FRAC": "0.85", "BETA2": "0.99",
           "EMA_DECAY": "0.9965", "GPTQ_RESERVE_SECONDS": "0.5"}

# profiles/pr2135.yaml's train section: the keys that differ from the record defaults.
PR2135_TRAIN = {
    "max_wallclock_seconds": 599.5,  # MAX_WALLCLOCK_SECONDS 600 - GPTQ_RESERVE_SECONDS 0.5
    "warmdown_frac": 0.85,
    "min_lr": 0.1,
    "loop_enable_frac": 0.35,  # ENABLE_LOOPING_AT
    "matrix_lr": 0.028,
    "scalar_lr": 0.02,
    "tied_embed_lr": 0.03,
    "muon_momentum": 0.97,
    "muon_ns_coeffs": "polar_express",  # its only Newton-Schulz (_PE_COEFFS), MUON_BACKEND_STEPS 5
    "muon_wd": 0.095,
    "muon_row_normalize": True,
    "adam_wd": 0.02,
    "embed_wd": 0.085,
    "grad_clip_scope": "local",  # clip_grad_norm_ before Optimizers.step averages the gradients
    "ema_decay": 0.9965,
    "late_qat_threshold": 0.0,  # no QAT in the script
}
CFG = from_dict("train", PR2135_TRAIN)

# log key -> (pgolf train key, how the pgolf value follows from the logged ones)
LOG_TO_TRAIN = {
    "matrix_lr": "matrix_lr", "scalar_lr": "scalar_lr", "tied_embed_lr": "tied_embed_lr",
    "embed_wd": "embed_wd", "adam_wd": "adam_wd", "muon_wd": "muon_wd", "muon_momentum": "muon_momentum",
    "muon_momentum_warmup_start": "muon_momentum_warmup_start",
    "muon_momentum_warmup_steps": "muon_momentum_warmup_steps", "muon_row_normalize": "muon_row_normalize",
    "muon_backend_steps": "muon_ns_steps", "beta1": "beta1", "beta2": "beta2", "adam_eps": "adam_eps",
    "grad_clip_norm": "grad_clip", "ema_decay": "ema_decay", "warmdown_frac": "warmdown_frac",
    "min_lr": "min_lr", "enable_looping_at": "loop_enable_frac", "warmup_steps": "warmup_steps",
    "train_batch_tokens": "batch_tokens", "train_seq_len": "seq_len", "iterations": "iterations",
}


@pytest.fixture(scope="module")
def script():
    return load_script("pr2135", RUN_ENV)


@pytest.fixture(scope="module")
def h(script):
    return script.Hyperparameters()


def logged_hyperparameters() -> dict[str, str]:
    """{key: value as printed} of the "Hyperparameters:" block of train_seed42.log."""
    text = anchor_path("pr2135", "train_seed42.log").read_text()
    block = text.split("Hyperparameters:\n", 1)[1]
    out = {}
    for line in block.splitlines():
        m = re.match(r"^  (\w+): ?(.*)$", line)
        if not m:
            break
        out[m.group(1)] = m.group(2)
    return out


def same(logged: str, value) -> bool:
    if isinstance(value, bool):
        return logged == str(value)
    if isinstance(value, (int, float)):
        return math.isclose(float(logged), float(value), rel_tol=0, abs_tol=0)
    return logged == str(value)


# ------------------------------------------------------------------ the settings
def test_script_env_is_the_logged_run(h):
    """The env used here makes the script's Hyperparameters those of the logged run."""
    logged = logged_hyperparameters()
    for key in list(LOG_TO_TRAIN) + ["gptq_reserve_seconds", "max_wallclock_seconds", "muon_huber_wd",
                                     "tie_embeddings", "embed_lr"]:
        assert same(logged[key], getattr(h, key)), (key, logged[key], getattr(h, key))


def test_pgolf_train_settings_are_the_logged_run():
    logged = logged_hyperparameters()
    for key, ours in LOG_TO_TRAIN.items():
        assert same(logged[key], getattr(CFG, ours)), (key, logged[key], getattr(CFG, ours))
    budget = float(logged["max_wallclock_seconds"]) - float(logged["gptq_reserve_seconds"])
    assert CFG.max_wallclock_seconds == budget
    assert logged["muon_huber_wd"] == "False"  # plain decoupled decay (apply_update_), no Huber form
    assert logged["tie_embeddings"] == "True"  # the embedding's lr is tied_embed_lr (EMBED_LR unused)
    for key, value in PR2135_TRAIN.items():  # only differences from the record defaults
        assert getattr(TrainConfig(), key) != value, key


def test_profile_train_section_matches():
    """profiles/pr2135.yaml, once it has a train section, sets these values."""
    path = Path(__file__).resolve().parents[1] / "profiles" / "pr2135.yaml"
    train = (yaml.safe_load(path.read_text()) or {}).get("train") if path.is_file() else None
    if not train:
        pytest.skip("profiles/pr2135.yaml has no train section yet")
    wrong = {k: (train.get(k), v) for k, v in PR2135_TRAIN.items() if train.get(k) != v}
    assert not wrong, wrong


# ------------------------------------------------------------------ Muon
@pytest.fixture
def script_fp32(script, monkeypatch):
    """The script's code with bf16 casts made fp32 and its torch.compile'd Newton-Schulz eager."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: self.float())
    eager_ns(script, monkeypatch)
    return script


def eager_ns(script, monkeypatch):
    monkeypatch.setattr(script, "zeropower_via_newtonschulz5",
                        script.zeropower_via_newtonschulz5._torchdynamo_orig_callable)


SHAPES = [(4, 32, 16), (3, 16, 48), (2, 24, 24), (40, 24)]  # tall / wide / square banks, a matrix
STEPS = [(0, 1.0), (700, 0.6), (1600, 0.1)]  # (step, lr multiplier): momentum 0.92 -> 0.97


def run_muons(script_muon, ours: list, steps=STEPS, seed=0):
    """The same params and grads through the script's Muon and each of `ours` (factories)."""
    g = torch.Generator().manual_seed(seed)
    p0 = [torch.randn(*s, generator=g) * 0.05 for s in SHAPES]
    grads = [[torch.randn(*s, generator=g) for s in SHAPES] for _ in steps]
    ref = [torch.nn.Parameter(p.clone()) for p in p0]
    opt = script_muon(ref)
    mine = [[torch.nn.Parameter(p.clone()) for p in p0] for _ in ours]
    opts = [make(ps) for make, ps in zip(ours, mine)]
    for t, (step, mul) in enumerate(steps):
        mom = muon_momentum_at(step, CFG)
        for o in [opt, *opts]:
            for group in o.param_groups:
                group["lr"], group["momentum"] = CFG.matrix_lr * mul, mom
        for ps in [ref, *mine]:
            for p, gr in zip(ps, grads[t]):
                p.grad = gr.clone()
        for o in [opt, *opts]:
            o.step()
    return p0, ref, mine


def script_muon(script, h):
    return lambda ps: script.Muon(ps, lr=h.matrix_lr, momentum=h.muon_momentum, backend_steps=h.muon_backend_steps,
                                  weight_decay=h.muon_wd, row_normalize=h.muon_row_normalize)


def our_muon(cls, **kw):
    args = dict(lr=CFG.matrix_lr, momentum=CFG.muon_momentum, weight_decay=CFG.muon_wd, ns_steps=CFG.muon_ns_steps,
                ns_coeffs=CFG.muon_ns_coeffs, row_normalize=CFG.muon_row_normalize, ns_dtype=torch.float32)
    return lambda ps: cls(ps, **{**args, **kw})


def test_muon_equals_script_fp32(script_fp32, h):
    """Three steps (lr multiplier and warmup momentum changing) on banks and a matrix: pgolf's Muon
    and ParallelMuon (one process) equal the script's Muon; without row normalisation they do not."""
    p0, ref, (a, b, off) = run_muons(script_muon(script_fp32, h),
                                     [our_muon(Muon), our_muon(ParallelMuon), our_muon(Muon, row_normalize=False)])
    for r, x, y, z, q in zip(ref, a, b, off, p0):
        torch.testing.assert_close(x, r, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(y, r, atol=2e-6, rtol=1e-6)
        assert (z - r).abs().max() > 100 * (x - r).abs().max() + 1e-4  # the test can see row normalisation
        assert (r - q).abs().max() > 1e-3  # and the params did move


def test_muon_weight_decay_equals_script(script_fp32, h):
    """Zero gradients leave only the decoupled decay p*(1 - lr*wd), lr the scheduled one (no Huber
    form: MUON_HUBER_WD=0), bit for bit the same in both."""
    zero = [torch.nn.Parameter(torch.ones(3, 32, 16)), torch.nn.Parameter(torch.ones(3, 32, 16))]
    o_s, o_p = script_muon(script_fp32, h)([zero[0]]), our_muon(Muon)([zero[1]])
    for o, p in zip((o_s, o_p), zero):
        o.param_groups[0]["lr"] = 0.014
        p.grad = torch.zeros_like(p)
        o.step()
    torch.testing.assert_close(zero[0].detach(), torch.full((3, 32, 16), 1 - 0.014 * 0.095))
    torch.testing.assert_close(zero[1].detach(), zero[0].detach(), atol=0, rtol=0)


def test_muon_bf16_script_close_to_pgolf(script, h, monkeypatch):
    """The script as it runs on the GPU (bf16 grads, momentum and NS) vs pgolf with bf16 NS and fp32
    momentum: their steps differ by about what bf16 Newton-Schulz alone does to a step (pgolf bf16
    vs pgolf fp32: ~4-5 % relative with Polar Express's large first coefficients), not more."""
    eager_ns(script, monkeypatch)
    p0, ref, (a, f) = run_muons(script_muon(script, h), [our_muon(Muon, ns_dtype=torch.bfloat16), our_muon(Muon)])
    for r, x, y, q in zip(ref, a, f, p0):
        rel = ((x - r).norm() / (r - q).norm()).item()
        noise = ((x - y).norm() / (y - q).norm()).item()  # bf16 NS's own rounding
        assert rel < 0.08 and rel < 1.5 * noise, (rel, noise)


# ------------------------------------------------------------------ the optimizer bundle
class StubGPT(torch.nn.Module):
    """The parameter layout the script's Optimizers reads (small sizes): banks, a tied embedding,
    per-block scalars and control matrices, skip weights / gates, lane lambdas, the SmearGate."""

    def __init__(self, L=2, D=16, V=40):
        super().__init__()
        self.tok_emb = torch.nn.Embedding(V, D)
        self.qo_bank = torch.nn.Parameter(torch.randn(2 * L, D, D) * 0.1)
        self.kv_bank = torch.nn.Parameter(torch.randn(2 * L, D // 2, D) * 0.1)
        self.mlp_up_bank = torch.nn.Parameter(torch.randn(L, 4 * D, D) * 0.1)
        self.mlp_down_bank = torch.nn.Parameter(torch.randn(L, D, 4 * D) * 0.1)
        self.blocks = torch.nn.ModuleList()
        for _ in range(L):
            b = torch.nn.Module()
            b.attn_scale = torch.nn.Parameter(torch.rand(D) + 0.5)
            b.resid_mix = torch.nn.Parameter(torch.rand(2, D))  # 2-D, a control tensor by name
            b.attn = torch.nn.Module()
            b.attn.q_gain = torch.nn.Parameter(torch.full((2,), 5.0))
            b.attn.attn_gate_w = torch.nn.Parameter(torch.randn(2, 12) * 0.1)
            self.blocks.append(b)
        self.skip_weights = torch.nn.Parameter(torch.rand(1, D))
        self.skip_gates = torch.nn.Parameter(torch.zeros(1, D))
        self.parallel_post_lambdas = torch.nn.Parameter(torch.rand(L, 2, 2))
        self.parallel_resid_lambdas = torch.nn.Parameter(torch.rand(L, 2))
        self.smear_gate_enabled = True
        self.smear_gate = torch.nn.Linear(12, 1, bias=False)
        self.smear_lambda = torch.nn.Parameter(torch.zeros(1))

    def groups(self):
        """pgolf's routing of the same parameters (GPT.optimizer_groups for PR #2135's model)."""
        matrix = [self.qo_bank, self.kv_bank, self.mlp_up_bank, self.mlp_down_bank]
        embed = [self.tok_emb.weight]
        taken = {id(p) for p in matrix + embed}
        return {"matrix": matrix, "embed": embed, "scalar": [p for p in self.parameters() if id(p) not in taken]}


def script_step(script, h, model, opts, step, scale):
    """What the script's step_fn does after backward: momentum warmup, lr, clip, step (one process)."""
    frac = min(step / h.muon_momentum_warmup_steps, 1.0)
    for group in opts.optimizer_muon.param_groups:
        group["momentum"] = (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
    torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
    opts.step(distributed=False)


def test_optimizers_equal_script_fp32(script_fp32, h):
    """The script's Optimizers (AdamW tok / AdamW scalars / Muon banks, fused AdamW) and clip vs
    pgolf's build_optimizers with the PR #2135 train keys: every parameter after three steps."""
    torch.manual_seed(1)
    ms = StubGPT()
    mp_ = StubGPT()
    mp_.load_state_dict(ms.state_dict())
    opts = script_fp32.Optimizers(h, ms)
    ours = build_optimizers(mp_.groups(), CFG, CPU1)
    assert {id(p) for p in opts.optimizer_scalar.param_groups[0]["params"]} == {id(p) for p in ms.groups()["scalar"]}
    assert opts.optimizer_tok.defaults["weight_decay"] == ours.adams["embed"].defaults["weight_decay"] == 0.085
    assert opts.optimizer_scalar.defaults["weight_decay"] == ours.adams["scalar"].defaults["weight_decay"] == 0.02
    g = torch.Generator().manual_seed(2)
    for step, scale in STEPS:
        grads = {n: torch.randn(p.shape, generator=g) * 0.05 for n, p in ms.named_parameters()}
        for m in (ms, mp_):
            for n, p in m.named_parameters():
                p.grad = grads[n].clone()
        script_step(script_fp32, h, ms, opts, step, scale)
        assert float(ours.clip_grad_norm_(CFG.grad_clip)) > 3.0  # ~4 > 0.3: the clip is active
        ours.step(lr_multiplier(scale, CFG), muon_momentum_at(step, CFG))
        ours.zero_grad()
    theirs, mine = dict(ms.named_parameters()), dict(mp_.named_parameters())
    for n in theirs:
        torch.testing.assert_close(mine[n], theirs[n], atol=2e-6, rtol=1e-6, msg=n)


def test_full_model_groups_equal_scripts():
    """Full size: the script's Optimizers on its GPT (the logged run's model settings) and pgolf's
    build_optimizers on GPT(profiles/pr2135.yaml) put the same parameters (by the name map of
    tests/test_anchor_pr2135.py) in the same optimizer with the same lr and weight decay; the
    learned softcaps are in none (pgolf: the "untrained" group, which no optimizer takes)."""
    from pgolf.shared.model import GPT
    from test_anchor_pr2135 import ENV, pgolf_name, pr2135_config

    script = load_script("pr2135", {**ENV, **RUN_ENV})
    hs = script.Hyperparameters()
    torch.manual_seed(0)
    ref, ours = script.GPT(hs), GPT(pr2135_config())
    theirs = script.Optimizers(hs, ref)
    mine = build_optimizers(ours.optimizer_groups(), CFG, CPU1)
    names = {id(p): pgolf_name(n) for n, p in ref.named_parameters()}
    names.update({id(p): n for n, p in ours.named_parameters()})

    def routing(opts: dict) -> dict:
        """{optimizer: (lr, weight decay, sorted parameter names) of each param group}."""
        return {k: [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in o.param_groups]
                for k, o in opts.items()}

    want = routing({"muon": theirs.optimizer_muon, "embed": theirs.optimizer_tok, "scalar": theirs.optimizer_scalar})
    got = routing({"muon": mine.muon, "embed": mine.adams["embed"], "scalar": mine.adams["scalar"]})
    assert got == want
    assert want["embed"][0][:2] == (0.03, 0.085) and want["scalar"][0][:2] == (0.02, 0.02)
    routed = {n for groups in got.values() for _, _, ns in groups for n in ns}
    assert {n for n, _ in ours.named_parameters()} - routed == {"softcap_pos", "softcap_neg"}


def test_embed_wd_applies_to_the_embed_group_only():
    m = StubGPT()
    opt = build_optimizers(m.groups(), replace(CFG, embed_wd=0.3, adam_wd=0.01), CPU1)
    assert opt.adams["embed"].param_groups[0]["weight_decay"] == 0.3
    assert opt.adams["scalar"].param_groups[0]["weight_decay"] == 0.01
    assert opt.muon.param_groups[0]["row_normalize"] is True
    rec = build_optimizers(m.groups(), TrainConfig(), CPU1)  # record defaults: both groups adam_wd, no row norm
    assert rec.adams["embed"].param_groups[0]["weight_decay"] == rec.adams["scalar"].param_groups[0]["weight_decay"]
    assert rec.muon.param_groups[0]["row_normalize"] is False and rec.clip_scope == "global"


# ------------------------------------------------------------------ the schedule, from train_model
def train_model_pieces(script, names: set[str]) -> dict:
    """Statements of the script's train_model: the Assign / If / FunctionDef nodes that define
    `names`, anywhere inside it (nested functions included), in source order, as one module."""
    tree = ast.parse(inspect.getsource(script.train_model))
    picked = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            picked.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets):
            picked.append(node)
        elif isinstance(node, ast.If) and "max_wallclock_ms" in names and ast.unparse(node.test) == \
                "max_wallclock_ms is not None" and "gptq_reserve_seconds" in ast.unparse(node):
            picked.append(node)
    picked.sort(key=lambda n: n.lineno)
    return picked


def exec_pieces(nodes, namespace: dict) -> dict:
    exec(compile(ast.Module(body=list(nodes), type_ignores=[]), "<pr2135 train_model>", "exec"), namespace)
    return namespace


def script_schedule(script, h) -> dict:
    nodes = [n for n in train_model_pieces(script, {"max_wallclock_ms", "training_frac", "lr_mul"})
             if not isinstance(n, ast.Assign) or ast.unparse(n.targets[0]) == "max_wallclock_ms"]
    assert [type(n).__name__ for n in nodes] == ["Assign", "If", "FunctionDef", "FunctionDef"]
    return exec_pieces(nodes, {"h": h, "log": lambda *a, **k: None})


def test_lr_schedule_equals_script(script, h):
    """lr_mul(training_frac) of the script (wallclock 600 s - reserve 0.5 s, warmdown 0.85, floor
    0.1) == pgolf's lr_multiplier(lr_scale) with max_wallclock_seconds 599.5, over 0..620 s."""
    ns = script_schedule(script, h)
    assert ns["max_wallclock_ms"] == CFG.max_wallclock_seconds * 1000.0 == 599_500.0
    for elapsed in [i * 620_000.0 / 4000 for i in range(4001)] + [0.15 * 599_500.0, 599_500.0]:
        step = int(elapsed / 120)
        assert training_frac(step, elapsed, CFG) == ns["training_frac"](step, elapsed)
        theirs = ns["lr_mul"](ns["training_frac"](step, elapsed))
        assert lr_multiplier(lr_scale(step, elapsed, CFG), CFG) == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    frac = [i / 1000 for i in range(1201)]  # the multiplier itself over fractions 0..1.2
    cap = CFG.max_wallclock_seconds * 1000.0
    mine = [lr_multiplier(lr_scale(0, f * cap, CFG), CFG) for f in frac]
    assert mine == pytest.approx([ns["lr_mul"](f) for f in frac], rel=1e-12, abs=1e-15)
    assert mine[0] == 1.0 and mine[150] == 1.0 and mine[575] == pytest.approx(0.5) and mine[1000] == 0.1


def test_step_based_schedule_equals_script(script, h):
    """Without a wallclock cap both use step / iterations."""
    hs = type("H", (), {k: getattr(h, k) for k in dir(h) if not k.startswith("__")})()
    hs.max_wallclock_seconds = 0.0
    ns = script_schedule(script, hs)
    cfg = replace(CFG, max_wallclock_seconds=0.0)
    for step in range(0, 20001, 50):
        assert training_frac(step, 1e9, cfg) == ns["training_frac"](step, 1e9)
        assert lr_multiplier(lr_scale(step, 1e9, cfg), cfg) == pytest.approx(ns["lr_mul"](ns["training_frac"](step, 0)))


def test_momentum_warmup_equals_script(script, h):
    nodes = [n for n in train_model_pieces(script, {"frac", "muon_momentum"})
             if "muon_momentum_warmup_steps" in ast.unparse(n) or ast.unparse(n.targets[0]) == "muon_momentum"]
    assert len(nodes) == 2
    for step in list(range(0, 3001, 7)) + [1499, 1500, 1501]:
        ns = exec_pieces(nodes, {"h": h, "step": step})
        assert muon_momentum_at(step, CFG) == pytest.approx(ns["muon_momentum"], rel=1e-15)
    assert muon_momentum_at(0, CFG) == 0.92 and muon_momentum_at(1500, CFG) == 0.97


def test_ema_update_equals_script(script, h):
    """The script's EMA (fp32 copy of the state dict at the start, ema*d + w*(1-d) after every step,
    applied at the end) vs WeightAverages: three updates with the weights moving in between."""
    tree = ast.parse(inspect.getsource(script.train_model))
    init = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "ema_state"]
    update = [n for n in ast.walk(tree) if isinstance(n, ast.With) and "ema_state[name].mul_" in ast.unparse(n)]
    assert len(init) == 1 and len(update) == 1
    torch.manual_seed(3)
    model = StubGPT()
    ns = exec_pieces(init, {"base_model": model, "torch": torch})
    ns["ema_decay"] = h.ema_decay
    ours = WeightAverages(model, CFG.ema_decay, CFG)
    assert set(ns["ema_state"]) == set(ours.names)  # the state dict is the parameters: no buffers
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        exec_pieces(update, ns)
        ours.update_ema()
    final = ours.final()
    for n, t in ns["ema_state"].items():
        torch.testing.assert_close(final[n], t, atol=1e-6, rtol=1e-6)  # lerp vs mul+add: ulps


# ------------------------------------------------------------------ clip before averaging (2 gloo processes)
def _clip_scenario(rank, world):
    res, final = {}, {}
    for scope in ("local", "global"):
        torch.manual_seed(4)
        m, ref = StubGPT(), StubGPT()
        ref.load_state_dict(m.state_dict())
        cfg = replace(CFG, grad_clip_scope=scope)
        opt = build_optimizers(m.groups(), cfg, DistInfo(rank, rank, world, torch.device("cpu")))
        one = build_optimizers(ref.groups(), cfg, CPU1)
        for t, (step, scale) in enumerate(STEPS):
            per_rank = []  # every rank's grads, scaled differently so their norms differ
            for r in range(world):
                g = torch.Generator().manual_seed(100 * t + r)
                per_rank.append({n: torch.randn(p.shape, generator=g) * 0.05 * (1 + 3 * r)
                                 for n, p in m.named_parameters()})
            for n, p in m.named_parameters():
                p.grad = per_rank[rank][n].clone()
            opt.clip_grad_norm_(cfg.grad_clip)
            opt.step(lr_multiplier(scale, cfg), muon_momentum_at(step, cfg))
            opt.zero_grad()
            # the script's order by hand: each rank clips its own gradients, then they are averaged
            for gr in per_rank:  # torch's clip_grad_norm_ rule on the bare gradient tensors
                norm = torch.nn.utils.get_total_norm(list(gr.values()))
                if scope == "local":
                    for g in gr.values():
                        g.mul_((cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0))
            for n, p in ref.named_parameters():
                p.grad = sum(gr[n] for gr in per_rank) / world
            if scope == "global":
                one.clip_grad_norm_(cfg.grad_clip)
            one.step(lr_multiplier(scale, cfg), muon_momentum_at(step, cfg))
            one.zero_grad()
        a, b = dict(m.named_parameters()), dict(ref.named_parameters())
        res[scope] = max((a[n] - b[n]).abs().max().item() for n in a)
        final[scope] = {n: t.detach().clone() for n, t in a.items()}
    res["local_vs_global"] = max((final["local"][n] - final["global"][n]).abs().max().item()
                                 for n in final["local"])
    return res


@pytest.fixture(scope="module")
def clip_results(tmp_path_factory):
    return spawn_ranks(tmp_path_factory, _clip_scenario)


def test_local_clip_is_the_scripts_clip_before_averaging(clip_results):
    """grad_clip_scope local on 2 processes == each rank's grads clipped alone, then averaged;
    global == the average clipped (pgolf's default); both as Muon/AdamW on one process would do."""
    for r in clip_results:
        assert r["local"] < 2e-6, r
        assert r["global"] < 2e-6, r
        assert r["local_vs_global"] > 1e-3, r  # the two orders differ here (rank norms ~4 and ~16)


def test_local_clip_after_averaging_is_refused():
    m = StubGPT()
    opt = build_optimizers(m.groups(), CFG, DistInfo(0, 0, 2, torch.device("cpu")))
    assert opt.clip_scope == "local"
    opt._communicated = True  # as after step()'s communication, without a process group
    with pytest.raises(RuntimeError, match="before the gradients are averaged"):
        opt.clip_grad_norm_(0.3)


@pytest.mark.parametrize("kw, msg", [({"grad_clip_scope": "rank"}, "train.grad_clip_scope must be one of global, local"),
                                     ({"embed_wd": -0.1}, "train.embed_wd must be >= 0"),
                                     ({"muon_row_normalize": 1}, "train.muon_row_normalize must be bool")])
def test_new_train_keys_are_checked(kw, msg):
    from pgolf.config import ConfigError

    with pytest.raises(ConfigError, match=msg):
        from_dict("train", kw)
