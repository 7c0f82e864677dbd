"""How fast and how lean growing is, against building the target from scratch.

Measured on a GPT-2-shaped Pre-LN decoder (``lemon_fx.cli.demo.TinyGPT`` with a tied
head): growing GPT-2 small's shape (12 x 768, vocab 50257, 124M parameters) to GPT-2
medium's (24 x 1024, 355M) with ``lemon_fx.grow``, against building that target with
PyTorch's default initialization. Each side runs in a fresh process (a build timed after
a large growth in the same process runs several times slower), best of ``--runs``:

- ``time``: seconds of ``grow(gm, plan)`` (tracing excluded: it is done once per source)
  over seconds of ``TinyGPT(target config)``;
- ``memory``: the peak resident memory added during growth (Linux ``VmHWM`` reset
  before it) over the target's parameter bytes;
- ``planning``: trace + ``plan_growth`` of a weightless (meta-device) model at 12, 24 and
  48 blocks, seconds per graph node (linear growth keeps it flat);
- ``--stream``: a ~1.3B-parameter target (24 x 2048) grown on disk from a 200M source
  written first as bfloat16 shards with an index (not timed), planned on the meta device;
  peak resident memory of the growth and its seconds.

    python tools/bench_grow.py                  # float32, 5 runs each side
    python tools/bench_grow.py --dtype bfloat16
    python tools/bench_grow.py --quick          # tiny shapes, one run (a smoke test)
    python tools/bench_grow.py --stream         # the streamed ~1.3B growth
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPT2_SMALL = {"vocab": 50257, "dim": 768, "depth": 12, "num_heads": 12, "max_len": 1024}
GPT2_MEDIUM = {"vocab": 50257, "dim": 1024, "depth": 24, "num_heads": 16, "max_len": 1024}
STREAM_SOURCE = {"vocab": 50257, "dim": 1024, "depth": 12, "num_heads": 16, "max_len": 1024}
STREAM_TARGET = {"vocab": 50257, "dim": 2048, "depth": 24, "num_heads": 32, "max_len": 1024}
QUICK_SOURCE = {"vocab": 512, "dim": 64, "depth": 2, "num_heads": 4, "max_len": 64}
QUICK_TARGET = {"vocab": 512, "dim": 96, "depth": 4, "num_heads": 6, "max_len": 64}


def _memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS


def _model(config: dict, dtype, device: str = "cpu"):
    import torch

    from lemon_fx.cli.demo import TinyGPT

    with torch.device(device):
        model = TinyGPT(mlp_ratio=4, **config)
    model.head.weight = model.wte.weight  # GPT-2 ties its head to the embedding
    return model.to(dtype)


def _plan(source: dict, target: dict):
    import lemon_fx

    return lemon_fx.Plan(width={"@residual": target["dim"], "@ffn": 4 * target["dim"],
                                "@heads": target["num_heads"]},
                         depth={"blocks": target["depth"]}, seed=0)


def _child(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    import lemon_fx

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    source, target = json.loads(args.source), json.loads(args.target)
    if args.child == "build":
        _reset_peak()
        before = _memory()["VmRSS"]
        start = time.perf_counter()
        model = _model(target, dtype)
        seconds = time.perf_counter() - start
        peak = _memory()["VmHWM"] - before
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        return {"seconds": seconds, "peak_extra": peak, "target_bytes": params}
    if args.child == "grow":
        model = _model(source, dtype)
        ids = torch.randint(0, source["vocab"], (1, 8))
        gm = lemon_fx.trace(model, (ids,))
        del model
        _reset_peak()
        before = _memory()["VmRSS"]
        start = time.perf_counter()
        big = lemon_fx.grow(gm, _plan(source, target))
        seconds = time.perf_counter() - start
        peak = _memory()["VmHWM"] - before
        params = sum(p.numel() * p.element_size() for p in big.parameters())
        return {"seconds": seconds, "peak_extra": peak, "target_bytes": params}
    if args.child == "plan":
        config = dict(source, depth=args.depth)
        model = _model(config, dtype, device="meta")
        start = time.perf_counter()
        gm = lemon_fx.trace(model, (torch.randint(0, config["vocab"], (1, 8)),))
        recipe = lemon_fx.plan_growth(gm, _plan(config, dict(target, depth=2 * args.depth)))
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "nodes": len(gm.graph.nodes),
                "tensors": len(recipe.tensors)}
    if args.child == "stream":
        import tempfile

        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="bench_grow_", dir=args.scratch) as tmp:
            folder = Path(tmp)
            model = _model(source, dtype)
            state = {k: v.contiguous() for k, v in model.state_dict().items()
                     if k != "head.weight"}  # the tied head is the embedding
            del model
            names, weight_map = list(state), {}
            for i in range(4):
                file = f"model-{i + 1:05d}-of-00004.safetensors"
                save_file({n: state[n] for n in names[i::4]}, folder / file)
                weight_map.update(dict.fromkeys(names[i::4], file))
            (folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}))
            del state
            weightless = _model(source, dtype, device="meta")
            gm = lemon_fx.trace(weightless, (torch.randint(0, source["vocab"], (1, 8)),))
            recipe = lemon_fx.plan_growth(gm, _plan(source, target))
            _reset_peak()
            before = _memory()["VmRSS"]
            start = time.perf_counter()
            recipe.apply_safetensors(folder, folder / "grown", progress=False)
            seconds = time.perf_counter() - start
            peak = _memory()["VmHWM"]
            values = sum(torch.Size(s).numel() for s, _ in recipe.shapes.values())
            return {"seconds": seconds, "peak": peak, "peak_extra": peak - before,
                    "target_values": values}
    raise ValueError(args.child)


def _run_child(kind: str, args: argparse.Namespace, source: dict, target: dict,
               depth: int = 0) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--dtype", args.dtype,
               "--source", json.dumps(source), "--target", json.dumps(target),
               "--depth", str(depth), "--threads", str(args.threads)]
    if getattr(args, "scratch", None):
        command += ["--scratch", args.scratch]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _best_pair(args: argparse.Namespace, source: dict, target: dict) -> tuple[dict, dict]:
    """Best of ``args.runs`` for each side, the two sides interleaved (build, grow, build,
    ...) so that a slow spell of a shared machine falls on both."""
    runs = {"build": [], "grow": []}
    for _ in range(args.runs):
        for kind in runs:
            runs[kind].append(_run_child(kind, args, source, target))
    return tuple({"seconds": min(r["seconds"] for r in found),
                  "peak_extra": min(r["peak_extra"] for r in found),
                  "target_bytes": found[0]["target_bytes"]} for found in runs.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one run")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--stream", action="store_true",
                        help="the streamed ~1.3B growth (writes ~3 GB of shards)")
    parser.add_argument("--scratch", default=None, help="folder for --stream's shards")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    if args.stream:
        args.dtype = "bfloat16"
        result = _run_child("stream", args, STREAM_SOURCE, STREAM_TARGET)
        print(f"streamed growth {STREAM_SOURCE['depth']}x{STREAM_SOURCE['dim']} -> "
              f"{STREAM_TARGET['depth']}x{STREAM_TARGET['dim']} (bfloat16 shards, "
              f"{result['target_values'] / 1e9:.2f}B values): {result['seconds']:.1f} s, "
              f"peak resident memory {result['peak'] / 2**30:.2f} GiB "
              f"(+{result['peak_extra'] / 2**30:.2f} GiB during the growth)")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    source, target = (QUICK_SOURCE, QUICK_TARGET) if args.quick else (GPT2_SMALL, GPT2_MEDIUM)
    if args.quick:
        args.runs = 1
    build, grow = _best_pair(args, source, target)
    depths = (2, 4, 8) if args.quick else (12, 24, 48)
    planning = [dict(_run_child("plan", args, source, target, depth=d), depth=d)
                for d in depths]
    results = {
        "dtype": args.dtype, "source": source, "target": target, "runs": args.runs,
        "build_seconds": build["seconds"], "grow_seconds": grow["seconds"],
        "time_ratio": grow["seconds"] / build["seconds"],
        "target_bytes": grow["target_bytes"], "grow_peak_extra": grow["peak_extra"],
        "memory_ratio": grow["peak_extra"] / grow["target_bytes"],
        "planning": planning,
    }
    print(f"growth {source['depth']}x{source['dim']} -> {target['depth']}x{target['dim']} "
          f"({args.dtype}, best of {args.runs}, each in a fresh process)")
    print(f"  build target  {build['seconds']:8.2f} s")
    print(f"  grow          {grow['seconds']:8.2f} s   time ratio   "
          f"{results['time_ratio']:.2f}x")
    print(f"  peak extra    {grow['peak_extra'] / 2**30:8.2f} GiB for "
          f"{grow['target_bytes'] / 2**30:.2f} GiB of target weights: memory ratio "
          f"{results['memory_ratio']:.2f}x")
    for p in planning:
        print(f"  plan {p['depth']:3d} blocks (meta)  {p['seconds']:6.2f} s  {p['nodes']:5d} "
              f"nodes  {1e3 * p['seconds'] / p['nodes']:.2f} ms/node")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
