"""Bit-equal before/after check of a behaviour-preserving change.

A set of short, fixed training runs on the embedded tiny base model (every update kind, LoRA, a critic, overlapped
rollouts, micro- and minibatches, checkpoints and resume, held-out evaluation, an environment). ``record`` runs
them and writes a fingerprint of each: the SHA-256 of every final parameter tensor and of every checkpoint file
that holds numbers (but ``rng.pt``: the global generators are never seeded, so it differs from run to run), the
``metrics.jsonl`` records without their wall-clock keys (``time/*``), and the samples' table. ``check`` runs them
again and compares bit for bit, naming the first record or tensor that differs. A metric key that the reference's
record lacks is an addition, not a change: it is named and left out of the comparison (every key the reference
has must still be there with the same value).

    .venv/bin/python scripts/bitequal.py record scripts/bitequal-reference.json
    .venv/bin/python scripts/bitequal.py check scripts/bitequal-reference.json

Runs are deterministic on one machine (CPU, one torch thread each); two go at once, one per core. They are not
across machines: the BLAS and torch's kernels take the widest vector unit the CPU has, so an AVX2 and an AVX-512
machine round differently (all 17 runs differed between the two, with the same code). The file therefore holds one
reference per kind of machine, keyed by :func:`machine_kind` (``x86_64-AVX2``, ``x86_64-AVX512`` ...); ``record``
writes this machine's and keeps the others, ``check`` compares with this machine's and says so when there is none
(record one at a commit known to be good, then check the change against it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SMALL = ["rollout.prompts_per_step=4", "rollout.group_size=4", "run.threads=1", "run.save_every=0"]

#: name -> (algo, extra --set overrides, resume: run this many steps first, then resume to the full count)
RUNS: dict[str, tuple[str, list[str], int]] = {
    "grpo": ("grpo", ["run.steps=3", "run.save_every=1"], 0),
    "grpo-resume": ("grpo", ["run.steps=3", "run.save_every=1"], 2),
    "ppo": ("ppo", ["run.steps=2"], 0),
    "isft+-": ("isft+-", ["run.steps=3"], 0),
    "isft+-adv-equiv": ("isft+-adv", ["run.steps=2", "run.equivalence=true"], 0),
    "dpo": ("dpo", ["run.steps=3"], 0),
    "lora-grpo": ("grpo", ["run.steps=3", "optim.lr=1e-2", "model.lora.enabled=true", "model.lora.rank=4",
                           "model.lora.alpha=8"], 0),
    "lora-ppo": ("ppo", ["run.steps=2", "model.lora.enabled=true", "model.lora.rank=4"], 0),
    "overlapped": ("grpo_nokl", ["run.steps=4", "rollout.max_staleness=1", "run.save_every=2"], 0),
    "overlapped-thread": ("grpo", ["run.steps=3", "rollout.max_staleness=2", "rollout.async_worker=thread"], 0),
    "dr_grpo-minibatch": ("dr_grpo", ["run.steps=2", "optim.minibatch_size=4", "optim.micro_batch_size=3",
                                      "optim.micro_batch_tokens=200", "optim.shared_prompt=true"], 0),
    "dapo": ("dapo", ["run.steps=3", "optim.skip_zero_advantage=true"], 0),
    "reinforce-eval": ("reinforce", ["run.steps=2", "run.eval_every=1", "run.eval_before=true", "run.eval_n=8",
                                     "run.eval_k=2"], 0),
    "rloo-to-go": ("rloo", ["run.steps=2", "algo.returns=to_go", "algo.credit=discounted",
                            "algo.credit_gamma=0.9"], 0),
    "process-credit": ("grpo_nokl", ["run.steps=2", "algo.credit=process", "algo.process_final=add",
                                     "algo.std_scale=none"], 0),
    "calculator-env": ("grpo_nokl", ["run.steps=2", "task.env.kind=calculator"], 0),
    "isft-": ("isft-", ["run.steps=2", "optim.schedule=cosine", "optim.warmup_steps=1"], 0),
}

VOLATILE = ("time/",)


def machine_kind() -> str:
    """The machine's architecture and the vector unit torch's CPU kernels use: what decides float rounding here."""
    import platform

    import torch

    return f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"


def load_references(file: Path) -> dict[str, dict]:
    """``{machine kind: {run: fingerprint}}`` from ``file`` (none when it does not exist)."""
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    if not isinstance(data.get("machines"), dict):
        raise SystemExit(f"{file}: not a bit-equal reference file (no 'machines' object)")
    return data["machines"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensors(file: Path) -> dict[str, str]:
    from safetensors.numpy import load_file

    return {k: _sha(v.tobytes()) for k, v in sorted(load_file(str(file)).items())}


def fingerprint(run: Path) -> dict:
    """What must not change: final parameters, checkpoint numbers, metrics (no wall clock), samples."""
    out: dict = {"final": {}, "checkpoints": {}, "metrics": [], "samples": None}
    for f in sorted((run / "final").rglob("*.safetensors")):
        out["final"][str(f.relative_to(run))] = _tensors(f)
    for f in sorted((run / "final").rglob("*.pt")):
        out["final"][str(f.relative_to(run))] = _torch_sha(f)
    for f in sorted((run / "checkpoints").rglob("*")):
        if f.suffix == ".safetensors":
            out["checkpoints"][str(f.relative_to(run))] = _tensors(f)
        elif f.suffix == ".pt" and f.name != "rng.pt":  # the global generators are never seeded (sampling and
            out["checkpoints"][str(f.relative_to(run))] = _torch_sha(f)  # shuffles use their own): no signal
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out["metrics"].append({k: v for k, v in record.items() if not k.startswith(VOLATILE)})
    samples = run / "samples.parquet"
    if samples.exists():
        import pyarrow.parquet as pq

        table = pq.read_table(samples)
        out["samples"] = _sha(json.dumps(table.to_pylist(), sort_keys=True, default=str).encode())
    return out


def _torch_sha(file: Path) -> str:
    """A digest of a torch-saved object's numbers (tensors by value, the rest by repr)."""
    import torch

    obj = torch.load(file, map_location="cpu", weights_only=False)
    h = hashlib.sha256()

    def walk(x, key=""):
        if isinstance(x, torch.Tensor):
            h.update(key.encode() + x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k], f"{key}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{key}/{i}")
        else:
            h.update(f"{key}={x!r}".encode())

    walk(obj)
    return h.hexdigest()


