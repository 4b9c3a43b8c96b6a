"""The reward-model head: BT loss, gate, last-token reading, own + Skywork loading, data, training, FSDP2."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from harmo_min.data import DataError, Example, load_preference_jsonl

from harmo_min.synthetic import COLOURS, described_objects, synthetic_examples, synthetic_pairs
from harmo_min.model import build_tiny
import train_reward_model
from harmo_min.config import load_config
from harmo_min.reward_model import (HeadConfig, RewardModel, RewardOutput, bradley_terry, encode_pairs,
                                    encode_responses, last_token_index, load_scorer, preference_loss, split_pairs)

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "reward_model_tiny.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny ops on a shared CPU: OpenMP barriers across busy cores cost ~30x the maths (0.08 s vs 3 s per training
    # step measured here). One thread is also bitwise reproducible from machine to machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rm(gate="fixed", aspects=("score",), seed=0, **kw) -> RewardModel:
    model, processor = build_tiny(seed=seed)
    torch.manual_seed(seed)
    return RewardModel(model, processor, HeadConfig(aspects=list(aspects), gate=gate, **kw)).eval()


def _items():
    """Image items with responses of different lengths, and one text-only item (padding must not matter)."""
    examples = synthetic_examples(4, seed=3, kinds=("colour", "describe"))
    examples.append(Example(id="text-only", problem="What is the sum of the two numbers in the image?"))
    responses = ["<think>The image shows the answer.</think><answer>red</answer>", "The answer is",
                 "<answer>blue</answer>", "The image shows a red circle and a blue square and a green triangle on white.",
                 "<answer>7</answer>"]
    return examples, responses


def _train(tmp_path, *overrides, name="run") -> tuple[dict, Path]:
    """train_reward_model.py on the tiny config, run_dir under tmp_path; returns (final metrics, run_dir)."""
    run = tmp_path / name
    return train_reward_model.main(["--config", str(TINY_YAML), f"run_dir={run}", *overrides]), run


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------

def test_bradley_terry_equals_hand_computed_values():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.5, -100.0]), torch.tensor([1.0, 1.0, 0.5, 100.0])
    expected = [-math.log(1 / (1 + math.exp(-d))) for d in (1.0, -2.0, 0.0)] + [200.0]  # −log σ(−200) ≈ 200
    assert torch.allclose(bradley_terry(chosen, rejected), torch.tensor(expected), atol=1e-6)
    assert abs(-math.log(1 / (1 + math.exp(-1.0))) - 0.3132617) < 1e-6  # the first value, by hand


def test_preference_loss_combines_scalar_aspect_and_rating_terms():
    def out(aspects):
        a = torch.tensor(aspects)
        g = torch.full_like(a, 0.5)
        return RewardOutput(a, g, (g * a).sum(-1))
    chosen, rejected = out([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]), out([[0.0, 0.0], [1.0, 0.0], [3.0, 3.0]])
    aspect_index = torch.tensor([0, 1, -1])                     # pair 3 is unlabelled (and a tie)
    ratings = torch.tensor([[1.5, float("nan")], [float("nan")] * 2, [float("nan")] * 2])
    stats = preference_loss(chosen, rejected, aspect_index, chosen_ratings=ratings, aspect_weight=0.5, rating_weight=2.0)
    sp = lambda x: math.log1p(math.exp(x))                       # softplus: −log σ(d) = softplus(−d)
    bt = (sp(-0.5) + sp(-0.5) + sp(0.0)) / 3                     # scalar margins 0.5, 0.5, 0
    bt_aspect = (sp(-1.0) + sp(-2.0)) / 2                        # aspect 0 of pair 1, aspect 1 of pair 2
    mse = (1.0 - 1.5) ** 2                                       # one known rating
    assert abs(stats["loss"].item() - (bt + 0.5 * bt_aspect + 2.0 * mse)) < 1e-6
    assert abs(stats["accuracy"].item() - (1 + 1 + 0.5) / 3) < 1e-6  # the tie counts ½
    assert abs(stats["margin"].item() - 1 / 3) < 1e-6
    assert stats["aspect_correct"].tolist() == [1.0, 1.0] and stats["aspect_count"].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# The forward: gate, scalar, last non-pad token
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate,kw", [("fixed", {"fixed_weights": [1.0, 3.0, 0.0]}), ("prompt", {"gate_temperature": 0.5})])
def test_gate_sums_to_one_and_scalar_is_the_gated_sum(gate, kw):
    rm = _rm(gate, aspects=("helpful", "faithful", "format"), **kw)
    examples, responses = _items()
    with torch.no_grad():
        out = rm(**encode_responses(rm.processor, examples, responses))
    assert out.aspects.shape == out.gate.shape == (5, 3) and out.scalar.shape == (5,)
    assert (out.gate >= 0).all() and torch.allclose(out.gate.sum(-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(out.scalar, (out.gate * out.aspects).sum(-1), atol=1e-6)
    if gate == "fixed":
        assert torch.allclose(out.gate, torch.tensor([0.25, 0.75, 0.0]).expand(5, 3))
    else:
        assert not torch.allclose(out.gate[0], out.gate[4], atol=1e-4)  # it depends on the prompt ...
        with torch.no_grad():                                           # ... and on nothing of the response
            other = rm(**encode_responses(rm.processor, examples, ["<answer>green</answer>"] * 5))
        assert torch.allclose(other.gate, out.gate, atol=1e-6) and not torch.allclose(other.aspects, out.aspects)


def test_last_token_index_for_left_right_and_no_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [3, 2, 3, 0]


def test_score_is_read_at_the_last_real_token_under_left_and_right_padding():
    rm = _rm("prompt", aspects=("a", "b"))
    examples, responses = _items()
    tokenizer = rm.processor.tokenizer
    saved = tokenizer.padding_side
    try:
        results = {}
        for side in ("left", "right"):
            tokenizer.padding_side = side
            results[side] = rm.score(examples, responses, batch_size=5)
            batch = encode_responses(rm.processor, examples, responses)
            assert (batch["attention_mask"] == 0).any(), "the batch must actually be padded"
        alone = rm.score(examples, responses, batch_size=1)  # no padding at all
    finally:
        tokenizer.padding_side = saved
    for aspects, scalar in (results["right"], alone):
        assert torch.allclose(scalar, results["left"][1], atol=1e-5)
        assert torch.allclose(aspects, results["left"][0], atol=1e-5)
    assert results["left"][1].abs().max() > 0 and len(set(results["left"][1].tolist())) == 5


def test_frozen_backbone_trains_only_the_head_and_gate():
    rm = _rm("prompt", aspects=("a", "b"))
    rm.set_backbone_trainable(False)
    pairs = synthetic_pairs(4, seed=0, kinds=("colour",))
    for p in pairs:
        p.aspect = None
    batch, labels = encode_pairs(rm.processor, pairs, rm.aspects)
    preference_loss(*split_pairs(rm(**batch)), labels["aspect_index"])["loss"].backward()
    assert all(p.grad is None for p in rm.model.parameters())
    assert rm.head.weight.grad is not None and all(p.grad is not None for p in rm.gate.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------

def test_save_then_load_gives_identical_scores(tmp_path):
    rm = _rm("prompt", aspects=("correctness", "format"), gate_temperature=2.0, gate_hidden=16)
    with torch.no_grad():
        for p in rm.parameters():  # a "trained" model: nothing may be silently re-initialised on load
            p.add_(0.01 * torch.randn_like(p))
    examples, responses = _items()
    before = rm.score(examples, responses, batch_size=2)
    rm.save_pretrained(tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "head_config.json").read_text())
    assert saved["aspects"] == ["correctness", "format"] and saved["gate"] == "prompt" and saved["gate_temperature"] == 2.0
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    after = loaded.score(examples, responses, batch_size=2)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    scorer = load_scorer(tmp_path / "rm", batch_size=2)
    assert torch.equal(scorer.score(examples, responses)[1], before[1])


def test_skywork_layout_scores_equal_the_value_head_on_the_last_hidden_state(tmp_path):
    policy, processor = build_tiny(seed=1)
    folder = tmp_path / "skywork"
    policy.save_pretrained(folder)
    processor.save_pretrained(folder)
    hidden = policy.config.text_config.hidden_size
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(1, hidden, generator=gen), torch.randn(1, generator=gen)
    save_file({"v_head.summary.weight": weight, "v_head.summary.bias": bias}, str(folder / "value_head.safetensors"))

    rm = RewardModel.from_pretrained(folder)
    assert rm.aspects == ["score"] and not hasattr(rm, "lm_head")
    examples, responses = _items()
    aspects, scalar = rm.score(examples, responses, batch_size=5)

    # By hand, one item at a time (no padding), through Hugging Face's own forward and position computation.
    from harmo_min.data import build_messages, load_images
    expected = []
    for ex, response in zip(examples, responses):
        text = processor.apply_chat_template(build_messages(ex, "think_answer") + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        inputs = processor(text=[text], images=load_images(ex) or None, return_tensors="pt")
        policy.model.rope_deltas = None
        with torch.no_grad():
            h = policy.model(**inputs).last_hidden_state[0, -1]      # the last token: <|im_end|>\n ends the turn
        expected.append(h @ weight[0] + bias[0])
    assert torch.allclose(scalar, torch.stack(expected), atol=1e-4), (scalar, expected)
    assert torch.equal(aspects[:, 0], scalar)


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        RewardModel.from_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="value_head.safetensors"):
        RewardModel.from_pretrained(tmp_path / "empty")
    policy, processor = build_tiny(seed=0)
    policy.save_pretrained(tmp_path / "bad")
    processor.save_pretrained(tmp_path / "bad")
    save_file({"v_head.summary.weight": torch.zeros(2, 64), "v_head.summary.bias": torch.zeros(2)},
              str(tmp_path / "bad" / "value_head.safetensors"))
    with pytest.raises(ValueError, match=r"expected v_head.summary.weight \(1, H\)"):
        RewardModel.from_pretrained(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------------------------
# Preference data
# ---------------------------------------------------------------------------------------------------------------

def test_synthetic_pairs_are_deterministic_and_well_formed():
    a, b = synthetic_pairs(24, seed=5, kinds=("colour", "count", "describe")), synthetic_pairs(24, seed=5, kinds=("colour", "count", "describe"))
    assert [(p.chosen, p.rejected, p.aspect) for p in a] == [(p.chosen, p.rejected, p.aspect) for p in b]
    assert {p.aspect for p in a} == {"correctness", "format", "faithfulness", "helpfulness"}
    for p in a:
        assert p.chosen != p.rejected
        if p.aspect == "format":
            assert "<answer>" in p.chosen and "<answer>" not in p.rejected and p.example.answer in p.rejected
        if p.aspect == "faithfulness":  # the rejected description names only objects that were not drawn
            drawn, named = set(described_objects(p.example.reference)), set(described_objects(p.rejected))
            assert named and not named & drawn
        if p.aspect == "helpfulness":  # the rejected answer names no whole object (a colour and a shape)
            assert "<answer>" in p.rejected and not re.search(rf"({'|'.join(COLOURS)}) \w", p.rejected.split("<answer>")[1])
    assert all(p.aspect == "correctness" for p in synthetic_pairs(6, seed=0, kinds=("colour",), answer_format="bare"))


def _write(tmp_path, records):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_valid_preference_file_loads(tmp_path):
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "img.png")
    path = _write(tmp_path, [
        {"id": 1, "prompt": "What colour?", "images": ["img.png"], "chosen": "red", "rejected": "blue", "aspect": "faithful"},
        {"id": "m", "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
         "images": ["img.png"], "chosen": "a", "rejected": "b", "chosen_ratings": {"helpful": 4}},
    ])
    a, m = load_preference_jsonl(path, aspects=["helpful", "faithful"])
    assert (a.id, a.example.problem, a.aspect, a.example.images) == ("1", "What colour?", "faithful", [str(tmp_path / "img.png")])
    assert m.chosen_ratings == {"helpful": 4.0} and m.aspect is None
    batch, labels = encode_pairs(build_tiny()[1], [a, m], ["helpful", "faithful"], answer_format=None)
    assert batch["input_ids"].shape[0] == 4 and labels["aspect_index"].tolist() == [1, -1]
    assert labels["chosen_ratings"][1, 0] == 4.0 and torch.isnan(labels["chosen_ratings"][0]).all()


@pytest.mark.parametrize("record,field", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "'id'"),
    ({"id": "x", "prompt": "p", "rejected": "b"}, "'chosen'"),
    ({"id": "x", "prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen'"),
    ({"id": "x", "prompt": "p", "chosen": "a", "rejected": "a"}, "'rejected'"),
    ({"id": "x", "chosen": "a", "rejected": "b"}, "'prompt'"),
    ({"id": "x", "prompt": "p", "chosen": "a", "rejected": "b", "aspect": "humour"}, "'aspect'"),
    ({"id": "x", "prompt": "p", "chosen": "a", "rejected": "b", "chosen_ratings": {"helpful": "high"}}, "'chosen_ratings.helpful'"),
    ({"id": "x", "prompt": "p", "chosen": "a", "rejected": "b", "rejected_ratings": {"other": 1}}, "'rejected_ratings.other'"),
    ({"id": "x", "prompt": "p", "chosen": "a", "rejected": "b", "images": ["missing.png"]}, "'images[0]'"),
    ({"id": "x", "prompt": "p", "chosen": "a <|image_pad|>", "rejected": "b"}, "'chosen'"),
    ({"id": "x", "messages": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}, "'messages'"),
    ({"id": "x", "prompt": "p", "chosen": "a", "rejected": "b", "score": 1}, "unknown field"),
    ({"id": "ok", "prompt": "p", "chosen": "a", "rejected": "b"}, "'id'"),  # duplicate of line 1
])
def test_bad_preference_record_error_names_file_line_and_field(tmp_path, record, field):
    path = _write(tmp_path, [{"id": "ok", "prompt": "p", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError) as err:
        load_preference_jsonl(path, aspects=["helpful"])
    assert f"{path}:2:" in str(err.value) and field in str(err.value)


def test_bad_config_values_name_the_key(tmp_path):
    for bad, key in [({"gate": "mlp"}, "head.gate"), ({"aspects": []}, "head.aspects"),
                     ({"fixed_weights": [1.0]}, "head.fixed_weights"), ({"gate_temperature": 0.0}, "head.gate_temperature")]:
        with pytest.raises(ValueError, match=key):
            HeadConfig(**{"aspects": ["a", "b"], **bad})
    defaults, rules = train_reward_model.REWARD_MODEL_DEFAULTS, train_reward_model.RULES
    for override, key in [("data.answer_format=xml", "data.answer_format"), ("model.compute_dtype=fp8", "model.compute_dtype"),
                          ("optim.lr=-1", "optim.lr"), ("train.batch_size=0", "train.batch_size")]:
        with pytest.raises(ValueError, match=key):
            load_config(str(TINY_YAML), [override], defaults=defaults, rules=rules)
    with pytest.raises(ValueError, match="did you mean 'head.gate_temperature'"):
        load_config(str(TINY_YAML), ["head.gate_temprature=2"], defaults=defaults, rules=rules)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

def test_tiny_reward_model_learns_synthetic_pairs(tmp_path):
    """The tiny config as shipped: held-out pair accuracy >= 0.9; correctness starts near chance."""
    final, run = _train(tmp_path, "train.log_every=1000", "train.eval_every=0")  # evaluate before and after only
    cfg = load_config(str(TINY_YAML), [], defaults=train_reward_model.REWARD_MODEL_DEFAULTS)
    for aspect in ("correctness", "faithfulness"):                  # a random model cannot judge the image ...
        assert final[f"init_eval/accuracy/{aspect}"] < 0.7, final
        assert final[f"eval/accuracy/{aspect}"] >= 0.85, final        # ... the trained one can
    assert final["eval/accuracy"] >= 0.9, final
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert len(steps) == cfg["train"]["steps"] and {"loss", "accuracy", "margin", "grad_norm"} <= set(steps[-1])
    assert any("accuracy/format" in m for m in steps)  # per-aspect accuracy, in the steps whose batch has such pairs
    # The export is the trained model: it reproduces the held-out accuracy on its own.
    rm = RewardModel.from_pretrained(run / "reward_model")
    pairs = synthetic_pairs(cfg["data"]["n_eval"], seed=cfg["seed"] + 10_007, kinds=cfg["data"]["kinds"])
    examples = [p.example for p in pairs]
    bs = cfg["train"]["eval_batch_size"]  # the same batches as the in-training evaluation: bitwise-equal scores
    s_c = rm.score(examples, [p.chosen for p in pairs], batch_size=bs)[1]
    s_r = rm.score(examples, [p.rejected for p in pairs], batch_size=bs)[1]
    assert abs(((s_c > s_r).float().mean().item()) - final["eval/accuracy"]) < 1e-6


def test_checkpoint_resume_continues_from_the_saved_step(tmp_path):
    small = ["data.n_train=16", "data.n_eval=0", "train.batch_size=4", "train.save_every=2", "train.export=false",
             "train.log_every=1000"]
    _, run = _train(tmp_path, "train.steps=2", *small)
    assert (run / "checkpoints" / "latest").is_file()
    final = train_reward_model.main(["--config", str(TINY_YAML), f"run_dir={run}", "train.steps=3", *small, "--resume"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and final["step"] == 3


def test_two_rank_fsdp_training_and_uneven_scoring_match_one_process(tmp_path):
    """torchrun, FSDP2 on CPU: 3 eval pairs scored one per batch give the ranks 2 and 1 forwards, so rank 1 pads
    with a text-only forward while rank 0 runs an image batch; a hang or a collective mismatch fails here."""
    args = ["--config", str(TINY_YAML), f"run_dir={tmp_path / 'two'}", "train.steps=2", "data.n_train=32",
            "data.n_eval=3", "train.eval_batch_size=1", "train.batch_size=4", "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train_reward_model.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]

    _train(tmp_path, "train.steps=2", "data.n_train=32", "data.n_eval=3", "train.eval_batch_size=1",
           "train.batch_size=4", "train.log_every=1000", name="one")
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "eval/margin"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4, (key, a, b)
    w1 = RewardModel.from_pretrained(tmp_path / "one" / "reward_model").state_dict()
    w2 = RewardModel.from_pretrained(tmp_path / "two" / "reward_model").state_dict()
    assert set(w1) == set(w2) and max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-3


def test_score_and_encode_pairs_check_their_arguments():
    rm = _rm()
    processor = rm.processor
    example = synthetic_examples(1, seed=0, kinds=("describe",))[0]
    with pytest.raises(ValueError, match="score: batch_size must be >= 1, got 0"):
        rm.score([example], ["a red circle"], batch_size=0)
    pair = synthetic_pairs(1, seed=0, kinds=("describe",))[0]
    with pytest.raises(ValueError, match=r"pairs labelled with aspects the model does not have .*model aspects \['x'\]"):
        encode_pairs(processor, [pair], ["x"])
