"""Generates a tiny random Llama and a byte-level BPE tokenizer in a directory (no download).

python _tiny_model.py OUT_DIR [SEED]
"""

from __future__ import annotations

import random
import sys


def build(out_dir: str, seed: int = 0) -> str:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(1234)  # the tokenizer is the same for every model seed
    words = ["kv", "cache", "block", "tier", "node", "engine", "token", "prefix", "layer", "hash",
             "store", "load", "save", "disk", "memory", "arena", "slot", "lease", "commit", "daemon"]
    corpus = [" ".join(rng.choice(words) + str(rng.randrange(100)) for _ in range(40)) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, torch_dtype="float32", tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # larger weights than the default init, so greedy tokens depend on the context
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


if __name__ == "__main__":
    build(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
