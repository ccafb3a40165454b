"""A character-level language model on *Alice's Adventures in Wonderland*, trained with triton_lstm.LSTM.

Embedding -> LSTM -> Linear over the 70-odd characters of the text (examples/data/alice29.txt; its
provenance and license are in examples/data/README.md). Training draws random windows of the first 90% of
the text; the last 10% is held out for the validation loss. On a GPU the model trains under bf16 autocast
(the weights stay fp32), on CPU in fp32.

Each run shows a tqdm progress bar, logs the loss of every step to ``<out-dir>/log_<impl>.csv``, writes a
sample of generated text to ``<out-dir>/sample_<impl>.txt`` and its numbers to ``summary_<impl>.json``.

``--impl nn`` trains the same model with torch.nn.LSTM (the same initial weights and batches: both modules
draw their parameters the same way), and ``--impl both`` runs the two one after the other and prints their
losses and tokens per second side by side. ``--cell gru`` does all of it with triton_lstm.GRU and nn.GRU
instead. On CPU, triton_lstm runs ATen's LSTM (as nn.LSTM does), so its CPU speed says nothing about the
kernels: compare speed on a GPU.

Runs:
    python examples/char_lm.py                                   # CPU: a few minutes
    python examples/char_lm.py --device cuda --impl both         # GPU, bf16: triton_lstm vs cuDNN
    python examples/char_lm.py --device cuda --impl both --cell gru   # the same with GRUs
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

import triton_lstm

DATA = Path(__file__).resolve().parent / "data" / "alice29.txt"

# Presets per device: model and training sizes.
PRESETS = {
    "cpu": dict(embed=64, hidden=256, layers=1, seq_len=100, batch=32, steps=300, lr=3e-3, dtype="fp32"),
    "cuda": dict(embed=128, hidden=512, layers=2, seq_len=256, batch=64, steps=2000, lr=2e-3, dtype="bf16"),
}
# (implementation, cell) -> the recurrent module
MODULES = {("triton", "lstm"): triton_lstm.LSTM, ("nn", "lstm"): nn.LSTM,
           ("triton", "gru"): triton_lstm.GRU, ("nn", "gru"): nn.GRU}


def load_text(path: Path) -> str:
    # The corpus file is kept byte for byte as shipped (DOS line ends and a trailing ^Z end-of-file mark).
    return path.read_text(encoding="ascii").replace("\r\n", "\n").rstrip("\x1a")


class Vocabulary:
    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


class CharLM(nn.Module):
    def __init__(self, rnn_class, vocab_size: int, embed: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.rnn = rnn_class(embed, hidden, num_layers=layers, batch_first=True)  # an LSTM's or a GRU's
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, ids: Tensor, state=None):
        out, state = self.rnn(self.embed(ids), state)
        return self.head(out), state


def random_windows(data: Tensor, batch: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=generator)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: CharLM, data: Tensor, args, device: torch.device) -> float:
    """Mean cross-entropy (nats per character) over consecutive windows of ``data``."""
    model.eval()
    usable = (data.numel() - 1) // args.seq_len * args.seq_len
    inputs = data[:usable].view(-1, args.seq_len)
    targets = data[1 : usable + 1].view(-1, args.seq_len)
    total, count = 0.0, 0
    chunk = max(args.batch, 256)  # no gradients are kept, so evaluate more windows at once than in training
    for start in range(0, inputs.shape[0], chunk):
        x, y = inputs[start : start + chunk].to(device), targets[start : start + chunk].to(device)
        with autocast(device, args.dtype):
            logits, _ = model(x)
        total += nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


@torch.no_grad()
def generate(model: CharLM, vocab: Vocabulary, prompt: str, length: int, args, device: torch.device) -> str:
    """Samples ``length`` characters after ``prompt``, one recurrent step per character, carrying the state."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    ids = vocab.encode(prompt).to(device)[None]
    out = []
    with autocast(device, args.dtype):
        logits, state = model(ids)
        for _ in range(length):
            probs = torch.softmax(logits[0, -1].float() / args.temperature, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
            out.append(next_id.item())
            logits, state = model(next_id[None], state)
    model.train()
    return prompt + vocab.decode(out)


def versions() -> dict:
    found = {"torch": torch.__version__, "triton_lstm": triton_lstm.__version__}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = None
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda
    return found


def train_one(impl: str, args, text: str, vocab: Vocabulary, device: torch.device) -> dict:
    data = vocab.encode(text)
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]

    torch.manual_seed(args.seed)
    rnn_class = MODULES[impl, args.cell]
    model = CharLM(rnn_class, len(vocab), args.embed, args.hidden, args.layers).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed + 1)
    tokens_per_step = args.batch * args.seq_len
    # The first steps compile Triton kernels and warm up caches: they are left out of tokens/s.
    warmup = min(10, args.steps // 5)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.out_dir / f"log_{impl}.csv"
    losses, step_seconds = [], []
    with open(log_path, "w", newline="") as log_file:
        log = csv.writer(log_file)
        log.writerow(["step", "loss", "tokens_per_s", "seconds"])
        bar = tqdm(range(1, args.steps + 1), desc=f"{impl:6s}", disable=args.no_progress, file=sys.stderr)
        for step in bar:
            x, y = random_windows(train_data, args.batch, args.seq_len, generator)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, args.dtype):
                logits, _ = model(x)
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss_value = loss.item()  # synchronizes
            seconds = time.perf_counter() - start
            losses.append(loss_value)
            step_seconds.append(seconds)
            log.writerow([step, f"{loss_value:.5f}", f"{tokens_per_step / seconds:.1f}", f"{seconds:.5f}"])
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}")
            if args.log_every and step % args.log_every == 0:
                tqdm.write(f"[{impl}] step {step:5d}  loss {loss_value:.4f}")
        bar.close()

    timed = step_seconds[warmup:] or step_seconds
    tokens_per_s = tokens_per_step * len(timed) / sum(timed)
    val_loss = evaluate(model, val_data, args, device)
    sample = generate(model, vocab, args.prompt, args.sample_len, args, device)
    (args.out_dir / f"sample_{impl}.txt").write_text(sample + "\n")
    tail = losses[-max(1, args.steps // 10) :]
    summary = {
        "impl": impl,
        "module": f"{rnn_class.__module__}.{rnn_class.__name__}",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions(),
        "first_loss": losses[0],
        "final_train_loss": sum(tail) / len(tail),
        "val_loss": val_loss,
        "val_bits_per_char": val_loss / math.log(2),
        "tokens_per_s": tokens_per_s,
        "train_seconds": sum(step_seconds),
        "losses": losses,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    (args.out_dir / f"summary_{impl}.json").write_text(json.dumps(summary, indent=1))
    print(
        f"[{impl}] train loss {summary['final_train_loss']:.4f}  val loss {val_loss:.4f} "
        f"({summary['val_bits_per_char']:.3f} bits/char)  {tokens_per_s:,.0f} tokens/s",
        flush=True,
    )
    print(f"[{impl}] sample:\n{sample}\n", flush=True)
    return summary


def compare(summaries: dict) -> str:
    lines = [
        f"{'impl':8s} {'module':28s} {'train loss':>10s} {'val loss':>9s} {'bits/char':>9s} {'tokens/s':>12s}",
    ]
    for s in summaries.values():
        lines.append(
            f"{s['impl']:8s} {s['module']:28s} {s['final_train_loss']:10.4f} {s['val_loss']:9.4f} "
            f"{s['val_bits_per_char']:9.3f} {s['tokens_per_s']:12,.0f}"
        )
    if len(summaries) == 2:
        a, b = summaries["triton"], summaries["nn"]
        gap = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        lines.append(f"largest per-step loss difference: {gap:.2e}")
        cls = b["module"].rsplit(".", 1)[1]
        lines.append(f"speed: triton_lstm / nn.{cls} = {a['tokens_per_s'] / b['tokens_per_s']:.2f}x")
        if a["device"] == "cpu":
            lines.append(f"(on CPU triton_lstm runs ATen's {cls}, as nn.{cls} does, not the kernels: compare speed on a GPU)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["triton", "nn", "both"], default="triton",
                        help="triton: triton_lstm.LSTM; nn: torch.nn.LSTM; both: one after the other, compared")
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm",
                        help="gru: triton_lstm.GRU and torch.nn.GRU instead of the LSTMs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16: autocast (preset: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--embed", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--seq-len", type=int, help="characters per training window")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="Alice ")
    parser.add_argument("--sample-len", type=int, default=400)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--log-every", type=int, default=50, help="also print the loss every N steps (0: never)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out-dir", type=Path, default=Path("char_lm_out"))
    args = parser.parse_args(argv)
    preset = PRESETS["cuda" if args.device.startswith("cuda") else "cpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype == "bf16" and not args.device.startswith("cuda"):
        parser.error("--dtype bf16 is for CUDA (the kernels under autocast); on CPU the example trains in fp32")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    text = load_text(args.data)
    vocab = Vocabulary(text)
    print(f"{args.data.name}: {len(text):,} characters, {len(vocab)} distinct; device {device}, {args.dtype}")
    impls = ["triton", "nn"] if args.impl == "both" else [args.impl]
    summaries = {impl: train_one(impl, args, text, vocab, device) for impl in impls}
    table = compare(summaries)
    print(table)
    (args.out_dir / "comparison.txt").write_text(table + "\n")
    return summaries


if __name__ == "__main__":
    main()
