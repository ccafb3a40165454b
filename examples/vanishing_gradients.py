"""Vanishing gradients, measured: a tanh RNN and triton_lstm.LSTM on the adding problem.

The adding problem (Hochreiter & Schmidhuber 1997; the variant of Le et al. 2015): each step of a sequence
of length T carries a random value in [0, 1] and a marker; exactly two steps are marked, one in the first
half and one in the second, and the target is the sum of the two marked values. Predicting the mean (1.0)
scores a mean squared error of 1/6 ≈ 0.167 ("chance"); doing better needs the first marked value carried
over up to T/2 steps or more.

Both models have the same hidden size and read out a linear head from the final hidden state h_T. The
script trains each one with Adam, then plots, before and after training:

* ‖∂L/∂h_t‖ for t = 1 … T: how much of the loss's gradient reaches the hidden state at step t. It is
  measured per sequence and divided by that sequence's ‖∂L/∂h_T‖ (geometric mean over a fixed batch of
  sequences), so that the curve shows how the gradient decays back through time and not how large the
  remaining error is (a model that has solved the task has a small ∂L/∂ŷ at every step). The total
  derivative through the recurrence is taken by running the *same* module one step at a time, feeding its
  state back, and keeping each step's h_t; the script checks that this unrolled run gives the loss of the
  fused whole-sequence call that training uses.
* the learning curves (training MSE per step, smoothed) against chance.

What to expect, honestly: an untrained LSTM loses its gradient too. With PyTorch's default initialization
the forget gate's bias is zero, so f ≈ σ(0) = 0.5 and the cell state's gradient halves at every step,
about as fast as the tanh RNN's. The LSTM's advantage is that training can *open* the path: the gradient
through the cell state is multiplied by f at each step, with no weight matrix and no tanh' in between, so
once the task pushes f toward 1 the gradient reaches the early steps and the LSTM solves the task; the RNN's
gradient passes through W_hh and tanh' at every step and stays vanished. ``--forget-bias 1`` (Gers et al.
2000; Jozefowicz et al. 2015) starts the LSTM with f ≈ 0.73 instead; the default keeps PyTorch's init.

Runs:
    python examples/vanishing_gradients.py                      # CPU preset: T = 50, about 1.5 minutes
    python examples/vanishing_gradients.py --device cuda        # full size: T = 1000

The CUDA preset has not been run by the author of this script (no GPU was at hand): whether the LSTM learns
T = 1000 within its 4000 steps with the default forget-gate bias is for that run's plot to say.
Writes the PNG (``--out``) and, beside it, a JSON file with every number the plot shows.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import triton_lstm

# Presets per device: (sequence length, hidden size, batch size, training steps, learning rate).
PRESETS = {
    "cpu": dict(seq_len=50, hidden=64, batch=64, steps=1000, lr=1e-2),
    "cuda": dict(seq_len=1000, hidden=128, batch=128, steps=4000, lr=3e-3),
}
CHANCE_MSE = 1.0 / 6.0  # the variance of the target: the MSE of always answering its mean, 1.0


def adding_problem(batch: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Returns ``x`` (T, B, 2): values and markers, and ``y`` (B,): the sum of the two marked values."""
    values = torch.rand(seq_len, batch, generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, seq_len, (batch,), generator=generator)
    markers = torch.zeros(seq_len, batch)
    columns = torch.arange(batch)
    markers[first, columns] = 1.0
    markers[second, columns] = 1.0
    target = values[first, columns] + values[second, columns]
    return torch.stack([values, markers], dim=2), target


