"""Tiny Hugging Face model directories built offline for end-to-end tests: a word-level tokenizer (with a
chat template), a causal LM (Llama) and a sequence classifier (BERT), each saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = (
    "the a an and or of to in on for with is are was be it this that what which who how why when where "
    "one two three four five six seven eight nine ten zero plus minus times equals answer question "
    "cat dog bird fish red green blue yellow big small hot cold yes no hello world good bad up down "
    "left right add sum count list name number word text label positive negative happy sad say repeat "
    "translate english french please thank you i me my we our they their : , . ? ! ' - 0 1 2 3 4 5 6 7 8 9"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def build_tokenizer():
    """A word-level fast tokenizer: whitespace/punctuation split, lowercase, the words above."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_causal_lm_dir(path: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A tiny LlamaForCausalLM + tokenizer saved to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_classifier_dir(path: Path, num_labels: int = 2, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A tiny BertForSequenceClassification + tokenizer saved to `path`."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=256, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_random_adapter(model_dir: Path, out: Path, config, std: float, seed: int) -> Path:
    """Attach `config` (a lorakit.LoraConfig) to the causal LM in `model_dir`, give its B factors random values
    (N(0, std), seeded: the adapter changes the output) and save it to `out`."""
    import transformers

    import lorakit

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    lorakit.attach(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    lorakit.save_adapter(model, out)
    return out
