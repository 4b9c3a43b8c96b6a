"""Policy, reference and processor loading; the tiny random Qwen2.5-VL used by tests and the CPU default.

Two ways to get a `(model, processor)` pair (`load_model` picks one: path "tiny" is the second):

* `load_policy(path)`: a real Qwen2.5-VL checkpoint (3B / 7B Instruct, or a folder this project exported) from a
  local folder, or a hub id already in the local Hugging Face cache. Nothing is downloaded (the machines this
  project targets are often offline): a missing checkpoint is an error that says so, not a silent fetch.
* `build_tiny(seed)`: a 2-layer, 64-wide Qwen2.5-VL with random weights and an offline byte-level BPE tokenizer
  trained in-process on the synthetic tasks' vocabulary: the real `Qwen2_5_VLForConditionalGeneration` class (same
  vision tower, same M-RoPE), so every code path (sampler, log-probs, FSDP2, export) is the one a 3B run takes, only
  smaller. Deterministic for a seed; `save_pretrained` + `load_policy` round-trips it.

The processor is an image-only `ImageProcessor` (no torchvision). What the sampler and trainer ask of a model:
`eos_token_ids`, `placeholder_ids`, `mrope_positions`, `encoded_images`; `resolve_dtype` reads a config dtype.

Left out: video inputs, quantised loading, LoRA.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (AutoTokenizer, GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2Tokenizer)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from harmo_min.synthetic import TASK_VOCABULARY

# Qwen's special tokens, in Qwen's order: with them in this order a tiny tokenizer has the same *relative*
# layout as the real one, and the model config's special ids are simply "base + offset".
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# ChatML with Qwen2-VL's image placeholder; a system turn is added when the conversation has none, as Qwen does.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class ImageProcessor(Qwen2_5_VLProcessor):
    """transformers 5.23's `Qwen2_5_VLProcessor` insists on a video processor, whose implementation needs torchvision,
    which this project never installs (its CUDA-linked wheel breaks `import transformers`' Qwen2.5-VL on CPU
    machines); this one has none, and its images go through the pure-PIL `Qwen2VLImageProcessorPil`."""

    # ProcessorMixin takes its attributes from this signature: without video_processor here, none is required.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "ImageProcessor":
        # Both halves explicitly: AutoProcessor gives the tokenizer alone, AutoImageProcessor may pick torchvision.
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        # The folder's processor template (chat_template.jinja or .json, as Qwen ships it) wins over the tokenizer's.
        jinja, as_json = Path(path) / "chat_template.jinja", Path(path) / "chat_template.json"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        elif as_json.is_file():
            template = json.loads(as_json.read_text(encoding="utf-8"))["chat_template"]
        elif not (template := tokenizer.chat_template):
            raise ValueError(f"{path}: no chat template (chat_template.jinja, chat_template.json or in "
                             "tokenizer_config.json): copy the model's processor files into the folder")
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def build_tiny_tokenizer(vocab_size: int = 600) -> Qwen2Tokenizer:
    """A byte-level BPE with Qwen's pre-tokenizer, trained in-process (no hub), plus Qwen's special tokens."""
    bpe = Tokenizer(models.BPE())
    # Same split as Qwen2Tokenizer applies at encode time, so the learned merges are the ones it will use.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Everything the synthetic tasks and the answer format say, so the BPE learns whole words for them.
    corpus = [*TASK_VOCABULARY, " ".join(map(str, range(100))), "You are a helpful assistant.", "system user assistant"]
    bpe.train_from_iterator(corpus, trainer=trainer)
    model_json = json.loads(bpe.model.__getstate__())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tok = Qwen2Tokenizer(vocab=model_json["vocab"], merges=merges, unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    # Set after the specials are added in order: passed to the constructor, <|im_end|> would be added first.
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    # Reasoning/answer tags are single ordinary (non-special) tokens so a 2-layer model can learn the format by RL
    # in minutes; decoding keeps them (they are not skipped as special tokens).
    tok.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    tok.chat_template, tok.padding_side = CHAT_TEMPLATE, "left"
    return tok


def build_tiny_processor() -> ImageProcessor:
    # Small images: 112 px -> 8x8 patches of 14 px -> 16 tokens after the 2x2 merge.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return ImageProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(),
                          chat_template=CHAT_TEMPLATE)


def tiny_config(tokenizer: Qwen2Tokenizer, **text_overrides) -> Qwen2_5_VLConfig:
    """The tiny architecture of ENVIRONMENT.md; `text_overrides` scale it up for benchmarks (hidden_size=512, ...)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    text.update(text_overrides)
    # mrope_section: head_dim/2 rotary frequencies over (time, height, width), 1:1.5:1.5 as Qwen ([2, 3, 3] at 16).
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    hw = (head_dim // 2 - head_dim // 8) // 2
    text.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1e6,
                                        "mrope_section": [head_dim // 2 - 2 * hw, hw, hw]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, out_hidden_size=text["hidden_size"],
                  fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def build_tiny(seed: int = 0, **text_overrides) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageProcessor]:
    processor = build_tiny_processor()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(processor.tokenizer, **text_overrides)).float().eval()
    _set_generation_config(model, processor.tokenizer)
    return model, processor


