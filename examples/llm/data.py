"""Offline instruction data and tokenizer for the SFT example: real German-English sentence pairs
(the Debian `trans-de-en` dictionary) as translation instructions, and a byte-level BPE tokenizer
trained on them (a hub model's tokenizer is used instead whenever --model names one)."""
from __future__ import annotations

import random

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# A minimal chat template (the roles and the generation marker TRL's chat handling needs).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}" + EOS + "{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def translation_pairs(limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """(German, English) full-sentence pairs, shuffled with `seed`, at most `limit` of them."""
    from examples.translation.data import load_trans_de_en

    pairs = list(load_trans_de_en())
    random.Random(seed).shuffle(pairs)
    return pairs[:limit] if limit else pairs


def instruction_rows(pairs, chat: bool = False) -> list[dict]:
    """Prompt / completion rows (TRL trains on the completion only), or chat messages."""
    rows = []
    for de, en in pairs:
        prompt = f"Translate into English: {de}\n"
        if chat:
            rows.append({"messages": [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": en}]})
        else:
            rows.append({"prompt": prompt, "completion": en})
    return rows


def train_tokenizer(texts, vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers tokenizer with pad / eos /
    unk tokens and the chat template above."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    hf.chat_template = CHAT_TEMPLATE
    return hf
