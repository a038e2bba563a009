"""Train and evaluate a Transformer translation model with intra-distillation (or a baseline / R-Drop).

    python -m examples.translation.train --preset demo --method intra-distillation --out runs/de-en
    torchrun --nproc_per_node 8 -m examples.translation.train --preset iwslt14 --data iwslt14 \
        --src de --data-dir data/iwslt14.tokenized.de-en --method intra-distillation --out runs/iwslt-de

K passes are ONE forward on the batch repeated K times (each copy gets its own dropout mask); the
logits are unflattened to [K, B, T, V] and given to intra_distillation_loss with the pad id as
ignore_index. See examples/translation/README.md for the paper's full recipes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from intradistill_kernels import AdaptiveAlpha, fused_linear_intra_distillation_loss, intra_distillation_loss
from intradistill_kernels._progress import progress_bar

from . import data as data_lib
from .model import ModelConfig, Seq2SeqTransformer

# The paper's settings (transformer_small for IWSLT'14, transformer_big for WMT'17) and a small
# configuration that trains in minutes on a CPU.
PRESETS = {
    "iwslt14": dict(embed_dim=512, ffn_dim=1024, heads=4, layers=6, dropout=0.3, attention_dropout=0.1,
                    lr=5e-4, warmup=8000, weight_decay=1e-4, max_tokens=4096, label_smoothing=0.1,
                    vocab_size=12000, beam=5, max_steps=300_000, alpha=5.0, p=5.0, q=10.0, eval_every=2000),
    "wmt17": dict(embed_dim=1024, ffn_dim=4096, heads=16, layers=6, dropout=0.3, attention_dropout=0.1,
                  lr=5e-4, warmup=4000, weight_decay=0.0, max_tokens=4096, label_smoothing=0.1,
                  vocab_size=32000, beam=4, max_steps=300_000, alpha=5.0, p=5.0, q=10.0, eval_every=5000),
    # demo: dropout 0.1 and a 2K vocabulary learn faster at this scale than the paper's 0.3 / 12K
    # (valid loss 3.80 vs 4.39 after 800 baseline steps on this data).
    "demo": dict(embed_dim=128, ffn_dim=256, heads=4, layers=2, dropout=0.1, attention_dropout=0.1,
                 lr=3e-3, warmup=150, weight_decay=1e-4, max_tokens=1024, label_smoothing=0.1,
                 vocab_size=2000, beam=4, max_steps=800, alpha=5.0, p=5.0, q=10.0, eval_every=100),
}
METHODS = ("baseline", "rdrop", "intra-distillation")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--data", choices=("trans-de-en", "bible-es-en", "iwslt14", "wmt17"), default="trans-de-en",
                    help="offline: trans-de-en (German->English dictionary sentences) or bible-es-en "
                         "(Spanish->English verses), both real data from Debian packages")
    ap.add_argument("--src", default="de", help="IWSLT'14 source language (to English)")
    ap.add_argument("--data-dir", help="directory of prepare-iwslt14.sh's train/valid/test.{src,en}")
    ap.add_argument("--method", choices=METHODS, default="intra-distillation")
    ap.add_argument("--passes", type=int, default=3, help="K for intra-distillation (R-Drop uses 2)")
    ap.add_argument("--divergence", choices=("x", "js", "jeffrey"), default="x")
    ap.add_argument("--alpha", type=float, help="divergence weight (preset default)")
    ap.add_argument("--p", type=float, help="adaptive alpha: reaches alpha at step N/p")
    ap.add_argument("--q", type=float, help="adaptive alpha: passes 1 at step N/q")
    ap.add_argument("--no-adaptive", action="store_true", help="constant alpha even when alpha > 1")
    ap.add_argument("--fused-linear", action="store_true",
                    help="loss on the decoder's last hidden states without materialising the logits")
    ap.add_argument("--backend", default="auto")
    for name, typ in (("max-steps", int), ("max-tokens", int), ("lr", float), ("warmup", int),
                      ("eval-every", int), ("beam", int), ("vocab-size", int), ("layers", int),
                      ("embed-dim", int), ("ffn-dim", int), ("heads", int), ("dropout", float)):
        ap.add_argument(f"--{name}", type=typ, help="override the preset")
    ap.add_argument("--valid-size", type=int, default=500, help="held-out pairs (offline data)")
    ap.add_argument("--test-size", type=int, default=500, help="held-out pairs (offline data)")
    ap.add_argument("--max-train-pairs", type=int, help="use only the first N training pairs")
    ap.add_argument("--max-test-pairs", type=int, help="evaluate BLEU on the first N test pairs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--out", default="runs/translation")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.method == "rdrop":
        args.passes, args.divergence = 2, "jeffrey"
    if args.method != "baseline" and args.passes < 2:
        ap.error("--passes must be >= 2 for rdrop and intra-distillation")
    return args


# --------------------------------------------------------------------------- data and batching

def load_splits(args):
    if args.data == "trans-de-en":
        return data_lib.split_pairs(data_lib.load_trans_de_en(), args.valid_size, args.test_size, seed=0), False
    if args.data == "bible-es-en":
        return data_lib.split_pairs(data_lib.load_bible_es_en(), args.valid_size, args.test_size, seed=0), True
    if args.data == "iwslt14":
        if not args.data_dir:
            raise SystemExit("--data iwslt14 needs --data-dir (output of fairseq's prepare-iwslt14.sh)")
        return data_lib.load_iwslt14(args.src, args.data_dir), True
    return data_lib.load_wmt17_en_de(), True


def train_tokenizer(pairs, vocab_size: int, prefix: Path):
    """A joint SentencePiece model on the training split only."""
    import sentencepiece as spm

    model_file = data_lib.sentencepiece_model(pairs, vocab_size, prefix.with_suffix(".model"))
    return spm.SentencePieceProcessor(model_file=str(model_file))


def encode_pairs(sp, pairs, eos: int):
    src = sp.encode([s for s, _ in pairs])
    tgt = sp.encode([t for _, t in pairs])
    return [(s + [eos], t + [eos]) for s, t in zip(src, tgt)]


def make_batches(examples, max_tokens: int, seed: int | None):
    """Length-sorted batches of at most max_tokens (padded) tokens on the longer side, as fairseq
    builds them; shuffled batch order when a seed is given."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), len(examples[i][1]), i))
    batches, cur, longest = [], [], 0
    for i in order:
        n = max(len(examples[i][0]), len(examples[i][1]))
        if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    if seed is not None:
        random.Random(seed).shuffle(batches)
    return batches