def _set_generation_config(model, tokenizer) -> None:
    # A random model has no generation_config.json: stop at <|im_end|> (end of the assistant turn) and pad with
    # <|endoftext|>, as Qwen2.5-VL-Instruct's own generation config does. Greedy unless asked otherwise.
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)


def eos_token_ids(model) -> list[int]:
    """The ids that end a response, from the model's generation config (an int or a list there)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        raise ValueError("model.generation_config.eos_token_id is not set: the sampler would never stop")
    return [eos] if isinstance(eos, int) else list(eos)


def mrope_positions(model, prompts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt positions (3, N, P) and per-row rope deltas (N, 1) as Qwen2.5-VL computes them for `generate`."""
    mm_token_type_ids = prompts.get("mm_token_type_ids")
    if mm_token_type_ids is None:
        # Without it get_rope_index cannot see the images and silently gives 1-D positions: refuse instead.
        if prompts.get("pixel_values") is not None:
            raise ValueError("prompts have pixel_values but no mm_token_type_ids: M-RoPE positions would be wrong")
        mm_token_type_ids = torch.zeros_like(prompts["input_ids"])
    return model.model.get_rope_index(prompts["input_ids"], mm_token_type_ids=mm_token_type_ids,
                                      image_grid_thw=prompts.get("image_grid_thw"),
                                      attention_mask=prompts["attention_mask"])


def placeholder_ids(model) -> list[int]:
    """Token ids a response must never contain: the image/video slots the processor expands at encode time."""
    return [i for i in (model.config.image_token_id, model.config.video_token_id) if i is not None]


@contextlib.contextmanager
def encoded_images(model, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None):
    """Run the vision tower once; yield each image's features (a tuple of (tokens_j, H)) for the forward inside.
    `model` is a Qwen2.5-VL ForConditionalGeneration or its base Qwen2_5_VLModel.

    Without images the tower still runs, on one blank 2x2-patch image, and 0 · (its output) is added to the input
    embeddings of the forward inside, so its backward and gradient reduce-scatter run at the same point as on a rank
    with images: under FSDP2 every rank must run the same units in the same order, or one that skips a unit hangs.
    """
    visual = model.visual if hasattr(model, "visual") else model.model.visual
    if pixel_values is not None:
        pooled = visual(pixel_values, grid_thw=image_grid_thw).pooler_output       # (Σ tokens_j, H)
        yield torch.split(pooled, (image_grid_thw.prod(-1) // visual.spatial_merge_size ** 2).tolist())
        return
    vc, device = visual.config, next(visual.parameters()).device
    blank = torch.zeros(4, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2, device=device)
    idle = visual(blank, grid_thw=torch.tensor([[1, 2, 2]], device=device)).pooler_output.sum() * 0.0
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: out + idle.to(out.dtype))
    try:
        yield ()
    finally:
        hook.remove()


def takes_boolean_mask(model) -> bool:
    """Whether the model's attention takes a boolean 4-D mask (sdpa) or an additive one (eager), as the sampler and
    grpo's shared-prompt forward pass them; raise for any other attention."""
    attention = model.config._attn_implementation
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention implementation {attention!r} takes no 4-D mask (the sampler and "
                         "grpo.share_prompt pass one); load the policy with attn_implementation='sdpa' (or 'eager')")
    layer_types = set(model.config.get_text_config(decoder=True).layer_types)
    if layer_types != {"full_attention"}:
        raise ValueError(f"only full-attention decoder layers are supported, got {sorted(layer_types)}")
    return attention == "sdpa"


def _resolve(name_or_path: str | os.PathLike) -> str:
    path, name = Path(name_or_path).expanduser(), str(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:  # a hub id is exactly "org/name"
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    return name  # a hub id: only the local cache is consulted (local_files_only)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A config dtype name; "auto" is bfloat16 on a GPU and float32 on a CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(path: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", attn_implementation: str = "sdpa", weights: bool = True):
    """(model, processor) in eval mode; `weights=False`: (None, processor), for FSDP ranks that receive shards."""
    if str(path) == "tiny":
        if not weights:
            return None, build_tiny_processor()
        model, processor = build_tiny(seed)
        return model.to(dtype=dtype, device=device), processor
    if not weights:
        return None, ImageProcessor.from_pretrained(_resolve(path), local_files_only=True)
    return load_policy(path, dtype=dtype, device=device, attn_implementation=attn_implementation)


def load_policy(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                device: str | torch.device = "cpu", attn_implementation: str = "sdpa"
                ) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageProcessor]:
    """A Qwen2.5-VL checkpoint and its processor from a local folder or the local HF cache."""
    source = _resolve(name_or_path)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
        processor = ImageProcessor.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(f"could not load {name_or_path!r} from a local folder or the local Hugging Face cache; "
                                "harmo_min never downloads (these machines are often offline): download it elsewhere "
                                f"and pass its folder ({err})") from err
    if model.generation_config.eos_token_id is None:
        _set_generation_config(model, processor.tokenizer)
    return model.to(device), processor
