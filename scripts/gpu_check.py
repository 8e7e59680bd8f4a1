"""The suite's GPU paths in one run (called by scripts/gpu_check.sh; see its header).

Writes ``<out>/gpu_check.json`` (everything measured) and ``<out>/gpu_check.md`` (the
tables for the README).  Every part runs the suite's own commands in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ("fm", "meanflow", "imf", "shortcut", "scm")


def sh(args: list[str], timeout: int) -> tuple[int, str, float]:
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - tic


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|") or line.startswith("step cost")]


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    report: dict = {"device": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "parts": {}}
    md = [f"GPU check on {report['device']} (x{gpus}), torch {torch.__version__}, CUDA {torch.version.cuda}", ""]

    # 1. step cost at DiT-B/2 on 4x32x32 latents, bf16, eager and compiled
    for compiled in (False, True):
        name = "stepcost_bf16" + ("_compiled" if compiled else "")
        code, text, secs = sh(["-m", "benchmark.stepcost", "--model", "dit-b", "--shape", "4,32,32", "--batch", "64",
                               "--device", "cuda", "--precision", "bf16", "--steps", "10", "--rounds", "2",
                               *(["--compile"] if compiled else [])], timeout=240)
        report["parts"][name] = {"code": code, "seconds": secs, "table": table_lines(text) or text[-2000:]}
        md += [f"### {name} ({secs:.0f} s)", "", *(table_lines(text) or [f"failed: {text.strip().splitlines()[-1:]}"]), ""]

    # 2. 200-step training of every method on CIFAR-shaped synthetic data, peak memory
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        import numpy as np

        rng = np.random.default_rng(0)
        np.savez(Path(folder) / "train-00000.npz", latents=rng.standard_normal((2048, 3, 32, 32), dtype=np.float32),
                 labels=rng.integers(0, 10, 2048))
        common = ["data=latents", f"data.root={folder}", "eval.extractor=pixels", "eval.num_samples=500",
                  "model=dit-s", "train.steps=200", "train.batch_size=128", "train.device=cuda",
                  "train.precision=bf16", "train.progress=false", "tracking.enabled=false",
                  f"results_dir={folder}/results"]
        code, text, secs = sh(["-m", "benchmark.run", f"method={','.join(METHODS)}", "nfe=1", *common], timeout=300)
        rows = [json.loads(p.read_text()) for p in Path(folder, "results").glob("runs/*/evals/*.json")]
        report["parts"]["train200"] = {"code": code, "seconds": secs, "tail": text[-1500:],
                                       "runs": [{"method": r["method"], "train_seconds": r["train_seconds"],
                                                 "flops": r.get("flops")} for r in rows]}
        md += [f"### 200 training steps per method, DiT-S/2, 3x32x32, batch 128, bf16 ({secs:.0f} s, exit {code})", "",
               "| method | train s | ms/step | train TFLOP |", "|---|---|---|---|"]
        md += [f"| {r['method']} | {r['train_seconds']:.1f} | {1000 * r['train_seconds'] / 200:.1f} | "
               f"{r['flops']['train_total'] / 1e12:.1f} |" for r in rows]
        md.append("")

        # 3. two-process NCCL data parallelism equals one process with the same micro-batches
        if gpus >= 2:
            ddp = ["-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "benchmark.run", "method=meanflow",
                   "nfe=1", "train.micro_batches=2", *[c for c in common if not c.startswith("results_dir")]]
            c2, t2, _ = sh([*ddp, f"results_dir={folder}/ddp"], timeout=300)
            c1, t1, _ = sh(["-m", "benchmark.run", "method=meanflow", "nfe=1", "train.micro_batches=2",
                            *[c for c in common if not c.startswith("results_dir")], f"results_dir={folder}/one"],
                           timeout=300)
            finals = [torch.load(next(Path(folder, d).glob("runs/*/final.pt")), weights_only=True)["net"]
                      for d in ("ddp", "one")]
            diff = max(float((finals[0][k].float() - finals[1][k].float()).abs().max()) for k in finals[0])
            report["parts"]["ddp"] = {"codes": [c2, c1], "max_abs_weight_difference": diff}
            md += [f"2-process NCCL vs 1 process (micro_batches=2, MeanFlow 200 steps): max |weight difference| "
                   f"{diff:.2e}", ""]
        else:
            report["parts"]["ddp"] = "skipped: one GPU"
            md += ["2-process NCCL check skipped: one GPU.", ""]
    report["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    failed = [k for k, v in report["parts"].items() if isinstance(v, dict) and v.get("code", 0)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check")))