def collate(examples, idx, pad: int, bos: int, device):
    src = [examples[i][0] for i in idx]
    tgt = [examples[i][1] for i in idx]
    ls, lt = max(map(len, src)), max(map(len, tgt))
    s = torch.full((len(idx), ls), pad, dtype=torch.long)
    t_in = torch.full((len(idx), lt), pad, dtype=torch.long)
    t_out = torch.full((len(idx), lt), pad, dtype=torch.long)
    for r, (a, b) in enumerate(zip(src, tgt)):
        s[r, :len(a)] = torch.tensor(a)
        t_in[r, 0], t_in[r, 1:len(b)] = bos, torch.tensor(b[:-1])
        t_out[r, :len(b)] = torch.tensor(b)
    return s.to(device), t_in.to(device), t_out.to(device)


# --------------------------------------------------------------------------- loss

def training_loss(model, batch, args, alpha: float, pad: int):
    """(loss, ce, divergence) for one batch; K passes are one forward on the repeated batch."""
    src, t_in, t_out = batch
    if args.method == "baseline":
        logits = model(src, t_in)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), t_out.flatten(), ignore_index=pad,
                             label_smoothing=args.label_smoothing)
        return ce, ce, torch.zeros(())
    k = args.passes
    kwargs = dict(divergence=args.divergence, label_smoothing=args.label_smoothing, ignore_index=pad,
                  backend=args.backend)
    if args.fused_linear:
        inner = model.module if hasattr(model, "module") else model
        hidden = model(src.repeat(k, 1), t_in.repeat(k, 1), return_hidden=True).unflatten(0, (k, -1))
        out = fused_linear_intra_distillation_loss(hidden, inner.output_weight, t_out, None, alpha, **kwargs)
    else:
        logits = model(src.repeat(k, 1), t_in.repeat(k, 1)).unflatten(0, (k, -1))  # [K, B, T, V]
        out = intra_distillation_loss(logits, t_out, alpha, **kwargs)
    return out.loss, out.ce, out.divergence