def _train(exe: str, algo: str, sets: list[str], out: Path, extra: list[str]) -> None:
    cmd = [exe, "train", "--algo", algo, "--out", str(out), "--no-progress", *extra]
    for s in SMALL + sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def run_one(name: str, root: Path, exe: str) -> dict:
    algo, sets, first = RUNS[name]
    out = root / name
    if first:
        steps = [s for s in sets if s.startswith("run.steps=")][0]
        early = [s for s in sets if s != steps] + [f"run.steps={first}"]
        _train(exe, algo, early, out, [])
        _train(exe, algo, sets, out, ["--resume"])
    else:
        _train(exe, algo, sets, out, [])
    return fingerprint(out)


def run_all(names: list[str], exe: str, jobs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bitequal-") as tmp, ThreadPoolExecutor(jobs) as pool:
        futures = {n: pool.submit(run_one, n, Path(tmp), exe) for n in names}
        result = {}
        for n, fut in futures.items():
            result[n] = fut.result()
            print(f"  ran {n}", file=sys.stderr)
        return result


def first_difference(a, b, path: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{path}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}/{k}: only in {'after' if k not in a else 'before'}"
            d = first_difference(a[k], b[k], f"{path}/{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} entries before, {len(b)} after"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} before, {b!r} after"


def without_new_metrics(before: dict, after: dict) -> tuple[dict, list[str]]:
    """``after`` with the metric keys that ``before``'s record of the same line lacks removed, and their names."""
    new: set[str] = set()
    records = []
    for i, rec in enumerate(after.get("metrics", [])):
        ref = before.get("metrics", [])[i] if i < len(before.get("metrics", [])) else rec
        new |= set(rec) - set(ref)
        records.append({k: v for k, v in rec.items() if k in ref})
    return {**after, "metrics": records}, sorted(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["record", "check"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--only", nargs="*", help="run these names only (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--exe", default=str(Path(sys.executable).with_name("tokenmdp")))
    args = parser.parse_args()
    names = args.only or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    kind = machine_kind()
    machines = load_references(args.file)
    if args.mode == "check" and kind not in machines:
        print(f"{args.file} has no reference for this kind of machine ({kind}; it has "
              f"{', '.join(sorted(machines)) or 'none'}): record one at a commit known to be good "
              f"(`scripts/bitequal.py record {args.file}`), then check the change against it")
        return 2
    result = run_all(names, args.exe, args.jobs)
    if args.mode == "record":  # with --only, the other runs' fingerprints of this machine's reference are kept
        if args.only:
            result = machines.get(kind, {}) | result
        machines[kind] = result
        args.file.write_text(json.dumps({"machines": machines}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(result)} runs for {kind} in {args.file}")
        return 0
    reference = machines[kind]
    print(f"reference: {kind}")
    bad = 0
    for n in names:
        if n not in reference:
            print(f"{n}: not in {args.file}")
            bad += 1
            continue
        after, added = without_new_metrics(reference[n], result[n])
        diff = first_difference(reference[n], after)
        extra = f" (new metric keys, not compared: {', '.join(added)})" if added else ""
        print(f"{n}: {'bit-equal' if diff is None else 'DIFFERS at ' + diff}{extra}")
        bad += diff is not None
    print(f"{len(names) - bad} bit-equal, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
