"""Run by tests/test_distributed.py, as one plain process or under `torchrun --nproc_per_node 2`.

    python tests/dist/grpo_worker.py MODE OUT_DIR

Every rank builds the same tiny model and samples the same global rollout (4 prompts × 4 responses) before
sharding; each rank then keeps its half of the prompts, exactly as train.py splits a step's batch.
MODE: update (one GRPO update; rank 0 saves loss + full weights), nan (rank 1's advantages are NaN: the step
must be skipped on every rank, without a hang), export (update, export_hf, then greedy tokens of the sharded
trained model with gathered parameters vs the exported folder's `generate`).
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

import train
from harmo_min import distributed as hdist
from harmo_min.data import encode_prompts
from harmo_min.synthetic import synthetic_examples
from harmo_min.grpo import prompt_batch
from harmo_min.model import build_tiny
from harmo_min.rollout import Rollout, sample

N_PROMPTS, N = 4, 4


def main(mode: str, out: Path) -> None:
    dist = hdist.init_distributed("cpu")
    torch.manual_seed(0)
    model, processor = build_tiny(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)  # a less uniform random policy: varied tokens and ratios
    examples = synthetic_examples(N_PROMPTS, seed=2, kinds=("count", "colour"))
    everything = encode_prompts(processor, examples)
    rollout = sample(model, everything, n=N, max_new_tokens=6, generator=torch.Generator().manual_seed(0),
                     tokenizer=processor.tokenizer)
    advantages = torch.linspace(-1.0, 1.0, N_PROMPTS * N)

    per_rank = N_PROMPTS // dist.world_size
    mine = slice(dist.rank * per_rank * N, (dist.rank + 1) * per_rank * N)
    batch = examples[dist.rank * per_rank:(dist.rank + 1) * per_rank]
    encoded = encode_prompts(processor, batch)
    local = Rollout(prompt_index=rollout.prompt_index[mine] - dist.rank * per_rank,
                    response_ids=rollout.response_ids[mine], response_mask=rollout.response_mask[mine],
                    logprobs=rollout.logprobs[mine], finish_reason=rollout.finish_reason[mine],
                    texts=rollout.texts[mine])
    adv = advantages[mine].clone()
    if mode == "nan" and dist.rank == 1:
        adv[0] = float("nan")

    model = hdist.apply_fsdp(model, dist)
    before = {k: v.clone() for k, v in hdist.full_state_dict(model).items()}  # world 1: live tensors
    cfg = train.GRPO_DEFAULTS | {"grpo": train.GRPO_DEFAULTS["grpo"] | {"micro_batch_size": 3},
                                 "rollout": train.GRPO_DEFAULTS["rollout"] | {"max_new_tokens": 6},
                                 "optim": train.GRPO_DEFAULTS["optim"] | {"lr": 1e-2}}
    # SGD: the weight change is the gradient itself. (Adam's first step is ~lr·sign(g), which turns float noise
    # on near-zero gradients into full-size differences and would hide what this test checks.)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    metrics = train.grpo_update(model, optimizer, prompt_batch(encoded, [1] * per_rank), local, adv,
                                local.response_mask.clone(), cfg, dist)
    after = hdist.full_state_dict(model)
    if dist.is_main:
        changed = max((after[k] - before[k]).abs().max().item() for k in after)
        torch.save(after, out / "weights.pt")
        (out / "metrics.json").write_text(json.dumps({**metrics, "max_change": changed}))

    if mode == "export":
        exported = hdist.export_hf(model, processor, out / "hf", dist)
        model.eval()
        with hdist.gathered_params(model):
            greedy = sample(model, everything, n=1, max_new_tokens=8, temperature=0, eos_ids=[-1])
        if dist.is_main:
            from harmo_min.model import load_policy
            from harmo_min.model import placeholder_ids
            loaded, loaded_processor = load_policy(exported, dtype=torch.float32)
            again = encode_prompts(loaded_processor, examples)
            hf = loaded.generate(**again, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 suppress_tokens=placeholder_ids(loaded))[:, again["input_ids"].shape[1]:]
            (out / "export.json").write_text(json.dumps({"ours": greedy.response_ids.tolist(), "hf": hf.tolist()}))
    hdist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