@torch.no_grad()
def validation_loss(model, examples, batches, pad, bos, device) -> float:
    """Token-level cross-entropy (no smoothing, one pass, dropout off) in nats."""
    model.eval()
    total, count = 0.0, 0
    for idx in batches:
        src, t_in, t_out = collate(examples, idx, pad, bos, device)
        logits = model(src, t_in)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), t_out.flatten(), ignore_index=pad, reduction="sum"))
        count += int(t_out.ne(pad).sum())
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def translate(model, sp, examples, beam: int, device, max_tokens: int, progress: bool) -> list[str]:
    model.eval()
    out = [None] * len(examples)
    batches = make_batches([(s, s) for s, _ in examples], max_tokens, None)
    for idx in progress_bar(batches, desc="beam search", enabled=progress, leave=False):
        src = [examples[i][0] for i in idx]
        s = torch.full((len(idx), max(map(len, src))), 0, dtype=torch.long)
        for r, a in enumerate(src):
            s[r, :len(a)] = torch.tensor(a)
        for i, hyp in zip(idx, model.beam_search(s.to(device), beam=beam)):
            out[i] = sp.decode(hyp)
    model.train()
    return out


# --------------------------------------------------------------------------- main

def inverse_sqrt(step: int, warmup: int) -> float:
    """fairseq's inverse_sqrt schedule as a multiplier of the peak learning rate."""
    step = max(step, 1)
    return min(step / warmup, math.sqrt(warmup / step))


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (KiB)


def build_model(args, vocab_size: int) -> Seq2SeqTransformer:
    cfg = ModelConfig(vocab_size=vocab_size, embed_dim=args.embed_dim, ffn_dim=args.ffn_dim, heads=args.heads,
                      encoder_layers=args.layers, decoder_layers=args.layers, dropout=args.dropout,
                      attention_dropout=args.attention_dropout)
    return Seq2SeqTransformer(cfg)


