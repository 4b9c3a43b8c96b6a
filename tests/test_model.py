"""Tiny model building, save/load through the real loading path, and clear errors for missing checkpoints."""

import pytest
import torch

from harmo_min.data import encode_prompts

from harmo_min.synthetic import synthetic_examples
from harmo_min.model import build_tiny, eos_token_ids, load_policy


def test_build_tiny_is_deterministic_per_seed():
    (a, _), (b, _), (c, _) = build_tiny(1), build_tiny(1), build_tiny(2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_processor_has_qwen_special_tokens_in_order(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    ids = tok.convert_tokens_to_ids(names)
    assert ids == list(range(ids[0], ids[0] + 3))
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert eos_token_ids(model)[0] == tok.convert_tokens_to_ids("<|im_end|>")
    text = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_save_and_load_policy_round_trip(tmp_path, tiny):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_proc = load_policy(tmp_path, dtype=torch.float32)
    batch = encode_prompts(processor, synthetic_examples(2, seed=0))
    again = encode_prompts(loaded_proc, synthetic_examples(2, seed=0))
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**again).logits)
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id


def test_missing_checkpoint_says_no_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_policy("Qwen/Not-A-Real-Model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_policy(tmp_path / "empty")


def test_a_folders_processor_chat_template_wins_and_a_missing_one_is_an_error(tmp_path, tiny):
    """Qwen ships its multimodal template as the processor's chat_template.json; it must not be replaced silently."""
    import json

    from harmo_min.model import ImageProcessor

    _, processor = tiny
    processor.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'custom' }}"}))
    assert ImageProcessor.from_pretrained(tmp_path).chat_template == "{{ 'custom' }}"
    (tmp_path / "chat_template.json").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        ImageProcessor.from_pretrained(tmp_path)
