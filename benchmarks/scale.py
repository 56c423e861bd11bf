"""Benchmark: paper-scale memory per device and predicted OGPSA cost, from compiled programs.

Question: do the paper presets (Qwen2.5-7B, Llama-3.1-8B; SFT 4 rows x 2048 tokens x 4
accumulation steps, DPO 2 pairs x 2048 x 16 per device; bf16 compute, float32 master weights)
fit 80 GB devices on 8 devices, and what do OGPSA's basis, its storage dtype and the
rematerialisation setting cost? Expected (issue 14): Qwen2.5-7B SFT and DPO with flat k = 2 peak
<= 72 GB on 8 devices, within 10 % of plain AdamW's peak plus the basis bytes; OGPSA's step
overhead at k = 2 on an H200 <= 2 % of the step (refresh excluded).

Every row is `ogpsa_jax.train.plan` on virtual CPU devices (the training loop's own programs,
lowered with sharded `jax.ShapeDtypeStruct`s and compiled; nothing allocated), and, for
``predicted_overhead_*``, `ogpsa_jax.train.cost` (roofline of the same programs). The per-device
shapes stay the paper's on every device count: ``mesh = (1, N, 1)``, the global batch scaled
by N / 8, the reference batch too but at most one set's rows rounded up to a multiple of N.

The grid (every row is reported, also those that do not fit):

* stages ``sft`` and ``dpo`` (the step) and ``refresh`` (the SFT stage's basis refresh:
  reference gradients + basis, or the activation capture);
* step methods: ``off``; ``flat`` (Gram-Schmidt, the reference code) with k = 1, 2, 8 and a
  float32 or bfloat16 basis; ``matrix`` (activation basis, rank 64); ``lora`` (rank-16
  adapters on every projection, flat k = 2 on the adapters: `lora_overrides`);
* refresh methods: flat k = 2 and 8 (float32), the activation capture (rank 64), and flat SVD
  with k = 8 (one gradient per reference batch, all held at once); the reference-gradient
  program is the same for every k and basis dtype, only the live basis differs;
* remat: the preset's setting for every row; ``none``, ``block`` and ``dots`` for ``off``
  and flat k = 2 float32 (the pair the goal compares);
* devices 8 (every row above), 64 and 256 (``off``, flat k = 2 float32 and bfloat16, flat
  k = 8, matrix and lora at the preset's remat; the refresh at flat k = 2): each compile of a
  7-8B program takes minutes on a 2-core machine. The 8-device rows of both presets come first.

Command (from the repository root; ``make bench-scale`` does the same)::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py --json results/bench/scale.json

Options: ``--devices 8,64``, ``--presets qwen2_5_7b_paper``, ``--stages sft``, ``--quick`` (8
devices, Qwen only, preset remat only), ``--methods lora,flat`` (only those rows),
``--no-cost``, ``--append`` (keep the rows already in ``--json``: an interrupted run
continues), ``--full-at N`` (device counts up to N get every row).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="8,64,256")
    ap.add_argument("--presets", default="qwen2_5_7b_paper,llama3_1_8b_paper")
    ap.add_argument("--stages", default="sft,dpo,refresh")
    ap.add_argument("--quick", action="store_true", help="8 devices, Qwen, preset remat only")
    ap.add_argument("--no-cost", action="store_true", help="memory only (no cost model)")
    ap.add_argument("--json", default=None, help="write the rows here (after every row)")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --json")
    ap.add_argument("--full-at", type=int, default=8, help="the device count with every row")
    ap.add_argument("--table", default=None, help="print a results JSON as markdown, and exit")
    ap.add_argument("--methods", default=None, help="only these methods, e.g. lora,flat")
    return ap.parse_args()


def table(rows: list[dict]) -> str:
    """Markdown tables of result rows (GB per device, decimal)."""
    gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
    out = []
    head = (
        "| preset | stage | devices | method | k | basis | remat | peak GB | params | opt state "
        "| basis GB | temporaries | fits H100 / H200 / v5p / v5e | OGPSA overhead H200 / v5p |"
    )
    out += [head, "|" + "---|" * 14]
    for r in rows:
        if r["stage"] == "refresh":
            continue
        p = r["parts"]
        fits = " / ".join("yes" if v else "no" for v in r["fits"].values())
        over = "/".join(
            f"{100 * r[f'predicted_overhead_{hw}']:.2f}%" for hw in ("h200", "tpu-v5p")
        ) if "predicted_overhead_h200" in r else ""  # fmt: skip
        out.append(
            f"| {r['preset'].split('_paper')[0]} | {r['stage']} | {r['devices']} | {r['method']} "
            f"| {r['k'] or ''} | {r['basis_dtype'] or ''} | {r['remat']} "
            f"| **{gb(r['peak_bytes_per_device'])}** | {gb(p['params'])} | {gb(p['opt_state'])} "
            f"| {gb(p['basis'])} | {gb(p['temporaries'])} | {fits} | {over} |"
        )
    out += ["", "| preset | devices | estimator | k | remat | refresh peak GB | reference "
            "gradient temporaries GB | fits H100 / H200 / v5p / v5e | refresh s H200 "
            "| amortised H200 / v5p |", "|" + "---|" * 10]  # fmt: skip
    for r in rows:
        if r["stage"] != "refresh":
            continue
        p = r["parts"]
        temps = p.get("reference_grad_temporaries", p.get("capture_temporaries", 0))
        fits = " / ".join("yes" if v else "no" for v in r["fits"].values())
        amort = "/".join(
            f"{100 * r[f'refresh_amortised_{hw}']:.1f}%" for hw in ("h200", "tpu-v5p")
        ) if "refresh_amortised_h200" in r else ""  # fmt: skip
        refresh_s = f"{r['refresh_s_h200']:.1f}" if "refresh_s_h200" in r else ""
        estimator = r["estimator"] or r["method"]  # LoRA: the adapters' basis; k = their rank
        out.append(
            f"| {r['preset'].split('_paper')[0]} | {r['devices']} | {estimator} | {r['k']} "
            f"| {r['remat']} | **{gb(r['peak_bytes_per_device'])}** | {gb(temps)} | {fits} "
            f"| {refresh_s} | {amort} |"
        )
    return "\n".join(out)


ARGS = parse_args()
if ARGS.table:
    with open(ARGS.table) as f:
        print(table(json.load(f)))
    sys.exit(0)
if ARGS.quick:
    ARGS.devices, ARGS.presets = "8", "qwen2_5_7b_paper"
DEVICES = [int(d) for d in ARGS.devices.split(",")]

import jax  # noqa: E402

from ogpsa_jax.train.abstract import use_virtual_devices  # noqa: E402

jax.config.update("jax_platforms", "cpu")
use_virtual_devices(max(DEVICES))  # before anything starts JAX's backend

from ogpsa_jax import models  # noqa: E402
from ogpsa_jax.train import apply_overrides, preset  # noqa: E402
from ogpsa_jax.train.cost import HARDWARE, micro_batch_cost, refresh_cost, update_cost  # noqa: E402
from ogpsa_jax.train.plan import DEVICE_MEMORY, HEADROOM, plan_stage  # noqa: E402
from ogpsa_jax.train.schema import TrainConfig  # noqa: E402
from ogpsa_jax.train.validation import validate  # noqa: E402


def lora_overrides(stage: str, rank: int) -> list[str]:
    """The overrides of a LoRA row: adapters of rank ``rank`` on every projection (alpha =
    2 x rank), only they train, with OGPSA's flat Gram-Schmidt basis at k = 2 on the adapters
    (the demo's ``ogpsa-lora``)."""
    og = f"{stage}.ogpsa"
    return [
        f"model.lora.rank={rank}",
        f"model.lora.alpha={2 * rank}",
        f"{og}.method=gram_schmidt",
        f"{og}.k=2",
    ]


def scaled(config: TrainConfig, n: int) -> TrainConfig:
    """The preset on ``n`` devices with the paper's per-device shapes."""
    f = n // 8
    items = [f"mesh=1,{n},1", f"num_devices={n}"]
    for stage in ("sft", "dpo"):
        st = getattr(config, stage)
        items.append(f"{stage}.batch_size={st.batch_size * f}")
        # reference rows per device as the preset's, but no more batch than one set needs
        # (200 rows, DPO 200 pairs = 400 rows) rounded up to a multiple of the devices
        rows = st.ogpsa.reference_rows * (2 if stage == "dpo" else 1)
        ref = min(st.ogpsa.reference_batch_size * f, n * -(-rows // n))
        items.append(f"{stage}.ogpsa.reference_batch_size={ref}")
    return apply_overrides(config, items)


def method_overrides(stage: str, method: str, k: int, dtype: str) -> list[str] | None:
    og = f"{stage}.ogpsa"
    if method == "off":
        return [f"{og}.enabled=false"]
    if method == "flat":
        return [f"{og}.method=gram_schmidt", f"{og}.k={k}", f"{og}.basis_dtype={dtype}"]
    if method == "flat_svd":
        return [f"{og}.method=svd", f"{og}.k={k}", f"{og}.basis_dtype={dtype}"]
    if method == "matrix":
        return [f"{og}.method=activation", f"{og}.k={k}", f"{og}.basis_dtype={dtype}"]
    return lora_overrides(stage, k)


def grid(stages: list[str], preset_remat: str, full: bool) -> list[tuple]:
    """(stage, method, k, basis_dtype, remat) of every row for one preset and device count;
    ``full`` (the smallest device count): every method and remat, else the reduced grid."""
    methods = [("off", 0, "float32")]
    methods += [("flat", k, d) for k in (1, 2, 8) for d in ("float32", "bfloat16")]
    methods += [("matrix", 64, "float32"), ("lora", 16, "float32")]
    remats = [preset_remat] if ARGS.quick else ["none", "block", "dots"]
    if not full:  # compiles take minutes each: the methods that differ, at the preset's remat
        keep = ("off", 0, "float32"), ("flat", 2, "float32"), ("flat", 2, "bfloat16")
        keep += ("flat", 8, "float32"), ("matrix", 64, "float32"), ("lora", 16, "float32")
        methods = [m for m in methods if m in keep]
        remats = [preset_remat]
    varied = (("off", 0, "float32"), ("flat", 2, "float32"))  # every remat for these
    # The refresh's reference-gradient program is the same for every k and basis dtype of the
    # flat method (only the live basis and the basis program differ): k = 2 float32 (the
    # reference code's SFT setting) with every remat, k = 8, the activation capture, and SVD
    # k = 8 (one gradient per reference batch held at once).
    refresh = [("flat", 2, "float32"), ("flat", 8, "float32"), ("matrix", 64, "float32")]
    refresh += [("lora", 16, "float32"), ("flat_svd", 8, "float32")]
    if not full:
        refresh = refresh[:1]
    rows = []
    for stage in stages:
        for method, k, dtype in refresh if stage == "refresh" else methods:
            for remat in remats:
                keep = ARGS.methods is None or method in ARGS.methods.split(",")
                if keep and (remat == preset_remat or (method, k, dtype) in varied):
                    rows.append((stage, method, k, dtype, remat))
    return rows


ESTIMATORS = {"flat": "gram_schmidt", "flat_svd": "svd", "matrix": "activation"}
KEY = ("preset", "stage", "devices", "method", "k", "basis_dtype", "remat", "estimator")
_COST_CACHE: dict[tuple, Any] = {}


def cached(key: tuple, fn: Any, *args: Any) -> Any:
    if key not in _COST_CACHE:
        _COST_CACHE[key] = fn(*args)
    return _COST_CACHE[key]


def one_row(name: str, base: TrainConfig, n: int, mesh: Any, spec: tuple) -> dict | None:
    stage, method, k, dtype, remat = spec
    kind = "sft" if stage == "refresh" else stage
    extra = method_overrides(kind, method, k, dtype)
    if extra is None:
        return None
    config = apply_overrides(base, [*extra, f"model.remat={remat}"])
    validate(config, "sft-dpo", n)
    t0 = time.perf_counter()
    programs = ("refresh",) if stage == "refresh" else ("step",)
    p = plan_stage(kind, config, mesh, programs)
    compile_s = time.perf_counter() - t0
    row: dict[str, Any] = dict(
        preset=name, stage=stage, devices=n, method=method.split("_")[0], k=k,
        basis_dtype=dtype if method != "off" else None, remat=remat,
        estimator=ESTIMATORS.get(method),
    )  # fmt: skip
    if stage == "refresh":
        peak = p.other_peaks["refresh"]
        parts = dict(params=p.params, opt_state=p.opt_state, basis=p.basis)
        parts.update({f"{name}_{k2}": getattr(m, k2) for name, m in p.programs.items()
                      for k2 in ("arguments", "temporaries")})  # fmt: skip
    else:
        peak = p.step_peak
        parts = dict(params=p.params, opt_state=p.opt_state, basis=p.basis, batch=p.batch)
        parts.update(temporaries=p.step.temporaries, new_outputs=p.step.new_outputs)
    if p.frozen:  # LoRA: the frozen base weights
        parts["frozen"] = p.frozen
    row.update(peak_bytes_per_device=peak, parts=parts, compile_s=round(compile_s, 1))
    row["fits"] = {kind_: peak <= (1 - HEADROOM) * cap for kind_, cap in DEVICE_MEMORY.items()}
    if not ARGS.no_cost:
        row.update(predicted(name, config, kind, n, mesh, stage, remat))
    return row


def predicted(
    name: str, config: TrainConfig, kind: str, n: int, mesh: Any, stage: str, remat: str
) -> dict:
    """Roofline times: OGPSA's share of the step, and the refresh amortised at its interval."""
    st = getattr(config, kind)
    rank = config.model.lora.rank  # LoRA programs differ from full fine-tuning's: own keys
    micro = cached((name, kind, n, remat, rank, "micro"), micro_batch_cost, kind, config, mesh)
    off = dataclasses.replace(st, ogpsa=dataclasses.replace(st.ogpsa, enabled=False))
    config_off = dataclasses.replace(config, **{kind: off})
    u_off = cached((name, kind, n, rank, "update_off"), update_cost, kind, config_off, mesh)
    out: dict[str, Any] = {}
    for hw, roof in HARDWARE.items():
        plain = roof.seconds(micro) * st.accum_steps + roof.seconds(u_off)
        out[f"step_s_{hw}"] = plain
        if stage == "refresh":
            ref_batch, basis, batches = cached(
                (name, kind, n, remat, rank, st.ogpsa.method, st.ogpsa.k, "refresh"),
                refresh_cost,
                kind,
                config,
                mesh,
            )
            refresh_s = roof.seconds(ref_batch) * batches + roof.seconds(basis)
            out[f"refresh_s_{hw}"] = refresh_s
            out[f"refresh_amortised_{hw}"] = refresh_s / (st.ogpsa.refresh_every * plain)
        elif st.ogpsa.enabled:
            og = st.ogpsa
            key = (name, kind, n, rank, og.method, og.k, og.basis_dtype, "update")
            update = cached(key, update_cost, kind, config, mesh)
            out[f"predicted_overhead_{hw}"] = (roof.seconds(update) - roof.seconds(u_off)) / plain
        else:
            out[f"predicted_overhead_{hw}"] = 0.0
    return out


def main() -> None:
    stages = ARGS.stages.split(",")
    rows: list[dict] = []
    if ARGS.append and ARGS.json and os.path.exists(ARGS.json):
        with open(ARGS.json) as f:
            rows = json.load(f)
    done = {tuple(r[k] for k in KEY) for r in rows}
    t_start = time.perf_counter()
    for n in DEVICES:  # the 8-device rows first: each row is written as soon as it is done
        for name in ARGS.presets.split(","):
            base = preset(name)
            config = scaled(base, n)
            mesh = models.make_mesh((1, n, 1), devices=jax.devices("cpu")[:n])
            for spec in grid(stages, base.model.remat, full=n <= ARGS.full_at):
                stage, method, k, dtype, remat = spec
                dtype = None if method == "off" else dtype
                key = (
                    name,
                    stage,
                    n,
                    method.split("_")[0],
                    k,
                    dtype,
                    remat,
                    ESTIMATORS.get(method),
                )
                if key in done:
                    continue
                row = one_row(name, config, n, mesh, spec)
                if row is None:
                    print(f"{name} {n} {spec}: not available (see lora_overrides)", flush=True)
                    continue
                rows.append(row)
                if ARGS.json:
                    with open(ARGS.json, "w") as f:
                        json.dump(rows, f, indent=1)
                fits = "".join("Y" if v else "." for v in row["fits"].values())
                over = row.get("predicted_overhead_h200", row.get("refresh_amortised_h200"))
                print(
                    f"{name:18s} {row['stage']:7s} {n:4d} {spec[1]:8s} k={spec[2]:<2d} "
                    f"{spec[3]:8s} remat={spec[4]:5s} "
                    f"peak {row['peak_bytes_per_device'] / 1e9:7.2f} GB fits[{fits}] "
                    f"h200 {'' if over is None else f'{over:.4f}'} "
                    f"({row['compile_s']:.0f} s) load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    command = "OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py"
    machine = f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, XLA:CPU"
    meta = dict(
        command=" ".join([command, *sys.argv[1:]]),
        machine=machine,
        device_memory=DEVICE_MEMORY, headroom=HEADROOM,
        hardware={k: dataclasses.asdict(v) for k, v in HARDWARE.items()},
        wall_s=round(time.perf_counter() - t_start),
        fits_order=list(DEVICE_MEMORY),
    )  # fmt: skip
    print(f"{len(rows)} rows in {meta['wall_s']} s; {json.dumps(meta)}")


if __name__ == "__main__":
    main()