def run(args) -> dict:
    import sacrebleu

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        # Long timeout: the other ranks wait at a barrier while rank 0 runs beam search on the test set.
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo",
                                             timeout=datetime.timedelta(hours=3))
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    main_proc = rank == 0
    progress = main_proc and not args.no_progress
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    splits, clean = load_splits(args)
    if args.max_train_pairs:
        splits["train"] = splits["train"][: args.max_train_pairs]
    if args.max_test_pairs:
        splits["test"] = splits["test"][: args.max_test_pairs]
    spm_prefix = data_lib.cache_dir() / "spm" / f"{args.data}-{data_lib.fingerprint(splits['train'])}-{args.vocab_size}"
    if world > 1 and rank != 0:
        torch.distributed.barrier()  # rank 0 trains the tokenizer; the others load its file
    sp = train_tokenizer(splits["train"], args.vocab_size, spm_prefix)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    if clean:
        splits["train"] = data_lib.clean_pairs(splits["train"], sp.encode)
    pad, bos, eos = sp.pad_id(), sp.bos_id(), sp.eos_id()
    train = encode_pairs(sp, splits["train"], eos)
    valid = encode_pairs(sp, splits["valid"], eos)
    test = encode_pairs(sp, splits["test"], eos)

    model = build_model(args, sp.get_piece_size()).to(args.device)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    inner = model.module if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: inverse_sqrt(s + 1, args.warmup))
    alpha_fn = (AdaptiveAlpha(args.alpha, args.p, args.q, args.max_steps)
                if args.alpha > 1 and not args.no_adaptive else (lambda step: args.alpha))
    valid_batches = make_batches(valid, args.max_tokens, None)

    history, step, epoch, tokens_seen = [], 0, 0, 0
    start = time.perf_counter()
    bar = progress_bar(total=args.max_steps, desc=args.method, enabled=progress, dynamic_ncols=True)
    model.train()
    while step < args.max_steps:
        batches = make_batches(train, args.max_tokens, seed=args.seed * 1000 + epoch)[rank::world]
        for idx in batches:
            if step >= args.max_steps:
                break
            batch = collate(train, idx, pad, bos, args.device)
            alpha = alpha_fn(step) if args.method != "baseline" else 0.0
            loss, ce, div = training_loss(model, batch, args, alpha, pad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss, ce, div = loss.detach(), ce.detach(), div.detach()
            step += 1
            tokens_seen += int(batch[2].ne(pad).sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", div=f"{div.item():.4f}", alpha=f"{alpha:.2f}",
                            tok_s=f"{tokens_seen / (time.perf_counter() - start):.0f}")
            if main_proc and (step % args.eval_every == 0 or step == args.max_steps):
                vl = validation_loss(inner, valid, valid_batches, pad, bos, args.device)
                history.append({"step": step, "valid_loss": vl, "train_loss": float(loss), "ce": float(ce),
                                "divergence": float(div), "alpha": alpha})
                bar.write(f"step {step}: valid loss {vl:.4f}")
        epoch += 1
    bar.close()
    train_time = time.perf_counter() - start
    if not main_proc:
        _finish_distributed()
        return {}

    checkpoint = out_dir / "checkpoint.pt"
    torch.save({"model": inner.state_dict(), "config": asdict(inner.cfg), "args": vars(args),
                "spm": str(spm_prefix.with_suffix(".model"))}, checkpoint)
    eval_start = time.perf_counter()
    hyps = translate(inner, sp, test, args.beam, args.device, args.max_tokens, progress)
    refs = [t for _, t in splits["test"]]
    report = {
        "method": args.method, "passes": 1 if args.method == "baseline" else args.passes,
        "divergence": None if args.method == "baseline" else args.divergence,
        "data": args.data, "preset": args.preset, "steps": step, "seed": args.seed,
        "train_pairs": len(train), "test_pairs": len(test),
        "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        "valid_loss": history[-1]["valid_loss"] if history else None,
        "train_time_s": train_time, "eval_time_s": time.perf_counter() - eval_start,
        "peak_memory_mb": peak_memory_mb(args.device), "device": str(args.device),
        "history": history, "checkpoint": str(checkpoint),
        "examples": [{"src": s, "ref": r, "hyp": h} for (s, r), h in list(zip(splits["test"], hyps))[:5]],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out_dir / "report.md").write_text(markdown_report([report]))
    plot_validation([report], out_dir / "valid_loss.png")
    if world > 1:
        _finish_distributed()
    return report


def _finish_distributed():
    # Every rank tears down together: a rank leaving while rank 0 still evaluates made gloo's
    # shutdown hang now and then.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def markdown_report(reports) -> str:
    lines = ["| method | K | BLEU | chrF | valid loss | train time (s) | peak memory (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        lines.append(f"| {r['method']} | {r['passes']} | {r['bleu']:.2f} | {r['chrf']:.2f} | "
                     f"{r['valid_loss']:.4f} | {r['train_time_s']:.0f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_validation(reports, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in reports:
        ax.plot([h["step"] for h in r["history"]], [h["valid_loss"] for h in r["history"]], marker="o", label=r["method"])
    ax.set_xlabel("training step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title(f"{reports[0]['data']}: validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sensitivity_inputs(checkpoint_path, max_batches: int = 20):
    """(model, loss_fn, batches) for a saved checkpoint, on its validation split: the loader the
    sensitivity CLI takes (`--loader examples.translation.train:sensitivity_inputs`)."""
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    args = argparse.Namespace(**ckpt["args"])
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=ckpt["spm"])
    model = Seq2SeqTransformer(ModelConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    splits, _ = load_splits(args)
    valid = encode_pairs(sp, splits["valid"], sp.eos_id())
    pad, bos = sp.pad_id(), sp.bos_id()
    batches = [collate(valid, idx, pad, bos, "cpu") for idx in make_batches(valid, args.max_tokens, None)[:max_batches]]

    def loss_fn(m, batch):
        src, t_in, t_out = batch
        return F.cross_entropy(m(src, t_in).flatten(0, 1), t_out.flatten(), ignore_index=pad)

    return model, loss_fn, batches


def main(argv=None):
    report = run(parse_args(argv))
    if report:
        print(markdown_report([report]), end="")


if __name__ == "__main__":
    main()
