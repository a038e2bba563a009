"""A Transformer encoder-decoder from torch.nn modules (post-norm, as fairseq's transformer), with a
joint vocabulary, shared embeddings tied to the output layer, and beam search."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int
    embed_dim: int = 512
    ffn_dim: int = 1024
    heads: int = 4
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.3
    attention_dropout: float = 0.1
    max_positions: int = 1024
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3


def _sinusoids(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq[: dim // 2])
    return table


class Seq2SeqTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_id)
        nn.init.normal_(self.embed.weight, 0, cfg.embed_dim ** -0.5)
        with torch.no_grad():
            self.embed.weight[cfg.pad_id].zero_()
        self.register_buffer("positions", _sinusoids(cfg.max_positions, cfg.embed_dim), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)

        def layer(kind):
            block = kind(cfg.embed_dim, cfg.heads, cfg.ffn_dim, cfg.dropout, batch_first=True)
            for attn in (getattr(block, "self_attn", None), getattr(block, "multihead_attn", None)):
                if attn is not None:
                    attn.dropout = cfg.attention_dropout  # nn.MultiheadAttention's own dropout
            return block

        self.encoder = nn.ModuleList(layer(nn.TransformerEncoderLayer) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(layer(nn.TransformerDecoderLayer) for _ in range(cfg.decoder_layers))

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight

    def _embed(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.embed(tokens) * math.sqrt(self.cfg.embed_dim)
        return self.drop(x + self.positions[offset:offset + tokens.shape[1]])

    def encode(self, src: torch.Tensor):
        pad = src.eq(self.cfg.pad_id)
        x = self._embed(src)
        for block in self.encoder:
            x = block(x, src_key_padding_mask=pad)
        return x, pad

    def decode_hidden(self, memory, memory_pad, tgt_in: torch.Tensor) -> torch.Tensor:
        t = tgt_in.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tgt_in.device), diagonal=1)
        x = self._embed(tgt_in)
        for block in self.decoder:
            x = block(x, memory, tgt_mask=causal, tgt_key_padding_mask=tgt_in.eq(self.cfg.pad_id),
                      memory_key_padding_mask=memory_pad)
        return x

    def hidden(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states [B, T, D] (for the fused-linear loss)."""
        memory, pad = self.encode(src)
        return self.decode_hidden(memory, pad, tgt_in)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        # return_hidden lets a DistributedDataParallel wrapper run the fused-linear path: DDP syncs
        # gradients only for computations that went through its own forward.
        h = self.hidden(src, tgt_in)
        return h if return_hidden else h @ self.output_weight.T

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, beam: int = 5, max_len_a: float = 1.2, max_len_b: int = 10,
                    length_penalty: float = 1.0) -> list[list[int]]:
        """Beam search (fairseq's defaults: max length a*|src|+b, scores normalised by length**lp).
        Returns the best hypothesis per sentence without BOS/EOS."""
        cfg = self.cfg
        b = src.shape[0]
        memory, pad = self.encode(src)
        memory = memory.repeat_interleave(beam, 0)
        pad = pad.repeat_interleave(beam, 0)
        src_len = (~src.eq(cfg.pad_id)).sum(1)
        max_len = int((src_len.max() * max_len_a).item() + max_len_b)
        tokens = torch.full((b * beam, 1), cfg.bos_id, dtype=torch.long, device=src.device)
        scores = torch.zeros(b, beam, device=src.device)
        scores[:, 1:] = float("-inf")  # all beams start identical: keep one
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=src.device)
        for step in range(max_len):
            h = self.decode_hidden(memory, pad, tokens)[:, -1]
            logp = torch.log_softmax(h @ self.output_weight.T, -1).view(b, beam, -1)
            logp[..., cfg.pad_id] = float("-inf")
            if step == max_len - 1:
                logp[..., :] = float("-inf")
                logp[..., cfg.eos_id] = 0
            cand = (scores[..., None] + logp).view(b, -1)
            top, idx = cand.topk(2 * beam, dim=1)
            beam_idx, tok = idx // logp.shape[-1], idx % logp.shape[-1]
            new_scores = torch.full_like(scores, float("-inf"))
            new_tokens = tokens.new_full((b, beam, tokens.shape[1] + 1), cfg.pad_id)
            prev = tokens.view(b, beam, -1)
            for i in range(b):
                if done[i]:
                    continue
                slot = 0
                for j in range(2 * beam):
                    score, bi, t = float(top[i, j]), int(beam_idx[i, j]), int(tok[i, j])
                    if score == float("-inf"):
                        break
                    if t == cfg.eos_id:
                        hyp = prev[i, bi, 1:].tolist()
                        finished[i].append((score / (len(hyp) + 1) ** length_penalty, hyp))
                    elif slot < beam:
                        new_scores[i, slot] = score
                        new_tokens[i, slot, :-1], new_tokens[i, slot, -1] = prev[i, bi], t
                        slot += 1
                # fairseq stops a sentence once it has `beam` finished hypotheses
                if len(finished[i]) >= beam or slot == 0:
                    done[i] = True
            if bool(done.all()):
                break
            scores, tokens = new_scores, new_tokens.view(b * beam, -1)
        return [max(f)[1] if f else [] for f in finished]
