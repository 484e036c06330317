"""W3: many registered clients. The engine as a user runs it (`run.py`, a real subprocess) vs a
plain PyTorch process of the same work, alternating, with the process tree's peak memory.

Workload: 100,000 clients x 32 training samples (LEAF synthetic, 40 per client before the
test split), 64 features, 10 classes, W1's MLP 64-128-10, 1000 clients per round, 1 local
epoch of batch 16, 5 rounds (configs/w1.yaml with overrides). The reference holds every
client's data in one [100000, 32, 64] float32 tensor and steps the round's 1000 sampled
clients together with vmap(grad(loss)).

    python benchmarks/w3.py [--clients N] [--repeats R]

Prints, for each side, seconds per round (median of rounds 2-5), total wall from process
start to exit, and the peak resident memory of the whole process tree (Ray workers
included), then the engine / reference ratios. Run it alone: it uses both cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGE = 4096


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and every process below it, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        rss[int(entry.name)] = int(fields[21]) * PAGE  # field 24 of stat: rss in pages
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run `cmd`; its wall time, the peak resident memory of its process tree (sampled every
    20 ms), and its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err[-2000:]}")
    return wall, peak, out


def engine_command(clients: int, rounds: int, logs: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), str(ROOT / "configs" / "w1.yaml"),
            f"population.num_clients={clients}", "task.synthetic.samples_per_client=40",
            "population.participation.clients_per_round=1000", f"rounds={rounds}",
            "eval_every=0", "--no-progress", "--log-dir", logs, "--checkpoint-every", "0"]


def engine_rounds(logs: str) -> list[float]:
    from engine.records.logs import read_table

    rounds = read_table(Path(logs) / "w1", "rounds").sort_by("round")
    return [float(v) for v in rounds["round_wall_s"].to_numpy()]


def reference(clients: int, rounds: int) -> None:
    """The plain process (run as a subprocess of this script): prints its per-round seconds
    as JSON."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.func import functional_call, grad, vmap

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    per, features, classes, k, batch, lr = 32, 64, 10, 1000, 16, 0.05
    x = torch.randn(clients, per, features, generator=g)
    y = torch.randint(0, classes, (clients, per), generator=g)
    model = nn.Sequential(nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, classes))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(w, xb, yb):  # parameters as a dict of tensors: 4x faster under vmap than flat
        return F.cross_entropy(functional_call(model, w, (xb,)), yb)

    step = vmap(grad(loss))
    rng = np.random.default_rng(0)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        chosen = torch.from_numpy(np.sort(rng.choice(clients, k, replace=False)))
        xs, ys = x[chosen], y[chosen]
        perm = torch.argsort(torch.rand(k, per, generator=g), dim=1)
        w = {name: p.expand(k, *p.shape).clone() for name, p in params.items()}
        for b in range(0, per, batch):
            idx = perm[:, b:b + batch]
            xb = torch.gather(xs, 1, idx[:, :, None].expand(-1, -1, features))
            grads = step(w, xb, torch.gather(ys, 1, idx))
            w = {name: w[name] - lr * grads[name] for name in w}
        params = {name: w[name].mean(dim=0) for name in w}
        times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="alternating engine/reference runs")
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reference:
        reference(args.clients, args.rounds)
        return 0
    sides: dict[str, list[tuple[float, float, int]]] = {"reference": [], "engine": []}
    for i in range(args.repeats):
        wall, peak, out = measured([sys.executable, __file__, "--reference",
                                    "--clients", str(args.clients), "--rounds",
                                    str(args.rounds)])
        per_round = float(np.median(json.loads(out)[1:]))
        sides["reference"].append((per_round, wall, peak))
        with tempfile.TemporaryDirectory() as logs:
            wall, peak, _ = measured(engine_command(args.clients, args.rounds, logs))
            per_round = float(np.median(engine_rounds(logs)[1:]))
        sides["engine"].append((per_round, wall, peak))
        print(f"  repeat {i + 1}: " + "  ".join(
            f"{name} {v[-1][0]:.3f} s/round, {v[-1][1]:.1f} s, {v[-1][2] / 2**30:.2f} GB"
            for name, v in sides.items()), flush=True)
    med = {name: [float(np.median([r[j] for r in v])) for j in range(3)]
           for name, v in sides.items()}
    print(f"W3: {args.clients:,} clients x 32 samples, 1000 per round, {args.rounds} rounds "
          f"(median of {args.repeats})")
    print(f"  {'':<28}{'reference':>12}{'engine':>12}{'ratio':>8}")
    for j, (label, unit, scale) in enumerate([("seconds per round (2..)", "s", 1.0),
                                              ("total wall, start to exit", "s", 1.0),
                                              ("peak memory, process tree", "GB", 2**30)]):
        ref, eng = med["reference"][j] / scale, med["engine"][j] / scale
        print(f"  {label:<28}{ref:>10.3f}{unit:>2}{eng:>10.3f}{unit:>2}{eng / ref:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