class Regressor(nn.Module):
    """A recurrent layer over the sequence and a linear head on its final hidden state."""

    def __init__(self, kind: str, hidden: int, forget_bias: float = 0.0):
        super().__init__()
        self.kind = kind
        if kind == "lstm":
            self.rnn = triton_lstm.LSTM(2, hidden)
            if forget_bias:
                with torch.no_grad():
                    # Gate order is i, f, g, o; the kernel adds b_ih + b_hh, so set it on one of them.
                    self.rnn.bias_ih_l0[hidden : 2 * hidden] += forget_bias
        elif kind == "rnn":
            self.rnn = nn.RNN(2, hidden, nonlinearity="tanh")
        else:
            raise ValueError(f"kind must be 'lstm' or 'rnn', got {kind!r}")
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, state = self.rnn(x)
        h_last = state[0] if self.kind == "lstm" else state
        return self.head(h_last[-1]).squeeze(-1)

    def unrolled(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The same forward, one step per call; returns the prediction and every h_t (t = 1 … T)."""
        batch, hidden = x.shape[1], self.rnn.hidden_size
        h = x.new_zeros(1, batch, hidden)
        c = x.new_zeros(1, batch, hidden)
        hs = []
        for t in range(x.shape[0]):
            if self.kind == "lstm":
                _, (h, c) = self.rnn(x[t : t + 1], (h, c))
            else:
                _, h = self.rnn(x[t : t + 1], h)
            h.retain_grad()
            hs.append(h)
        return self.head(h[-1]).squeeze(-1), hs


def gradient_through_time(model: Regressor, x: Tensor, y: Tensor) -> dict:
    """‖∂L/∂h_t‖ / ‖∂L/∂h_T‖ per step (geometric mean over the batch), and the raw batch-mean norms.

    Measured on a float64 copy of the model: in float32 a gradient below ~1e-38 underflows to zero, and
    a vanished gradient is exactly what is being measured. (float64 runs triton_lstm's reference path.)
    """
    with torch.no_grad():
        fused_loss = ((model(x) - y) ** 2).mean().item()
    model = copy.deepcopy(model).double()
    x, y = x.double(), y.double()
    prediction, hs = model.unrolled(x)
    # Summed, not averaged, so that each sequence's gradient is its own loss's: ∂L_b/∂h_t^b.
    ((prediction - y) ** 2).sum().backward()
    norms = torch.stack([h.grad[0].norm(dim=1) for h in hs])  # (T, B)
    unrolled_loss = ((prediction.detach() - y) ** 2).mean().item()
    tiny = torch.finfo(norms.dtype).tiny  # a norm that underflowed to 0 is plotted at the floor, not dropped
    log_ratio = torch.log(norms.clamp_min(tiny)) - torch.log(norms[-1].clamp_min(tiny))
    return {
        "relative": log_ratio.mean(dim=1).exp().tolist(),
        "raw_mean": norms.mean(dim=1).tolist(),
        "loss_fused": fused_loss,
        "loss_unrolled": unrolled_loss,
    }


def train(model: Regressor, args, generator: torch.Generator, device: torch.device) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    for _ in range(args.steps):
        x, y = adding_problem(args.batch, args.seq_len, generator)
        x, y = x.to(device), y.to(device)
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Clipping keeps an exploding RNN step from wrecking the run; it cannot revive a vanished gradient.
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"rnn": "tab:red", "lstm": "tab:blue"}
    labels = {"rnn": "nn.RNN (tanh)", "lstm": "triton_lstm.LSTM"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    steps = range(1, args.seq_len + 1)
    floor = None
    for ax, when in zip(axes[:2], ("before", "after")):
        for kind in ("rnn", "lstm"):
            ax.semilogy(steps, results[kind][f"grad_{when}"]["relative"], color=colors[kind], label=labels[kind])
        ax.set_title(f"{when} training")
        ax.set_xlabel("time step t (the loss is read at t = T)")
        ax.set_ylabel("‖∂L/∂h_t‖ / ‖∂L/∂h_T‖  (geo. mean over batch)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower right")
        low, _ = ax.get_ylim()
        floor = low if floor is None else min(floor, low)
    for ax in axes[:2]:
        ax.set_ylim(bottom=max(floor, 1e-40), top=10.0)
    ax = axes[2]
    window = max(1, args.steps // 50)
    for kind in ("rnn", "lstm"):
        ax.plot(smooth(results[kind]["losses"], window), color=colors[kind], label=labels[kind])
    ax.axhline(CHANCE_MSE, color="gray", linestyle="--", label="chance (always 1.0)")
    ax.set_yscale("log")
    ax.set_title(f"learning curves (moving average of {window})")
    ax.set_xlabel("training step")
    ax.set_ylabel("training MSE")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower left")
    fig.suptitle(
        f"Adding problem, T = {args.seq_len}, hidden = {args.hidden}, batch = {args.batch}, "
        f"{args.steps} Adam steps, lr = {args.lr}, seed = {args.seed}, forget bias +{args.forget_bias:g}, "
        f"device = {args.device}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (small preset) or cuda (T = 1000)")
    parser.add_argument("--seq-len", type=int, help="sequence length T (preset: 50 on CPU, 1000 on CUDA)")
    parser.add_argument("--hidden", type=int, help="hidden size of both models")
    parser.add_argument("--batch", type=int, help="sequences per training step")
    parser.add_argument("--steps", type=int, help="training steps per model")
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--eval-batch", type=int, default=256, help="sequences for the gradient measurement")
    parser.add_argument(
        "--forget-bias", type=float, default=0.0, help="added to the LSTM forget-gate bias (0: PyTorch's init)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for small sizes, busy machines)")
    parser.add_argument(
        "--out", type=Path, default=Path("vanishing_gradients.png"), help="PNG to write; the JSON goes beside it"
    )
    args = parser.parse_args(argv)
    preset = PRESETS["cuda" if args.device.startswith("cuda") else "cpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    eval_x, eval_y = adding_problem(args.eval_batch, args.seq_len, torch.Generator().manual_seed(args.seed + 1))
    eval_x, eval_y = eval_x.to(device), eval_y.to(device)
    for kind in ("rnn", "lstm"):
        torch.manual_seed(args.seed)
        model = Regressor(kind, args.hidden, args.forget_bias if kind == "lstm" else 0.0).to(device)
        start = time.perf_counter()
        before = gradient_through_time(model, eval_x, eval_y)
        losses = train(model, args, torch.Generator().manual_seed(args.seed + 2), device)
        after = gradient_through_time(model, eval_x, eval_y)
        seconds = time.perf_counter() - start
        tail = losses[-max(1, args.steps // 10) :]
        results[kind] = {
            "grad_before": before,
            "grad_after": after,
            "losses": losses,
            "final_train_mse": sum(tail) / len(tail),
            "eval_mse": after["loss_fused"],
            "seconds": seconds,
        }
        for when, grad in (("before", before), ("after", after)):
            if not math.isclose(grad["loss_fused"], grad["loss_unrolled"], rel_tol=1e-3, abs_tol=1e-6):
                raise RuntimeError(
                    f"{kind} {when}: the unrolled run's loss {grad['loss_unrolled']} differs from the fused "
                    f"call's {grad['loss_fused']}; the gradient measurement would not be of the trained model"
                )
        print(
            f"{kind:4s}  eval MSE {after['loss_fused']:.4f} (chance {CHANCE_MSE:.4f})  "
            f"‖∂L/∂h_1‖/‖∂L/∂h_T‖ before {before['relative'][0]:.2e}, "
            f"after {after['relative'][0]:.2e}  "
            f"[{seconds:.1f} s]",
            flush=True,
        )
    plot(results, args, args.out)
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out} and {json_path}")
    return results


if __name__ == "__main__":
    main()
