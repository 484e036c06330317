"""W3: many registered clients. The engine as a user runs it (`run.py`, a real subprocess) vs a
plain PyTorch process of the same work, alternating, with the process tree's peak memory.

Workload: 100,000 clients x 32 training samples (LEAF synthetic, 40 per client before the
test split), 64 features, 10 classes, W1's MLP 64-128-10, 1000 clients per round, 1 local
epoch of batch 16, 5 rounds (configs/w1.yaml with overrides). The reference holds every
client's data in one [100000, 32, 64] float32 tensor and steps the round's 1000 sampled
clients together with vmap(grad(loss)).

    python benchmarks/w3.py [--clients N] [--repeats R]

Prints, for each side, seconds per round (median of rounds 2-5), total wall from process
start to exit, and the peak memory of the whole process tree (Ray workers included) as PSS
(a shared page counted once) and as the sum of RSS, then the engine / reference ratios.
The engine's client data store is built once first (its own line) in a private cache, as a
user's first run would, and every timed run reads it. Run it alone: it uses both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def _tree(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def _memory(pids: list[int]) -> tuple[int, int]:
    """(PSS, RSS) summed over `pids`, in bytes: PSS counts a page shared by n processes
    (the memory-mapped store, torch's libraries, Ray's object store) 1/n in each, so the sum
    is the memory the tree uses; RSS counts it in every process."""
    pss = rss = 0
    for p in pids:
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return pss, rss


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, int, str]:
    """Run `cmd`; its wall time, the peak PSS and RSS of its process tree (sampled every
    50 ms), and its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    peak, done = [0, 0], threading.Event()

    def sample():
        while not done.is_set():
            pss, rss = _memory(_tree(proc.pid))
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err[-2000:]}")
    return wall, peak[0], peak[1], out


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
    cache = tempfile.mkdtemp(prefix="w3-data-")  # the engine's client data store
    env = {**os.environ, "CONCORD_DATA_CACHE": cache}
    try:
        with tempfile.TemporaryDirectory() as logs:  # builds the store; later runs read it
            build_wall, build_pss, _, out = measured(engine_command(args.clients, 1, logs), env)
        built = re.search(r"data: built in ([0-9.]+) s", out)
        sides: dict[str, list[tuple[float, ...]]] = {"reference": [], "engine": []}
        for i in range(args.repeats):
            wall, pss, rss, out = measured([sys.executable, __file__, "--reference",
                                            "--clients", str(args.clients), "--rounds",
                                            str(args.rounds)])
            sides["reference"].append((float(np.median(json.loads(out)[1:])), wall, pss, rss))
            with tempfile.TemporaryDirectory() as logs:
                wall, pss, rss, _ = measured(engine_command(args.clients, args.rounds, logs),
                                             env)
                sides["engine"].append((float(np.median(engine_rounds(logs)[1:])), wall, pss,
                                        rss))
            print(f"  repeat {i + 1}: " + "  ".join(
                f"{name} {v[-1][0]:.3f} s/round, {v[-1][1]:.1f} s, {v[-1][2] / 2**30:.2f} GB"
                for name, v in sides.items()), flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    med = {name: [float(np.median([r[j] for r in v])) for j in range(4)]
           for name, v in sides.items()}
    print(f"W3: {args.clients:,} clients x 32 samples, 1000 per round, {args.rounds} rounds "
          f"(median of {args.repeats})")
    print(f"  {'':<30}{'reference':>12}{'engine':>12}{'ratio':>8}")
    for j, (label, unit, scale) in enumerate([("seconds per round (2..)", "s", 1.0),
                                              ("total wall, start to exit", "s", 1.0),
                                              ("peak memory, tree (PSS)", "GB", 2**30),
                                              ("peak memory, tree (RSS sum)", "GB", 2**30)]):
        ref, eng = med["reference"][j] / scale, med["engine"][j] / scale
        print(f"  {label:<30}{ref:>10.3f}{unit:>2}{eng:>10.3f}{unit:>2}{eng / ref:>7.2f}x")
    print(f"  engine's data store, built once before the runs above: "
          f"{built.group(1) if built else '?'} s (that run: {build_wall:.1f} s, peak PSS "
          f"{build_pss / 2**30:.2f} GB); each run above read it from the cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
