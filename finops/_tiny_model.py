"""Build a tiny random-weight Llama model + BPE tokenizer for the vLLM CPU server.

Run with the vLLM environment's Python (it has torch/transformers/tokenizers):
    .venv-vllm/bin/python finops/_tiny_model.py OUT_DIR
No weights can be downloaded here, so tests and the live demo make their own.
Head size must be >= 64 for vLLM's CPU attention kernel (hidden 128, 2 heads).
Deterministic: fixed seed and fixed training text.
"""

import json
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus() -> list[str]:
    import string

    words = [
        "the",
        "gpu",
        "serves",
        "requests",
        "tokens",
        "cost",
        "per",
        "hour",
        "cache",
        "prefix",
        "batch",
        "queue",
        "latency",
        "model",
        "route",
        "tier",
        "small",
        "mid",
        "large",
        "tenant",
        "feature",
        "summarize",
        "translate",
        "classify",
        "extract",
        "answer",
        "explain",
        "code",
        "python",
        "json",
        "table",
        "report",
        "week",
        "spend",
        "idle",
        "capacity",
        "utilization",
    ]
    lines = []
    for i in range(4000):
        lines.append(" ".join(words[(i * k) % len(words)] for k in range(1, 12)) + f" {i}.")
    lines.append(string.printable)
    return lines


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<unk>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "finops_tiny_model.json").write_text(json.dumps({"built": True}))


if __name__ == "__main__":
    build(Path(sys.argv[1]))
