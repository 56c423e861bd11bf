"""Check `ogpsa plan`'s memory and the cost model's step times against a real step on this device.

Question: how close are the planned peak memory (`ogpsa_jax.train.plan`, compiled on virtual
CPU devices) and the predicted OGPSA overhead (`ogpsa_jax.train.cost`, a roofline) to what a
real training step measures on the machine at hand?

For each variant (OGPSA off, and the config's own OGPSA settings) two fresh processes run:

* ``--predict``: with ``JAX_PLATFORMS=cpu``, plans the stage on 1 virtual device (the step's
  peak, and the DPO reference pass's for DPO) and, unless ``--no-cost``, its roofline costs;
* ``--measure``: on the default platform, builds the stage exactly as training does
  (`ogpsa_jax.train.stage.build_stage`: data, model, optimizer, DPO reference), runs
  ``--steps`` steps on a batch of the full planned shape ``[accum, rows, max_length]`` after a
  warm-up, and measures the step time (median) and the peak memory: the device's
  ``peak_bytes_in_use`` on a GPU/TPU; on CPU, for the first execution of the step (compiled
  beforehand), the process's peak RSS (reset through ``/proc/self/clear_refs``) minus its RSS
  before it, plus the bytes of the live arrays before it (params, optimizer state, batch), with
  glibc's mmap threshold fixed at 1 MiB so that freed buffers leave the RSS.

Commands (from the repository root)::

    # this CPU machine: SmolLM2-135M (the `smollm2` preset, SFT, 4 rows x 128 tokens)
    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/device_check.py --preset smollm2
    # a GPU (benchmarks/gpu_check.sh): SmolLM2-135M shapes at the paper's per-device shapes
    python3 benchmarks/device_check.py --preset tiny --set model.arch=smollm2_135m \\
        --set model.scan_unroll=1 \\
        --set sft.batch_size=4 --set sft.accum_steps=4 --set sft.max_length=2048 \\
        --set model.remat=block --set model.loss_chunk=512 --set model.dtype=bfloat16
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smollm2")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--stage", default="sft", choices=("sft", "dpo"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-cost", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--predict", default=None, help="(internal) variant to predict")
    ap.add_argument("--measure", default=None, help="(internal) variant to measure")
    return ap.parse_args()


VARIANTS = ("off", "ogpsa")


def config_of(args: argparse.Namespace, variant: str):  # -> TrainConfig
    from ogpsa_jax.train import apply_overrides, preset

    items = [*args.set, "num_devices=1", "mesh=1,1,1", "checkpoint_every=0"]
    if variant == "off":
        items.append(f"{args.stage}.ogpsa.enabled=false")
    return apply_overrides(preset(args.preset), items)


def predict(args: argparse.Namespace) -> dict:
    from ogpsa_jax.train.abstract import use_virtual_devices

    use_virtual_devices(1)
    import jax

    from ogpsa_jax import models
    from ogpsa_jax.train.cost import cost_report
    from ogpsa_jax.train.plan import plan_stage

    config = config_of(args, args.predict)
    mesh = models.make_mesh((1, 1, 1), devices=jax.devices("cpu")[:1])
    t0 = time.perf_counter()
    p = plan_stage(args.stage, config, mesh, ("step", "reference"))
    out = dict(step_peak=p.step_peak, reference_peak=p.other_peaks.get("reference", 0))
    if not args.no_cost:
        out["cost"] = cost_report(args.stage, config, mesh)
    out["predict_s"] = time.perf_counter() - t0
    return out


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from ogpsa_jax import models
    from ogpsa_jax.train.inputs import load_inputs
    from ogpsa_jax.train.sharding import place
    from ogpsa_jax.train.stage import build_stage

    config = config_of(args, args.measure)
    st = getattr(config, args.stage)
    mesh = models.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with tempfile.TemporaryDirectory() as tmp, jax.set_mesh(mesh):
        inputs = load_inputs(args.stage, config)
        stage, carry = build_stage(args.stage, config, inputs, mesh, tmp, inputs.model_path)
        rows = st.batch_size * (2 if args.stage == "dpo" else 1)
        rng = np.random.default_rng(0)
        shape = (st.accum_steps, rows, st.max_length)
        host = {
            "input_ids": rng.integers(3, 90, size=shape).astype(np.int32),  # in every vocabulary
            "attention_mask": np.ones(shape, np.int32),
            "loss_mask": np.ones(shape, np.int32),
        }
        if "ref_logps" in stage.batch_shardings:
            host["ref_logps"] = np.zeros(shape[:2], np.float32)
        batch = place(host, stage.batch_shardings)
        params, opt = carry.params, carry.opt_state
        # compiled ahead of the first execution: no compiler memory inside the measured step
        compiled = stage.step_fn.lower(params, opt, batch, stage.ref_params).compile()

        def step(params, opt):
            params, opt, metrics = compiled(params, opt, batch, stage.ref_params)
            jax.block_until_ready((params, opt, metrics))
            return params, opt

        device = jax.devices()[0]
        out: dict = {"device": device.device_kind, "platform": device.platform}
        if device.platform == "cpu":  # the first execution: nothing is pooled from before
            live = sum(x.nbytes for x in jax.live_arrays())
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            before = _rss("VmRSS")
            params, opt = step(params, opt)
            out.update(peak=_rss("VmHWM") - before + live, live_before=live)
            out["rss_after"] = _rss("VmRSS") - before
        params, opt = step(params, opt)  # warm-up
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            params, opt = step(params, opt)
            times.append(time.perf_counter() - t0)
        out["step_s"] = statistics.median(times)
        if device.platform != "cpu":
            out["peak"] = int(device.memory_stats()["peak_bytes_in_use"])
    return out


def run(args: argparse.Namespace, mode: str, variant: str) -> dict:
    env = dict(os.environ)
    if mode == "predict":
        env["JAX_PLATFORMS"] = "cpu"
    # A fixed threshold (no dynamic raise after frees) puts every buffer above it in its own
    # mapping, returned to the system when freed: the RSS then follows the live buffers (with
    # the default, a freed buffer stays in the heap and a later step's reuse of it is invisible).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")
    cmd = [sys.executable, __file__, f"--{mode}", variant, "--stage", args.stage]
    cmd += ["--preset", args.preset, "--steps", str(args.steps)]
    cmd += [x for item in args.set for x in ("--set", item)]
    cmd += ["--no-cost"] if args.no_cost else []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{mode} {variant} failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.predict or args.measure:
        out = predict(args) if args.predict else measure(args)
        print(json.dumps(out))
        return
    results = {v: {"predicted": run(args, "predict", v), "measured": run(args, "measure", v)}
               for v in VARIANTS}  # fmt: skip
    print(f"preset {args.preset} {' '.join(args.set)} stage {args.stage}")
    print("| variant | planned peak (GB) | measured peak (GB) | measured / planned | step (s) |")
    print("|---|---:|---:|---:|---:|")
    for v, r in results.items():
        p, m = r["predicted"], r["measured"]
        planned = max(p["step_peak"], p["reference_peak"])
        print(
            f"| {v} | {planned / 1e9:.3f} | {m['peak'] / 1e9:.3f} | {m['peak'] / planned:.3f} "
            f"| {m['step_s']:.4f} |"
        )
    off, on = results["off"], results["ogpsa"]
    measured = on["measured"]["step_s"] / off["measured"]["step_s"] - 1
    line = f"measured OGPSA overhead {measured:.2%} on {on['measured']['device']}"
    if not args.no_cost:
        kind = on["measured"]["device"].lower()
        hw = "h200" if "h200" in kind else "h100" if "h100" in kind else None
        if hw is not None:
            c = on["predicted"]["cost"][hw]
            line += f"; predicted (roofline, {hw}) {c['overhead']:.2%}, step {c['step_s']:.4f} s"
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
